"""The two-phase schedule as a patch for timm's own train.py (``--device-modules titans_timm.two_phase``)."""
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

import titans_timm
from titans_timm import checkpoint as ckpt
from titans_timm import two_phase
from titans_timm.vit import split_parameters

STRUCT = dict(img_size=32, patch_size=8, depth=2, num_classes=10)


pytestmark = pytest.mark.usefixtures('one_thread')


def _fake_timm_train_module():
    """A stand-in for timm's train.py ``__main__``: the two globals it looks up at call time."""
    module = types.ModuleType('fake_timm_train')
    module.create_optimizer_v2 = create_optimizer_v2

    def train_one_epoch(epoch, model, loader, optimizer, args, lr_scheduler=None, **kwargs):
        # The same sequence as timm's: train mode, forward, backward, (clip), step, zero_grad, step_update.
        model.train()
        updates = epoch * len(loader)
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            updates += 1
            lr_scheduler.step_update(num_updates=updates)
        return {'loss': loss.item()}

    module.train_one_epoch = train_one_epoch
    return module


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_patch_builds_role_groups_and_runs_both_phases():
    module = _fake_timm_train_module()
    assert two_phase.patch_timm_train_script(module)
    assert not two_phase.patch_timm_train_script(module), 'patching twice must be a no-op'
    assert not two_phase.patch_timm_train_script(types.ModuleType('not_timm_train'))

    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_mal_simple', **STRUCT)
    roles = {k: [n for n, _ in v] for k, v in split_parameters(model).items()}
    # timm's train.py calls create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    optimizer = module.create_optimizer_v2(model, opt='adamw', lr=1e-2, weight_decay=0.05, momentum=0.9)
    assert {g['role'] for g in optimizer.param_groups} == {'backbone', 'memory', 'head'}
    n_params = sum(len(g['params']) for g in optimizer.param_groups)
    assert n_params == len(list(model.parameters()))
    loader = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(3)]
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=2, warmup_epochs=0,
                                       step_on_epochs=False, updates_per_epoch=len(loader))
    args = types.SimpleNamespace(freeze_epochs=1, backbone_lr_scale=0.1, rank=0, clip_grad=None)

    before = _snapshot(model)
    module.train_one_epoch(0, model, loader, optimizer, args, lr_scheduler=scheduler)
    after1 = _snapshot(model)
    for n in roles['backbone']:
        assert torch.equal(before[n], after1[n]), f'{n} moved in phase 1'
    for n in roles['memory'] + roles['head']:
        assert not torch.equal(before[n], after1[n]), f'{n} did not train in phase 1'
    # The backbone collected optimizer state in phase 1 (it had gradients); phase 2 starts it afresh.
    backbone_params = [p for g in optimizer.param_groups if g['role'] == 'backbone' for p in g['params']]
    assert all(p in optimizer.state for p in backbone_params)

    module.train_one_epoch(1, model, loader, optimizer, args, lr_scheduler=scheduler)
    after2 = _snapshot(model)
    assert all(not torch.equal(after1[n], after2[n]) for n in roles['backbone'])
    by_role = {g['role']: g for g in optimizer.param_groups if g['weight_decay']}
    assert by_role['backbone']['lr'] == pytest.approx(0.1 * by_role['head']['lr'], rel=1e-9)
    assert by_role['backbone']['weight_decay'] == 0.05


def test_patch_keeps_batchnorm_statistics_frozen_in_phase_1():
    """A CNN backbone under the patched timm loop: its BatchNorm buffers are backbone tensors too."""
    module = _fake_timm_train_module()
    two_phase.patch_timm_train_script(module)
    torch.manual_seed(0)
    model = timm.create_model('resnet10t', num_classes=10)
    optimizer = module.create_optimizer_v2(model, opt='adamw', lr=1e-2, weight_decay=0.05)
    loader = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=2, warmup_epochs=0,
                                       step_on_epochs=False, updates_per_epoch=len(loader))
    args = types.SimpleNamespace(freeze_epochs=1, backbone_lr_scale=0.1, rank=0, clip_grad=None)
    stats = lambda: {n: b.clone() for n, b in model.named_buffers() if 'running' in n}
    before = stats()
    module.train_one_epoch(0, model, loader, optimizer, args, lr_scheduler=scheduler)
    assert all(torch.equal(before[n], b) for n, b in stats().items()), 'BatchNorm statistics moved in phase 1'
    module.train_one_epoch(1, model, loader, optimizer, args, lr_scheduler=scheduler)
    assert not all(torch.equal(before[n], b) for n, b in stats().items()), 'phase 2 must update them'


