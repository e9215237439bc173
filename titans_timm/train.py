"""titans-timm-train: two-phase fine-tuning of (memory-augmented) timm models on timm's training stack.

    titans-timm-train -c train_timm_hparams/fashion_mnist_titans.yaml
    python -m titans_timm.train --model vit_tiny_mag_advanced --pretrained-path backbone.safetensors \\
        --freeze-epochs 2 --epochs 4 --output output --experiment mag
    torchrun --nproc_per_node 2 -m titans_timm.train -c recipe.yaml        # or: accelerate launch -m ...

Flags and YAML keys follow timm's train.py, so one recipe runs here and in timm's train.py with
``--device-modules titans_timm.two_phase``; ours on top: ``--freeze-epochs``, ``--backbone-lr-scale``,
``--memory-options``, ``--train-num-samples``, ``--eval-only``, ``--force``. The parts are timm's (transforms,
``create_loader``, ``Mixup``, ``create_optimizer_v2`` with role-tagged groups from :mod:`titans_timm.two_phase`,
``create_scheduler_v2``, losses, ``ModelEmaV3``, ``NativeScaler``). Our own where timm's would lose a guarantee:
the training loader (timm's sampler cannot resume mid-epoch), ``summary.csv`` (rewritten atomically, dropping the
rows of epochs a resumed run trains again) and the checkpoint pair (crash-safe as a pair, unlike
``CheckpointSaver``).

A run folder is timm's layout (``config.json`` + ``model.safetensors``) plus ``run.json``, the resumable
``last.safetensors`` + ``train_state.pth`` pair, ``summary.csv`` and ``results.json``; every write is atomic,
resume is exact, one trainer owns a folder at a time (``flock``), and bad input or a failed write is one
``error:`` line with exit status 2. docs/training.md describes each of these.
"""
import argparse
import csv
import difflib
import errno
import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
import uuid
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import safetensors
import torch
import torch.nn as nn
import yaml
import timm
from timm.data import Mixup, create_loader, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import PlateauLRScheduler, create_scheduler_v2, scheduler_kwargs
from timm.utils import (
    AverageMeter, ModelEmaV3, NativeScaler, ParseKwargs, dispatch_clip_grad, init_distributed_device,
    random_seed, reduce_tensor, setup_default_logging, unwrap_model,
)
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows: no advisory file locks, run folders are not guarded
    fcntl = None

from titans_timm import checkpoint as ckpt
from titans_timm.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, KeyValueKwargs, Parser, unknown_model
from titans_timm import data as tdata
from titans_timm import run_record, two_phase
from titans_timm.devices import cpu_cores, default_device, device_problem
from titans_timm.evaluate import evaluate_model
from titans_timm.vit import split_parameters

__all__ = ['main', 'cli', 'build_parser', 'parse_args', 'TrainInputError', 'RunOutputError', 'RUN_FILES', 'LOCK_FILE']

_logger = logging.getLogger('titans_timm.train')

# Model args inherited from a --pretrained-path checkpoint unless set: they fix the shapes of its weights.
_STRUCTURAL_ARGS = ('img_size', 'patch_size', 'depth', 'embed_dim', 'num_heads', 'mlp_ratio', 'in_chans',
                    'global_pool', 'class_token', 'reg_tokens', 'no_embed_class', 'qkv_bias')
# Arguments that describe one invocation, not the run: never written to args.yaml, never inherited on resume.
_RUN_ONLY_ARGS = ('config', 'resume', 'eval_only', 'stop_after_steps', 'dump_rank_weights', 'force')
# Arguments a resumed run cannot change: the optimizer and scheduler come back as they were built, and the batch
# size and accumulation fix the updates per epoch the saved position counts in.
_RESUME_FIXED_ARGS = (
    'epochs', 'lr', 'lr_base', 'lr_base_size', 'lr_base_scale', 'sched', 'sched_on_updates', 'warmup_epochs',
    'warmup_lr', 'warmup_prefix', 'min_lr', 'cooldown_epochs', 'patience_epochs', 'decay_epochs',
    'decay_milestones', 'decay_rate', 'lr_noise', 'lr_noise_pct', 'lr_noise_std', 'lr_cycle_mul',
    'lr_cycle_decay', 'lr_cycle_limit', 'lr_k_decay', 'opt', 'opt_eps', 'opt_betas', 'momentum', 'weight_decay',
    'layer_decay', 'opt_kwargs', 'batch_size', 'grad_accum_steps',
)
# The files a run writes into its folder besides its records; a new run refuses a folder holding any of them.
RUN_FILES = ('last.safetensors', 'train_state.pth', 'last.prev.safetensors', 'train_state.prev.pth',
             'model.safetensors', 'model_ema.safetensors', 'summary.csv', 'results.json')
# Held (flock) by the trainer that owns the run folder; removed when it lets go (see _RunFolderLock).
LOCK_FILE = '.train.lock'
# What a run writes at its start: timm's recipe file, the model's config.json, the run record.
RECORD_FILES = (run_record.ARGS_NAME, ckpt.CONFIG_NAME, run_record.RECORD_NAME)


class TrainInputError(ValueError):
    """Bad user input found before any training work (printed as one ``error:`` line, exit status 2)."""


class RunOutputError(RuntimeError):
    """A run file could not be written (disk full, read-only, not a folder): one ``error:`` line, exit status 2.

    Writes are atomic, so every file written before, the last checkpoint included, is intact."""


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

