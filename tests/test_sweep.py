"""titans-timm-sweep: a 2x2 sweep trains, evaluates and tabulates; a re-run skips finished runs trained with the
same settings, refuses ones trained otherwise, and re-evaluates reports of other data; bad input."""
import csv
import json
import os
import shlex
import sys

import pytest
import yaml
from PIL import Image

from titans_timm import sweep
from titans_timm.run_record import RunRecord

# A recipe small enough for a test: 32 px images, 2 blocks, a few dozen samples, one epoch.
TINY_RECIPE = dict(
    dataset='fashion-mnist-mini', img_size=32, model_kwargs=dict(patch_size=8, depth=2), epochs=1,
    batch_size=8, train_num_samples=16, val_num_samples=10, workers=0, lr=1e-3, log_interval=100, seed=0,
)
GRID = ['--approaches', 'mal,mag', '--memory-types', 'mlp,simple']
NAMES = ['vit_tiny_mal_mlp', 'vit_tiny_mal_simple', 'vit_tiny_mag_mlp', 'vit_tiny_mag_simple']


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / 'tiny.yaml'
    path.write_text(yaml.safe_dump(TINY_RECIPE))
    return str(path)


def test_plan_and_dry_run(recipe, tmp_path, capsys):
    out = tmp_path / 'sweep'
    result = sweep.main(['-c', recipe, '--model-sizes', 'tiny,small', *GRID, '--output', str(out), '--dry-run',
                         '--', '--epochs', '3'])
    names = [r['name'] for r in result['plan']]
    # Per size: the plain backbone first, then approach x memory type.
    assert names == ['vit_tiny_baseline'] + NAMES + ['vit_small_baseline'] + [n.replace('tiny', 'small') for n in NAMES]
    assert result['plan'][0]['model'] == 'vit_tiny_patch16_224'
    printed = capsys.readouterr().out
    assert '[1/10] vit_tiny_baseline' in printed and '[10/10] vit_small_mag_simple' in printed
    assert '--epochs 3' in printed  # pass-through arguments reach every run
    # Each command can be pasted into a shell as it is: interpreter first.
    command = next(line.strip() for line in printed.splitlines() if 'titans_timm.train' in line)
    assert shlex.split(command)[:3] == [sys.executable, '-m', 'titans_timm.train']
    assert not out.exists()  # a dry run writes nothing


