"""Evaluate a titans-timm (or any timm) classifier: accuracy report, confusion matrix, surprise maps.

``titans-timm-eval`` / :func:`main` evaluates a run folder of ``titans-timm-train`` (``--checkpoint RUN``), any
state dict in a named architecture (``--model NAME --checkpoint FILE``, as timm's validate.py), or a timm model
(``--model local-dir:DIR`` / ``hf-hub:ORG/NAME`` / a name with ``--pretrained``), on a dataset given with the
training CLI's dataset flags, a recipe (``-c``) or the run's record. Images are prepared with the model's own data
config (``resolve_data_config`` + ``create_transform``, eval mode).

It reports top-1/top-5 accuracy (percent), mean cross-entropy, per-class accuracy, the confusion matrix and
throughput in ``OUTPUT/eval_report.json`` (also added to the run's record), with the sha256 of the weights and the
data it evaluated. ``--visualize`` adds ``confusion_matrix.png`` and ``per_class_accuracy.png``;
``--surprise-maps N`` adds pages of per-patch surprise heatmaps (Titans' inner associative loss, eq. 12) at each
memory block. The numbers are written before any picture is drawn. docs/evaluation.md has the details.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import create_transform, resolve_data_config
from tqdm import tqdm

from titans_timm.cli import EXIT_BAD_INPUT, Parser, unknown_model
from titans_timm import __version__
from titans_timm import data as tdata
from titans_timm.checkpoint import CheckpointError, atomic_write_bytes, load_model
from titans_timm.devices import default_device, device_problem
from titans_timm.run_record import RunRecord, RunRecordError, file_sha256, read_args, run_folder
from titans_timm.vit import memory_modules

__all__ = [
    'EvalError', 'build_parser', 'report_data', 'load_model_for_eval', 'evaluate_model', 'compute_metrics',
    'plot_confusion_matrix', 'plot_per_class_accuracy', 'surprise_maps', 'plot_surprise_maps',
    'confusion_figsize', 'per_class_figsize', 'surprise_figsize', 'surprise_page_name', 'PLOT_DPI',
    'SURPRISE_ROWS_PER_PAGE', 'SURPRISE_MAPS_WARN_ABOVE', 'parse_args', 'run', 'main',
    'cli',
]

REPORT_NAME = 'eval_report.json'
CONFUSION_NAME = 'confusion_matrix.png'
PER_CLASS_NAME = 'per_class_accuracy.png'
SURPRISE_NAME = 'surprise_maps.png'
# Images per surprise-map page (a 16-row page is ~3,600 px tall at PLOT_DPI), and the --surprise-maps count above
# which the CLI warns: 16 pages already take minutes to draw and more than anyone reads.
SURPRISE_ROWS_PER_PAGE = 16
SURPRISE_MAPS_WARN_ABOVE = 256
PLOT_DPI = 100
# Report entries the run record leaves to eval_report.json: they grow with the square of the class count.
_NOT_RECORDED = ('confusion_matrix', 'per_class', 'files')


class EvalError(Exception):
    """Bad input for the evaluator (missing model, wrong dataset, ...); the message says what to do."""


# ----------------------------------------------------------------------------------------------------
# Command line

def build_parser() -> argparse.ArgumentParser:
    """The ``titans-timm-eval`` argument parser (dataset flags named as in ``titans-timm-train``)."""
    parser = Parser(
        prog='titans-timm-eval',
        description='Evaluate a titans-timm checkpoint or a timm model: top-1/top-5, loss, per-class '
                    'accuracy, img/s, confusion matrix and memory surprise maps.')
    parser.add_argument('-c', '--config', default=None, metavar='YAML',
                        help='training recipe or a run\'s args.yaml: its dataset keys (dataset, data_dir, val_split, '
                             'val_num_samples, input_key, target_key, validation_batch_size/batch_size, workers) '
                             'become defaults (over those of the --checkpoint run\'s record); other keys are ignored')
    src = parser.add_argument_group('model')
    src.add_argument('--checkpoint', metavar='RUN', default=None,
                     help='run folder written by titans-timm-train, or its model.safetensors (with --model NAME: any '
                          'state dict for that architecture); the run\'s validation data are the dataset defaults')
    src.add_argument('--model', metavar='NAME', default=None,
                     help='timm model name: local-dir:DIR, hf-hub:ORG/NAME, or a registered name (with '
                          '--pretrained or --checkpoint)')
    src.add_argument('--pretrained', action='store_true', default=False,
                     help='load pretrained weights for a plain --model name (implied for local-dir:/hf-hub:)')
    src.add_argument('--num-classes', type=int, default=None, metavar='N',
                     help='number of classes, for --model NAME --checkpoint FILE with a plain state dict')
    data = parser.add_argument_group('dataset (as in titans-timm-train)')
    data.add_argument('--dataset', default=None,
                      help="dataset name: the built-in 'fashion-mnist-mini' (default), hf:ORG/NAME, hfds/ORG/NAME, "
                           "or empty for an image folder given by --data-dir")
    data.add_argument('--data-dir', default=None, metavar='DIR', help='dataset root folder')
    data.add_argument('--split', '--val-split', dest='split', default='validation',
                      help='dataset split to evaluate (default: validation)')
    data.add_argument('--input-key', default=None, metavar='NAME',
                      help='image column of a HF dataset (as in titans-timm-train; default: the dataset\'s own)')
    data.add_argument('--target-key', default=None, metavar='NAME',
                      help='label column of a HF dataset (as in titans-timm-train; default: the dataset\'s own)')
    data.add_argument('-b', '--batch-size', type=int, default=64, metavar='N', help='batch size (default: 64)')
    data.add_argument('--img-size', type=int, default=None, metavar='N',
                      help='input image size (default: the model\'s own)')
    data.add_argument('-j', '--workers', type=int, default=2, metavar='N', help='data loading workers (default: 2)')
    data.add_argument('--num-samples', '--val-num-samples', dest='num_samples', type=int, default=None, metavar='N',
                      help='evaluate N samples of the split (the class-balanced subset training uses)')
    run = parser.add_argument_group('run')
    run.add_argument('--device', default=None, help='torch device (default: cuda if available, else cpu)')
    run.add_argument('--amp', action='store_true', default=False,
                     help='bfloat16 autocast (on CPU too); metrics are computed in float32')
    run.add_argument('--output', default=None, metavar='DIR',
                     help='folder for eval_report.json and plots (default: next to --checkpoint, '
                          'else output/eval/<model>)')
    run.add_argument('--visualize', action='store_true', default=False,
                     help='write confusion_matrix.png (row-normalised) and per_class_accuracy.png')
    run.add_argument('--surprise-maps', type=int, default=0, metavar='N',
                     help=f'write surprise maps of the first N images (memory models only), '
                          f'{SURPRISE_ROWS_PER_PAGE} images per page: surprise_maps.png, surprise_maps_002.png, '
                          f'...; above {SURPRISE_MAPS_WARN_ABOVE} a warning, since every page is a forward pass '
                          f'and seconds of drawing and hundreds of pages are more than anyone reads')
    run.add_argument('--surprise-blocks', default=None, metavar='I,J',
                     help='block indices for the surprise maps (default: every memory block)')
    run.add_argument('--no-progress', action='store_true', default=False, help='no progress bar')
    return parser


# Recipe (YAML, timm train.py dests) keys that mean the same thing for evaluation, in priority order.
_RECIPE_KEYS = (
    ('dataset', 'dataset'), ('data_dir', 'data_dir'), ('val_split', 'split'), ('val_num_samples', 'num_samples'),
    ('input_key', 'input_key'), ('target_key', 'target_key'), ('batch_size', 'batch_size'), ('validation_batch_size', 'batch_size'), ('workers', 'workers'),
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse evaluator arguments. Dataset defaults come from the run record of a ``--checkpoint`` run (the data it
    validated on), then from ``-c YAML`` (a training recipe or a run's args.yaml); flags win."""
    parser = build_parser()
    args = parser.parse_args(argv)
    folder = run_folder(args.checkpoint) if args.checkpoint else None
    defaults = {}
    try:
        record = RunRecord.load(folder) if folder else None
        for recipe in ([record.args] if record else []) + ([read_args(args.config)] if args.config else []):
            for key, dest in _RECIPE_KEYS:  # later keys win: validation_batch_size over batch_size
                if recipe.get(key) is not None and (recipe[key] != '' or key == 'dataset'):
                    defaults[dest] = recipe[key]
    except RunRecordError as e:
        raise EvalError(f'{e}; pass a YAML training recipe with -c') from None
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# Model and data

