"""Sweep the memory-augmented ViT zoo with one recipe: train, evaluate and tabulate every combination.

``titans-timm-sweep`` / ``python -m titans_timm.sweep`` / :func:`main` trains every model
``vit_{size}_{approach}_{memory}`` for the chosen ``--model-sizes``, ``--approaches`` and
``--memory-types`` (plus, unless ``--no-baseline``, the plain backbone ``vit_{size}_patch16_224`` as
``vit_{size}_baseline``), each as its own ``titans-timm-train`` run with the same recipe (``-c``)::

    titans-timm-sweep -c train_timm_hparams/fashion_mnist_titans.yaml --model-sizes tiny \\
        --approaches mal,mac,mag --memory-types mlp,simple,advanced --output output/sweep -- --epochs 2

Arguments after ``--`` go to every training run unchanged. Each run lives in ``OUTPUT/NAME/`` (training's
``--output OUTPUT --experiment NAME``), is evaluated with :mod:`titans_timm.evaluate` on the recipe's
validation split (``OUTPUT/NAME/eval_report.json``), and the sweep writes ``OUTPUT/results.csv``,
``OUTPUT/results.md`` (model, params, top-1, top-5, train time, img/s, change against the baseline of the
same size) and ``OUTPUT/results.png`` (top-1 bars).

Design choices:

* Each training run is a subprocess (``python -m titans_timm.train``): a crash, an out-of-memory kill or a
  leaked thread setting in one run cannot spoil the next, and every run starts from the same process
  state, which also makes the train time comparable. Its output goes to ``OUTPUT/NAME/train.log``
  (``--verbose`` streams it instead); on failure the log's tail is printed, the sweep moves on and the
  run is listed as failed (exit status 1 at the end).
* ``-j/--jobs N`` trains up to N runs at once, each with ``OMP_NUM_THREADS=max(1, cores // N)`` unless the user
  set it; every run gets the same thread count whatever order the slots free up in, so a run's weights do not
  depend on N beyond that count (which is recorded as ``omp_num_threads`` in its ``sweep_run.json``). Output then
  always goes to the logs, the sweep prints a line as each run starts and ends, and the runs are evaluated in plan
  order once all have trained. Ctrl-C (or SIGTERM) reaches only the sweep (each run has its own session); it
  passes one SIGINT to every run still training, which finishes its step and writes its resumable checkpoint, and
  exits 130.
* A run is finished when ``OUTPUT/NAME/model.safetensors`` and training's final summary
  ``OUTPUT/NAME/results.json`` exist (training writes both only when it completes). A re-run skips
  finished runs; an interrupted run (one with ``train_state.pth`` but no final summary) continues with
  training's ``--resume``, a run that never got that far is trained again. ``--force`` retrains everything
  from scratch.
* What a run was trained with is recorded in ``OUTPUT/NAME/sweep_run.json`` before training starts
  (``trained_with``: the model, the recipe's contents and the pass-through arguments). A re-run reuses a
  finished run only if that record equals what this sweep would run; otherwise (another recipe,
  ``-- --epochs 2`` ...) it stops before training anything, with one error that names the run and the
  difference: runs of different budgets must not share one table. ``--force`` retrains them, a new
  ``--output`` keeps both. An interrupted run with other settings is started over instead of resumed (one
  without a record, left by an older sweep, is resumed as that sweep would).
* A run is evaluated once: the report its run record holds (:class:`titans_timm.run_record.RunRecord`) is reused
  if it describes this evaluation (:func:`titans_timm.run_record.report_mismatch`: the sha256 of the current
  weights, the dataset, split and sample count); a report of other data (``titans-timm-eval --split train``) or
  of earlier weights is not, and the run is evaluated again.
* Baselines run first, so the change against the baseline is known as each memory model finishes.
* Evaluation takes the data from the run's own record (``titans-timm-eval --checkpoint RUN``), so it uses the
  dataset, split and sample count the run validated on, whatever came from the recipe or the pass-through
  arguments.
* Train time is training's own ``train_time_s`` (process start-up excluded); img/s is the evaluator's
  inference throughput (model forward only, batch size of the recipe's validation).
"""
import argparse
import csv
import io
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Union

from titans_timm import stats
from titans_timm.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, Parser
from titans_timm.devices import cpu_cores
from titans_timm.run_record import ARGS_NAME, RECORD_NAME, RunRecord, file_sha256, read_args

__all__ = ['SIZES', 'APPROACHES', 'SweepError', 'SweepRun', 'build_parser', 'plan_runs', 'is_finished',
           'trained_with', 'settings_difference', 'eval_argv', 'summarize', 'results_markdown', 'write_results',
           'main', 'cli', 'cpu_cores', 'training_threads', 'RESULT_COLUMNS', 'SUMMARY_COLUMNS']

SIZES = ('tiny', 'small', 'base')
APPROACHES = ('mal', 'mac', 'mag')
RUN_SUMMARY = 'results.json'  # training's final summary
SWEEP_RECORD = 'sweep_run.json'
TRAIN_STATE = 'train_state.pth'  # written by training at each epoch end and on Ctrl-C
CHECKPOINT = 'model.safetensors'
EVAL_REPORT = 'eval_report.json'
RESULT_COLUMNS = ('name', 'variant', 'seed', 'model', 'size', 'approach', 'memory_type', 'status', 'params', 'top1',
                  'top5', 'loss', 'num_samples', 'train_time_s', 'img_per_sec', 'delta_top1', 'run_dir')
