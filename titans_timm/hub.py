"""Publish trained titans-timm models to the Hugging Face Hub with a model card, and load them back.

``titans-timm-push RUN ORG/NAME`` (or :func:`push`) uploads a training run folder (``OUTPUT/EXPERIMENT``, or its
``model.safetensors``) as a Hub repository that plain timm loads::

    import timm, titans_timm            # the import registers the titans-timm architectures
    model = timm.create_model('hf-hub:ORG/NAME', pretrained=True)

The repository holds exactly three files:

- ``config.json`` and ``model.safetensors``: the run folder's own, byte for byte. Training writes them in timm's
  layout (:mod:`titans_timm.checkpoint`: ``architecture``, resolved ``model_args``, ``label_names``, a
  ``pretrained_cfg`` with mean/std, input size and crop; safetensors weights with metadata ``{'format': 'pt'}``),
  so nothing is converted: the weights published are the weights trained. An older single-file checkpoint or a
  plain state dict (a ``.pth`` is read with ``torch.load(weights_only=True)``) is written in the same layout;
- ``README.md``: a model card rendered from ``hub_cards/model_card.md`` (``string.Template``):
  YAML front matter (``${card_data}``, huggingface_hub's ``ModelCardData``: ``library_name: timm``, tags,
  datasets, metrics, ``base_model`` = the Hub checkpoint training loaded, when the recipe shows one, license,
  and a ``model-index`` of ``EvalResult`` entries with the evaluation results), then model details, the
  two-phase training recipe, a results table, usage and citations.

Choices made here (and why):

- The files go up as one commit (``HfApi.create_commit``), the weights straight from the run folder. timm's
  ``push_to_hf_hub`` would re-save the model into a temp dir, push a pickled ``pytorch_model.bin`` by default and
  write its own generic README only when the repo has none; the card here is ours and a re-push replaces it,
  because the card describes the weights. ``--dry-run DIR`` writes the exact files that would be uploaded.
- ``base_model`` is claimed only on evidence: the recorded training arguments (the run record or
  ``--recipe``) say ``pretrained: true`` without a local ``pretrained_path``, and timm's pretrained cfg of
  the trained model name (exactly that name and tag, e.g. ``vit_base_patch32_224`` ->
  ``timm/vit_base_patch32_224.augreg_in21k_ft_in1k``) names the Hub checkpoint training loaded. A run
  started from a local checkpoint or from scratch, or one without a recipe, gets no ``base_model`` (the
  card says what it started from, or that it is not recorded); ``--base-model`` sets it explicitly.
- An evaluation report is used only for the weights it evaluated: ``titans-timm-eval`` records their sha256
  (``checkpoint_sha256``) and adds the report to the run record (:class:`titans_timm.run_record.RunRecord`). The
  record's reports of these very weights go on the card (any other is skipped with a printed note: the weights
  were retrained since); an explicit ``--eval-report`` that records other weights is an error. Reports without a
  sha256 (timm's ``validate.py``) are used only when passed explicitly.
- The results say what was evaluated: the split and the number of images, in the table and in the
  ``model-index``. The built-in ``fashion-mnist-mini`` is listed as what it is: its validation split is
  1,000 images of Fashion-MNIST's *test* split (model-index split ``test``), its train split 4,000 of the
  train split.
- The recipe is published without machine-local entries (output dir, data dir, device, workers...),
  and checkpoint paths are cut to ``run/file``.
- ``datasets`` lists Hub dataset ids: ``hfds/X``/``hf:X`` become ``X``; the built-in
  Fashion-MNIST subset is listed as ``zalando-datasets/fashion_mnist``; local folders are named in
  the card text only.
- The card template ships with the code: ``hub_cards/`` is read from the installed package
  (``titans_timm/hub_cards/``, where a wheel puts it) or from the source tree next to the package
  (editable installs and checkouts); ``--card-template PATH`` uses any other template.
- ``--dry-run DIR`` must be new or empty: the export never overwrites a file there (a README.md of the user's,
  an earlier export that may have been edited since); a disk that fills or turns read-only mid-export leaves no
  partial files. All three files get the mode of a new file (0o666 less the umask).
- Every failure (bad checkpoint, bad report, no token, endpoint down, offline mode) raises
  :class:`HubError` with one message that says what to do; the CLI prints it as ``error: ...``.
"""
import argparse
import importlib.resources
import json
import math
import os
import re
import shutil
import string
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch.nn as nn
import timm
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from timm.models._input import get_model_input_config

from titans_timm.checkpoint import (
    CONFIG_NAME, WEIGHTS_NAME, CheckpointError, atomic_write_bytes, config_json, load_model, weights_bytes)
from titans_timm.run_record import RunRecord, RunRecordError, file_sha256, read_args, report_mismatch

__all__ = [
    'HubError', 'push', 'render_card', 'card_fields', 'load_card_template', 'read_eval_report', 'read_recipe',
    'parse_architecture', 'backbone_hub_id', 'dataset_hub_id', 'populate_cache', 'main', 'DEFAULT_CARD_TEMPLATE',
]

PathLike = Union[str, os.PathLike]

