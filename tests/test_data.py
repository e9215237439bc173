"""Datasets: the built-in Fashion-MNIST subset, image folders, cached Hub datasets, and clear errors."""
import glob
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_loader, create_transform

from titans_timm.data import (
    BUILTIN_DATASET, DATA_FILES_DIR, DATASET_PRESETS, DataError, create_dataset, dataset_num_classes,
)

FASHION_NAMES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    """Never touch the network: the Hub is unreachable here and retries would take ~25 s."""
    import datasets
    import huggingface_hub
    monkeypatch.setattr(datasets.config, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)


# ---------------------------------------------------------------- built-in dataset

def test_builtin_dataset_offline():
    train = create_dataset(BUILTIN_DATASET, split='train')
    val = create_dataset(BUILTIN_DATASET, split='validation')
    assert (len(train), len(val)) == (4000, 1000)
    assert train.label_names == FASHION_NAMES and val.label_names == FASHION_NAMES
    assert dataset_num_classes(train) == 10
    # class balanced: 400 / 100 per class
    assert np.bincount(train.targets).tolist() == [400] * 10
    assert np.bincount(val.targets).tolist() == [100] * 10
    img, label = train[0]
    assert isinstance(img, Image.Image) and img.mode == 'RGB' and img.size == (28, 28)
    assert isinstance(label, int) and label == train.targets[0]
    # grayscale source: the three channels are equal, and the images are not blank
    px = np.asarray(img)
    assert np.array_equal(px[..., 0], px[..., 2]) and px.max() > px.min()


def test_builtin_files_are_small_and_have_provenance():
    files = sorted(DATA_FILES_DIR.glob('*.parquet'))
    assert [f.name for f in files] == ['fashion_mnist_mini_train.parquet', 'fashion_mnist_mini_validation.parquet',
                                       'fashion_mnist_transfer_test.parquet', 'fashion_mnist_transfer_train.parquet',
                                       'fashion_mnist_transfer_validation.parquet']
    assert sum(f.stat().st_size for f in files if 'mini' in f.name) < 3_000_000
    # the transfer set and the shipped backbone together: test_pretrained_tag.py (at most 30 MB)
    readme = (DATA_FILES_DIR / 'README.md').read_text()
    assert 'MIT' in readme and 'Zalando' in readme and 'dataset-fashion-mnist' in readme
    assert 'fashion-mnist-transfer' in readme and 'tools/pretrain_backbone.py' in readme


def test_train_and_validation_images_are_disjoint():
    import datasets
    import pyarrow.parquet as pq
    tables = {s: datasets.Dataset(pq.read_table(str(DATA_FILES_DIR / f'fashion_mnist_mini_{s}.parquet')))
              for s in ('train', 'validation')}
    train_bytes = {row['bytes'] for row in tables['train'].cast_column('image', datasets.Image(decode=False))['image']}
    val_bytes = [row['bytes'] for row in tables['validation'].cast_column('image', datasets.Image(decode=False))['image']]
    assert not train_bytes.intersection(val_bytes)


@pytest.mark.parametrize('split', ['val', 'valid', 'eval', 'VALIDATION'])
def test_split_synonyms(split):
    assert len(create_dataset(BUILTIN_DATASET, split=split)) == 1000


def test_num_samples_is_balanced_and_deterministic():
    a = create_dataset(BUILTIN_DATASET, num_samples=50)
    b = create_dataset(BUILTIN_DATASET, num_samples=50)
    assert len(a) == 50 and np.bincount(a.targets).tolist() == [5] * 10
    assert a.targets == b.targets
    assert np.array_equal(np.asarray(a[7][0]), np.asarray(b[7][0]))