# results.csv: one row per variant, over its seeds
SUMMARY_COLUMNS = ('name', 'size', 'approach', 'memory_type', 'status', 'seeds', 'params', 'top1_mean', 'top1_sd',
                   'top1_ci_low', 'top1_ci_high', 'test_se', 'delta_mean', 'delta_sd', 'delta_ci_low',
                   'delta_ci_high', 'delta_excludes_zero', 'pairs', 'train_time_s', 'img_per_sec')
CONFIDENCE = 0.95


class SweepError(Exception):
    """Bad sweep input (unknown size, missing recipe, ...); the message says what to do."""


class SweepRun(dict):
    """One planned run: ``name`` (its folder), ``variant`` (the table row it counts towards), ``model`` (timm name),
    ``size``, ``approach``, ``memory_type`` (``None`` for a baseline), ``seed`` (``None``: the recipe's) and
    ``args`` (trainer arguments the sweep adds for this run: ``--seed``, a baseline's ``--pretrained-path``)."""

    @property
    def is_baseline(self) -> bool:
        return self['approach'] is None


def _memory_types() -> tuple:
    from titans_timm.memory import MEMORY_TYPES
    return tuple(MEMORY_TYPES)


def _split_list(text: str, allowed: Sequence[str], flag: str) -> List[str]:
    items = [t.strip().lower() for t in text.split(',') if t.strip()]
    if not items:
        raise SweepError(f'{flag} needs at least one of {",".join(allowed)}')
    bad = [t for t in items if t not in allowed]
    if bad:
        raise SweepError(f'{flag}: unknown {", ".join(bad)}; choose from {",".join(allowed)}')
    return list(dict.fromkeys(items))  # keep order, drop repeats


def build_parser() -> argparse.ArgumentParser:
    """The ``titans-timm-sweep`` argument parser; arguments after ``--`` pass through to training."""
    parser = Parser(
        prog='titans-timm-sweep',
        description='Train and evaluate every size x approach x memory type (plus the plain backbone) with one '
                    'recipe; arguments after -- go to titans-timm-train.')
    parser.add_argument('-c', '--config', required=True, metavar='YAML', help='training recipe for every run')
    parser.add_argument('--model-sizes', default='tiny', help='comma-separated: tiny,small,base (default: tiny)')
    parser.add_argument('--approaches', default='mal,mac,mag', help='comma-separated: mal,mac,mag (default: all)')
    parser.add_argument('--memory-types', default='mlp,simple,advanced',
                        help='comma-separated: mlp,simple,advanced (default: all)')
    parser.add_argument('--no-baseline', action='store_true', default=False,
                        help='skip the plain-backbone baseline runs')
    parser.add_argument('--output', default='output/sweep', metavar='DIR',
                        help='sweep folder: one sub-folder per run plus results.* (default: output/sweep)')
    parser.add_argument('--dry-run', action='store_true', default=False, help='print the plan and exit')
    parser.add_argument('--force', action='store_true', default=False, help='retrain finished runs too')
    parser.add_argument('--eval-split', default=None,
                        help="split to evaluate (default: the recipe's validation split)")
    parser.add_argument('--seeds', type=int, default=1, metavar='N',
                        help="train every variant and the baseline with N seeds (the recipe's seed, +1, ...; "
                             "default 1: the recipe's seed) and report means, 95%% t-intervals and the paired "
                             "difference to the baseline")
    parser.add_argument('-j', '--jobs', type=int, default=1, metavar='N',
                        help='train up to N runs at once, each a subprocess with OMP_NUM_THREADS=max(1, cores // N) '
                             'unless you set OMP_NUM_THREADS (the thread count is part of what a run reproduces: '
                             '-j 2 on 2 cores gives the weights of OMP_NUM_THREADS=1 -j 1). With N > 1 every run '
                             'writes its output to OUTPUT/NAME/train.log and the sweep prints one line as each '
                             'starts and ends; the runs are evaluated one by one once all have trained. '
                             'Default 1: one run at a time, each evaluated as it ends')
    parser.add_argument('--verbose', action='store_true', default=False,
                        help='stream training output instead of writing OUTPUT/NAME/train.log (-j 1 only)')
    return parser


def _tagged_backbone(size: str, tag: str, approaches: Sequence[str], memory_types: Sequence[str]):
    """(baseline model name, baseline trainer args) for the recipe's pretrained ``tag`` at ``size``.

    A tag whose weights are a file (the shipped ``fmnist5``) gives the plain backbone those weights through
    ``--pretrained-path``; a Hub tag is a tag of timm's own ViT too."""
    import timm
    name = f'vit_{size}_{approaches[0]}_{memory_types[0]}.{tag}'
    cfg = timm.models.get_pretrained_cfg(name) if name in timm.list_pretrained(name) else None
    if cfg is None:
        known = sorted({n.split('.', 1)[1] for n in timm.list_pretrained(f'vit_{size}_*_*') if '.' in n})
        raise SweepError(f"the recipe's pretrained tag '{tag}' has no weights for size {size}; "
                         f"tags for {size}: {', '.join(known) or 'none'}")
    if cfg.file:
        return f'vit_{size}_patch16_224', ['--pretrained-path', str(cfg.file)]
    return f'vit_{size}_patch16_224.{tag}', []


