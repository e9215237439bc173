"""Model files: a run folder in timm's layout, the single-file checkpoint before it, and safe, strict reads of both.

A model is a folder as timm's ``save_for_hf`` writes one (``timm.create_model('local-dir:DIR', pretrained=True)``
loads it, ``titans-timm-push`` uploads it unchanged): ``config.json`` (:func:`config_json`: architecture, resolved
``model_args``, label names, the ``pretrained_cfg`` it was trained with) and ``model.safetensors``
(:func:`weights_bytes`, metadata ``{'format': 'pt'}``). The older single file (:func:`save_model`, the shipped
backbone) keeps the same recipe in its safetensors metadata under ``"titans_timm"``. :func:`read_metadata` and
:func:`load_model` read both into one dict::

    {"architecture": "vit_tiny_mal_simple", "model_args": {...}, "label_names": [...] or None,
     "pretrained_cfg": {"mean": [...], "std": [...], "input_size": [3, 32, 32], ...}, ...}

Writes are atomic, reads never unpickle code, loads are strict, and a file saved with a checksum is verified on
every read; each failure is one :class:`CheckpointError` line that says what to do (docs/hub.md, "Model files").
"""
import argparse
import contextlib
import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import safetensors
import safetensors.torch
import timm
from timm.models import clean_state_dict
from timm.models._hub import save_config_for_hf
from timm.models._input import get_model_input_config

__all__ = [
    'CheckpointError', 'CONFIG_NAME', 'WEIGHTS_NAME', 'METADATA_KEY', 'FORMAT_VERSION', 'CHECKSUM_KEY', 'config_json',
    'weights_bytes', 'resolved_model_args', 'save_model', 'load_model', 'read_metadata',
    'atomic_write_bytes', 'read_state_dict', 'load_state_dict_file', 'check_state_dict', 'pretrained_cfg_subset',
    'tensors_sha256',
]

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
METADATA_KEY = 'titans_timm'
FORMAT_VERSION = 1
CHECKSUM_KEY = 'tensors_sha256'
# The pretrained_cfg entries an evaluator needs to rebuild the eval transform and head.
PRETRAINED_CFG_KEYS = ('mean', 'std', 'input_size', 'interpolation', 'crop_pct', 'num_classes')
# The preprocessing a config.json records (timm's data config keys).
DATA_CONFIG_KEYS = ('input_size', 'mean', 'std', 'interpolation', 'crop_pct', 'crop_mode')
# Model arguments only titans-timm architectures take: they describe the stored architecture, not another one.
MEMORY_MODEL_ARGS = ('approach', 'memory_type', 'memory_blocks', 'memory_interval', 'memory_options',
                     'num_persistent_tokens', 'num_memory_tokens')
_MAX_KEYS_SHOWN = 5

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model it should load into."""


def _json(value: Any, what: str) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), or an error naming the entries that are not JSON."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        bad = []
        for k, v in value.items() if isinstance(value, dict) else ():
            try:
                json.dumps(v)
            except (TypeError, ValueError):
                bad.append(f'{k}={type(v).__name__}')
        raise CheckpointError(f"{what} must be JSON-serialisable (numbers, strings, lists, dicts), not "
                              f"{', '.join(bad) or e}; pass plain values, e.g. a layer name instead of a layer "
                              f"class") from None


def pretrained_cfg_subset(model: nn.Module) -> Dict[str, Any]:
    """The ``pretrained_cfg`` entries an evaluator needs, with the input size the model was built for (timm keeps
    the pretrained one, e.g. 224, when a model is built with another ``img_size``)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    out = {k: cfg[k] for k in PRETRAINED_CFG_KEYS if cfg.get(k) is not None}
    out.update(input_size=get_model_input_config(model)['input_size'], num_classes=model.num_classes)
    return _json(out, 'pretrained_cfg')