DEFAULT_CARD_TEMPLATE = 'model_card.md'
# Hub ids of datasets that titans-timm recipes name by a short name.
_DATASET_HUB_IDS = {
    'fashion-mnist-mini': 'zalando-datasets/fashion_mnist',
    'fashion_mnist': 'zalando-datasets/fashion_mnist',
    'fashion-mnist': 'zalando-datasets/fashion_mnist',
    'cifar10': 'uoft-cs/cifar10',
    'cifar100': 'uoft-cs/cifar100',
    'imagenet': 'ILSVRC/imagenet-1k',
    'imagenet-1k': 'ILSVRC/imagenet-1k',
}
_APPROACHES = {
    'mal': ('MAL', 'memory as a layer: a memory layer between Transformer blocks, x = x + g * Mem(LN(x))'),
    'mac': ('MAC', 'memory as context: persistent tokens and tokens retrieved from the memory join the '
                   'attention context of a block'),
    'mag': ('MAG', 'memory as a gate: a memory branch beside attention, combined with it through a learned gate'),
}
_MEMORY_TYPES = {
    'mlp': 'persistent MLP memory (learned, not updated at test time)',
    'simple': 'Titans neural memory updated at test time by gradient descent with momentum and forgetting, '
              'learned scalar gates (a linear memory per head unless built deeper)',
    'advanced': 'Titans neural memory updated at test time, with data-dependent gates, separate Q/K/V views, '
                'q/k normalisation and a deep multi-head memory',
}
_ARCH_RE = re.compile(r'^vit_(tiny|small|base)_(mal|mac|mag)_(mlp|simple|advanced)$')
_BACKBONE_RE = re.compile(r'^vit_(tiny|small|base)_patch16_224$')  # the sweep baselines' backbones
# The built-in dataset: which split of the Hub dataset each of its splits was drawn from, and how many images.
_BUILTIN_DATASET = 'fashion-mnist-mini'
_BUILTIN_SPLITS = {'train': ('train', 4000), 'validation': ('test', 1000)}
# Keys of an evaluation report, first match wins: titans-timm-eval and timm's validate.py spellings.
_REPORT_KEYS = {
    'top1': ('top1', 'top-1', 'acc1', 'top1_acc', 'accuracy'),
    'top5': ('top5', 'top-5', 'acc5', 'top5_acc'),
    'loss': ('loss', 'eval_loss'),
    'img_per_sec': ('img_per_sec', 'images_per_sec', 'img/s', 'img_s', 'samples_per_sec', 'throughput'),
    'dataset': ('dataset', 'data', 'dataset_name'),
    'split': ('split', 'val_split'),
    'num_samples': ('num_samples',),
    'topk': ('topk',),  # titans-timm-eval clips top-5 to top-k for fewer than 5 classes
}
# Recipe (args.yaml / train_timm_hparams/*.yaml) entries shown in the card's hyperparameter table.
_RECIPE_KEYS = (
    'model', 'dataset', 'img_size', 'input_size', 'epochs', 'freeze_epochs', 'backbone_lr_scale', 'batch_size',
    'opt', 'lr', 'min_lr', 'weight_decay', 'sched', 'warmup_epochs', 'warmup_lr', 'smoothing', 'mixup', 'cutmix',
    'drop_path', 'clip_grad', 'model_ema', 'model_ema_decay', 'amp', 'amp_dtype', 'pretrained', 'pretrained_path',
    'initial_checkpoint', 'seed',
)