def test_two_by_two_sweep_then_rerun_skips(recipe, tmp_path, capsys):
    out = tmp_path / 'sweep'
    result = sweep.main(['-c', recipe, *GRID, '--no-baseline', '--output', str(out)])
    printed = capsys.readouterr().out
    assert result['failed'] == [], printed
    assert '[3/4] vit_tiny_mag_mlp' in printed
    rows = result['rows']
    assert [r['name'] for r in rows] == NAMES
    for r in rows:
        assert r['status'] == 'done'
        assert 0.0 <= r['top1'] <= r['top5'] <= 100.0
        assert r['params'] > 0 and r['img_per_sec'] > 0 and r['train_time_s'] > 0
        run_dir = out / r['name']
        assert sweep.is_finished(str(run_dir))
        with open(run_dir / 'eval_report.json') as f:
            report = json.load(f)
        # Evaluated on the data the run validated on (its args.yaml), with the run's checkpoint.
        assert report['num_samples'] == TINY_RECIPE['val_num_samples'] and report['model'] == r['name']
        with open(run_dir / 'results.json') as f:
            assert report['top1'] == pytest.approx(json.load(f)['final_top1'])

    with open(out / 'results.csv') as f:
        table = list(csv.DictReader(f))
    # one seed: each variant's mean is its one run, with no interval
    assert [t['name'] for t in table] == NAMES and all(float(t['top1_mean']) == r['top1'] for t, r in zip(table, rows))
    assert all(t['seeds'] == '1' and t['top1_ci_low'] == '' and float(t['test_se']) > 0 for t in table)
    with open(out / 'runs.csv') as f:
        assert [float(t['top1']) for t in csv.DictReader(f)] == [r['top1'] for r in rows]
    md = (out / 'results.md').read_text().splitlines()
    assert md[0].startswith('| model | seeds | top-1 (%) mean | sd | 95% CI | vs baseline (paired) |')
    assert len(md) == 2 + len(NAMES) + 2  # header, rows, blank line, note
    with Image.open(out / 'results.png') as im:
        assert im.size[0] > 100 and im.size[1] > 100

    # Re-run: every run is finished, nothing is trained again.
    mtimes = {n: os.path.getmtime(out / n / 'model.safetensors') for n in NAMES}
    again = sweep.main(['-c', recipe, *GRID, '--no-baseline', '--output', str(out)])
    printed = capsys.readouterr().out
    assert printed.count('finished earlier, skipping') == 4
    assert [r['status'] for r in again['rows']] == ['skipped'] * 4
    assert [r['top1'] for r in again['rows']] == [r['top1'] for r in rows]
    assert mtimes == {n: os.path.getmtime(out / n / 'model.safetensors') for n in NAMES}

    # Changed settings: a finished run trained otherwise is never reused silently; nothing is trained.
    for extra, recipe_text, difference in (
            (['--', '--epochs', '2'], None, "arguments after --: '(none)' -> '--epochs 2'"),
            ([], yaml.safe_dump(dict(TINY_RECIPE, epochs=2)), 'recipe epochs: 1 -> 2')):
        if recipe_text:
            with open(recipe, 'w') as f:
                f.write(recipe_text)
        with pytest.raises(SystemExit) as exc:
            sweep.main(['-c', recipe, *GRID, '--no-baseline', '--output', str(out), *extra])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and err.startswith('error: ') and '\n' not in err
        assert str(out / 'vit_tiny_mal_mlp') in err and '(and 3 more run(s))' in err and difference in err
        assert '--force' in err and '--output' in err
        sweep.main(['-c', recipe, *GRID, '--no-baseline', '--output', str(out), '--dry-run', *extra])
        assert capsys.readouterr().out.count(f'trained with other settings ({difference})') == 4
    with open(recipe, 'w') as f:
        f.write(yaml.safe_dump(TINY_RECIPE))
    assert mtimes == {n: os.path.getmtime(out / n / 'model.safetensors') for n in NAMES}

    # A report written by hand on other data (here the train split) joins the run record; it is not what the sweep
    # asks for, so the re-run keeps using the report of the validation split of the run's record.
    from titans_timm import evaluate
    run_dir = out / 'vit_tiny_mag_simple'
    evaluate.main(['--checkpoint', str(run_dir / 'model.safetensors'), '--split', 'train', '--num-samples', '4',
                   '--workers', '0', '--no-progress'])
    assert [r['split'] for r in RunRecord.load(run_dir).eval_reports] == ['validation', 'train']
    again = sweep.main(['-c', recipe, *GRID, '--no-baseline', '--output', str(out)])
    printed = capsys.readouterr().out
    assert 'evaluating again' not in printed
    assert [r['top1'] for r in again['rows']] == [r['top1'] for r in rows]
    # A recorded report of other weights is never used: the run is evaluated again, on the validation split.
    record = RunRecord.load(run_dir)
    record.eval_reports[0]['checkpoint_sha256'] = '0' * 64
    record.save(run_dir)
    again = sweep.main(['-c', recipe, *GRID, '--no-baseline', '--output', str(out)])
    printed = capsys.readouterr().out
    assert printed.count('evaluating again') == 1 and "its split is 'train', not 'validation'" in printed
    assert [r['top1'] for r in again['rows']] == [r['top1'] for r in rows]
    with open(run_dir / 'eval_report.json') as f:
        report = json.load(f)
    assert report['split'] == 'validation' and report['num_samples'] == TINY_RECIPE['val_num_samples']

    # A run without training's final summary is not finished: the plan resumes it (train_state.pth exists).
    os.remove(out / 'vit_tiny_mal_simple' / 'results.json')
    sweep.main(['-c', recipe, *GRID, '--no-baseline', '--output', str(out), '--dry-run'])
    printed = capsys.readouterr().out
    assert '[2/4] vit_tiny_mal_simple (vit_tiny_mal_simple): resume + eval' in printed
    assert '[1/4] vit_tiny_mal_mlp (vit_tiny_mal_mlp): finished, skip' in printed

    # --force retrains over a folder holding a whole run (checkpoint pair, summary.csv): the trainer is told
    # to start over there, not refused
    mtime = os.path.getmtime(out / 'vit_tiny_mal_mlp' / 'model.safetensors')
    forced = sweep.main(['-c', recipe, '--approaches', 'mal', '--memory-types', 'mlp', '--no-baseline',
                         '--output', str(out), '--force'])
    assert forced['failed'] == [] and forced['rows'][0]['status'] == 'done', capsys.readouterr().out
    assert os.path.getmtime(out / 'vit_tiny_mal_mlp' / 'model.safetensors') > mtime