def tensors_sha256(state_dict: Dict[str, torch.Tensor]) -> str:
    """sha256 (hex) over every tensor's name, dtype, shape and bytes, in name order: it depends on the tensors only,
    not on how a file lays them out."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f'{name}\0{t.dtype}\0{tuple(t.shape)}\0'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, whatever the dtype (bfloat16 included)
    return h.hexdigest()


def resolved_model_args(model: nn.Module, model_args: Dict[str, Any]) -> Dict[str, Any]:
    """``model_args`` with every memory argument at the value ``model`` was built with (see
    ``TitansVisionTransformer.resolved_model_args``), so a later change of a default cannot change what a saved
    model rebuilds into. Raises :class:`CheckpointError` for values that are not JSON."""
    args = dict(model_args or {})
    if callable(getattr(model, 'resolved_model_args', None)):
        args.pop('memory_interval', None)  # memory_blocks states the same placement, and overrides it
        args.update(model.resolved_model_args())
    return _json(args, 'model_args')


def weights_bytes(model: Union[nn.Module, Dict[str, torch.Tensor]], *, metadata: Optional[Dict[str, Any]] = None,
                  checksum: bool = False) -> bytes:
    """``model``'s weights (a module or a state dict) as a safetensors file with the metadata ``{'format': 'pt'}``.

    ``metadata`` (JSON values) goes under the ``"titans_timm"`` key; ``checksum`` adds :func:`tensors_sha256` of the
    weights to it, which every read of the file then verifies.
    """
    tensors, storages = {}, set()
    for name, t in (model if isinstance(model, dict) else model.state_dict()).items():
        t = t.detach().cpu()
        storage = t.untyped_storage().data_ptr() if t.numel() else None
        tensors[name] = (t.clone() if storage in storages else t).contiguous()  # safetensors refuses shared storage
        storages.add(storage)
    # a checksum copied from another file's metadata would not describe these tensors
    meta = {k: v for k, v in _json(dict(metadata or {}), 'metadata').items() if k != CHECKSUM_KEY}
    if checksum:
        meta[CHECKSUM_KEY] = tensors_sha256(tensors)
    return safetensors.torch.save(tensors, metadata=dict(format='pt', **({METADATA_KEY: json.dumps(meta)} if meta else {})))


def config_json(model: nn.Module, *, model_args: Dict[str, Any], label_names: Optional[Sequence[str]] = None,
                data_config: Optional[Dict[str, Any]] = None) -> str:
    """The ``config.json`` text of ``model`` (unwrapped), written by timm's own ``save_config_for_hf``.

    ``model_args`` are stored resolved (:func:`resolved_model_args`); ``label_names`` in label order;
    ``data_config`` is the preprocessing it was trained with (``input_size``, ``mean``, ``std``, ...), which
    ``resolve_data_config`` then gives an evaluator.
    """
    if label_names and len(label_names) != model.num_classes:
        raise CheckpointError(f'{len(label_names)} label names for a model with {model.num_classes} classes; pass '
                              f'one name per class')
    model_config = dict(pretrained_cfg=dict(num_classes=model.num_classes))
    if label_names:
        # top level is where timm reads them; pretrained_cfg is where a loaded model shows them
        model_config['label_names'] = model_config['pretrained_cfg']['label_names'] = [str(n) for n in label_names]
    data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in (data_config or {}).items()
                   if k in DATA_CONFIG_KEYS and v is not None}
    args = resolved_model_args(model, model_args)
    cfg = model.pretrained_cfg
    # timm copies the model's pretrained cfg; the backbone's tag (augreg_in21k_ft_in1k, say) names other weights
    model.pretrained_cfg = {k: v for k, v in cfg.items() if k != 'tag'}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            save_config_for_hf(model, os.path.join(tmp, CONFIG_NAME), model_config=model_config, model_args=args,
                               data_config=data_config)
            return Path(tmp, CONFIG_NAME).read_text()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f'timm cannot write config.json for this model ({e}); use JSON values (numbers, '
                              f'strings, lists) for every model argument') from None
    finally:
        model.pretrained_cfg = cfg


def _new_file_mode() -> int:
    """The mode ``open(path, 'w')`` would give a new file: 0o666 less the process umask."""
    try:  # Linux >= 4.7 shows the umask without changing it
        with open('/proc/self/status') as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith('Umask:'))
    except (OSError, StopIteration, ValueError, IndexError):
        # elsewhere it is read by setting it and setting it straight back (a thread creating a file in between
        # would get 0o022)
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see either the old file or the complete new one (temp file in the same
    folder, fsync, rename), with the mode of a new file (0o666 less the umask), not mkstemp's private 0o600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            if hasattr(os, 'fchmod'):  # not on Windows, where mkstemp's mode means nothing anyway
                os.fchmod(f.fileno(), _new_file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C mid-write cleans up too
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # makes the rename itself durable; not possible on every OS and filesystem, hence best effort
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_model(model: nn.Module, path: PathLike, *, architecture: str, model_args: Dict[str, Any],
               label_names: Optional[Sequence[str]] = None, extra_metadata: Optional[Dict[str, Any]] = None,
               checksum: bool = False) -> Path:
    """Save ``model`` (unwrapped) and the recipe to rebuild it as one safetensors file, atomically: the single-file
    format of the shipped backbone (``tools/pretrain_backbone.py``); training writes a run folder instead.

    ``architecture`` is the timm model name, ``model_args`` its ``create_model`` kwargs (stored resolved),
    ``label_names`` the class names in label order. ``extra_metadata`` adds JSON entries (``seed``, ``dataset``...);
    a ``'pretrained_cfg'`` dict in it updates the recorded one (e.g. the normalisation actually trained with).
    ``checksum`` stores :func:`tensors_sha256`, which every read verifies. Raises :class:`CheckpointError` for a
    missing architecture or metadata that is not JSON.
    """
    if not isinstance(architecture, str) or not architecture:
        raise CheckpointError(f'architecture must be a timm model name string, got {architecture!r}')
    from titans_timm import __version__
    extra = _json(dict(extra_metadata or {}), 'extra_metadata')
    pretrained_cfg = pretrained_cfg_subset(model) if isinstance(model, nn.Module) else {}
    pretrained_cfg.update(extra.pop('pretrained_cfg', None) or {})
    meta = dict(format_version=FORMAT_VERSION, titans_timm_version=__version__, architecture=architecture,
                model_args=resolved_model_args(model, model_args), pretrained_cfg=pretrained_cfg,
                label_names=[str(n) for n in label_names] if label_names is not None else None)
    meta.update({k: v for k, v in extra.items() if k not in meta})  # loaders rely on the core keys
    atomic_write_bytes(path, weights_bytes(model, metadata=meta, checksum=checksum))
    return Path(path)


def _check_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f'checkpoint not found: {path} (check the path; training writes '
                              f'OUTPUT/EXPERIMENT/model.safetensors)')
    if path.is_dir():
        raise CheckpointError(f'checkpoint path is a directory: {path}; pass the .safetensors file inside it '
                              f'(e.g. {path / WEIGHTS_NAME})')
    return path


def _is_safetensors(path: Path) -> bool:
    """By name, or by content: an 8-byte little-endian header length, then the JSON header's ``{``."""
    if path.suffix == '.safetensors':
        return True
    with open(path, 'rb') as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b'{' and 0 < int.from_bytes(head[:8], 'little') <= path.stat().st_size