def plan_runs(sizes: Sequence[str], approaches: Sequence[str], memory_types: Sequence[str],
              baseline: bool = True, seeds: Optional[Sequence[int]] = None, tag: str = '') -> List[SweepRun]:
    """The runs of a sweep in execution order: per size and seed, the baseline first, then approach x memory type.

    ``seeds``: ``None`` runs each variant once with the recipe's seed, in ``OUTPUT/<variant>``; a list runs it
    once per seed, in ``OUTPUT/<variant>-seed<S>``. ``tag``: the recipe's pretrained tag (``fmnist5``), given to
    every memory model, and to the baseline as the same backbone weights."""
    runs = []
    for size in sizes:
        base_model, base_args = (_tagged_backbone(size, tag, approaches, memory_types) if tag
                                 else (f'vit_{size}_patch16_224', []))
        for seed in (seeds if seeds is not None else [None]):
            suffix, seed_args = ('', []) if seed is None else (f'-seed{seed}', ['--seed', str(seed)])
            if baseline:
                variant = f'vit_{size}_baseline'
                runs.append(SweepRun(name=variant + suffix, variant=variant, model=base_model, size=size,
                                     approach=None, memory_type=None, seed=seed, args=seed_args + base_args))
            for approach in approaches:
                for memory_type in memory_types:
                    variant = f'vit_{size}_{approach}_{memory_type}'
                    runs.append(SweepRun(name=variant + suffix, variant=variant,
                                         model=f'{variant}.{tag}' if tag else variant, size=size, approach=approach,
                                         memory_type=memory_type, seed=seed, args=list(seed_args)))
    return runs


def is_finished(run_dir: str) -> bool:
    """A run is finished when its final weights and training's final summary (results.json) both exist."""
    return os.path.isfile(os.path.join(run_dir, CHECKPOINT)) and os.path.isfile(os.path.join(run_dir, RUN_SUMMARY))


def eval_argv(run_dir: str, split: Optional[str] = None) -> List[str]:
    """Evaluator arguments for ``run_dir``: its model on the data its training validated on (its run record)."""
    argv = ['--checkpoint', os.path.join(run_dir, CHECKPOINT), '--output', run_dir, '--no-progress']
    if not os.path.isfile(os.path.join(run_dir, RECORD_NAME)) and os.path.isfile(os.path.join(run_dir, ARGS_NAME)):
        argv = ['-c', os.path.join(run_dir, ARGS_NAME)] + argv  # a run older than the run record
    if split:
        argv += ['--split', split]
    return argv


def trained_with(config: Union[str, dict], run: SweepRun, passthrough: Sequence[str]) -> dict:
    """What decides a run's weights, as recorded in ``sweep_run.json``: model, recipe contents, pass-through args.

    The recipe's contents (``config``: its path, or the contents already read), not its path: an edited recipe is
    another recipe, a moved one is the same.
    """
    recipe = config if isinstance(config, dict) else read_args(config)
    recipe = json.loads(json.dumps(recipe, default=str))  # JSON-comparable, as it is stored
    return dict(model=run['model'], recipe=recipe, passthrough=list(run.get('args') or []) + list(passthrough))


def _recorded_training(record: dict) -> dict:
    """``trained_with`` of a ``sweep_run.json``; records of older sweeps hold only the command."""
    if isinstance(record.get('trained_with'), dict):
        return record['trained_with']
    cmd = list(record.get('command') or [])
    if '--experiment' not in cmd:
        return {}
    passthrough = cmd[cmd.index('--experiment') + 2:]
    if passthrough[-2:-1] == ['--resume']:  # added by the sweep when it resumed the run
        passthrough = passthrough[:-2]
    elif passthrough[-1:] == ['--force']:    # added by the sweep when it trained the run from scratch
        passthrough = passthrough[:-1]
    model = cmd[cmd.index('--model') + 1] if '--model' in cmd else None
    return dict(model=model, passthrough=passthrough)  # the recipe's contents were not recorded


# Trainer flags that change how a run is watched, not what it learns: ignored when comparing settings.
_NEUTRAL_FLAGS = ('--workers', '-j', '--no-progress', '--log-interval', '--checkpoint-interval')


def _settings_of(passthrough: Sequence[str]) -> Dict[str, List[str]]:
    """Pass-through arguments as {flag: values}, in a form where ``--epochs=2`` equals ``--epochs 2`` and the
    order of flags does not matter; flags that do not change the weights (``_NEUTRAL_FLAGS``) left out."""
    settings, flag = {}, None
    for token in passthrough:
        is_flag = token.startswith('-') and not token.lstrip('-').replace('.', '', 1).isdigit()
        if is_flag:
            flag, _, value = token.partition('=')
            settings[flag] = [value] if value else []
        elif flag is not None:
            settings[flag].append(token)
        else:
            settings.setdefault('', []).append(token)
    return {k: v for k, v in settings.items() if k not in _NEUTRAL_FLAGS}


def _differences(recorded: dict, wanted: dict) -> List[str]:
    diffs = []
    if recorded.get('model') != wanted['model']:
        diffs.append(f"model {recorded.get('model')} -> {wanted['model']}")
    if 'recipe' in recorded and recorded['recipe'] != wanted['recipe']:
        old, new = recorded['recipe'] or {}, wanted['recipe']
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                diffs.append(f'recipe {key}: {old.get(key, "(unset)")} -> {new.get(key, "(unset)")}')
    if _settings_of(recorded.get('passthrough') or []) != _settings_of(wanted['passthrough']):
        diffs.append(f"arguments after --: '{' '.join(recorded.get('passthrough') or []) or '(none)'}' -> "
                     f"'{' '.join(wanted['passthrough']) or '(none)'}'")
    return diffs


