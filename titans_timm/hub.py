"""Publish trained titans-timm models to the Hugging Face Hub with a model card.

``titans-timm-push RUN ORG/NAME`` (or :func:`push`) commits a training run folder's own ``config.json`` and
``model.safetensors``, byte for byte (an older single-file checkpoint or a plain state dict is first written in the
same layout, :mod:`titans_timm.checkpoint`), and a ``README.md`` model card rendered from ``hub_cards/model_card.md``
(front matter from huggingface_hub's ``ModelCardData``, results as ``EvalResult`` entries), so plain timm loads it::

    import timm, titans_timm            # the import registers the titans-timm architectures
    model = timm.create_model('hf-hub:ORG/NAME', pretrained=True)

``--dry-run DIR`` writes the exact files instead. docs/hub.md says what the card claims and on what evidence
(``base_model``, which evaluation reports, datasets, the published recipe) and how the export stays fail safe;
every failure is one :class:`HubError` line that says what to do.
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

from titans_timm.cli import EXIT_BAD_INPUT, KeyValueKwargs, Parser
from titans_timm.checkpoint import (
    CONFIG_NAME, WEIGHTS_NAME, CheckpointError, atomic_write_bytes, config_json, load_model, weights_bytes)
from titans_timm.run_record import RunRecord, RunRecordError, file_sha256, read_args, report_mismatch

__all__ = [
    'HubError', 'push', 'render_card', 'card_fields', 'load_card_template', 'read_eval_report', 'read_recipe',
    'parse_architecture', 'backbone_hub_id', 'dataset_hub_id', 'main', 'DEFAULT_CARD_TEMPLATE',
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
_REPO_ID_RE = r'[\w.-]+/[\w.-]+'
# The built-in dataset: which split of the Hub dataset each of its splits was drawn from, and how many images.
_BUILTIN_DATASET = 'fashion-mnist-mini'
_BUILTIN_SPLITS = {'train': ('train', 4000), 'validation': ('test', 1000)}
# Fields of an evaluation report: their type, and their keys (titans-timm-eval's and timm validate.py's spellings,
# first match wins).
_REPORT_FIELDS = {
    'top1': (float, ('top1', 'top-1', 'acc1', 'top1_acc', 'accuracy')),
    'top5': (float, ('top5', 'top-5', 'acc5', 'top5_acc')),
    'loss': (float, ('loss', 'eval_loss')),
    'img_per_sec': (float, ('img_per_sec', 'images_per_sec', 'img/s', 'img_s', 'samples_per_sec', 'throughput')),
    'dataset': (None, ('dataset', 'data', 'dataset_name')),
    'split': (None, ('split', 'val_split')),
    'num_samples': (int, ('num_samples',)),
    'topk': (int, ('topk',)),  # titans-timm-eval clips top-5 to top-k for fewer than 5 classes
}
# Recipe (args.yaml / train_timm_hparams/*.yaml) entries shown in the card's hyperparameter table.
_RECIPE_KEYS = (
    'model', 'dataset', 'img_size', 'input_size', 'epochs', 'freeze_epochs', 'backbone_lr_scale', 'batch_size',
    'opt', 'lr', 'min_lr', 'weight_decay', 'sched', 'warmup_epochs', 'warmup_lr', 'smoothing', 'mixup', 'cutmix',
    'drop_path', 'clip_grad', 'model_ema', 'model_ema_decay', 'amp', 'amp_dtype', 'pretrained', 'pretrained_path',
    'initial_checkpoint', 'seed',
)
# Recipe entries that describe one machine or one invocation, not the training: never published.
_LOCAL_RECIPE_KEYS = {
    'output', 'experiment', 'resume', 'data_dir', 'device', 'dist_backend', 'dist_url', 'no_progress',
    'log_interval', 'checkpoint_interval', 'workers', 'eval_only', 'local_rank', 'pin_mem',
}
_PATH_RECIPE_KEYS = ('pretrained_path', 'initial_checkpoint', 'resume_from')


class HubError(RuntimeError):
    """Publishing or exporting a model failed; the message says what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Inputs: card template, evaluation report, training recipe


def _template_candidates(name: str) -> List[Any]:
    """Where a shipped template lives: package data in a wheel, next to the package in a checkout."""
    return [importlib.resources.files('titans_timm').joinpath('hub_cards', name),
            Path(__file__).resolve().parent.parent / 'hub_cards' / name]