def _float_list(n):
    return dict(type=float, nargs=n, metavar='F')


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; flag names and dests follow timm's train.py."""
    p = Parser(
        prog='titans-timm-train', description='Two-phase fine-tuning of (memory-augmented) timm models.')
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML recipe; keys are argparse dests')

    g = p.add_argument_group('Dataset')
    g.add_argument('data', nargs='?', metavar='DIR', help='path to dataset (positional, as in timm)')
    g.add_argument('--data-dir', metavar='DIR', help='path to dataset root (image folders or HF datasets cache)')
    g.add_argument('--dataset', default=None, metavar='NAME',
                   help=f'dataset: {tdata.BUILTIN_DATASET} (built in), a preset (cifar10, imagenet, ...), hf:ORG/NAME '
                        f'or hfds/ORG/NAME, or "" for an image folder in --data-dir (default: the image folder '
                        f'given by DIR / --data-dir, else {tdata.BUILTIN_DATASET})')
    g.add_argument('--train-split', default='train', metavar='NAME')
    g.add_argument('--val-split', default='validation', metavar='NAME', help='evaluation split ("" for none)')
    g.add_argument('--train-num-samples', type=int, default=None, metavar='N',
                   help='train on a fixed random subset of N samples (quick runs)')
    g.add_argument('--val-num-samples', type=int, default=None, metavar='N')
    g.add_argument('--input-key', default=None, metavar='NAME', help='image column of a HF dataset')
    g.add_argument('--target-key', default=None, metavar='NAME', help='label column of a HF dataset')

    g = p.add_argument_group('Model')
    g.add_argument('--model', default='vit_tiny_mag_advanced', metavar='NAME', help='timm model name')
    g.add_argument('--pretrained', action='store_true', default=False, help='start from pretrained weights')
    g.add_argument('--pretrained-path', default=None, metavar='FILE',
                   help='local weights (e.g. a backbone model.safetensors) used as the pretrained weights')
    g.add_argument('--num-classes', type=int, default=None, metavar='N', help='default: from the dataset')
    g.add_argument('--in-chans', type=int, default=None, metavar='N')
    g.add_argument('--img-size', type=int, default=None, metavar='N', help='image size (also the model img_size)')
    g.add_argument('--input-size', default=None, type=int, nargs=3, metavar='N', help='C H W')
    g.add_argument('--crop-pct', default=None, type=float, metavar='PCT')
    g.add_argument('--mean', default=None, **_float_list('+'))
    g.add_argument('--std', default=None, **_float_list('+'))
    g.add_argument('--interpolation', default='', type=str, metavar='NAME')
    g.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
    g.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='drop path rate')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=KeyValueKwargs, help='k=v model kwargs')
    g.add_argument('--memory-options', default=None, metavar='JSON',
                   help='memory options as a JSON object, passed to the model as memory_options')
    g.add_argument('--grad-checkpointing', action='store_true', default=False)
    g.add_argument('-b', '--batch-size', type=int, default=128, metavar='N')
    g.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                   help='micro-batches of --batch-size whose gradients are summed per optimizer update (default 1)')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N')

    g = p.add_argument_group('Two-phase schedule')
    g.add_argument('--freeze-epochs', type=int, default=0, metavar='N',
                   help='phase 1 length: epochs with the backbone frozen (memory and head train)')
    g.add_argument('--backbone-lr-scale', type=float, default=two_phase.DEFAULT_BACKBONE_LR_SCALE, metavar='F',
                   help='phase 2 backbone LR as a fraction of the base LR (default 0.1)')

    g = p.add_argument_group('Optimizer')
    g.add_argument('--opt', default='adamw', metavar='NAME')
    g.add_argument('--opt-eps', default=None, type=float, metavar='EPS')
    g.add_argument('--opt-betas', default=None, **_float_list('+'))
    g.add_argument('--momentum', type=float, default=0.9, metavar='M')
    g.add_argument('--weight-decay', type=float, default=0.05)
    g.add_argument('--clip-grad', type=float, default=None, metavar='NORM')
    g.add_argument('--clip-mode', type=str, default='norm', help='norm, value or agc')
    g.add_argument('--layer-decay', type=float, default=None)
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=KeyValueKwargs)

    g = p.add_argument_group('Learning rate schedule')
    g.add_argument('--sched', type=str, default='cosine', metavar='NAME')
    g.add_argument('--sched-on-updates', action='store_true', default=False)
    g.add_argument('--lr', type=float, default=None, metavar='LR', help='default: lr_base scaled by batch size')
    g.add_argument('--lr-base', type=float, default=1e-3, metavar='LR')
    g.add_argument('--lr-base-size', type=int, default=256, metavar='N')
    g.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE', help='linear or sqrt')
    g.add_argument('--lr-noise', type=float, nargs='+', default=None)
    g.add_argument('--lr-noise-pct', type=float, default=0.67)
    g.add_argument('--lr-noise-std', type=float, default=1.0)
    g.add_argument('--lr-cycle-mul', type=float, default=1.0)
    g.add_argument('--lr-cycle-decay', type=float, default=0.5)
    g.add_argument('--lr-cycle-limit', type=int, default=1)
    g.add_argument('--lr-k-decay', type=float, default=1.0)
    g.add_argument('--warmup-lr', type=float, default=1e-5)
    g.add_argument('--min-lr', type=float, default=0)
    g.add_argument('--epochs', type=int, default=10)
    g.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+')
    g.add_argument('--decay-epochs', type=float, default=90)
    g.add_argument('--warmup-epochs', type=int, default=0)
    g.add_argument('--warmup-prefix', action='store_true', default=False)
    g.add_argument('--cooldown-epochs', type=int, default=0)
    g.add_argument('--patience-epochs', type=int, default=10)
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1)

    g = p.add_argument_group('Augmentation and regularization')
    g.add_argument('--no-aug', action='store_true', default=False)
    g.add_argument('--train-crop-mode', type=str, default=None)
    g.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0])
    g.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.])
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--vflip', type=float, default=0.)
    g.add_argument('--color-jitter', type=float, default=0.4)
    g.add_argument('--aa', type=str, default=None, help='auto augment policy, e.g. rand-m9-mstd0.5')
    g.add_argument('--reprob', type=float, default=0.)
    g.add_argument('--remode', type=str, default='pixel')
    g.add_argument('--recount', type=int, default=1)
    g.add_argument('--mixup', type=float, default=0.0)
    g.add_argument('--cutmix', type=float, default=0.0)
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', type=str, default='batch')
    g.add_argument('--mixup-off-epoch', default=0, type=int)
    g.add_argument('--smoothing', type=float, default=0.1)
    g.add_argument('--train-interpolation', type=str, default='random')

    g = p.add_argument_group('EMA')
    g.add_argument('--model-ema', action='store_true', default=False)
    g.add_argument('--model-ema-decay', type=float, default=0.9998)
    g.add_argument('--model-ema-warmup', action='store_true', default=False)

    g = p.add_argument_group('Misc')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--log-interval', type=int, default=50, help='optimizer updates between log lines')
    g.add_argument('--checkpoint-interval', type=int, default=0, metavar='K',
                   help='also write a resumable checkpoint every K optimizer updates within an epoch (0: epoch '
                        'ends only)')
    g.add_argument('-j', '--workers', type=int, default=None, metavar='N',
                   help='data loader processes per training process (0: load in the training process; default: '
                        'min(4, its cores - 1)); batches and resume are exact for any N')
    g.add_argument('--amp', action='store_true', default=False,
                   help='mixed precision (autocast to --amp-dtype; float16 adds loss scaling)')
    g.add_argument('--amp-dtype', default='bfloat16', choices=('bfloat16', 'float16'))
    g.add_argument('--device', default=None, help='cuda or cpu (default: cuda if available)')
    g.add_argument('--channels-last', action='store_true', default=False,
                   help='model and inputs in channels_last memory format')
    g.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor', metavar='BACKEND',
                   help='compile the model with torch.compile (default backend: inductor)')
    g.add_argument('--torchcompile-mode', type=str, default=None, metavar='MODE',
                   help='torch.compile mode, e.g. reduce-overhead, max-autotune (default: torch\'s)')
    g.add_argument('--dist-backend', default=None, help='default: nccl on cuda, gloo on cpu')
    g.add_argument('--dist-url', default=None)
    g.add_argument('--output', default='./output/train', metavar='DIR')
    g.add_argument('--experiment', default='', metavar='NAME', help='default: timestamp-model-imgsize')
    g.add_argument('--force', action='store_true', default=False,
                   help='start over in OUTPUT/EXPERIMENT: delete the run files a previous run left there '
                        '(without it, a folder that holds a run is an error)')
    g.add_argument('--eval-metric', default='top1', choices=('top1', 'top5', 'loss'))
    g.add_argument('--resume', default='', metavar='DIR', help='continue the run saved in DIR')
    g.add_argument('--eval-only', action='store_true', default=False,
                   help='evaluate the model (e.g. --pretrained-path or --resume) and exit')
    g.add_argument('--no-progress', action='store_true', default=False, help='no progress bars')
    # Test hooks: simulate Ctrl-C after N steps; per-rank weight dumps for replica checks.
    g.add_argument('--stop-after-steps', type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument('--dump-rank-weights', action='store_true', default=False, help=argparse.SUPPRESS)
    return p


def _check_keys(parser, cfg: Dict[str, Any], source: str) -> None:
    known = {a.dest for a in parser._actions}
    unknown = sorted(k for k in cfg if k not in known)
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), known, n=1)
            hints.append(f'{k} (did you mean {close[0]}?)' if close else str(k))
        raise TrainInputError(f'unknown key(s) in {source}: {", ".join(hints)}; keys are option dests like '
                              f'batch_size, freeze_epochs (see titans-timm-train --help)')


# Options without an argparse type whose YAML value may be a mapping (the CLI takes it as JSON text).
_MAPPING_ARGS = ('memory_options',)


_KINDS = {int: ('an integer', 'integers'), float: ('a number', 'numbers')}


def _yaml_value_problem(action, value) -> Optional[str]:
    """What kind of value ``action`` needs if the YAML ``value`` is not one, else None (argparse converts only
    string defaults, so a list where a number belongs would otherwise fail deep inside training)."""
    if value is None:
        return None if action.default is None else 'a value (not null)'
    if isinstance(action, ParseKwargs) or action.dest in _MAPPING_ARGS:
        ok = isinstance(value, dict) or (action.dest in _MAPPING_ARGS and isinstance(value, str))
        return None if ok else 'a mapping, e.g. {depth: 2}'
    if action.nargs == 0:  # store_true / store_false
        return None if isinstance(value, bool) else 'true or false'
    one, many = _KINDS.get(action.type, ('a string', 'strings'))

    def fits(v):
        if isinstance(v, (str, list, tuple, dict)) or isinstance(v, bool):
            return isinstance(v, str)
        return action.type is not int or isinstance(v, int)

    if action.nargs in ('+', '*') or isinstance(action.nargs, int):
        count = f'{action.nargs} ' if isinstance(action.nargs, int) else ''
        ok = (isinstance(value, (list, tuple)) and all(fits(v) for v in value)
              and (not count or len(value) == action.nargs) and (action.nargs != '+' or len(value) > 0))
        return None if ok else f'a list of {count}{many}'
    if not fits(value):
        return one
    if action.choices is not None and str(value) not in map(str, action.choices):
        return f'one of {", ".join(map(str, action.choices))}'
    return None


