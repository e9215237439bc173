"""titans-timm-train: two-phase freeze, phase-2 LRs, exact resume, bad input, YAML, step-0 accuracy.

Tiny configs throughout (img 32, patch 8, depth 2, 32 training images) so the file runs in about a minute.
"""
import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml

from titans_timm import checkpoint as ckpt
from titans_timm import run_record, train
from conftest import check_bad_input
from titans_timm.train import main, parse_args, TrainInputError
from titans_timm.vit import split_parameters

STRUCT = dict(img_size=32, patch_size=8, depth=2)
TINY = ['--img-size', '32', '--train-num-samples', '32', '--val-num-samples', '16', '-b', '8',
        '--lr', '2e-3', '--warmup-epochs', '0', '--seed', '0', '--no-progress', '--log-interval', '100']


pytestmark = pytest.mark.usefixtures('one_thread')


def _load(path):
    return safetensors.torch.load_file(str(path))


def _roles(model_name):
    model = timm.create_model(model_name, num_classes=10, **STRUCT)
    return {role: [n for n, _ in params] for role, params in split_parameters(model).items()}


def _summary_rows(run_dir):
    with open(Path(run_dir) / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


def test_phase1_freezes_backbone_bit_identical_and_phase2_unfreezes(backbone, tmp_path):
    model_name = 'vit_tiny_mag_advanced'
    out = main(['--model', model_name, '--pretrained-path', str(backbone), *TINY, '--epochs', '2',
                '--freeze-epochs', '1', '--backbone-lr-scale', '0.1', '--weight-decay', '0.05', '--opt', 'adamw',
                '--output', str(tmp_path), '--experiment', 'run', '--dump-rank-weights'])
    run = Path(out['output_dir'])
    init, after1, final = (_load(run / f'rank0_{t}.safetensors') for t in ('init', 'epoch0', 'epoch1'))
    roles = _roles(model_name)
    assert roles['memory'] and roles['backbone'] and roles['head']
    # Phase 1: every backbone tensor bit-identical (AdamW with weight decay on, lr_scale 0 + wd 0).
    for name in roles['backbone']:
        assert torch.equal(init[name], after1[name]), f'backbone tensor {name} moved in phase 1'
    # ... and every memory tensor and the head moved.
    for name in roles['memory'] + roles['head']:
        assert not torch.equal(init[name], after1[name]), f'{name} did not train in phase 1'
    # Phase 2: the backbone trains.
    moved = [n for n in roles['backbone'] if not torch.equal(after1[n], final[n])]
    assert len(moved) == len(roles['backbone'])
    # Final weights equal the model.safetensors written at the end.
    saved = _load(run / 'model.safetensors')
    assert all(torch.equal(saved[k], final[k]) for k in final)

    rows = _summary_rows(run)
    assert [int(r['epoch']) for r in rows] == [0, 1] and [int(r['phase']) for r in rows] == [1, 2]
    assert float(rows[0]['lr_backbone']) == 0.0
    assert float(rows[0]['lr_memory']) == float(rows[0]['lr_head']) > 0
    lr_head, lr_bb = float(rows[1]['lr_head']), float(rows[1]['lr_backbone'])
    assert lr_bb == pytest.approx(0.1 * lr_head, rel=1e-6) and lr_bb > 0
    assert float(rows[1]['lr_memory']) == lr_head
    for name in ('args.yaml', 'last.safetensors', 'train_state.pth', 'results.json'):
        assert (run / name).is_file()
    state = torch.load(run / 'train_state.pth', weights_only=True)
    assert (state['epoch'], state['step_in_epoch']) == (2, 0)
    meta = ckpt.read_metadata(run / 'model.safetensors')
    assert meta['architecture'] == model_name and meta['model_args']['depth'] == 2
    assert len(meta['label_names']) == 10
    # The run folder is in timm's own layout: timm loads the trained model from it, bit for bit, with its labels.
    config = json.loads((run / 'config.json').read_text())
    assert config['architecture'] == model_name and 'memory_blocks' in config['model_args']  # placement pinned
    reloaded = timm.create_model(f'local-dir:{run}', pretrained=True)
    assert all(torch.equal(v, final[k]) for k, v in reloaded.state_dict().items())
    assert reloaded.pretrained_cfg['label_names'] == meta['label_names']
    assert timm.data.resolve_model_data_config(reloaded)['input_size'] == (3, 32, 32)
    record = json.loads((run / 'run.json').read_text())
    assert record['weights_sha256'] == run_record.file_sha256(run / 'model.safetensors')
    assert record['args']['freeze_epochs'] == 1 and record['versions']['timm'] == timm.__version__


@pytest.mark.parametrize('model_name', ['vit_tiny_mal_simple', 'vit_tiny_mac_mlp', 'vit_tiny_mag_advanced'])
def test_step0_accuracy_equals_backbone(backbone, model_name):
    common = ['--pretrained-path', str(backbone), *TINY, '--val-num-samples', '32', '--eval-only']
    base = main(['--model', 'vit_tiny_patch16_224', *common])
    mem = main(['--model', model_name, *common])
    assert mem['final_top1'] == base['final_top1']
    assert mem['final']['top5'] == base['final']['top5']
    assert mem['final']['loss'] == pytest.approx(base['final']['loss'], abs=1e-5)


def test_resume_mid_epoch_gives_identical_final_weights(backbone, tmp_path):
    # Augmentation, mixup, drop-path and EMA all draw random numbers: resume must restore them exactly.
    args = ['--model', 'vit_tiny_mal_mlp', '--pretrained-path', str(backbone), *TINY, '--epochs', '2',
            '--freeze-epochs', '1', '--mixup', '0.2', '--drop-path', '0.1', '--model-ema', '--model-ema-decay', '0.9',
            '--output', str(tmp_path)]
    ref = main(args + ['--experiment', 'ref'])
    assert not ref['interrupted']
    # Stopped mid phase 1 (after 2 of 4 steps), then mid phase 2 (after 6), then finished.
    first = main(args + ['--experiment', 'cut', '--stop-after-steps', '2'])
    assert first['interrupted'] and first['checkpoint'].endswith('last.safetensors')
    assert not (tmp_path / 'cut' / 'model.safetensors').exists()
    state = torch.load(tmp_path / 'cut' / 'train_state.pth', weights_only=True)
    assert (state['epoch'], state['step_in_epoch']) == (0, 2)
    first_time = state['train_time_s']
    second = main(['--resume', str(tmp_path / 'cut'), '--stop-after-steps', '4'])
    assert second['interrupted']
    state = torch.load(tmp_path / 'cut' / 'train_state.pth', weights_only=True)
    assert (state['epoch'], state['step_in_epoch']) == (1, 2)
    done = main(['--resume', str(tmp_path / 'cut')])
    assert not done['interrupted']
    # the run's training time adds up over its three invocations
    assert 0 < first_time < state['train_time_s'] < done['train_time_s']
    a, b = _load(tmp_path / 'ref' / 'model.safetensors'), _load(tmp_path / 'cut' / 'model.safetensors')
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f'resumed run differs in {different[:5]}'
    ea, eb = _load(tmp_path / 'ref' / 'model_ema.safetensors'), _load(tmp_path / 'cut' / 'model_ema.safetensors')
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert done['final_top1'] == ref['final_top1']
    rows_a, rows_b = _summary_rows(tmp_path / 'ref'), _summary_rows(tmp_path / 'cut')
    assert [r['train_loss'] for r in rows_a] == [r['train_loss'] for r in rows_b]




def test_bad_inputs_fail_with_one_line_before_work(capsys, tmp_path, backbone):
    out = ['--output', str(tmp_path / 'out'), '--experiment', 'x', *TINY]
    line = check_bad_input(capsys, main, ['--model', 'vit_tiny_mag_advancd', *out], 'unknown model')
    assert 'vit_tiny_mag_advanced' in line
    check_bad_input(capsys, main, ['--model', 'vit_tiny_mag_mlp', '--dataset', 'no-such-dataset', *out], 'no-such-dataset')
    check_bad_input(capsys, main, ['--model', 'vit_tiny_mag_mlp', '--dataset', '', '--data-dir', str(tmp_path / 'missing'),
                        *out], 'data directory not found')
    check_bad_input(capsys, main, ['--model', 'vit_tiny_mag_mlp', '--num-classes', '7', *out], 'disagrees with the dataset')
    corrupt = tmp_path / 'corrupt.safetensors'
    corrupt.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": garbage')
    check_bad_input(capsys, main, ['--model', 'vit_tiny_mag_mlp', '--pretrained-path', str(corrupt), *out], 'corrupt')
    # A checkpoint of another architecture (no titans-timm metadata): the mismatch is named.
    other = tmp_path / 'resnet.safetensors'
    safetensors.torch.save_file(timm.create_model('resnet10t', num_classes=10).state_dict(), str(other))
    check_bad_input(capsys, main, ['--model', 'vit_tiny_mag_mlp', '--pretrained-path', str(other), *out], 'does not fit')
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text(yaml.safe_dump(dict(model='vit_tiny_mag_mlp', batch_sise=8, freeze_epochs=1)))
    line = check_bad_input(capsys, main, ['-c', str(recipe), *out], 'unknown key')
    assert 'batch_sise' in line and 'batch_size' in line
    check_bad_input(capsys, main, ['--resume', str(tmp_path / 'nothing-here')], '--resume')
    assert not (tmp_path / 'out').exists(), 'bad input must stop before any output is written'


def test_corrupt_resume_state_is_one_line_error(capsys, backbone, tmp_path):
    out = main(['--model', 'vit_tiny_mag_mlp', '--pretrained-path', str(backbone), *TINY, '--epochs', '1',
                '--freeze-epochs', '1', '--output', str(tmp_path), '--experiment', 'r', '--stop-after-steps', '1'])
    (Path(out['output_dir']) / 'train_state.pth').write_bytes(b'not a checkpoint')
    capsys.readouterr()
    check_bad_input(capsys, main, ['--resume', out['output_dir']], 'train_state.pth')


def test_yaml_recipe_sets_defaults_and_cli_wins(tmp_path):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text(yaml.safe_dump(dict(
        model='vit_tiny_mal_mlp', batch_size=8, freeze_epochs=2, backbone_lr_scale=0.25, lr=3e-4,
        model_kwargs=dict(patch_size=8, depth=2), memory_options=dict(chunk_size=4), mixup=0.1)))
    args = parse_args(['-c', str(recipe), '--lr', '1e-3'])
    assert (args.model, args.batch_size, args.freeze_epochs, args.backbone_lr_scale) == ('vit_tiny_mal_mlp', 8, 2, 0.25)
    assert args.lr == 1e-3 and args.mixup == 0.1
    assert args.model_kwargs == dict(patch_size=8, depth=2) and args.memory_options == dict(chunk_size=4)
    with pytest.raises(TrainInputError, match='unknown key'):
        recipe.write_text('epochs: 3\nfreeze_epoch: 1\n')
        parse_args(['-c', str(recipe)])


def test_recipes_parse():
    recipes = sorted((Path(__file__).resolve().parents[1] / 'train_timm_hparams').glob('*.yaml'))
    names = {p.stem for p in recipes}
    assert {'cifar10', 'cifar100', 'tiny-imagenet', 'ants-bees', 'imagenet', 'fashion_mnist_backbone',
            'fashion_mnist_titans', 'fashion_mnist_finetune'} <= names
    for path in recipes:
        args = parse_args(['-c', str(path)])
        assert timm.is_model(args.model), path
        if path.stem != 'fashion_mnist_backbone':
            assert args.freeze_epochs >= 0 and args.backbone_lr_scale >= 0


def test_ctrl_c_writes_resumable_checkpoint(backbone, tmp_path):
    cmd = [sys.executable, '-m', 'titans_timm.train', '--model', 'vit_tiny_mal_mlp', '--pretrained-path', str(backbone),
           *TINY, '--epochs', '50', '--freeze-epochs', '1', '--log-interval', '1', '--output', str(tmp_path),
           '--experiment', 'cc']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if 'step 2/' in line:  # training is under way
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=120)
    log = ''.join(lines) + rest
    assert proc.returncode == 130, log[-2000:]
    assert 'Traceback' not in log
    assert f'--resume {tmp_path / "cc"}' in log
    state = torch.load(tmp_path / 'cc' / 'train_state.pth', weights_only=True)
    assert state['epoch'] * 4 + state['step_in_epoch'] >= 2
    assert ckpt.read_metadata(tmp_path / 'cc' / 'last.safetensors')['num_updates'] == state['num_updates']
    assert not (tmp_path / 'cc' / 'model.safetensors').exists()