def load_card_template(template: Optional[PathLike] = None) -> str:
    """The text of a ``string.Template`` card: ``template``, or by default the shipped ``hub_cards/model_card.md``.
    Raises :class:`HubError` if it cannot be found."""
    if template is not None:
        if not Path(template).is_file():
            raise HubError(f'card template not found: {template}; pass an existing file to --card-template, '
                           f'or leave it out to use hub_cards/{DEFAULT_CARD_TEMPLATE}')
        return Path(template).read_text(encoding='utf-8')
    for candidate in _template_candidates(DEFAULT_CARD_TEMPLATE):
        if candidate.is_file():
            return candidate.read_text(encoding='utf-8')
    raise HubError(f'the model card template hub_cards/{DEFAULT_CARD_TEMPLATE} is not installed; reinstall '
                   f'titans-timm (pip install --force-reinstall titans-timm) or pass --card-template PATH')


def read_eval_report(report: Union[None, PathLike, Dict[str, Any], Sequence[Dict[str, Any]]],
                     weights_sha256: Optional[str] = None) -> List[Dict[str, Any]]:
    """Normalise evaluation reports into the card's result rows.

    Args:
        report: a JSON file of ``titans-timm-eval`` (or timm ``validate.py --results-file``), a loaded dict, or a
            list of them (one row each); metrics at the top level or under ``"metrics"``, top-1/top-5 in percent.
        weights_sha256: the sha256 of the weights the card describes: a report that records other weights
            (``checkpoint_sha256``) is refused; one that records none (timm's validate.py) is taken as given.

    Returns:
        One dict per report with ``top1``, ``top5``, ``loss``, ``img_per_sec``, ``dataset``, ``split``,
        ``num_samples`` and ``topk`` (the k of ``top5``), ``None`` where the report has no value; ``[]`` for None.

    Raises:
        HubError: unreadable JSON, a report without a top-1 accuracy, or one of other weights.
    """
    if report is None:
        return []
    source = label = 'the eval report'
    if isinstance(report, (str, os.PathLike)):
        source, label = str(report), f'--eval-report {report}'
        if not Path(report).is_file():
            raise HubError(f'eval report not found: {report}; write one with titans-timm-eval (it saves a JSON '
                           f'report) or leave --eval-report out')
        try:
            report = json.loads(Path(report).read_text(encoding='utf-8'))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HubError(f'{source} is not a JSON eval report ({e}); pass the JSON file titans-timm-eval '
                           f'wrote') from None
    rows = []
    for entry in report if isinstance(report, (list, tuple)) else [report]:
        if not isinstance(entry, dict):
            raise HubError(f'{source}: expected a JSON object of metrics, got {type(entry).__name__}')
        why = report_mismatch(entry, weights_sha256) if weights_sha256 and entry.get('checkpoint_sha256') else None
        if why:
            raise HubError(f'{label} does not describe this checkpoint: {why}; evaluate it again with '
                           f'titans-timm-eval')
        flat = {**(entry['metrics'] if isinstance(entry.get('metrics'), dict) else {}), **entry}
        row = {}
        for field, (kind, keys) in _REPORT_FIELDS.items():
            row[field] = next((flat[k] for k in keys if flat.get(k) is not None), None)
            if kind is not None and row[field] is not None:
                try:
                    row[field] = kind(row[field])
                except (TypeError, ValueError):
                    raise HubError(f"{source}: {field} must be {'a number' if kind is float else 'an integer'}, "
                                   f'got {row[field]!r}') from None
        if row['top1'] is None:
            raise HubError(f"{source} has no top-1 accuracy (expected a 'top1' key); pass the JSON report "
                           f'written by titans-timm-eval')
        rows.append(row)
    return rows


