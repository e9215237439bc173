"""Two-phase fine-tuning of memory-augmented ViTs, for our trainer and for timm's own train.py.

Phase 1 (``epoch < freeze_epochs``): the pretrained backbone is frozen; the memory modules and the
classifier head train at the base learning rate. Phase 2: everything trains, the backbone at
``backbone_lr_scale`` times the base learning rate (default 0.1).

How the freeze works, and why this way (DESIGN section 4):

- Every parameter keeps ``requires_grad=True``. DDP registers only the parameters that require grad
  when it is built, so flipping the flag at the phase switch would silently leave the backbone
  unsynchronised across replicas. Instead each optimizer param group carries a ``role``
  (backbone / memory / head, from :func:`titans_timm.vit.split_parameters`) and the backbone groups get
  ``lr_scale = 0`` *and* ``weight_decay = 0`` in phase 1: timm's schedulers multiply every group's
  LR by its ``lr_scale``, and decoupled weight decay (AdamW: ``p *= 1 - lr * wd``) is zeroed too, so
  ``p - 0 * update`` leaves each backbone tensor bit-identical.
- At the switch the backbone's optimizer state (Adam moments, step counts) is dropped, so phase 2
  starts the backbone like a plain fine-tune (the same cold start the fair-comparison baseline gets),
  rather than with moments gathered while the memory was still moving. The reset happens exactly at
  ``epoch == freeze_epochs``, so a run resumed across the switch does the same thing.
- Gradient clipping in phase 1 should only see the parameters that move: :func:`active_parameters`.

timm's train.py patch: ``python train.py --device-modules titans_timm.two_phase -c recipe.yaml``.
timm imports each ``--device-modules`` entry before it builds the model; ``create_optimizer_v2`` and
``train_one_epoch`` are globals of its ``__main__`` looked up at call time, so importing this module
replaces both there (see :func:`patch_timm_train_script`): the optimizer gets the role-tagged groups
and each epoch first applies its phase. ``freeze_epochs`` and ``backbone_lr_scale`` come from the
recipe (timm turns unknown YAML keys into ``args`` attributes via ``parser.set_defaults``).
"""
import logging
import sys
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.utils import unwrap_model

__all__ = [
    'ROLES', 'DEFAULT_BACKBONE_LR_SCALE', 'phase_of', 'parameter_roles', 'two_phase_param_groups',
    'apply_phase', 'start_epoch_phase', 'reset_optimizer_state', 'active_parameters', 'describe_lrs',
    'freeze_backbone_norm_stats', 'backbone_norm_layers',
    'patch_timm_train_script',
]

_logger = logging.getLogger(__name__)

ROLES = ('backbone', 'memory', 'head')
DEFAULT_BACKBONE_LR_SCALE = 0.1


def phase_of(epoch: int, freeze_epochs: int) -> int:
    """Phase number (1 = backbone frozen, 2 = all train) of 0-based ``epoch``."""
    return 1 if epoch < (freeze_epochs or 0) else 2


def _split_parameters(model: nn.Module) -> Dict[str, list]:
    from titans_timm.vit import split_parameters  # imported late: titans_timm imports this module's users
    return split_parameters(model)


def parameter_roles(model: nn.Module) -> Dict[int, str]:
    """Map ``id(param)`` -> role ('backbone', 'memory' or 'head') for every parameter of ``model``."""
    groups = _split_parameters(unwrap_model(model))
    roles = {}
    for role in ROLES:
        for _, p in groups.get(role, ()):
            roles[id(p)] = role
    return roles