def test_bad_flag_is_one_line(capsys):
    check_bad_input(capsys, main, ['--epochs', 'two'], 'invalid int value')


def test_float16_amp_scales_the_loss_and_resumes_the_scale(backbone, tmp_path):
    """float16 gradients underflow unscaled: --amp-dtype float16 trains through a GradScaler whose state is part of
    the resumable checkpoint (bfloat16 needs no scaler and writes none)."""
    args = ['--model', 'vit_tiny_mag_simple', '--pretrained-path', str(backbone), *TINY, '--epochs', '1',
            '--freeze-epochs', '0', '--amp', '--clip-grad', '1.0', '--output', str(tmp_path)]
    first = main(args + ['--amp-dtype', 'float16', '--experiment', 'fp16', '--stop-after-steps', '2'])
    assert first['interrupted']
    state = torch.load(tmp_path / 'fp16' / 'train_state.pth', weights_only=True)
    assert state['scaler']['scale'] > 1
    done = main(['--resume', str(tmp_path / 'fp16')])
    assert not done['interrupted'] and math.isfinite(done['final_top1'])
    bf16 = main(args + ['--experiment', 'bf16', '--stop-after-steps', '1'])
    assert torch.load(Path(bf16['output_dir']) / 'train_state.pth', weights_only=True)['scaler'] is None