def load_model_for_eval(
        checkpoint: Optional[str] = None,
        model_name: Optional[str] = None,
        pretrained: bool = False,
        img_size: Optional[int] = None,
        num_classes: Optional[int] = None,
) -> Tuple[nn.Module, dict]:
    """Build the model to evaluate and describe where it came from.

    Args:
        checkpoint: a run folder of titans-timm-train or a weights file that names its architecture, or, with
            ``model_name``, any safetensors / ``.pth`` state dict for that architecture (as timm's validate.py).
        model_name: a timm name: ``local-dir:DIR``, ``hf-hub:ORG/NAME`` or a registered name.
        pretrained: load pretrained weights for a registered name (always on for ``local-dir:``/``hf-hub:``).
        img_size: build the model for this input size instead of its own.
        num_classes: build the model with this many classes (for state dicts without metadata).

    Returns:
        ``(model, info)``; ``info`` holds ``source``, ``architecture``, ``model_args``, ``label_names`` (or
        ``None``) and, for ``checkpoint``, ``weights`` (the file read).

    Raises:
        EvalError: no source, a missing, corrupt or non-fitting checkpoint, an unknown model.
    """
    if checkpoint is None and model_name is None:
        raise EvalError('nothing to evaluate: pass --checkpoint FILE (from titans-timm-train) or --model NAME '
                        '(local-dir:DIR, hf-hub:ORG/NAME)')
    overrides = {}
    if img_size is not None:
        overrides['img_size'] = img_size
    if num_classes is not None:
        overrides['num_classes'] = num_classes
    if checkpoint is not None:
        if model_name is not None:
            if model_name.startswith(('hf-hub:', 'local-dir:')):
                raise EvalError('--checkpoint loads weights into a registered architecture; with hf-hub:/'
                                'local-dir: models drop --checkpoint (their weights come with them)')
            if problem := unknown_model(model_name):
                raise EvalError(problem)
            overrides['architecture'] = model_name
        if not os.path.exists(checkpoint):
            raise EvalError(f'checkpoint {checkpoint!r} not found; pass the run folder titans-timm-train wrote '
                            f'(OUTPUT/EXPERIMENT) or its model.safetensors')
        try:
            model, meta = load_model(checkpoint, **overrides)
        except CheckpointError as e:
            raise EvalError(str(e)) from None
        meta = dict(meta or {})
        cfg = meta.get('pretrained_cfg') or {}
        info = dict(
            source=os.path.abspath(checkpoint),
            architecture=meta.get('architecture'),
            model_args=meta.get('model_args'),
            label_names=meta.get('label_names') or cfg.get('label_names'),
            weights=meta['path'],
        )
        return model, info

    is_hub = model_name.startswith(('hf-hub:', 'local-dir:'))
    if model_name.startswith('local-dir:'):
        folder = model_name[len('local-dir:'):]
        if not os.path.isdir(folder):
            raise EvalError(f'model folder {folder!r} not found; local-dir: needs a folder with config.json '
                            f'and model.safetensors (as written by titans-timm-push --dry-run or save_for_hf)')
    elif problem := unknown_model(model_name):
        raise EvalError(f'{problem} (or local-dir:DIR, hf-hub:ORG/NAME)')
    try:
        model = timm.create_model(model_name, pretrained=is_hub or pretrained, **overrides)
    except (OSError, RuntimeError, ValueError) as e:
        # Hub errors (offline, missing repo) and state-dict mismatches come as long messages; keep the first line.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalError(f'could not load {model_name!r}: {first}') from None
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    info = dict(
        source=model_name,
        architecture=cfg.get('architecture') or model_name,
        model_args=None,
        label_names=cfg.get('label_names'),
    )
    return model, info


