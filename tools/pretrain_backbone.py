"""Pretrain the backbone that ships with titans-timm (pretrained tag ``fmnist5``) and package its weights.

A plain timm ViT-Tiny (``vit_tiny_patch16_224`` built with ``img_size=28, patch_size=4, depth=4``) is
trained from scratch with ``titans-timm-train`` on five Fashion-MNIST classes, Sandal, Shirt, Sneaker,
Bag and Ankle boot: all 30,000 training images of those classes (their 5,000 test images are its
validation split). The transfer task, the built-in ``fashion-mnist-transfer`` set, holds the other five
classes, so fine-tuning on it is transfer to classes the backbone never saw.

Steps, each resumable (a re-run skips what is done, and continues an interrupted training):

1. write the pretraining images as an image folder, ``DATA_DIR/{train,validation}/<class>/<row>.png``,
   from the idx files of the Debian package ``dataset-fashion-mnist``;
2. train with ``train_timm_hparams/fashion_mnist_pretrain.yaml`` into ``OUTPUT/fmnist5-pretrain/``;
3. write ``titans_timm/data_files/vit_tiny_p4_28_fmnist5.safetensors``: the backbone's weights (head
   included) in float32 as a titans-timm checkpoint, with the command, seed, data, git commit and the
   validation accuracy in its safetensors metadata (``titans_timm.checkpoint.read_metadata``).

Usage::

    sudo apt-get install dataset-fashion-mnist
    python tools/pretrain_backbone.py                   # about 15 minutes on 2 idle CPU cores
    python tools/pretrain_backbone.py --device cuda     # on a GPU
"""
import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tools'))
from make_builtin_dataset import CLASS_NAMES, DEFAULT_SOURCE, SOURCE_FILES, missing_source_files, read_idx  # noqa: E402

RECIPE = REPO / 'train_timm_hparams' / 'fashion_mnist_pretrain.yaml'
WEIGHTS = REPO / 'titans_timm' / 'data_files' / 'vit_tiny_p4_28_fmnist5.safetensors'
PRETRAIN_CLASSES = (5, 6, 7, 8, 9)  # Sandal, Shirt, Sneaker, Bag, Ankle boot
EXPERIMENT = 'fmnist5-pretrain'


def write_image_folder(source: Path, out: Path) -> dict:
    """Write the pretraining classes as ``out/{train,validation}/<NN class>/<row>.png``; returns counts."""
    counts = {}
    for split, (images_file, labels_file) in SOURCE_FILES.items():
        images, labels = read_idx(source / images_file), read_idx(source / labels_file)
        done = out / split / '.complete'
        rows = np.flatnonzero(np.isin(labels, PRETRAIN_CLASSES))
        counts[split] = int(len(rows))
        if done.is_file():
            continue
        for c in PRETRAIN_CLASSES:
            # the label index prefix keeps the dataset's class order (folders are read sorted)
            (out / split / f'{c}_{CLASS_NAMES[c]}').mkdir(parents=True, exist_ok=True)
        for i in rows:
            c = int(labels[i])
            Image.fromarray(images[i], mode='L').save(out / split / f'{c}_{CLASS_NAMES[c]}' / f'{i:05d}.png')
        done.write_text(f'{len(rows)}\n')
    return counts


def _git_commit() -> str:
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--source', type=Path, default=DEFAULT_SOURCE,
                        help='folder with the Fashion-MNIST idx .gz files (apt install dataset-fashion-mnist)')
    parser.add_argument('--data-dir', type=Path, default=REPO / 'output' / 'fmnist5-pretrain-data',
                        help='where the pretraining image folder is written')
    parser.add_argument('--output', type=Path, default=REPO / 'output', help="the trainer's --output")
    parser.add_argument('--weights', type=Path, default=WEIGHTS, help='where the packaged weights go')
    parser.add_argument('--device', default=None, help="the trainer's --device (default: cuda if available)")
    parser.add_argument('--epochs', type=int, default=None, help="override the recipe's epochs")
    args = parser.parse_args(argv)
    problem = missing_source_files(args.source)
    if problem:
        print(f'error: {problem}', file=sys.stderr)
        return 2

    t0 = time.time()
    counts = write_image_folder(args.source, args.data_dir)
    print(f'image folder {args.data_dir}: {counts} ({time.time() - t0:.0f} s)', flush=True)

    from titans_timm import checkpoint as ckpt
    from titans_timm import train
    from titans_timm.run_record import RunRecord

    run_dir = args.output / EXPERIMENT
    train_argv = ['-c', str(RECIPE), '--data-dir', str(args.data_dir), '--output', str(args.output),
                  '--experiment', EXPERIMENT]
    if args.device:
        train_argv += ['--device', args.device]
    if args.epochs:
        train_argv += ['--epochs', str(args.epochs)]
    if (run_dir / 'results.json').is_file():
        print(f'{run_dir} is finished; packaging it', flush=True)
    elif (run_dir / 'train_state.pth').is_file() or (run_dir / 'train_state.prev.pth').is_file():
        train.main(['--resume', str(run_dir)])
    else:
        train.main(train_argv)
    summary = json.loads((run_dir / 'results.json').read_text())

    model, meta = ckpt.load_model(run_dir / 'model.safetensors')
    provenance = {
        'dataset': (f'Fashion-MNIST (Zalando Research, MIT licence) from the Debian package dataset-fashion-mnist: '
                    f'classes {", ".join(CLASS_NAMES[c] for c in PRETRAIN_CLASSES)}; '
                    f'{counts["train"]} training images, {counts["validation"]} test images as validation'),
        'command': 'python tools/pretrain_backbone.py' + ''.join(f' {a}' for a in (argv or sys.argv[1:])),
        'train_argv': ' '.join(train_argv).replace(f'{REPO}/', ''),  # paths relative to the repository
        'recipe_sha256': hashlib.sha256(RECIPE.read_bytes()).hexdigest(),
        'seed': RunRecord.load(run_dir).seed,
        'validation_top1': round(summary['final_top1'], 2),
        'train_time_s': round(summary.get('train_time_s') or 0),
        'git_commit': _git_commit(),
    }
    # A titans-timm checkpoint of the plain timm ViT (architecture, structural model_args, class names and
    # normalisation in its metadata): timm's pretrained loader reads its tensors, and the trainer's
    # --pretrained-path inherits img_size/patch_size/depth from it.
    label_names = [n.split('_', 1)[-1] for n in meta['label_names']]  # folder '5_Sandal' -> 'Sandal'
    model_args = dict(img_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
                      depth=len(model.blocks), num_classes=model.num_classes)
    ckpt.save_model(model, args.weights, architecture=meta['architecture'], model_args=model_args,
                    label_names=label_names, extra_metadata=dict(provenance, pretrained_cfg=meta['pretrained_cfg']))
    print(f'wrote {args.weights} ({args.weights.stat().st_size / 1e6:.1f} MB): validation top-1 '
          f'{provenance["validation_top1"]:.2f} on the pretraining classes; total {time.time() - t0:.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
