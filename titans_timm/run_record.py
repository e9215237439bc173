"""The record of one training run, ``RUN/run.json``: what a run folder says about itself besides its model.

A training run folder holds its model in timm's own layout (``config.json`` + ``model.safetensors``, see
:mod:`titans_timm.checkpoint`) and one :class:`RunRecord`::

    {"format_version": 1,
     "args": {"model": "vit_tiny_mag_simple", "seed": 42, "dataset": "fashion-mnist-mini", ...},
     "versions": {"titans_timm": "0.1.0", "timm": "1.0.31", "torch": "2.14.1"},
     "weights_sha256": "9f2c...",           # of model.safetensors, once training has finished
     "eval_reports": [{"split": "validation", "top1": 81.2, "checkpoint_sha256": "9f2c...", ...}]}

The trainer writes it, ``titans-timm-eval`` adds a report each time it evaluates the run's weights, and the sweep
and ``titans-timm-push`` read the arguments and reports through it; nothing else parses it. A report answers only
for the weights and data it evaluated (:func:`report_mismatch`: the sha256 of the weights file, the dataset, data
folder, split, requested sample count and image/label columns).

``args.yaml`` is still written next to it, as timm's train.py writes one: the recipe that re-runs the run with
``-c``. Run folders older than ``run.json`` are read from it (:meth:`RunRecord.load`).
"""
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

__all__ = ['RunRecord', 'RunRecordError', 'RECORD_NAME', 'ARGS_NAME', 'REPORT_DATA_KEYS', 'read_args', 'file_sha256',
           'report_mismatch', 'run_folder']

RECORD_NAME = 'run.json'
ARGS_NAME = 'args.yaml'
# What an evaluation evaluated besides the weights; a report answers for exactly these.
REPORT_DATA_KEYS = ('dataset', 'data_dir', 'split', 'num_samples_requested', 'input_key', 'target_key')


class RunRecordError(ValueError):
    """A run record or recipe cannot be read; the message names the file and what is wrong."""


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes: how a record and a report name the exact weights."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def run_folder(path) -> Optional[Path]:
    """The run folder a checkpoint path names (the folder itself, or the folder of its ``model.safetensors``) if it
    holds a run record; else None."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent if path.name == 'model.safetensors' else None
    return folder if folder is not None and (folder / RECORD_NAME).is_file() else None


def read_args(path) -> Dict[str, Any]:
    """The training arguments of a YAML recipe (``train_timm_hparams/*.yaml``, a run's ``args.yaml``) or a
    ``run.json``, keyed by argparse dest (``freeze-epochs`` -> ``freeze_epochs``).

    Raises:
        RunRecordError: the file is missing, not YAML/JSON, or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise RunRecordError(f'{path} not found')
    try:
        text = path.read_text(encoding='utf-8')
        data = json.loads(text).get('args') if path.suffix == '.json' else yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, AttributeError) as e:
        kind = 'JSON' if path.suffix == '.json' else 'YAML'
        raise RunRecordError(f'{path} is not valid {kind}: {str(e).splitlines()[0]}') from None
    if not isinstance(data if data is not None else {}, dict):
        raise RunRecordError(f'{path} must be a mapping of option names to values')
    return {str(k).replace('-', '_'): v for k, v in (data or {}).items()}


def report_mismatch(report: Any, weights_sha256: Optional[str], data: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """Why ``report`` (a titans-timm-eval report) does not describe the weights whose file has sha256
    ``weights_sha256``, evaluated on ``data`` (:data:`REPORT_DATA_KEYS`; ``None``: on any data); ``None`` if it does.

    Batch size, device, workers and plots do not change the numbers and are not compared.
    """
    if not isinstance(report, dict):
        return 'it is not a JSON object'
    recorded = report.get('checkpoint_sha256')
    if not recorded:
        return 'it does not record which weights it evaluated (no checkpoint_sha256)'
    for key, value in (data or {}).items():
        if key not in report:
            return f'it does not record its {key} (written by an older titans-timm-eval)'
        if report[key] != value:
            return f'its {key} is {report[key]!r}, not {value!r}'
    if recorded != weights_sha256:
        return (f'it evaluated other weights (sha256 {str(recorded)[:12]}...) than the current ones (sha256 '
                f'{str(weights_sha256)[:12]}...); they were probably retrained since')
    return None


@dataclass
class RunRecord:
    """One run's arguments, provenance, weights sha256 and evaluation reports (``RUN/run.json``)."""
    args: Dict[str, Any] = field(default_factory=dict)  # training arguments by argparse dest, as in args.yaml
    versions: Dict[str, str] = field(default_factory=dict)  # titans_timm, timm, torch the run trained with
    weights_sha256: Optional[str] = None  # of model.safetensors; None until training has finished
    eval_reports: List[Dict[str, Any]] = field(default_factory=list)
    format_version: int = 1

    @property
    def seed(self) -> Optional[int]:
        return self.args.get('seed')

    @property
    def dataset(self) -> Optional[str]:
        return self.args.get('dataset')

    @classmethod
    def new(cls, args: Optional[Dict[str, Any]] = None) -> 'RunRecord':
        """The record of a run starting now with training arguments ``args`` (and the package versions it runs on)."""
        import timm
        import torch
        import titans_timm
        return cls(args=dict(args or {}),
                   versions=dict(titans_timm=titans_timm.__version__, timm=timm.__version__, torch=torch.__version__))

    @classmethod
    def load(cls, run_dir) -> Optional['RunRecord']:
        """The record of the run in ``run_dir``: its run.json, else (a run older than run.json) its args.yaml;
        ``None`` when it has neither.

        Raises:
            RunRecordError: a file that cannot be read as a record.
        """
        path, args_yaml = Path(run_dir) / RECORD_NAME, Path(run_dir) / ARGS_NAME
        if not path.is_file():
            return cls(args=read_args(args_yaml)) if args_yaml.is_file() else None
        try:
            data = json.loads(path.read_text(encoding='utf-8'))
            return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise RunRecordError(f'{path} is not a run record ({type(e).__name__}: {e}); restore it or delete it '
                                 f'(the run then counts as one without a record)') from None

    def save(self, run_dir) -> Path:
        """Write ``RUN/run.json`` atomically (readers never see half a record)."""
        from titans_timm.checkpoint import atomic_write_bytes
        path = Path(run_dir) / RECORD_NAME
        atomic_write_bytes(path, json.dumps(asdict(self), indent=2, default=str).encode())
        return path

    def add_report(self, report: Dict[str, Any]) -> None:
        """Keep ``report``, in place of an earlier report of the same weights on the same data."""
        data = {k: report.get(k) for k in REPORT_DATA_KEYS}
        self.eval_reports = [r for r in self.eval_reports
                             if report_mismatch(r, report.get('checkpoint_sha256'), data) is not None] + [report]

    def report_for(self, weights_sha256: str, data: Optional[Dict[str, Any]] = None
                   ) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
        """``(report, None)``: the newest recorded report of these weights on ``data``; else ``(None, why)``, why
        the newest report does not fit (or that there is none)."""
        whys = []
        for report in reversed(self.eval_reports):
            why = report_mismatch(report, weights_sha256, data)
            if why is None:
                return report, None
            whys.append(why)
        return None, whys[0] if whys else 'the run record holds no evaluation report'
