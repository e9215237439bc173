"""Model files: a run folder in timm's own layout, the single-file checkpoints before it, and safe reads of both.

A model is a folder as timm's ``save_for_hf`` / ``push_to_hf_hub`` write one, which
``timm.create_model('local-dir:DIR', pretrained=True)`` loads and ``titans-timm-push`` uploads unchanged:

- ``config.json`` (:func:`config_json`): ``architecture``, ``num_classes``, ``num_features``, ``label_names``, the
  resolved ``model_args`` (every memory argument pinned, see ``TitansVisionTransformer.resolved_model_args``) and a
  ``pretrained_cfg`` with the mean/std/input size/crop the model was trained with;
- ``model.safetensors`` (:func:`weights_bytes`): the weights, with safetensors metadata ``{'format': 'pt'}`` as
  transformers and huggingface_hub write it.

Before run folders, :func:`save_model` wrote one ``.safetensors`` file whose header metadata carried the recipe
under the key ``"titans_timm"`` (architecture, model_args, label_names, pretrained_cfg); the shipped backbone is
one. :func:`read_metadata` and :func:`load_model` read both kinds (and, for weights files in a folder with a
``config.json``, such as the trainer's ``last.safetensors``, the folder's config) into one dict::

    {"architecture": "vit_tiny_mal_simple", "model_args": {...}, "label_names": [...] or None,
     "pretrained_cfg": {"mean": [...], "std": [...], "input_size": [3, 32, 32], ...}, ...}

Choices made here (and why):

- Writes are atomic (temp file in the same directory, fsync, ``os.replace``) and get the mode of a new file
  (0o666 less the umask): a crash mid-write never leaves a truncated file where a good one used to be.
- Weights are only ever read with safetensors or ``torch.load(weights_only=True)``; reading a ``.pth`` never
  runs pickled code. timm train.py checkpoints (whose ``args`` entry is an ``argparse.Namespace``) are accepted.
- Every failure to read or match a checkpoint raises :class:`CheckpointError` with one message that says what is
  wrong and what to do, so CLIs can print it as a single ``error:`` line.
- :func:`load_model` loads strictly (a missing or extra key is an error naming it) and returns the model in eval
  mode.
- ``weights_bytes(..., checksum=True)`` also stores ``"tensors_sha256"`` (:func:`tensors_sha256`) in the header,
  and every read of such a file checks it: zeroed or overwritten tensor bytes under an intact header are an error
  naming the file. The trainer's resumable checkpoint carries one.
"""
import argparse
import hashlib
import json
import os
import pickle
import struct
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import safetensors
import safetensors.torch
import timm
from timm.models import clean_state_dict
from timm.models._hub import save_config_for_hf

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
# The metadata entry holding :func:`tensors_sha256` of the file's tensors (only files saved with checksum=True).
CHECKSUM_KEY = 'tensors_sha256'
# The pretrained_cfg entries an evaluator needs to rebuild the eval transform and head.
PRETRAINED_CFG_KEYS = ('mean', 'std', 'input_size', 'interpolation', 'crop_pct', 'num_classes')
# The preprocessing a config.json records (timm's data config keys).
DATA_CONFIG_KEYS = ('input_size', 'mean', 'std', 'interpolation', 'crop_pct', 'crop_mode')
# How many mismatched key names an error message lists before summarising the rest.
_MAX_KEYS_SHOWN = 5

PathLike = Union[str, os.PathLike]