def _create_eval_dataset(args: argparse.Namespace):
    """The dataset named by the training flags (``--num-samples``: the same class-balanced subset training
    takes), without a transform yet."""
    name = _dataset_name(args)
    if args.num_samples is not None and args.num_samples < 1:
        raise EvalError(f'--num-samples must be at least 1, got {args.num_samples}')
    try:
        # The image/label columns exactly as titans-timm-train passes them (an empty string means the default).
        return tdata.create_dataset(name, root=args.data_dir, split=args.split, num_samples=args.num_samples,
                                    image_column=args.input_key or None, label_column=args.target_key or None)
    except tdata.DataError as e:
        raise EvalError(str(e)) from None


def _label_names(dataset) -> List[str]:
    names = getattr(dataset, 'label_names', None)
    if not names:
        raise EvalError('the dataset has no label names; use a dataset from titans_timm.data.create_dataset')
    return [str(n) for n in names]


def _data_config(model: nn.Module, img_size: Optional[int]) -> dict:
    args = {} if img_size is None else dict(img_size=img_size)
    return resolve_data_config(args, model=model)


def _make_loader(dataset, data_config: dict, batch_size: int, workers: int):
    """Eval transform from the model's data config (as timm's validate.py), ordered loader."""
    dataset.transform = create_transform(**data_config, is_training=False)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, drop_last=False)


def _check_classes(model: nn.Module, info: dict, label_names: Sequence[str]):
    num_classes = getattr(model, 'num_classes', None)
    if num_classes is not None and num_classes != len(label_names):
        raise EvalError(f'the model predicts {num_classes} classes but the dataset has {len(label_names)}; '
                        f'evaluate on the dataset it was trained on')
    trained = info.get('label_names')
    if trained and list(map(str, trained)) != list(label_names):
        raise EvalError(f'the model was trained on classes {list(trained)[:5]}... but the dataset has '
                        f'{list(label_names)[:5]}...; evaluate on the dataset it was trained on')


# ----------------------------------------------------------------------------------------------------
# Metrics

def compute_metrics(confusion: torch.Tensor, loss_sum: float, top5_correct: int, label_names: Sequence[str],
                    topk: int = 5) -> dict:
    """Accuracy numbers from a confusion matrix (rows: true class, columns: predicted class).

    Returns top-1 / top-k in percent, mean loss, and per-class accuracy (percent; ``None`` for a class
    with no sample).
    """
    confusion = confusion.to(torch.long)
    total = int(confusion.sum())
    correct = int(confusion.diag().sum())
    counts = confusion.sum(1)
    per_class = []
    for i, name in enumerate(label_names):
        n = int(counts[i])
        per_class.append(dict(
            index=i, name=str(name), count=n,
            accuracy=(100.0 * int(confusion[i, i]) / n) if n else None))
    return dict(
        num_samples=total,
        top1=100.0 * correct / max(total, 1),
        top5=100.0 * top5_correct / max(total, 1),
        topk=topk,
        loss=loss_sum / max(total, 1),
        per_class=per_class,
    )