def settings_difference(run_dir: str, wanted: dict) -> Optional[str]:
    """How the run in ``run_dir`` was trained differently from ``wanted`` (:func:`trained_with`); ``None`` if not."""
    path = os.path.join(run_dir, SWEEP_RECORD)
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return f'it has no readable {SWEEP_RECORD}, so how it was trained is unknown'
    recorded = _recorded_training(record) if isinstance(record, dict) else {}
    if not recorded:
        return f'its {SWEEP_RECORD} does not record how it was trained'
    diffs = _differences(recorded, wanted)
    return '; '.join(diffs) if diffs else None


def _train_command(config: str, run: SweepRun, output: str, passthrough: Sequence[str],
                   resume: bool = False) -> List[str]:
    # Our flags come after the recipe (command line beats YAML) and before the pass-through ones, so a user
    # can still override e.g. --epochs; --model/--output/--experiment are owned by the sweep. A resumed run
    # continues its folder; any other run trains from scratch, where the trainer would refuse the files an
    # earlier attempt left (a checkpoint pair, summary.csv) without --force.
    return [sys.executable, '-m', 'titans_timm.train', '-c', config, '--model', run['model'],
            '--output', output, '--experiment', run['name'], *(run.get('args') or []), *passthrough,
            *(['--resume', os.path.join(output, run['name'])] if resume else ['--force'])]


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f'{minutes}:{seconds:02d}'


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors='replace') as f:
            return ''.join(f.readlines()[-lines:])
    except OSError:
        return ''


