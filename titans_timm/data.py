"""Datasets for titans-timm: one entry point, :func:`create_dataset`, for every source we train on.

Every dataset it returns is a timm :class:`~timm.data.ImageDataset` (so ``timm.data.create_loader``,
timm transforms and mixup work unchanged): items are ``(PIL RGB image, int label)``, the
``.transform`` attribute is settable, and it carries

- ``.label_names``: class names in label order (what confusion matrices and checkpoints record);
- ``.label_descriptions``: human-readable names (WordNet ids such as ``n01443537`` become
  ``goldfish``; otherwise the same as ``label_names``);
- ``.targets``: the integer label of every item, read without decoding images;
- ``.source`` and ``.split``: where it came from.

Accepted ``name`` forms:

- ``'fashion-mnist-mini'`` (:data:`BUILTIN_DATASET`): a real, balanced Fashion-MNIST subset shipped
  inside the package (``titans_timm/data_files/``; 4,000 train / 1,000 validation 28x28 images,
  10 classes, MIT licence). Works offline, needs no ``root``.
- ``'fashion-mnist-transfer'`` (:data:`TRANSFER_DATASET`): the transfer task of the shipped backbone, the
  five Fashion-MNIST classes it was not pretrained on (T-shirt/top, Trouser, Pullover, Dress, Coat):
  5,000 train and 1,000 validation images (disjoint, from the training set; choose settings on
  validation) and all 5,000 test images of those classes (report on ``test``).
- a preset name from :data:`DATASET_PRESETS` (``cifar10``, ``cifar100``, ``tiny-imagenet``,
  ``ants-bees``, ``imagenet``): the right source, image/label columns and split names filled in.
- ``'hf:ORG/NAME'`` or timm's ``'hfds/ORG/NAME'``: a Hugging Face ``datasets`` id (downloads need
  network; a cached copy loads offline with ``HF_DATASETS_OFFLINE=1``). ``root`` is the cache dir.
- an image folder: ``name`` is a directory, or ``name`` is ``''``/``'folder'`` with ``root`` the
  directory. Layout ``DIR/train/<class>/*.jpg`` and ``DIR/val/<class>/*.jpg`` (also ``validation``,
  ``valid``); a folder with class folders and no split folders serves as the one split there is.

Why not call ``timm.data.create_dataset`` directly: it would load these sources too, but a wrong
split, column or path surfaces as an assert or a deep ``datasets`` traceback. Here every bad input
raises :class:`DataError` with one line that says what to do, the evaluation split is found under
its usual synonyms, folder splits share one class index (a validation folder missing a class would
otherwise shift every label after it), and the label names travel with the dataset.
"""
import io
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from timm.data import ImageDataset
from timm.data.readers.reader import Reader
from timm.data.readers.reader_image_folder import ReaderImageFolder
from timm.data.readers.img_extensions import get_img_extensions

__all__ = [
    'DataError', 'BUILTIN_DATASET', 'TRANSFER_DATASET', 'BUILTIN_DATASETS', 'DATASET_PRESETS', 'DATA_FILES_DIR',
    'create_dataset', 'dataset_num_classes', 'LabeledImageDataset', 'known_datasets',
]

_logger = logging.getLogger(__name__)

DATA_FILES_DIR = Path(__file__).resolve().parent / 'data_files'
BUILTIN_DATASET = 'fashion-mnist-mini'
TRANSFER_DATASET = 'fashion-mnist-transfer'
# Built-in datasets: parquet files (written by tools/make_builtin_dataset.py) per canonical split.
BUILTIN_DATASETS: Dict[str, Dict[str, str]] = {
    BUILTIN_DATASET: {
        'train': 'fashion_mnist_mini_train.parquet',
        'validation': 'fashion_mnist_mini_validation.parquet',
    },
    # The transfer task for the shipped backbone (tag ``fmnist5``, pretrained on the other five classes):
    # train and validation are disjoint draws from the 60k training set, test is all 5,000 test images.
    TRANSFER_DATASET: {
        'train': 'fashion_mnist_transfer_train.parquet',
        'validation': 'fashion_mnist_transfer_validation.parquet',
        'test': 'fashion_mnist_transfer_test.parquet',
    },
}

