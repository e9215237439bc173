"""titans-timm-eval: numbers equal a hand computation, plots open at their size, surprise maps, clear errors."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
import timm
from PIL import Image
from timm.data import create_transform

import titans_timm  # noqa: F401  (registers the models)
from titans_timm import checkpoint as ckpt
from titans_timm import evaluate as ev
from titans_timm.checkpoint import load_model, save_model
from titans_timm.run_record import RunRecord, file_sha256, report_mismatch
from titans_timm.data import BUILTIN_DATASET, create_dataset
from titans_timm.vit import memory_modules

# Tiny models: 32 px images in 4x4 patches of 8 px, two blocks, memory in both.
MODEL_ARGS = dict(img_size=32, patch_size=8, depth=2, num_classes=10, memory_blocks=[0, 1])
NUM_SAMPLES = 40


def _save(path, architecture, model_args, label_names, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model(architecture, **model_args)
    # A random head with a large scale makes predictions differ between images, so per-class accuracy,
    # top-5 and the confusion matrix are not trivially constant.
    torch.nn.init.normal_(model.head.weight, std=1.0)
    save_model(model, path, architecture=architecture, model_args=model_args, label_names=label_names)
    return str(path)


@pytest.fixture(scope='module')
def label_names():
    return create_dataset(BUILTIN_DATASET, split='validation', num_samples=10).label_names


@pytest.fixture(scope='module')
def mag_checkpoint(tmp_path_factory, label_names):
    return _save(tmp_path_factory.mktemp('mag') / 'model.safetensors', 'vit_tiny_mag_simple', MODEL_ARGS,
                 label_names)


def _run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        ev.main(argv)
    err = capsys.readouterr().err.strip()
    return exc.value.code, err


def test_eval_report_matches_hand_computation(mag_checkpoint, tmp_path):
    out = tmp_path / 'eval'
    report = ev.main(['--checkpoint', mag_checkpoint, '--split', 'validation', '--num-samples', str(NUM_SAMPLES),
                      '-b', '16', '--workers', '0', '--output', str(out), '--no-progress', '--visualize'])

    # Hand computation: the checkpoint's own transform (its pretrained_cfg), all images in one batch.
    model, meta = load_model(mag_checkpoint)
    cfg = meta['pretrained_cfg']
    assert cfg['input_size'] == [3, 32, 32]
    dataset = create_dataset(BUILTIN_DATASET, split='validation', num_samples=NUM_SAMPLES)
    dataset.transform = create_transform(input_size=tuple(cfg['input_size']), interpolation=cfg['interpolation'],
                                         crop_pct=cfg['crop_pct'], mean=tuple(cfg['mean']), std=tuple(cfg['std']))
    images, labels = zip(*[dataset[i] for i in range(len(dataset))])
    x, y = torch.stack(images), torch.tensor(labels)
    with torch.no_grad():
        logits = model.eval()(x)
    pred = logits.argmax(1)
    top5 = logits.topk(5, dim=1).indices
    assert len(set(pred.tolist())) > 1, 'test model should not predict one class for everything'

    assert report['num_samples'] == NUM_SAMPLES
    assert report['top1'] == pytest.approx(100.0 * (pred == y).float().mean().item())
    assert report['top5'] == pytest.approx(100.0 * sum(int(y[i] in top5[i]) for i in range(len(y))) / len(y))
    assert report['loss'] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5, abs=1e-5)
    for c, entry in enumerate(report['per_class']):
        mask = y == c
        assert entry['name'] == dataset.label_names[c]
        assert entry['count'] == int(mask.sum())
        assert entry['accuracy'] == pytest.approx(100.0 * (pred[mask] == c).float().mean().item())
    confusion = torch.zeros(10, 10, dtype=torch.long)
    for t, p in zip(y.tolist(), pred.tolist()):
        confusion[t, p] += 1
    assert report['confusion_matrix'] == confusion.tolist()
    assert report['img_per_sec'] > 0
    assert report['model'] == 'vit_tiny_mag_simple' and report['label_names'] == dataset.label_names

    # The JSON on disk is the report returned.
    with open(out / 'eval_report.json') as f:
        on_disk = json.load(f)
    assert on_disk['top1'] == report['top1'] and on_disk['confusion_matrix'] == report['confusion_matrix']

    # Plots open as images of the documented size.
    for name, figsize in (('confusion_matrix.png', ev.confusion_figsize(10)),
                          ('per_class_accuracy.png', ev.per_class_figsize(10))):
        with Image.open(out / name) as im:
            assert im.size == (round(figsize[0] * ev.PLOT_DPI), round(figsize[1] * ev.PLOT_DPI))


@pytest.mark.parametrize('num_classes', [200])
def test_confusion_plot_scales_to_many_classes(tmp_path, num_classes):
    torch.manual_seed(0)
    names = [f'class number {i}' for i in range(num_classes)]
    confusion = torch.randint(0, 5, (num_classes, num_classes)) + 20 * torch.eye(num_classes, dtype=torch.long)
    metrics = ev.compute_metrics(confusion, 0.0, 0, names)
    cm_path = ev.plot_confusion_matrix(confusion, names, str(tmp_path / 'cm.png'))
    pc_path = ev.plot_per_class_accuracy(metrics['per_class'], str(tmp_path / 'pc.png'), overall=metrics['top1'])
    for path, figsize in ((cm_path, ev.confusion_figsize(num_classes)), (pc_path, ev.per_class_figsize(num_classes))):
        with Image.open(path) as im:
            assert im.size == (round(figsize[0] * ev.PLOT_DPI), round(figsize[1] * ev.PLOT_DPI))
    # Bounded size: a 200-class figure stays a normal image, not a poster.
    assert max(ev.confusion_figsize(num_classes)) * ev.PLOT_DPI <= 2100


def test_surprise_maps_are_the_memory_stats_of_the_forward():
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_mag_simple', **MODEL_ARGS).eval()
    x = torch.randn(3, 3, 32, 32)
    inputs = {}
    for i, module in memory_modules(model):
        module.register_forward_hook(lambda m, args, kwargs, out, i=i: inputs.__setitem__(i, (args, kwargs)),
                                     with_kwargs=True)
    maps, logits = ev.surprise_maps(model, x, return_logits=True)

    with torch.no_grad():
        assert torch.equal(logits, model(x))  # the capture does not change the forward
    assert list(maps) == [0, 1]
    for i, module in memory_modules(model):
        assert 'forward' not in module.__dict__  # wrappers removed
        assert maps[i].shape == (3, 4, 4)
        args, kwargs = inputs[i]
        with torch.no_grad():
            _, stats = module(*args, **{**kwargs, 'return_stats': True})
        # Drop the class token, patches in raster order.
        torch.testing.assert_close(maps[i], stats['surprise'][:, 1:].reshape(3, 4, 4).float())
        assert maps[i].min() > 0  # a random memory does not predict its values: positive surprise

    only = ev.surprise_maps(model, x, blocks=[1])
    assert list(only) == [1] and torch.equal(only[1], maps[1])
    with pytest.raises(ev.EvalError, match='carry no memory'):
        ev.surprise_maps(model, x, blocks=[5])


def test_surprise_maps_mac_one_map_per_block():
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_mac_advanced', **MODEL_ARGS).eval()
    maps = ev.surprise_maps(model, torch.randn(2, 3, 32, 32))
    # One shared memory written by each MAC block in turn: a map per block, and they differ.
    assert list(maps) == [0, 1]
    assert all(m.shape == (2, 4, 4) for m in maps.values())
    assert not torch.allclose(maps[0], maps[1])


def test_surprise_maps_need_a_written_memory():
    plain = timm.create_model('vit_tiny_patch16_224', img_size=32, depth=2, num_classes=10)
    with pytest.raises(ev.EvalError, match='no memory'):
        ev.surprise_maps(plain, torch.randn(1, 3, 32, 32))
    persistent = timm.create_model('vit_tiny_mal_mlp', **MODEL_ARGS)
    with pytest.raises(ev.EvalError, match='mlp memory'):
        ev.surprise_maps(persistent, torch.randn(1, 3, 32, 32))


def test_cli_surprise_maps_png(mag_checkpoint, tmp_path):
    report = ev.main(['--checkpoint', mag_checkpoint, '--num-samples', '10', '-b', '10', '--workers', '0',
                      '--output', str(tmp_path), '--no-progress', '--surprise-maps', '3', '--surprise-blocks', '1'])
    path = report['files']['surprise_maps']
    assert os.path.basename(path) == 'surprise_maps.png'
    with Image.open(path) as im:
        w, h = ev.surprise_figsize(3, 1)
        assert im.size == (round(w * ev.PLOT_DPI), round(h * ev.PLOT_DPI))


def _run_folder(folder, checkpoint, **args):
    """A run folder as titans-timm-train leaves it (config.json, model.safetensors, run.json) for ``checkpoint``'s
    model, with training arguments ``args``."""
    model, meta = load_model(checkpoint)
    folder.mkdir()
    (folder / 'config.json').write_text(ckpt.config_json(model, model_args=meta['model_args'],
                                                         label_names=meta['label_names'],
                                                         data_config=meta['pretrained_cfg']))
    (folder / 'model.safetensors').write_bytes(ckpt.weights_bytes(model))
    RunRecord.new(args).save(folder)
    return folder


def test_run_folder_and_local_dir_give_the_checkpoint_numbers(mag_checkpoint, tmp_path):
    folder = _run_folder(tmp_path / 'run', mag_checkpoint)
    common = ['--num-samples', '10', '-b', '10', '--workers', '0', '--no-progress']
    from_dir = ev.main(['--model', f'local-dir:{folder}', '--output', str(tmp_path / 'a'), *common])
    from_file = ev.main(['--checkpoint', mag_checkpoint, '--output', str(tmp_path / 'b'), *common])
    from_run = ev.main(['--checkpoint', str(folder), '--output', str(tmp_path / 'c'), *common])
    assert from_dir['model'] == from_run['model'] == 'vit_tiny_mag_simple'
    assert from_dir['data_config'] == from_file['data_config'] == from_run['data_config']
    for key in ('top1', 'top5', 'loss', 'confusion_matrix'):
        assert from_dir[key] == from_file[key] == from_run[key]
    assert from_run['checkpoint_sha256'] == file_sha256(folder / 'model.safetensors')


def test_a_run_is_evaluated_on_its_validation_data_and_keeps_the_report(mag_checkpoint, tmp_path):
    """``--checkpoint RUN`` takes the data the run validated on from its record (flags win), writes the report to
    the run folder and adds it to the record: one report per weights and data, newest kept."""
    run = _run_folder(tmp_path / 'run', mag_checkpoint, dataset=BUILTIN_DATASET, val_split='validation',
                      val_num_samples=12, batch_size=4, workers=0)
    report = ev.main(['--checkpoint', str(run), '--no-progress'])
    assert report['num_samples'] == 12 and report['split'] == 'validation' and report['batch_size'] == 4
    assert json.loads((run / 'eval_report.json').read_text())['top1'] == report['top1']
    recorded = RunRecord.load(run).eval_reports
    assert len(recorded) == 1 and recorded[0]['top1'] == report['top1']
    assert recorded[0]['checkpoint_sha256'] == file_sha256(run / 'model.safetensors')
    assert 'confusion_matrix' not in recorded[0] and 'per_class' not in recorded[0]
    ev.main(['--checkpoint', str(run / 'model.safetensors'), '--no-progress'])  # the same evaluation again
    ev.main(['--checkpoint', str(run), '--split', 'train', '--num-samples', '8', '--no-progress'])
    assert [(r['split'], r['num_samples']) for r in RunRecord.load(run).eval_reports] == [('validation', 12),
                                                                                          ('train', 8)]


def test_cli_missing_checkpoint(tmp_path, capsys):
    code, err = _run_cli(['--checkpoint', str(tmp_path / 'nope.safetensors'), '--workers', '0'], capsys)
    assert code == 2
    assert err.startswith('error: ') and '\n' not in err and 'not found' in err


def test_cli_checkpoint_of_another_architecture(tmp_path, capsys, label_names):
    plain_args = dict(img_size=32, patch_size=8, depth=2, num_classes=10)
    path = _save(tmp_path / 'plain.safetensors', 'vit_tiny_patch16_224', plain_args, label_names)
    code, err = _run_cli(['--model', 'vit_tiny_mag_simple', '--checkpoint', path, '--workers', '0'], capsys)
    assert code == 2
    assert err.startswith('error: ') and '\n' not in err
    assert 'missing keys' in err and 'memory' in err  # names the mismatched keys


def test_cli_class_count_mismatch(tmp_path, capsys):
    args = dict(MODEL_ARGS, num_classes=7)
    path = _save(tmp_path / 'seven.safetensors', 'vit_tiny_mal_simple', args, [str(i) for i in range(7)])
    code, err = _run_cli(['--checkpoint', path, '--workers', '0', '--num-samples', '10'], capsys)
    assert code == 2
    assert err.startswith('error: ') and '7 classes' in err and '10' in err


def test_cli_surprise_maps_on_plain_model(tmp_path, capsys, label_names):
    path = _save(tmp_path / 'plain.safetensors', 'vit_tiny_patch16_224',
                 dict(img_size=32, patch_size=8, depth=2, num_classes=10), label_names)
    code, err = _run_cli(['--checkpoint', path, '--workers', '0', '--num-samples', '10', '--output', str(tmp_path),
                          '--no-progress', '--surprise-maps', '2'], capsys)
    assert code == 2 and err.startswith('error: ') and 'no memory' in err


def test_report_names_the_weights_and_data_it_evaluated(mag_checkpoint, tmp_path, label_names):
    argv = ['--checkpoint', mag_checkpoint, '--num-samples', '10', '-b', '10', '--workers', '0', '--no-progress',
            '--output', str(tmp_path)]
    report = ev.main(argv)
    sha = file_sha256(mag_checkpoint)
    assert report['checkpoint_sha256'] == sha
    assert report['split'] == 'validation' and report['num_samples_requested'] == 10
    assert report_mismatch(report, sha, ev.report_data(ev.parse_args(argv))) is None
    # Another split or sample count, or other weights at the same path: the report does not describe them.
    assert 'split' in report_mismatch(report, sha, ev.report_data(ev.parse_args(argv + ['--split', 'train'])))
    assert 'num_samples_requested' in report_mismatch(
        report, sha, ev.report_data(ev.parse_args(argv[:2] + ['--num-samples', '40'])))
    retrained = _save(tmp_path / 'model.safetensors', 'vit_tiny_mag_simple', MODEL_ARGS, label_names, seed=1)
    other_weights = ev.parse_args(['--checkpoint', retrained, '--num-samples', '10'])
    assert 'other weights' in report_mismatch(report, file_sha256(retrained), ev.report_data(other_weights))


# ----------------------------------------------------------------------------------------------------
# A dataset trained with --input-key/--target-key: a local parquet dataset with two label columns.

@pytest.fixture(scope='module')
def two_label_dataset(tmp_path_factory):
    """hf:DIR parquet dataset (as the reviewer's): image, label (animal/vehicle), fine (cat/dog/car/bus)."""
    import datasets
    root = tmp_path_factory.mktemp('two_labels')
    features = datasets.Features(dict(
        picture=datasets.Image(), label=datasets.ClassLabel(names=['animal', 'vehicle']),
        fine=datasets.ClassLabel(names=['cat', 'dog', 'car', 'bus'])))
    gen = torch.Generator().manual_seed(0)
    (root / 'data').mkdir()
    for split in ('train', 'validation'):
        images = [Image.fromarray(torch.randint(0, 255, (32, 32, 3), generator=gen, dtype=torch.uint8).numpy())
                  for _ in range(8)]
        fine = [i % 4 for i in range(8)]
        ds = datasets.Dataset.from_dict(dict(picture=images, label=[f // 2 for f in fine], fine=fine),
                                        features=features)
        ds.to_parquet(str(root / 'data' / f'{split}-00000.parquet'))
    return root


def test_input_and_target_keys_from_flags_and_args_yaml(two_label_dataset, tmp_path, capsys):
    fine = ['cat', 'dog', 'car', 'bus']
    ckpt = _save(tmp_path / 'model.safetensors', 'vit_tiny_patch16_224',
                 dict(img_size=32, patch_size=8, depth=2, num_classes=4), fine)
    cache = str(tmp_path / 'hf_cache')
    dataset = f'hf:{two_label_dataset}'
    common = ['--checkpoint', ckpt, '--workers', '0', '--no-progress', '--data-dir', cache]
    # The run's args.yaml, as titans-timm-train writes it for --input-key picture --target-key fine.
    args_yaml = tmp_path / 'args.yaml'
    args_yaml.write_text(f'dataset: {dataset}\ninput_key: picture\ntarget_key: fine\nval_split: validation\n'
                         f'batch_size: 4\n')
    from_yaml = ev.main(['-c', str(args_yaml), *common, '--output', str(tmp_path / 'a')])
    assert from_yaml['label_names'] == fine and from_yaml['num_samples'] == 8
    assert from_yaml['input_key'] == 'picture' and from_yaml['target_key'] == 'fine'
    from_flags = ev.main(['--dataset', dataset, '--input-key', 'picture', '--target-key', 'fine', *common,
                          '--output', str(tmp_path / 'b')])
    assert from_flags['confusion_matrix'] == from_yaml['confusion_matrix']
    # The default label column is the coarse one: 2 classes for a 4-class model, refused.
    code, err = _run_cli(['--dataset', dataset, '--input-key', 'picture', *common, '--output', str(tmp_path / 'c')],
                         capsys)
    assert code == 2 and '4 classes but the dataset has 2' in err


# ----------------------------------------------------------------------------------------------------
# Bad run options fail at once, before the model is loaded or any image evaluated.

@pytest.mark.parametrize('case', ['cuda_without_cuda', 'unknown_device', 'output_is_a_file', 'output_under_a_file'])
def test_cli_bad_device_or_output_fails_before_evaluating(mag_checkpoint, tmp_path, capsys, monkeypatch, case):
    if case == 'cuda_without_cuda' and torch.cuda.is_available():
        pytest.skip('CUDA is available here')

    def never(*args, **kwargs):
        raise AssertionError('the model was loaded before the run options were checked')
    monkeypatch.setattr(ev, 'load_model_for_eval', never)
    (tmp_path / 'file').write_text('not a folder')
    extra = dict(cuda_without_cuda=['--device', 'cuda'], unknown_device=['--device', 'foo'],
                 output_is_a_file=['--output', str(tmp_path / 'file')],
                 output_under_a_file=['--output', str(tmp_path / 'file' / 'eval')])[case]
    code, err = _run_cli(['--checkpoint', mag_checkpoint, '--workers', '0', *extra], capsys)
    assert code == 2 and err.startswith('error: ') and '\n' not in err
    assert ('--device' in err) if 'device' in case or 'cuda' in case else ('cannot write to --output' in err)


def test_data_dir_without_dataset_is_an_image_folder_as_in_training(tmp_path):
    """`--data-dir DIR` (or a recipe with only data_dir) reads DIR as an image folder, as titans-timm-train does."""
    for name in ('circle', 'square'):
        (tmp_path / 'shapes' / 'validation' / name).mkdir(parents=True)
        Image.new('RGB', (8, 8)).save(tmp_path / 'shapes' / 'validation' / name / '0.png')
    recipe = tmp_path / 'r.yaml'
    recipe.write_text(f'data_dir: {tmp_path / "shapes"}\n')
    for argv in (['--data-dir', str(tmp_path / 'shapes')], ['-c', str(recipe)]):
        dataset = ev._create_eval_dataset(ev.parse_args(argv))
        assert ev._label_names(dataset) == ['circle', 'square']
    assert ev._dataset_name(ev.parse_args([])) == 'fashion-mnist-mini'