def test_timm_loader_batch():
    ds = create_dataset(BUILTIN_DATASET, split='train', num_samples=40,
                        transform=create_transform(32, is_training=True, mean=(0.5,) * 3, std=(0.5,) * 3))
    loader = create_loader(ds, input_size=(3, 32, 32), batch_size=8, is_training=True, use_prefetcher=False,
                           num_workers=0)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (8,) and y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < 10
    # timm's usual pattern: create_loader sets the transform itself on a plain dataset
    ds2 = create_dataset(BUILTIN_DATASET, split='validation', num_samples=16)
    loader2 = create_loader(ds2, input_size=(3, 32, 32), batch_size=16, is_training=False, use_prefetcher=False,
                            num_workers=0)
    x2, _ = next(iter(loader2))
    assert x2.shape == (16, 3, 32, 32)


# ---------------------------------------------------------------- image folders

def _write_images(directory: Path, n: int, mode: str = 'RGB', size=(20, 16), value: int = 0):
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = np.full((size[1], size[0]) + ((3,) if mode == 'RGB' else ()), (value + 40 * i) % 256, np.uint8)
        Image.fromarray(arr, mode=mode).save(directory / f'{i}.png')


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / 'pets'
    _write_images(root / 'train' / 'cat', 3)
    _write_images(root / 'train' / 'dog', 2, mode='L')  # grayscale is converted to RGB
    _write_images(root / 'train' / 'emu', 2)
    _write_images(root / 'val' / 'cat', 1)
    _write_images(root / 'val' / 'emu', 2)  # no dog images in val
    return root


def test_image_folder(folder):
    train = create_dataset('folder', root=str(folder), split='train')
    val = create_dataset(str(folder), split='validation')
    assert train.label_names == ['cat', 'dog', 'emu'] and val.label_names == ['cat', 'dog', 'emu']
    assert sorted(train.targets) == [0, 0, 0, 1, 1, 2, 2]
    # emu keeps index 2 in val although val has no dog folder
    assert sorted(val.targets) == [0, 2, 2] and val.split == 'val'
    for i in range(len(train)):
        img, _ = train[i]
        assert img.mode == 'RGB' and img.size == (20, 16)


def test_class_with_images_only_in_subfolders_is_an_error(folder):
    """timm reads <class>/<image>; a class whose images sit one folder deeper would silently have none."""
    shutil.rmtree(folder / 'val' / 'cat')
    _write_images(folder / 'val' / 'cat' / 'batch1', 2)
    with pytest.raises(DataError, match=r"class folder\(s\) cat hold images only in subfolders"):
        create_dataset(str(folder), split='validation')


def test_bare_class_folder_is_one_split(folder):
    ds = create_dataset('', root=str(folder / 'val'), split='validation')
    assert ds.label_names == ['cat', 'emu'] and len(ds) == 3


def test_ants_bees_preset_finds_unpacked_archive(tmp_path):
    base = tmp_path / 'data' / 'hymenoptera_data'
    for split in ('train', 'val'):
        for c in ('ants', 'bees'):
            _write_images(base / split / c, 2)
    for root in (tmp_path / 'data', base):
        ds = create_dataset('ants-bees', root=str(root), split='validation')
        assert ds.label_names == ['ants', 'bees'] and len(ds) == 4 and ds.split == 'val'


def test_imagenet_folder_gets_readable_descriptions(tmp_path):
    for wnid in ('n01443537', 'n01440764'):
        _write_images(tmp_path / 'train' / wnid, 1)
    ds = create_dataset('imagenet', root=str(tmp_path), split='train')
    assert ds.label_names == ['n01440764', 'n01443537']
    assert ds.label_descriptions == ['tench', 'goldfish']


# ---------------------------------------------------------------- Hugging Face datasets, offline from the cache