@torch.inference_mode()
@torch.random.fork_rng(devices=[])
def evaluate_model(
        model: nn.Module,
        loader: Iterable,
        num_classes: int,
        label_names: Optional[Sequence[str]] = None,
        device: Union[str, torch.device] = 'cpu',
        amp: bool = False,
        progress: bool = True,
        *,
        amp_dtype: torch.dtype = torch.bfloat16,
        channels_last: bool = False,
        distributed: bool = False,
        desc: str = 'eval',
        timing: bool = True,
) -> dict:
    """Run ``model`` over ``loader`` in eval mode and return the metrics; the one evaluation loop of the
    trainer and the evaluator.

    Returns a dict with ``top1``, ``top5`` (percent; top-k is clipped to the class count for fewer than
    5 classes), ``loss`` (mean cross-entropy), ``per_class`` (list of ``{index, name, count, accuracy}``),
    ``confusion_matrix`` (list of lists, rows true class, columns prediction), ``num_samples``,
    ``img_per_sec`` (model forward time only) and ``elapsed_s`` (whole pass). With ``distributed`` every
    process evaluates its shard and the counts are summed over processes, so all ranks return the same numbers.
    ``timing=False`` skips the per-batch CUDA synchronisation that ``img_per_sec`` needs (then ``None``).
    The torch RNG is left as it was: a loader's iterator seeds its workers from it, which a resumed training
    run would otherwise notice.
    """
    label_names = list(label_names) if label_names is not None else [str(i) for i in range(num_classes)]
    k = min(5, num_classes)
    device = torch.device(device)
    model.eval().to(device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, top-k hits
    forward_s = 0.0
    start = time.perf_counter()
    for images, target in tqdm(loader, desc=desc, unit='batch', disable=not progress, leave=False):
        if int(target.max()) >= num_classes or int(target.min()) < 0:   # before the copy: no device sync
            raise EvalError(f'dataset label {int(target.max())} is outside the model\'s {num_classes} '
                            f'classes; evaluate on the dataset the model was trained on')
        images, target = images.to(device), target.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            logits = model(images)
        if timing and device.type == 'cuda':
            torch.cuda.synchronize()
        forward_s += time.perf_counter() - t0
        logits = logits.float()
        pred = logits.topk(k, dim=1).indices  # [B, k]
        sums[0] += F.cross_entropy(logits, target, reduction='sum')
        sums[1] += (pred == target[:, None]).any(1).sum()
        confusion += torch.bincount(target * num_classes + pred[:, 0], minlength=num_classes * num_classes)
    if distributed:
        torch.distributed.all_reduce(confusion)
        torch.distributed.all_reduce(sums)
    elapsed = time.perf_counter() - start
    confusion = confusion.view(num_classes, num_classes).cpu()
    metrics = compute_metrics(confusion, float(sums[0]), int(sums[1]), label_names, topk=k)
    metrics.update(
        confusion_matrix=confusion.tolist(),
        img_per_sec=metrics['num_samples'] / forward_s if timing and forward_s > 0 else None,
        elapsed_s=elapsed,
    )
    return metrics


# ----------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg backend: no display needed)

def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def confusion_figsize(num_classes: int) -> Tuple[float, float]:
    """Figure size in inches of :func:`plot_confusion_matrix` (saved at ``PLOT_DPI``)."""
    side = min(max(6.0, 2.5 + 0.3 * num_classes), 20.0)
    return side + 1.0, side  # extra width for the colour bar


def per_class_figsize(num_classes: int) -> Tuple[float, float]:
    """Figure size in inches of :func:`plot_per_class_accuracy` (saved at ``PLOT_DPI``)."""
    return min(max(6.0, 2.0 + 0.25 * num_classes), 24.0), 5.0


def _tick_plan(num_classes: int) -> Tuple[Optional[float], int]:
    """(font size, stride) for class tick labels: every name up to 60 classes, then numbered every n-th."""
    if num_classes <= 60:
        return max(5.0, min(10.0, 300.0 / max(num_classes, 1))), 1
    return None, int(math.ceil(num_classes / 20))


def plot_confusion_matrix(confusion, label_names: Sequence[str], path: str, title: Optional[str] = None) -> str:
    """Save a row-normalised confusion matrix as a PNG and return its path.

    Rows are true classes, columns predictions, each row divided by its count (rows without samples stay
    0). Cells carry their value up to 15 classes; class names label the axes up to 60 classes, beyond
    that every n-th class index is shown so 200 classes stay legible.
    """
    plt = _pyplot()
    cm = torch.as_tensor(confusion, dtype=torch.float64)
    n = cm.shape[0]
    norm = cm / cm.sum(1, keepdim=True).clamp_min(1)
    fig, ax = plt.subplots(figsize=confusion_figsize(n), dpi=PLOT_DPI, layout='constrained')
    im = ax.imshow(norm.numpy(), cmap='Blues', vmin=0.0, vmax=1.0, interpolation='nearest')
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label='fraction of the true class')
    fontsize, stride = _tick_plan(n)
    if stride == 1:
        ax.set_xticks(range(n), [str(s) for s in label_names], rotation=90, fontsize=fontsize)
        ax.set_yticks(range(n), [str(s) for s in label_names], fontsize=fontsize)
    else:
        ticks = list(range(0, n, stride))
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=11)
        ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=11)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                v = float(norm[i, j])
                if v > 0:
                    ax.text(j, i, f'{v:.2f}', ha='center', va='center', fontsize=8,
                            color='white' if v > 0.5 else 'black')
    label_size = 10 if stride == 1 else 13  # big figures are viewed scaled down
    ax.set_xlabel('predicted class' if stride == 1 else 'predicted class index', fontsize=label_size)
    ax.set_ylabel('true class' if stride == 1 else 'true class index', fontsize=label_size)
    ax.set_title(title or 'Confusion matrix (row-normalised)', fontsize=label_size + 2)
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