def _record(run_dir, **record):
    run_dir.mkdir(parents=True)
    (run_dir / 'sweep_run.json').write_text(json.dumps(record))


def test_settings_difference_reads_old_and_new_records(recipe, tmp_path):
    run = sweep.plan_runs(['tiny'], ['mag'], ['simple'], baseline=False)[0]
    wanted = sweep.trained_with(recipe, run, ['--epochs', '2'])
    assert wanted == dict(model='vit_tiny_mag_simple', recipe=TINY_RECIPE, passthrough=['--epochs', '2'])
    _record(tmp_path / 'same', trained_with=wanted)
    assert sweep.settings_difference(str(tmp_path / 'same'), wanted) is None
    # A record of an older sweep holds only the command (also with the --resume the sweep added).
    old = [sys.executable, '-m', 'titans_timm.train', '-c', recipe, '--model', 'vit_tiny_mag_simple', '--output',
           str(tmp_path), '--experiment', 'vit_tiny_mag_simple']
    _record(tmp_path / 'old_same', command=old + ['--epochs', '2', '--resume', 'x'])
    assert sweep.settings_difference(str(tmp_path / 'old_same'), wanted) is None
    _record(tmp_path / 'old_other', command=old)
    assert sweep.settings_difference(str(tmp_path / 'old_other'), wanted) == \
        "arguments after --: '(none)' -> '--epochs 2'"
    (tmp_path / 'none').mkdir()
    assert 'no readable sweep_run.json' in sweep.settings_difference(str(tmp_path / 'none'), wanted)
    # the same settings written another way, or with flags that only change how a run is watched
    _record(tmp_path / 'spelled', trained_with=dict(wanted, passthrough=['--workers', '0', '--epochs=2',
                                                                         '--no-progress']))
    assert sweep.settings_difference(str(tmp_path / 'spelled'), wanted) is None


def test_interrupted_run_with_other_settings_starts_over(recipe, tmp_path, capsys):
    run_dir = tmp_path / 'sweep' / 'vit_tiny_mag_simple'
    run = sweep.plan_runs(['tiny'], ['mag'], ['simple'], baseline=False)[0]
    _record(run_dir, trained_with=sweep.trained_with(recipe, run, []))
    (run_dir / 'train_state.pth').write_bytes(b'')
    argv = ['-c', recipe, '--approaches', 'mag', '--memory-types', 'simple', '--no-baseline',
            '--output', str(tmp_path / 'sweep'), '--dry-run']
    sweep.main(argv)
    printed = capsys.readouterr().out
    assert 'vit_tiny_mag_simple): resume + eval' in printed
    assert f"--resume {run_dir}" in printed   # the printed command is the one the sweep runs
    sweep.main(argv + ['--', '--epochs', '2'])  # resuming would mix two budgets in one run
    printed = capsys.readouterr().out
    assert "interrupted with other settings (arguments after --: '(none)' -> '--epochs 2'): train again" in printed
    assert printed.rstrip().endswith('--epochs 2 --force')
    # left by a sweep that wrote its record only at the end: resumed, as that sweep would have
    (run_dir / 'sweep_run.json').unlink()
    sweep.main(argv + ['--', '--epochs', '2'])
    assert 'vit_tiny_mag_simple): resume + eval' in capsys.readouterr().out