class HubError(RuntimeError):
    """Publishing or exporting a model failed; the message says what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Inputs: card template, evaluation report, training recipe


def _template_candidates(name: str) -> List[Any]:
    candidates = []
    try:
        # A wheel installs hub_cards/ as titans_timm/hub_cards/ (package data).
        candidates.append(importlib.resources.files('titans_timm').joinpath('hub_cards', name))
    except (ModuleNotFoundError, TypeError):
        pass
    # A source checkout or editable install keeps hub_cards/ next to the package directory.
    candidates.append(Path(__file__).resolve().parent.parent / 'hub_cards' / name)
    return candidates


def load_card_template(template: Optional[PathLike] = None) -> str:
    """Return the text of a model card template.

    Args:
        template: path to a ``string.Template`` markdown file; ``None`` uses the shipped
            ``hub_cards/model_card.md``.

    Raises:
        HubError: the template cannot be found or read.
    """
    if template is not None:
        path = Path(template)
        if not path.is_file():
            raise HubError(f'card template not found: {path}; pass an existing file to --card-template, '
                           f'or leave it out to use hub_cards/{DEFAULT_CARD_TEMPLATE}')
        return path.read_text(encoding='utf-8')
    for candidate in _template_candidates(DEFAULT_CARD_TEMPLATE):
        if candidate.is_file():
            return candidate.read_text(encoding='utf-8')
    raise HubError(f'the model card template hub_cards/{DEFAULT_CARD_TEMPLATE} is not installed; reinstall '
                   f'titans-timm (pip install --force-reinstall titans-timm) or pass --card-template PATH')


def _pick(report: Dict[str, Any], field: str) -> Any:
    for key in _REPORT_KEYS[field]:
        if report.get(key) is not None:
            return report[key]
    return None


def read_eval_report(report: Union[None, PathLike, Dict[str, Any], Sequence[Dict[str, Any]]],
                     weights_sha256: Optional[str] = None) -> List[Dict[str, Any]]:
    """Normalise an evaluation report into result rows for the card.

    Args:
        report: a JSON file written by ``titans-timm-eval`` (or timm's ``validate.py``
            ``--results-file``), an already loaded dict, or a list of them (one row each). Metrics may
            sit at the top level or under ``"metrics"``. Top-1/top-5 are percentages, as timm reports.
        weights_sha256: the sha256 of the weights the card describes: a report that records other weights
            (``checkpoint_sha256``) is refused. Reports that record none (timm's validate.py) are taken as given.

    Returns:
        A list of dicts with keys ``top1``, ``top5``, ``loss``, ``img_per_sec``, ``dataset``,
        ``split``, ``num_samples``, ``topk`` (the k of ``top5``: 5, or the class count below 5 classes)
        (``None`` where the report has no value); empty for ``None``.

    Raises:
        HubError: unreadable JSON, a report without a top-1 accuracy or of other weights.
    """
    if report is None:
        return []
    source = 'eval report'
    if isinstance(report, (str, os.PathLike)):
        path = Path(report)
        source = str(path)
        if not path.is_file():
            raise HubError(f'eval report not found: {path}; write one with titans-timm-eval (it saves a JSON '
                           f'report) or leave --eval-report out')
        try:
            report = json.loads(path.read_text(encoding='utf-8'))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HubError(f'{path} is not a JSON eval report ({e}); pass the JSON file titans-timm-eval '
                           f'wrote') from None
    entries = report if isinstance(report, (list, tuple)) else [report]
    rows = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise HubError(f'{source}: expected a JSON object of metrics, got {type(entry).__name__}')
        why = report_mismatch(entry, weights_sha256) if weights_sha256 and entry.get('checkpoint_sha256') else None
        if why:
            label = f'--eval-report {source}' if source != 'eval report' else 'the eval report'
            raise HubError(f'{label} does not describe this checkpoint: {why}; evaluate it again with '
                           f'titans-timm-eval')
        flat = dict(entry)
        if isinstance(entry.get('metrics'), dict):
            flat = {**entry['metrics'], **{k: v for k, v in entry.items() if k != 'metrics'}}
        row = {field: _pick(flat, field) for field in _REPORT_KEYS}
        if row['top1'] is None:
            raise HubError(f"{source} has no top-1 accuracy (expected a 'top1' key); pass the JSON report "
                           f'written by titans-timm-eval')
        for field in ('top1', 'top5', 'loss', 'img_per_sec'):
            if row[field] is not None:
                try:
                    row[field] = float(row[field])
                except (TypeError, ValueError):
                    raise HubError(f'{source}: {field} must be a number, got {row[field]!r}') from None
        for field in ('num_samples', 'topk'):
            if row[field] is not None:
                try:
                    row[field] = int(row[field])
                except (TypeError, ValueError):
                    raise HubError(f'{source}: {field} must be an integer, got {row[field]!r}') from None
        rows.append(row)
    return rows


def read_recipe(recipe: Union[None, PathLike, Dict[str, Any]]) -> Dict[str, Any]:
    """A training recipe (a run's ``args.yaml``, a ``train_timm_hparams/*.yaml`` file, a run.json, or a dict) with
    keys normalised to timm's argparse names (``freeze-epochs`` -> ``freeze_epochs``).

    Raises:
        HubError: the file is missing or is not a mapping.
    """
    if isinstance(recipe, (str, os.PathLike)):
        try:
            return read_args(recipe)
        except RunRecordError as e:
            raise HubError(f'recipe {e}; pass the args.yaml of the training run or a train_timm_hparams/*.yaml '
                           f'recipe, or leave --recipe out') from None
    if not isinstance(recipe or {}, dict):
        raise HubError(f'the training recipe must be a YAML mapping of flag names to values, '
                       f'got {type(recipe).__name__}')
    return {str(k).replace('-', '_'): v for k, v in (recipe or {}).items()}


# ---------------------------------------------------------------------------------------------------------------
# What the card says about the model


def parse_architecture(architecture: str) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """Split ``vit_{size}_{approach}_{memory}`` into its parts; ``(size, None, None)`` for the sweep baselines
    ``vit_{size}_patch16_224``, ``(None, None, None)`` for any other model."""
    m = _ARCH_RE.match(architecture)
    if m:
        return m.group(1), m.group(2), m.group(3)
    m = _BACKBONE_RE.match(architecture)
    return (m.group(1) if m else None), None, None


def backbone_hub_id(architecture: str) -> Optional[str]:
    """The Hub checkpoint ``timm.create_model(architecture, pretrained=True)`` loads, or None if it loads none.

    Read from timm's pretrained cfg of exactly this name (a ``.tag`` picks that tag, no tag timm's default),
    so ``vit_base_patch32_224``, CLIP or 384 px ViTs map to their own checkpoints; the memory models map to
    their backbone's (see ``default_cfgs`` in :mod:`titans_timm.vit`).
    """
    import titans_timm.vit  # noqa: F401  (registers the memory models and their pretrained cfgs)
    try:
        cfg = timm.models.get_pretrained_cfg(str(architecture))
    except (RuntimeError, ValueError, KeyError):
        return None
    hub_id = getattr(cfg, 'hf_hub_id', None)
    return hub_id or None


def dataset_hub_id(name: Optional[str]) -> Optional[str]:
    """Map a dataset name as recipes spell it (``hfds/ORG/NAME``, ``hf:ORG/NAME``, built-in) to a Hub id."""
    if not name:
        return None
    name = str(name)
    for prefix in ('hfds/', 'hf:', 'hf-hub:', 'hf/'):
        if name.startswith(prefix):
            return name[len(prefix):] or None
    short = name.split('/', 1)[1] if name.startswith('torch/') else name
    if short.lower() in _DATASET_HUB_IDS:
        return _DATASET_HUB_IDS[short.lower()]
    if os.sep in name or name.startswith('.') or Path(name).exists():
        return None  # a local image folder has no Hub id
    return name if re.fullmatch(r'[\w.-]+/[\w.-]+', name) else None


def _dataset_label(name: Optional[str]) -> Optional[str]:
    """How the card names a dataset: as given, but a local image folder by its folder name only."""
    if not name or dataset_hub_id(name) or not (os.sep in str(name) or Path(str(name)).exists()):
        return name
    return f'{Path(str(name)).name} (local image folder)'


def _parameter_counts(model: nn.Module) -> Dict[str, int]:
    from titans_timm.vit import split_parameters
    groups = split_parameters(model)
    return {k: sum(p.numel() for _, p in groups.get(k, ())) for k in ('backbone', 'memory', 'head')}


def _placement(model: nn.Module, approach: Optional[str]) -> str:
    from titans_timm.vit import memory_modules
    blocks = sorted({int(i) for i, _ in memory_modules(model)})
    depth = len(getattr(model, 'blocks', ()))
    if not blocks:
        return 'none (plain backbone)'
    where = f"block{'s' if len(blocks) > 1 else ''} {', '.join(str(b) for b in blocks)} (0-based) of {depth}"
    if approach == 'mac':
        return where + '; one memory per image, written and read through depth from block to block'
    return where + '; each carries its own memory, started fresh from its learned initial weights for every image'


def _initialisation(architecture: str, recipe: Dict[str, Any], base_model: Optional[str]) -> Tuple[Optional[str], str]:
    """``(base_model for the front matter or None, what training started from, in words)``.

    The front matter names a base model only on evidence: the user named one, or the recorded training
    arguments loaded a Hub checkpoint (``pretrained: true`` and no local ``pretrained_path``), which is then
    the one timm's pretrained cfg gives for the trained model name. A run started from a local checkpoint or
    from scratch gets no ``base_model``; without a recipe nothing is claimed.
    """
    if base_model:
        return base_model, f'[{base_model}](https://huggingface.co/{base_model})'
    if not recipe:
        return None, ('weights whose starting point is not recorded (no training recipe came with this upload; '
                      'push with `--recipe RUN/args.yaml`)')
    local = recipe.get('pretrained_path') or recipe.get('initial_checkpoint') or recipe.get('resume_from')
    if local:
        # only the run folder and file name: the rest of a local path means nothing to readers
        shown = '/'.join(Path(str(local)).parts[-2:])
        return None, f'the local checkpoint `{shown}` (not on the Hub)'
    if not recipe.get('pretrained'):
        return None, 'random initialisation (trained from scratch)'
    # The name training created, with its tag if the recipe gave one (vit_tiny_patch16_224.augreg_in21k).
    trained = str(recipe.get('model') or '')
    name = trained if trained.split('.')[0] == architecture else architecture
    hub_id = backbone_hub_id(name)
    if not hub_id:
        return None, f"timm's pretrained weights of `{name}`"
    return hub_id, f'the timm checkpoint [{hub_id}](https://huggingface.co/{hub_id})'


def _fmt_number(value: Optional[float], digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return '-'
    return f'{value:.{digits}f}'


def _count(n: int) -> str:
    if n >= 1e6:
        return f'{n / 1e6:.2f}M'
    return f'{n / 1e3:.1f}K' if n >= 1e3 else str(n)


def _md_escape(text: Any) -> str:
    return str(text).replace('|', '\\|').replace('\n', ' ')


# Recipe entries that describe one machine or one invocation, not the training: never published.
_LOCAL_RECIPE_KEYS = {
    'output', 'experiment', 'resume', 'data_dir', 'device', 'dist_backend', 'dist_url', 'no_progress',
    'log_interval', 'checkpoint_interval', 'workers', 'eval_only', 'local_rank', 'pin_mem',
}
_PATH_RECIPE_KEYS = ('pretrained_path', 'initial_checkpoint', 'resume_from')


def _publishable_recipe(recipe: Dict[str, Any]) -> Dict[str, Any]:
    """The recipe without machine-local entries; checkpoint paths cut to their run folder and file name."""
    out = {k: v for k, v in recipe.items() if k not in _LOCAL_RECIPE_KEYS}
    for key in _PATH_RECIPE_KEYS:
        if out.get(key):
            out[key] = '/'.join(Path(str(out[key])).parts[-2:])
    if out.get('dataset') and _dataset_label(out['dataset']) != out['dataset']:
        out['dataset'] = Path(str(out['dataset'])).name  # a local image folder: its name, not where it lives
    return out


def _training_section(recipe: Dict[str, Any], has_memory: bool = True, from_checkpoint: bool = True) -> str:
    recipe = _publishable_recipe(recipe)
    if not recipe:
        return ('No training recipe was supplied with this upload (push with `--recipe RUN/args.yaml` to '
                'record it).')
    lines = []
    epochs = recipe.get('epochs')
    freeze = recipe.get('freeze_epochs') or 0
    lr = recipe.get('lr')
    scale = recipe.get('backbone_lr_scale', 0.1)
    lr_text = f' at lr {lr:.3g}' if isinstance(lr, (int, float)) else ''

    def epochs_text(first: int, last: int) -> str:
        return f'epoch {first}' if first == last else f'epochs {first}-{last}'
    if freeze and epochs:
        lines.append('Trained in two phases with titans-timm (timm\'s optimizers, schedulers, data pipeline and EMA):')
        lines.append('')
        if has_memory:
            same = (' The model starts equal to its backbone (zero-initialised memory output), so this phase starts '
                    'from the backbone\'s accuracy.') if from_checkpoint else ''
            lines.append(f'1. **Phase 1** ({epochs_text(1, int(freeze))}): the backbone is frozen; the memory and the '
                         f'head train{lr_text}.{same}')
        else:
            lines.append(f'1. **Phase 1** ({epochs_text(1, int(freeze))}): the backbone is frozen; '
                         f'the head trains{lr_text}.')
        if int(epochs) > int(freeze):
            lines.append(f'2. **Phase 2** ({epochs_text(int(freeze) + 1, int(epochs))}): everything trains; '
                         f'the backbone at '
                         f'{scale}x the base learning rate, memory and head at the full rate.')
    else:
        lines.append('Trained in a single phase with titans-timm (no frozen-backbone phase: `freeze_epochs` = 0).')
    lines.append('')
    lines.append('| Hyperparameter | Value |')
    lines.append('|---|---|')
    for key in _RECIPE_KEYS:
        if recipe.get(key) is not None:
            value = recipe[key]
            if isinstance(value, float):
                value = f'{value:.4g}'
            elif not isinstance(value, str):
                value = json.dumps(value)
            lines.append(f'| {key} | {_md_escape(value)} |')
    lines.append('')
    lines.append('<details><summary>Full recipe (timm train.py flag names; runs with <code>titans-timm-train -c</code>)'
                 '</summary>')
    lines.append('')
    lines.append('```yaml')
    lines.append(yaml.safe_dump(recipe, sort_keys=True, default_flow_style=False).rstrip())
    lines.append('```')
    lines.append('</details>')
    return '\n'.join(lines)


def _topk(row: Dict[str, Any]) -> int:
    """The k of a row's ``top5``: the report's ``topk`` (below 5 classes the evaluator clips it), else 5."""
    return row.get('topk') or 5


def _builtin_source_split(row: Dict[str, Any]) -> Optional[Tuple[str, int]]:
    """For the built-in dataset: ``(split of Fashion-MNIST its evaluated split was drawn from, its size)``."""
    if str(row.get('dataset') or '').lower().replace('_', '-') != _BUILTIN_DATASET:
        return None
    split = str(row.get('split') or 'validation').lower()
    return _BUILTIN_SPLITS['train' if split.startswith('train') else 'validation']


def _split_text(row: Dict[str, Any]) -> str:
    """The evaluated split in words; for the built-in dataset also the Fashion-MNIST split it comes from."""
    split = str(row['split'] or '-')
    source = _builtin_source_split(row)
    if source:
        return f"{split} ({source[1]:,} images of Fashion-MNIST's {source[0]} split)"
    return split


def _results_section(rows: List[Dict[str, Any]], dataset_fallback: str) -> str:
    if not rows:
        return ('No evaluation report was supplied with this upload (run `titans-timm-eval` and push with '
                '`--eval-report REPORT.json`).')
    ks = {_topk(row) for row in rows}
    topk_header = f'Top-{ks.pop()} (%)' if len(ks) == 1 else 'Top-k (%)'
    lines = [f'| Dataset | Split | Images | Top-1 (%) | {topk_header} | Loss | Images/s |',
             '|---|---|---:|---|---|---|---|']
    for row in rows:
        topk = _fmt_number(row['top5'])
        if topk_header == 'Top-k (%)' and row['top5'] is not None:
            topk += f' (top-{_topk(row)})'
        images = f"{row['num_samples']:,}" if row['num_samples'] is not None else '-'
        lines.append(f"| {_md_escape(row['dataset'] or dataset_fallback)} | {_md_escape(_split_text(row))} | "
                     f"{images} | {_fmt_number(row['top1'])} | {topk} | {_fmt_number(row['loss'], 4)} | "
                     f"{_fmt_number(row['img_per_sec'], 1)} |")
    return '\n'.join(lines)


def _eval_results(rows: List[Dict[str, Any]], dataset_ids: List[str], dataset_text: str) -> List[EvalResult]:
    """The ``model-index`` entries of the card: one :class:`EvalResult` per metric of each report row."""
    results = []
    for row in rows:
        ds_id = dataset_hub_id(row['dataset']) or (dataset_ids[0] if dataset_ids else None)
        # The name says what was evaluated: the split and the number of images.
        name = str(row['dataset'] or dataset_text)
        split = str(row['split']) if row['split'] else None
        source = _builtin_source_split(row)
        if source:
            split = source[0]  # the split of zalando-datasets/fashion_mnist the images come from
            name = (f"{name} {row['split'] or 'validation'} "
                    f"(a {source[1]:,}-image subset of Fashion-MNIST's {split} split)")
        elif split:
            name = f'{name} ({split} split)'
        if row['num_samples'] is not None:
            name += f", {row['num_samples']:,} images evaluated"
        metrics = [(row['top1'], 'Top-1 accuracy (%)')]
        if row['top5'] is not None:
            metrics.append((row['top5'], f'Top-{_topk(row)} accuracy (%)'))
        results += [EvalResult(task_type='image-classification', task_name='Image Classification',
                               dataset_type=ds_id or 'custom', dataset_name=name, dataset_split=split,
                               metric_type='accuracy', metric_value=round(value, 4), metric_name=metric_name)
                    for value, metric_name in metrics]
    return results


def card_fields(
        model: nn.Module,
        *,
        repo_id: str,
        architecture: str,
        model_args: Dict[str, Any],
        label_names: Optional[Sequence[str]] = None,
        eval_report: Any = None,
        recipe: Any = None,
        license: str = 'apache-2.0',
        base_model: Optional[str] = None,
        datasets: Optional[Sequence[str]] = None,
) -> Dict[str, str]:
    """Every ``${placeholder}`` value of the card template, as strings (see :func:`render_card`).

    ``card_data`` is the YAML front matter, dumped by huggingface_hub's :class:`ModelCardData` (``library_name:
    timm``, license, ``pipeline_tag``, tags, datasets, metrics, ``base_model`` when known, and a ``model-index`` of
    :class:`EvalResult` entries when there are results); the others are markdown for the card body.
    """
    rows = read_eval_report(eval_report)
    for row in rows:
        row['dataset'] = _dataset_label(row['dataset'])
    recipe = read_recipe(recipe)
    size, approach, memory = parse_architecture(architecture)
    base_model, start_text = _initialisation(architecture, recipe, base_model)
    dataset_names = [r['dataset'] for r in rows if r['dataset']]
    dataset_names += [_dataset_label(recipe['dataset'])] if recipe.get('dataset') else []
    if datasets is None:
        datasets = [d for d in (dataset_hub_id(n) for n in dataset_names) if d]
    datasets = list(dict.fromkeys(datasets))  # unique, in order
    dataset_text = dataset_names[0] if dataset_names else (datasets[0] if datasets else 'not recorded')
    if dataset_text == _BUILTIN_DATASET:
        dataset_text = (f"{_BUILTIN_DATASET} (the Fashion-MNIST subset built into titans-timm, MIT licence: "
                        f"4,000 images of Fashion-MNIST's train split for training, 1,000 of its test split "
                        f"for validation)")

    counts = _parameter_counts(model)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    input_size = get_model_input_config(model)['input_size']  # what the model takes, not its backbone's cfg
    model_name = repo_id.split('/')[-1]
    tags = ['image-classification', 'timm', 'titans', 'neural-memory', 'vision-transformer']
    if approach:
        tags += [approach, f'{memory}-memory']
        summary = (f'A ViT-{size.capitalize()} with Titans neural memory ({_APPROACHES[approach][0]}, '
                   f'`{memory}` memory), trained with titans-timm starting from {start_text}.')
        approach_text = f'{_APPROACHES[approach][0]}, {_APPROACHES[approach][1]}'
        memory_text = f'`{memory}`: {_MEMORY_TYPES[memory]}'
    else:
        tags += ['baseline']
        summary = (f'The plain timm Vision Transformer baseline `{architecture}` (no memory), trained with '
                   f'titans-timm starting from {start_text}, for comparison with its memory-augmented variants.')
        approach_text = 'none (plain timm Vision Transformer baseline)'
        memory_text = 'none'
    preview = ''
    if label_names:
        shown = ', '.join(str(n) for n in list(label_names)[:10])
        preview = f" ({shown}{', ...' if len(label_names) > 10 else ''})"
    args_lines = ['| Argument | Value |', '|---|---|']
    args_lines += [f'| {k} | `{_md_escape(json.dumps(v))}` |' for k, v in sorted(model_args.items())]
    eval_results = _eval_results(rows, datasets, dataset_text)
    card_data = ModelCardData(
        library_name='timm', license=license, pipeline_tag='image-classification', tags=tags, datasets=datasets,
        metrics=['accuracy'], base_model=base_model or None,
        model_name=model_name if eval_results else None, eval_results=eval_results or None)
    return dict(
        card_data=card_data.to_yaml(),
        model_name=model_name,
        repo_id=repo_id,
        summary=summary,
        architecture=architecture,
        approach=approach_text,
        memory_type=memory_text,
        placement=_placement(model, approach),
        params_total=_count(sum(counts.values())),
        params_backbone=_count(counts['backbone']),
        params_memory=_count(counts['memory']),
        params_head=_count(counts['head']),
        image_size=f'{input_size[-2]} x {input_size[-1]}',
        num_classes=str(getattr(model, 'num_classes', '?')),
        label_preview=preview,
        mean=json.dumps([round(float(v), 4) for v in cfg.get('mean', ())]),
        std=json.dumps([round(float(v), 4) for v in cfg.get('std', ())]),
        initialisation=start_text[0].upper() + start_text[1:],
        dataset_text=dataset_text,
        model_args_table='\n'.join(args_lines),
        training=_training_section(recipe, has_memory=approach is not None,
                                    from_checkpoint=not start_text.startswith('random')),
        results=_results_section(rows, dataset_text),
    )


def render_card(model: nn.Module, *, template: Optional[PathLike] = None, **fields) -> str:
    """Render the model card (README.md) for ``model``.

    Args:
        model: the trained model (for parameter counts, memory placement, normalisation).
        template: a ``string.Template`` markdown file; default ``hub_cards/model_card.md``.
        **fields: the keyword arguments of :func:`card_fields` (``repo_id``, ``architecture``,
            ``model_args``, ``label_names``, ``eval_report``, ``recipe``, ``license``, ``base_model``,
            ``datasets``).

    Raises:
        HubError: missing template, bad report/recipe, or a template placeholder with no value.
    """
    text = load_card_template(template)
    values = card_fields(model, **fields)
    try:
        text = string.Template(text).substitute(values)
    except KeyError as e:
        raise HubError(f'card template placeholder ${{{e.args[0]}}} has no value; use only: '
                       f"{', '.join(sorted(values))}") from None
    except ValueError as e:
        raise HubError(f'card template is malformed ({e}); write a literal $ as $$') from None
    try:
        ModelCard(text)  # the front matter must parse as the Hub will parse it
    except ValueError as e:
        raise HubError(f'the rendered card has invalid front matter ({str(e).splitlines()[0]}); the card template '
                       f'must open with ---, ${{card_data}}, --- and add no conflicting keys') from None
    return text


# ---------------------------------------------------------------------------------------------------------------
# The upload: the run folder's config.json and model.safetensors, and the card


def _check_new_folder(folder: Path) -> None:
    """``folder`` is new or empty, else a :class:`HubError` naming what it holds: the export overwrites nothing."""
    if folder.exists() and not folder.is_dir():
        raise HubError(f'{folder} exists and is not a folder; pass a new or empty folder to --dry-run')
    if folder.is_dir():
        # It must end up holding exactly what would be uploaded, and none of the user's files may be overwritten.
        held = sorted(p.name for p in folder.iterdir())
        if held:
            more = f' and {len(held) - 5} more' if len(held) > 5 else ''
            raise HubError(f"{folder} already holds other files ({', '.join(held[:5])}{more}); the export never "
                           f'overwrites files: pass a new or empty folder to --dry-run, or move them out first')


def _write_folder(files: Dict[str, Union[bytes, Path]], folder: Path) -> None:
    """Write ``files`` into the new or empty ``folder``, each with the mode of a new file (0o666 less the umask). A
    write that fails (disk full, read-only) removes what was written, and the folder if it was new."""
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            atomic_write_bytes(folder / name, data if isinstance(data, bytes) else data.read_bytes())
    except OSError as e:
        for name in files:
            (folder / name).unlink(missing_ok=True)
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise HubError(f'cannot write the export to {folder} ({e.strerror or type(e).__name__}); nothing was kept '
                       f'there: make room or pass --dry-run a folder on a writable disk') from None


def _describe_upload_error(e: BaseException, endpoint: str, repo_id: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    if isinstance(e, OfflineModeIsEnabled):
        return ('HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push, or use --dry-run DIR to '
                'write the folder and upload it later with `hf upload`')
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, 'response', None), 'status_code', None)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if status in (401, 403):
            return (f'the Hub at {endpoint} refused the token ({status}: {first}); create a token with write '
                    f'access at https://huggingface.co/settings/tokens and pass --token or set HF_TOKEN')
        return f'upload of {repo_id} to {endpoint} failed ({status}: {first}); check the repo id and your rights to it'
    return (f'cannot reach the Hugging Face Hub at {endpoint} ({type(e).__name__}: {str(e)[:200]}); check the '
            f'network or HF_ENDPOINT, or use --dry-run DIR and upload the folder later with `hf upload`')


def _upload(files: Dict[str, Union[bytes, Path]], repo_id: str, *, token: str, private: bool,
            endpoint: Optional[str], revision: Optional[str], commit_message: str) -> Dict[str, Any]:
    """Create the repository if needed and commit ``files`` to it in one commit (the weights straight from the
    run folder)."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError
    endpoint = (endpoint or constants.ENDPOINT).rstrip('/')
    api = HfApi(endpoint=endpoint, token=token, library_name='timm', library_version=timm.__version__)
    # ConnectionError covers OfflineModeIsEnabled and refused connections; the HTTP client's own
    # transport errors are not OSErrors, hence its base class too.
    transport_error = HfHubHTTPError.__mro__[1]
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        repo_id = repo_url.repo_id
        commit = api.create_commit(repo_id=repo_id, revision=revision, commit_message=commit_message, operations=[
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=data if isinstance(data, bytes) else str(data))
            for name, data in files.items()])
    except (OSError, transport_error) as e:
        raise HubError(_describe_upload_error(e, endpoint, repo_id)) from None
    except ValueError as e:  # the Hub's README front matter check
        raise HubError(f'the Hub at {endpoint} rejected the model card ({str(e).splitlines()[0]}); fix the card '
                       f'template front matter') from None
    return dict(repo_id=repo_id, url=str(repo_url), commit_url=getattr(commit, 'commit_url', str(commit)),
                commit_oid=getattr(commit, 'oid', None))


