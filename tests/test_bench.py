"""The benchmark tools measure what they say: the tensor-byte counter, step memory, the accuracy report, the GPU run."""
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from bench import accuracy_report
from bench.accuracy_report import first_epoch_at, summarise
from conftest import ROOT
from bench import gpu_suite
from bench.gpu_suite import LiveTensorBytes


def test_live_tensor_bytes_counts_allocations_not_views():
    existing = torch.zeros(1000)
    with FakeTensorMode():
        x = torch.zeros(100, 100)
        with LiveTensorBytes() as counter:
            a = torch.empty(256, dtype=torch.float32)  # 1 KiB
            b = torch.empty(512, dtype=torch.bfloat16)  # 1 KiB
            del a
            c = b.view(2, 256)[0]  # views and in-place results allocate nothing
            c.mul_(2)
            d = x.sum(dim=0)  # 400 bytes while b is alive: peak 1024 + 1024 before a was freed
        assert counter.peak == 2048 and counter.live == 1024 + 400
    with LiveTensorBytes() as counter:
        existing[:10].add_(1)  # a view of memory made before the counter: not counted
    assert counter.peak == 0
    del b, c, d


def test_gpu_suite_keeps_the_other_rows_when_one_fails_and_writes_after_every_row(tmp_path, monkeypatch, capsys):
    """One variant that fails (a compile mode it cannot run, say) is recorded as an error; the rest still run, and a
    run cut off part-way leaves a record of what it measured."""
    out = tmp_path / 'suite.json'
    build, written = gpu_suite.build, []

    def build_failing_in_the_measured_step(args, variant, batch_size, device):
        model, step = build(args, variant, batch_size, device)
        calls = []

        def failing_step():
            calls.append(1)
            if len(calls) > args.warmup:  # inside the memory meter: its dispatch mode must not stay on
                raise RuntimeError('lean cannot run here\nsecond line')
            step()
        return model, failing_step if (variant, batch_size) == ('lean', 4) else step

    def write_record(path, record):
        written.append(json.loads(json.dumps(record)))
        path.write_text(json.dumps(record))

    monkeypatch.setattr(gpu_suite, 'build', build_failing_in_the_measured_step)
    monkeypatch.setattr(gpu_suite, 'write_record', write_record)
    monkeypatch.setattr(sys, 'argv', ['gpu_suite.py', '--toy', '--no-profile', '--variants', 'fused', 'lean',
                                      '--out', str(out)])
    with pytest.raises(SystemExit) as exited:  # the record is written, and the exit status says a row is missing
        gpu_suite.main()
    assert exited.value.code == 1 and not _get_current_dispatch_mode_stack()
    record = json.loads(out.read_text())
    assert record['complete'] and [(r['variant'], r['batch_size']) for r in record['results']] == [
        ('fused', 4), ('fused', 8), ('lean', 8)]
    assert record['errors'] == [dict(variant='lean', batch_size=4, error='RuntimeError: lean cannot run here')]
    assert 'FAILED: variant=lean, batch_size=4: RuntimeError: lean cannot run here' in capsys.readouterr().out
    # One partial record per (batch, variant) and per augmentation measurement, then the complete one.
    assert [len(w['results']) for w in written] == [1, 1, 2, 3, 3, 3] and not any(w['complete'] for w in written[:-1])