def test_failed_run_is_reported_and_the_sweep_goes_on(recipe, tmp_path, capsys):
    out = tmp_path / 'sweep'
    # Training refuses a class count the data does not have: the run fails before any work.
    result = sweep.main(['-c', recipe, '--approaches', 'mal', '--memory-types', 'mlp', '--no-baseline',
                         '--output', str(out), '--', '--num-classes', '7'])
    printed = capsys.readouterr().out
    assert result['failed'] == ['vit_tiny_mal_mlp']
    assert '[1/1] vit_tiny_mal_mlp: training failed (exit status 2)' in printed and 'error:' in printed
    assert not sweep.is_finished(str(out / 'vit_tiny_mal_mlp'))
    assert '| vit_tiny_mal_mlp (failed) | 0 | - |' in (out / 'results.md').read_text()


def test_results_delta_against_baseline(tmp_path):
    rows = []
    for name, approach, top1 in (('vit_tiny_baseline', 'baseline', 80.0), ('vit_tiny_mag_simple', 'mag', 82.5)):
        rows.append(dict({k: None for k in sweep.RESULT_COLUMNS}, name=name, variant=name, model=name, size='tiny',
                         approach=approach, memory_type='-', status='done', params=5_500_000, top1=top1,
                         top5=99.0, num_samples=1000, train_time_s=12.0, img_per_sec=100.0))
    sweep._add_deltas(rows)
    assert rows[1]['delta_top1'] == 2.5
    files = sweep.write_results(rows, str(tmp_path))
    md = open(files['md']).read()
    assert '| vit_tiny_baseline | 1 | 80.00 | - | - | (baseline) |  | 5.50 | 12 | 100.0 |' in md
    assert '| vit_tiny_mag_simple | 1 | 82.50 | - | - | +2.50 | - | 5.50 | 12 | 100.0 |' in md
    assert 'test-set standard error: about' in md


def _row(name, approach, seed, top1):
    return dict({k: None for k in sweep.RESULT_COLUMNS}, name=f'{name}-seed{seed}', variant=name, seed=seed,
                model=name, size='tiny', approach=approach, memory_type='simple', status='done', params=10,
                top1=top1, num_samples=5000, train_time_s=1.0, img_per_sec=1.0)


def test_summary_with_seeds_by_hand(tmp_path):
    """Three seeds: mean, sd and t-interval per variant, the paired difference to the baseline by seed.
    By hand: baseline 80, 81, 82 -> mean 81, sd 1, half-width t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051 =
    2.484138. Memory 82, 82, 85 -> differences 2, 1, 3: mean 2, sd 1, interval [-0.484, 4.484] (contains 0);
    memory 83, 84, 85 (differences 3, 3, 3, sd 0): [3, 3], excludes 0."""
    rows = [_row('vit_tiny_baseline', 'baseline', s, t) for s, t in ((0, 80.0), (1, 81.0), (2, 82.0))]
    rows += [_row('vit_tiny_mag_simple', 'mag', s, t) for s, t in ((0, 82.0), (1, 82.0), (2, 85.0))]
    rows += [_row('vit_tiny_mal_simple', 'mal', s, t) for s, t in ((0, 83.0), (1, 84.0), (2, 85.0))]
    summary = {r['name']: r for r in sweep.summarize(rows)}
    base, mag, mal = summary['vit_tiny_baseline'], summary['vit_tiny_mag_simple'], summary['vit_tiny_mal_simple']
    assert (base['seeds'], base['top1_mean'], base['top1_sd']) == (3, 81.0, 1.0)
    assert base['top1_ci_low'] == pytest.approx(81.0 - 2.484138, abs=1e-5)
    assert base['top1_ci_high'] == pytest.approx(81.0 + 2.484138, abs=1e-5)
    assert base['delta_mean'] is None
    assert (mag['delta_mean'], mag['delta_sd'], mag['pairs']) == (2.0, 1.0, 3)
    assert mag['delta_ci_low'] == pytest.approx(2.0 - 2.484138, abs=1e-5) and mag['delta_excludes_zero'] is False
    assert (mal['delta_ci_low'], mal['delta_ci_high'], mal['delta_excludes_zero']) == (3.0, 3.0, True)
    # test-set noise of one run at 81% on 5,000 images: 100 * sqrt(0.81 * 0.19 / 5000)
    assert base['test_se'] == pytest.approx(sum(100 * ((t / 100) * (1 - t / 100) / 5000) ** 0.5
                                                for t in (80, 81, 82)) / 3)
    files = sweep.write_results(rows, str(tmp_path))
    md = open(files['md']).read()
    assert '| vit_tiny_mal_simple | 3 | 84.00 | 1.00 | [81.52, 86.48] | +3.00 | **[+3.00, +3.00]** |' in md
    assert '| vit_tiny_mag_simple | 3 | 83.00 | 1.73 |' in md and '| +2.00 | [-0.48, +4.48] |' in md
    with open(files['csv']) as f:
        table = {t['name']: t for t in csv.DictReader(f)}
    assert table['vit_tiny_mal_simple']['delta_excludes_zero'] == 'True'
    with open(files['runs_csv']) as f:
        assert len(list(csv.DictReader(f))) == 9