def plot_per_class_accuracy(per_class: Sequence[dict], path: str, overall: Optional[float] = None,
                            title: Optional[str] = None) -> str:
    """Save a bar chart of per-class accuracy (``per_class`` entries as in the eval report) as a PNG.

    A dashed line marks ``overall`` (top-1). Class names label the bars up to 60 classes, class indices
    every n-th bar beyond that.
    """
    plt = _pyplot()
    n = len(per_class)
    acc = [float(c['accuracy']) if c['accuracy'] is not None else 0.0 for c in per_class]
    fig, ax = plt.subplots(figsize=per_class_figsize(n), dpi=PLOT_DPI, layout='constrained')
    colors = ['tab:blue' if c['accuracy'] is not None else 'lightgray' for c in per_class]
    ax.bar(range(n), acc, color=colors, width=0.8)
    if overall is not None:
        ax.axhline(overall, color='tab:red', linestyle='--', linewidth=1, label=f'top-1 {overall:.1f}%')
        ax.legend(loc='upper left', bbox_to_anchor=(1.0, 1.0), fontsize=8)  # outside: bars can reach any height
    fontsize, stride = _tick_plan(n)
    if stride == 1:
        ax.set_xticks(range(n), [str(c['name']) for c in per_class], rotation=60, ha='right', fontsize=fontsize)
    else:
        ticks = list(range(0, n, stride))
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=10)
        ax.set_xlabel('class index')
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0, 100)
    ax.set_ylabel('accuracy (%)')
    ax.set_title(title or 'Per-class accuracy')
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# Surprise maps

def _patch_grid(model: nn.Module, images: torch.Tensor) -> Tuple[int, int]:
    patch_embed = getattr(model, 'patch_embed', None)
    if patch_embed is None:
        raise EvalError('surprise maps need a ViT with a patch_embed (a titans-timm memory model)')
    if hasattr(patch_embed, 'dynamic_feat_size'):
        return tuple(patch_embed.dynamic_feat_size(tuple(images.shape[-2:])))
    return tuple(patch_embed.grid_size)


def surprise_maps(
        model: nn.Module,
        images: torch.Tensor,
        blocks: Optional[Sequence[int]] = None,
        return_logits: bool = False,
):
    """Per-patch surprise of the memory at chosen blocks, from one ordinary forward pass.

    The surprise is the memory's ``stats['surprise']``: the per-token inner loss ``||M(k_t) - v_t||^2`` (Titans
    eq. 12) at the weights the token was written with, received by a stats hook on each memory
    (``TitansMemory.register_stats_hook``, removed afterwards); the logits are those of a forward without hooks.
    MAC's one shared memory is written by each MAC block in turn, so block ``l``'s map is its tokens' surprise
    against the memory the earlier blocks left. Prefix tokens are dropped (the last ``H' * W'`` tokens are kept).

    Args:
        model: a titans-timm model (anything :func:`titans_timm.vit.memory_modules` finds memory in).
        images: normalised images ``[B, C, H, W]`` as the model expects them.
        blocks: block indices to keep (default: every memory block).
        return_logits: also return the model output of that forward.

    Returns:
        ``{block_index: Tensor[B, H', W']}`` in block order (float32, CPU), or ``(maps, logits)``.

    Raises:
        EvalError: the model has no memory, its memory is never written (``mlp``: no surprise), or ``blocks``
            names a block without memory.
    """
    found = list(memory_modules(model))
    if not found:
        raise EvalError(f'{type(model).__name__} has no memory modules, so it has no surprise to map; use a '
                        f'memory model such as vit_tiny_mag_simple')
    if not all(m.writes for _, m in found):
        raise EvalError('the mlp memory is persistent (never written at test time), so it has no surprise to '
                        'map; use a model with simple or advanced memory')
    grid_h, grid_w = _patch_grid(model, images)
    num_patches = grid_h * grid_w
    calls: Dict[int, List[torch.Tensor]] = {i: [] for i, _ in found}

    def recorder(block_index):
        def record(memory, stats):
            surprise = stats['surprise']  # [B, N]: every token of one write, prefix tokens first
            calls[block_index].append(surprise[:, -num_patches:].detach().float().cpu())
        return record

    was_training = model.training
    model.eval()
    handles = []
    try:
        for block_index, module in found:
            handles.append(module.register_stats_hook(recorder(block_index)))
        with torch.inference_mode():
            logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    memory_blocks = list(getattr(model, 'memory_blocks', None) or [])
    maps: Dict[int, torch.Tensor] = {}
    for block_index, _ in found:
        got = calls[block_index]
        if not got:
            raise EvalError(f'the memory of block {block_index} reported no surprise for the {num_patches} '
                            f'patches during the forward')
        if len(got) > 1 and len(got) == len(memory_blocks) and len(found) == 1:
            keys = memory_blocks  # one shared memory (MAC) written once per memory block, in depth order
        else:
            keys, got = [block_index], got[-1:]
        for key, surprise in zip(keys, got):
            maps[key] = surprise.reshape(-1, grid_h, grid_w)  # [B, H', W']
    if blocks is not None:
        missing = [b for b in blocks if b not in maps]
        if missing:
            raise EvalError(f'block(s) {missing} carry no memory; memory blocks of this model: {sorted(maps)}')
        maps = {b: maps[b] for b in sorted(set(blocks))}
    maps = dict(sorted(maps.items()))
    return (maps, logits) if return_logits else maps