def _recorded_reports(record: Optional[RunRecord], weights_sha256: str, checkpoint: PathLike) -> List[Dict[str, Any]]:
    """The reports the run record holds of these very weights; any other is named in a note on stderr."""
    reports = []
    for report in record.eval_reports if record else ():
        why = report_mismatch(report, weights_sha256)
        if why is None:
            reports.append(report)
        else:
            print(f"note: not using the {report.get('split')} report of the run record on the model card: {why}; run "
                  f'titans-timm-eval --checkpoint {checkpoint} again, or pass --eval-report', file=sys.stderr)
    return reports


def push(
        checkpoint: PathLike,
        repo_id: str,
        *,
        eval_report: Any = None,
        recipe: Any = None,
        token: Optional[str] = None,
        private: bool = False,
        dry_run_dir: Optional[PathLike] = None,
        license: str = 'apache-2.0',
        base_model: Optional[str] = None,
        datasets: Optional[Sequence[str]] = None,
        card_template: Optional[PathLike] = None,
        commit_message: Optional[str] = None,
        revision: Optional[str] = None,
        endpoint: Optional[str] = None,
        label_names: Optional[Sequence[str]] = None,
        **model_overrides,
) -> Dict[str, Any]:
    """Publish a training run to the Hugging Face Hub (or, with ``dry_run_dir``, write the folder only).

    Args:
        checkpoint: a run folder written by training (``OUTPUT/EXPERIMENT``) or its ``model.safetensors``: its
            ``config.json`` and ``model.safetensors`` are uploaded as they are. An older single-file checkpoint, or
            a plain state dict (``.safetensors`` or ``.pth``, read with ``weights_only=True``) with
            ``architecture=NAME`` and the model kwargs in ``model_overrides``, is written in the same layout first.
        repo_id: ``ORG/NAME`` of the Hub repository (created if missing).
        eval_report: JSON report of ``titans-timm-eval`` (path, dict or list) for the card's results; one that
            records another weights sha256 is refused. Default: the reports of these weights in the run record
            (a note on stderr names any other it holds).
        recipe: training recipe (path or dict); default: the run record's arguments (or its args.yaml).
        token: Hub token with write access; default ``HF_TOKEN`` / the ``hf auth login`` token.
        private: create the repository private.
        dry_run_dir: write the exact files that would be uploaded here, and upload nothing. It must be a new or
            empty folder: the export never overwrites a file (a user's README.md, an earlier export).
        license, base_model, datasets: card front matter (defaults: apache-2.0, the backbone's
            timm hub id, the Hub ids of the datasets named in the report and recipe).
        card_template: a different ``string.Template`` card; default ``hub_cards/model_card.md``.
        commit_message, revision: of the upload commit (default message names the checkpoint).
        endpoint: Hub URL; default ``HF_ENDPOINT`` or https://huggingface.co.
        label_names: class names, for a single-file checkpoint or state dict that has none.
        **model_overrides: ``architecture=`` and model kwargs for :func:`titans_timm.checkpoint.load_model`.

    Returns:
        A dict with ``repo_id``, ``folder`` (the dry-run folder, else None), ``files``, and for uploads
        ``url``, ``commit_url`` and ``commit_oid``.

    Raises:
        HubError: any failure, with what to do (bad checkpoint, missing token, unreachable Hub, ...).
    """
    if not re.fullmatch(r'[\w.-]+/[\w.-]+', str(repo_id)):
        raise HubError(f"repo id must look like ORG/NAME (letters, digits, '-', '_', '.'), got {repo_id!r}")
    path = Path(checkpoint)
    folder = path if path.is_dir() else path.parent
    is_run = (folder / CONFIG_NAME).is_file() and (path.is_dir() or path.name == WEIGHTS_NAME)
    if is_run and model_overrides:
        raise HubError(f'{checkpoint} names its model in {CONFIG_NAME}; --model and --model-kwargs are for plain '
                       f'state dicts')
    if dry_run_dir and Path(dry_run_dir).resolve() == folder.resolve():
        raise HubError(f'--dry-run {dry_run_dir} holds the checkpoint {checkpoint}, which the export would '
                       f'overwrite; pass a new or empty folder to --dry-run')
    if dry_run_dir:
        _check_new_folder(Path(dry_run_dir))  # before the model is loaded: a user's file there is never replaced
    try:
        model, meta = load_model(checkpoint, **model_overrides)
        config = ((folder / CONFIG_NAME).read_text() if is_run else
                  config_json(model, model_args=meta['model_args'], label_names=label_names or meta['label_names'],
                              data_config=meta['pretrained_cfg']))
        record = RunRecord.load(folder)
    except (CheckpointError, RunRecordError) as e:
        raise HubError(str(e)) from None
    sha = file_sha256(meta['path'])
    rows = read_eval_report(eval_report if eval_report is not None else _recorded_reports(record, sha, checkpoint),
                            weights_sha256=sha)
    if not dry_run_dir:
        from huggingface_hub import get_token
        token = token or get_token()
        if not token:
            # Checked before the card is rendered so the user is told at once.
            raise HubError('no Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass --token; '
                           'or use --dry-run DIR to only write the folder')
    config_dict = json.loads(config)
    card = render_card(model, template=card_template, repo_id=repo_id, architecture=config_dict['architecture'],
                       model_args=config_dict.get('model_args') or {}, label_names=config_dict.get('label_names'),
                       eval_report=rows, recipe=recipe if recipe is not None else (record.args if record else None),
                       license=license, base_model=base_model, datasets=datasets)
    files = {CONFIG_NAME: config.encode(), WEIGHTS_NAME: Path(meta['path']) if is_run else weights_bytes(model),
             'README.md': card.encode('utf-8')}
    if dry_run_dir:
        _write_folder(files, Path(dry_run_dir))
        return dict(repo_id=repo_id, folder=str(dry_run_dir), files=sorted(files))
    result = _upload(files, repo_id, token=token, private=private, endpoint=endpoint, revision=revision,
                     commit_message=commit_message or f'Add {config_dict["architecture"]} from {path.name}')
    return dict(result, folder=None, files=sorted(files))