def two_phase_param_groups(
        model: nn.Module,
        weight_decay: float = 0.,
        layer_decay: Optional[float] = None,
        layer_decay_min_scale: float = 0.,
        layer_decay_no_opt_scale: Optional[float] = None,
        weight_decay_exclude_1d: bool = True,
) -> List[dict]:
    """timm's weight-decay (or layer-decay) param groups, each further split by role.

    Every group gets ``role``, ``base_lr_scale`` (the layer-decay scale, 1.0 without layer decay),
    ``base_weight_decay`` and ``lr_scale`` / ``weight_decay`` for phase 2; call :func:`apply_phase`
    before the first step. Usable as ``create_optimizer_v2(model, param_group_fn=...)``.
    """
    model = unwrap_model(model)
    no_wd = getattr(model, 'no_weight_decay', lambda: set())()
    if layer_decay is not None:
        groups = param_groups_layer_decay(
            model, weight_decay=weight_decay, layer_decay=layer_decay, no_weight_decay_list=no_wd,
            weight_decay_exclude_1d=weight_decay_exclude_1d, min_scale=layer_decay_min_scale,
            no_opt_scale=layer_decay_no_opt_scale)
    else:
        groups = param_groups_weight_decay(
            model, weight_decay=weight_decay, no_weight_decay_list=no_wd,
            weight_decay_exclude_1d=weight_decay_exclude_1d)
    roles = parameter_roles(model)
    out = []
    for group in groups:
        by_role = {}
        for p in group['params']:
            role = roles.get(id(p))
            if role is None:
                raise ValueError('split_parameters() left a parameter out of backbone/memory/head; '
                                 'every parameter must have exactly one role')
            by_role.setdefault(role, []).append(p)
        for role in ROLES:
            if role not in by_role:
                continue
            g = {k: v for k, v in group.items() if k != 'params'}
            g['params'] = by_role[role]
            g['role'] = role
            g['base_lr_scale'] = float(group.get('lr_scale', 1.0))
            g['lr_scale'] = g['base_lr_scale']
            g['base_weight_decay'] = float(group.get('weight_decay', weight_decay))
            g['weight_decay'] = g['base_weight_decay']
            out.append(g)
    return out


def _unscaled_lr(optimizer: torch.optim.Optimizer) -> float:
    # The scheduler wrote lr = value * lr_scale into every group; recover value from a group that
    # is never frozen (head/memory) so the backbone's LR can be set without stepping the scheduler.
    for g in optimizer.param_groups:
        if g.get('role') != 'backbone' and g.get('lr_scale', 1.0) > 0:
            return g['lr'] / g.get('lr_scale', 1.0)
    for g in optimizer.param_groups:
        if 'initial_lr' in g:
            return g['initial_lr'] / max(g.get('base_lr_scale', 1.0), 1e-12)
    return optimizer.defaults['lr']


def apply_phase(optimizer: torch.optim.Optimizer, phase: int, backbone_lr_scale: float) -> None:
    """Set the backbone groups' ``lr_scale`` / ``weight_decay`` (and current ``lr``) for ``phase``.

    Phase 1: ``lr_scale = 0`` and ``weight_decay = 0`` (bit-identical backbone). Phase 2:
    ``lr_scale = base_lr_scale * backbone_lr_scale`` and the group's own weight decay. Groups without a
    ``role`` (not built by :func:`two_phase_param_groups`) raise, since the freeze would silently not apply.
    """
    if not any('role' in g for g in optimizer.param_groups):
        raise ValueError('optimizer param groups carry no role; build them with two_phase_param_groups()')
    value = _unscaled_lr(optimizer)
    for g in optimizer.param_groups:
        if g.get('role') != 'backbone':
            continue
        if phase == 1:
            g['lr_scale'] = 0.0
            g['weight_decay'] = 0.0
        else:
            g['lr_scale'] = g['base_lr_scale'] * float(backbone_lr_scale)
            g['weight_decay'] = g['base_weight_decay']
        g['lr'] = value * g['lr_scale']


def reset_optimizer_state(optimizer: torch.optim.Optimizer, role: str = 'backbone') -> int:
    """Drop the optimizer state (moments, step counts) of every parameter in groups of ``role``.

    Returns the number of parameters whose state was dropped.
    """
    n = 0
    for g in optimizer.param_groups:
        if g.get('role') != role:
            continue
        for p in g['params']:
            if optimizer.state.pop(p, None) is not None:
                n += 1
    return n


def active_parameters(optimizer: torch.optim.Optimizer) -> List[torch.Tensor]:
    """Parameters of groups that can move now (``lr_scale != 0``): what gradient clipping should see."""
    return [p for g in optimizer.param_groups if g.get('lr_scale', 1.0) != 0 for p in g['params']]


def describe_lrs(optimizer: torch.optim.Optimizer) -> Dict[str, float]:
    """Current learning rate per role (the largest over that role's groups), for logging."""
    out = {}
    for g in optimizer.param_groups:
        role = g.get('role', 'all')
        out[role] = max(out.get(role, 0.0), float(g['lr']))
    return {k: out[k] for k in (*ROLES, 'all') if k in out}


def backbone_norm_layers(model: nn.Module) -> List[nn.Module]:
    """The backbone's BatchNorm layers that keep running statistics (none in a ViT).

    A frozen backbone must not change at all, but BatchNorm's running statistics are buffers that training
    mode updates on every forward, whatever the LR. A norm layer counts as backbone unless one of its
    parameters is a memory or head parameter.
    """
    roles = parameter_roles(model)
    return [m for m in unwrap_model(model).modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and all(roles.get(id(p), 'backbone') == 'backbone' for p in m.parameters(recurse=False))]


