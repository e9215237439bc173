"""Build the built-in ``fashion-mnist-mini`` dataset shipped in ``titans_timm/data_files/``.

Source: the Debian package ``dataset-fashion-mnist`` (Fashion-MNIST by Zalando Research, MIT
licence), which installs the original idx files under ``/usr/share/datasets/fashion-mnist/``.
The output is two parquet files written with Hugging Face ``datasets``
(``image`` = ``datasets.Image()`` holding grayscale PNG bytes, ``label`` = ``ClassLabel`` with the
10 class names, ``source_index`` = the row in the original idx file, for provenance):

- ``fashion_mnist_mini_train.parquet``: ``--train-per-class`` images per class drawn from the
  60k training set;
- ``fashion_mnist_mini_validation.parquet``: ``--val-per-class`` images per class drawn from the
  10k test set (so no validation image was ever in the training pool).

The draw is a seeded permutation, so re-running gives byte-identical parquet files. Rows are
stored round-robin over the classes (0, 1, ..., 9, 0, 1, ...), so any prefix of the file is class
balanced; ``create_dataset(..., num_samples=N)`` relies on that to keep small subsets balanced.

Usage::

    python tools/make_builtin_dataset.py            # writes titans_timm/data_files/*.parquet
    python tools/make_builtin_dataset.py --source DIR --out DIR --train-per-class 400 --val-per-class 100
"""
import argparse
import gzip
import io
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_SOURCE = Path('/usr/share/datasets/fashion-mnist')
DEFAULT_OUT = Path(__file__).resolve().parents[1] / 'titans_timm' / 'data_files'
# Class names as in the Fashion-MNIST README, in label order.
CLASS_NAMES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
               'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']
SOURCE_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'validation': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) idx file: magic (0, 0, dtype, ndim), ndim big-endian sizes, then the data."""
    with gzip.open(path, 'rb') as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack('>HBB', data[:4])
    if zero != 0 or dtype_code != 0x08:  # 0x08 = unsigned byte, the only type Fashion-MNIST uses
        raise ValueError(f'{path}: not an unsigned-byte idx file')
    shape = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def missing_source_files(source: Path):
    """What is missing from ``source`` (the Fashion-MNIST idx files) and how to get it, or ``None``."""
    missing = [f for pair in SOURCE_FILES.values() for f in pair if not (source / f).is_file()]
    if missing:
        return (f'{source} lacks {", ".join(missing)}; install the Debian package dataset-fashion-mnist '
                f'or pass --source DIR')
    return None


def balanced_round_robin(labels: np.ndarray, per_class: int, seed: int, classes=None, skip: int = 0) -> np.ndarray:
    """Indices of ``per_class`` random rows of each class, ordered class 0, 1, ..., 9, 0, 1, ...

    ``classes`` restricts the draw to those labels (default: all ten); ``skip`` drops the first ``skip`` rows of
    each class's seeded permutation, so two draws with the same seed and disjoint ranges never share a row."""
    rng = np.random.default_rng(seed)
    per = []
    for c in (range(len(CLASS_NAMES)) if classes is None else classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < skip + per_class:
            raise ValueError(f'class {c} has only {len(idx)} images, fewer than {skip + per_class}')
        per.append(rng.permutation(idx)[skip:skip + per_class])
    return np.stack(per, axis=1).reshape(-1)  # [per_class, classes] -> row-major round robin


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # Stored as 1-channel PNG (a third of the RGB size); the loader converts to RGB.
    Image.fromarray(pixels, mode='L').save(buf, format='PNG', optimize=True)
    return buf.getvalue()


def build_split(source: Path, split: str, per_class: int, seed: int, classes=None, skip: int = 0,
                name: str = None):
    """Return a ``datasets.Dataset`` of ``per_class`` images of each class in ``classes`` (default all ten),
    drawn from the source ``split`` ('train' = the 60k set, 'validation' = the 10k test set); labels are
    renumbered to the position in ``classes``. ``name`` is the split name stored in the file."""
    import datasets
    images_file, labels_file = SOURCE_FILES[split]
    images, labels = read_idx(source / images_file), read_idx(source / labels_file)
    if len(images) != len(labels):
        raise ValueError(f'{split}: {len(images)} images but {len(labels)} labels')
    classes = list(range(len(CLASS_NAMES))) if classes is None else list(classes)
    index = balanced_round_robin(labels, per_class, seed, classes, skip)
    features = datasets.Features({
        'image': datasets.Image(),
        'label': datasets.ClassLabel(names=[CLASS_NAMES[c] for c in classes]),
        'source_index': datasets.Value('int32'),
    })
    return datasets.Dataset.from_dict({
        'image': [{'bytes': png_bytes(images[i]), 'path': None} for i in index],
        'label': [classes.index(int(labels[i])) for i in index],
        'source_index': [int(i) for i in index],
    }, features=features, split=datasets.NamedSplit(name or ('train' if split == 'train' else 'validation')))


# The transfer task: the five classes the shipped backbone (tools/pretrain_backbone.py) never saw.
TRANSFER_CLASSES = (0, 1, 2, 3, 4)  # T-shirt/top, Trouser, Pullover, Dress, Coat


def main(argv=None) -> int:
    """Write the built-in Fashion-MNIST parquet files; prints their sizes."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--source', type=Path, default=DEFAULT_SOURCE,
                        help='folder with the Fashion-MNIST idx .gz files (apt install dataset-fashion-mnist)')
    parser.add_argument('--out', type=Path, default=DEFAULT_OUT, help='output folder')
    parser.add_argument('--set', choices=('mini', 'transfer', 'all'), default='all', help='which built-in set to write')
    parser.add_argument('--train-per-class', type=int, default=400, help='mini: training images per class')
    parser.add_argument('--val-per-class', type=int, default=100, help='mini: validation images per class')
    parser.add_argument('--transfer-train-per-class', type=int, default=1000,
                        help='transfer: training images per class')
    parser.add_argument('--transfer-val-per-class', type=int, default=200,
                        help='transfer: validation images per class, carved from the training pool')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    problem = missing_source_files(args.source)
    if problem:
        print(f'error: {problem}', file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = []
    if args.set in ('mini', 'all'):
        jobs += [('fashion_mnist_mini_train', dict(split='train', per_class=args.train_per_class, seed=args.seed)),
                 ('fashion_mnist_mini_validation',
                  dict(split='validation', per_class=args.val_per_class, seed=args.seed + 1))]
    if args.set in ('transfer', 'all'):
        # train and validation come from one seeded permutation per class of the 60k set, disjoint ranges;
        # test is every test-set image of the five classes (1,000 each)
        pool = dict(split='train', seed=args.seed + 2, classes=TRANSFER_CLASSES)
        jobs += [('fashion_mnist_transfer_train', dict(pool, per_class=args.transfer_train_per_class, name='train')),
                 ('fashion_mnist_transfer_validation',
                  dict(pool, per_class=args.transfer_val_per_class, skip=args.transfer_train_per_class,
                       name='validation')),
                 ('fashion_mnist_transfer_test', dict(split='validation', per_class=1000, seed=args.seed + 3,
                                                      classes=TRANSFER_CLASSES, name='test'))]
    for stem, kwargs in jobs:
        ds = build_split(args.source, **kwargs)
        path = args.out / f'{stem}.parquet'
        ds.to_parquet(str(path))
        print(f'{path}: {len(ds)} rows, {path.stat().st_size / 1e6:.2f} MB')
    return 0


if __name__ == '__main__':
    sys.exit(main())