def populate_cache(folder: PathLike, repo_id: str, *, cache_dir: Optional[PathLike] = None,
                   commit_sha: Optional[str] = None) -> Path:
    """Place an exported folder into a Hugging Face cache as if ``repo_id`` had been downloaded.

    ``timm.create_model('hf-hub:REPO_ID', pretrained=True)`` then loads it with ``HF_HUB_OFFLINE=1``
    (machines without internet, CI). Layout: ``CACHE/models--ORG--NAME/refs/main`` holding a 40-hex
    commit sha and ``snapshots/<sha>/`` holding the files.

    Args:
        folder: a run folder, or a folder written by ``--dry-run``.
        repo_id: ``ORG/NAME``.
        cache_dir: the hub cache; default ``HF_HUB_CACHE`` (``~/.cache/huggingface/hub``).
        commit_sha: 40 hex digits; default a hash of the folder's files.

    Returns:
        The snapshot folder.
    """
    import hashlib
    from huggingface_hub import constants
    folder = Path(folder)
    files = [folder / name for name in (CONFIG_NAME, WEIGHTS_NAME, 'README.md') if (folder / name).is_file()]
    if not (folder / 'config.json').is_file() or not (folder / 'model.safetensors').is_file():
        raise HubError(f'{folder} has no config.json and model.safetensors; export it first with --dry-run {folder}')
    if commit_sha is None:
        digest = hashlib.sha1()
        for path in files:
            digest.update(path.name.encode() + path.read_bytes())
        commit_sha = digest.hexdigest()
    if not re.fullmatch(r'[0-9a-f]{40}', commit_sha):
        raise HubError(f'commit_sha must be 40 lowercase hex digits, got {commit_sha!r}')
    repo_dir = Path(cache_dir or constants.HF_HUB_CACHE) / ('models--' + repo_id.replace('/', '--'))
    snapshot = repo_dir / 'snapshots' / commit_sha
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copyfile(path, snapshot / path.name)
    (repo_dir / 'refs').mkdir(parents=True, exist_ok=True)
    (repo_dir / 'refs' / 'main').write_text(commit_sha)
    return snapshot


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _parse_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    out = {}
    for item in items or ():
        if '=' not in item:
            raise HubError(f'--model-kwargs entries look like key=value, got {item!r}')
        key, value = item.split('=', 1)
        out[key.replace('-', '_')] = yaml.safe_load(value)
    return out


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='titans-timm-push',
        description='Publish a titans-timm training run to the Hugging Face Hub (its config.json and '
                    'model.safetensors as they are, and a README.md model card), loadable with '
                    "timm.create_model('hf-hub:ORG/NAME', pretrained=True) after `import titans_timm`.")
    parser.add_argument('checkpoint', metavar='RUN',
                        help='run folder written by training (or its model.safetensors), e.g. output/EXP; also an '
                             'older single-file checkpoint, or a state dict with --model')
    parser.add_argument('repo_id', help='Hub repository ORG/NAME (created if missing)')
    parser.add_argument('--dry-run', metavar='DIR', default=None,
                        help='write the exact folder that would be uploaded to DIR (a new or empty folder: nothing '
                             'in it is ever overwritten); upload nothing')
    parser.add_argument('--eval-report', metavar='JSON', default=None,
                        help='report of titans-timm-eval for the results table; it must not record other weights '
                             "(default: the run record's reports of these weights)")
    parser.add_argument('--recipe', metavar='YAML', default=None,
                        help="training recipe or run args.yaml (default: the run record's arguments)")
    parser.add_argument('--token', default=None,
                        help='Hub token with write access (default: HF_TOKEN or `hf auth login`)')
    parser.add_argument('--private', action='store_true', help='create the repository private')
    parser.add_argument('--license', default='apache-2.0', help='license in the card (default: apache-2.0)')
    parser.add_argument('--base-model', default=None, metavar='ORG/NAME',
                        help="card base_model (default: the timm Hub checkpoint the recipe loaded with "
                             "pretrained: true; none without a recipe)")
    parser.add_argument('--dataset-id', dest='datasets', action='append', default=None, metavar='ORG/NAME',
                        help='Hub dataset id for the card (repeatable; default: from the report and recipe)')
    parser.add_argument('--card-template', default=None, metavar='MD',
                        help='card template (default: hub_cards/model_card.md)')
    parser.add_argument('--commit-message', default=None)
    parser.add_argument('--revision', default=None, help='branch to push to (default: main)')
    parser.add_argument('--endpoint', default=None, help='Hub URL (default: HF_ENDPOINT or https://huggingface.co)')
    parser.add_argument('--model', dest='architecture', default=None, metavar='NAME',
                        help='timm model name, for plain state dicts without titans-timm metadata')
    parser.add_argument('--model-kwargs', nargs='*', default=None, metavar='KEY=VALUE',
                        help='model kwargs for plain state dicts (timm train.py style), '
                             'e.g. num_classes=10 img_size=32')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``titans-timm-push``; returns the exit status (2 and one ``error:`` line on bad input)."""
    args = _build_parser().parse_args(argv)
    try:
        overrides = _parse_kwargs(args.model_kwargs)
        if args.architecture:
            overrides['architecture'] = args.architecture
        result = push(args.checkpoint, args.repo_id, eval_report=args.eval_report, recipe=args.recipe,
                      token=args.token, private=args.private, dry_run_dir=args.dry_run, license=args.license,
                      base_model=args.base_model, datasets=args.datasets, card_template=args.card_template,
                      commit_message=args.commit_message, revision=args.revision, endpoint=args.endpoint,
                      **overrides)
    except HubError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if result['folder']:
        print(f"wrote {', '.join(result['files'])} to {result['folder']} (dry run, nothing uploaded)")
        print(f"upload later with: hf upload {result['repo_id']} {result['folder']} .")
    else:
        print(f"pushed {', '.join(result['files'])} to {result['url']}")
    print(f"load with: import titans_timm; timm.create_model('hf-hub:{result['repo_id']}', pretrained=True)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
