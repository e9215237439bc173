"""Forward+backward time of each memory type against a timm ViT Block of the same width.

Every candidate is timed alternately with the Block in one process (warm-up, then the median of several rounds),
so the printed ratios are robust to a busy machine. ``--vs-titans-pytorch`` also times
``titans_pytorch.NeuralMemory`` (``pip install titans-pytorch``; only for this benchmark) at the matching config.

    python benchmarks/memory_speed.py                       # D = 192/384/768, N = 197, batch 8
    python benchmarks/memory_speed.py --widths 192 --vs-titans-pytorch
    python benchmarks/memory_speed.py --device cuda --amp      # on a GPU, under bf16 autocast
    python benchmarks/memory_speed.py --device cuda --cuda-graphs   # each module's fwd and bwd replayed as CUDA graphs

On CUDA the clock is read after ``torch.cuda.synchronize()``, so each time covers the kernels, not just their launch.
"""
import argparse
import contextlib
import statistics
import time
import warnings

import torch
from timm.models.vision_transformer import Block

from titans_timm import MEMORY_TYPES, create_memory


CLOCK = time.perf_counter
AMP = False


def _sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def fwd_bwd_time(module, x):
    x = x.detach().requires_grad_(True)
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16) if AMP else contextlib.nullcontext()
    _sync(x.device)
    t0 = CLOCK()
    with amp:
        out = module(x)
    if isinstance(out, tuple):  # titans_pytorch returns (retrieved, state)
        out = out[0]
    out.float().pow(2).mean().backward()
    _sync(x.device)
    return CLOCK() - t0


def graphed(module, x):
    """``module`` with its forward and backward captured as CUDA graphs, after checking that a replay gives the
    eager outputs and gradients."""
    def run(fn):
        xi = x.detach().requires_grad_(True)
        out = fn(xi)
        out.pow(2).mean().backward()
        grads = [xi.grad] + [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]
        module.zero_grad(set_to_none=True)
        return [out.detach()] + grads
    eager = run(module)
    fn = torch.cuda.make_graphed_callables(module, (x.detach().requires_grad_(True),))
    replay = run(fn)
    diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(replay, eager))
    print(f'{type(module).__name__}: CUDA-graph replay vs eager, largest relative difference {diff:.1e}')
    if diff > 1e-4:
        raise RuntimeError(f'{type(module).__name__}: the CUDA-graph replay differs from eager ({diff:.1e})')
    return fn


