"""The backbone that ships in the package (tag ``fmnist5``), the transfer set, the main job, and offline errors.

``timm.create_model('vit_tiny_*_*.fmnist5', pretrained=True)`` loads with no network and no path, equals the
plain backbone bit for bit at step 0, and says in its pretrained_cfg what it was trained on; a Hub tag without
the network fails in seconds with the offline routes instead of retrying for a minute."""
import argparse
import json

import pytest
import timm
import torch
import yaml
from timm.data import create_transform, resolve_data_config

import titans_timm  # noqa: F401
from titans_timm import checkpoint as ckpt
from titans_timm import quickstart, train, vit
from titans_timm.data import DATA_FILES_DIR, TRANSFER_DATASET, create_dataset

TINY_TAGGED = [n for n in timm.list_pretrained('vit_tiny_*.fmnist5')]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: HF_HUB_OFFLINE and an empty Hugging Face cache."""
    from huggingface_hub import constants
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hf-cache'))


@pytest.fixture(scope='module')
def test_images():
    model = timm.create_model('vit_tiny_mal_mlp.fmnist5')
    ds = create_dataset(TRANSFER_DATASET, split='test', num_samples=20,
                        transform=create_transform(**resolve_data_config(model=model)))
    return torch.stack([ds[i][0] for i in range(len(ds))])


@pytest.fixture(scope='module')
def backbone_logits(test_images):
    backbone, meta = ckpt.load_model(vit.FMNIST5_WEIGHTS)
    assert meta['architecture'] == 'vit_tiny_patch16_224'
    with torch.no_grad():
        return backbone(test_images)


def test_every_tiny_model_has_the_tag():
    assert sorted(TINY_TAGGED) == sorted(f'vit_tiny_{a}_{m}.fmnist5' for a in ('mal', 'mac', 'mag')
                                         for m in ('mlp', 'simple', 'advanced'))


@pytest.mark.parametrize('name', TINY_TAGGED)
def test_tag_loads_offline_and_equals_the_backbone_at_step0(name, offline, test_images, backbone_logits):
    model = timm.create_model(name, pretrained=True).eval()
    # the tag's architecture: 28 px, 4 px patches, 4 blocks, the five pretraining classes
    assert (model.patch_embed.img_size, model.patch_embed.patch_size, len(model.blocks)) == ((28, 28), (4, 4), 4)
    assert model.num_classes == 5
    with torch.no_grad():
        logits = model(test_images)
    assert torch.equal(logits, backbone_logits)  # bit for bit: every memory gate starts at zero
    # the backbone is a real classifier of its five classes, not random weights
    labels = torch.tensor([create_dataset(TRANSFER_DATASET, split='test', num_samples=20)[i][1] for i in range(20)])
    assert logits.argmax(-1).shape == labels.shape


def test_pretrained_cfg_and_file_say_what_it_was_trained_on():
    cfg = timm.models.get_pretrained_cfg('vit_tiny_mag_advanced.fmnist5')
    assert cfg.file == str(vit.FMNIST5_WEIGHTS) and not cfg.hf_hub_id
    assert cfg.label_names == ('Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot') and cfg.num_classes == 5
    assert 'Fashion-MNIST' in cfg.description and 'tools/pretrain_backbone.py' in cfg.description
    meta = ckpt.read_metadata(vit.FMNIST5_WEIGHTS)
    assert meta['command'].startswith('python tools/pretrain_backbone.py')
    assert isinstance(meta['seed'], int) and 'dataset-fashion-mnist' in meta['dataset']
    assert meta['label_names'] == list(cfg.label_names)
    assert meta['model_args'] == dict(vit.FMNIST5_MODEL_ARGS, num_classes=5)
    assert meta['validation_top1'] > 80.0  # it learned its five classes


def test_transfer_set_is_other_classes_with_a_large_test_split():
    names = {split: create_dataset(TRANSFER_DATASET, split=split) for split in ('train', 'validation', 'test')}
    assert {len(d) for d in names.values()} == {5000, 1000} and len(names['test']) == 5000
    classes = names['test'].label_names
    assert classes == ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat']
    assert not set(classes) & set(timm.models.get_pretrained_cfg('vit_tiny_mal_mlp.fmnist5').label_names)
    # validation is carved from the training images, disjoint from them
    rows = {split: set(d.reader.dataset['source_index']) for split, d in names.items() if split != 'test'}
    assert not rows['train'] & rows['validation']


def test_shipped_data_and_weights_stay_small():
    added = [DATA_FILES_DIR / f'fashion_mnist_transfer_{s}.parquet' for s in ('train', 'validation', 'test')]
    added.append(vit.FMNIST5_WEIGHTS)
    assert sum(p.stat().st_size for p in added) <= 30e6


def test_tag_architecture_is_recorded_and_rebuilds_without_the_tag(tmp_path):
    model = timm.create_model('vit_tiny_mac_simple.fmnist5', num_classes=3)
    args = model.resolved_model_args()
    assert {k: args[k] for k in ('img_size', 'patch_size', 'depth')} == vit.FMNIST5_MODEL_ARGS
    path = ckpt.save_model(model, tmp_path / 'm.safetensors', architecture='vit_tiny_mac_simple',
                           model_args=dict(num_classes=3))
    again, _ = ckpt.load_model(path)
    assert len(again.blocks) == 4 and again.patch_embed.patch_size == (4, 4)


def test_a_head_for_other_classes_starts_at_zero():
    model = timm.create_model('vit_tiny_mal_mlp.fmnist5', pretrained=True)
    args = argparse.Namespace(pretrained=True, pretrained_path=None, rank=0)
    before = model.head.weight.clone()
    train._zero_head_for_other_classes(args, model, ['Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot'])
    assert torch.equal(model.head.weight, before)  # the same classes: the pretrained head is kept
    train._zero_head_for_other_classes(args, model, ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat'])
    assert not model.head.weight.any() and not model.head.bias.any()



def test_a_head_for_other_classes_starts_at_zero_with_pretrained_path():
    # the class names come from the weights file itself (its metadata), as the trainer reads --pretrained-path
    args = train.build_parser().parse_args(['--model', 'vit_tiny_mal_mlp', '--pretrained-path',
                                            str(vit.FMNIST5_WEIGHTS)])
    args.rank = 0
    model = train._create_model(args, train._model_kwargs(args, 5))
    assert list(model.pretrained_cfg['label_names']) == ['Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']
    before = model.head.weight.clone()
    assert before.any()
    train._zero_head_for_other_classes(args, model, ['Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot'])
    assert torch.equal(model.head.weight, before)
    train._zero_head_for_other_classes(args, model, ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat'])
    assert not model.head.weight.any() and not model.head.bias.any()

@pytest.mark.parametrize('name', ['vit_small_mac_simple', 'vit_tiny_mag_advanced'])
def test_hub_tag_offline_fails_at_once_with_the_routes(name, offline):
    with pytest.raises(vit.PretrainedWeightsUnavailable) as e:
        timm.create_model(name, pretrained=True)
    msg = str(e.value)
    assert 'model.safetensors' in msg and 'HF_HUB_OFFLINE' in msg and 'local-dir:' in msg
    assert 'pretrained_cfg_overlay=dict(file=' in msg and '.fmnist5' in msg


def test_hub_tag_with_an_unreachable_hub_fails_with_the_routes(monkeypatch, tmp_path):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hf-cache'))
    monkeypatch.setattr(constants, 'ENDPOINT', 'http://127.0.0.1:9')  # nothing listens on the discard port
    with pytest.raises(vit.PretrainedWeightsUnavailable, match='127.0.0.1 is unreachable'):
        timm.create_model('vit_tiny_mal_mlp', pretrained=True)


def test_main_job_end_to_end_small(tmp_path, capsys):
    """titans-timm-quickstart on a budget: step-0 check, two seeds of the memory model and the plain fine-tune
    paired, the table with intervals, the pictures."""
    recipe = yaml.safe_load(open(quickstart.default_recipe()))
    recipe.update(train_num_samples=40, val_num_samples=20, batch_size=20, epochs=2, freeze_epochs=1)
    path = tmp_path / 'small.yaml'
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / 'quick'
    assert quickstart.main(['-c', str(path), '--seeds', '2', '--model', 'vit_tiny_mag_simple',
                            '--output', str(out), '--surprise-maps', '2']) == 0
    printed = capsys.readouterr().out
    assert 'equals the backbone bit for bit' in printed
    assert '| vit_tiny_mag_simple | 2 |' in printed and '| vit_tiny_baseline | 2 |' in printed
    assert 'time: backbone' in printed
    for name in ('confusion_matrix.png', 'surprise_maps.png', 'eval_report.json'):
        assert (out / 'eval' / name).is_file()
    report = json.loads((out / 'eval' / 'eval_report.json').read_text())
    assert report['split'] == 'test'
    assert quickstart.main(['--model', 'resnet50']) == 2