def freeze_backbone_norm_stats(model: nn.Module) -> int:
    """Put the backbone's BatchNorm layers in eval mode (call after ``model.train()`` in phase 1); returns how
    many (see :func:`backbone_norm_layers`)."""
    layers = backbone_norm_layers(model)
    for layer in layers:
        layer.eval()
    return len(layers)


def _stay_in_eval(module: nn.Module, inputs) -> None:
    module.eval()   # forward pre-hook: timm's train_one_epoch calls model.train() where we cannot step in


def start_epoch_phase(optimizer, epoch: int, freeze_epochs: int, backbone_lr_scale: float,
                      reset_at_switch: bool = True) -> int:
    """Apply the phase of ``epoch``; at ``epoch == freeze_epochs`` also drop the backbone optimizer state.

    Returns the phase (1 or 2).
    """
    phase = phase_of(epoch, freeze_epochs)
    apply_phase(optimizer, phase, backbone_lr_scale)
    if reset_at_switch and freeze_epochs and epoch == freeze_epochs:
        reset_optimizer_state(optimizer, 'backbone')
    return phase


# ---------------------------------------------------------------------------------------------
# Patch for timm's train.py (``--device-modules titans_timm.two_phase``)
# ---------------------------------------------------------------------------------------------

def _patched_create_optimizer_v2(original, model_or_params, *args, **kwargs):
    if isinstance(model_or_params, nn.Module) and kwargs.get('param_group_fn') is None:
        kwargs['param_group_fn'] = partial(
            two_phase_param_groups,
            weight_decay=kwargs.get('weight_decay', 0.),
            layer_decay=kwargs.get('layer_decay'),
            layer_decay_min_scale=kwargs.get('layer_decay_min_scale', 0.) or 0.,
            layer_decay_no_opt_scale=kwargs.get('layer_decay_no_opt_scale'),
        )
    return original(model_or_params, *args, **kwargs)


def _patched_train_one_epoch(original, epoch, model, loader, optimizer, args, *rest, **kwargs):
    freeze_epochs = int(getattr(args, 'freeze_epochs', 0) or 0)
    backbone_lr_scale = getattr(args, 'backbone_lr_scale', None)
    backbone_lr_scale = DEFAULT_BACKBONE_LR_SCALE if backbone_lr_scale is None else float(backbone_lr_scale)
    phase = start_epoch_phase(optimizer, epoch, freeze_epochs, backbone_lr_scale)
    if getattr(args, 'rank', 0) == 0:
        lrs = ', '.join(f'{k}={v:.3e}' for k, v in describe_lrs(optimizer).items())
        _logger.info(f'two-phase: epoch {epoch} phase {phase} '
                     f'({"backbone frozen" if phase == 1 else "all train"}); lr {lrs}')
    if phase == 1 and getattr(args, 'clip_grad', None) is not None:
        _logger.warning('two-phase: timm train.py clips over all parameters, so the frozen backbone\'s '
                        'gradients count towards --clip-grad in phase 1')
    # phase 1: the backbone's BatchNorm statistics stay frozen too (each layer turns itself back to eval)
    hooks = [m.register_forward_pre_hook(_stay_in_eval) for m in backbone_norm_layers(model)] if phase == 1 else []
    try:
        return original(epoch, model, loader, optimizer, args, *rest, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()


def patch_timm_train_script(main_module=None) -> bool:
    """Replace ``create_optimizer_v2`` and ``train_one_epoch`` in timm's train.py module.

    Args:
        main_module: the module to patch; defaults to ``sys.modules['__main__']`` (timm's train.py
            when it imports us through ``--device-modules``).

    Returns:
        True if patched now, False if the module is not timm's train script or was patched already.
    """
    main = main_module if main_module is not None else sys.modules.get('__main__')
    if main is None or not all(callable(getattr(main, n, None)) for n in ('create_optimizer_v2', 'train_one_epoch')):
        return False
    if getattr(main, '_titans_two_phase_patched', False):
        return False
    main.create_optimizer_v2 = partial(_patched_create_optimizer_v2, main.create_optimizer_v2)
    main.train_one_epoch = partial(_patched_train_one_epoch, main.train_one_epoch)
    main._titans_two_phase_patched = True
    return True


# timm's train.py imports this module via --device-modules; the import is the only hook it offers.
if patch_timm_train_script():   # importing this module already registered the models (the package runs first)
    _logger.info('titans_timm.two_phase: patched create_optimizer_v2 and train_one_epoch of timm train.py')