def _read_safetensors(path: Path, tensors: bool = False) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The file's ``"titans_timm"`` metadata (``{}`` if none) and, if asked, its tensors."""
    try:
        with safetensors.safe_open(str(path), framework='pt') as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            state = f.get_tensors() if tensors else {}
    except Exception as e:  # SafetensorError has no stable import path across versions
        raise CheckpointError(f'{path} is not a valid safetensors file ({e}); it may be truncated or corrupt: '
                              f're-save or re-download it') from None
    meta = None
    with contextlib.suppress(json.JSONDecodeError):
        meta = json.loads(raw or '{}')
    if not isinstance(meta, dict):
        raise CheckpointError(f'{path}: its titans_timm metadata is not a JSON object; the file is corrupt')
    return meta, state


def _config_metadata(folder: Path) -> Dict[str, Any]:
    """What ``folder/config.json`` says about its model, in the shape :func:`read_metadata` gives."""
    path = folder / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
        cfg = config.get('pretrained_cfg') or {}
        return dict(architecture=config['architecture'], model_args=dict(config.get('model_args') or {}),
                    label_names=config.get('label_names') or cfg.get('label_names'),
                    pretrained_cfg={k: cfg[k] for k in PRETRAINED_CFG_KEYS if cfg.get(k) is not None})
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f'{path} is not a timm config.json ({type(e).__name__}: {e}); the folder is damaged: '
                              f'use an intact copy') from None


