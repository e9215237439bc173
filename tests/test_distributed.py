"""Several processes: 2 CPU ranks (gloo) through the phase switch under torchrun and accelerate launch.

Each rank dumps its parameters (test-only ``--dump-rank-weights``) at the start and after every epoch;
the replicas must be identical, and no backbone weight may move in phase 1.
"""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import safetensors.torch
import timm
import torch

from titans_timm.vit import split_parameters

STRUCT = dict(img_size=32, patch_size=8, depth=2)
MODEL = 'vit_tiny_mal_mlp'


def _train_args(backbone, out, experiment, epochs=2, extra=()):
    return ['-m', 'titans_timm.train', '--model', MODEL, '--pretrained-path', str(backbone), '--img-size', '32',
            '--train-num-samples', '32', '--val-num-samples', '16', '-b', '4', '--lr', '2e-3', '--epochs', str(epochs),
            '--freeze-epochs', '1', '--warmup-epochs', '0', '--no-progress', '--output', str(out),
            '--experiment', experiment, '--dump-rank-weights', '--device', 'cpu', *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _run(cmd, cwd):
    # One thread per rank: two ranks share the two cores.
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    return log


def _check_replicas(run: Path, tags):
    roles = {k: [n for n, _ in v] for k, v in
             split_parameters(timm.create_model(MODEL, num_classes=10, **STRUCT)).items()}
    dumps = {(r, t): safetensors.torch.load_file(str(run / f'rank{r}_{t}.safetensors')) for r in (0, 1) for t in tags}
    for t in tags:
        a, b = dumps[(0, t)], dumps[(1, t)]
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f'replicas differ after {t}: {differ[:5]}'
    init, phase1 = dumps[(0, 'init')], dumps[(0, 'epoch0')]
    for n in roles['backbone']:
        assert torch.equal(init[n], phase1[n]), f'backbone {n} moved in phase 1'
    assert all(not torch.equal(init[n], phase1[n]) for n in roles['head'] + roles['memory'])
    return dumps, roles


def test_torchrun_two_cpu_processes(backbone, tmp_path):
    log = _run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                *_train_args(backbone, tmp_path, 'ddp', extra=('--model-ema',))], cwd=tmp_path)
    run = tmp_path / 'ddp'
    dumps, roles = _check_replicas(run, ('init', 'epoch0', 'epoch1'))
    # The EMA copy is made before DDP broadcasts rank 0's weights: the model must be built alike on every rank.
    for t in ('init', 'epoch1'):
        a, b = (safetensors.torch.load_file(str(run / f'rank{r}_ema_{t}.safetensors')) for r in (0, 1))
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f'EMA replicas differ at {t}: {differ[:5]}'
    phase1, final = dumps[(0, 'epoch0')], dumps[(0, 'epoch1')]
    assert all(not torch.equal(phase1[n], final[n]) for n in roles['backbone'])
    saved = safetensors.torch.load_file(str(run / 'model.safetensors'))
    assert all(torch.equal(saved[k], final[k]) for k in final)
    # Only rank 0 logs epochs and writes the run files.
    assert log.count('epoch 2/2 phase 2: train loss') == 1
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith('rank')) == [
        'args.yaml', 'config.json', 'last.safetensors', 'model.safetensors', 'model_ema.safetensors', 'results.json',
        'run.json', 'summary.csv', 'train_state.pth']


def test_accelerate_launch_two_cpu_processes(backbone, tmp_path):
    accelerate = shutil.which('accelerate', path=os.path.dirname(sys.executable)) or shutil.which('accelerate')
    assert accelerate, "accelerate comes with titans-timm's dev and accelerate extras; its launcher must be installed"
    # `--cpu` would start one process (multi-CPU in accelerate means mpirun); --multi_gpu runs torch's
    # elastic launcher, which sets the same env:// variables torchrun does, and our gloo path takes over on CPU.
    _run([accelerate, 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
          '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', str(_free_port()),
          *_train_args(backbone, tmp_path, 'acc', epochs=1)], cwd=tmp_path)
    _check_replicas(tmp_path / 'acc', ('init', 'epoch0'))