def read_recipe(recipe: Union[None, PathLike, Dict[str, Any]]) -> Dict[str, Any]:
    """A training recipe (a run's ``args.yaml``, a ``train_timm_hparams/*.yaml`` file, a run.json, or a dict) with
    keys normalised to timm's argparse names (``freeze-epochs`` -> ``freeze_epochs``); :class:`HubError` if the file
    is missing or not a mapping."""
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

    Read from timm's pretrained cfg of exactly this name (a ``.tag`` picks that tag), so each timm ViT maps to its
    own checkpoint and the memory models to their backbone's (``default_cfgs`` in :mod:`titans_timm.vit`).
    """
    try:
        return getattr(timm.models.get_pretrained_cfg(str(architecture)), 'hf_hub_id', None) or None
    except (RuntimeError, ValueError, KeyError):
        return None


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
    return name if re.fullmatch(_REPO_ID_RE, name) else None


def _dataset_label(name: Optional[str]) -> Optional[str]:
    """How the card names a dataset: as given, but a local image folder by its folder name only."""
    if not name or dataset_hub_id(name) or not (os.sep in str(name) or Path(str(name)).exists()):
        return name
    return f'{Path(str(name)).name} (local image folder)'


def _placement(model: nn.Module, approach: Optional[str]) -> str:
    from titans_timm.vit import memory_modules
    blocks = sorted({int(i) for i, _ in memory_modules(model)})
    if not blocks:
        return 'none (plain backbone)'
    where = (f"block{'s' if len(blocks) > 1 else ''} {', '.join(map(str, blocks))} (0-based) of "
             f"{len(getattr(model, 'blocks', ()))}")
    if approach == 'mac':
        return where + '; one memory per image, written and read through depth from block to block'
    return where + '; each carries its own memory, started fresh from its learned initial weights for every image'


def _initialisation(architecture: str, recipe: Dict[str, Any], base_model: Optional[str]) -> Tuple[Optional[str], str]:
    """``(base_model for the front matter or None, what training started from, in words)``: a base model only on
    evidence, the user's or the Hub checkpoint the recorded arguments loaded (``pretrained`` and nothing local)."""
    if base_model:
        return base_model, f'[{base_model}](https://huggingface.co/{base_model})'
    if not recipe:
        return None, ('weights whose starting point is not recorded (no training recipe came with this upload; '
                      'push with `--recipe RUN/args.yaml`)')
    local = recipe.get('pretrained_path') or recipe.get('initial_checkpoint') or recipe.get('resume_from')
    if local:  # only the run folder and file name: the rest of a local path means nothing to readers
        return None, f"the local checkpoint `{'/'.join(Path(str(local)).parts[-2:])}` (not on the Hub)"
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
    return '-' if value is None or not math.isfinite(value) else f'{value:.{digits}f}'


def _count(n: int) -> str:
    return f'{n / 1e6:.2f}M' if n >= 1e6 else f'{n / 1e3:.1f}K' if n >= 1e3 else str(n)


def _md_escape(text: Any) -> str:
    return str(text).replace('|', '\\|').replace('\n', ' ')


def _publishable_recipe(recipe: Dict[str, Any]) -> Dict[str, Any]:
    """The recipe without machine-local entries; checkpoint paths cut to their run folder and file name."""
    out = {k: v for k, v in recipe.items() if k not in _LOCAL_RECIPE_KEYS}
    for key in _PATH_RECIPE_KEYS:
        if out.get(key):
            out[key] = '/'.join(Path(str(out[key])).parts[-2:])
    if out.get('dataset') and _dataset_label(out['dataset']) != out['dataset']:
        out['dataset'] = Path(str(out['dataset'])).name  # a local image folder: its name, not where it lives
    return out


def _epochs(first: int, last: int) -> str:
    return f'epoch {first}' if first == last else f'epochs {first}-{last}'


