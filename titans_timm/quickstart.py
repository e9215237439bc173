"""titans-timm-quickstart: the main job. Does Titans memory help a pretrained ViT? One command, offline.

1. **Backbone.** Loads the pretrained ViT-Tiny that ships in the package (tag ``fmnist5``: trained by
   ``tools/pretrain_backbone.py`` on the Fashion-MNIST classes Sandal, Shirt, Sneaker, Bag, Ankle boot) as the
   plain timm ViT and as the memory model ``MODEL.fmnist5``, and checks on the test images that the memory
   model's logits equal the backbone's bit for bit (every memory gate starts at zero).
2. **Transfer.** Fine-tunes the memory model and the plain backbone on the five classes the backbone never saw
   (built-in ``fashion-mnist-transfer``), same recipe, budget and seeds
   (``train_timm_hparams/fashion_mnist_transfer.yaml`` through ``titans-timm-sweep --seeds N``), evaluates
   every run on the 5,000 test images and prints the comparison table: mean top-1, 95% t-interval over
   seeds, and the paired difference to the plain fine-tune with its interval.
3. **Pictures.** Evaluates the first seed's memory model again with the confusion matrix, per-class accuracy
   and surprise maps (``titans-timm-eval --visualize --surprise-maps``).

Each part prints how long it took. A re-run reuses finished runs (``--force`` trains again). With the defaults
(6 runs of 2 epochs on 5,000 images, each evaluated on 5,000 test images) the job took 504 s on 2 idle CPU cores
with the default ``-j 2`` (two runs train at once, one torch thread each, their output in ``OUTPUT/NAME/train.log``;
the same weights as ``-j 1`` with ``OMP_NUM_THREADS=1``, which took 18 minutes); ``--seeds 2`` takes two thirds.
"""
import argparse
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import List, Optional

import torch

from titans_timm.cli import EXIT_BAD_INPUT, Parser
from titans_timm.devices import cpu_cores

RECIPE_NAME = 'fashion_mnist_transfer.yaml'


def default_recipe() -> str:
    """The transfer recipe: installed with the package (a wheel puts train_timm_hparams/ at titans_timm/recipes/)
    or in the source tree next to it (an editable install)."""
    for candidate in (resources.files('titans_timm').joinpath('recipes', RECIPE_NAME),
                      Path(__file__).resolve().parents[1] / 'train_timm_hparams' / RECIPE_NAME):
        if candidate.is_file():
            return str(candidate)
    raise QuickstartError(f'{RECIPE_NAME} not found in the package or the source tree; pass -c RECIPE')