def test_apply_phase_and_reset_state():
    model = timm.create_model('vit_tiny_mag_mlp', **STRUCT)
    groups = two_phase.two_phase_param_groups(model, weight_decay=0.1)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    two_phase.apply_phase(optimizer, 1, 0.1)
    for g in optimizer.param_groups:
        if g['role'] == 'backbone':
            assert g['lr'] == 0 and g['weight_decay'] == 0 and g['lr_scale'] == 0
        else:
            assert g['lr'] == pytest.approx(1e-3)
    backbone_ids = {id(q) for g in optimizer.param_groups if g['role'] == 'backbone' for q in g['params']}
    active = two_phase.active_parameters(optimizer)
    assert active and not any(id(p) in backbone_ids for p in active)
    two_phase.apply_phase(optimizer, 2, 0.25)
    for g in optimizer.param_groups:
        if g['role'] == 'backbone':
            assert g['lr'] == pytest.approx(0.25e-3) and g['weight_decay'] == g['base_weight_decay']
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    n_backbone = sum(len(g['params']) for g in optimizer.param_groups if g['role'] == 'backbone')
    assert two_phase.reset_optimizer_state(optimizer, 'backbone') == n_backbone
    assert two_phase.phase_of(0, 2) == 1 and two_phase.phase_of(2, 2) == 2 and two_phase.phase_of(0, 0) == 2
    with pytest.raises(ValueError, match='role'):
        two_phase.apply_phase(torch.optim.SGD(model.parameters(), lr=0.1), 1, 0.1)


def test_import_patches_a_timm_like_main_module(tmp_path):
    # What happens under `python train.py --device-modules titans_timm.two_phase`: the import patches __main__.
    script = tmp_path / 'train.py'
    script.write_text(textwrap.dedent('''
        import importlib
        from timm.optim import create_optimizer_v2
        def train_one_epoch(*args, **kwargs):
            return None
        original = train_one_epoch
        importlib.import_module('titans_timm.two_phase')
        import timm
        print('patched', train_one_epoch is not original, create_optimizer_v2.__class__.__name__,
              timm.is_model('vit_tiny_mag_advanced'))
    '''))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'patched True partial True' in out.stdout


def _image_folder(root: Path, per_split: int) -> None:
    from titans_timm.data import create_dataset
    for split, n in (('train', per_split), ('validation', per_split // 2)):
        ds = create_dataset('fashion-mnist-mini', split=split, num_samples=n)
        for i in range(len(ds)):
            img, label = ds[i]
            folder = root / split / f'class{label}'
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f'{i}.png')


def test_timm_train_py_two_phase(tmp_path):
    timm_train = os.environ.get('TIMM_TRAIN_PY')
    if not timm_train:
        pytest.skip('set TIMM_TRAIN_PY=/path/to/pytorch-image-models/train.py to run')
    data = tmp_path / 'data'
    _image_folder(data, 40)
    torch.manual_seed(0)
    backbone = timm.create_model('vit_tiny_patch16_224', **STRUCT)
    backbone_path = tmp_path / 'backbone.safetensors'
    safetensors.torch.save_file(backbone.state_dict(), str(backbone_path))
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text(yaml.safe_dump(dict(
        model='vit_tiny_mag_mlp', pretrained=True, pretrained_path=str(backbone_path), num_classes=10,
        model_kwargs=dict(img_size=32, patch_size=8, depth=2), img_size=32, dataset='', data_dir=str(data),
        train_split='train', val_split='validation', batch_size=8, opt='adamw', lr=2e-3, weight_decay=0.05,
        sched='cosine', epochs=2, warmup_epochs=0, freeze_epochs=1, backbone_lr_scale=0.1, device='cpu',
        no_prefetcher=True, workers=0, checkpoint_hist=5, output=str(tmp_path / 'out'), experiment='timm',
        log_interval=1)))
    # A copy outside the checkout, so the installed timm is used rather than the checkout's own timm/ package.
    script = tmp_path / 'train.py'
    shutil.copy(timm_train, script)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(Path(titans_timm.__file__).resolve().parents[1]))
    out = subprocess.run(
        [sys.executable, str(script), '--device-modules', 'titans_timm.two_phase', '-c', str(recipe)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert 'two-phase: epoch 0 phase 1' in log and 'two-phase: epoch 1 phase 2' in log, log[-3000:]
    run = tmp_path / 'out' / 'timm'
    epoch0 = ckpt.read_state_dict(run / 'checkpoint-0.pth.tar')
    epoch1 = ckpt.read_state_dict(run / 'checkpoint-1.pth.tar')
    start = backbone.state_dict()
    model = timm.create_model('vit_tiny_mag_mlp', **STRUCT)
    roles = {k: [n for n, _ in v] for k, v in split_parameters(model).items()}
    for n in roles['backbone']:
        assert torch.equal(epoch0[n], start[n]), f'{n} moved in phase 1 under timm train.py'
    assert all(not torch.equal(epoch0[n], epoch1[n]) for n in roles['backbone'])
    assert any(not torch.equal(epoch0[n], epoch1[n]) for n in roles['memory'])