def _training_section(recipe: Dict[str, Any], has_memory: bool, from_checkpoint: bool) -> str:
    recipe = _publishable_recipe(recipe)
    if not recipe:
        return 'No training recipe was supplied with this upload (push with `--recipe RUN/args.yaml` to record it).'
    epochs, freeze = int(recipe.get('epochs') or 0), int(recipe.get('freeze_epochs') or 0)
    lr = f" at lr {recipe['lr']:.3g}" if isinstance(recipe.get('lr'), (int, float)) else ''
    if freeze and epochs:
        same = (" The model starts equal to its backbone (zero-initialised memory output), so this phase starts "
                "from the backbone's accuracy." if has_memory and from_checkpoint else '')
        trains = 'the memory and the head train' if has_memory else 'the head trains'
        lines = ["Trained in two phases with titans-timm (timm's optimizers, schedulers, data pipeline and EMA):", '',
                 f'1. **Phase 1** ({_epochs(1, freeze)}): the backbone is frozen; {trains}{lr}.{same}']
        if epochs > freeze:
            lines.append(f"2. **Phase 2** ({_epochs(freeze + 1, epochs)}): everything trains; the backbone at "
                         f"{recipe.get('backbone_lr_scale', 0.1)}x the base learning rate, memory and head at the "
                         f"full rate.")
    else:
        lines = ['Trained in a single phase with titans-timm (no frozen-backbone phase: `freeze_epochs` = 0).']
    lines += ['', '| Hyperparameter | Value |', '|---|---|']
    for key in _RECIPE_KEYS:
        value = recipe.get(key)
        if value is not None:
            value = (f'{value:.4g}' if isinstance(value, float) else value if isinstance(value, str)
                     else json.dumps(value))
            lines.append(f'| {key} | {_md_escape(value)} |')
    lines += ['', '<details><summary>Full recipe (timm train.py flag names; runs with <code>titans-timm-train -c'
                  '</code>)</summary>', '', '```yaml',
              yaml.safe_dump(recipe, sort_keys=True, default_flow_style=False).rstrip(), '```', '</details>']
    return '\n'.join(lines)


def _builtin_source_split(row: Dict[str, Any]) -> Optional[Tuple[str, int]]:
    """For the built-in dataset: ``(split of Fashion-MNIST its evaluated split was drawn from, its size)``."""
    if str(row.get('dataset') or '').lower().replace('_', '-') != _BUILTIN_DATASET:
        return None
    split = str(row.get('split') or 'validation').lower()
    return _BUILTIN_SPLITS['train' if split.startswith('train') else 'validation']


def _results_section(rows: List[Dict[str, Any]], dataset_fallback: str) -> str:
    if not rows:
        return ('No evaluation report was supplied with this upload (run `titans-timm-eval` and push with '
                '`--eval-report REPORT.json`).')
    ks = {row['topk'] or 5 for row in rows}
    topk_header = f'Top-{ks.pop()} (%)' if len(ks) == 1 else 'Top-k (%)'
    lines = [f'| Dataset | Split | Images | Top-1 (%) | {topk_header} | Loss | Images/s |',
             '|---|---|---:|---|---|---|---|']
    for row in rows:
        topk = _fmt_number(row['top5'])
        if topk_header == 'Top-k (%)' and row['top5'] is not None:
            topk += f" (top-{row['topk'] or 5})"
        split, source = str(row['split'] or '-'), _builtin_source_split(row)
        if source:
            split += f" ({source[1]:,} images of Fashion-MNIST's {source[0]} split)"
        images = f"{row['num_samples']:,}" if row['num_samples'] is not None else '-'
        lines.append(f"| {_md_escape(row['dataset'] or dataset_fallback)} | {_md_escape(split)} | {images} | "
                     f"{_fmt_number(row['top1'])} | {topk} | {_fmt_number(row['loss'], 4)} | "
                     f"{_fmt_number(row['img_per_sec'], 1)} |")
    return '\n'.join(lines)