def test_summary_pairs_only_seeds_both_finished():
    rows = [_row('vit_tiny_baseline', 'baseline', 0, 80.0), _row('vit_tiny_baseline', 'baseline', 1, 90.0),
            _row('vit_tiny_mag_simple', 'mag', 0, 81.0), _row('vit_tiny_mag_simple', 'mag', 2, 99.0)]
    rows[1]['top1'] = None
    rows[1]['status'] = 'failed'
    summary = {r['name']: r for r in sweep.summarize(rows)}
    assert summary['vit_tiny_baseline']['status'] == '1 of 2 failed'
    assert summary['vit_tiny_mag_simple']['pairs'] == 1 and summary['vit_tiny_mag_simple']['delta_mean'] == 1.0


def test_seeds_plan_names_and_commands(recipe, tmp_path, capsys):
    out = tmp_path / 'sweep'
    result = sweep.main(['-c', recipe, '--approaches', 'mag', '--memory-types', 'simple', '--seeds', '3',
                         '--output', str(out), '--dry-run'])
    plan = result['plan']
    # seed by seed (the recipe's seed 0, then 1, 2), the baseline first: an interrupted sweep has whole pairs
    assert [r['name'] for r in plan] == [f'{v}-seed{s}' for s in (0, 1, 2)
                                         for v in ('vit_tiny_baseline', 'vit_tiny_mag_simple')]
    assert [r['seed'] for r in plan] == [0, 0, 1, 1, 2, 2]
    printed = capsys.readouterr().out
    assert 'seeds 0, 1, 2' in printed and printed.count('--seed 1 ') == 2
    assert not out.exists()
    with pytest.raises(SystemExit):
        sweep.main(['-c', recipe, '--seeds', '2', '--output', str(out), '--', '--seed', '5'])
    assert '--seed' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(['-c', recipe, '--seeds', '0', '--output', str(out)])


def test_shipped_tag_gives_memory_models_and_baseline_one_backbone(tmp_path):
    from titans_timm.vit import FMNIST5_WEIGHTS
    runs = sweep.plan_runs(['tiny'], ['mac'], ['mlp'], seeds=[0, 1], tag='fmnist5')
    assert [r['model'] for r in runs] == ['vit_tiny_patch16_224', 'vit_tiny_mac_mlp.fmnist5'] * 2
    assert runs[0]['args'] == ['--seed', '0', '--pretrained-path', str(FMNIST5_WEIGHTS)]
    with pytest.raises(sweep.SweepError, match="tag 'fmnist5' has no weights for size small"):
        sweep.plan_runs(['small'], ['mac'], ['mlp'], tag='fmnist5')


