"""titans-timm-eval and titans-timm-push keep what they made when output goes wrong.

- the eval report and summary come before any picture, so a slow or failing plot never costs the numbers;
- surprise maps come in pages of a readable height, with a progress bar and a warning for very many images;
- ``--dry-run DIR`` never overwrites a user's file; every exported file gets the same umask-derived mode;
- a full or read-only disk is one ``error:`` line (exit status 2), and an earlier report stays whole.
"""
import errno
import json
import os
import stat

import pytest
import timm
import torch
from PIL import Image

import titans_timm  # noqa: F401  (registers the models)
from titans_timm import evaluate as ev
from titans_timm import hub, sweep
from conftest import check_bad_input
from titans_timm.checkpoint import _new_file_mode, config_json, weights_bytes
from titans_timm.data import BUILTIN_DATASET, create_dataset

# Tiny models as in test_evaluate.py: 32 px images in 4x4 patches of 8 px, two blocks, memory in both.
MODEL_ARGS = dict(img_size=32, patch_size=8, depth=2, num_classes=10, memory_blocks=[0, 1])
COMMON = ['--workers', '0', '--no-progress']


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """The model.safetensors of a run folder in timm's layout, as training writes it."""
    labels = create_dataset(BUILTIN_DATASET, split='validation', num_samples=10).label_names
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_mag_simple', **MODEL_ARGS)
    run = tmp_path_factory.mktemp('run')
    (run / 'config.json').write_text(config_json(model, model_args=MODEL_ARGS, label_names=labels))
    (run / 'model.safetensors').write_bytes(weights_bytes(model))
    return run / 'model.safetensors'


def _one_error_line(err: str) -> bool:
    return err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err


# ----------------------------------------------------------------------------------------------------
# titans-timm-eval


@pytest.mark.parametrize('picture', ['plot_confusion_matrix', 'plot_surprise_maps'])
def test_report_and_summary_come_before_any_picture(checkpoint, tmp_path, capsys, monkeypatch, picture):
    out = tmp_path / 'eval'
    seen = {}

    def broken_plot(*args, **kwargs):
        seen['report'] = json.loads((out / ev.REPORT_NAME).read_text())  # already there when drawing starts
        seen['stdout'] = capsys.readouterr().out
        raise RuntimeError('the plot broke')
    monkeypatch.setattr(ev, picture, broken_plot)
    flags = ['--visualize'] if picture == 'plot_confusion_matrix' else ['--surprise-maps', '2']
    with pytest.raises(RuntimeError, match='the plot broke'):
        ev.main(['--checkpoint', str(checkpoint), '--num-samples', '10', '-b', '10', '--output', str(out),
                 *COMMON, *flags])
    assert seen['report']['num_samples'] == 10 and 'top1' in seen['report']
    assert 'top-1' in seen['stdout'] and f'report: {out / ev.REPORT_NAME}' in seen['stdout']
    assert json.loads((out / ev.REPORT_NAME).read_text())['top1'] == seen['report']['top1']


def test_surprise_maps_come_in_pages_of_readable_height(checkpoint, tmp_path, capsys):
    n, max_height = 20, 4000  # pixels: 320 maps once made one 520 x 70440 px PNG
    # -b 8: pages are regrouped across batches; no --no-progress: the maps have their own progress bar
    report = ev.main(['--checkpoint', str(checkpoint), '--num-samples', '24', '-b', '8', '--workers', '0',
                      '--output', str(tmp_path), '--surprise-maps', str(n), '--surprise-blocks', '1'])
    pages = sorted(p for p in os.listdir(tmp_path) if p.startswith('surprise_maps'))
    shown = []
    for page in pages:
        with Image.open(tmp_path / page) as im:
            assert im.size[1] <= max_height
            page_rows = round((im.size[1] / ev.PLOT_DPI - ev.surprise_figsize(0, 1)[1]) / 2.2)  # 2.2 in per row
            assert im.size == tuple(round(v * ev.PLOT_DPI) for v in ev.surprise_figsize(page_rows, 1))
            shown.append(page_rows)
    assert shown == [16, 4]  # every image once: full pages first
    assert pages == [ev.surprise_page_name(i) for i in (1, 2)] == ['surprise_maps.png', 'surprise_maps_002.png']
    assert report['files']['surprise_maps_pages'] == [str(tmp_path / p) for p in pages]
    assert report['files']['surprise_maps'] == str(tmp_path / 'surprise_maps.png')
    assert 'surprise maps' in capsys.readouterr().err
    assert json.loads((tmp_path / ev.REPORT_NAME).read_text())['files'] == report['files']


def test_many_surprise_maps_warn_with_the_limit(checkpoint, tmp_path, capsys, monkeypatch):
    assert 'above 256 a warning, since' in ' '.join(ev.build_parser().format_help().split())
    monkeypatch.setattr(ev, 'SURPRISE_MAPS_WARN_ABOVE', 2, raising=False)  # 256 maps take too long for a test
    ev.main(['--checkpoint', str(checkpoint), '--num-samples', '10', '-b', '10', '--output', str(tmp_path),
             *COMMON, '--surprise-maps', '3'])
    err = capsys.readouterr().err
    assert 'warning: --surprise-maps 3 is above 2' in err