def _eval_results(rows: List[Dict[str, Any]], dataset_ids: List[str], dataset_text: str) -> List[EvalResult]:
    """The ``model-index`` entries of the card: one :class:`EvalResult` per metric of each report row, named for
    what was evaluated (the split and the number of images)."""
    results = []
    for row in rows:
        ds_id = dataset_hub_id(row['dataset']) or (dataset_ids[0] if dataset_ids else None)
        name, split, source = str(row['dataset'] or dataset_text), row['split'], _builtin_source_split(row)
        if source:
            split = source[0]  # the split of zalando-datasets/fashion_mnist the images come from
            name += f" {row['split'] or 'validation'} (a {source[1]:,}-image subset of Fashion-MNIST's {split} split)"
        elif split:
            name += f' ({split} split)'
        if row['num_samples'] is not None:
            name += f", {row['num_samples']:,} images evaluated"
        metrics = [(row['top1'], 'Top-1 accuracy (%)')]
        if row['top5'] is not None:
            metrics.append((row['top5'], f"Top-{row['topk'] or 5} accuracy (%)"))
        results += [EvalResult(task_type='image-classification', task_name='Image Classification',
                               dataset_type=ds_id or 'custom', dataset_name=name,
                               dataset_split=str(split) if split else None, metric_type='accuracy',
                               metric_value=round(value, 4), metric_name=metric_name)
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
    """Every ``${placeholder}`` value of the card template, as strings (see :func:`render_card`): ``card_data`` is
    the YAML front matter dumped by huggingface_hub's :class:`ModelCardData`, the others markdown for the body."""
    from titans_timm.vit import split_parameters
    rows = read_eval_report(eval_report)
    for row in rows:
        row['dataset'] = _dataset_label(row['dataset'])
    recipe = read_recipe(recipe)
    size, approach, memory = parse_architecture(architecture)
    base_model, start_text = _initialisation(architecture, recipe, base_model)
    dataset_names = [r['dataset'] for r in rows if r['dataset']]
    dataset_names += [_dataset_label(recipe['dataset'])] if recipe.get('dataset') else []
    if datasets is None:
        datasets = [d for d in map(dataset_hub_id, dataset_names) if d]
    datasets = list(dict.fromkeys(datasets))  # unique, in order
    dataset_text = dataset_names[0] if dataset_names else (datasets[0] if datasets else 'not recorded')
    if dataset_text == _BUILTIN_DATASET:
        dataset_text = (f"{_BUILTIN_DATASET} (the Fashion-MNIST subset built into titans-timm, MIT licence: "
                        f"4,000 images of Fashion-MNIST's train split for training, 1,000 of its test split "
                        f"for validation)")

    groups = split_parameters(model)
    counts = {k: sum(p.numel() for _, p in groups.get(k, ())) for k in ('backbone', 'memory', 'head')}
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
        preview = f" ({', '.join(map(str, list(label_names)[:10]))}{', ...' if len(label_names) > 10 else ''})"
    args_table = ['| Argument | Value |', '|---|---|']
    args_table += [f'| {k} | `{_md_escape(json.dumps(v))}` |' for k, v in sorted(model_args.items())]
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
        model_args_table='\n'.join(args_table),
        training=_training_section(recipe, has_memory=approach is not None,
                                   from_checkpoint=not start_text.startswith('random')),
        results=_results_section(rows, dataset_text),
    )


def render_card(model: nn.Module, *, template: Optional[PathLike] = None, **fields) -> str:
    """The model card (README.md) of ``model`` (for parameter counts, memory placement, normalisation), rendered
    from ``template`` (default ``hub_cards/model_card.md``) with :func:`card_fields` (``**fields`` are its keyword
    arguments). Raises :class:`HubError` for a missing template, a bad report or recipe, a placeholder with no
    value, or front matter that does not parse."""
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
    held = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if held:
        more = f' and {len(held) - 5} more' if len(held) > 5 else ''
        raise HubError(f"{folder} already holds other files ({', '.join(held[:5])}{more}); the export never "
                       f'overwrites files: pass a new or empty folder to --dry-run, or move them out first')


def _write_folder(files: Dict[str, Union[bytes, Path]], folder: Path) -> None:
    """Write ``files`` into the new or empty ``folder`` (atomically, each with the mode of a new file); a write that
    fails (disk full, read-only) removes what was written, and the folder if it was new."""
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