def test_sweep_with_seeds_trains_pairs_resumes_and_forces(recipe, tmp_path, capsys):
    out = tmp_path / 'sweep'
    argv = ['-c', recipe, '--approaches', 'mag', '--memory-types', 'mlp', '--seeds', '2', '--output', str(out)]
    result = sweep.main(argv)
    assert result['failed'] == []
    names = ['vit_tiny_baseline-seed0', 'vit_tiny_mag_mlp-seed0', 'vit_tiny_baseline-seed1', 'vit_tiny_mag_mlp-seed1']
    assert [r['name'] for r in result['rows']] == names
    for r in result['rows']:
        with open(out / r['name'] / 'args.yaml') as f:
            assert yaml.safe_load(f)['seed'] == r['seed'] == RunRecord.load(out / r['name']).seed
    # the two seeds differ (data order, head init), the same seed gives both models the same data order
    assert result['rows'][0]['top1'] is not None
    printed = capsys.readouterr().out
    assert '| vit_tiny_mag_mlp | 2 |' in printed  # the table with intervals is printed at the end
    with open(out / 'results.csv') as f:
        table = {t['name']: t for t in csv.DictReader(f)}
    assert table['vit_tiny_mag_mlp']['pairs'] == '2' and table['vit_tiny_mag_mlp']['top1_ci_low'] != ''
    # an interrupted seed resumes; the others are skipped
    os.remove(out / 'vit_tiny_mag_mlp-seed1' / 'results.json')
    again = sweep.main(argv + ['--dry-run'])
    assert again['plan'][3]['name'] == 'vit_tiny_mag_mlp-seed1'
    printed = capsys.readouterr().out
    assert '[4/4] vit_tiny_mag_mlp-seed1 (vit_tiny_mag_mlp): resume + eval' in printed
    assert printed.count('finished, skip') == 3
    # --force retrains everything
    forced = sweep.main(argv + ['--dry-run', '--force'])
    assert capsys.readouterr().out.count('train + eval') == len(forced['plan'])