class QuickstartError(Exception):
    """The main job cannot run as asked; the message says what to do."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog='titans-timm-quickstart', description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='vit_tiny_mag_advanced',
                        help='the memory model to compare with the plain fine-tune (a vit_tiny_* name)')
    parser.add_argument('--seeds', type=int, default=3, help='seeds per model (default 3)')
    parser.add_argument('-c', '--config', default=None, metavar='YAML',
                        help=f'the transfer recipe (default: train_timm_hparams/{RECIPE_NAME})')
    parser.add_argument('--output', default='output/quickstart', metavar='DIR', help='where runs and pictures go')
    parser.add_argument('--surprise-maps', type=int, default=8, metavar='N', help='surprise maps of N test images')
    parser.add_argument('--force', action='store_true', default=False, help='train every run again')
    parser.add_argument('-j', '--jobs', type=int, default=default_jobs(), metavar='N',
                        help='train up to N runs at once (titans-timm-sweep --jobs; default: 2 on a machine with 2 or '
                             f'more cores, else 1; here {default_jobs()}); with N > 1 each run writes its output to '
                             'OUTPUT/NAME/train.log')
    return parser


def default_jobs() -> int:
    """Two trainings at once where there are 2 cores for them (each gets half the cores as torch threads), else 1."""
    return 2 if cpu_cores() >= 2 else 1


def check_step0(model_name: str, num_images: int = 256) -> float:
    """Build the plain backbone and ``MODEL.fmnist5`` from the shipped weights; return the largest logit
    difference on the first ``num_images`` transfer test images, raising unless it is exactly zero."""
    import timm
    from timm.data import create_transform, resolve_data_config

    from titans_timm import checkpoint as ckpt
    from titans_timm.data import TRANSFER_DATASET, create_dataset
    from titans_timm.vit import FMNIST5_WEIGHTS

    if not FMNIST5_WEIGHTS.is_file():
        raise QuickstartError(f'the shipped backbone {FMNIST5_WEIGHTS} is missing; reinstall titans-timm or '
                              f'rebuild it with python tools/pretrain_backbone.py')
    meta = ckpt.read_metadata(FMNIST5_WEIGHTS)
    print(f'backbone: {meta["architecture"]} {meta["model_args"]}, {meta.get("dataset", "")}; '
          f'validation top-1 {meta.get("validation_top1")}% on its own classes; made by: {meta.get("command")}')
    backbone, _ = ckpt.load_model(FMNIST5_WEIGHTS)
    model = timm.create_model(f'{model_name}.fmnist5', pretrained=True).eval()
    config = resolve_data_config(model=model)
    dataset = create_dataset(TRANSFER_DATASET, split='test', transform=create_transform(**config),
                             num_samples=num_images)
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        diff = (model(x) - backbone(x)).abs().max().item()
    if diff != 0.0:
        raise QuickstartError(f'{model_name}.fmnist5 does not equal its backbone at step 0 (max |logit '
                              f'difference| {diff:.3g}); the memory gates must start at zero')
    print(f'step 0: {model_name}.fmnist5 equals the backbone bit for bit on {len(x)} test images '
          f'(max |logit difference| 0.0)')
    return diff


def main(argv: Optional[List[str]] = None) -> int:
    """Run the main job; returns the exit status (0, 1 when a run failed, 2 for bad input)."""
    from titans_timm import evaluate, sweep

    args = build_parser().parse_args(argv)
    if not args.model.startswith('vit_tiny_') or args.model.count('_') != 3:
        print(f'error: --model must be a vit_tiny_<approach>_<memory> name (the shipped backbone is a ViT-Tiny), '
              f'got {args.model!r}', file=sys.stderr)
        return EXIT_BAD_INPUT
    approach, memory_type = args.model.split('_')[2:]
    try:
        args.config = args.config or default_recipe()
    except QuickstartError as e:
        print(f'error: {e}', file=sys.stderr)
        return EXIT_BAD_INPUT
    times = {}
    t0 = time.perf_counter()
    print('== 1/3 backbone: load the shipped pretrained ViT-Tiny, check step 0 ==', flush=True)
    try:
        check_step0(args.model)
    except QuickstartError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    times['backbone'] = time.perf_counter() - t0

    t1 = time.perf_counter()
    print(f'== 2/3 transfer: {args.model} vs the plain fine-tune, {args.seeds} seeds each, '
          f'{args.jobs} run(s) at a time ==', flush=True)
    sweep_argv = ['-c', args.config, '--model-sizes', 'tiny', '--approaches', approach, '--memory-types',
                  memory_type, '--seeds', str(args.seeds), '--eval-split', 'test', '--output', args.output,
                  '--jobs', str(args.jobs), '--verbose'] + (['--force'] if args.force else [])
    try:
        result = sweep.main(sweep_argv)
    except SystemExit as e:
        return int(e.code or 2)
    times['transfer'] = time.perf_counter() - t1

    t2 = time.perf_counter()
    memory_runs = [r for r in result['rows'] if r['approach'] != 'baseline' and r['status'] in ('done', 'skipped')]
    if memory_runs:
        run_dir = memory_runs[0]['run_dir']
        print(f'== 3/3 pictures: {run_dir} on the test split ==', flush=True)
        out = os.path.join(args.output, 'eval')
        eval_argv = sweep.eval_argv(run_dir, 'test')
        eval_argv[eval_argv.index('--output') + 1] = out
        eval_argv += ['--visualize'] + (['--surprise-maps', str(args.surprise_maps)]
                                        if memory_type != 'mlp' and args.surprise_maps > 0 else [])
        try:
            evaluate.main(eval_argv)
        except SystemExit as e:
            if e.code:
                return int(e.code)
    times['pictures'] = time.perf_counter() - t2

    print('\n' + open(result['files']['md']).read(), end='')
    print('time: ' + ', '.join(f'{k} {v:.0f} s' for k, v in times.items()) +
          f', total {time.perf_counter() - t0:.0f} s')
    return 1 if result['failed'] else 0


def cli() -> None:
    """Console-script entry point: ``sys.exit(main())``."""
    sys.exit(main())


if __name__ == '__main__':
    cli()
