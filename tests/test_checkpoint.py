"""Checkpoints: bit-identical round trips, atomic writes, and one clear error for every bad file."""
import argparse
import json
import os
import stat

import pytest
import torch
import timm
from timm.data import resolve_data_config

from titans_timm import checkpoint as ckpt
from titans_timm.checkpoint import CheckpointError, load_model, load_state_dict_file, read_metadata, save_model

ARCH = 'vit_tiny_patch16_224'
ARGS = dict(img_size=32, depth=2, num_classes=10)
LABELS = [f'class_{i}' for i in range(10)]


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(ARCH, **{**ARGS, **kwargs})


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def saved(tmp_path):
    model = _model()
    path = save_model(model, tmp_path / 'run' / 'model.safetensors', architecture=ARCH, model_args=ARGS,
                      label_names=LABELS, extra_metadata={'epoch': 3, 'top1': 12.5})
    return model, path


def test_round_trip_bit_identical(saved):
    model, path = saved
    loaded, meta = load_model(path)
    assert _same_weights(model, loaded)
    assert not loaded.training
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))
    assert meta['architecture'] == ARCH and meta['model_args'] == ARGS
    assert meta['label_names'] == LABELS and meta['epoch'] == 3 and meta['top1'] == 12.5


def test_metadata_records_eval_config_for_built_size(saved):
    _, path = saved
    meta = read_metadata(path)
    cfg = meta['pretrained_cfg']
    # built with img_size=32: the stored input size must be 32, not timm's pretrained 224
    assert cfg['input_size'] == [3, 32, 32] and cfg['num_classes'] == 10
    assert set(ckpt.PRETRAINED_CFG_KEYS) <= set(cfg)
    loaded, _ = load_model(path)
    assert resolve_data_config(model=loaded)['input_size'] == (3, 32, 32)
    # the file is a plain safetensors file whose header metadata any reader can parse
    from safetensors import safe_open
    with safe_open(str(path), framework='pt') as f:
        assert json.loads(f.metadata()['titans_timm'])['architecture'] == ARCH


def test_extra_pretrained_cfg_overrides_recorded_normalisation(tmp_path):
    path = save_model(_model(), tmp_path / 'm.safetensors', architecture=ARCH, model_args=ARGS,
                      extra_metadata={'pretrained_cfg': {'mean': [0.3, 0.3, 0.3]}})
    model, meta = load_model(path)
    assert meta['pretrained_cfg']['mean'] == [0.3, 0.3, 0.3]
    assert tuple(model.pretrained_cfg['mean']) == (0.3, 0.3, 0.3)


def test_overrides_update_model_args(saved):
    _, path = saved
    model, meta = load_model(path, drop_path_rate=0.1)
    assert meta['model_args'] == {**ARGS, 'drop_path_rate': 0.1}
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)


def test_failing_write_leaves_old_file_intact(saved, monkeypatch):
    model, path = saved
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError('disk full')

    monkeypatch.setattr(ckpt.os, 'replace', boom)
    with pytest.raises(OSError, match='disk full'):
        save_model(_model(seed=1), path, architecture=ARCH, model_args=ARGS)
    assert path.read_bytes() == before
    # no temp files are left behind in the directory
    assert sorted(os.listdir(path.parent)) == ['model.safetensors']


def test_interrupted_write_leaves_old_file_intact(saved, monkeypatch):
    _, path = saved
    before = path.read_bytes()

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.os, 'fsync', interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_model(_model(seed=1), path, architecture=ARCH, model_args=ARGS)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == ['model.safetensors']


def test_model_args_must_be_json(tmp_path):
    with pytest.raises(CheckpointError, match='act_layer'):
        save_model(_model(), tmp_path / 'm.safetensors', architecture=ARCH,
                   model_args={**ARGS, 'act_layer': torch.nn.GELU})
    assert not (tmp_path / 'm.safetensors').exists()


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match='not found'):
        load_model(tmp_path / 'nope.safetensors')
    with pytest.raises(CheckpointError, match='directory'):
        load_model(tmp_path)