@pytest.mark.parametrize('argv, message', [
    (['--approaches', 'mal,mxc'], 'unknown mxc'),
    (['--memory-types', 'deep'], 'unknown deep'),
    (['--model-sizes', 'huge'], 'unknown huge'),
    (['--', '--model', 'vit_tiny_mag_simple'], 'override'),
])
def test_bad_input_is_one_clear_error(recipe, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        sweep.main(['-c', recipe, '--output', str(tmp_path / 'out'), *argv])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith('error: ') and '\n' not in err and message in err


def test_missing_recipe(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        sweep.main(['-c', str(tmp_path / 'nope.yaml'), '--output', str(tmp_path / 'out')])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith('error: ') and 'not found' in err


def test_jobs_threads_follow_cores_unless_set(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.setattr(sweep, 'cpu_cores', lambda: 8)
    assert [sweep.training_threads(j) for j in (1, 2, 3, 16)] == [None, '4', '2', '1']  # -j 1: torch's default
    sweep.main(['-c', recipe, '--approaches', 'mag', '--memory-types', 'mlp', '--output', str(tmp_path / 'out'),
                '-j', '2', '--dry-run'])
    # the printed command is the one the sweep runs, thread count included
    command = next(line.strip() for line in capsys.readouterr().out.splitlines() if 'titans_timm.train' in line)
    assert shlex.split(command)[:2] == ['OMP_NUM_THREADS=4', sys.executable]
    monkeypatch.setenv('OMP_NUM_THREADS', '3')  # the user's own setting wins
    assert [sweep.training_threads(j) for j in (1, 2, 16)] == ['3', '3', '3']
    with pytest.raises(SystemExit) as exc:
        sweep.main(['-c', recipe, '--output', str(tmp_path / 'out'), '--jobs', '0'])
    assert exc.value.code == 2 and '--jobs must be at least 1' in capsys.readouterr().err


def _weights_and_top1(out, names):
    from titans_timm.run_record import file_sha256
    return {n: (file_sha256(out / n / 'model.safetensors'),
                json.loads((out / n / 'eval_report.json').read_text())['top1']) for n in names}


def test_two_jobs_give_the_runs_of_one_job(recipe, tmp_path, monkeypatch, capsys):
    """Runs trained two at a time equal runs trained one after another with the same thread count: weights
    (sha256), top-1, the table's order and the records."""
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    argv = ['-c', recipe, '--approaches', 'mag', '--memory-types', 'mlp']
    names = ['vit_tiny_baseline', 'vit_tiny_mag_mlp']
    one = sweep.main(argv + ['--output', str(tmp_path / 'one')])
    capsys.readouterr()
    two = sweep.main(argv + ['--output', str(tmp_path / 'two'), '--jobs', '2'])
    printed = capsys.readouterr().out
    assert one['failed'] == two['failed'] == []
    assert [r['name'] for r in two['rows']] == [r['name'] for r in one['rows']] == names
    assert _weights_and_top1(tmp_path / 'two', names) == _weights_and_top1(tmp_path / 'one', names)
    # one line as each run starts and as it ends; the children's own output is in their logs
    assert '[1/2] vit_tiny_baseline: training (0:0' in printed and '[2/2] vit_tiny_mag_mlp: trained in ' in printed
    assert 'Train:' not in printed
    for n in names:
        record = json.loads((tmp_path / 'two' / n / 'sweep_run.json').read_text())
        assert record['omp_num_threads'] == '1' and record['trained_with'] == \
            json.loads((tmp_path / 'one' / n / 'sweep_run.json').read_text())['trained_with']
        assert (tmp_path / 'two' / n / 'train.log').stat().st_size > 0
    again = sweep.main(argv + ['--output', str(tmp_path / 'two'), '--jobs', '2'])
    assert [r['status'] for r in again['rows']] == ['skipped'] * 2


def test_a_failed_run_does_not_stop_the_other_slot(recipe, tmp_path, monkeypatch, capsys):
    train_command = sweep._train_command

    def fails_for_seed0(config, run, output, passthrough, resume=False):
        if run['seed'] == 0:
            return [sys.executable, '-c', 'import sys; print("no such luck"); sys.exit(3)']
        return train_command(config, run, output, passthrough, resume)

    monkeypatch.setattr(sweep, '_train_command', fails_for_seed0)
    out = tmp_path / 'sweep'
    result = sweep.main(['-c', recipe, '--approaches', 'mag', '--memory-types', 'mlp', '--no-baseline', '--seeds',
                         '2', '--output', str(out), '-j', '2'])
    printed = capsys.readouterr().out
    assert result['failed'] == ['vit_tiny_mag_mlp-seed0']
    assert '[1/2] vit_tiny_mag_mlp-seed0: training failed (exit status 3)' in printed and 'no such luck' in printed
    assert [r['status'] for r in result['rows']] == ['failed', 'done'] and result['rows'][1]['top1'] is not None
    assert sweep.is_finished(str(out / 'vit_tiny_mag_mlp-seed1'))


def test_ctrl_c_stops_every_slot_resumably(recipe, tmp_path, capsys):
    """Ctrl-C on the terminal reaches the sweep's process group only; the sweep passes one SIGINT to each
    training, which writes its resumable checkpoint, and exits 130. A re-run resumes both."""
    import signal
    import subprocess
    import time
    from pathlib import Path
    out = tmp_path / 'sweep'
    names = ['vit_tiny_mag_mlp-seed0', 'vit_tiny_mag_mlp-seed1']
    own = ['-c', recipe, '--approaches', 'mag', '--memory-types', 'mlp', '--no-baseline', '--seeds', '2',
           '--output', str(out), '-j', '2']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, '-m', 'titans_timm.sweep', *own, '--', '--epochs', '500'],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not all((out / n / 'train_state.pth').is_file() for n in names):  # both past their first epoch
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
    printed, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, printed
    assert 'Traceback' not in printed and 'stopping 2 training run(s)' in printed and 'interrupted: ' in printed
    for n in names:
        log = (out / n / 'train.log').read_text()
        assert 'writing a resumable checkpoint' in log and 'Traceback' not in log, log[-2000:]
        assert not (out / n / 'model.safetensors').exists()
    sweep.main(own + ['--dry-run', '--', '--epochs', '500'])
    assert capsys.readouterr().out.count('resume + eval') == 2