def _check_types(parser, cfg: Dict[str, Any], source: str) -> None:
    """One line naming a YAML value of the wrong kind (``batch_size: [1, 2]``, ``mean: 0.5``)."""
    actions = {a.dest: a for a in parser._actions}
    for key, value in cfg.items():
        action = actions.get(key)
        problem = _yaml_value_problem(action, value) if action is not None else None
        if problem:
            example = action.default if action.default not in (None, '', [], {}) else None
            hint = f', e.g. {key}: {json.dumps(example)}' if example is not None else ''
            raise TrainInputError(f'{key}: {json.dumps(value, default=str)} in {source} must be {problem}{hint}')
        if action is not None and action.type in (None, str) and isinstance(value, (int, float)) \
                and not isinstance(value, bool) and action.nargs is None:
            cfg[key] = str(value)  # e.g. `experiment: 2024`, a name, not a number


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` with defaults from ``--resume DIR``'s run record then ``-c recipe.yaml`` (CLI wins).

    Raises:
        TrainInputError: unreadable YAML or unknown YAML keys.
    """
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('-c', '--config', default='')
    pre.add_argument('--resume', default='')
    known, _ = pre.parse_known_args(argv)
    saved_cfg = {}
    if known.resume:
        try:
            record = run_record.RunRecord.load(known.resume)
        except run_record.RunRecordError as e:
            raise TrainInputError(f'--resume: {e}') from None
        if record is None:
            raise TrainInputError(f'--resume {known.resume}: no run record ({run_record.RECORD_NAME}) there; pass '
                                  f'the experiment directory a previous run wrote (OUTPUT/EXPERIMENT)')
        saved = str(Path(known.resume) / run_record.RECORD_NAME)
        saved_cfg = {k: v for k, v in record.args.items() if k not in _RUN_ONLY_ARGS}
        _check_keys(parser, saved_cfg, saved)
        _check_types(parser, saved_cfg, saved)
        parser.set_defaults(**saved_cfg)
    if known.config:
        try:
            cfg = run_record.read_args(known.config)
        except run_record.RunRecordError as e:
            raise TrainInputError(f'config file {e}') from None
        _check_keys(parser, cfg, known.config)
        _check_types(parser, cfg, known.config)
        parser.set_defaults(**cfg)
    args = parser.parse_args(argv)
    _resolve_dataset(args)
    if known.resume:
        _check_resume_args(args, saved_cfg, Path(known.resume))
    return args


def _resolve_dataset(args) -> None:
    """As in timm: a data directory without a dataset name is an image folder; with neither, the built-in set
    trains (offline). Idempotent (``run`` applies it too)."""
    if getattr(args, 'data', None) and not args.data_dir:
        args.data_dir = args.data
    if args.dataset is None:
            args.dataset = '' if args.data_dir else tdata.BUILTIN_DATASET


def _check_resume_args(args, saved_cfg: Dict[str, Any], run_dir: Path) -> None:
    """Refuse a schedule, optimizer or batch-size value that differs from the run being resumed (the saved
    optimizer and scheduler would silently ignore it)."""
    for key in _RESUME_FIXED_ARGS:
        if key in saved_cfg and getattr(args, key) != saved_cfg[key]:
            flag = '--' + key.replace('_', '-')
            raise TrainInputError(
                f'{flag} {getattr(args, key)} (from the command line or -c) differs from {saved_cfg[key]} of the '
                f'run in {run_dir} (its run record); a resumed run keeps its optimizer and LR schedule: drop {flag} to continue it, '
                f'or start a new run from its weights with --pretrained-path {run_dir / "last.safetensors"}')


# ---------------------------------------------------------------------------------------------
# Setup: model, data
# ---------------------------------------------------------------------------------------------

def _checkpoint_head_size(path: str, meta: Dict[str, Any], classifier: str) -> Optional[int]:
    nc = (meta.get('model_args') or {}).get('num_classes') or (meta.get('pretrained_cfg') or {}).get('num_classes')
    if nc:
        return int(nc)
    key = f'{classifier}.weight'
    if path.endswith('.safetensors'):
        with safetensors.safe_open(path, framework='pt') as f:
            if key in f.keys():
                return int(f.get_slice(key).get_shape()[0])
        return None
    try:
        # .pth / .pt / .bin (also timm training checkpoints), read with weights_only=True
        state = ckpt.read_state_dict(path)
    except ckpt.CheckpointError:
        return None  # timm's own load reports what is wrong with the file
    return int(state[key].shape[0]) if key in state and state[key].dim() >= 1 else None


def _model_kwargs(args, data_num_classes: int) -> Dict[str, Any]:
    """JSON-serialisable kwargs for timm.create_model (also stored in the checkpoint as model_args)."""
    kwargs = dict(args.model_kwargs or {})
    if args.memory_options:
        try:
            options = json.loads(args.memory_options) if isinstance(args.memory_options, str) else args.memory_options
        except json.JSONDecodeError as e:
            raise TrainInputError(f'--memory-options is not valid JSON ({e}); pass e.g. \'{{"chunk_size": 16}}\'') from None
        if not isinstance(options, dict):
            raise TrainInputError('--memory-options must be a JSON object, e.g. \'{"chunk_size": 16}\'')
        kwargs['memory_options'] = options
    kwargs['num_classes'] = data_num_classes
    if args.img_size is not None:
        kwargs.setdefault('img_size', args.img_size)
    elif args.input_size is not None:
        kwargs.setdefault('img_size', args.input_size[-1])
    if args.in_chans is not None:
        kwargs.setdefault('in_chans', args.in_chans)
    if args.drop:
        kwargs.setdefault('drop_rate', args.drop)
    if args.drop_path is not None:
        kwargs.setdefault('drop_path_rate', args.drop_path)
    return kwargs


def _pretrained_overlay(args, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """pretrained_cfg_overlay for --pretrained-path; may add inherited structural args to ``kwargs``."""
    path = args.pretrained_path
    try:
        meta = ckpt.read_metadata(path, required=False)
    except ckpt.CheckpointError as e:
        raise TrainInputError(f'--pretrained-path: {e}') from None
    inherited = {k: v for k, v in (meta.get('model_args') or {}).items()
                 if k in _STRUCTURAL_ARGS and k not in kwargs}
    if inherited:
        _logger.info(f'model args inherited from {path}: {inherited}')
        kwargs.update(inherited)
    overlay = dict(file=str(path))
    classifier = (timm.models.get_pretrained_cfg(args.model) or {}) if timm.is_model(args.model) else {}
    classifier = getattr(classifier, 'classifier', None) or 'head'
    head = _checkpoint_head_size(str(path), meta, classifier)
    # timm drops the checkpoint's head when its class count differs from the model's, keeps it otherwise.
    overlay['num_classes'] = head if head is not None else -1
    cfg = meta.get('pretrained_cfg') or {}
    for k in ('mean', 'std', 'interpolation', 'crop_pct', 'label_names'):
        value = meta.get(k) if k == 'label_names' and meta.get(k) else cfg.get(k)
        if value is not None:
            overlay[k] = tuple(value) if isinstance(value, list) else value
    return overlay


def _create_model(args, kwargs: Dict[str, Any]) -> nn.Module:
    factory = {}
    pretrained = args.pretrained
    if args.pretrained_path:
        factory['pretrained_cfg_overlay'] = _pretrained_overlay(args, kwargs)
        pretrained = True
    try:
        try:
            model = timm.create_model(args.model, pretrained=pretrained, **factory, **kwargs)
        except TypeError as e:
            # --img-size sets img_size for models that take one (ViTs); CNNs such as resnet take none.
            if 'img_size' not in str(e) or 'img_size' in (args.model_kwargs or {}) or 'img_size' not in kwargs:
                raise
            kwargs.pop('img_size')
            model = timm.create_model(args.model, pretrained=pretrained, **factory, **kwargs)
    except TypeError as e:
        raise TrainInputError(f'model {args.model!r} does not accept these kwargs ({e}); check --model-kwargs '
                              f'and --memory-options') from None
    except (RuntimeError, ckpt.CheckpointError) as e:
        msg = str(e).strip().splitlines()
        msg = ' '.join(m.strip() for m in msg[:3])
        if args.pretrained_path:
            raise TrainInputError(f'--pretrained-path {args.pretrained_path} does not fit {args.model}: '
                                  f'{msg[:400]}') from None
        raise TrainInputError(f'could not build {args.model}: {msg[:400]}') from None
    except OSError as e:
        raise TrainInputError(f'could not load weights for {args.model}: {str(e).splitlines()[0][:300]}') from None
    except (ValueError, AssertionError) as e:
        # model kwargs (e.g. an unknown memory option) fail as ValueError, as do some weight files
        raise TrainInputError(f'could not build {args.model}: {str(e).splitlines()[0][:300]}; check '
                              f'--model-kwargs, --memory-options' + (' and --pretrained-path' if pretrained else '')) from None
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _zero_head_for_other_classes(args, model: nn.Module, label_names: List[str]) -> None:
    """A pretrained head trained on other classes (same count, other names) starts at zero instead of mapping
    the new classes onto the old ones (timm keeps a head whenever the count matches); so a memory model and its
    plain fine-tune start from one function."""
    if not (args.pretrained or args.pretrained_path):
        return
    # the names the weights were trained on: timm's cfg for a tag, the file's (via the overlay) for --pretrained-path
    pretrained_names = (getattr(model, 'pretrained_cfg', None) or {}).get('label_names')
    head = model.get_classifier() if hasattr(model, 'get_classifier') else None
    if not pretrained_names or not isinstance(head, nn.Linear) or list(pretrained_names) == list(label_names):
        return
    if len(pretrained_names) != head.out_features:
        return  # timm already replaced the head (other class count)
    with torch.no_grad():
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()
    if args.rank == 0:
        _logger.info(f'the pretrained head classifies other classes ({", ".join(map(str, pretrained_names[:5]))}); '
                     f'the head for {", ".join(map(str, label_names[:5]))} starts at zero')


def _check_input_size(args, model: nn.Module, data_config: Dict[str, Any]) -> None:
    """The images must have the size a ViT was built for (its patch embedding asserts it on every batch)."""
    embed = getattr(model, 'patch_embed', None)
    built = getattr(embed, 'img_size', None)
    if built is None or not getattr(embed, 'strict_img_size', False):
        return
    data = tuple(data_config['input_size'][-2:])
    if tuple(built) != data:
        given = (f'--img-size {args.img_size}' if args.img_size is not None else
                 f'--input-size {" ".join(map(str, args.input_size))}' if args.input_size else 'the data config')
        raise TrainInputError(f'{given} gives {data[0]}x{data[1]} images, but {args.model} was built for img_size '
                              f'{built[0]}x{built[1]} (by --model-kwargs, the -c recipe or the checkpoint); give '
                              f'--img-size {built[0]}, or the same img_size in --model-kwargs')


def _model_from_run(args, weights: Path):
    """The model of a run being resumed, rebuilt from its checkpoint weights (exact model args, its weights)."""
    try:
        model, meta = ckpt.load_model(weights)
    except ckpt.CheckpointError as e:
        raise TrainInputError(f'--resume: {e}') from None
    if meta.get('architecture') != args.model:
        raise TrainInputError(f'--resume {args.resume} holds {meta.get("architecture")}, not --model {args.model}; '
                              f'drop --model to continue that run')
    if model.num_classes != args.num_classes:
        raise TrainInputError(f'--resume {args.resume} was trained for {model.num_classes} classes, the dataset '
                              f'has {args.num_classes}')
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model.train(), dict(meta['model_args'])


def _create_dataset(args, split: str, is_training: bool, num_samples: Optional[int]):
    try:
        # num_samples: a fixed, class-balanced subset chosen by the data module (not per epoch).
        dataset = tdata.create_dataset(
            args.dataset, root=args.data_dir, split=split, is_training=is_training, num_samples=num_samples,
            image_column=args.input_key or None, label_column=args.target_key or None)
    except (ValueError, FileNotFoundError, KeyError, OSError) as e:
        raise TrainInputError(f'dataset {args.dataset!r} split {split!r}: {str(e).strip().splitlines()[0]}') from None
    _check_readable(dataset, args, split)
    return dataset


def _check_readable(dataset, args, split: str) -> None:
    """Read the first sample now, so unreadable images are one error line before any work, not a traceback
    from inside the loader (timm's ImageDataset skips undecodable images and gives up after 10 in a row)."""
    if not len(dataset):
        return
    timm_log = logging.getLogger('timm.data.dataset')
    skipped = []
    handler = logging.Handler()
    handler.emit = lambda record: skipped.append(record.getMessage())
    timm_log.addHandler(handler)
    propagate, timm_log.propagate = timm_log.propagate, False  # the skips are summarised below, not printed
    try:
        dataset[0]
    except (RuntimeError, OSError, ValueError) as e:
        reason = skipped[-1].split('. ', 1)[-1] if skipped else f'{type(e).__name__}: {e}'  # no "Skipped sample"
        where = f' in {args.data_dir}' if args.data_dir else ''
        raise TrainInputError(f'dataset {args.dataset!r} split {split!r}: cannot read its images{where} '
                              f'({str(reason).splitlines()[0][:200]}; the first {max(len(skipped), 1)} tried were all '
                              f'unreadable); check that the files are intact images') from None
    finally:
        timm_log.removeHandler(handler)
        timm_log.propagate = propagate


class _ResumableBatchSampler(torch.utils.data.BatchSampler):
    """Batches of a ``DistributedSampler`` (seeded by seed + epoch; one replica in single-process runs),
    optionally skipping the first batches, so a resumed epoch starts where it stopped without touching any RNG.
    Items are ``(index, epoch)``, the key :class:`_SeededSamples` seeds augmentation with."""

    def __init__(self, sampler, batch_size: int):
        super().__init__(sampler, batch_size, drop_last=True)
        self.skip = 0
        self.epoch = 0

    def set_epoch(self, epoch: int, skip: int = 0):
        self.sampler.set_epoch(epoch)
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        for i, batch in enumerate(super().__iter__()):
            if i >= self.skip:
                yield [(index, self.epoch) for index in batch]


class _SeededSamples(torch.utils.data.Dataset):
    """``dataset[(index, epoch)]``: ``dataset[index]`` with the global generators timm's transforms draw from
    seeded by (seed, epoch, index), so an augmented image does not depend on which process loads it or what was
    loaded before. In the training process (``--workers 0``) the generators are restored afterwards."""

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        in_worker = torch.utils.data.get_worker_info() is not None
        saved = None if in_worker else (torch.get_rng_state(), np.random.get_state(), random.getstate())
        sample_seed = int(np.random.SeedSequence([self.seed % 2 ** 64, epoch, index]).generate_state(1)[0])
        torch.default_generator.manual_seed(sample_seed)  # the CPU generator only (torch.manual_seed seeds CUDA too)
        np.random.seed(sample_seed)
        random.seed(sample_seed)
        try:
            return self.dataset[index]
        finally:
            if saved is not None:
                torch.set_rng_state(saved[0])
                np.random.set_state(saved[1])
                random.setstate(saved[2])


def _default_workers() -> int:
    """Default ``--workers``: timm's 4, at most this process's share of the cores less one for training."""
    per_process = cpu_cores() // max(int(os.environ.get('LOCAL_WORLD_SIZE', 1)), 1)
    return max(0, min(4, per_process - 1))


def _train_loader(args, dataset, data_config):
    # create_loader picks its own sampler (global-RNG shuffle when not distributed), which cannot
    # resume mid-epoch; so the training loader is built here from timm's transform and a seeded sampler.
    interpolation = args.train_interpolation
    if args.no_aug or not interpolation:
        interpolation = data_config['interpolation']
    try:
        dataset.transform = create_transform(
            data_config['input_size'], is_training=True, no_aug=args.no_aug, train_crop_mode=args.train_crop_mode,
            scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
            auto_augment=args.aa, interpolation=interpolation, mean=data_config['mean'], std=data_config['std'],
            re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, use_prefetcher=False)
    except (AssertionError, ValueError, KeyError) as e:  # timm asserts on an unknown --aa policy
        raise TrainInputError(f'bad augmentation settings ({type(e).__name__}: {str(e)[:200]}); check --aa '
                              f'(e.g. rand-m9-mstd0.5), --train-crop-mode, --remode, --scale, --ratio') from None
    sampler = torch.utils.data.distributed.DistributedSampler(
        dataset, num_replicas=args.world_size, rank=args.rank, shuffle=True, seed=args.seed)
    batch_sampler = _ResumableBatchSampler(sampler, args.batch_size)
    if len(batch_sampler) == 0:
        raise TrainInputError(f'the training set has {len(dataset)} samples, fewer than one batch of '
                              f'{args.batch_size} per process; lower --batch-size')
    # The loader's own generator draws the workers' base seed, keeping the global RNG out of iterator creation.
    generator = torch.Generator().manual_seed(args.seed + args.rank)
    return torch.utils.data.DataLoader(
        _SeededSamples(dataset, args.seed), batch_sampler=batch_sampler, num_workers=args.workers,
        generator=generator, persistent_workers=args.workers > 0)


def _eval_loader(args, dataset, data_config, device):
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.validation_batch_size or args.batch_size,
        is_training=False, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
        crop_pct=data_config['crop_pct'], device=device, use_prefetcher=False)


# ---------------------------------------------------------------------------------------------
# Checkpoint state (tensors and plain types only: train_state.pth loads with weights_only=True)
# ---------------------------------------------------------------------------------------------

def _rng_state() -> Dict[str, Any]:
    """The process's RNG states; CUDA's (every device's) only once CUDA is in use, so a CPU run never starts it."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = dict(
        torch=torch.get_rng_state(),
        numpy=dict(keys=torch.from_numpy(np_state[1].astype(np.int64)), pos=int(np_state[2]),
                   has_gauss=int(np_state[3]), cached_gaussian=float(np_state[4])),
        python=[py_state[0], list(py_state[1]), py_state[2]],
    )
    if torch.cuda.is_initialized():
        state['cuda'] = list(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    cuda = state.get('cuda')
    if cuda and torch.cuda.is_initialized():  # a run resumed on CPU leaves CUDA alone
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            _logger.warning(f'the checkpoint holds the CUDA RNG states of {len(cuda)} devices, this process sees '
                            f'{torch.cuda.device_count()}; they are not restored')


def _scheduler_state(scheduler) -> Dict[str, Any]:
    state = scheduler.state_dict()
    if isinstance(scheduler, PlateauLRScheduler):
        state['lr_scheduler'] = scheduler.lr_scheduler.state_dict()
    return state


def _load_scheduler_state(scheduler, state: Dict[str, Any]) -> None:
    state = dict(state)
    if isinstance(scheduler, PlateauLRScheduler):
        scheduler.lr_scheduler.load_state_dict(state.pop('lr_scheduler'))
    scheduler.load_state_dict(state)


def _torch_save_atomic(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    ckpt.atomic_write_bytes(path, buf.getvalue())


# The resumable checkpoint is a pair of atomic files, but the pair is not atomic: the complete pair is first kept
# under the PREV names (hard links), then the new pair replaces the LAST names, then PREV goes. Whenever the process
# dies one pair is complete (both files carry one checkpoint id), and --resume picks the newest such pair.
LAST_PAIR = ('last.safetensors', 'train_state.pth')
PREV_PAIR = ('last.prev.safetensors', 'train_state.prev.pth')


def _keep_copy(src: Path, dst: Path) -> None:
    """Atomically make ``dst`` a copy of ``src`` (a hard link where the filesystem has them)."""
    if dst.exists() and os.path.samefile(src, dst):
        return  # already linked (a run killed right after linking): rename(tmp, dst) would keep tmp, a no-op
    tmp = dst.with_name(f'.{dst.name}.{uuid.uuid4().hex[:8]}.tmp')
    try:
        try:
            os.link(src, tmp)
        except OSError:   # no hard links here: a streamed copy (train_state.pth can be GBs)
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        # gone after a rename, unless that rename was a no-op (tmp and dst links to one file) or failed
        tmp.unlink(missing_ok=True)


def _read_pair(directory: Path, names):
    """``(problem, state)``: the pair's train state, or why the pair ``names`` in ``directory`` cannot be resumed."""
    weights_path, state_path = (directory / n for n in names)
    for p in (state_path, weights_path):
        if not p.is_file():
            return f'{p.name} is missing; that run never wrote a checkpoint', None
    try:
        state = torch.load(state_path, map_location='cpu', weights_only=True)
    except Exception as e:
        detail = str(e).splitlines()[0][:200] if str(e) else ''
        return f'{state_path.name} is unreadable or corrupt ({type(e).__name__}: {detail})', None
    try:
        meta = ckpt.read_metadata(weights_path, required=False)
    except ckpt.CheckpointError as e:
        return str(e), None
    # The checkpoint id pairs the two files exactly; checkpoints written before it existed compare update counts.
    same = (meta.get('checkpoint_id') == state.get('checkpoint_id') if 'checkpoint_id' in state
            else meta.get('num_updates') == state.get('num_updates'))
    if not same:
        return (f'{weights_path.name} (update {meta.get("num_updates")}) and {state_path.name} (update '
                f'{state.get("num_updates")}) are from different steps'), None
    try:
        weights = ckpt.read_state_dict(weights_path)  # checks the tensors against the checksum stored with them
    except ckpt.CheckpointError as e:
        return str(e), None
    problem = _non_finite_problem(weights, weights_path)
    if problem:
        return problem, None
    return None, state


def _non_finite_problem(state_dict: Dict[str, torch.Tensor], source) -> Optional[str]:
    """Why weights holding NaN or inf cannot be trained from (no learning rate fixes them), or None."""
    bad = [k for k, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if not bad:
        return None
    shown = ', '.join(bad[:3]) + (f' (+{len(bad) - 3} more)' if len(bad) > 3 else '')
    return (f'{source}: {len(bad)} weight tensors hold NaN or inf ({shown}), so the file is damaged or was written '
            f'after training diverged; the learning rate is not the cause')


def _find_resume_pair(directory: Path):
    """``(weights path, train state, from_prev)`` of the newest consistent checkpoint pair in ``directory``."""
    problem, state = _read_pair(directory, LAST_PAIR)
    if problem is None:
        return directory / LAST_PAIR[0], state, False
    prev_problem, state = _read_pair(directory, PREV_PAIR)
    if prev_problem is None:
        _logger.warning(f'{directory}: {problem} (a checkpoint write was interrupted or the file was damaged); '
                        f'resuming from the previous checkpoint, {PREV_PAIR[0]} + {PREV_PAIR[1]}')
        return directory / PREV_PAIR[0], state, True
    if any((directory / n).exists() for n in PREV_PAIR):
        problem += f'; the previous checkpoint cannot be used either: {prev_problem}'
    raise TrainInputError(f'--resume {directory}: {problem}')


# ---------------------------------------------------------------------------------------------
# Run folder: one owner, no leftovers, one-line write errors
# ---------------------------------------------------------------------------------------------

class _RunFolderLock:
    """Exclusive ownership of a run folder: an ``flock`` on ``DIR/LOCK_FILE``, which the kernel drops however the
    process ends. The owner removes the file as it lets go; a trainer that locked it just as it was removed sees
    that it no longer names the file and retries."""

    def __init__(self):
        self.directory = None
        self._fd = None

    def acquire(self, directory: Path, resume: bool) -> None:
        """Own ``directory``, or raise :class:`TrainInputError` if another trainer does (nothing written)."""
        if self.directory is not None or fcntl is None:
            return
        path = Path(directory) / LOCK_FILE
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                    return  # nobody can write here, so there is nothing to guard; the first write says so
                raise RunOutputError(_write_error_text(path, e)) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                owner = os.pread(fd, 200, 0).decode(errors='replace').strip()
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    _logger.warning(f'cannot lock {directory} ({e.strerror}); it is not guarded against a '
                                    f'second trainer')
                    return
                then = (f'then continue it with --resume {directory}' if resume else
                        'or pick another --experiment')
                raise TrainInputError(f'{directory} is in use by another trainer{f" ({owner})" if owner else ""}; '
                                      f'wait for it to end or stop it (Ctrl-C writes a checkpoint), {then}') from None
            try:
                held = os.fstat(fd)
                now = os.stat(path)
                if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the previous owner removed the file after we opened it: lock the new one
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f'pid {os.getpid()} on {os.uname().nodename}'.encode())  # POSIX, as fcntl is
        except OSError:
            pass  # the owner's name only makes the other trainer's message clearer
        self.directory, self._fd = Path(directory), fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.directory / LOCK_FILE)  # while still locked, so nobody holds a removed file unawares
        except OSError:
            pass
        os.close(self._fd)
        self.directory, self._fd = None, None


def _remove_orphan_temps(directory: Path) -> None:
    """Remove the temp files of trainer writes killed mid-way (only the folder's owner may call this)."""
    for name in RUN_FILES + RECORD_FILES:
        for tmp in directory.glob(f'.{name}.*.tmp'):   # checkpoint.atomic_write_bytes's and _keep_copy's names
            try:
                tmp.unlink()
            except OSError:
                pass


def _write_error_text(path: Path, e: OSError) -> str:
    reason = e.strerror or str(e) or type(e).__name__
    if e.errno in (errno.ENOSPC, getattr(errno, 'EDQUOT', errno.ENOSPC), errno.EFBIG):
        hint = 'free some space or pass another --output'
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = 'pass an --output folder you can write to'
    elif e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        hint = 'a file stands where a folder should be (or the other way round): pass a folder as --output'
    else:
        hint = 'check --output'
    return f'cannot write {path}: {reason}; {hint}'


@contextmanager
def _writing(path: Path, run_dir: Optional[Path] = None):
    """Turn an OSError of the writes inside into :class:`RunOutputError` naming ``path``."""
    try:
        yield
    except OSError as e:
        text = _write_error_text(path, e)
        if run_dir is not None and any((run_dir / n).is_file() for n in LAST_PAIR + PREV_PAIR):
            text += f'; the files already written are intact: continue later with --resume {run_dir}'
        raise RunOutputError(text) from None


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

class _StopRequest:
    """The first SIGINT/SIGTERM asks to stop after the current step; a second aborts. Loader processes forked
    meanwhile inherit the handler and ignore both: the trainer needs them to finish its step."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        self._pid = os.getpid()

    def _handler(self, signum, frame):
        if os.getpid() != self._pid:
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        _logger.warning('Ctrl-C: finishing this step and writing a resumable checkpoint (Ctrl-C again aborts)')

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        return False


def _amp_autocast(args, device):
    if not args.amp:
        return nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=getattr(torch, args.amp_dtype))


def _evaluate(model: nn.Module, loader, args, device, desc: str = 'eval') -> Dict[str, float]:
    """Loss / top-1 / top-5 (percent) through the evaluator's loop, summed over processes when distributed."""
    metrics = evaluate_model(
        model, loader, args.num_classes, device=device, amp=args.amp, amp_dtype=getattr(torch, args.amp_dtype),
        progress=not args.no_progress and args.rank == 0, channels_last=args.channels_last,
        distributed=args.distributed, desc=desc, timing=False)
    return {k: metrics[k] for k in ('loss', 'top1', 'top5')}


def _to_device(x: torch.Tensor, y: torch.Tensor, device, channels_last: bool):
    """A batch on ``device``; the images in channels_last memory format with ``--channels-last``."""
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device)


class Trainer:
    """One training run: built by :func:`main` after every input check has passed."""

    def __init__(self, args, model, model_kwargs, label_names, data_config, loader_train, loader_eval,
                 device, output_dir: Optional[Path]):
        self.args = args
        self.model = model
        self.model_kwargs = model_kwargs
        self.label_names = label_names
        self.data_config = data_config
        self.loader_train = loader_train
        self.loader_eval = loader_eval
        self.device = device
        self.output_dir = output_dir
        self.record: Optional[run_record.RunRecord] = None  # rank 0's, set with output_dir
        self.is_primary = args.rank == 0
        self.amp_autocast = _amp_autocast(args, device)
        # float16 gradients underflow without loss scaling (bfloat16 has float32's range and needs none)
        self.scaler = NativeScaler(device.type) if args.amp and args.amp_dtype == 'float16' else None

        try:
            self.optimizer = create_optimizer_v2(
                model, **optimizer_kwargs(cfg=args), **args.opt_kwargs,
                param_group_fn=partial(
                    two_phase.two_phase_param_groups, weight_decay=args.weight_decay, layer_decay=args.layer_decay))
        except (ValueError, TypeError, AssertionError) as e:
            raise TrainInputError(f'could not create optimizer --opt {args.opt} ({str(e)[:200]}); see '
                                  f'timm.optim.list_optimizers() and check --opt-kwargs') from None
        # steps: loader batches (micro-batches); updates: optimizer steps, what the schedule counts (as in timm)
        self.steps_per_epoch = len(loader_train)
        self.updates_per_epoch = math.ceil(self.steps_per_epoch / args.grad_accum_steps)
        try:
            self.scheduler, self.num_epochs = create_scheduler_v2(
                self.optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
                updates_per_epoch=self.updates_per_epoch)
        except (ValueError, TypeError, AssertionError) as e:
            raise TrainInputError(f'could not create scheduler --sched {args.sched} ({str(e)[:200]}); use one of '
                                  f'cosine, tanh, step, multistep, plateau, poly') from None
        self.ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) \
            if args.model_ema else None

        self.mixup_fn = None
        if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
            self.mixup_fn = Mixup(
                mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                label_smoothing=args.smoothing, num_classes=model_kwargs['num_classes'])
            self.train_loss_fn = SoftTargetCrossEntropy()
        elif args.smoothing:
            self.train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
        else:
            self.train_loss_fn = nn.CrossEntropyLoss()

        self.train_model = self.eval_model = model
        if args.distributed:
            # No find_unused_parameters: every parameter (memory included) takes part in each forward.
            ddp_kwargs = dict(device_ids=[device]) if device.type == 'cuda' else {}
            self.train_model = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
        if args.torchcompile:
            # After DDP, as timm does; self.model stays the plain module that checkpoints and the EMA read.
            compile_ = partial(torch.compile, backend=args.torchcompile, mode=args.torchcompile_mode)
            try:
                self.train_model, self.eval_model = compile_(self.train_model), compile_(model)
            except RuntimeError as e:  # an unknown backend or mode
                raise TrainInputError(f'--torchcompile {args.torchcompile}: {str(e).splitlines()[0][:200]} (backends: '
                                      f'{", ".join(torch._dynamo.list_backends())})') from None

        self.start_epoch = 0
        self.start_step = 0
        self.num_updates = 0
        self.rng_to_restore = None
        self.best_metric = None
        self.best_epoch = None
        self.step0_metrics = None
        self.epoch_loss = AverageMeter()
        self.stop = _StopRequest()
        self.steps_run = 0
        # Whether last.safetensors + train_state.pth in output_dir form one complete checkpoint (to keep as
        # the previous pair while the next one is written); a new run has none yet.
        self.last_pair_complete = False
        # training time of earlier invocations of a resumed run (results.json reports the run's total)
        self.time_before = 0.0
        self.fit_started = None

    # -- checkpoints ---------------------------------------------------------------------------

    def _gather_rng(self) -> List[Dict[str, Any]]:
        state = _rng_state()
        if not self.args.distributed:
            return [state]
        states = [None] * self.args.world_size
        torch.distributed.all_gather_object(states, state)
        return states

    def save_checkpoint(self, epoch: int, step_in_epoch: int) -> None:
        """Write last.safetensors + train_state.pth for resuming at (epoch, step_in_epoch), crash-safe as a pair
        (see ``LAST_PAIR``)."""
        rng = self._gather_rng()  # collective: every rank takes part
        if not self.is_primary:
            return
        with _writing(self.output_dir / LAST_PAIR[0], self.output_dir):
            self._write_checkpoint_pair(epoch, step_in_epoch, rng)

    def _write_checkpoint_pair(self, epoch: int, step_in_epoch: int, rng) -> None:
        last = [self.output_dir / n for n in LAST_PAIR]
        prev = [self.output_dir / n for n in PREV_PAIR]
        if self.last_pair_complete:
            # Keep the weights first: until the state follows, the LAST pair is still the complete one.
            for src, dst in zip(last, prev):
                _keep_copy(src, dst)
        # else the LAST pair is half written (or absent) and PREV, if any, is the complete pair: leave it.
        self.last_pair_complete = False
        position = dict(epoch=epoch, step_in_epoch=step_in_epoch, num_updates=self.num_updates,
                        checkpoint_id=uuid.uuid4().hex)
        self._save_weights(last[0], metadata=position, checksum=True)
        state = dict(
            format_version=1, model=self.args.model, world_size=self.args.world_size, **position,
            optimizer=self.optimizer.state_dict(), scheduler=_scheduler_state(self.scheduler),
            ema=self.ema.state_dict() if self.ema is not None else None, rng=rng,
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            epoch_loss=[float(self.epoch_loss.sum), int(self.epoch_loss.count)],
            best_metric=self.best_metric, best_epoch=self.best_epoch, step0_metrics=self.step0_metrics,
            train_time_s=self._train_time(),
        )
        _torch_save_atomic(state, last[1])
        problem, _ = _read_pair(self.output_dir, LAST_PAIR)
        if problem:
            raise RunOutputError(f'the checkpoint just written in {self.output_dir} does not read back ({problem}); '
                                 f'the storage may be failing. The previous checkpoint, if any, is kept as '
                                 f'{PREV_PAIR[0]} + {PREV_PAIR[1]}')
        self.last_pair_complete = True
        for p in prev:
            p.unlink(missing_ok=True)

    def _train_time(self) -> float:
        """Seconds this run has spent in fit(), over every invocation (a resumed run adds to the saved total)."""
        return self.time_before + (time.time() - self.fit_started if self.fit_started is not None else 0.0)

    def _save_weights(self, path: Path, model: Optional[nn.Module] = None, **kwargs) -> str:
        """Write the weights atomically and return the sha256 of the bytes written."""
        data = ckpt.weights_bytes(unwrap_model(model if model is not None else self.model), **kwargs)
        ckpt.atomic_write_bytes(path, data)
        return hashlib.sha256(data).hexdigest()

    def config_text(self) -> str:
        """The run folder's config.json: this model as timm's ``save_for_hf`` describes it, with the label names
        and the preprocessing it trains with."""
        return ckpt.config_json(unwrap_model(self.model), model_args=self.model_kwargs, label_names=self.label_names,
                                data_config=self.data_config)

    def load_checkpoint(self, directory: str, pair=None) -> None:
        """Restore model, optimizer, scheduler, EMA, position and RNG from a run directory.

        ``pair`` is :func:`_find_resume_pair`'s answer for ``directory`` when the caller already built the model from
        its weights (:func:`_model_from_run`); without it the pair is found and its weights loaded here.
        """
        directory = Path(directory)
        if pair is None:
            pair = _find_resume_pair(directory)
            try:
                ckpt.load_state_dict_file(self.model, pair[0], strict=True)
            except ckpt.CheckpointError as e:
                raise TrainInputError(f'--resume: {e}') from None
        _, state, from_prev = pair
        self.last_pair_complete = not from_prev
        if state.get('world_size', 1) != self.args.world_size and state['step_in_epoch']:
            raise TrainInputError(f'--resume {directory}: stopped mid-epoch with {state["world_size"]} processes; '
                                  f'resume with the same number of processes')
        try:
            self.optimizer.load_state_dict(state['optimizer'])
        except (ValueError, KeyError) as e:
            raise TrainInputError(f'--resume {directory}: optimizer state does not fit ({e}); '
                                  f'use the same model and optimizer settings') from None
        _load_scheduler_state(self.scheduler, state['scheduler'])
        if self.scaler is not None and state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        if self.ema is not None and state.get('ema') is not None:
            self.ema.load_state_dict(state['ema'])
        elif self.ema is not None:
            self.ema = ModelEmaV3(self.model, decay=self.args.model_ema_decay, use_warmup=self.args.model_ema_warmup)
        self.start_epoch, self.start_step = int(state['epoch']), int(state['step_in_epoch'])
        self.num_updates = int(state['num_updates'])
        rng = state.get('rng') or []
        self.rng_to_restore = rng[self.args.rank] if len(rng) == self.args.world_size else None
        self.epoch_loss.sum, self.epoch_loss.count = state.get('epoch_loss', [0.0, 0])
        self.epoch_loss.avg = self.epoch_loss.sum / max(self.epoch_loss.count, 1)
        self.best_metric, self.best_epoch = state.get('best_metric'), state.get('best_epoch')
        self.time_before = float(state.get('train_time_s', 0.0))
        self.step0_metrics = state.get('step0_metrics')
        if self.is_primary:
            _logger.info(f'resumed from {directory}: epoch {self.start_epoch} step {self.start_step} '
                         f'(update {self.num_updates})')

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self, model: Optional[nn.Module] = None, desc: str = 'eval') -> Dict[str, float]:
        """Metrics of ``model`` (default: the model being trained, compiled with --torchcompile)."""
        return _evaluate(self.eval_model if model is None else model, self.loader_eval, self.args, self.device, desc)

    def _no_bar(self) -> bool:
        return self.args.no_progress or not self.is_primary

    # -- training ------------------------------------------------------------------------------

    def _set_lrs(self, epoch: int, step: int) -> int:
        phase = two_phase.phase_of(epoch, self.args.freeze_epochs)
        two_phase.apply_phase(self.optimizer, phase, self.args.backbone_lr_scale)
        # Recompute every group's LR from the scheduler so a resumed run sets exactly the same values.
        if not isinstance(self.scheduler, PlateauLRScheduler):
            if self.scheduler.t_in_epochs:
                self.scheduler.step(epoch)
            else:
                self.scheduler.step_update(epoch * self.updates_per_epoch + step // self.args.grad_accum_steps)
        return phase

    def _stop_now(self) -> bool:
        stop = self.stop.requested or (
            self.args.stop_after_steps is not None and self.steps_run >= self.args.stop_after_steps)
        if self.args.distributed:
            # Every rank must stop after the same step or the next collective would hang.
            flag = torch.tensor([1.0 if stop else 0.0])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def _backward(self, loss: torch.Tensor, update: bool, clip_params) -> None:
        """Add ``loss``'s gradients; on the last micro-batch of an update also clip and step (as timm does)."""
        args = self.args
        if self.scaler is not None:   # timm's NativeScaler: scaled backward, unscale before clipping, step, update
            self.scaler(loss, self.optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                        parameters=clip_params, need_update=update)
            return
        loss.backward()
        if update:
            if args.clip_grad is not None:
                dispatch_clip_grad(clip_params, value=args.clip_grad, mode=args.clip_mode)
            self.optimizer.step()

    def train_epoch(self, epoch: int, start_step: int) -> Optional[float]:
        """Train one epoch from loader step ``start_step`` (an update boundary); returns the mean loss, or None if
        stopped early."""
        args = self.args
        if args.mixup_off_epoch and epoch >= args.mixup_off_epoch and self.mixup_fn is not None:
            self.mixup_fn.mixup_enabled = False
        phase = self._set_lrs(epoch, start_step)
        if start_step == 0:
            if args.freeze_epochs and epoch == args.freeze_epochs:
                dropped = two_phase.reset_optimizer_state(self.optimizer, 'backbone')
                if self.is_primary:
                    _logger.info(f'phase switch: backbone unfrozen at lr scale {args.backbone_lr_scale}; '
                                 f'dropped optimizer state of {dropped} backbone tensors')
            self.epoch_loss.reset()
        if self.is_primary:
            lrs = ', '.join(f'{k} {v:.3e}' for k, v in two_phase.describe_lrs(self.optimizer).items())
            _logger.info(f'epoch {epoch + 1}/{self.num_epochs} phase {phase} '
                         f'({"backbone frozen, memory + head train" if phase == 1 else "all train"}): lr {lrs}')

        self.loader_train.batch_sampler.set_epoch(epoch, skip=start_step)
        batches = iter(self.loader_train)
        if self.rng_to_restore is not None:
            # After creating the iterator (which draws from its own generator, not the global RNG).
            _set_rng_state(self.rng_to_restore)
            self.rng_to_restore = None
        self.train_model.train()
        if phase == 1:
            two_phase.freeze_backbone_norm_stats(self.model)
        clip_params = two_phase.active_parameters(self.optimizer)
        accum, steps = args.grad_accum_steps, self.steps_per_epoch
        bar = tqdm(total=steps, initial=start_step, desc=f'epoch {epoch + 1} phase {phase}',
                   leave=False, disable=self._no_bar())
        self.optimizer.zero_grad(set_to_none=True)
        for step in range(start_step, steps):
            x, y = _to_device(*next(batches), self.device, args.channels_last)
            if self.mixup_fn is not None:
                x, y = self.mixup_fn(x, y)
            update_idx = step // accum
            update = (step + 1) % accum == 0 or step + 1 == steps
            # the mean over the update's samples; the last update of an epoch may have fewer micro-batches
            micro_batches = min(accum, steps - update_idx * accum)
            # DDP averages gradients across processes only on the update's last backward
            no_sync = self.train_model.no_sync if args.distributed and not update else nullcontext
            with no_sync():
                with self.amp_autocast():
                    out = self.train_model(x)
                loss = self.train_loss_fn(out.float(), y)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f'loss is {loss.item()} at epoch {epoch} step {step}; lower --lr or '
                                             f'use --clip-grad')
                self._backward(loss / micro_batches if micro_batches > 1 else loss, update, clip_params)
            self.epoch_loss.update(loss.item(), x.shape[0])
            bar.update(1)
            if not update:
                continue
            self.optimizer.zero_grad(set_to_none=True)
            self.num_updates += 1
            self.steps_run += 1
            if self.ema is not None:
                self.ema.update(self.model, step=self.num_updates)
            self.scheduler.step_update(num_updates=self.num_updates, metric=self.epoch_loss.avg)
            if self.is_primary and (update_idx % args.log_interval == 0 or step + 1 == steps):
                lrs = two_phase.describe_lrs(self.optimizer)
                bar.set_postfix(loss=f'{self.epoch_loss.avg:.4f}', **{f'lr_{k}': f'{v:.1e}' for k, v in lrs.items()})
                if self._no_bar():
                    _logger.info(f'epoch {epoch + 1} step {update_idx + 1}/{self.updates_per_epoch} phase {phase} '
                                 f'loss {loss.item():.4f} ({self.epoch_loss.avg:.4f})')
            if step + 1 < steps:
                if self._stop_now():
                    bar.close()
                    self.save_checkpoint(epoch, step + 1)
                    return None
                if args.checkpoint_interval and (update_idx + 1) % args.checkpoint_interval == 0:
                    self.save_checkpoint(epoch, step + 1)
        bar.close()
        loss_avg = self.epoch_loss.avg
        if args.distributed:
            loss_avg = reduce_tensor(torch.tensor([loss_avg]), args.world_size).item()
        return loss_avg

    def _dump_rank_weights(self, tag: str) -> None:
        if self.args.dump_rank_weights and self.output_dir is not None:
            self._save_weights(self.output_dir / f'rank{self.args.rank}_{tag}.safetensors')
            if self.ema is not None:
                self._save_weights(self.output_dir / f'rank{self.args.rank}_ema_{tag}.safetensors',
                                   model=self.ema.module)

    def _write_summary_row(self, row: Dict[str, Any]) -> None:
        path = self.output_dir / 'summary.csv'
        rows = []
        if path.is_file():
            with open(path, newline='') as f:
                rows = [r for r in csv.DictReader(f) if int(r['epoch']) < row['epoch']]
        rows.append(row)
        fields = list(row.keys())
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)
        with _writing(path, self.output_dir):
            ckpt.atomic_write_bytes(path, buf.getvalue().encode())

    def fit(self) -> Dict[str, Any]:
        """Run (or continue) the schedule; returns the summary dict."""
        with self.stop:   # from the start: loader processes forked under it ignore Ctrl-C (see _StopRequest)
            return self._fit()

    def _fit(self) -> Dict[str, Any]:
        args = self.args
        self.fit_started = time.time()
        if self.start_epoch == 0 and self.start_step == 0 and self.loader_eval is not None:
            self.step0_metrics = self.evaluate(desc='step 0 eval')
            if self.is_primary:
                m = self.step0_metrics
                _logger.info(f'step 0 (before training): top1 {m["top1"]:.2f} top5 {m["top5"]:.2f} loss {m["loss"]:.4f}')
        self._dump_rank_weights('init')
        interrupted = False
        last_eval = None
        if self.start_epoch >= self.num_epochs and self.loader_eval is not None:
            # Resumed after the last epoch's checkpoint but before the final files were written.
            last_eval = self.evaluate()
        for epoch in range(self.start_epoch, self.num_epochs):
            t_epoch = time.time()
            start_step = self.start_step if epoch == self.start_epoch else 0
            # A second Ctrl-C raises KeyboardInterrupt mid-step: nothing is written then, the step
            # may be half applied; the last checkpoint stays valid.
            train_loss = self.train_epoch(epoch, start_step)
            if train_loss is None:
                interrupted = True
                break
            lrs = two_phase.describe_lrs(self.optimizer)
            phase = two_phase.phase_of(epoch, args.freeze_epochs)
            eval_metrics = self.evaluate() if self.loader_eval is not None else None
            ema_metrics = (self.evaluate(self.ema.module, desc='eval (EMA)')
                           if self.ema is not None and self.loader_eval is not None else None)
            last_eval = eval_metrics
            metric = (eval_metrics or {}).get(args.eval_metric, train_loss if args.eval_metric == 'loss' else None)
            if metric is not None:
                better = self.best_metric is None or (
                    metric < self.best_metric if args.eval_metric == 'loss' else metric > self.best_metric)
                if better:
                    self.best_metric, self.best_epoch = metric, epoch
            self._dump_rank_weights(f'epoch{epoch}')
            if self.is_primary:
                row = dict(epoch=epoch, phase=phase,
                           **{f'lr_{r}': f'{lrs[r]:.6g}' if r in lrs else '' for r in two_phase.ROLES},
                           train_loss=round(train_loss, 6),
                           eval_loss='', top1='', top5='', ema_top1='', time=round(time.time() - t_epoch, 2))
                if eval_metrics:
                    row.update(eval_loss=round(eval_metrics['loss'], 6), top1=round(eval_metrics['top1'], 4),
                               top5=round(eval_metrics['top5'], 4))
                if ema_metrics:
                    row['ema_top1'] = round(ema_metrics['top1'], 4)
                self._write_summary_row(row)
                msg = f'epoch {epoch + 1}/{self.num_epochs} phase {phase}: train loss {train_loss:.4f}'
                if eval_metrics:
                    msg += f', eval loss {eval_metrics["loss"]:.4f} top1 {eval_metrics["top1"]:.2f} ' \
                           f'top5 {eval_metrics["top5"]:.2f}'
                if ema_metrics:
                    msg += f', EMA top1 {ema_metrics["top1"]:.2f}'
                _logger.info(msg + f' ({row["time"]:.1f}s)')
            self.scheduler.step(epoch + 1, metric)
            self.save_checkpoint(epoch + 1, 0)
            if epoch + 1 < self.num_epochs and self._stop_now():
                interrupted = True
                break
        summary = dict(
            output_dir=str(self.output_dir) if self.output_dir else None, interrupted=interrupted,
            epochs=self.num_epochs, num_updates=self.num_updates,
            step0_top1=(self.step0_metrics or {}).get('top1'), step0=self.step0_metrics,
            best_top1=self.best_metric if args.eval_metric == 'top1' else None, best_epoch=self.best_epoch,
            final=last_eval, final_top1=(last_eval or {}).get('top1'), train_time_s=round(self._train_time(), 2),
            checkpoint=None,
        )
        if self.is_primary and not interrupted:
            path = self.output_dir / ckpt.WEIGHTS_NAME
            summary['checkpoint'] = str(path)
            with _writing(self.output_dir, self.output_dir):
                self.record.weights_sha256 = self._save_weights(path)
                if self.ema is not None:
                    self._save_weights(self.output_dir / 'model_ema.safetensors', model=self.ema.module)
                self.record.save(self.output_dir)
                ckpt.atomic_write_bytes(self.output_dir / 'results.json', json.dumps(summary, indent=2).encode())
        if interrupted:
            summary['checkpoint'] = str(self.output_dir / 'last.safetensors') if self.output_dir else None
        return summary


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def _setup_logging() -> None:
    """timm's console logging (info lines bare, others ``WARNING: ...``), unless the caller set up logging."""
    if not logging.getLogger().handlers:   # timm's adds a handler per call: main() may run many times in a process
        setup_default_logging()
    _logger.setLevel(logging.INFO)


def _check_new_experiment_dir(args) -> None:
    """A new run never writes into a folder holding another run's files (it would mix the two runs)."""
    if args.resume or not args.experiment or args.force:
        return
    path = Path(args.output) / args.experiment
    held = [n for n in RUN_FILES if (path / n).exists()]
    if held:
        raise TrainInputError(f'{path} already holds a run ({", ".join(held)}); continue it with --resume {path}, '
                              f'start over there with --force, or pick another --experiment')


def _experiment_dir(args, data_config) -> Path:
    """The run folder, created: ``--resume DIR``, ``OUTPUT/EXPERIMENT``, or ``OUTPUT/<time>-<model>-<size>``
    with a ``-1``, ``-2``, ... suffix when taken (creating the folder claims the name)."""
    if args.resume:
        return Path(args.resume)
    if args.experiment:
        _check_new_experiment_dir(args)
        path = Path(args.output) / args.experiment
        with _writing(path):
            path.mkdir(parents=True, exist_ok=True)
        return path
    base = '-'.join([time.strftime('%Y%m%d-%H%M%S'), args.model.replace('/', '_'), str(data_config['input_size'][-1])])
    with _writing(Path(args.output)):
        Path(args.output).mkdir(parents=True, exist_ok=True)
    for i in range(10000):
        path = Path(args.output) / (base if i == 0 else f'{base}-{i}')
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise RunOutputError(_write_error_text(path, e)) from None
    raise TrainInputError(f'no free run folder name under {args.output}; pass --experiment NAME')


def _claim_run_folder(lock: _RunFolderLock, path: Path, args) -> None:
    """Own the run folder ``path`` (or stop: another trainer does), then clear what earlier writers left there."""
    lock.acquire(path, resume=bool(args.resume))
    with _writing(path):
        if args.force and not args.resume:
            # the old weights' eval report and plots go too
            for name in RUN_FILES + ('eval_report.json', 'confusion_matrix.png', 'per_class_accuracy.png',
                                     'surprise_maps.png'):
                (path / name).unlink(missing_ok=True)
            for stale in path.glob('.*.tmp'):   # half-written files of an interrupted write
                stale.unlink(missing_ok=True)
        # (the temp files of killed writes in a folder that existed went when _train_or_evaluate locked it)


def _shared_experiment_dir(args, data_config, lock: Optional[_RunFolderLock] = None) -> Optional[Path]:
    """Rank 0 creates and claims the run folder; other ranks learn its name (they write only test dumps there)."""
    path = _experiment_dir(args, data_config) if args.rank == 0 else None
    if path is not None and lock is not None:
        _claim_run_folder(lock, path, args)
    if args.distributed:
        names = [str(path) if path is not None else None]
        torch.distributed.broadcast_object_list(names, src=0)
        path = Path(names[0]) if args.dump_rank_weights or args.rank == 0 else None
    return path


def _check_args(args) -> None:
    """Checks that need no data, model or process group; every failure is a :class:`TrainInputError`."""
    problem = device_problem(args.device)
    if problem:
        where = f' (from {Path(args.resume) / run_record.RECORD_NAME})' if args.resume else ''
        raise TrainInputError(problem.replace(f'--device {args.device}', f'--device {args.device}{where}', 1))
    for flag, value in (('--img-size', args.img_size), *(('--input-size', v) for v in args.input_size or ())):
        if value is not None and value < 1:
            raise TrainInputError(f'{flag} {value}: must be at least 1 (an image size in pixels)')
    if args.workers is not None and args.workers < 0:
        raise TrainInputError(f'-j/--workers {args.workers}: must be 0 (load in the training process) or more')
    if not (args.eval_only or args.resume) and os.path.exists(args.output) and not os.path.isdir(args.output):
        raise TrainInputError(f'--output {args.output} is a file, not a folder; pass a folder for the runs')
    if args.data_dir and not os.path.isdir(args.data_dir):
        raise TrainInputError(f'data directory not found: {args.data_dir}; check --data-dir')
    if args.data_dir and args.dataset.strip().lower().replace('_', '-') in tdata.BUILTIN_DATASETS:
        raise TrainInputError(f'dataset {args.dataset!r} is built in and reads no data directory; to train on the '
                              f'image folder {args.data_dir}, pass --dataset "" (or no --dataset)')
    if problem := unknown_model(args.model):
        raise TrainInputError(problem)
    if args.pretrained_path and not args.resume and not os.path.isfile(args.pretrained_path):
        raise TrainInputError(f'--pretrained-path not found: {args.pretrained_path}')
    for flag, value in (('--epochs', args.epochs), ('--batch-size', args.batch_size),
                        ('--validation-batch-size', args.validation_batch_size),
                        ('--grad-accum-steps', args.grad_accum_steps)):
        if value is not None and value < 1:
            raise TrainInputError(f'{flag} {value}: must be at least 1')
    if args.freeze_epochs < 0 or args.freeze_epochs > args.epochs:
        raise TrainInputError(f'--freeze-epochs {args.freeze_epochs} must be between 0 and --epochs {args.epochs}')
    if args.backbone_lr_scale < 0:
        raise TrainInputError('--backbone-lr-scale must be >= 0')
    if args.resume and not os.path.isdir(args.resume):
        raise TrainInputError(f'--resume {args.resume}: not a directory; pass OUTPUT/EXPERIMENT of the run')
    if not args.eval_only:
        _check_new_experiment_dir(args)


def _run_args(args) -> Dict[str, Any]:
    """The arguments that describe the run (what args.yaml and the run record hold)."""
    d = {k: v for k, v in vars(args).items()
         if k not in _RUN_ONLY_ARGS + ('rank', 'world_size', 'local_rank', 'distributed', 'data')}
    d['device'] = str(d.get('device')) if d.get('device') is not None else None
    return d


def _result_text(summary: Dict[str, Any]) -> str:
    """``top1 .. (step 0: ..), best ..`` with whatever a run measured (nothing without an evaluation split)."""
    if summary.get('final_top1') is None:
        return 'no evaluation (--val-split is empty)'
    s0 = summary.get('step0_top1')
    return (f'top1 {summary["final_top1"]:.2f}' + (f' (step 0: {s0:.2f})' if s0 is not None else '')
            + f', best {summary.get("best_top1")}')


def _finished_summary(trainer: 'Trainer', run_dir: Path) -> Optional[Dict[str, Any]]:
    """The saved summary of a resumed run that already finished (final weights and results.json written)."""
    if trainer.start_epoch < trainer.num_epochs or trainer.start_step:
        return None
    results, weights = run_dir / 'results.json', run_dir / 'model.safetensors'
    if not (results.is_file() and weights.is_file()):
        return None  # the last checkpoint was written but not the final files: fit() writes them
    try:
        summary = json.loads(results.read_text())
    except (OSError, ValueError):
        return None
    summary.update(interrupted=False, checkpoint=str(weights), output_dir=str(run_dir))
    if trainer.is_primary:
        _logger.info(f'{run_dir} is already finished ({trainer.num_epochs} epochs): {_result_text(summary)}, '
                     f'weights {weights}; nothing to do (start a new run to train further)')
    return summary


def run(args) -> Dict[str, Any]:
    """Train (or evaluate) as ``args`` says; raises :class:`TrainInputError` for bad input before any work (a run
    folder in use by another trainer included) and :class:`RunOutputError` when a run file cannot be written."""
    if args.device is None:
        args.device = default_device()
    _resolve_dataset(args)
    _check_args(args)  # what is cheap to validate, before touching processes or data

    device = init_distributed_device(args)
    if args.workers is None:
        args.workers = _default_workers()
    if args.rank == 0:
        threads = torch.get_num_threads()
        hint = '' if threads == 1 or os.environ.get('OMP_NUM_THREADS') else \
            ' (set OMP_NUM_THREADS=1 on a machine shared with other jobs)'
        _logger.info(f'torch threads: {threads}{hint}')
    lock = _RunFolderLock()
    try:
        return _train_or_evaluate(args, device, lock)
    finally:
        lock.release()


def _train_or_evaluate(args, device, lock: _RunFolderLock) -> Dict[str, Any]:
    """:func:`run` after the argument checks; rank 0 owns the run folder through ``lock`` before it reads or
    writes there."""
    existing = Path(args.resume) if args.resume else Path(args.output) / args.experiment if args.experiment else None
    if args.rank == 0 and not args.eval_only and existing is not None and existing.is_dir():
        # Early, so a second trainer stops before loading data, and no checkpoint is read while another writes it.
        lock.acquire(existing, resume=bool(args.resume))
        _remove_orphan_temps(existing)
    # The same seed on every rank while the model is built, so randomly initialised parameters (and the EMA
    # copy made from them) agree before DDP's broadcast; each rank then reseeds for its own mixup/drop-path draws.
    random_seed(args.seed, 0)

    dataset_train = None if args.eval_only else _create_dataset(args, args.train_split, True, args.train_num_samples)
    dataset_eval = _create_dataset(args, args.val_split, False, args.val_num_samples) if args.val_split else None
    ref = dataset_train if dataset_train is not None else dataset_eval
    if ref is None:
        raise TrainInputError('--eval-only needs an evaluation split; set --val-split')
    label_names = list(getattr(ref, 'label_names', None) or [])
    if not label_names:
        raise TrainInputError(f'dataset {args.dataset!r} has no label names; use a dataset with a class-label column')
    if args.num_classes is not None and args.num_classes != len(label_names):
        raise TrainInputError(f'--num-classes {args.num_classes} disagrees with the dataset, which has '
                              f'{len(label_names)} classes; drop --num-classes or fix it')
    args.num_classes = len(label_names)

    resume_pair = None
    if args.resume:
        resume_pair = _find_resume_pair(Path(args.resume))
        model, model_kwargs = _model_from_run(args, resume_pair[0])
    else:
        model_kwargs = _model_kwargs(args, args.num_classes)
        model = _create_model(args, model_kwargs)
        _zero_head_for_other_classes(args, model, label_names)
        # loaded weights only (a resumed run's were checked with its checkpoint pair, random ones need no check)
        if args.pretrained or args.pretrained_path:
            source = f'--pretrained-path {args.pretrained_path}' if args.pretrained_path else f'model {args.model}'
            if problem := _non_finite_problem(model.state_dict(), source):
                raise TrainInputError(problem)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.rank:
        random_seed(args.seed, args.rank)  # rank 0 keeps its stream: single-process runs are unchanged
    data_config = resolve_data_config(vars(args), model=model, verbose=False)
    _check_input_size(args, model, data_config)
    if args.lr is None:
        global_batch = args.batch_size * args.world_size * args.grad_accum_steps  # per update, as in timm
        scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
        ratio = global_batch / args.lr_base_size
        args.lr = args.lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)
    if args.rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        roles = {r: sum(p.numel() for _, p in params) for r, params in split_parameters(model).items()}
        _logger.info(f'model {args.model}: {n_params / 1e6:.2f}M params '
                     f'({", ".join(f"{k} {v / 1e6:.2f}M" for k, v in roles.items())}); '
                     f'data {data_config["input_size"]}, {args.num_classes} classes')

    if not (args.pretrained or args.pretrained_path or args.resume) and args.backbone_lr_scale != 1 and args.rank == 0:
        _logger.warning(f'the backbone starts from random weights but trains at {args.backbone_lr_scale}x the base '
                        f'LR (--backbone-lr-scale); pass --backbone-lr-scale 1 to train it from scratch')
    loader_train = _train_loader(args, dataset_train, data_config) if dataset_train is not None else None
    loader_eval = _eval_loader(args, dataset_eval, data_config, device) if dataset_eval is not None else None

    if args.eval_only:
        metrics = _evaluate(model, loader_eval, args, device)
        if args.rank == 0:
            _logger.info(f'eval {args.model}: top1 {metrics["top1"]:.2f} top5 {metrics["top5"]:.2f} '
                         f'loss {metrics["loss"]:.4f}')
        return dict(output_dir=None, checkpoint=None, best_top1=metrics['top1'], final=metrics,
                    final_top1=metrics['top1'], step0_top1=metrics['top1'], interrupted=False)

    # The Trainer builds the optimizer, scheduler and EMA (and so rejects a bad --opt or --sched) before the
    # run folder exists; resuming a finished run returns here without touching a file.
    trainer = Trainer(args, model, model_kwargs, label_names, data_config, loader_train, loader_eval, device,
                      output_dir=None)
    if args.resume:
        trainer.load_checkpoint(args.resume, resume_pair)
        done = _finished_summary(trainer, Path(args.resume))
        if done is not None:
            if args.distributed:
                torch.distributed.destroy_process_group()
            return done
    output_dir = _shared_experiment_dir(args, data_config, lock)
    if args.rank == 0:
        # A resumed run keeps its record (the versions it started with); a new run starts one.
        run_args = _run_args(args)
        trainer.record = (run_record.RunRecord.load(output_dir) if args.resume else None) or run_record.RunRecord.new()
        trainer.record.args = run_args
        with _writing(output_dir, output_dir):
            ckpt.atomic_write_bytes(output_dir / run_record.ARGS_NAME, yaml.safe_dump(run_args).encode())
            ckpt.atomic_write_bytes(output_dir / ckpt.CONFIG_NAME, trainer.config_text().encode())
            trainer.record.save(output_dir)
    trainer.output_dir = output_dir
    summary = trainer.fit()
    if args.rank == 0:
        if summary['interrupted']:
            _logger.warning(f'stopped: resumable checkpoint in {output_dir}; continue with '
                            f'titans-timm-train --resume {output_dir}')
        else:
            _logger.info(f'done: {_result_text(summary)}, weights {summary["checkpoint"]}')
    if args.distributed:
        torch.distributed.destroy_process_group()
    return summary


def main(argv: Optional[List[str]] = None):
    """Train from command-line style ``argv`` and return the summary dict (``output_dir``, ``checkpoint``,
    ``best_top1``, ``final_top1``, ``step0_top1``, ``interrupted``). Bad input or a failed write prints one
    ``error: ...`` line and raises ``SystemExit(2)``. Without ``argv`` (the console script) it returns the exit
    status: 0, or 130 when stopped by Ctrl-C."""
    as_cli = argv is None
    if as_cli:
        argv = sys.argv[1:]
    _setup_logging()
    try:
        args = parse_args(argv)
        summary = run(args)
    except (TrainInputError, RunOutputError, ckpt.CheckpointError) as e:
        print(f'error: {e}', file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except FloatingPointError as e:
        print(f'error: {e}; the last checkpoint written (if any) is resumable with --resume DIR', file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print('error: interrupted; the last checkpoint written (if any) is still resumable with --resume DIR',
              file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    if as_cli:
        return EXIT_INTERRUPTED if summary.get('interrupted') else 0
    return summary


def cli() -> None:
    """Console-script entry point: ``sys.exit(main())``."""
    sys.exit(main())


if __name__ == '__main__':
    cli()