# model arguments that only titans-timm architectures take (pinned by :func:`resolved_model_args`)
MEMORY_MODEL_ARGS = ('approach', 'memory_type', 'memory_blocks', 'memory_interval', 'memory_options',
                     'num_persistent_tokens', 'num_memory_tokens')


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model it should load into."""


def _jsonable(value: Any) -> Any:
    """Turn tuples into lists so JSON round trips compare equal to what ``json.loads`` returns."""
    return json.loads(json.dumps(value))


def _check_json(value: Any, what: str) -> Any:
    try:
        return _jsonable(value)
    except (TypeError, ValueError) as e:
        bad = []
        if isinstance(value, dict):
            for k, v in value.items():
                try:
                    json.dumps(v)
                except (TypeError, ValueError):
                    bad.append(f'{k}={type(v).__name__}')
        detail = f" (not JSON-serialisable: {', '.join(bad)})" if bad else f' ({e})'
        raise CheckpointError(
            f'{what} must be JSON-serialisable (numbers, strings, lists, dicts){detail}; '
            f'pass plain values, e.g. a layer name instead of a layer class') from None


def pretrained_cfg_subset(model: nn.Module) -> Dict[str, Any]:
    """The part of ``model.pretrained_cfg`` an evaluator needs, corrected for the built image size.

    timm keeps the pretrained ``input_size`` (e.g. 224) in ``pretrained_cfg`` even when the model
    was built with another ``img_size``; the checkpoint records the size the model actually takes,
    so ``timm.data.resolve_data_config`` on the reloaded model gives the right transform.
    """
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    out = {k: cfg[k] for k in PRETRAINED_CFG_KEYS if cfg.get(k) is not None}
    patch_embed = getattr(model, 'patch_embed', None)
    img_size = getattr(patch_embed, 'img_size', None)
    if img_size is not None:
        proj = getattr(patch_embed, 'proj', None)
        in_chans = getattr(proj, 'in_channels', None) or (out.get('input_size') or (3,))[0]
        out['input_size'] = [int(in_chans), int(img_size[0]), int(img_size[1])]
    num_classes = getattr(model, 'num_classes', None)
    if isinstance(num_classes, int):
        out['num_classes'] = num_classes
    return _jsonable(out)


def _state_dict_for_saving(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Contiguous CPU tensors; tensors sharing storage are cloned, which safetensors requires."""
    if isinstance(model, dict):
        state = model
    else:
        state = model.state_dict()
    out, seen = {}, set()
    for name, tensor in state.items():
        t = tensor.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else None
        if key is not None and key in seen:
            t = t.clone()
        elif key is not None:
            seen.add(key)
        out[name] = t.contiguous()
    return out


def tensors_sha256(state_dict: Dict[str, torch.Tensor]) -> str:
    """sha256 (hex) over every tensor's name, dtype, shape and bytes, in name order.

    It depends on the tensors only, not on how a file lays them out, so the digest of the tensors saved equals
    the digest of the tensors read back unless their bytes changed on the way.
    """
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f'{name}\0{t.dtype}\0{tuple(t.shape)}\0'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, whatever the dtype (bfloat16 included)
    return h.hexdigest()


def resolved_model_args(model: nn.Module, model_args: Dict[str, Any]) -> Dict[str, Any]:
    """``model_args`` with every memory argument at the value ``model`` was built with (placement as block indices),
    so a later change of a default (placement interval, chunk size, heads, ...) cannot change what a saved model
    rebuilds into (see ``TitansVisionTransformer.resolved_model_args``). Raises :class:`CheckpointError` for values
    that are not JSON."""
    args = dict(model_args or {})
    resolved = getattr(model, 'resolved_model_args', None)
    if callable(resolved):
        args.pop('memory_interval', None)  # memory_blocks states the same placement, and overrides it
        args.update(resolved())
    return _check_json(args, 'model_args')


def weights_bytes(model: Union[nn.Module, Dict[str, torch.Tensor]], *, metadata: Optional[Dict[str, Any]] = None,
                  checksum: bool = False) -> bytes:
    """``model``'s weights (a module or a state dict) as a safetensors file with the metadata ``{'format': 'pt'}``.

    ``metadata`` (JSON values) goes under the ``"titans_timm"`` key; ``checksum`` adds :func:`tensors_sha256` of the
    weights to it, which every read of the file then verifies.
    """
    tensors = _state_dict_for_saving(model)
    # a checksum copied from another file's metadata would not describe these tensors
    meta = {k: v for k, v in _check_json(dict(metadata or {}), 'metadata').items() if k != CHECKSUM_KEY}
    if checksum:
        meta[CHECKSUM_KEY] = tensors_sha256(tensors)
    return safetensors.torch.save(tensors, metadata=dict(format='pt', **({METADATA_KEY: json.dumps(meta)} if meta else {})))


