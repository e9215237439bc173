"""Speed and memory of the registered titans-timm models against their plain timm ViT backbone.

For each model the plain backbone (``vit_{size}_patch16_224``) is built next to it and both are timed alternately in
one process (warm-up, then the median, or with ``--stat min`` the minimum, over ``--repeats`` rounds), so the printed
ratios hold up on a busy machine:

* inference img/s: ``model(x)`` under ``torch.inference_mode()`` in eval mode;
* train-step img/s: forward, cross-entropy, backward and an AdamW step in train mode;
* parameters;
* peak training memory: parameters + AdamW state (2x parameters) + the peak of tensor bytes allocated during one
  train step, from ``torch.profiler`` (``profile_memory=True``; each op's self allocation summed in time order).
  This counts exactly what torch allocates, unlike process RSS, which glibc's caching and the other models in the
  process blur, or ``tracemalloc``, which does not see torch's CPU allocator.

Ratios are model / backbone (lower is better); the project's speed targets are printed next to them.

    python benchmarks/model_speed.py                            # the 9 tiny models, batch 8, 224 px
    python benchmarks/model_speed.py --sizes tiny,small --csv speed.csv
    python benchmarks/model_speed.py --models 'vit_tiny_mag_*' --memory-interval 3 --repeats 5
    python benchmarks/model_speed.py --threads 1 --clock cpu --stat min  # on a machine shared with other jobs
    python benchmarks/model_speed.py --device cuda --amp -b 64 --sizes tiny,small,base   # on a GPU, bf16 autocast

On CUDA the clock is read after ``torch.cuda.synchronize()`` and the peak memory is ``torch.cuda.max_memory_allocated``
over the step (the caching allocator's view: every tensor the step held at once).
"""
import argparse
import contextlib
import csv
import fnmatch
import json
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
import timm

import titans_timm  # noqa: F401  (registers the models)

# speed targets (tiny, 224 px, CPU): train step, inference, peak train memory ratios per memory type
TARGETS = {
    'mlp': {'train': 1.3, 'infer': 1.2, 'memory': 2.0},
    'simple': {'train': 2.0, 'infer': None, 'memory': 2.0},
    'advanced': {'train': 2.0, 'infer': 1.8, 'memory': 2.0},
}


AMP = False   # --amp: bf16 autocast around every forward


def _autocast(x: torch.Tensor):
    return torch.autocast(x.device.type, dtype=torch.bfloat16) if AMP else contextlib.nullcontext()