def _upload(files: Dict[str, Union[bytes, Path]], repo_id: str, *, token: str, private: bool,
            endpoint: Optional[str], revision: Optional[str], commit_message: str) -> Dict[str, Any]:
    """Create the repository if needed and commit ``files`` to it in one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    endpoint = (endpoint or constants.ENDPOINT).rstrip('/')
    api = HfApi(endpoint=endpoint, token=token, library_name='timm', library_version=timm.__version__)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.create_commit(repo_id=repo_url.repo_id, revision=revision, commit_message=commit_message,
                                   operations=[CommitOperationAdd(name, data if isinstance(data, bytes) else str(data))
                                               for name, data in files.items()])
    except OfflineModeIsEnabled:
        raise HubError('HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push, or use --dry-run DIR to '
                       'write the folder and upload it later with `hf upload`') from None
    except HfHubHTTPError as e:
        status = getattr(e.response, 'status_code', None)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if status in (401, 403):
            raise HubError(f'the Hub at {endpoint} refused the token ({status}: {first}); create a token with '
                           f'write access at https://huggingface.co/settings/tokens and pass --token or set '
                           f'HF_TOKEN') from None
        raise HubError(f'upload of {repo_id} to {endpoint} failed ({status}: {first}); check the repo id and your '
                       f'rights to it') from None
    except (OSError, HfHubHTTPError.__mro__[1]) as e:  # the HTTP client's transport errors need not be OSErrors
        raise HubError(f'cannot reach the Hugging Face Hub at {endpoint} ({type(e).__name__}: {str(e)[:200]}); check '
                       f'the network or HF_ENDPOINT, or use --dry-run DIR and upload the folder later with `hf upload`'
                       ) from None
    except ValueError as e:  # the Hub's README front matter check
        raise HubError(f'the Hub at {endpoint} rejected the model card ({str(e).splitlines()[0]}); fix the card '
                       f'template front matter') from None
    return dict(repo_id=repo_url.repo_id, url=str(repo_url), commit_url=commit.commit_url, commit_oid=commit.oid)


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
        checkpoint: a run folder (``OUTPUT/EXPERIMENT``) or its ``model.safetensors``, uploaded as they are; or an
            older single-file checkpoint, or a plain state dict (``.safetensors`` or ``.pth``) with
            ``architecture=NAME`` and the model kwargs in ``model_overrides``, written in the same layout first.
        repo_id: ``ORG/NAME`` of the Hub repository (created if missing).
        eval_report: ``titans-timm-eval`` report(s) (path, dict or list) for the card's results; default: the run
            record's reports of these weights.
        recipe: training recipe (path or dict); default: the run record's arguments (or its args.yaml).
        token: Hub token with write access; default ``HF_TOKEN`` / the ``hf auth login`` token.
        private: create the repository private.
        dry_run_dir: a new or empty folder to write the exact files to, instead of uploading them.
        license, base_model, datasets: card front matter (defaults: apache-2.0, the Hub checkpoint the recipe
            loaded, the Hub ids of the datasets named in the report and recipe).
        card_template: another ``string.Template`` card; default ``hub_cards/model_card.md``.
        commit_message, revision, endpoint: of the upload (defaults: a message naming the checkpoint, main,
            ``HF_ENDPOINT`` or https://huggingface.co).
        label_names: class names, for a single-file checkpoint or state dict that has none.
        **model_overrides: ``architecture=`` and model kwargs for :func:`titans_timm.checkpoint.load_model`.

    Returns:
        ``repo_id``, ``folder`` (the dry-run folder, else None), ``files``, and for uploads ``url``,
        ``commit_url`` and ``commit_oid``.

    Raises:
        HubError: any failure, with what to do (bad checkpoint, missing token, unreachable Hub, ...).
    """
    if not re.fullmatch(_REPO_ID_RE, str(repo_id)):
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
        if not token:  # before the card is rendered, so the user is told at once
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


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=KeyValueKwargs,
                        metavar='KEY=VALUE', help='model kwargs for plain state dicts (timm train.py style), '
                                                  'e.g. num_classes=10 img_size=32')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``titans-timm-push``; returns the exit status (2 and one ``error:`` line on bad input)."""
    args = _build_parser().parse_args(argv)
    overrides = {k.replace('-', '_'): v for k, v in args.model_kwargs.items()}
    if args.architecture:
        overrides['architecture'] = args.architecture
    try:
        result = push(args.checkpoint, args.repo_id, eval_report=args.eval_report, recipe=args.recipe,
                      token=args.token, private=args.private, dry_run_dir=args.dry_run, license=args.license,
                      base_model=args.base_model, datasets=args.datasets, card_template=args.card_template,
                      commit_message=args.commit_message, revision=args.revision, endpoint=args.endpoint,
                      **overrides)
    except HubError as e:
        print(f'error: {e}', file=sys.stderr)
        return EXIT_BAD_INPUT
    if result['folder']:
        print(f"wrote {', '.join(result['files'])} to {result['folder']} (dry run, nothing uploaded)")
        print(f"upload later with: hf upload {result['repo_id']} {result['folder']} .")
    else:
        print(f"pushed {', '.join(result['files'])} to {result['url']}")
    print(f"load with: import titans_timm; timm.create_model('hf-hub:{result['repo_id']}', pretrained=True)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