def _files(run_dir):
    """{name: (bytes, mtime_ns)} of every file in a run folder."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in Path(run_dir).iterdir() if p.is_file()}


def test_checkpoint_pair_survives_a_crash_between_its_two_files(backbone, tmp_path, monkeypatch, caplog):
    """Dying after last.safetensors is replaced but before train_state.pth: --resume falls back to the previous
    complete pair and the run still ends bit-identical to an uninterrupted one."""
    args = ['--model', 'vit_tiny_mag_mlp', '--pretrained-path', str(backbone), *TINY, '--epochs', '2',
            '--freeze-epochs', '1', '--checkpoint-interval', '1', '--output', str(tmp_path)]
    ref = main(args + ['--experiment', 'ref'])
    assert sorted(p.name for p in (tmp_path / 'ref').glob('*.prev.*')) == []  # only kept while writing
    saves = []

    def dies_on_third_state(obj, path):
        saves.append(path)
        if len(saves) == 3:  # the weights of update 3 are in place, their state is not
            raise KeyboardInterrupt
        return original(obj, path)

    original = train._torch_save_atomic
    monkeypatch.setattr(train, '_torch_save_atomic', dies_on_third_state)
    with pytest.raises(SystemExit) as e:
        main(args + ['--experiment', 'cut'])
    assert e.value.code == 130
    monkeypatch.setattr(train, '_torch_save_atomic', original)
    cut = tmp_path / 'cut'
    assert ckpt.read_metadata(cut / 'last.safetensors')['num_updates'] == 3
    assert torch.load(cut / 'train_state.pth', weights_only=True)['num_updates'] == 2
    done = main(['--resume', str(cut)])
    assert 'resuming from the previous checkpoint' in caplog.text
    assert not done['interrupted'] and done['final_top1'] == ref['final_top1']
    a, b = _load(tmp_path / 'ref' / 'model.safetensors'), _load(cut / 'model.safetensors')
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(cut.glob('*.prev.*'))


def test_data_dir_without_dataset_is_an_image_folder(tmp_path):
    """`titans-timm-train DIR` trains on the image folder DIR, as in timm; the built-in set never hides it."""
    from PIL import Image
    root = tmp_path / 'shapes'
    for split, n in (('train', 8), ('val', 2)):
        for c, name in enumerate(('circle', 'square')):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new('RGB', (32, 32), (120 * c + 10 * i, 0, 0)).save(root / split / name / f'{i}.png')
    assert parse_args([str(root)]).dataset == '' and parse_args(['--data-dir', str(root)]).dataset == ''
    assert parse_args([]).dataset == 'fashion-mnist-mini'
    out = main([str(root), '--model', 'vit_tiny_patch16_224', '--model-kwargs', 'patch_size=8', 'depth=2',
                '--img-size', '32', '-b', '4', '--epochs', '1', '--no-progress', '--output', str(tmp_path / 'o'),
                '--experiment', 'f', '--backbone-lr-scale', '1'])
    meta = ckpt.read_metadata(Path(out['output_dir']) / 'model.safetensors')
    assert meta['label_names'] == ['circle', 'square'] and meta['model_args']['num_classes'] == 2
    assert yaml.safe_load((Path(out['output_dir']) / 'args.yaml').read_text())['dataset'] == ''
    # the public parser + run() read DIR the same way (run resolves what only parse_args did)
    args = train.build_parser().parse_args([str(root), '--pretrained-path', str(Path(out['output_dir']) / 'model.safetensors'),
                                            '--model', 'vit_tiny_patch16_224', '--img-size', '32', '--eval-only',
                                            '--no-progress'])
    assert train.run(args)['final_top1'] == out['final_top1']


def test_runs_without_evaluation_and_finished_runs_are_left_alone(backbone, tmp_path, capsys, caplog):
    """--val-split '' ends cleanly; --resume of a finished run says so and changes no file; a new run never
    mixes into a folder holding a run; a resumed run refuses a different schedule instead of ignoring it."""
    args = ['--model', 'vit_tiny_mag_mlp', '--pretrained-path', str(backbone), *TINY, '--epochs', '1',
            '--freeze-epochs', '1', '--val-split', '', '--output', str(tmp_path), '--experiment', 'r']
    first = main(args)
    run = Path(first['output_dir'])
    assert first['final_top1'] is None and (run / 'model.safetensors').is_file()
    before = _files(run)
    again = main(['--resume', str(run)])
    assert 'already finished' in caplog.text and not again['interrupted']
    resumed, _ = train._model_from_run(parse_args(['--resume', str(run), '--grad-checkpointing']),
                                       run / 'last.safetensors')
    assert resumed.grad_checkpointing   # a resumed run keeps the flag (and the memories' checkpointable write)
    assert _files(run) == before
    capsys.readouterr()
    check_bad_input(capsys, main, args, 'already holds a run')
    line = check_bad_input(capsys, main, ['--resume', str(run), '--epochs', '3'], '--epochs 3')
    assert '--pretrained-path' in line
    check_bad_input(capsys, main, ['--resume', str(run), '--lr', '0.1'], '--lr')
    check_bad_input(capsys, main, ['--resume', str(run), '--sched', 'step'], '--sched')
    assert _files(run) == before
    # --force starts over there: the old run's files go (its eval report too), the new run's files come
    (run / 'eval_report.json').write_text('{}')
    (run / '.last.safetensors.0123abcd.tmp').write_bytes(b'half')   # left by a write that was killed
    over = main(args + ['--force', '--model', 'vit_tiny_mag_simple', '--stop-after-steps', '1'])
    assert over['interrupted'] and not (run / 'model.safetensors').exists()
    assert not (run / 'eval_report.json').exists() and (run / 'last.safetensors').is_file()
    assert not list(run.glob('.*.tmp'))
    assert 'force' not in yaml.safe_load((run / 'args.yaml').read_text())


def test_default_run_names_never_collide(tmp_path, monkeypatch):
    monkeypatch.setattr(train.time, 'strftime', lambda fmt: '20250101-000000')
    args = parse_args(['--output', str(tmp_path)])
    dirs = [train._experiment_dir(args, dict(input_size=(3, 32, 32))) for _ in range(3)]
    assert [d.name for d in dirs] == ['20250101-000000-vit_tiny_mag_advanced-32'] + [
        f'20250101-000000-vit_tiny_mag_advanced-32-{i}' for i in (1, 2)]


def test_pth_backbone_keeps_its_matching_head(backbone, tmp_path):
    """A .pth backbone (a plain state dict or a timm training checkpoint) loads its head like a safetensors one."""
    pth = tmp_path / 'backbone.pth'
    torch.save(dict(state_dict=_load(backbone), epoch=3), pth)
    common = [*TINY, '--val-num-samples', '32', '--eval-only', '--model', 'vit_tiny_patch16_224',
              '--model-kwargs', 'patch_size=8', 'depth=2']
    ref = main(['--pretrained-path', str(backbone), *common])
    from_pth = main(['--pretrained-path', str(pth), *common])
    assert from_pth['final'] == ref['final']


@pytest.mark.parametrize('argv, expect', [
    (['--opt', 'adamx'], '--opt adamx'),
    (['--sched', 'cosinex'], '--sched cosinex'),
    (['--aa', 'bogus-policy'], '--aa'),
    (['-b', '0'], '--batch-size 0'),
    (['--epochs', '0', '--freeze-epochs', '0'], '--epochs 0'),
    (['--memory-options', '{"chunk_sise": 4}'], 'chunk_sise'),
    pytest.param(['--device', 'cuda'], 'pass --device cpu',
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')),
])
def test_more_bad_inputs_are_one_line_and_write_nothing(capsys, tmp_path, argv, expect):
    line = check_bad_input(capsys, main, ['--model', 'vit_tiny_mag_mlp', *TINY, '--epochs', '1', '--output',
                               str(tmp_path / 'out'), '--experiment', 'x', *argv], expect)
    assert 'could not load weights' not in line
    assert not (tmp_path / 'out').exists()


def test_cnn_takes_img_size_and_its_frozen_batchnorm_stays_frozen(tmp_path):
    """--img-size reaches models without an img_size argument (resnet) as the data size only; in phase 1 the
    backbone's BatchNorm running statistics stay as they were, like every other backbone tensor."""
    out = main(['--model', 'resnet10t', *TINY, '--epochs', '1', '--freeze-epochs', '1', '--val-split', '',
                '--output', str(tmp_path), '--experiment', 'rn', '--dump-rank-weights'])
    run = Path(out['output_dir'])
    init, after = _load(run / 'rank0_init.safetensors'), _load(run / 'rank0_epoch0.safetensors')
    assert 'img_size' not in ckpt.read_metadata(run / 'model.safetensors')['model_args']
    head = [k for k in init if k.startswith('fc.')]
    assert head and all(not torch.equal(init[k], after[k]) for k in head if k.endswith('weight'))
    moved = [k for k in init if k not in head and not torch.equal(init[k], after[k])]
    assert not moved, f'frozen backbone changed in phase 1: {moved[:5]}'