@pytest.mark.parametrize('damage', ['truncate', 'garbage', 'empty'])
def test_corrupt_file(saved, damage):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes({'truncate': data[:len(data) // 2], 'garbage': b'not a checkpoint' * 8, 'empty': b''}[damage])
    with pytest.raises(CheckpointError, match='corrupt'):
        load_model(path)


def test_wrong_architecture_names_keys(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match=r'shape mismatches: cls_token'):
        load_model(path, architecture='vit_small_patch16_224')
    with pytest.raises(CheckpointError, match=r'head\.weight \(10, 192\) vs model \(5, 192\)'):
        load_model(path, num_classes=5)
    with pytest.raises(CheckpointError, match='not a registered timm model'):
        load_model(path, architecture='vit_no_such_model')


def test_extra_blocks_named_as_unexpected_keys(tmp_path):
    deep = save_model(_model(depth=3), tmp_path / 'deep.safetensors', architecture=ARCH,
                      model_args={**ARGS, 'depth': 3})
    with pytest.raises(CheckpointError, match=r'unexpected keys: blocks\.2\.'):
        load_model(deep, depth=2)


def test_plain_state_dict_needs_architecture(tmp_path):
    import safetensors.torch
    model = _model()
    path = tmp_path / 'plain.safetensors'
    safetensors.torch.save_file(model.state_dict(), str(path))
    with pytest.raises(CheckpointError, match='architecture='):
        load_model(path)
    assert read_metadata(path, required=False) == {}
    loaded, meta = load_model(path, architecture=ARCH, **ARGS)
    assert _same_weights(model, loaded) and meta['label_names'] is None


def test_load_state_dict_file_into_model(saved):
    model, path = saved
    target = _model(seed=5)
    assert not _same_weights(model, target)
    load_state_dict_file(target, path)
    assert _same_weights(model, target)
    wrong = _model(num_classes=3)
    head_before = wrong.head.weight.clone()
    with pytest.raises(CheckpointError, match='head.weight'):
        load_state_dict_file(wrong, path)
    assert torch.equal(wrong.head.weight, head_before)  # a failed strict load changes nothing


def test_timm_training_pth_checkpoint(tmp_path):
    # timm train.py saves {'state_dict', 'state_dict_ema', 'args': Namespace, ...}, often with DDP prefixes
    model, ema = _model(seed=0), _model(seed=1)
    path = tmp_path / 'last.pth.tar'
    torch.save({'epoch': 2, 'arch': ARCH, 'args': argparse.Namespace(lr=0.1),
                'state_dict': {'module.' + k: v for k, v in model.state_dict().items()},
                'state_dict_ema': ema.state_dict()}, path)
    loaded, _ = load_model(path, architecture=ARCH, **ARGS)
    assert _same_weights(model, loaded)
    target = _model(seed=7)
    load_state_dict_file(target, path, use_ema=True)
    assert _same_weights(ema, target)


class _NotATensor:
    pass


def test_pth_with_code_is_never_unpickled(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'weight': _NotATensor()}, path)
    with pytest.raises(CheckpointError, match='never unpickled'):
        load_model(path, architecture=ARCH, **ARGS)


@pytest.mark.parametrize('approach', ['mal', 'mac', 'mag'])
@pytest.mark.parametrize('memory', ['mlp', 'simple', 'advanced'])
def test_memory_model_round_trip(tmp_path, approach, memory):
    import titans_timm  # noqa: F401  (registers the memory models)
    name = f'vit_tiny_{approach}_{memory}'
    torch.manual_seed(0)
    model = timm.create_model(name, **ARGS).eval()
    path = save_model(model, tmp_path / 'model.safetensors', architecture=name, model_args=ARGS, label_names=LABELS)
    loaded, meta = load_model(path)
    assert _same_weights(model, loaded) and meta['architecture'] == name
    assert meta['pretrained_cfg']['input_size'] == [3, 32, 32]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    # the memory model's weights do not load into the plain backbone, and the error names memory keys
    with pytest.raises(CheckpointError, match='unexpected keys'):
        load_model(path, architecture=ARCH)


def test_checkpoint_pins_resolved_memory_arguments(tmp_path):
    """A checkpoint rebuilds the model it was saved from even if a default (placement, memory options) changes."""
    import titans_timm.vit as vit
    model = timm.create_model('vit_tiny_mag_simple', img_size=32, depth=4, num_classes=10)
    path = save_model(model, tmp_path / 'm.safetensors', architecture='vit_tiny_mag_simple',
                      model_args=dict(img_size=32, depth=4, num_classes=10))
    args = read_metadata(path)['model_args']
    assert args['memory_blocks'] == list(model.memory_blocks)
    assert args['memory_options'] == model.blocks[model.memory_blocks[0]].memory.options
    old = vit.DEFAULT_MEMORY_INTERVAL
    try:
        vit.DEFAULT_MEMORY_INTERVAL = 1  # a later release changes the default placement
        loaded, _ = load_model(path)
    finally:
        vit.DEFAULT_MEMORY_INTERVAL = old
    assert loaded.memory_blocks == model.memory_blocks


@pytest.mark.parametrize('umask', [0o022, 0o077])
def test_written_files_get_the_umask_mode(tmp_path, umask):
    """Checkpoints are shared like any file the user writes: 0o666 less the umask, not a private 0o600."""
    old = os.umask(umask)
    try:
        path = tmp_path / 'm.safetensors'
        save_model(_model(), path, architecture=ARCH, model_args=ARGS)
        ckpt.atomic_write_bytes(tmp_path / 'results.json', b'{}')
    finally:
        os.umask(old)
    for p in (path, tmp_path / 'results.json'):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


def _model_folder(folder, model, model_args, **kwargs):
    """A model folder as the trainer writes it: config.json (timm's writer) + model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_bytes(folder / ckpt.CONFIG_NAME, ckpt.config_json(model, model_args=model_args, **kwargs).encode())
    ckpt.atomic_write_bytes(folder / ckpt.WEIGHTS_NAME, ckpt.weights_bytes(model))
    return folder


@pytest.mark.parametrize('name', ['vit_tiny_mag_simple', ARCH])
def test_model_folder_is_timm_layout_and_loads_both_ways(tmp_path, name):
    """config.json + model.safetensors: timm's local-dir loader and load_model give the same model, bit for bit, with
    the label names and the preprocessing it was trained with."""
    import titans_timm  # noqa: F401  (registers the memory models)
    torch.manual_seed(0)
    model = timm.create_model(name, **ARGS).eval()
    folder = _model_folder(tmp_path / 'run', model, ARGS, label_names=LABELS,
                           data_config=dict(mean=[0.3] * 3, std=[0.4] * 3, interpolation='bilinear', crop_pct=1.0))
    from safetensors import safe_open
    with safe_open(str(folder / ckpt.WEIGHTS_NAME), framework='pt') as f:
        assert f.metadata() == {'format': 'pt'}
    config = json.loads((folder / ckpt.CONFIG_NAME).read_text())
    assert config['architecture'] == name and config['num_classes'] == 10 and config['label_names'] == LABELS
    assert config['pretrained_cfg']['input_size'] == [3, 32, 32] and config['pretrained_cfg']['mean'] == [0.3] * 3
    x = torch.randn(2, 3, 32, 32)
    by_timm = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    for path in (folder, folder / ckpt.WEIGHTS_NAME):
        loaded, meta = load_model(path)
        assert _same_weights(model, loaded) and _same_weights(by_timm, loaded)
        assert torch.equal(loaded(x), by_timm(x))
        assert meta['architecture'] == name and meta['label_names'] == LABELS and meta['path'] == str(
            folder / ckpt.WEIGHTS_NAME)
        cfg, timm_cfg = (resolve_data_config(model=m) for m in (loaded, by_timm))
        assert {k: tuple(v) if isinstance(v, list) else v for k, v in timm_cfg.items()} == cfg
        assert cfg['interpolation'] == 'bilinear' and cfg['mean'] == (0.3,) * 3
    if name != ARCH:  # every memory argument pinned at the value it was built with
        assert config['model_args']['memory_blocks'] == list(model.memory_blocks)
        assert config['model_args']['memory_options'] == model.resolved_model_args()['memory_options']
    with pytest.raises(CheckpointError, match='3 label names for a model with 10 classes'):
        ckpt.config_json(model, model_args=ARGS, label_names=LABELS[:3])


def test_weights_next_to_a_config_are_described_by_it(tmp_path):
    """The trainer's resumable weights carry only their position and checksum; the folder's config names the model."""
    model = _model()
    folder = _model_folder(tmp_path / 'run', model, ARGS, label_names=LABELS)
    last = folder / 'last.safetensors'
    ckpt.atomic_write_bytes(last, ckpt.weights_bytes(model, metadata=dict(num_updates=3), checksum=True))
    meta = read_metadata(last)
    assert meta['architecture'] == ARCH and meta['num_updates'] == 3 and meta['label_names'] == LABELS
    assert meta[ckpt.CHECKSUM_KEY] == ckpt.tensors_sha256(model.state_dict())
    loaded, _ = load_model(last)
    assert _same_weights(model, loaded)
    (folder / ckpt.CONFIG_NAME).write_text('{"not": "a timm config"}')
    with pytest.raises(CheckpointError, match='not a timm config.json'):
        load_model(folder)