def _populate_datasets_cache(cache: Path, repo: str, splits: dict, tmp: Path):
    """Lay out ``cache`` as ``datasets`` leaves it after downloading ``repo`` (datasets >= 2.16 layout:
    ORG___NAME/default/0.0.0/HASH/{NAME-SPLIT.arrow, dataset_info.json}), so offline loading of the
    Hub id takes the real code path without a network."""
    import datasets
    files = {}
    for split, ds in splits.items():
        files[split] = str(tmp / f'{split}.parquet')
        ds.to_parquet(files[split])
    datasets.load_dataset('parquet', data_files=files, cache_dir=str(tmp / 'build'))
    built = Path(next(p for p in glob.glob(str(tmp / 'build' / 'parquet' / '*' / '0.0.0' / '*')) if Path(p).is_dir()))
    org, name = repo.split('/')
    target = cache / f'{org}___{name}' / 'default' / '0.0.0' / built.name
    shutil.copytree(built, target)
    for f in target.glob('parquet-*.arrow'):
        f.rename(target / f.name.replace('parquet-', f'{name}-'))


@pytest.fixture
def cifar100_like_cache(tmp_path):
    import datasets
    import pyarrow.parquet as pq
    src = datasets.Dataset(pq.read_table(str(DATA_FILES_DIR / 'fashion_mnist_mini_validation.parquet')))
    src = src.select(range(30)).rename_columns({'image': 'img', 'label': 'fine_label'})
    cache = tmp_path / 'hf_cache'
    _populate_datasets_cache(cache, 'uoft-cs/cifar100', {'train': src, 'test': src.select(range(10))}, tmp_path)
    return cache


def test_hub_preset_from_offline_cache(cifar100_like_cache):
    # the cifar100 preset knows the columns (img, fine_label) and that its evaluation split is 'test'
    val = create_dataset('cifar100', root=str(cifar100_like_cache), split='validation')
    assert len(val) == 10 and val.split == 'test' and val.label_names == FASHION_NAMES
    img, label = val[3]
    assert img.mode == 'RGB' and label == 3
    hf = create_dataset('hf:uoft-cs/cifar100', root=str(cifar100_like_cache), split='train', num_samples=20)
    timm_style = create_dataset('hfds/uoft-cs/cifar100', root=str(cifar100_like_cache), split='train')
    assert len(hf) == 20 and len(timm_style) == 30 and hf.label_names == FASHION_NAMES


def test_hub_column_errors(cifar100_like_cache):
    with pytest.raises(DataError, match=r"label column 'coarse_label' not found .*columns: img, fine_label"):
        create_dataset('hf:uoft-cs/cifar100', root=str(cifar100_like_cache), label_column='coarse_label')
    with pytest.raises(DataError, match=r"split 'holdout' not found .*available: train, test"):
        create_dataset('hf:uoft-cs/cifar100', root=str(cifar100_like_cache), split='holdout')


def test_hub_slices_reach_presets_and_plain_labels_share_one_index(cifar100_like_cache, tmp_path):
    """A preset keeps a Hugging Face slice on its mapped split; string labels get one class index from every
    split, so a class missing from the test split keeps its index there."""
    assert len(create_dataset('cifar100', root=str(cifar100_like_cache), split='train[:6]')) == 6
    import datasets
    import pyarrow.parquet as pq
    src = datasets.Dataset(pq.read_table(str(DATA_FILES_DIR / 'fashion_mnist_mini_validation.parquet')))
    src = src.select(range(9)).cast_column('label', datasets.Value('int64'))
    names = ['apple', 'banana', 'cherry']
    words = src.map(lambda row: {'word': names[row['label'] % 3]}).remove_columns('label')
    cache = tmp_path / 'words_cache'
    test = words.filter(lambda row: row['word'] != 'apple')
    (tmp_path / 'words_build').mkdir()
    _populate_datasets_cache(cache, 'someone/words', {'train': words, 'test': test}, tmp_path / 'words_build')
    train = create_dataset('hf:someone/words', root=str(cache), split='train', label_column='word')
    val = create_dataset('hf:someone/words', root=str(cache), split='validation', label_column='word')
    assert train.label_names == val.label_names == names
    assert {names[t] for t in val.targets} == {'banana', 'cherry'}
    assert [names[t] for t in val.targets] == test['word']