# Presets for the datasets the recipes in train_timm_hparams/ use. ``splits`` maps the canonical
# split names ('train', 'validation') to the names the source uses.
# Column names checked against the Hub dataset cards (uoft-cs/cifar10: img/label; uoft-cs/cifar100:
# img/fine_label/coarse_label; zh-plus/tiny-imagenet: image/label, splits train/valid, labels are
# WordNet ids). They cannot be verified offline here; an explicit image_column/label_column wins.
DATASET_PRESETS: Dict[str, Dict[str, Any]] = {
    'cifar10': dict(
        source='hfds/uoft-cs/cifar10', image_column='img', label_column='label',
        splits={'train': 'train', 'validation': 'test'}, num_classes=10),
    'cifar100': dict(
        source='hfds/uoft-cs/cifar100', image_column='img', label_column='fine_label',
        splits={'train': 'train', 'validation': 'test'}, num_classes=100),
    'tiny-imagenet': dict(
        source='hfds/zh-plus/tiny-imagenet', image_column='image', label_column='label',
        splits={'train': 'train', 'validation': 'valid'}, num_classes=200),
    # The PyTorch transfer-learning tutorial's hymenoptera_data.zip: train/{ants,bees}, val/{ants,bees}.
    'ants-bees': dict(
        source='folder', folder='hymenoptera_data',
        splits={'train': 'train', 'validation': 'val'}, num_classes=2),
    # ILSVRC-2012 in the usual ImageFolder layout: train/<wnid>/*.JPEG, val/<wnid>/*.JPEG.
    'imagenet': dict(
        source='folder', splits={'train': 'train', 'validation': 'val'}, num_classes=1000),
}

# timm's split synonyms (timm.data.dataset_factory), plus 'test' as the last resort for evaluation:
# many Hub datasets (CIFAR) ship only train/test.
_TRAIN_SPLITS = ('train', 'training')
_EVAL_SPLITS = ('validation', 'val', 'valid', 'eval', 'evaluation')
_SPLIT_DIRS = _TRAIN_SPLITS + _EVAL_SPLITS + ('test',)
# Reader prefixes timm.data.create_dataset knows that this module does not serve.
_OTHER_TIMM_PREFIXES = ('torch', 'hfids', 'tfds', 'wds')
_IMAGE_COLUMNS = ('image', 'img', 'pixel_values', 'jpg', 'png')
_LABEL_COLUMNS = ('label', 'labels', 'fine_label', 'cls', 'class', 'target')


class DataError(ValueError):
    """A dataset name, directory, split or column cannot be resolved; the message says what to do."""


def known_datasets() -> List[str]:
    """Names accepted without a prefix: the built-in datasets, then the presets."""
    return list(BUILTIN_DATASETS) + list(DATASET_PRESETS)


def _accepted_forms() -> str:
    return (f"built-in: {', '.join(BUILTIN_DATASETS)}; presets: {', '.join(DATASET_PRESETS)}; "
            f"or 'hf:ORG/NAME' / 'hfds/ORG/NAME' (Hugging Face datasets), or an image folder path")


def _canonical_split(split: str) -> str:
    s = split.split('[')[0].lower()
    if s in _TRAIN_SPLITS:
        return 'train'
    if s in _EVAL_SPLITS:
        return 'validation'
    return split


def _split_candidates(split: str) -> List[str]:
    """Names to try, in order, for a requested split."""
    canonical = _canonical_split(split)
    if canonical == 'train':
        return [split] + [s for s in _TRAIN_SPLITS if s != split]
    if canonical == 'validation':
        return [split] + [s for s in _EVAL_SPLITS if s != split] + ['test']
    return [split]