def train_step_fn(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    """A closure running one forward + cross-entropy + backward + AdamW step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(x):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
    return step


def infer_fn(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A closure running one eval-mode forward under inference_mode."""
    def infer():
        with torch.inference_mode(), _autocast(x):
            model(x)
    return infer


CLOCKS = {'wall': time.perf_counter, 'cpu': time.process_time}
_clock = time.perf_counter
DEVICE = torch.device('cpu')


def _sync():
    if DEVICE.type == 'cuda':
        torch.cuda.synchronize(DEVICE)


def timed(fn: Callable[[], None]) -> float:
    """Seconds ``fn`` takes on the selected clock (wall, or this process's CPU time with ``--clock cpu``)."""
    _sync()
    t0 = _clock()
    fn()
    _sync()
    return _clock() - t0


def peak_step_bytes(fn: Callable[[], None], model: Optional[torch.nn.Module] = None) -> int:
    """Peak tensor bytes allocated during ``fn`` above the level before it, from torch.profiler memory events
    (on CUDA: the allocator's peak statistics).

    Two things allocated before the step are dropped first, so the step allocates them where they can be seen:
    the memory's scratch pool (buffers kept from an earlier step), and ``model``'s gradients. A step frees the
    previous step's gradients (``zero_grad``); the profiler reports the free of a tensor it saw allocated in an
    earlier profiling session as a negative, so the count depended on what ran before (the same step gave 21.7 MiB, then
    0). Gradients are part of what a step needs, so they are counted as allocated in it."""
    from torch.profiler import ProfilerActivity, profile
    from titans_timm.memory import empty_scratch_pool
    empty_scratch_pool()
    if model is not None:
        model.zero_grad(set_to_none=True)
    if DEVICE.type == 'cuda':
        _sync()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        before = torch.cuda.memory_allocated(DEVICE)
        fn()
        _sync()
        return torch.cuda.max_memory_allocated(DEVICE) - before
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def alternate(fns, warmup, repeats, stat):
    """Time each callable round-robin (so load spikes hit all alike); ``stat`` of its timed rounds per name."""
    times = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for k, fn in fns.items():
            t = timed(fn)
            if i >= warmup:
                times[k].append(t)
    return {k: stat(v) for k, v in times.items()}


def measure_pair(
        name: str,
        backbone: torch.nn.Module,
        kwargs: Dict,
        batch_size: int,
        img_size: int,
        warmup: int,
        repeats: int,
        train: bool,
        infer: bool,
        stat: Callable[[List[float]], float] = statistics.median,
) -> Dict:
    """Time one model against its backbone, alternating, and measure params and peak training memory."""
    model = timm.create_model(name, img_size=img_size, **kwargs).to(DEVICE)
    x = torch.randn(batch_size, 3, img_size, img_size, device=DEVICE)
    target = torch.randint(0, model.num_classes, (batch_size,), device=DEVICE)
    pair = {'backbone': backbone, 'model': model}
    row = {'model': name, 'memory_blocks': json.dumps(model.memory_blocks),
           'params_M': num_params(model) / 1e6, 'backbone_params_M': num_params(backbone) / 1e6}
    if infer:
        fns = {k: infer_fn(m.eval(), x) for k, m in pair.items()}
        med = alternate(fns, warmup, repeats, stat)
        row.update(infer_img_s=batch_size / med['model'], backbone_infer_img_s=batch_size / med['backbone'],
                   infer_ratio=med['model'] / med['backbone'])
    if train:
        for m in pair.values():
            m.train()
        fns = {k: train_step_fn(m, x, target) for k, m in pair.items()}
        med = alternate(fns, warmup, repeats, stat)
        row.update(train_img_s=batch_size / med['model'], backbone_train_img_s=batch_size / med['backbone'],
                   train_ratio=med['model'] / med['backbone'])
        # static: parameters + AdamW exp_avg/exp_avg_sq; dynamic: activations and grads of one step
        mem = {k: 3 * 4 * num_params(m) + peak_step_bytes(fns[k], m) for k, m in pair.items()}
        row.update(peak_train_MB=mem['model'] / 2 ** 20, backbone_peak_train_MB=mem['backbone'] / 2 ** 20,
                   memory_ratio=mem['model'] / mem['backbone'])
    return row


def _check(ratio, target) -> str:
    if ratio is None:
        return '-'
    mark = '' if target is None else (' ok' if ratio <= target else ' OVER')
    return f'{ratio:.2f}x{mark}'


def format_table(rows: List[Dict]) -> str:
    """Markdown table of the ratios with the speed targets marked."""
    head = ('| model | memory blocks | params (M) | infer img/s (backbone) | infer ratio | '
            'train img/s (backbone) | train ratio | peak train MB (backbone) | memory ratio |')
    lines = [head, '|' + '---|' * 9]
    for r in rows:
        t = TARGETS[r['model'].rsplit('_', 1)[-1]]
        infer = f"{r['infer_img_s']:.1f} ({r['backbone_infer_img_s']:.1f})" if 'infer_ratio' in r else '-'
        train = f"{r['train_img_s']:.1f} ({r['backbone_train_img_s']:.1f})" if 'train_ratio' in r else '-'
        mem = f"{r['peak_train_MB']:.0f} ({r['backbone_peak_train_MB']:.0f})" if 'memory_ratio' in r else '-'
        lines.append(
            f"| {r['model']} | {r['memory_blocks']} | {r['params_M']:.2f} | {infer} | "
            f"{_check(r.get('infer_ratio'), t['infer'])} | {train} | {_check(r.get('train_ratio'), t['train'])} | "
            f"{mem} | {_check(r.get('memory_ratio'), t['memory'])} |")
    return '\n'.join(lines)


def main(argv=None) -> List[Dict]:
    """Benchmark CLI; returns the result rows."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', default='tiny', help='comma-separated backbone sizes: tiny,small,base')
    parser.add_argument('--models', default='*', help='fnmatch pattern(s), comma-separated, on registered names')
    parser.add_argument('-b', '--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5, help='timed rounds per model')
    parser.add_argument('--stat', choices=('median', 'min'), default='median',
                        help='per-model time over the rounds; min resists load spikes on a shared machine')
    parser.add_argument('--clock', choices=tuple(CLOCKS), default='wall',
                        help='cpu: process CPU time, which other processes on a shared machine barely disturb '
                             '(use with --threads 1, where no thread spins while waiting)')
    parser.add_argument('--memory-blocks', default=None, help='override placement: comma-separated block indices')
    parser.add_argument('--memory-interval', type=int, default=None, help='override placement: every n-th block')
    parser.add_argument('--memory-options', default=None, help='JSON dict passed to create_memory')
    parser.add_argument('--no-train', action='store_true', help='skip the train-step timing and memory')
    parser.add_argument('--no-infer', action='store_true', help='skip the inference timing')
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: leave as is)')
    parser.add_argument('--csv', default=None, help='write the rows to this CSV file')
    parser.add_argument('--markdown', default=None, metavar='PATH',
                        help='write the table with the command and the machine to this Markdown file '
                             '(e.g. docs/benchmark_model_speed.md)')
    parser.add_argument('--device', default='cpu', help="torch device, e.g. 'cuda'")
    parser.add_argument('--amp', action='store_true', help='bf16 autocast around every forward (model and backbone)')
    args = parser.parse_args(argv)
    global DEVICE, AMP
    DEVICE, AMP = torch.device(args.device), args.amp
    if DEVICE.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available here')
    if DEVICE.type != 'cpu' and args.clock == 'cpu':
        parser.error("--clock cpu times this process's CPU work; use the wall clock on a GPU")

    sizes = [s.strip() for s in args.sizes.split(',') if s.strip()]
    bad = [s for s in sizes if s not in ('tiny', 'small', 'base')]
    if bad:
        print(f'error: unknown size(s) {bad}; use tiny, small or base', file=sys.stderr)
        sys.exit(2)
    kwargs = {}
    try:
        if args.memory_blocks:
            kwargs['memory_blocks'] = [int(i) for i in args.memory_blocks.split(',')]
        if args.memory_options:
            kwargs['memory_options'] = json.loads(args.memory_options)
    except ValueError as e:
        print(f'error: bad --memory-blocks / --memory-options ({e})', file=sys.stderr)
        sys.exit(2)
    if args.memory_interval:
        kwargs['memory_interval'] = args.memory_interval
    if args.threads:
        torch.set_num_threads(args.threads)
    global _clock
    _clock = CLOCKS[args.clock]
    patterns = [p.strip() for p in args.models.split(',') if p.strip()]
    torch.manual_seed(0)

    rows = []
    for size in sizes:
        names = [n for n in timm.list_models(f'vit_{size}_ma[lcg]_*')
                 if any(fnmatch.fnmatch(n, p) for p in patterns)]
        if not names:
            continue
        backbone = timm.create_model(f'vit_{size}_patch16_224', img_size=args.img_size).to(DEVICE)
        for name in names:
            row = measure_pair(name, backbone, kwargs, args.batch_size, args.img_size, args.warmup, args.repeats,
                               train=not args.no_train, infer=not args.no_infer,
                               stat=statistics.median if args.stat == 'median' else min)
            rows.append(row)
            print(format_table([row]).splitlines()[-1], flush=True)
    if not rows:
        print(f'error: no registered model matches {args.models!r} for sizes {sizes}', file=sys.stderr)
        sys.exit(2)
    print()
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == 'cuda' else f'torch threads {torch.get_num_threads()}'
    print(f'batch {args.batch_size}, {args.img_size} px, {where}, {args.clock} clock, '
          f'{args.stat} of {args.repeats} alternating rounds{", bf16 autocast" if AMP else ""}; '
          f'ratios = model / plain backbone')
    print(format_table(rows))
    if args.csv:
        with open(args.csv, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            writer.writeheader()
            writer.writerows(rows)
        print(f'wrote {args.csv}')
    if args.markdown:
        from _report import write_markdown
        write_markdown(args.markdown, 'Model speed: each memory model against its plain backbone', format_table(rows),
                       note=f'batch {args.batch_size}, {args.img_size} px, {where}, {args.clock} clock, {args.stat} '
                            f'of {args.repeats} alternating rounds; ratios = model / plain backbone.')
    return rows


if __name__ == '__main__':
    main()