def surprise_figsize(num_images: int, num_blocks: int, cell_inches: float = 2.2) -> Tuple[float, float]:
    """Figure size in inches of :func:`plot_surprise_maps` (saved at ``PLOT_DPI``)."""
    return (1 + num_blocks) * cell_inches + 0.8, num_images * cell_inches + 0.4  # + colour bar, titles


def plot_surprise_maps(
        images: torch.Tensor,
        maps: Dict[int, torch.Tensor],
        path: str,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        row_titles: Optional[Sequence[str]] = None,
        cell_inches: float = 2.2,
) -> str:
    """Save a grid of surprise heatmaps over the images as a PNG and return its path.

    Rows are images, columns the original image then one column per block: the block's surprise map,
    upsampled (bilinear) to the image size and overlaid on the greyed image. Each block column shares one
    colour scale across its images and has its own colour bar, since surprise magnitudes differ by depth.

    Args:
        images: the normalised model inputs ``[B, C, H, W]``; ``mean``/``std`` undo the normalisation.
        maps: ``{block_index: [B, H', W']}`` from :func:`surprise_maps`.
        row_titles: one caption per image (e.g. true and predicted label).
    """
    plt = _pyplot()
    images = images.detach().float().cpu()
    b, c, h, w = images.shape
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    shown = (images * std_t + mean_t).clamp(0, 1)  # [B, C, H, W] in [0, 1]
    if c == 1:
        shown = shown.expand(-1, 3, -1, -1)
    shown = shown.permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
    grey = shown.mean(-1)  # [B, H, W]
    block_ids = list(maps)
    cols = 1 + len(block_ids)
    # The last column gets room for its colour bar; all figures have a deterministic pixel size.
    fig, axes = plt.subplots(b, cols, figsize=surprise_figsize(b, len(block_ids), cell_inches),
                             dpi=PLOT_DPI, squeeze=False, layout='constrained')
    for j, block_index in enumerate(block_ids, start=1):
        m = maps[block_index].detach().float().cpu()
        up = F.interpolate(m[:, None], size=(h, w), mode='bilinear', align_corners=False)[:, 0]  # [B, H, W]
        vmin, vmax = float(up.min()), float(up.max())
        if vmax <= vmin:
            vmax = vmin + 1e-12
        for i in range(b):
            ax = axes[i, j]
            ax.imshow(grey[i], cmap='gray', vmin=0, vmax=1)
            im = ax.imshow(up[i].numpy(), cmap='inferno', alpha=0.6, vmin=vmin, vmax=vmax)
            if i == 0:
                ax.set_title(f'block {block_index} surprise', fontsize=9)
        fig.colorbar(im, ax=axes[:, j].tolist(), shrink=0.8, pad=0.02, label='surprise')
    for i in range(b):
        axes[i, 0].imshow(shown[i])
        if row_titles is not None:
            axes[i, 0].set_title(str(row_titles[i]), fontsize=8)
        elif i == 0:
            axes[i, 0].set_title('image', fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


def _parse_blocks(text: Optional[str]) -> Optional[List[int]]:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(',') if t.strip()]
    except ValueError:
        raise EvalError(f'--surprise-blocks takes comma-separated block indices like 1,5, got {text!r}') from None


# ----------------------------------------------------------------------------------------------------
# Main

def _default_output(args: argparse.Namespace) -> str:
    if args.checkpoint:
        path = os.path.abspath(args.checkpoint)
        return path if os.path.isdir(path) else os.path.dirname(path)
    name = (args.model or 'model').split(':', 1)[-1].rstrip('/').replace('/', '_').replace(os.sep, '_')
    name = name.lstrip('._') or 'model'
    return os.path.join('output', 'eval', name)