def _balanced_indices(targets: Sequence[int], n: int) -> List[int]:
    """First ``n`` indices taking items round-robin over classes, in dataset order within a class.

    Deterministic and class balanced, so small ``num_samples`` subsets (used for quick CPU runs and
    tests) keep every class and are the same on every call.
    """
    by_class: Dict[int, List[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    out, depth = [], 0
    while len(out) < n:
        for q in queues:
            if depth < len(q):
                out.append(q[depth])
                if len(out) == n:
                    break
        depth += 1
    return sorted(out)


def _describe_labels(names: List[str]) -> List[str]:
    """Human-readable names: ImageNet WordNet ids become their lemma (timm's ImageNetInfo)."""
    if not names or not all(len(n) == 9 and n[0] == 'n' and n[1:].isdigit() for n in names):
        return list(names)
    from timm.data import ImageNetInfo
    lemmas = ImageNetInfo('imagenet-22k').label_descriptions(as_dict=True)
    # The first lemma only ('goldfish', not 'goldfish, Carassius auratus'): labels on plots stay short.
    return [lemmas[n].split(',')[0] if n in lemmas else n for n in names]


class HfDatasetReader(Reader):
    """timm Reader over an in-memory/arrow ``datasets.Dataset``: yields (encoded image file, int label).

    Like timm's ReaderHfds it leaves decoding to :class:`~timm.data.ImageDataset` (so RGB conversion
    and corrupt-image skipping are timm's), but it takes an already loaded dataset, so the caller
    can validate splits and columns first. String labels are mapped through ``class_to_idx``.
    """

    def __init__(self, dataset, image_column: str, label_column: str,
                 class_to_idx: Optional[Dict[Any, int]] = None):
        super().__init__()
        import datasets
        self.dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column
        self.label_column = label_column
        self.class_to_idx = class_to_idx
        labels = list(self.dataset[label_column])
        self.targets = [class_to_idx[t] for t in labels] if class_to_idx else [int(t) for t in labels]

    def select(self, indices: List[int]) -> None:
        """Keep only ``indices`` (in that order)."""
        self.dataset = self.dataset.select(indices)
        self.targets = [self.targets[i] for i in indices]

    def __getitem__(self, index):
        image = self.dataset[index][self.image_column]
        if image.get('bytes'):
            return io.BytesIO(image['bytes']), self.targets[index]
        return open(image['path'], 'rb'), self.targets[index]

    def __len__(self):
        return len(self.dataset)

    def _filename(self, index, basename=False, absolute=False):
        path = self.dataset[index][self.image_column].get('path') or f'{index}'
        return os.path.basename(path) if basename else path


class FolderReader(ReaderImageFolder):
    """timm's image-folder reader with a fixed class index and subset selection."""

    @property
    def targets(self) -> List[int]:
        return [t for _, t in self.samples]

    def select(self, indices: List[int]) -> None:
        """Keep only ``indices`` (in that order)."""
        self.samples = [self.samples[i] for i in indices]


class LabeledImageDataset(ImageDataset):
    """A timm ImageDataset that also knows its class names (see the module docstring)."""

    def __init__(self, reader, label_names: Sequence[str], *, transform: Optional[Callable] = None,
                 source: str = '', split: str = ''):
        # input_img_mode='RGB': grayscale (Fashion-MNIST), palette and RGBA images all become
        # 3-channel RGB so pretrained RGB backbones take them unchanged.
        super().__init__(None, reader=reader, input_img_mode='RGB', transform=transform)
        self.label_names = [str(n) for n in label_names]
        self.label_descriptions = _describe_labels(self.label_names)
        self.source = source
        self.split = split

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def targets(self) -> List[int]:
        return list(self.reader.targets)

    def __repr__(self):
        return (f'{type(self).__name__}(source={self.source!r}, split={self.split!r}, '
                f'samples={len(self)}, classes={self.num_classes})')


def _load_parquet(path: Path):
    import datasets
    import pyarrow.parquet as pq
    # An in-memory arrow table: no cache files next to the package or in ~/.cache, no builder
    # progress bars. The features (ClassLabel names, Image) come from the parquet schema metadata
    # that datasets wrote.
    try:
        return datasets.Dataset(pq.read_table(str(path)))
    except Exception as e:
        raise DataError(f'cannot read {path} ({type(e).__name__}: {e}); the file is corrupt: reinstall '
                        f'titans-timm or rebuild it with python tools/make_builtin_dataset.py') from None


def _no_slice(split: str, what: str) -> None:
    if '[' in split:
        raise DataError(f"split '{split}': slices are for Hugging Face datasets; {what} takes a plain split name "
                        f"(for a subset use num_samples, in the trainer --train-num-samples / --val-num-samples)")


def _builtin(name: str, split: str, **columns) -> LabeledImageDataset:
    _no_slice(split, f"the built-in '{name}'")
    files = BUILTIN_DATASETS[name]
    if split.lower() == 'test' and 'test' not in files:
        _logger.info(f"{name}: using split 'validation' for 'test' (it is drawn from the original test split)")
        split = 'validation'
    for candidate in _split_candidates(split):
        canonical = _canonical_split(candidate)
        if canonical in files:
            path = DATA_FILES_DIR / files[canonical]
            break
    else:
        raise DataError(f"split '{split}' not found in built-in dataset '{name}'; "
                        f"available: {', '.join(files)}")
    if not path.is_file():
        raise DataError(f'built-in dataset file missing: {path}; reinstall titans-timm or rebuild it with '
                        f'python tools/make_builtin_dataset.py')
    return _from_hf_dataset(_load_parquet(path), source=name, split=_canonical_split(candidate), **columns)


def _pick_column(ds, wanted: Optional[str], defaults: Sequence[str], feature_type: str, what: str,
                 source: str) -> str:
    import datasets
    columns = list(ds.column_names)
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{what} column '{wanted}' not found in {source}; columns: {', '.join(columns)}")
        return wanted
    for c in defaults:
        if c in columns:
            return c
    typed = [c for c, f in ds.features.items() if isinstance(f, getattr(datasets, feature_type))]
    if typed:
        return typed[0]
    raise DataError(f"no {what} column found in {source} (columns: {', '.join(columns)}); "
                    f"pass {what}_column=NAME")


def _from_hf_dataset(ds, *, source: str, split: str, image_column: Optional[str] = None,
                     label_column: Optional[str] = None, other_splits: Sequence = ()) -> LabeledImageDataset:
    """``other_splits``: the dataset's other splits. Plain integer or string labels get their class index from
    every split, so a class missing from one split keeps its index (and the class count) in the others."""
    import datasets
    image_column = _pick_column(ds, image_column, _IMAGE_COLUMNS, 'Image', 'image', source)
    label_column = _pick_column(ds, label_column, _LABEL_COLUMNS, 'ClassLabel', 'label', source)
    feature = ds.features[label_column]
    # the same column of the other splits, where they have it with the same type (unlabelled test splits skipped)
    others = [d for d in other_splits if d.features.get(label_column) == feature]
    class_to_idx = None
    if isinstance(feature, datasets.ClassLabel):
        label_names = list(feature.names)
    elif isinstance(feature, datasets.Value) and feature.dtype.startswith('int'):
        values = ds.unique(label_column)
        if min(values) < 0:
            raise DataError(f"label column '{label_column}' of {source} has negative labels (unlabelled "
                            f"rows?); pick a labelled split")
        top = max([max(values)] + [max(d.unique(label_column), default=-1) for d in others])
        label_names = [str(i) for i in range(top + 1)]
    elif isinstance(feature, datasets.Value) and feature.dtype in ('string', 'large_string'):
        label_names = sorted(set(ds.unique(label_column)).union(*(d.unique(label_column) for d in others)))
        class_to_idx = {n: i for i, n in enumerate(label_names)}
    else:
        raise DataError(f"label column '{label_column}' of {source} holds {feature}, not class labels; "
                        f"pass label_column=NAME of an integer, string or ClassLabel column")
    reader = HfDatasetReader(ds, image_column, label_column, class_to_idx)
    return LabeledImageDataset(reader, label_names, source=source, split=split)


def _hub(repo: str, split: str, root: Optional[str], source: str, **columns) -> LabeledImageDataset:
    import datasets
    if not repo:
        raise DataError(f"empty Hugging Face dataset id in '{source}'; use hf:ORG/NAME")

    def _load(**kwargs):
        try:
            return datasets.load_dataset(repo, cache_dir=root, **kwargs)
        except ValueError as e:
            if 'split' in str(e).lower():
                return None  # an unknown split: reported below with the available ones
            raise DataError(f"could not load Hugging Face dataset '{repo}': {str(e).splitlines()[0]}") from None
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(
                f"could not load Hugging Face dataset '{repo}': {first}. Downloading needs network access; "
                f"a copy already in the cache loads offline with HF_DATASETS_OFFLINE=1 (cache dir = root); "
                f"offline you can use the built-in '{BUILTIN_DATASET}' or an image folder") from None

    if '[' in split:  # a slice like 'train[:10%]' goes to datasets as is
        ds = _load(split=split)
        if ds is None:
            raise DataError(f"split '{split}' not found in Hugging Face dataset '{repo}'")
        # the class index of plain labels from the whole split it slices (not every split: no extra downloads)
        whole = _load(split=split.partition('[')[0])
        return _from_hf_dataset(ds, source=source, split=split, other_splits=[whole] if whole is not None else [],
                                **columns)
    splits = _load()
    for candidate in _split_candidates(split):
        if candidate in splits:
            if candidate != split:
                _logger.info(f"{source}: using split '{candidate}' for '{split}'")
            return _from_hf_dataset(splits[candidate], source=source, split=candidate,
                                    other_splits=[d for n, d in splits.items() if n != candidate], **columns)
    raise DataError(f"split '{split}' not found in Hugging Face dataset '{repo}'; available: "
                    f"{', '.join(splits)}")


def _natural_key(name: str):
    from timm.data.readers.reader_image_folder import natural_key
    return natural_key(name)


def _class_dirs(directory: Path) -> List[str]:
    return sorted((d.name for d in directory.iterdir() if d.is_dir() and not d.name.startswith('.')),
                  key=_natural_key)


def _folder(root: Path, split: str, source: str) -> LabeledImageDataset:
    _no_slice(split, 'an image folder')
    if not root.exists():
        raise DataError(f'data directory not found: {root}; pass the folder holding train/ and val/ '
                        f'(timm: --data-dir)')
    if not root.is_dir():
        raise DataError(f'data directory is a file, not a folder: {root}')
    present = [d for d in _SPLIT_DIRS if (root / d).is_dir()]
    split_dir = next((root / c for c in _split_candidates(split) if (root / c).is_dir()), None)
    if split_dir is None:
        if present:
            raise DataError(f"split '{split}' not found under {root} (found: {', '.join(present)}); "
                            f"expected {root / _split_candidates(split)[0]}/<class>/<images>")
        split_dir = root  # a bare folder of class folders is the one split there is
        _logger.warning(f'{root} has no train/val folders; using its class folders for split {split!r}')
    # One class index for all splits, taken from the training folder when there is one.
    index_dir = next((root / s for s in _TRAIN_SPLITS if (root / s).is_dir()), split_dir)
    classes = _class_dirs(index_dir)
    if not classes:
        raise DataError(f'no class folders in {index_dir}; expected {index_dir}/<class>/<images>')
    unknown = [c for c in _class_dirs(split_dir) if c not in classes]
    if unknown:
        raise DataError(f"{split_dir} has classes not in {index_dir}: {', '.join(unknown[:5])}; "
                        f"the splits must share class folder names")
    try:
        reader = FolderReader(str(split_dir), class_map={c: i for i, c in enumerate(classes)})
    except RuntimeError as e:  # timm: 'Found 0 images in subfolders of ...'
        raise DataError(f"no images in {split_dir}/<class>/ (supported: "
                        f"{', '.join(get_img_extensions())})") from e
    # timm reads <class>/<image> only: a class whose images all sit one folder deeper would silently vanish
    counts = Counter(reader.targets)
    exts = set(get_img_extensions())
    nested = [c for i, c in enumerate(classes) if not counts[i] and (split_dir / c).is_dir()
              and any(p.suffix.lower() in exts for p in (split_dir / c).glob('*/**/*'))]
    if nested:
        raise DataError(f"{split_dir}: class folder(s) {', '.join(nested[:5])} hold images only in subfolders, "
                        f"which are not read; put each image directly in {split_dir}/<class>/")
    return LabeledImageDataset(reader, classes, source=source,
                               split=split_dir.name if split_dir != root else split)


def _preset(name: str, root: Optional[str], split: str, **columns) -> LabeledImageDataset:
    preset = DATASET_PRESETS[name]
    plain, bracket, rest = split.partition('[')   # a Hugging Face slice stays on the mapped split
    mapped = preset['splits'].get(_canonical_split(plain), plain) + bracket + rest
    if preset['source'] == 'folder':
        if root is None:
            raise DataError(f"dataset '{name}' is an image folder: pass root=DIR (timm: --data-dir DIR) "
                            f"holding {'/'.join(preset['splits'].values())} folders")
        base = Path(root)
        if preset.get('folder') and (base / preset['folder']).is_dir():
            base = base / preset['folder']  # root may be the folder above the unpacked archive
        ds = _folder(base, mapped, source=name)
    else:
        columns = {k: columns.get(k) or preset.get(k) for k in ('image_column', 'label_column')}
        ds = _hub(preset['source'].split('/', 1)[1], mapped, root, source=name, **columns)
    if len(ds.label_names) != preset['num_classes']:
        _logger.warning(f"{name}: found {len(ds.label_names)} classes, expected {preset['num_classes']}")
    return ds


def create_dataset(
        name: str,
        root: Optional[str] = None,
        split: str = 'train',
        is_training: bool = False,
        transform: Optional[Callable] = None,
        num_samples: Optional[int] = None,
        label_column: Optional[str] = None,
        image_column: Optional[str] = None,
) -> LabeledImageDataset:
    """Create a timm-compatible image classification dataset (see the module docstring for ``name``).

    Args:
        name: built-in name, preset name, ``hf:ORG/NAME`` / ``hfds/ORG/NAME``, or a folder path
            (``''`` or ``'folder'`` with ``root``).
        root: image folder root; for Hugging Face ids the ``datasets`` cache dir.
        split: ``'train'`` or an evaluation split; timm's synonyms (``val``, ``valid``, ``validation``,
            ...) are tried in turn, then ``'test'`` for evaluation. Hugging Face slices
            (``'train[:10%]'``) pass through (also for presets); the built-in set and folders refuse them.
        is_training: accepted for signature parity with ``timm.data.create_dataset``; map-style
            datasets do not use it (shuffling is the loader's job).
        transform: transform applied to each PIL image (also settable later as ``ds.transform``).
        num_samples: keep only this many items, a deterministic class-balanced subset.
        label_column: Hugging Face label column (default: preset's, else ``label``/... or the first
            ClassLabel column).
        image_column: Hugging Face image column (default: preset's, else ``image``/``img`` or the
            first Image column).

    Returns:
        A :class:`LabeledImageDataset` yielding ``(image, int label)`` with ``.label_names``.

    Raises:
        DataError: unknown name, missing directory, split or column, or an unreachable Hub dataset.
    """
    if not isinstance(name, str):
        raise DataError(f'dataset name must be a string, got {type(name).__name__}; use one of: '
                        f'{_accepted_forms()}')
    if not isinstance(split, str) or not split:
        raise DataError(f"split must be a non-empty string such as 'train' or 'validation', got {split!r}")
    if num_samples is not None and (not isinstance(num_samples, int) or isinstance(num_samples, bool)
                                    or num_samples < 1):
        raise DataError(f'num_samples must be a positive integer, got {num_samples!r}')
    columns = dict(image_column=image_column, label_column=label_column)
    key = name.strip()
    prefix, sep, rest = key.partition('/')
    if key.lower() in BUILTIN_DATASETS or key.lower().replace('_', '-') in BUILTIN_DATASETS:
        ds = _builtin(key.lower().replace('_', '-'), split, **columns)
    elif key.lower() in DATASET_PRESETS:
        ds = _preset(key.lower(), root, split, **columns)
    elif key.lower().startswith('hf:'):
        ds = _hub(key[3:], split, root, source=key, **columns)
    elif sep and prefix.lower() == 'hfds':
        ds = _hub(rest, split, root, source=key, **columns)
    elif key.lower() in ('', 'folder', 'imagefolder', 'image_folder'):
        if root is None:
            raise DataError(f"an image folder dataset needs root=DIR (timm: --data-dir DIR); or name one of: "
                            f"{_accepted_forms()}")
        ds = _folder(Path(root), split, source=str(root))
    elif sep and prefix.lower() in _OTHER_TIMM_PREFIXES and not Path(key).exists():
        raise DataError(f"timm's '{prefix}/' datasets are not supported here (they stream or download); "
                        f"use one of: {_accepted_forms()}")
    elif Path(key).is_dir() or key.startswith(('.', '/', '~')) or os.sep in key:
        path = Path(key).expanduser()
        if not path.exists() and key.count('/') == 1 and not key.startswith(('.', '/', '~')):
            # 'ORG/NAME' is far more likely a Hub id than a relative folder that does not exist
            raise DataError(f"no folder '{key}' here; for the Hugging Face dataset write 'hf:{key}'")
        ds = _folder(path, split, source=key)
    else:
        raise DataError(f"unknown dataset '{name}'; use one of: {_accepted_forms()}")
    if num_samples is not None and num_samples < len(ds):
        ds.reader.select(_balanced_indices(ds.reader.targets, num_samples))
    if transform is not None:
        ds.transform = transform
    return ds


def dataset_num_classes(ds) -> int:
    """Number of classes of a dataset from :func:`create_dataset` or a timm/torchvision dataset."""
    names = getattr(ds, 'label_names', None)
    if names is not None:
        return len(names)
    reader = getattr(ds, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None) or getattr(ds, 'class_to_idx', None)
    if class_to_idx:
        return len(set(class_to_idx.values()))
    classes = getattr(ds, 'classes', None)
    if classes is not None:
        return len(classes)
    raise DataError(f'cannot tell the number of classes of {type(ds).__name__}; pass num_classes explicitly')