def compare(candidates, x, warmup, rounds):
    """Median seconds per fwd+bwd of each named module, timed round-robin."""
    times = {name: [] for name in candidates}
    for i in range(warmup + rounds):
        for name, mod in candidates.items():
            t = fwd_bwd_time(mod, x)
            if i >= warmup:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--widths', default='192,384,768', help='comma-separated token widths (heads = width // 64, at least 1)')
    parser.add_argument('--tokens', type=int, default=197)
    parser.add_argument('-b', '--batch-size', type=int, default=8)
    parser.add_argument('--chunk-size', default='16', help="tokens per memory chunk, or 'none' (the whole image)")
    parser.add_argument('--depth', type=int, default=None,
                        help="memory MLP depth (default: each type's own: simple 1, mlp and advanced 2)")
    parser.add_argument('--expansion', type=float, default=4.0)
    parser.add_argument('--memory-types', default=','.join(MEMORY_TYPES))
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: leave as is)')
    parser.add_argument('--clock', choices=('wall', 'cpu'), default='wall',
                        help="'cpu': one thread, timed by its own CPU time (robust when other jobs share the machine)")
    parser.add_argument('--vs-titans-pytorch', action='store_true', help='also time titans_pytorch.NeuralMemory')
    parser.add_argument('--device', default='cpu', help="torch device, e.g. 'cuda'")
    parser.add_argument('--amp', action='store_true', help='run every module under bf16 autocast')
    parser.add_argument('--markdown', default=None, metavar='PATH',
                        help='write the table with the command and the machine to this Markdown file '
                             '(e.g. docs/benchmark_memory_speed.md)')
    parser.add_argument('--cuda-graphs', action='store_true',
                        help='capture each module (Block too) with torch.cuda.make_graphed_callables: removes the '
                             'per-op launch cost the chunk loop pays on a GPU; checked against eager first')
    args = parser.parse_args(argv)
    global CLOCK, AMP
    chunk = None if args.chunk_size.lower() == 'none' else int(args.chunk_size)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available here')
    if args.clock == 'cpu':
        if device.type != 'cpu':
            parser.error("--clock cpu times this thread's CPU work; use the wall clock on a GPU")
        args.threads, CLOCK = 1, time.thread_time
    AMP = args.amp
    if args.cuda_graphs and (device.type != 'cuda' or AMP or args.vs_titans_pytorch):
        parser.error('--cuda-graphs needs --device cuda, without --amp or --vs-titans-pytorch')
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    for dim in [int(w) for w in args.widths.split(',')]:
        heads = max(1, dim // 64)
        x = torch.randn(args.batch_size, args.tokens, dim, device=device)
        candidates = {'block': Block(dim, heads, qkv_bias=True)}
        depth_opt = {} if args.depth is None else {'depth': args.depth}
        tp_depth = args.depth or 2          # titans_pytorch at advanced's default depth, the config compared
        for kind in args.memory_types.split(','):
            candidates[kind] = create_memory(kind, dim, heads=heads, head_dim=64, expansion=args.expansion,
                                             chunk_size=chunk, **depth_opt)
        if args.vs_titans_pytorch:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                from titans_pytorch import NeuralMemory
            candidates['titans_pytorch'] = NeuralMemory(
                dim=dim, heads=heads, dim_head=64, chunk_size=chunk or args.tokens,
                default_model_kwargs=dict(depth=tp_depth, expansion_factor=args.expansion))
        depths = {name: tp_depth if name == 'titans_pytorch' else getattr(mod, 'depth', None)
                  for name, mod in candidates.items()}
        candidates = {name: mod.to(device) for name, mod in candidates.items()}
        if args.cuda_graphs:
            candidates = {name: graphed(mod, x) for name, mod in candidates.items()}
        med = compare(candidates, x, args.warmup, args.rounds)
        for name, t in med.items():
            if name == 'block':
                continue
            depth = depths[name]
            row = {'D': dim, 'heads': heads, 'memory': name, 'depth': depth, 'ms': 1000 * t,
                   'block_ms': 1000 * med['block'], 'x_block': t / med['block']}
            # only for memories written at test time, and at titans_pytorch's memory depth (mlp is never written)
            if 'titans_pytorch' in med and name in ('simple', 'advanced') and depth == depths['titans_pytorch']:
                row['faster_than_titans_pytorch'] = med['titans_pytorch'] / t
            rows.append(row)

    where = (torch.cuda.get_device_name(device) if device.type == 'cuda' else f'threads {torch.get_num_threads()}')
    setting = (f'forward+backward, N={args.tokens}, batch {args.batch_size}, chunk {args.chunk_size}, '
               f'expansion {args.expansion:g}, {where}, {args.clock} clock'
               + (', bf16 autocast' if AMP else '') + (', CUDA graphs' if args.cuda_graphs else ''))
    if args.vs_titans_pytorch:  # the version compared against belongs with the table
        from importlib.metadata import version
        setting += f", titans-pytorch {version('titans-pytorch')}"

    print('\n' + setting)
    header = '| D / heads | memory | depth | ms | Block ms | x Block |' + (' titans_pytorch / ours |' if args.vs_titans_pytorch else '')
    lines = [header, '|' + '---|' * (header.count('|') - 1)]
    for r in rows:
        line = f"| {r['D']} / {r['heads']} | {r['memory']} | {r['depth']} | {r['ms']:.1f} | {r['block_ms']:.1f} | {r['x_block']:.2f} |"
        if args.vs_titans_pytorch:
            line += f" {r['faster_than_titans_pytorch']:.1f}x |" if 'faster_than_titans_pytorch' in r else ' - |'
        lines.append(line)
    print('\n'.join(lines))
    if args.markdown:
        from _report import write_markdown
        write_markdown(args.markdown, 'Memory speed: one memory module against one timm Block', '\n'.join(lines),
                       note=setting + '.')
    return rows


if __name__ == '__main__':
    main()