def read_metadata(path: PathLike, *, required: bool = True) -> Dict[str, Any]:
    """What a model folder or weights file says about its model: ``architecture``, ``model_args``, ``label_names``,
    ``pretrained_cfg``, and whatever else the file's ``"titans_timm"`` metadata holds.

    ``path`` is a model folder, a weights file in one (``model.safetensors``, the trainer's ``last.safetensors``:
    the folder's config.json describes it, the file's own metadata adds to that), a :func:`save_model` file, or
    any weights file. With ``required=False`` a file that names no model gives what it has (``{}`` for a plain
    state dict) instead of a :class:`CheckpointError`.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise CheckpointError(f'{path} is a directory without {CONFIG_NAME}; pass a run folder (config.json + '
                                  f'model.safetensors) or a weights file')
        return _config_metadata(path)
    path = _check_file(path)
    meta = _read_safetensors(path)[0] if _is_safetensors(path) else {}
    if 'architecture' not in meta and (path.parent / CONFIG_NAME).is_file():
        meta = {**_config_metadata(path.parent), **meta}
    if 'architecture' not in meta and required:
        raise CheckpointError(f'{path} does not say which model it holds (no titans_timm metadata, no config.json '
                              f'next to it); pass architecture=NAME and the model kwargs, e.g. load_model(path, '
                              f"architecture='vit_tiny_patch16_224', num_classes=10)")
    return meta


def read_state_dict(path: PathLike, *, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Read a state dict from safetensors (checking its stored checksum) or a ``.pth``/``.pt``/``.bin`` file,
    never unpickling code (``torch.load(weights_only=True)``).

    timm training checkpoints (``{'state_dict', 'state_dict_ema', 'args': Namespace}``) are unwrapped, taking the
    EMA weights if ``use_ema`` and present; DDP / torch.compile prefixes are removed.
    """
    path = _check_file(path)
    if _is_safetensors(path):
        meta, state = _read_safetensors(path, tensors=True)
        if meta.get(CHECKSUM_KEY) and tensors_sha256(state) != meta[CHECKSUM_KEY]:
            raise CheckpointError(f'{path} is corrupt: its tensor bytes do not match the checksum stored in its '
                                  f'header ({CHECKSUM_KEY}), so its weights were overwritten or zeroed after it was '
                                  f'written; use an intact copy')
    else:
        try:
            # timm train.py stores its args in an argparse.Namespace, a plain attribute container
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(str(path), map_location='cpu', weights_only=True)
        except pickle.UnpicklingError:
            names = ''
            with contextlib.suppress(Exception):
                names = ', '.join(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))[:_MAX_KEYS_SHOWN])
            raise CheckpointError(
                f"{path} holds pickled objects other than tensors{f' ({names})' if names else ''}, which are never "
                f'unpickled (weights_only=True); re-save only its state_dict with torch.save, or as safetensors'
            ) from None
        except Exception as e:
            raise CheckpointError(f'{path} is neither a safetensors file nor a readable PyTorch checkpoint '
                                  f'({type(e).__name__}: {str(e)[:200]}); it may be corrupt') from None
        if isinstance(state, dict):
            for key in (('state_dict_ema', 'model_ema') if use_ema else ()) + ('state_dict', 'model'):
                if isinstance(state.get(key), dict):
                    state = state[key]
                    break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f'{path} does not contain a state dict (a mapping of names to tensors)')
    return clean_state_dict(state)


