"""titans-timm-train when things go wrong: a run folder in use, killed writes, damaged checkpoints, bad input, a
full or read-only disk. Every failure is one ``error:`` line and exit status 2, and nothing written before is lost.

Tiny runs throughout (img 28, patch 4, one block, 16 training images, 2 steps per epoch).
"""
import errno
import math
import os
import struct
from pathlib import Path

import pytest
import timm
import torch
import yaml

from titans_timm import checkpoint as ckpt
from titans_timm import train
from conftest import check_bad_input, save_backbone
from titans_timm.train import main

try:
    import fcntl
except ImportError:
    fcntl = None

STRUCT = dict(img_size=28, patch_size=4, depth=1)
KWARGS = ['--model-kwargs', 'img_size=28', 'patch_size=4', 'depth=1']
MODEL = ['--model', 'vit_tiny_patch16_224', *KWARGS]
TINY = [*MODEL, '--img-size', '28', '--train-num-samples', '16', '--val-num-samples', '8', '-b', '8', '--epochs', '1',
        '--lr', '2e-3', '--warmup-epochs', '0', '--seed', '0', '--backbone-lr-scale', '1', '--no-progress']
RECIPE = Path(__file__).resolve().parents[1] / 'train_timm_hparams' / 'fashion_mnist_titans.yaml'

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def backbone28(tmp_path_factory):
    """A plain timm ViT checkpoint with the tiny structure used here."""
    return save_backbone(tmp_path_factory.mktemp('backbone28'), STRUCT)




def _files(run_dir):
    """{name: bytes} of every file in a run folder."""
    return {p.name: p.read_bytes() for p in Path(run_dir).iterdir() if p.is_file()}


def _temps(run_dir):
    return sorted(p.name for p in Path(run_dir).glob('.*.tmp'))


def _stopped_run(tmp_path, *extra):
    """A run stopped after its first step: last.safetensors + train_state.pth at update 1."""
    out = main([*TINY, *extra, '--output', str(tmp_path), '--experiment', 'r', '--stop-after-steps', '1'])
    assert out['interrupted']
    return Path(out['output_dir'])