def config_json(model: nn.Module, *, model_args: Dict[str, Any], label_names: Optional[Sequence[str]] = None,
                data_config: Optional[Dict[str, Any]] = None) -> str:
    """The ``config.json`` text of ``model``, written by timm's own ``save_config_for_hf`` (so timm reads it back).

    Args:
        model: the model (unwrapped).
        model_args: the kwargs it was created with; stored resolved (:func:`resolved_model_args`), with what
            timm's factory recorded.
        label_names: class names in label order.
        data_config: the preprocessing it was trained with (``input_size``, ``mean``, ``std``, ``interpolation``,
            ``crop_pct``): the ``pretrained_cfg`` that ``resolve_data_config`` gives an evaluator.
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
            path = os.path.join(tmp, CONFIG_NAME)
            save_config_for_hf(model, path, model_config=model_config, model_args=args, data_config=data_config)
            with open(path) as f:
                return f.read()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f'timm cannot write config.json for this model ({e}); use JSON values (numbers, '
                              f'strings, lists) for every model argument') from None
    finally:
        model.pretrained_cfg = cfg


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every OS/filesystem, hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_file_mode() -> int:
    """The mode ``open(path, 'w')`` would give a new file: 0o666 less the process umask."""
    try:  # Linux >= 4.7 shows the umask without changing it
        with open('/proc/self/status') as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith('Umask:'))
    except (OSError, StopIteration, ValueError, IndexError):
        # elsewhere it can only be read by setting it: set it straight back (a thread creating a file in
        # between would get 0o022)
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see either the old file or the complete new one.

    The file gets the usual mode of a new file (0o666 less the umask), not mkstemp's private 0o600.
    """
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
    except BaseException:
        # BaseException so Ctrl-C mid-write also cleans up the temp file.
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def save_model(
        model: nn.Module,
        path: PathLike,
        *,
        architecture: str,
        model_args: Dict[str, Any],
        label_names: Optional[Sequence[str]] = None,
        extra_metadata: Optional[Dict[str, Any]] = None,
        checksum: bool = False,
) -> Path:
    """Save ``model``'s weights and the recipe to rebuild it as one safetensors file, atomically.

    The single-file format of the shipped backbone (``tools/pretrain_backbone.py``); training writes a run folder
    instead (:func:`config_json` + :func:`weights_bytes`).

    Args:
        model: the model (unwrap DDP / torch.compile first, or pass ``model.module``).
        path: destination ``.safetensors`` file; parent directories are created.
        architecture: timm model name, e.g. ``'vit_tiny_mal_simple'``.
        model_args: keyword arguments for ``timm.create_model`` (stored resolved, :func:`resolved_model_args`).
        label_names: class names in label order, stored so evaluators can label their plots.
        extra_metadata: more JSON-serialisable entries (e.g. ``seed``, ``dataset``). A ``'pretrained_cfg'`` dict in
            it updates the recorded pretrained_cfg (e.g. the normalisation the model was actually trained with).
        checksum: also store :func:`tensors_sha256` of the weights, which every read of the file then verifies.

    Raises:
        CheckpointError: if ``architecture`` is not a string or any metadata is not JSON.
    """
    if not isinstance(architecture, str) or not architecture:
        raise CheckpointError(f'architecture must be a timm model name string, got {architecture!r}')
    extra = _check_json(dict(extra_metadata or {}), 'extra_metadata')
    pretrained_cfg = pretrained_cfg_subset(model) if isinstance(model, nn.Module) else {}
    pretrained_cfg.update(extra.pop('pretrained_cfg', None) or {})
    meta = dict(
        format_version=FORMAT_VERSION,
        titans_timm_version=_package_version(),
        architecture=architecture,
        model_args=resolved_model_args(model, model_args),
        label_names=[str(n) for n in label_names] if label_names is not None else None,
        pretrained_cfg=pretrained_cfg,
    )
    for k, v in extra.items():
        meta.setdefault(k, v)  # the core keys above are not overridable, loaders rely on them
    atomic_write_bytes(path, weights_bytes(model, metadata=meta, checksum=checksum))
    return Path(path)


def _package_version() -> str:
    try:
        from titans_timm import __version__
        return __version__
    except ImportError:
        return 'unknown'


def _check_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f'checkpoint not found: {path} (check the path; training writes '
                              f'OUTPUT/EXPERIMENT/model.safetensors)')
    if path.is_dir():
        raise CheckpointError(f'checkpoint path is a directory: {path}; pass the .safetensors file inside it '
                              f'(e.g. {path / "model.safetensors"})')
    return path


def _looks_like_safetensors(path: Path) -> bool:
    # safetensors layout: 8-byte little-endian header length, then a JSON header starting with '{'.
    with open(path, 'rb') as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack('<Q', head[:8])
    return head[8:9] == b'{' and 0 < n <= path.stat().st_size


def _safetensors_header_metadata(path: Path) -> Dict[str, str]:
    try:
        with safetensors.safe_open(str(path), framework='pt') as f:
            return f.metadata() or {}
    except Exception as e:  # SafetensorError is not importable under a stable name across versions
        raise CheckpointError(f'{path} is not a valid safetensors file ({e}); it may be truncated or '
                              f'corrupt: re-save or re-download it') from None