def check_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], *, source: str = 'checkpoint',
                     architecture: Optional[str] = None, strict: bool = True) -> None:
    """Raise :class:`CheckpointError` naming the first mismatched keys if ``state_dict`` does not fit ``model``
    (with ``strict=False``, only shape mismatches count)."""
    expected = model.state_dict()
    problems = {
        'missing keys': [k for k in expected if k not in state_dict] if strict else [],
        'unexpected keys': [k for k in state_dict if k not in expected] if strict else [],
        'shape mismatches': [f'{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}'
                             for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]}
    parts = []
    for what, keys in problems.items():
        more = len(keys) - _MAX_KEYS_SHOWN
        shown = ', '.join(keys[:_MAX_KEYS_SHOWN]) + (f' (+{more} more)' if more > 0 else '')
        if keys:
            parts.append(f'{len(keys)} {what}: {shown}')
    if parts:
        raise CheckpointError(f"{source} does not match the model{f' ({architecture})' if architecture else ''}: "
                              f"{'; '.join(parts)}. Check the model name and its kwargs (num_classes, img_size, "
                              f"depth, memory options).")


def load_state_dict_file(model: nn.Module, path: PathLike, *, strict: bool = True, use_ema: bool = False):
    """Load weights from a safetensors or ``.pth`` file into ``model`` and return ``load_state_dict``'s result.

    With ``strict`` (default) any missing/unexpected key or shape mismatch raises :class:`CheckpointError` naming
    them and leaves the model untouched; without it, shape mismatches still raise. ``use_ema`` takes the EMA
    weights of a timm training checkpoint when present.
    """
    state = read_state_dict(path, use_ema=use_ema)
    check_state_dict(model, state, source=str(path), strict=strict)
    return model.load_state_dict(state, strict=strict)


def load_model(path: PathLike, **overrides) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a model from a model folder or checkpoint and load its weights strictly.

    Args:
        path: a model folder or a weights file in one, a :func:`save_model` file, or a plain safetensors / ``.pth``
            state dict (then pass ``architecture=`` and the model kwargs).
        **overrides: ``architecture=NAME`` replaces the stored timm model name (and drops the stored memory
            arguments, which describe the stored one); every other keyword updates the stored ``model_args``
            (e.g. ``drop_path_rate=0.0``). Weights must still fit.

    Returns:
        ``(model, meta)``: the model in eval mode with the stored mean/std/input size... in its ``pretrained_cfg``;
        ``meta`` is :func:`read_metadata`'s with the overrides applied, plus ``'path'``, the weights file read.

    Raises:
        CheckpointError: a missing or corrupt file, no architecture, an unknown architecture or bad model_args,
        or weights that do not fit (naming the first mismatched keys).
    """
    architecture = overrides.pop('architecture', None)
    meta = dict(read_metadata(path, required=architecture is None))
    path = Path(path) / WEIGHTS_NAME if Path(path).is_dir() else Path(path)
    model_args = dict(meta.get('model_args') or {})
    if architecture is not None and architecture != meta.get('architecture'):
        model_args = {k: v for k, v in model_args.items() if k not in MEMORY_MODEL_ARGS}
        meta['architecture'] = architecture
    architecture = meta['architecture']
    model_args.update(overrides)
    meta.update(model_args=model_args, path=str(path))
    meta.setdefault('label_names', None)
    meta.setdefault('pretrained_cfg', {})

    state = read_state_dict(path)
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise CheckpointError(f"{path}: architecture {architecture!r} is not a registered timm model; check the "
                              f"name (titans-timm names look like vit_tiny_mal_simple) or import the package that "
                              f"registers it")
    try:
        model = timm.create_model(architecture, pretrained=False, **model_args)
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: '{architecture}' cannot be built with model_args {model_args} ({e}); drop "
                              f"or rename the offending argument") from None
    check_state_dict(model, state, source=str(path), architecture=architecture)
    model.load_state_dict(state, strict=True)
    if meta['pretrained_cfg']:
        model.pretrained_cfg = {**(model.pretrained_cfg or {}), **{
            k: tuple(v) if isinstance(v, list) else v for k, v in meta['pretrained_cfg'].items()}}
    return model.eval(), meta
