"""titans-timm-train flags a timm train.py user reaches for: --grad-accum-steps, --torchcompile, --channels-last,
loader workers by default (with exact resume), the CUDA RNG in the resumable state, timm's console logging.

Tiny configs (img 32, patch 8, depth 1-2, 8-32 training images); the compile test pays one inductor build.
"""
import io
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn as nn
import yaml

from titans_timm import train
from titans_timm.train import main, parse_args

pytestmark = pytest.mark.usefixtures('one_thread')

TINY = ['--img-size', '32', '--lr', '2e-3', '--warmup-epochs', '0', '--seed', '0', '--no-progress',
        '--log-interval', '100']


def _load(path):
    return safetensors.torch.load_file(str(path))


def _assert_identical(a_dir, b_dir, name='model.safetensors'):
    a, b = _load(Path(a_dir) / name), _load(Path(b_dir) / name)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f'{name} differs in {different[:5]}'


def test_two_accumulated_micro_batches_make_the_update_of_one_double_batch(backbone, tmp_path):
    """-b 4 --grad-accum-steps 2 takes the optimizer step one batch of 8 (the same 8 images) takes: the gradient is
    the mean over the update's samples, not a sum of micro-batch means, and there is one update, not two. Plain SGD
    makes the weight change lr * gradient, so the two gradients are compared directly."""
    common = ['--model', 'vit_tiny_mag_mlp', '--pretrained-path', str(backbone), *TINY, '--train-num-samples', '8',
              '--val-split', '', '--epochs', '1', '--freeze-epochs', '0', '--backbone-lr-scale', '1',
              '--opt', 'momentum', '--momentum', '0', '--weight-decay', '0', '--lr', '1.0', '--no-aug',
              '--smoothing', '0', '-j', '0', '--output', str(tmp_path), '--dump-rank-weights']
    accum = main(common + ['-b', '4', '--grad-accum-steps', '2', '--experiment', 'accum'])
    whole = main(common + ['-b', '8', '--experiment', 'whole'])
    assert accum['num_updates'] == whole['num_updates'] == 1
    grads = {}
    for name in ('accum', 'whole'):
        init, final = _load(tmp_path / name / 'rank0_init.safetensors'), _load(tmp_path / name / 'model.safetensors')
        grads[name] = {k: init[k] - final[k] for k in init}  # lr 1: the gradient itself
    assert sum(bool(g.abs().max() > 0) for g in grads['whole'].values()) > len(grads['whole']) // 2
    for k, g in grads['whole'].items():
        torch.testing.assert_close(grads['accum'][k], g, rtol=1e-4, atol=1e-7, msg=lambda m: f'{k}: {m}')


def test_accumulating_run_resumed_mid_epoch_is_bit_identical(backbone, tmp_path):
    """With --grad-accum-steps the schedule counts updates (t_initial = epochs * updates per epoch) and checkpoints
    fall on update boundaries, so a run stopped after 1 and then 3 of its 4 updates ends bit-identical."""
    args = ['--model', 'vit_tiny_mal_mlp', '--pretrained-path', str(backbone), *TINY, '--train-num-samples', '16',
            '--val-num-samples', '8', '-b', '4', '--grad-accum-steps', '2', '--epochs', '2', '--freeze-epochs', '1',
            '--sched-on-updates', '--mixup', '0.2', '--drop-path', '0.1', '--model-ema', '--model-ema-decay', '0.9',
            '-j', '0', '--output', str(tmp_path)]
    ref = main(args + ['--experiment', 'ref'])
    assert ref['num_updates'] == 4   # 16 images / 4 per micro-batch / 2 micro-batches per update, 2 epochs
    state = torch.load(tmp_path / 'ref' / 'train_state.pth', weights_only=True)
    assert state['scheduler']['t_initial'] == 4
    main(args + ['--experiment', 'cut', '--stop-after-steps', '1'])
    state = torch.load(tmp_path / 'cut' / 'train_state.pth', weights_only=True)
    assert (state['epoch'], state['step_in_epoch'], state['num_updates']) == (0, 2, 1)
    main(['--resume', str(tmp_path / 'cut'), '--stop-after-steps', '2'])
    state = torch.load(tmp_path / 'cut' / 'train_state.pth', weights_only=True)
    assert (state['epoch'], state['step_in_epoch'], state['num_updates']) == (1, 2, 3)
    done = main(['--resume', str(tmp_path / 'cut')])
    assert not done['interrupted'] and done['num_updates'] == 4 and done['final'] == ref['final']
    _assert_identical(tmp_path / 'ref', tmp_path / 'cut')
    _assert_identical(tmp_path / 'ref', tmp_path / 'cut', 'model_ema.safetensors')