def _damage_tensor_bytes(path, byte):
    """Overwrite every tensor byte of a safetensors file, keeping its header (and so its metadata) intact."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack('<Q', data[:8])
    data[8 + n:] = bytes([byte]) * (len(data) - 8 - n)
    path.write_bytes(bytes(data))


# -- one trainer per run folder ---------------------------------------------------------------------------------

@pytest.mark.skipif(fcntl is None, reason='no advisory file locks on this platform')
def test_a_run_folder_in_use_stops_a_second_trainer_before_it_writes(capsys, tmp_path):
    run = _stopped_run(tmp_path)
    assert train.LOCK_FILE not in _files(run)   # let go (and removed) when the run ended
    before = _files(run)
    fresh = tmp_path / 'fresh'
    fresh.mkdir()
    held = []
    try:
        for folder in (run, fresh):   # as another trainer holds them: same lock, other open file
            fd = os.open(folder / train.LOCK_FILE, os.O_RDWR | os.O_CREAT)
            held.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        check_bad_input(capsys, main, ['--resume', str(run)], 'in use by another trainer')
        # --force must not delete the files of a run that is going on
        check_bad_input(capsys, main, [*TINY, '--output', str(tmp_path), '--experiment', 'r', '--force'], 'in use')
        line = check_bad_input(capsys, main, [*TINY, '--output', str(tmp_path), '--experiment', 'fresh'], 'in use')
        assert str(fresh) in line
    finally:
        for fd in held:
            os.close(fd)
    assert {k: v for k, v in _files(run).items() if k != train.LOCK_FILE} == before
    assert sorted(p.name for p in fresh.iterdir()) == [train.LOCK_FILE]
    # the other trainer is gone (its lock file stays behind, as after a kill): the run continues
    done = main(['--resume', str(run)])
    assert not done['interrupted'] and (run / 'model.safetensors').is_file()
    assert train.LOCK_FILE not in _files(run)


# -- no temp files left behind --------------------------------------------------------------------------------

def test_no_temp_files_survive_a_resume_after_a_crash(tmp_path):
    """A run killed right after linking last.* to last.prev.* (one file under two names), with temp files of killed
    writes lying around: the resumed run ends with none of them."""
    run = _stopped_run(tmp_path)
    for last, prev in zip(train.LAST_PAIR, train.PREV_PAIR):
        os.link(run / last, run / prev)
    (run / '.last.safetensors.0123abcd.tmp').write_bytes(b'half written')
    (run / '.train_state.pth.deadbeef.tmp').write_bytes(b'half written')
    (run / train.LOCK_FILE).write_text('pid 999999 on gone')   # the killed run's lock file, not held
    done = main(['--resume', str(run)])
    assert not done['interrupted']
    assert _temps(run) == []
    assert not list(run.glob('*.prev.*')) and not (run / train.LOCK_FILE).exists()
    assert sorted(_files(run)) == sorted([*train.RECORD_FILES, *train.LAST_PAIR, 'model.safetensors', 'results.json',
                                          'summary.csv'])


# -- damaged checkpoints ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('byte', [0x00, 0xFF], ids=['zeroed', 'nan'])
def test_damaged_checkpoint_without_fallback_is_one_error_naming_it(capsys, tmp_path, byte):
    run = _stopped_run(tmp_path)
    _damage_tensor_bytes(run / 'last.safetensors', byte)
    before = _files(run)
    line = check_bad_input(capsys, main, ['--resume', str(run)], 'last.safetensors')
    assert 'corrupt' in line and '--lr' not in line
    assert _files(run) == before


def test_damaged_checkpoint_falls_back_to_the_previous_pair(tmp_path, caplog):
    ref = main([*TINY, '--epochs', '2', '--output', str(tmp_path), '--experiment', 'ref'])
    run = _stopped_run(tmp_path, '--epochs', '2')
    kept = {p: (run / n).read_bytes() for p, n in zip(train.PREV_PAIR, train.LAST_PAIR)}   # update 1
    assert main(['--resume', str(run), '--stop-after-steps', '1'])['interrupted']
    assert not list(run.glob('*.prev.*'))   # removed once the new pair read back intact
    for name, data in kept.items():   # as if killed before the update-1 pair could be removed
        (run / name).write_bytes(data)
    _damage_tensor_bytes(run / 'last.safetensors', 0x00)   # update 2, header intact
    done = main(['--resume', str(run)])
    assert 'resuming from the previous checkpoint' in caplog.text and 'corrupt' in caplog.text
    assert not done['interrupted'] and done['num_updates'] == ref['num_updates'] == 4
    a, b = (ckpt.read_state_dict(d / 'model.safetensors') for d in (tmp_path / 'ref', run))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_carries_a_checksum_that_every_reader_checks(tmp_path):
    run = _stopped_run(tmp_path)
    meta = ckpt.read_metadata(run / 'last.safetensors')
    assert meta[ckpt.CHECKSUM_KEY] == ckpt.tensors_sha256(ckpt.read_state_dict(run / 'last.safetensors'))
    _damage_tensor_bytes(run / 'last.safetensors', 0x00)
    with pytest.raises(ckpt.CheckpointError, match='corrupt'):
        ckpt.load_model(run / 'last.safetensors')


# -- bad input: one line, exit 2, nothing written ----------------------------------------------------------------

def _corrupt_image_folder(root):
    for split in ('train', 'val'):
        for name in ('circle', 'square'):
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                (root / split / name / f'{i}.png').write_bytes(b'not an image')
    return root


def _recipe(tmp_path, **values):
    path = tmp_path / f'{"-".join(values)}.yaml'
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.mark.parametrize('case', ['img-size-7', 'img-size-0', 'workers', 'kwargs', 'yaml-list', 'yaml-scalar',
                                  'corrupt-images', 'output-file', 'output-under-file', 'nan-weights'])
def test_bad_inputs_are_one_line_and_write_nothing(capsys, tmp_path, backbone28, case):
    out = tmp_path / 'out'
    where = ['--output', str(out), '--experiment', 'x']
    recipe = ['-c', str(RECIPE), '--pretrained-path', str(backbone28), *KWARGS, '--train-num-samples', '16',
              '--val-num-samples', '8', '-b', '8', *where]
    if case == 'nan-weights':
        model = timm.create_model('vit_tiny_patch16_224', num_classes=10, **STRUCT)
        with torch.no_grad():
            model.pos_embed.fill_(math.nan)
        ckpt.save_model(model, tmp_path / 'nan.safetensors', architecture='vit_tiny_patch16_224',
                        model_args=dict(STRUCT, num_classes=10))
    argv, expect = {
        'img-size-7': ([*recipe, '--img-size', '7'], '--img-size 7'),
        'img-size-0': ([*recipe, '--img-size', '0'], '--img-size 0'),
        'workers': ([*TINY, '-j', '-1', *where], '--workers -1'),
        'kwargs': (['--model-kwargs', 'depth', *where], '--model-kwargs depth'),
        'yaml-list': (['-c', _recipe(tmp_path, batch_size=[1, 2]), *MODEL, '--train-num-samples', '16', *where],
                      'batch_size: [1, 2]'),
        'yaml-scalar': (['-c', _recipe(tmp_path, mean=0.5), *TINY, *where], 'mean: 0.5'),
        'corrupt-images': ([str(_corrupt_image_folder(tmp_path / 'shapes')), *MODEL, '--img-size', '28', '-b', '2',
                            *where], 'cannot read its images'),
        'output-file': ([*TINY, '--output', str(tmp_path / 'afile'), '--experiment', 'x'], 'is a file'),
        'output-under-file': ([*TINY, '--output', str(tmp_path / 'afile' / 'sub'), '--experiment', 'x'],
                              'cannot write'),
        'nan-weights': ([*TINY, '--pretrained-path', str(tmp_path / 'nan.safetensors'), *where], 'NaN'),
    }[case]
    (tmp_path / 'afile').write_bytes(b'a file')
    line = check_bad_input(capsys, main, argv, expect)
    assert '--lr' not in line
    assert not out.exists()
    assert (tmp_path / 'afile').read_bytes() == b'a file'


# -- OS errors on --output ---------------------------------------------------------------------------------------

def _refuse_writes_under(monkeypatch, root, err):
    """Make creating folders and opening files for writing under ``root`` fail with ``err``, as on a read-only or
    unwritable disk (chmod would not stop root, which tests may run as)."""
    real_open, real_mkdir = os.open, os.mkdir
    root = str(root)

    def under(path):
        return str(path) == root or str(path).startswith(root + os.sep)

    def guarded_open(path, flags, *args, **kwargs):
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if under(path):
            raise OSError(err, os.strerror(err), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, 'open', guarded_open)
    monkeypatch.setattr(os, 'mkdir', guarded_mkdir)


@pytest.mark.parametrize('err', [errno.EROFS, errno.EACCES])
def test_unwritable_output_is_one_line(capsys, tmp_path, monkeypatch, err):
    _refuse_writes_under(monkeypatch, tmp_path / 'ro', err)
    check_bad_input(capsys, main, [*TINY, '--output', str(tmp_path / 'ro' / 'out'), '--experiment', 'x'], os.strerror(err))
    assert not (tmp_path / 'ro').exists()


def test_unwritable_run_folder_on_resume_keeps_its_checkpoint(capsys, tmp_path, monkeypatch):
    run = _stopped_run(tmp_path)
    before = _files(run)
    with monkeypatch.context() as m:
        _refuse_writes_under(m, run, errno.EROFS)
        line = check_bad_input(capsys, main, ['--resume', str(run)], 'Read-only file system')
    assert f'--resume {run}' in line
    assert _files(run) == before


def test_full_disk_mid_run_keeps_the_last_checkpoint(capsys, tmp_path, monkeypatch):
    run = _stopped_run(tmp_path)
    before = {n: (run / n).read_bytes() for n in train.LAST_PAIR}
    real_write = ckpt.atomic_write_bytes

    def full_disk(path, data):
        if Path(path).name in train.LAST_PAIR:   # the disk fills up as the next checkpoint is written
            def no_space(fd):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            with monkeypatch.context() as m:
                m.setattr(ckpt.os, 'fsync', no_space)
                return real_write(path, data)
        return real_write(path, data)

    with monkeypatch.context() as m:
        m.setattr(ckpt, 'atomic_write_bytes', full_disk)
        line = check_bad_input(capsys, main, ['--resume', str(run)], 'No space left on device')
    assert 'last.safetensors' in line and f'--resume {run}' in line
    assert {n: (run / n).read_bytes() for n in train.LAST_PAIR} == before
    assert _temps(run) == [] and not (run / train.LOCK_FILE).exists()
    done = main(['--resume', str(run)])   # space again: the run goes on from where it was
    assert not done['interrupted'] and done['num_updates'] == 2


# -- threads -----------------------------------------------------------------------------------------------------

def test_log_says_how_many_threads_torch_uses(caplog, monkeypatch):
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    torch.set_num_threads(2)
    try:
        main([*TINY, '--eval-only'])
    finally:
        torch.set_num_threads(1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('torch threads')]
    assert lines == ['torch threads: 2 (set OMP_NUM_THREADS=1 on a machine shared with other jobs)']


def test_resume_with_another_model_or_class_count_is_one_error(capsys, tmp_path):
    run = _stopped_run(tmp_path)
    before = _files(run)
    check_bad_input(capsys, main, ['--resume', str(run), '--model', 'vit_tiny_mal_mlp'],
                    'holds vit_tiny_patch16_224, not --model vit_tiny_mal_mlp; drop --model')
    check_bad_input(capsys, main, ['--resume', str(run), '--num-classes', '3'], '--num-classes 3 disagrees')
    assert _files(run) == before