def training_threads(jobs: int) -> Optional[str]:
    """``OMP_NUM_THREADS`` each training subprocess gets: the user's own setting if there is one, else
    ``max(1, cores // jobs)`` for ``jobs`` above 1, else ``None`` (torch's default, as one job at a time always had).

    Torch's thread count changes how sums are split, so it is part of what a run reproduces: ``-j 2`` on 2 cores
    gives every run one thread, and so gives the same weights as ``OMP_NUM_THREADS=1`` with ``-j 1``."""
    if os.environ.get('OMP_NUM_THREADS'):
        return os.environ['OMP_NUM_THREADS']
    return str(max(1, cpu_cores() // jobs)) if jobs > 1 else None


def _prepare_run_dir(recipe: dict, run: SweepRun, output: str, passthrough: Sequence[str], cmd: List[str],
                     threads: Optional[str]) -> str:
    run_dir = os.path.join(output, run['name'])
    os.makedirs(run_dir, exist_ok=True)
    # Stale markers of an earlier attempt must not make a failed run look finished.
    for name in (CHECKPOINT, RUN_SUMMARY, EVAL_REPORT):
        if os.path.isfile(os.path.join(run_dir, name)):
            os.remove(os.path.join(run_dir, name))
    # Recorded before training, so an interrupted run is resumed only with the same settings too.
    _write_record(run_dir, dict(run, trained_with=trained_with(recipe, run, passthrough), command=cmd,
                                omp_num_threads=threads))
    return run_dir


class _Slots:
    """Up to ``jobs`` training subprocesses at once, each in its own session so that a terminal's Ctrl-C reaches
    only the sweep, which passes it on once (:meth:`stop`). Output goes to ``OUTPUT/NAME/train.log``, or to the
    terminal with ``to_terminal`` (one job only: bars of two runs would overwrite each other).

    Used as a context manager: leaving it by an exception (Ctrl-C, SIGTERM) stops the trainings still running."""

    def __init__(self, jobs: int, threads: Optional[str], to_terminal: bool = False):
        self.jobs = jobs
        self.env = None if threads is None else dict(os.environ, OMP_NUM_THREADS=threads)
        self.to_terminal = to_terminal and jobs == 1
        self.running: List[dict] = []
        self._previous_sigterm = None

    def __enter__(self):
        try:  # a scheduler's SIGTERM stops the trainings the way Ctrl-C does
            self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if self.running:
                self.stop()
        finally:
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
                self._previous_sigterm = None

    def full(self) -> bool:
        return len(self.running) >= self.jobs

    def start(self, cmd: List[str], log_path: str, **info) -> dict:
        """Start ``cmd``; ``info`` (the run, its index ...) comes back with it from :meth:`wait`."""
        log = None if self.to_terminal else open(log_path, 'w')
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=None if log is None else subprocess.STDOUT,
                                    env=self.env, start_new_session=True)
        except BaseException:
            if log is not None:
                log.close()
            raise
        job = dict(info, proc=proc, log_file=log, command=cmd, log=None if log is None else log_path,
                   start=time.perf_counter())
        self.running.append(job)
        return job

    def wait(self) -> List[dict]:
        """Block until at least one training has ended; return the ended ones (``returncode``, ``train_time_s``:
        wall time) in the order they were started. Empty when none is running."""
        while self.running:
            ended = [job for job in self.running if job['proc'].poll() is not None]
            if ended:
                now = time.perf_counter()
                for job in ended:
                    if job['log_file'] is not None:
                        job['log_file'].close()
                    job.update(returncode=job['proc'].returncode, train_time_s=now - job['start'])
                self.running = [job for job in self.running if job not in ended]
                return ended
            time.sleep(0.1)
        return []

    def stop(self):
        """Ctrl-C: one SIGINT to every running training (it finishes its step, writes its resumable checkpoint and
        exits 130), then wait for them; a second Ctrl-C sends another (they abort), a third kills them."""
        for attempt in range(3):
            for job in self.running:
                if attempt < 2:
                    job['proc'].send_signal(signal.SIGINT)
                else:
                    job['proc'].kill()
            if attempt == 0 and self.running:
                print(f'stopping {len(self.running)} training run(s); each writes its resumable checkpoint '
                      f'(Ctrl-C again aborts them)', file=sys.stderr, flush=True)
            try:
                while self.running:
                    self.wait()
                return
            except KeyboardInterrupt:
                continue


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _write_record(run_dir: str, record: dict):
    from titans_timm.checkpoint import atomic_write_bytes
    atomic_write_bytes(os.path.join(run_dir, SWEEP_RECORD), json.dumps(record, indent=2).encode())


def _evaluate(run_dir: str, split: Optional[str], prefix: str = '') -> dict:
    """The run's eval report: the one its run record holds for these weights and this data, else a new one."""
    from titans_timm import evaluate
    args = evaluate.parse_args(eval_argv(run_dir, split))
    record = RunRecord.load(run_dir) or RunRecord()
    report, why = record.report_for(file_sha256(os.path.join(run_dir, CHECKPOINT)), evaluate.report_data(args))
    if report is not None:
        return report
    if record.eval_reports:
        print(f'{prefix}: evaluating again: the recorded {EVAL_REPORT} does not fit ({why})', flush=True)
    return evaluate.run(args)


def _result_row(run: SweepRun, run_dir: str, status: str, report: Optional[dict] = None) -> Dict[str, object]:
    row = {k: None for k in RESULT_COLUMNS}
    row.update(name=run['name'], variant=run.get('variant', run['name']), seed=run.get('seed'), model=run['model'],
               size=run['size'], approach=run['approach'] or 'baseline', memory_type=run['memory_type'] or '-',
               status=status, run_dir=run_dir)
    summary_path = os.path.join(run_dir, RUN_SUMMARY)
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            row['train_time_s'] = json.load(f).get('train_time_s')
    if report is not None:
        row.update(params=report.get('param_count'), top1=report.get('top1'), top5=report.get('top5'),
                   loss=report.get('loss'), num_samples=report.get('num_samples'),
                   img_per_sec=report.get('img_per_sec'))
    return row


def _add_deltas(rows: List[dict]):
    """Each memory run's top-1 minus the baseline run of the same size and seed."""
    base = {(r['size'], r.get('seed')): r['top1'] for r in rows if r['approach'] == 'baseline' and r['top1'] is not None}
    for r in rows:
        key = (r['size'], r.get('seed'))
        if r['approach'] != 'baseline' and r['top1'] is not None and key in base:
            r['delta_top1'] = r['top1'] - base[key]


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def summarize(rows: List[dict], confidence: float = CONFIDENCE) -> List[Dict[str, object]]:
    """One row per variant (:data:`SUMMARY_COLUMNS`): top-1 mean, sd and t-interval over its seeds, the test
    set's standard error, and the paired difference to the baseline of its size over the seeds both finished."""
    groups: Dict[str, List[dict]] = {}
    for r in rows:
        groups.setdefault(r.get('variant') or r['name'], []).append(r)
    baselines = {}
    for name, runs in groups.items():
        if runs[0]['approach'] == 'baseline':
            baselines[runs[0]['size']] = {r.get('seed'): r['top1'] for r in runs if r['top1'] is not None}
    out = []
    for name, runs in groups.items():
        first, done = runs[0], [r for r in runs if r['top1'] is not None]
        failed = len(runs) - len(done)
        row = {k: None for k in SUMMARY_COLUMNS}
        row.update(name=name, size=first['size'], approach=first['approach'], memory_type=first['memory_type'],
                   seeds=len(done), pairs=None,
                   status='done' if not failed else 'failed' if not done else f'{failed} of {len(runs)} failed',
                   params=first.get('params') if first.get('params') is not None else _mean(
                       [r['params'] for r in done if r.get('params') is not None]),
                   train_time_s=_mean([r['train_time_s'] for r in done if r.get('train_time_s') is not None]),
                   img_per_sec=_mean([r['img_per_sec'] for r in done if r.get('img_per_sec') is not None]))
        if done:
            ci = stats.t_interval([r['top1'] for r in done], confidence)
            row.update(top1_mean=ci['mean'], top1_sd=ci['sd'], top1_ci_low=ci['low'], top1_ci_high=ci['high'])
            ses = [stats.binomial_se(r['top1'], r['num_samples']) for r in done if r.get('num_samples')]
            row['test_se'] = _mean(ses)
        base = baselines.get(first['size'], {})
        pairs = [(r['top1'], base[r.get('seed')]) for r in done if r.get('seed') in base]
        if first['approach'] != 'baseline' and pairs:
            diff = stats.paired_difference([p[0] for p in pairs], [p[1] for p in pairs], confidence)
            row.update(delta_mean=diff['mean'], delta_sd=diff['sd'], delta_ci_low=diff['low'],
                       delta_ci_high=diff['high'], delta_excludes_zero=diff['excludes_zero'], pairs=len(pairs))
        out.append(row)
    return out


def _fmt(value, spec: str, missing: str = '-') -> str:
    return missing if value is None else format(value, spec)


def _interval(low, high, spec: str) -> str:
    return '-' if low is None else f'[{format(low, spec)}, {format(high, spec)}]'


def results_markdown(summary: List[dict], confidence: float = CONFIDENCE) -> str:
    """The results table as Markdown, with a note on what the intervals mean."""
    pct = f'{100 * confidence:.0f}%'
    lines = [f'| model | seeds | top-1 (%) mean | sd | {pct} CI | vs baseline (paired) | {pct} CI of difference | '
             f'params (M) | train time (s) | img/s |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for r in summary:
        name = r['name'] if r['status'] == 'done' else f'{r["name"]} ({r["status"]})'
        if r['approach'] == 'baseline':
            delta, delta_ci = '(baseline)', ''
        else:
            delta = _fmt(r['delta_mean'], '+.2f')
            delta_ci = _interval(r['delta_ci_low'], r['delta_ci_high'], '+.2f')
            if r['delta_excludes_zero']:
                delta_ci = f'**{delta_ci}**'
        lines.append(f'| {name} | {r["seeds"]} | {_fmt(r["top1_mean"], ".2f")} | {_fmt(r["top1_sd"], ".2f")} | '
                     f'{_interval(r["top1_ci_low"], r["top1_ci_high"], ".2f")} | {delta} | {delta_ci} | '
                     f'{_fmt(None if r["params"] is None else r["params"] / 1e6, ".2f")} | '
                     f'{_fmt(r["train_time_s"], ".0f")} | {_fmt(r["img_per_sec"], ".1f")} |')
    runs = sum(r['seeds'] or 0 for r in summary)
    se = [r['test_se'] for r in summary if r['test_se'] is not None]
    lines += ['', f'{len(summary)} variants, {runs} finished runs. Intervals: two-sided {pct} Student-t over seeds '
                  f'(n - 1 degrees of freedom); the difference to the baseline is paired by seed (same data order '
                  f'and head init); **bold**: its interval excludes zero.' +
              (f' One run\'s test-set standard error: about {_mean(se):.2f} points.' if se else '')]
    return '\n'.join(lines) + '\n'


def _write_text(path: str, text: str) -> None:
    from titans_timm.checkpoint import atomic_write_bytes
    atomic_write_bytes(path, text.encode())


def _csv_text(rows: List[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator='\n')
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ('' if r.get(k) is None else r[k]) for k in columns})
    return buf.getvalue()


def write_results(rows: List[dict], output: str) -> Dict[str, str]:
    """Write ``runs.csv`` (one row per run), ``results.csv`` and ``results.md`` (one row per variant, with
    intervals: :func:`summarize`) and ``results.png`` (mean top-1 per variant with its interval)."""
    os.makedirs(output, exist_ok=True)
    summary = summarize(rows)
    files = dict(runs_csv=os.path.join(output, 'runs.csv'), csv=os.path.join(output, 'results.csv'),
                 md=os.path.join(output, 'results.md'), png=os.path.join(output, 'results.png'))
    _write_text(files['runs_csv'], _csv_text(rows, RESULT_COLUMNS))
    _write_text(files['csv'], _csv_text(summary, SUMMARY_COLUMNS))
    _write_text(files['md'], results_markdown(summary))
    _plot_results(summary, files['png'])
    return files


def _plot_results(summary: List[dict], path: str):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    colors = dict(baseline='tab:gray', mal='tab:blue', mac='tab:orange', mag='tab:green')
    n = len(summary)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.6 * n), 4.8), dpi=100, layout='constrained')
    means = [r['top1_mean'] if r['top1_mean'] is not None else 0.0 for r in summary]
    err = [[m - r['top1_ci_low'] if r['top1_ci_low'] is not None else 0.0 for m, r in zip(means, summary)],
           [r['top1_ci_high'] - m if r['top1_ci_high'] is not None else 0.0 for m, r in zip(means, summary)]]
    ax.bar(range(n), means, color=[colors.get(r['approach'], 'tab:purple') for r in summary],
           yerr=err, capsize=3, error_kw=dict(linewidth=1))
    for i, r in enumerate(summary):
        if r['top1_mean'] is None:
            label = 'failed'
        else:
            label = f'{r["top1_mean"]:.1f}'
            if r['delta_mean'] is not None:
                label += f'\n{r["delta_mean"]:+.1f}' + ('*' if r['delta_excludes_zero'] else '')
        ax.text(i, means[i] + err[1][i], label, ha='center', va='bottom', fontsize=7)
    for size in dict.fromkeys(r['size'] for r in summary):
        base = [r['top1_mean'] for r in summary
                if r['size'] == size and r['approach'] == 'baseline' and r['top1_mean'] is not None]
        idx = [i for i, r in enumerate(summary) if r['size'] == size]
        if base and idx:
            ax.hlines(base[0], min(idx) - 0.4, max(idx) + 0.4, colors='black', linestyles='dashed', linewidth=1)
    ax.set_xticks(range(n), [r['name'].replace('vit_', '') for r in summary], rotation=60, ha='right', fontsize=8)
    ax.set_ylabel('top-1 (%)')
    lows = [lo for lo, r in zip((m - e for m, e in zip(means, err[0])), summary) if r['top1_mean'] is not None]
    # Zoom to the range the runs span (the numbers are printed on the bars): runs a point apart stay visible.
    ax.set_ylim(max(0.0, 10.0 * math.floor((min(lows) - 5.0) / 10.0)) if lows else 0.0, 100.0)
    seeds = sorted({r['seeds'] for r in summary if r['seeds']})
    ax.set_title(f'Top-1 per variant, mean over {"/".join(map(str, seeds)) or 0} seed(s), '
                 f'{100 * CONFIDENCE:.0f}% t-interval\n(dashed: baseline; second number: paired difference, '
                 f'* = interval excludes 0)', fontsize=9)
    handles = [matplotlib.patches.Patch(color=c, label=k) for k, c in colors.items()
               if any(r['approach'] == k for r in summary)]
    ax.legend(handles=handles, fontsize=8, loc='upper left', bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _split_argv(argv: Sequence[str]):
    argv = list(argv)
    if '--' in argv:
        i = argv.index('--')
        return argv[:i], argv[i + 1:]
    return argv, []


def run_sweep(args: argparse.Namespace, passthrough: Sequence[str]) -> dict:
    """Run the sweep for parsed arguments (see :func:`build_parser`); return the plan, rows and files."""
    if not os.path.isfile(args.config):
        raise SweepError(f'recipe {args.config!r} not found; pass a YAML from train_timm_hparams/ with -c')
    sizes = _split_list(args.model_sizes, SIZES, '--model-sizes')
    approaches = _split_list(args.approaches, APPROACHES, '--approaches')
    memory_types = _split_list(args.memory_types, _memory_types(), '--memory-types')
    if args.seeds < 1:
        raise SweepError(f'--seeds must be at least 1, got {args.seeds}')
    if args.jobs < 1:
        raise SweepError(f'--jobs must be at least 1, got {args.jobs}')
    owned_flags = ('--model', '--output', '--experiment', '-c', '--config') + (('--seed',) if args.seeds > 1 else ())
    owned = [a for a in passthrough if a.split('=')[0] in owned_flags]
    if owned:
        raise SweepError(f'{", ".join(owned)} after -- would override what the sweep sets per run; use the '
                         f'sweep\'s own flags (-c, --output, --model-sizes/--approaches/--memory-types)')
    recipe = read_args(args.config)
    recipe_model = str(recipe.get('model') or '')
    tag = recipe_model.split('.', 1)[1] if '.' in recipe_model else ''
    seeds = None
    if args.seeds > 1:
        base_seed = int(recipe.get('seed', 42))
        seeds = [base_seed + i for i in range(args.seeds)]
    runs = plan_runs(sizes, approaches, memory_types, baseline=not args.no_baseline, seeds=seeds, tag=tag)
    total = len(runs)
    output = args.output
    # Runs this sweep would reuse (finished: an error) or continue (interrupted: started over) but that were
    # trained with other settings.
    stale, restart = {}, {}
    for run in runs:
        run_dir = os.path.join(output, run['name'])
        finished = is_finished(run_dir)
        interrupted = not finished and os.path.isfile(os.path.join(run_dir, TRAIN_STATE))
        if interrupted and not os.path.isfile(os.path.join(run_dir, SWEEP_RECORD)):
            continue   # left by a sweep that recorded settings only at the end: resumed, as that sweep would
        if not args.force and (finished or interrupted):
            why = settings_difference(run_dir, trained_with(recipe, run, passthrough))
            if why:
                (stale if finished else restart)[run['name']] = why

    if args.dry_run:
        # The thread count the sweep sets is part of each command (it shapes the weights); the user's own is theirs.
        threads = None if os.environ.get('OMP_NUM_THREADS') else training_threads(args.jobs)
        print(f'plan: {total} runs, recipe {args.config}, output {output}' +
              (f', seeds {", ".join(map(str, seeds))}' if seeds else ''))
        for i, run in enumerate(runs, 1):
            run_dir = os.path.join(output, run['name'])
            if args.force or not (is_finished(run_dir) or os.path.isfile(os.path.join(run_dir, TRAIN_STATE))):
                state = 'train + eval'
            elif run['name'] in stale:
                state = f'trained with other settings ({stale[run["name"]]}): needs --force or a new --output'
            elif is_finished(run_dir):
                state = 'finished, skip'
            elif run['name'] in restart:
                state = f'interrupted with other settings ({restart[run["name"]]}): train again + eval'
            else:
                state = 'resume + eval'
            print(f'[{i}/{total}] {run["name"]} ({run["model"]}): {state}')
            print('    ' + (f'OMP_NUM_THREADS={threads} ' if threads else '') +
                  shlex.join(_train_command(args.config, run, output, passthrough, resume=state == 'resume + eval')))
        return dict(plan=runs, rows=[], files={}, failed=[])
    if stale:
        name, why = next(iter(stale.items()))
        more = f' (and {len(stale) - 1} more run(s))' if len(stale) > 1 else ''
        raise SweepError(f'{os.path.join(output, name)}{more} was trained with other settings than this sweep '
                         f'would use ({why}); pass --force to retrain, or a new --output to keep both')

    os.makedirs(output, exist_ok=True)
    threads = training_threads(args.jobs)
    if args.jobs > 1:
        print(f'{args.jobs} trainings at a time, OMP_NUM_THREADS={threads} each ({cpu_cores()} cores); each '
              f'writes OUTPUT/NAME/train.log', flush=True)
    rows, failed = [], []
    trained: Dict[int, Optional[str]] = {}  # plan index -> 'skipped', 'done' or 'failed' once training is over
    t0 = time.perf_counter()

    def training_ended(job: dict):
        run, run_dir, prefix = job['run'], job['run_dir'], job['prefix']
        if job['returncode'] != 0 or not is_finished(run_dir):
            trained[job['index']] = 'failed'
            why = f'exit status {job["returncode"]}' if job['returncode'] else \
                f'no {CHECKPOINT} + {RUN_SUMMARY} written'
            took = f' after {job["train_time_s"]:.0f} s' if args.jobs > 1 else ''
            print(f'{prefix}: training failed ({why}){took}; log: {job["log"]}', flush=True)
            if job['log']:
                print(_tail(job['log']), end='', flush=True)
            return
        _write_record(run_dir, dict(run, trained_with=trained_with(recipe, run, passthrough),
                                    omp_num_threads=threads, wall_time_s=job['train_time_s'],
                                    command=job['command'],
                                    finished_at=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())))
        trained[job['index']] = 'done'
        if args.jobs > 1:
            print(f'{prefix}: trained in {job["train_time_s"]:.0f} s ({_clock(time.perf_counter() - t0)} '
                  f'into the sweep)', flush=True)

    def report(i: int, run: SweepRun):
        """The run's row, in plan order: failed, or evaluated (see _evaluate)."""
        run_dir, prefix = os.path.join(output, run['name']), f'[{i}/{total}] {run["name"]}'
        status = trained[i]
        if status == 'failed':
            failed.append(run['name'])
            rows.append(_result_row(run, run_dir, 'failed'))
            return
        from titans_timm.evaluate import EvalError
        try:
            result = _evaluate(run_dir, args.eval_split, prefix)
        except (EvalError, SystemExit) as e:  # SystemExit: argparse rejected the run's args
            failed.append(run['name'])
            print(f'{prefix}: evaluation failed: {e}', flush=True)
            rows.append(_result_row(run, run_dir, 'eval failed'))
            return
        row = _result_row(run, run_dir, status, result)
        rows.append(row)
        print(f'{prefix}: top-1 {_fmt(row["top1"], ".2f")}%  top-5 {_fmt(row["top5"], ".2f")}%  '
              f'train {_fmt(row["train_time_s"], ".0f")} s  {_fmt(row["img_per_sec"], ".1f")} img/s', flush=True)
        _add_deltas(rows)
        write_results(rows, output)  # after every run, so an interrupted sweep still has its table

    # One job: train a run, evaluate it, next run (the table grows as the sweep goes). More jobs: the runs train
    # in plan order as slots free up, then all are evaluated in plan order, in this process, with no training
    # beside it (img/s stays comparable; the evaluator's results do not depend on --jobs).
    with _Slots(args.jobs, threads, to_terminal=args.verbose) as slots:
        for i, run in enumerate(runs, 1):
            run_dir = os.path.join(output, run['name'])
            prefix = f'[{i}/{total}] {run["name"]}'
            if is_finished(run_dir) and not args.force:
                trained[i] = 'skipped'
                print(f'{prefix}: finished earlier, skipping', flush=True)
            else:
                while slots.full():
                    for job in slots.wait():
                        training_ended(job)
                resume = not args.force and os.path.isfile(os.path.join(run_dir, TRAIN_STATE))
                if resume and run['name'] in restart:
                    print(f'{prefix}: the interrupted run had other settings ({restart[run["name"]]}); starting it '
                          f'over', flush=True)
                    resume = False
                cmd = _train_command(args.config, run, output, passthrough, resume=resume)
                _prepare_run_dir(recipe, run, output, passthrough, cmd, threads)
                log = os.path.join(run_dir, 'train.log')
                print(f'{prefix}: ' + ('resuming the interrupted run' if resume else 'training') +
                      (f' ({_clock(time.perf_counter() - t0)} into the sweep, log: {log})' if args.jobs > 1 else ''),
                      flush=True)
                slots.start(cmd, log, index=i, run=run, run_dir=run_dir, prefix=prefix)
            if args.jobs == 1:
                for job in slots.wait():
                    training_ended(job)
                report(i, run)
        while slots.running:
            for job in slots.wait():
                training_ended(job)
    if args.jobs > 1:
        for i, run in enumerate(runs, 1):
            report(i, run)

    _add_deltas(rows)
    files = write_results(rows, output)
    print(results_markdown(summarize(rows)), end='')
    print(f'results: {files["md"]}, {files["csv"]}, {files["png"]} (per run: {files["runs_csv"]})')
    if failed:
        print(f'{len(failed)} of {total} runs failed: {", ".join(failed)}')
    return dict(plan=runs, rows=rows, files=files, failed=failed)


def main(argv: Optional[Sequence[str]] = None):
    """``titans-timm-sweep``: train + evaluate every combination, then write results.csv/.md/.png.

    Returns ``{'plan', 'rows', 'files', 'failed'}``. Called without ``argv`` (the console script, which hands
    the return value to ``sys.exit``) it returns the exit status instead: 0, or 1 if any run failed. Bad input
    prints ``error: ...`` and raises ``SystemExit(2)``; Ctrl-C (or SIGTERM) stops the trainings under way, each
    writing its resumable checkpoint, and raises ``SystemExit(130)``.
    """
    as_cli = argv is None
    own, passthrough = _split_argv(sys.argv[1:] if as_cli else argv)
    args = build_parser().parse_args(own)
    try:
        result = run_sweep(args, passthrough)
    except SweepError as e:
        print(f'error: {e}', file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM; the trainings still running were stopped (_Slots.stop)
        print('interrupted: run the same command again to resume the stopped runs and skip the finished ones',
              file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    if as_cli:
        return 1 if result['failed'] else 0
    return result


def cli() -> None:
    """Console-script entry point: ``sys.exit(main())``."""
    sys.exit(main())


if __name__ == '__main__':
    cli()