def _check_device(name: Optional[str]) -> str:
    """The device to run on; an unknown or unavailable one is an :class:`EvalError` before any work."""
    if name is None:
        return default_device()
    problem = device_problem(name)
    if problem:
        raise EvalError(problem)
    return name


def _check_output(output: str):
    """Create ``output`` and make sure files can be written there, before the (long) evaluation."""
    try:
        os.makedirs(output, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output, prefix='.write_test_'):
            pass
    except OSError as e:
        raise EvalError(f'cannot write to --output {output!r} ({e.strerror or type(e).__name__}); pass a folder '
                        f'you can write to') from None


def report_data(args: argparse.Namespace) -> dict:
    """What an evaluation with ``args`` evaluates besides the weights (the report's
    :data:`titans_timm.run_record.REPORT_DATA_KEYS`)."""
    return dict(dataset=_dataset_name(args), data_dir=args.data_dir, split=args.split,
                num_samples_requested=args.num_samples, input_key=args.input_key or None,
                target_key=args.target_key or None)


def run(args: argparse.Namespace, on_report: Optional[Callable[[dict], None]] = None) -> dict:
    """Evaluate with parsed arguments (see :func:`build_parser`) and return the report dict.

    ``eval_report.json`` is written as soon as the numbers are known, and ``on_report(report)`` (the CLI's
    summary) is called then, before any picture is drawn: slow or failing plots never cost the evaluation.
    The report is written again with its ``files`` once the pictures are there.
    """
    if args.batch_size < 1:
        raise EvalError(f'-b/--batch-size must be at least 1, got {args.batch_size}')
    if args.surprise_maps < 0:
        raise EvalError(f'--surprise-maps takes a number of images, got {args.surprise_maps}')
    if args.surprise_maps > SURPRISE_MAPS_WARN_ABOVE:
        pages = math.ceil(args.surprise_maps / SURPRISE_ROWS_PER_PAGE)
        print(f'warning: --surprise-maps {args.surprise_maps} is above {SURPRISE_MAPS_WARN_ABOVE}: up to {pages} '
              f'pages of {SURPRISE_ROWS_PER_PAGE} images ({SURPRISE_NAME} to {surprise_page_name(pages)}), each a '
              f'forward pass and seconds of drawing; {SURPRISE_MAPS_WARN_ABOVE} or fewer make a set one can read',
              file=sys.stderr)
    blocks = _parse_blocks(args.surprise_blocks)
    device = _check_device(args.device)
    output = args.output or _default_output(args)
    if args.checkpoint or args.model:  # with neither, loading the model says what to pass
        _check_output(output)

    model, info = load_model_for_eval(args.checkpoint, args.model, args.pretrained, args.img_size,
                                      args.num_classes)
    dataset = _create_eval_dataset(args)
    label_names = _label_names(dataset)
    _check_classes(model, info, label_names)
    data_config = _data_config(model, args.img_size)
    loader = _make_loader(dataset, data_config, args.batch_size, args.workers)

    metrics = evaluate_model(model, loader, len(label_names), label_names, device=device, amp=args.amp,
                             progress=not args.no_progress)
    report = dict(
        model=info['architecture'],
        source=info['source'],
        checkpoint_sha256=file_sha256(info['weights']) if args.checkpoint else None,
        model_args=info['model_args'],
        **report_data(args),
        num_classes=len(label_names),
        label_names=label_names,
        param_count=sum(p.numel() for p in model.parameters()),
        data_config={k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()},
        batch_size=args.batch_size,
        device=str(device),
        amp=bool(args.amp),
        versions=dict(titans_timm=__version__, timm=timm.__version__, torch=torch.__version__),
        date=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
        **metrics,
    )
    files = {}
    report['files'] = files
    report_path = os.path.join(output, REPORT_NAME)
    _write_report(report, report_path)
    report['report_path'] = report_path
    _record(report, run_folder(args.checkpoint) if args.checkpoint else None)
    if on_report is not None:
        on_report(report)
    if not (args.visualize or args.surprise_maps):
        return report
    try:
        if args.visualize:
            title = f'{info["architecture"]} on {report["dataset"]} ({args.split})'
            files['confusion_matrix'] = plot_confusion_matrix(
                metrics['confusion_matrix'], label_names, os.path.join(output, CONFUSION_NAME), title=title)
            files['per_class_accuracy'] = plot_per_class_accuracy(
                metrics['per_class'], os.path.join(output, PER_CLASS_NAME), overall=metrics['top1'], title=title)
        if args.surprise_maps:
            pages = _write_surprise_maps(model, loader, args.surprise_maps, blocks, data_config, label_names,
                                         device, output, progress=not args.no_progress)
            if pages:
                files['surprise_maps'] = pages[0]  # the first page, under the name it always had
                files['surprise_maps_pages'] = pages
    except OSError as e:
        raise EvalError(f'cannot write the plots to {output} ({e.strerror or type(e).__name__}); {report_path} '
                        f'is written; make room there or pass another --output') from None
    _write_report(report, report_path)  # now with the files
    return report