def _failing_replace(folder, code, monkeypatch, name=None):
    """``os.replace`` into ``folder`` (of the file ``name``, or any) fails with ``code`` (a full or read-only disk);
    tests may run as root."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.path.dirname(os.path.abspath(dst)) == str(folder) and name in (None, os.path.basename(dst)):
            raise OSError(code, os.strerror(code), str(dst))
        return real(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, 'replace', replace)


@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EROFS])
def test_eval_report_that_cannot_be_written_is_one_error_and_keeps_the_old_one(checkpoint, tmp_path, capsys,
                                                                                monkeypatch, code):
    out = tmp_path / 'eval'
    out.mkdir()
    (out / ev.REPORT_NAME).write_text('{"top1": 12.5}')
    _failing_replace(out, code, monkeypatch)
    with pytest.raises(SystemExit) as exc:
        ev.main(['--checkpoint', str(checkpoint), '--num-samples', '10', '-b', '10', '--output', str(out), *COMMON])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and _one_error_line(err) and os.strerror(code) in err and ev.REPORT_NAME in err
    assert os.listdir(out) == [ev.REPORT_NAME] and (out / ev.REPORT_NAME).read_text() == '{"top1": 12.5}'


def test_eval_plot_that_cannot_be_written_is_one_error_and_keeps_the_report(checkpoint, tmp_path, capsys,
                                                                             monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(ev, 'plot_confusion_matrix', full_disk)
    with pytest.raises(SystemExit) as exc:
        ev.main(['--checkpoint', str(checkpoint), '--num-samples', '10', '-b', '10', '--output', str(tmp_path),
                 *COMMON, '--visualize'])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and _one_error_line(err) and 'No space left on device' in err
    assert f'{tmp_path / ev.REPORT_NAME} is written' in err
    assert json.loads((tmp_path / ev.REPORT_NAME).read_text())['num_samples'] == 10


# ----------------------------------------------------------------------------------------------------
# titans-timm-push --dry-run


@pytest.mark.parametrize('name', ['README.md', 'config.json'])
def test_dry_run_never_overwrites_a_users_file(checkpoint, tmp_path, capsys, name):
    folder = tmp_path / 'export'
    folder.mkdir()
    (folder / name).write_text('mine')
    assert hub.main([str(checkpoint), 'titans-org/x', '--dry-run', str(folder)]) == 2
    err = capsys.readouterr().err
    assert _one_error_line(err) and name in err and 'new or empty folder' in err
    assert os.listdir(folder) == [name] and (folder / name).read_text() == 'mine'


def test_exported_files_share_one_umask_mode(checkpoint, tmp_path):
    old = os.umask(0o002)  # not the usual 0o022: the mode must follow the umask, not be fixed
    try:
        folder = tmp_path / 'export'
        hub.push(checkpoint, 'titans-org/x', dry_run_dir=folder)
        expected = _new_file_mode()
    finally:
        os.umask(old)
    assert expected == 0o664
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert sorted(modes) == ['README.md', 'config.json', 'model.safetensors']
    assert set(modes.values()) == {expected}, modes


@pytest.mark.parametrize('where,code', [('config.json', errno.ENOSPC), ('README.md', errno.EROFS)])
def test_dry_run_that_cannot_be_written_is_one_error_and_leaves_nothing(checkpoint, tmp_path, capsys, monkeypatch,
                                                                         where, code):
    """The first write (config.json) or the last (README.md, after config.json and the weights are on disk) fails."""
    folder = tmp_path / 'export'
    before = checkpoint.read_bytes()
    _failing_replace(folder, code, monkeypatch, name=where)
    assert hub.main([str(checkpoint), 'titans-org/x', '--dry-run', str(folder)]) == 2
    err = capsys.readouterr().err
    assert _one_error_line(err) and os.strerror(code) in err and str(folder) in err
    assert not folder.exists()  # no half export left to upload by mistake
    assert checkpoint.read_bytes() == before


def test_dry_run_into_an_existing_file_is_one_error(checkpoint, tmp_path, capsys):
    (tmp_path / 'file').write_text('mine')
    assert hub.main([str(checkpoint), 'titans-org/x', '--dry-run', str(tmp_path / 'file')]) == 2
    err = capsys.readouterr().err
    assert _one_error_line(err) and 'not a folder' in err and (tmp_path / 'file').read_text() == 'mine'


@pytest.mark.parametrize('cli_main, argv, expect', [
    (ev.main, ['--no-such-flag'], 'unrecognized arguments: --no-such-flag'),
    (ev.main, ['-b', 'many'], "invalid int value: 'many'"),
    (hub.main, ['run', 'org/name', '--model-kwargs', 'depth'], '--model-kwargs depth: expected key=value items'),
    (hub.main, ['run'], 'required'),
    (sweep.main, ['--jobs', '2'], 'required: -c/--config'),
    (ev.main, ['--model', 'vit_tiny_mag_advancd', '--output', 'unused'], 'did you mean vit_tiny_mag_advanced'),
])
def test_usage_errors_are_one_line(capsys, monkeypatch, tmp_path, cli_main, argv, expect):
    monkeypatch.chdir(tmp_path)
    # every CLI parses with titans_timm.cli.Parser: no usage dump, one error line, exit status 2
    check_bad_input(capsys, cli_main, argv, expect)