def _config_metadata(folder: Path) -> Dict[str, Any]:
    """What ``folder/config.json`` (timm's layout) says about its model, in the shape :func:`read_metadata` gives."""
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
    """What a model folder or weights file says about its model.

    Args:
        path: a model folder (config.json + model.safetensors), a weights file in one (model.safetensors, the
            trainer's last.safetensors: the folder's config.json describes it, its own header adds to that), a
            single file written by :func:`save_model`, or any weights file.
        required: if False, a file that names no model gives what it has (``{}`` for a plain state dict) instead
            of an error.

    Returns:
        ``architecture``, ``model_args``, ``label_names``, ``pretrained_cfg``, and whatever else the file's
        ``"titans_timm"`` header metadata holds.

    Raises:
        CheckpointError: missing file, not safetensors / corrupt, bad metadata JSON or config.json, or (when
            ``required``) nothing that names the model.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise CheckpointError(f'{path} is a directory without {CONFIG_NAME}; pass a run folder (config.json + '
                                  f'model.safetensors) or a weights file')
        return _config_metadata(path)
    path = _check_file(path)
    meta = {}
    if _looks_like_safetensors(path):
        raw = _safetensors_header_metadata(path).get(METADATA_KEY)
        try:
            meta = json.loads(raw) if raw else {}
        except json.JSONDecodeError as e:
            raise CheckpointError(f'{path}: titans_timm metadata is not valid JSON ({e}); the file is corrupt') from None
        if not isinstance(meta, dict):
            raise CheckpointError(f'{path}: titans_timm metadata is not a JSON object; the file is corrupt')
    elif path.suffix == '.safetensors':
        raise CheckpointError(f'{path} is not a valid safetensors file (bad header); it may be corrupt: '
                              f're-save or re-download it')
    if 'architecture' not in meta and (path.parent / CONFIG_NAME).is_file():
        meta = {**_config_metadata(path.parent), **meta}
    if 'architecture' not in meta and required:
        raise CheckpointError(f'{path} does not say which model it holds (no titans_timm metadata, no config.json '
                              f'next to it); pass architecture=NAME and the model kwargs, e.g. load_model(path, '
                              f"architecture='vit_tiny_patch16_224', num_classes=10)")
    return meta


def read_state_dict(path: PathLike, *, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a ``.pth``/``.pt``/``.bin`` file, never unpickling code.

    ``.pth`` files are read with ``torch.load(weights_only=True)``; timm training checkpoints
    (``{'state_dict': ..., 'state_dict_ema': ..., 'args': Namespace}``) are unwrapped, taking the EMA
    weights if ``use_ema`` and present. DDP / torch.compile prefixes (``module.``, ``_orig_mod.``)
    are removed.
    """
    path = _check_file(path)
    if path.suffix == '.safetensors' or _looks_like_safetensors(path):
        header = _safetensors_header_metadata(path)  # clear error for a corrupt header
        try:
            state = safetensors.torch.load_file(str(path), device='cpu')
        except Exception as e:
            raise CheckpointError(f'{path} is not a valid safetensors file ({e}); it may be truncated or '
                                  f'corrupt: re-save or re-download it') from None
        _verify_checksum(path, header, state)
    else:
        try:
            # argparse.Namespace is a plain attribute container; timm train.py stores its args in one.
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(str(path), map_location='cpu', weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(
                f'{path} holds pickled objects other than tensors{_unsafe_globals(path)}, which are never '
                f'unpickled (weights_only=True); re-save only its state_dict with torch.save, or as '
                f'safetensors') from None
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


def _verify_checksum(path: Path, header: Dict[str, str], state: Dict[str, torch.Tensor]) -> None:
    """Check the tensors read from ``path`` against the checksum its metadata stores, if it stores one."""
    try:
        expected = json.loads(header.get(METADATA_KEY) or '{}').get(CHECKSUM_KEY)
    except (json.JSONDecodeError, AttributeError):
        return  # read_metadata reports bad metadata JSON
    if expected is not None and tensors_sha256(state) != expected:
        raise CheckpointError(f'{path} is corrupt: its tensor bytes do not match the checksum stored in its header '
                              f'({CHECKSUM_KEY}), so its weights were overwritten or zeroed after it was written; '
                              f'use an intact copy')


def _unsafe_globals(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return ''
    return f" ({', '.join(names[:_MAX_KEYS_SHOWN])})" if names else ''


def _list_keys(keys: List[str]) -> str:
    shown = ', '.join(keys[:_MAX_KEYS_SHOWN])
    more = len(keys) - _MAX_KEYS_SHOWN
    return shown + (f' (+{more} more)' if more > 0 else '')


def check_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], *, source: str = 'checkpoint',
                     architecture: Optional[str] = None) -> None:
    """Raise :class:`CheckpointError` naming the first mismatched keys if ``state_dict`` does not fit ``model``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f'{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}'
              for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f'{len(missing)} missing keys: {_list_keys(missing)}')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected keys: {_list_keys(unexpected)}')
    if shapes:
        parts.append(f'{len(shapes)} shape mismatches: {_list_keys(shapes)}')
    arch = f' ({architecture})' if architecture else ''
    raise CheckpointError(
        f'{source} does not match the model{arch}: ' + '; '.join(parts) +
        '. Check the model name and its kwargs (num_classes, img_size, depth, memory options).')


def load_state_dict_file(model: nn.Module, path: PathLike, *, strict: bool = True, use_ema: bool = False):
    """Load weights from a safetensors or ``.pth`` file into an existing ``model``.

    Args:
        model: the model to fill (its architecture must match the file when ``strict``).
        path: safetensors file (with or without titans_timm metadata) or ``.pth``/``.pt``/``.bin``.
        strict: if True (default), any missing/unexpected key or shape mismatch raises
            :class:`CheckpointError` naming them and the model is left untouched; if False, matching
            keys are loaded and ``(missing_keys, unexpected_keys)`` returned, shape mismatches still raise.
        use_ema: for timm training checkpoints, take the EMA weights when present.

    Returns:
        The ``load_state_dict`` result (missing and unexpected keys).
    """
    state = read_state_dict(path, use_ema=use_ema)
    if strict:
        check_state_dict(model, state, source=str(path))
    else:
        expected = model.state_dict()
        shapes = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
        if shapes:
            raise CheckpointError(f'{path}: {len(shapes)} shape mismatches with the model: {_list_keys(shapes)}')
    return model.load_state_dict(state, strict=strict)


def load_model(path: PathLike, **overrides) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a model from a model folder or checkpoint and load its weights strictly.

    Args:
        path: a model folder (config.json + model.safetensors, as training writes it) or a weights file in
            one, a file written by :func:`save_model`, or a plain safetensors / ``.pth`` state dict (then pass
            ``architecture=`` and the model kwargs).
        **overrides: ``architecture=NAME`` replaces the stored timm model name; every other keyword
            updates the stored ``model_args`` (e.g. ``drop_path_rate=0.0``). Weights must still fit.

    Returns:
        ``(model, meta)``: the model in eval mode, its ``pretrained_cfg`` updated with the stored
        mean/std/input_size/...; ``meta`` is :func:`read_metadata`'s with overrides applied (plus ``'path'``, the
        weights file read). For files without metadata, ``meta`` holds what was passed.

    Raises:
        CheckpointError: missing or corrupt file, no metadata and no ``architecture``, an unknown
        architecture, or weights that do not fit (naming the first mismatched keys).
    """
    architecture = overrides.pop('architecture', None)
    meta = dict(read_metadata(path, required=architecture is None))
    path = Path(path) / WEIGHTS_NAME if Path(path).is_dir() else Path(path)
    model_args = dict(meta.get('model_args') or {})
    if architecture is not None and architecture != meta.get('architecture'):
        # the stored memory arguments describe the stored architecture, not the one asked for
        for key in MEMORY_MODEL_ARGS:
            model_args.pop(key, None)
        meta['architecture'] = architecture
    architecture = meta.get('architecture')
    if not isinstance(architecture, str):
        raise CheckpointError(f'{path}: metadata has no architecture; pass architecture=NAME')
    model_args.update(overrides)
    meta['model_args'] = model_args
    meta.setdefault('label_names', None)
    meta.setdefault('pretrained_cfg', {})
    meta['path'] = str(path)

    state = read_state_dict(path)
    import titans_timm  # noqa: F401  (registers the titans-timm architectures with timm)
    try:
        model = timm.create_model(architecture, pretrained=False, **model_args)
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise CheckpointError(f"{path}: architecture '{architecture}' is not a registered timm model; "
                                  f'check the name (titans-timm names look like vit_tiny_mal_simple) or '
                                  f'import the package that registers it') from None
        raise CheckpointError(f"{path}: could not build '{architecture}' with {model_args}: {e}") from None
    except TypeError as e:
        raise CheckpointError(f"{path}: '{architecture}' does not accept these model_args ({e}); "
                              f'drop or rename the offending argument') from None
    check_state_dict(model, state, source=str(path), architecture=architecture)
    model.load_state_dict(state, strict=True)
    if meta['pretrained_cfg']:
        cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
        cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in meta['pretrained_cfg'].items()})
        model.pretrained_cfg = cfg
    return model.eval(), meta