def _write_report(report: dict, path: str):
    """Write ``report`` as JSON to ``path`` atomically: a sweep never reads half a report, and a failed write
    (disk full, read-only file system) leaves an earlier report as it was."""
    data = json.dumps({k: v for k, v in report.items() if k != 'report_path'}, indent=2).encode()
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise EvalError(f'cannot write {path} ({e.strerror or type(e).__name__}); make room there or pass '
                        f'another --output') from None


def _record(report: dict, folder) -> None:
    """Add ``report`` to the record of the run in ``folder`` (nothing for a folder without one)."""
    try:
        record = RunRecord.load(folder) if folder else None
        if record is not None:
            record.add_report({k: v for k, v in report.items() if k not in _NOT_RECORDED})
            record.save(folder)
    except RunRecordError as e:
        raise EvalError(str(e)) from None
    except OSError as e:
        raise EvalError(f'cannot record the report in the run record of {folder} ({e.strerror or type(e).__name__}); '
                        f'{report["report_path"]} is written') from None


def _dataset_name(args: argparse.Namespace) -> str:
    """``--dataset``; without it, as titans-timm-train reads it: a data directory is an image folder (''),
    no directory the built-in set."""
    if args.dataset is not None:
        return args.dataset
    return '' if args.data_dir else tdata.BUILTIN_DATASET


def surprise_page_name(page: int) -> str:
    """File name of page ``page`` (1-based) of the surprise maps: ``surprise_maps.png``, then
    ``surprise_maps_002.png``, ``surprise_maps_003.png``, ..."""
    return SURPRISE_NAME if page == 1 else f'{os.path.splitext(SURPRISE_NAME)[0]}_{page:03d}.png'


def _pages(loader, n: int, rows: int):
    """The first ``n`` ``(images, targets)`` of ``loader`` regrouped in pages of ``rows`` (the last may be shorter)."""
    images, targets, seen = None, None, 0
    for x, y in loader:
        x, y = x[:n - seen], y[:n - seen]
        seen += len(x)
        images = x if images is None else torch.cat([images, x])  # [r, C, H, W], r < rows + batch
        targets = y if targets is None else torch.cat([targets, y])
        while len(images) >= rows or (seen >= n and len(images)):
            yield images[:rows], targets[:rows]
            images, targets = images[rows:], targets[rows:]
        if seen >= n:
            return
    if images is not None and len(images):  # the split has fewer than n images
        yield images, targets


def _write_surprise_maps(model, loader, n, blocks, data_config, label_names, device, output,
                         progress: bool = True) -> List[str]:
    """Surprise maps of the first ``n`` images, one forward and one PNG per page of ``SURPRISE_ROWS_PER_PAGE``
    images; returns the page paths in order."""
    n = min(n, len(loader.dataset)) if hasattr(loader, 'dataset') else n
    paths = []
    with tqdm(total=n, desc='surprise maps', unit='img', disable=not progress, leave=False) as bar:
        for images, targets in _pages(loader, n, SURPRISE_ROWS_PER_PAGE):
            images = images.to(device)
            maps, logits = surprise_maps(model, images, blocks=blocks, return_logits=True)
            pred = logits.float().argmax(1).cpu()
            titles = [f'{label_names[int(t)]} -> {label_names[int(p)]}' for t, p in zip(targets, pred)]
            paths.append(plot_surprise_maps(images, maps, os.path.join(output, surprise_page_name(len(paths) + 1)),
                                            mean=data_config['mean'], std=data_config['std'], row_titles=titles))
            bar.update(len(images))
    return paths


def _print_summary(report: dict):
    print(f'{report["model"]} on {report["dataset"]} ({report["split"]}, {report["num_samples"]} images): '
          f'top-1 {report["top1"]:.2f}%  top-{report["topk"]} {report["top5"]:.2f}%  loss {report["loss"]:.4f}  '
          f'{report["img_per_sec"] or 0:.1f} img/s')
    print(f'report: {report["report_path"]}', flush=True)


def _print_files(report: dict):
    files = report['files']
    for kind, path in files.items():
        if isinstance(path, str):
            print(f'{kind}: {path}')
    pages = files.get('surprise_maps_pages') or []
    if len(pages) > 1:
        print(f'surprise maps: {len(pages)} pages, {pages[0]} to {os.path.basename(pages[-1])}')


def main(argv: Optional[Sequence[str]] = None):
    """``titans-timm-eval``: evaluate a model, write ``OUTPUT/eval_report.json`` (plus plots on request) and return
    the report; without ``argv`` (the console script) return exit status 0. Bad input prints ``error: ...`` and
    raises ``SystemExit(2)``."""
    as_cli = argv is None
    try:
        args = parse_args(sys.argv[1:] if as_cli else list(argv))
        report = run(args, on_report=_print_summary)  # the numbers are printed before any plot is drawn
    except EvalError as e:
        print(f'error: {e}', file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    _print_files(report)
    return 0 if as_cli else report


def cli() -> None:
    """Console-script entry point: ``sys.exit(main())``."""
    sys.exit(main())


if __name__ == '__main__':
    cli()