def test_builtin_refuses_slices_and_reads_test_as_its_validation_split():
    with pytest.raises(DataError, match=r"slices are for Hugging Face datasets.*num_samples"):
        create_dataset(BUILTIN_DATASET, split='train[:10%]')
    assert len(create_dataset(BUILTIN_DATASET, split='test')) == len(create_dataset(BUILTIN_DATASET, split='validation'))
    with pytest.raises(DataError, match='num_samples must be a positive integer'):
        create_dataset(BUILTIN_DATASET, num_samples=True)


def test_unreachable_hub_dataset(tmp_path):
    with pytest.raises(DataError, match=r"could not load Hugging Face dataset 'uoft-cs/cifar10'.*network"):
        create_dataset('cifar10', root=str(tmp_path))
    with pytest.raises(DataError, match='fashion-mnist-mini'):
        create_dataset('hf:nobody/nothing', root=str(tmp_path))


# ---------------------------------------------------------------- bad input

def test_unknown_name_lists_the_options():
    with pytest.raises(DataError) as e:
        create_dataset('cifar-11')
    msg = str(e.value)
    assert "unknown dataset 'cifar-11'" in msg and BUILTIN_DATASET in msg and 'hf:ORG/NAME' in msg
    assert all(p in msg for p in DATASET_PRESETS)


def test_hub_id_without_prefix_and_other_timm_prefixes():
    with pytest.raises(DataError, match="write 'hf:uoft-cs/cifar10'"):
        create_dataset('uoft-cs/cifar10')
    with pytest.raises(DataError, match="timm's 'torch/' datasets are not supported"):
        create_dataset('torch/cifar10')
    with pytest.raises(DataError, match='must be a string'):
        create_dataset(None)


def test_missing_data_directory(tmp_path):
    with pytest.raises(DataError, match='data directory not found'):
        create_dataset('folder', root=str(tmp_path / 'nope'))
    with pytest.raises(DataError, match='pass root=DIR'):
        create_dataset('imagenet')
    with pytest.raises(DataError, match='needs root=DIR'):
        create_dataset('folder')


def test_missing_split(folder, tmp_path):
    with pytest.raises(DataError, match=r"split 'holdout' not found in built-in dataset .*train, validation"):
        create_dataset(BUILTIN_DATASET, split='holdout')
    shutil.rmtree(folder / 'val')
    with pytest.raises(DataError, match=r"split 'validation' not found under .*found: train"):
        create_dataset(str(folder), split='validation')


def test_bad_folders(folder, tmp_path):
    _write_images(folder / 'val' / 'yak', 1)
    with pytest.raises(DataError, match="classes not in .*yak"):
        create_dataset(str(folder), split='val')
    empty = tmp_path / 'empty'
    (empty / 'train' / 'cat').mkdir(parents=True)
    with pytest.raises(DataError, match='no images in'):
        create_dataset(str(empty))
    (tmp_path / 'noclasses' / 'train').mkdir(parents=True)
    with pytest.raises(DataError, match='no class folders'):
        create_dataset(str(tmp_path / 'noclasses'))


def test_bad_arguments():
    with pytest.raises(DataError, match=r"label column 'lbl' not found .*columns: image, label"):
        create_dataset(BUILTIN_DATASET, label_column='lbl')
    with pytest.raises(DataError, match="image column 'pixels' not found"):
        create_dataset(BUILTIN_DATASET, image_column='pixels')
    with pytest.raises(DataError, match="holds .*not class labels"):
        create_dataset(BUILTIN_DATASET, label_column='image')
    with pytest.raises(DataError, match='num_samples must be a positive integer'):
        create_dataset(BUILTIN_DATASET, num_samples=0)


def test_dataset_num_classes_for_other_datasets():
    from torchvision.datasets import FakeData
    fake = FakeData(size=2, num_classes=7)
    fake.classes = list(range(7))
    assert dataset_num_classes(fake) == 7
    with pytest.raises(DataError, match='pass num_classes'):
        dataset_num_classes(torch.utils.data.TensorDataset(torch.zeros(2)))