def test_loader_workers_change_nothing_and_resume_exactly(backbone, tmp_path):
    """Each image's augmentation is seeded by (seed, epoch, sample), and evaluation leaves the training RNG alone:
    a run loading in the training process, stopped mid-epoch and resumed on 1 loader process, ends bit-identical
    to an uninterrupted run on 2 (whose persistent evaluation workers start only once)."""
    args = ['--model', 'vit_tiny_mal_mlp', '--pretrained-path', str(backbone), *TINY, '--train-num-samples', '32',
            '--val-num-samples', '8', '-b', '8', '--epochs', '2', '--freeze-epochs', '1', '--aa', 'rand-m9-mstd0.5',
            '--reprob', '0.25', '--mixup', '0.2', '--drop-path', '0.1', '--output', str(tmp_path)]
    ref = main(args + ['-j', '2', '--experiment', 'ref'])
    assert main(args + ['-j', '0', '--experiment', 'cut', '--stop-after-steps', '2'])['interrupted']
    done = main(['--resume', str(tmp_path / 'cut'), '-j', '1'])
    assert done['final'] == ref['final']
    _assert_identical(tmp_path / 'ref', tmp_path / 'cut')
    assert yaml.safe_load((tmp_path / 'cut' / 'args.yaml').read_text())['workers'] == 1


@pytest.mark.parametrize('cores, local_world_size, expect', [(16, 1, 4), (8, 2, 3), (2, 1, 1), (1, 1, 0), (2, 2, 0)])
def test_default_workers_leave_a_core_to_training(monkeypatch, cores, local_world_size, expect):
    monkeypatch.setattr(train.os, 'sched_getaffinity', lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', str(local_world_size))
    assert parse_args([]).workers is None   # resolved when the run starts (and recorded in its args.yaml)
    assert train._default_workers() == expect


@pytest.mark.timeout(240)
def test_torchcompile_trains_a_step_and_saves_plain_weights(tmp_path, monkeypatch, capsys):
    assert parse_args(['--torchcompile']).torchcompile == 'inductor'
    assert parse_args(['--torchcompile', 'aot_eager']).torchcompile == 'aot_eager'
    compiled = []
    original = torch.compile

    def compile_(model, **kwargs):
        compiled.append(kwargs.get('backend'))
        return original(model, **kwargs)

    monkeypatch.setattr(torch, 'compile', compile_)
    out = main(['--model', 'vit_tiny_patch16_224', '--model-kwargs', 'patch_size=8', 'depth=1', *TINY,
                '--train-num-samples', '8', '-b', '8', '--val-split', '', '--epochs', '1', '--backbone-lr-scale', '1',
                '-j', '0', '--torchcompile', '--output', str(tmp_path), '--experiment', 'c'])
    assert compiled == ['inductor', 'inductor'] and out['num_updates'] == 1   # the training and the eval model
    weights = _load(Path(out['output_dir']) / 'model.safetensors')
    assert not any(k.startswith('_orig_mod') for k in weights)
    assert all(torch.isfinite(v).all() for v in weights.values())
    reloaded = timm.create_model(f'local-dir:{out["output_dir"]}', pretrained=True)
    assert all(torch.equal(v, weights[k]) for k, v in reloaded.state_dict().items())
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(['--torchcompile', 'no-such-backend', *TINY, '--train-num-samples', '8', '-b', '8', '--epochs', '1',
              '--output', str(tmp_path), '--experiment', 'bad'])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '--torchcompile no-such-backend' in err[0] and 'inductor' in err[0], err
    assert not (tmp_path / 'bad').exists()


def test_channels_last_model_and_inputs(tmp_path, monkeypatch):
    """--channels-last: the convolutions' weights and every training and evaluation batch are channels_last; the
    weights written are ordinary (contiguous) tensors that timm loads."""
    seen = []
    original = train._create_model

    def create(args, kwargs):
        model = original(args, kwargs)
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        model.register_forward_pre_hook(lambda m, inputs: seen.append((
            m.training, inputs[0].is_contiguous(memory_format=torch.channels_last),
            conv.weight.is_contiguous(memory_format=torch.channels_last))))
        return model

    monkeypatch.setattr(train, '_create_model', create)
    out = main(['--model', 'resnet10t', *TINY, '--train-num-samples', '16', '--val-num-samples', '8', '-b', '8',
                '--epochs', '1', '-j', '0', '--channels-last', '--output', str(tmp_path), '--experiment', 'cl'])
    assert {training for training, _, _ in seen} == {True, False}
    assert all(x_cl and w_cl for _, x_cl, w_cl in seen), seen
    reloaded = timm.create_model(f'local-dir:{out["output_dir"]}', pretrained=True)
    weights = _load(Path(out['output_dir']) / 'model.safetensors')
    assert all(torch.equal(v, weights[k]) for k, v in reloaded.state_dict().items())


def test_cuda_rng_states_are_saved_and_restored(monkeypatch, caplog):
    """Once CUDA is in use its generators (every device's) join the resumable RNG state and come back on resume;
    a process that never started CUDA saves none, and a checkpoint without them (or from another device count)
    restores the rest."""
    states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, 'is_initialized', lambda: False)
    assert 'cuda' not in train._rng_state()
    monkeypatch.setattr(torch.cuda, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_rng_state_all', lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', lambda new: restored.append(new))
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    buf = io.BytesIO()
    torch.save(dict(rng=[train._rng_state()]), buf)   # as train_state.pth holds it, read back as --resume does
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)['rng'][0]
    cpu_before = torch.get_rng_state()
    torch.rand(3)
    train._set_rng_state(saved)
    assert torch.equal(torch.get_rng_state(), cpu_before)
    assert len(restored) == 1 and all(torch.equal(a, b) for a, b in zip(restored[0], states))
    train._set_rng_state({k: v for k, v in saved.items() if k != 'cuda'})   # a checkpoint from before
    assert len(restored) == 1
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    train._set_rng_state(saved)
    assert len(restored) == 1 and 'CUDA RNG states of 2 devices' in caplog.text