def test_step_memory_script_counts_every_variant_and_precision(tmp_path):
    out = tmp_path / 'memory.json'
    proc = subprocess.run([sys.executable, '-m', 'bench.step_memory', '--batch-size', '64', '--out',
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    rows = {(r['precision'], r['variant']): r['peak_step_mib'] for r in record['results']}
    assert set(rows) == {(p, v) for p in ('fp32', 'bf16 autocast') for v in ('fused', 'lean', 'backprop')}
    for precision in ('fp32', 'bf16 autocast'):
        # Lean keeps one block's graph at a time, fused all of them, backprop also every input gradient path.
        assert rows[precision, 'lean'] < rows[precision, 'fused'] < rows[precision, 'backprop']
    for variant in ('fused', 'lean', 'backprop'):
        assert rows['bf16 autocast', variant] < rows['fp32', variant]  # bf16 activations take half the bytes
    assert record['environment']['commit'] and record['settings'] == dict(
        model='asge_cnn', input_size=[3, 32, 32], batch_size=64, fused_adamw=True)


def _results(tmp_path, test_acc, history):
    results = {
        'model': 'asge_cnn', 'hardware': '1 x NVIDIA H100', 'commit': 'abc', 'command': 'accelerate launch ...',
        'dataset': {'name': 'fashion_mnist', 'splits': {'train': 50_000, 'validation': 10_000, 'test': 10_000}},
        'recipe': {'train': {'batch_size': 512, 'lr': 4e-4, 'mixed_precision': 'bf16', 'compile': True,
                             'channels_last': True, 'mode': 'fused'}},
        'epochs': len({h['epoch'] for h in history}), 'steps': 4 * 98, 'num_processes': 1,
        'step_time_s': history[-1]['step_time_s'], 'train_time_s': history[-1]['time_s'],
        'best_epoch': len(history), 'test_accuracy': test_acc, 'history': history,
    }
    path = tmp_path / 'results.json'
    path.write_text(json.dumps(results))
    return path


def test_accuracy_report_reads_time_to_target_off_the_test_curve(tmp_path):
    # Epoch 1 pays 20 s of compilation; epoch 2 was stopped mid-way and resumed, so it is recorded twice.
    step_times = [25.0, 30.0, 31.0, 35.0, 40.0]
    history = [dict(epoch=e, step_time_s=t, time_s=1.2 * t, val_fusion_acc=acc, test_fusion_acc=acc)
               for e, t, acc in zip([0, 1, 2, 2, 3], step_times, [0.90, 0.9340, 0.93, 0.9341, 0.95])]
    row = summarise(_results(tmp_path, {'fusion': 0.95, 'last': 0.94, 'best': 0.93}, history))
    # 93.40 misses the paper's 93.41; the third epoch (its last record) reaches it after 35 s of training steps.
    assert row['time_to_target'] == {'epoch': 3, 'step_time_s': 35.0, 'wall_time_s': 42.0}
    assert row['target_met'] and row['paper'] == 93.41 and row['epochs'] == 4
    assert row['epoch_s'] == pytest.approx(10.0) and row['steady_epoch_s'] == pytest.approx(5.0)
    assert row['images_per_s'] == pytest.approx(4 * 98 * 512 / 40.0)
    assert first_epoch_at([dict(epoch=0, val_fusion_acc=0.99, time_s=1.0)], 93.41) is None  # no test curve recorded
    assert row['authors_val_at'] == {'epoch': 8, 'authors': 89.2, 'ours': None}  # a 4-epoch run has no epoch 8


def test_accuracy_report_sets_a_long_schedules_first_epochs_beside_the_authors_curve(tmp_path, capsys, monkeypatch):
    history = [dict(epoch=e, step_time_s=10.0 * (e + 1), time_s=12.0 * (e + 1), val_fusion_acc=0.85 + 0.01 * e)
               for e in range(8)]
    path = _results(tmp_path, {'fusion': 0.90, 'last': 0.89, 'best': 0.90}, history)
    results = json.loads(path.read_text())
    results['recipe']['train']['epochs'] = 100  # train.stop_after_epochs=8 of the 100-epoch recipe
    path.write_text(json.dumps(results))
    row = summarise(path)
    assert (row['epochs'], row['scheduled_epochs']) == (8, 100)
    assert row['authors_val_at'] == {'epoch': 8, 'authors': 89.2, 'ours': pytest.approx(92.0)}
    monkeypatch.setattr(sys, 'argv', ['accuracy_report.py', str(path)])
    accuracy_report.main()
    out = capsys.readouterr().out
    assert ' 8/100 ' in out and "validation after epoch 8: ours 92.00%, the authors' code 89.2%" in out
    # Stopped after 8 of 100 epochs: the target is not missed, the schedule was not run.
    assert re.search(r'8/100 .* 93\.41 +stopped ', out)


def test_accuracy_report_plots_curves_of_runs_and_of_earlier_records(tmp_path, capsys, monkeypatch):
    """--plot: validation by epoch beside the authors' point, test by time beside the target; records are inputs."""
    history = [dict(epoch=e, step_time_s=20.0 + 5 * e, time_s=22.0 + 6 * e, val_fusion_acc=0.88 + 0.01 * e,
                    test_fusion_acc=0.89 + 0.015 * e) for e in range(4)]
    fashion = _results(tmp_path, {'fusion': 0.935, 'last': 0.93, 'best': 0.93}, history)
    record = tmp_path / 'accuracy-H100.json'
    monkeypatch.setattr(sys, 'argv', ['accuracy_report.py', str(fashion), '--out', str(record)])
    accuracy_report.main()
    (row,) = json.loads(record.read_text())['runs']
    assert row['test_fusion_by_step_time'] == [[20.0, 89.0], [25.0, 90.5], [30.0, 92.0], [35.0, 93.5]]
    # A later report reads the record's runs as they were written, beside a new run of another dataset without a
    # test curve (and inputs may follow the options).
    digits = tmp_path / 'mnist' / 'results.json'
    digits.parent.mkdir()
    results = json.loads(fashion.read_text())
    results['dataset']['name'], results['hardware'] = 'mnist', '1 x 2-core CPU (Intel Xeon), torch 2.14.1'
    results['history'] = [{k: v for k, v in h.items() if k != 'test_fusion_acc'} for h in history]
    digits.write_text(json.dumps(results))
    assert accuracy_report.report_rows(record) == [row]
    plot = tmp_path / 'curves.png'
    monkeypatch.setattr(sys, 'argv', ['accuracy_report.py', '--plot', str(plot), str(record), str(digits)])
    accuracy_report.main()
    assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and f'wrote {plot}' in capsys.readouterr().out
    rows = [row, accuracy_report.summarise(digits)]
    fashion_epochs, fashion_time, mnist_epochs, mnist_time = accuracy_report.plot_curves(rows, plot).axes
    run, authors = fashion_epochs.get_lines()
    assert list(run.get_xdata()) == [1, 2, 3, 4] and list(run.get_ydata()) == pytest.approx([88, 89, 90, 91])
    assert run.get_label() == 'NVIDIA H100: batch 512, lr 0.0004, bf16'
    assert (authors.get_xdata()[0], authors.get_ydata()[0]) == (8, 89.2)  # the authors' code after 8 epochs
    run, target, limit = fashion_time.get_lines()
    assert list(run.get_xdata()) == [20, 25, 30, 35] and list(target.get_ydata()) == [93.41, 93.41]
    assert list(limit.get_xdata()) == [180, 180] and fashion_time.get_xscale() == 'log'
    assert mnist_epochs.get_lines()[0].get_label() == '2-core CPU (Intel Xeon): batch 512, lr 0.0004, bf16'
    # No test curve: the panel says how to record one, beside the target alone.
    assert [line.get_label() for line in mnist_time.get_lines()] == ['target 99.65%']
    assert 'train.test_every_epoch=true' in mnist_time.texts[0].get_text()


def _epoch_line(epoch, val, test, step_s, all_s):
    return (f'epoch {epoch}: val acc per block 13.1 66.1 74.8 | fusion {val:.2f}% | train fusion 46.11% | test fusion '
            f'{test:.2f}% | so far {step_s:.1f} s in training steps, {all_s:.1f} s in all')


def test_accuracy_report_reads_a_cut_off_log(tmp_path, capsys, monkeypatch):
    """A run killed at a GPU call's limit leaves only its log: curve, times and recipe come from it, no final test."""
    command = ('python recipes/train.py --config recipes/configs/fashion_mnist.yaml '
               'data.path=device_data/fashion_mnist train.mixed_precision=bf16 train.compile=true')
    head = ['torch 2.11.0+cu130 timm 1.0.29 ...',
            'training asge_cnn (9,171,722 parameters, 7 blocks) on 50000 images (10000 validation, 10000 test), '
            '1 process(es) on cuda, fused mode']
    epochs = [_epoch_line(1, 88.0, 87.5, 25.6, 25.8), _epoch_line(2, 93.0, 93.5, 28.0, 28.5),
              _epoch_line(3, 93.1, 93.2, 30.4, 31.2)]
    log = tmp_path / 'fashion_mnist-recipe.log'
    log.write_text('\n'.join(head + epochs) + '\n')  # an older log: no `run:` line
    with pytest.raises(SystemExit, match="no 'run:' line"):
        summarise(log)
    run = f'{command} | commit abc123 | 1 x NVIDIA H200, torch 2.11.0+cu130'
    row = summarise(log, run)
    assert (row['dataset'], row['batch_size'], row['lr'], row['scheduled_epochs'], row['epochs']) == (
        'fashion_mnist', 128, 2e-4, 100, 3)  # the recipe's config file, read through its own loader
    assert (row['hardware'], row['commit'], row['mixed_precision']) == ('1 x NVIDIA H200, torch 2.11.0+cu130',
                                                                      'abc123', 'bf16')
    assert row['test_accuracy'] is None and not row['target_met']
    assert row['time_to_target'] == {'epoch': 2, 'step_time_s': 28.0, 'wall_time_s': 28.5}
    # 391 steps an epoch, the last batch padded, as results.json counts them.
    assert row['steady_epoch_s'] == pytest.approx(2.4) and row['images_per_s'] == pytest.approx(3 * 391 * 128 / 30.4)
    assert row['test_fusion_by_epoch'] == [87.5, 93.5, 93.2]
    # Logs from now on carry the run line themselves; a later override wins over the config file.
    log.write_text('\n'.join([f'run: {command} train.batch_size=512 | commit def456 | 1 x NVIDIA H100'] + head
                             + epochs[:1]) + '\n')
    row = summarise(log)
    assert (row['batch_size'], row['commit'], row['epochs']) == (512, 'def456', 1)
    monkeypatch.setattr(sys, 'argv', ['accuracy_report.py', str(log)])
    accuracy_report.main()
    assert re.search(r'fashion_mnist +1/100 +512 +bf16 +- +- +- +93\.41 +cut off', capsys.readouterr().out)
    # The log of a resumed run starts later; its times run on from the checkpoint, so its epochs count from 1 too.
    log.write_text('\n'.join([f'run: {command} | commit def456 | 1 x NVIDIA H100'] + head + [
        _epoch_line(11, 90.0, 90.0, 26.0, 30.0), _epoch_line(12, 90.5, 90.4, 28.4, 33.0)]) + '\n')
    row = summarise(log)
    assert row['epochs'] == 12 and row['epoch_s'] == pytest.approx(28.4 / 12)
    # One --log-run line cannot describe two different old logs.
    other = tmp_path / 'cifar10-recipe.log'
    other.write_text('\n'.join(head + epochs) + '\n')
    older = tmp_path / 'older.log'
    older.write_text('\n'.join(head + epochs) + '\n')
    monkeypatch.setattr(sys, 'argv', ['accuracy_report.py', str(other), str(older), '--log-run', run])
    with pytest.raises(SystemExit):
        accuracy_report.main()
    assert "--log-run names one run, but" in capsys.readouterr().err


def run_device_all(env, timeout=300):
    """``bench/device/run.sh all`` as the GPU machine runs it, here on the CPU."""
    return subprocess.run(['bash', str(ROOT / 'bench' / 'device' / 'run.sh'), 'all'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_device_all_runs_what_fits_in_its_budget_and_returns_one_tar(tmp_path):
    """bench/device/run.sh all: stages in order, skips what was not carried or no longer fits, one tar back."""
    out = tmp_path / 'out'
    out.mkdir()
    env = {**os.environ, 'OUT': str(out), 'STAGES': 'train:not_carried suite suite:compile',
           'SUITE_ARGS': '--toy --no-profile', 'BUDGET_S': '201', 'MIN_STAGE_S': '200'}

    proc = run_device_all(env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in out.iterdir()] == ['all.tar']
    with tarfile.open(out / 'all.tar') as tar:
        assert sorted(tar.getnames()) == ['all-stages.txt', 'gpu_suite__toy___no_profile.json']
        summary = tar.extractfile('all-stages.txt').read().decode().splitlines()
        suite = json.load(tar.extractfile('gpu_suite__toy___no_profile.json'))
    assert summary[0] == 'train:not_carried: skipped, device_data/not_carried was not carried'
    assert re.fullmatch(r'suite: exit 0 after \d+ s', summary[1])
    # The suite takes a few seconds of the 201: less than the 200 a stage needs is left for the next one.
    assert re.fullmatch(r'suite:compile: skipped, \d+ s of the budget left', summary[2]), summary
    assert suite['environment']['toy'] and suite['settings']['model'] == 'asge_cnn_tiny'
    assert {r['variant'] for r in suite['results']} == {'fused', 'lean', 'backprop'}
    assert all(r['cudagraph_skips'] is None for r in suite['results'])  # no CUDA graphs asked for
    assert [a['compiled'] for a in suite['augmentation']] == [False] and suite['augmentation'][0]['batch_ms'] > 0
    env['STAGES'] = 'recipe:not_carried suite trian:mnist'
    proc = run_device_all(env)
    assert proc.returncode == 2 and 'unknown stage trian:mnist in STAGES' in proc.stderr
    assert proc.stdout == ''  # before the set-up (seconds of imports) and any stage
    # The authors' 100-epoch recipe ends only at the budget: a stage after it is named as likely to get no time.
    assert 'note: suite comes after recipe:not_carried, which can take all of the budget left' in proc.stderr


def test_device_all_retries_a_failed_training_run_with_retry_args(tmp_path):
    """A training stage that fails (a compile mode the GPU cannot run, say) runs once more with RETRY_ARGS."""
    out = tmp_path / 'out'
    out.mkdir()
    env = {**os.environ, 'OUT': str(out), 'STAGES': 'train:digits', 'BUDGET_S': '280', 'MIN_STAGE_S': '10',
           'FAST_ARGS': 'train.epochs=1 train.max_steps=2 train.mixed_precision=no train.channels_last=false '
                        'train.profile_steps=1',
           'TRAIN_ARGS': 'train.compile=bogus', 'RETRY_ARGS': 'train.compile=false'}
    proc = run_device_all(env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with tarfile.open(out / 'all.tar') as tar:
        names = set(tar.getnames())
        summary = tar.extractfile('all-stages.txt').read().decode().splitlines()
        failed = tar.extractfile('digits-failed.log').read().decode()
        results = json.load(tar.extractfile('digits-results.json'))
    assert names == {'all-stages.txt', 'digits-failed.log', 'digits.log', 'digits-results.json',
                     'digits-block_accuracy.png', 'digits-profile.txt'}
    assert re.fullmatch(r'train:digits: exit 1 after \d+ s', summary[0]), summary
    assert re.fullmatch(r'train:digits \(train.compile=false\): exit 0 after \d+ s', summary[1]), summary
    assert "train.compile='bogus'" in failed  # the first try's error is kept beside the retry's log
    assert results['recipe']['train']['compile'] is False and results['steps'] == 2
    assert results['command'].endswith('train.compile=bogus train.compile=false')



def test_device_all_runs_training_stages_together(tmp_path):
    """together:A+B runs its training stages side by side (one process each), reports each one's end, and runs the
    ones that failed again, together, with RETRY_ARGS."""
    out = tmp_path / 'out'
    out.mkdir()
    env = {**os.environ, 'OUT': str(out), 'STAGES': 'together:train:digits+recipe:digits+recipe:not_carried',
           'BUDGET_S': '280', 'MIN_STAGE_S': '10',
           'TRAIN_ARGS': 'train.epochs=1 train.max_steps=2 train.mixed_precision=no train.channels_last=false '
                         'train.compile=bogus',
           'RETRY_ARGS': 'train.compile=false'}
    proc = run_device_all(env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with tarfile.open(out / 'all.tar') as tar:
        names = set(tar.getnames())
        summary = tar.extractfile('all-stages.txt').read().decode().splitlines()
        fast = json.load(tar.extractfile('digits-results.json'))
        recipe_run = json.load(tar.extractfile('digits-recipe-results.json'))
        failed = tar.extractfile('digits-recipe-failed.log').read().decode()
    assert {'digits.log', 'digits-recipe.log', 'digits-failed.log', 'digits-recipe-failed.log', 'digits-results.json',
            'digits-recipe-results.json'} <= names
    assert summary[0] == 'recipe:not_carried: skipped, device_data/not_carried was not carried'
    # Each run is retried as soon as it fails, so the first two lines come in the order the runs failed.
    assert sorted(re.sub(r'\d+ s$', 'N s', line) for line in summary[1:3]) == [
        'recipe:digits (together): exit 1 after N s', 'train:digits (together): exit 1 after N s']
    assert [re.sub(r'\d+ s$', 'N s', line) for line in summary[3:]] == [
        'train:digits (train.compile=false) (together): exit 0 after N s',
        'recipe:digits (train.compile=false) (together): exit 0 after N s']
    assert "train.compile='bogus'" in failed
    # Each kept its own settings: the fast one batch 512 (FAST_ARGS), the recipe its config's 64.
    assert fast['recipe']['train']['batch_size'] == 512 and recipe_run['recipe']['train']['batch_size'] == 64
    assert fast['steps'] == recipe_run['steps'] == 2 and recipe_run['recipe']['train']['compile'] is False
    env['STAGES'] = 'together:recipe:mnist+train:mnist+recipe:mnist'
    proc = run_device_all(env, timeout=60)
    assert proc.returncode == 2 and 'names a run twice' in proc.stderr and proc.stdout == ''


def test_repack_parquet_keeps_every_pixel_and_the_features(tmp_path):
    """bench/device/repack_parquet.py: smaller files, the same decoded tensors, labels and class names; JPEGs kept."""
    import io

    import datasets
    import numpy as np
    from PIL import Image

    from timm_asge.data import load_tensors

    digits = load_tensors('digits', 'train', img_size=28, channels=1)
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=digits.label_names)})
    rows = {'image': [Image.fromarray(im[0].numpy()) for im in digits.images], 'label': digits.labels.tolist()}
    for name, fmt in (('greys', 'PNG'), ('photos', 'JPEG')):
        folder = tmp_path / name
        folder.mkdir()
        encoded = []
        for image in rows['image']:
            buffer = io.BytesIO()
            (image.convert('RGB') if fmt == 'JPEG' else image).save(buffer, format=fmt)
            encoded.append({'bytes': buffer.getvalue(), 'path': None})
        datasets.Dataset.from_dict({'image': encoded, 'label': rows['label']}, features=features).to_parquet(
            folder / 'train-00000-of-00001.parquet')
    before = {name: (tmp_path / name / 'train-00000-of-00001.parquet').read_bytes() for name in ('greys', 'photos')}
    original = load_tensors(str(tmp_path / 'greys'), 'train', 28, 1, cache_dir=tmp_path / 'cache-before')
    proc = subprocess.run([sys.executable, str(ROOT / 'bench' / 'device' / 'repack_parquet.py'),
                           str(tmp_path / 'greys'), str(tmp_path / 'photos')], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r'greys/train-00000-of-00001.parquet: [\d.]+ -> [\d.]+ MiB, same pixels', proc.stdout)
    assert 'photos/train-00000-of-00001.parquet: kept (JPEG RGB images)' in proc.stdout
    after = (tmp_path / 'greys' / 'train-00000-of-00001.parquet').read_bytes()
    assert len(after) < len(before['greys'])
    assert (tmp_path / 'photos' / 'train-00000-of-00001.parquet').read_bytes() == before['photos']
    repacked = load_tensors(str(tmp_path / 'greys'), 'train', 28, 1, cache_dir=tmp_path / 'cache-after')
    assert torch.equal(repacked.images, original.images) and torch.equal(repacked.labels, original.labels)
    assert repacked.label_names == original.label_names == digits.label_names
    assert np.array_equal(repacked.images.numpy(), digits.images.numpy())


def test_device_sweep_runs_each_line_with_its_own_settings_and_returns_one_tar(tmp_path):
    """bench/device/run.sh sweep FILE: the runs side by side, each with its overrides; their files in sweep.tar."""
    out = tmp_path / 'out'
    out.mkdir()
    runs = tmp_path / 'runs.txt'
    runs.write_text('# two runs of the digits job\n'
                    'local digits train.max_steps=2\n'
                    'backprop digits train.max_steps=2 train.mode=backprop\n')
    env = {**os.environ, 'OUT': str(out), 'BUDGET_S': '200', 'TQDM_DISABLE': '1'}
    proc = subprocess.run(['bash', str(ROOT / 'bench' / 'device' / 'run.sh'), 'sweep', str(runs)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(proc.stdout.splitlines()[1:]) == ['backprop: exit 0', 'local: exit 0']  # after the versions line
    assert [p.name for p in out.iterdir()] == ['sweep.tar']
    with tarfile.open(out / 'sweep.tar') as tar:
        assert sorted(tar.getnames()) == sorted(f'{name}{suffix}' for name in ('local', 'backprop')
                                                for suffix in ('.log', '-results.json', '-block_accuracy.png'))
        modes = {name: json.load(tar.extractfile(f'{name}-results.json'))['mode'] for name in ('local', 'backprop')}
    assert modes == {'local': 'fused', 'backprop': 'backprop'}