def test_console_logging_is_timms(monkeypatch):
    """Info lines bare, warnings as ``WARNING: ...`` (timm's setup_default_logging), set up once however often
    main() runs in a process, and never over a caller's own logging setup."""
    root = logging.getLogger()
    monkeypatch.setattr(root, 'handlers', [])
    monkeypatch.setattr(root, 'level', root.level)
    train._setup_logging()
    train._setup_logging()
    assert len(root.handlers) == 1
    assert isinstance(root.handlers[0].formatter, timm.utils.log.FormatterNoInfo)
    own = logging.NullHandler()
    monkeypatch.setattr(root, 'handlers', [own])
    train._setup_logging()
    assert root.handlers == [own]


def test_ctrl_c_to_the_process_group_with_loader_workers(backbone, tmp_path):
    """A terminal's Ctrl-C reaches the loader processes too: they leave stopping to the trainer, which finishes
    its step, writes the checkpoint and exits 130 (no worker crash), and the run resumes from there."""
    cmd = [sys.executable, '-m', 'titans_timm.train', '--model', 'vit_tiny_mal_mlp', '--pretrained-path', str(backbone),
           *TINY, '--train-num-samples', '16', '--val-num-samples', '8', '-b', '4', '-j', '2', '--epochs', '50',
           '--freeze-epochs', '1', '--log-interval', '1', '--output', str(tmp_path), '--experiment', 'cc']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if 'epoch 2 step 4/' in line:  # the last step of an epoch: its evaluation follows
            os.killpg(proc.pid, signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=120)
    log = ''.join(lines) + rest
    assert proc.returncode == 130, log[-3000:]
    assert 'Traceback' not in log and 'exited unexpectedly' not in log, log[-3000:]
    assert log.count('Ctrl-C: finishing') == 1
    state = torch.load(tmp_path / 'cc' / 'train_state.pth', weights_only=True)
    assert state['epoch'] >= 2
