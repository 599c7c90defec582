"""The training recipe end to end: the README's main job, config errors, NaN stop, kill + resume, 2 processes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import timm
from safetensors.torch import load_file

from bench.accuracy_report import summarise
from conftest import ROOT, free_port, load_script, shared_dataset
from timm_asge.data import load_tensors, to_model_input
from timm_asge.engine import param_groups
from timm_asge.recipe import RecipeError, cosine_schedule, cudagraph_skips, hold_output_dir, load_config, resolve_auto

recipe, validate = load_script('train'), load_script('validate')

DIGITS = str(ROOT / 'recipes' / 'configs' / 'digits.yaml')


def run_recipe(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / 'recipes' / 'train.py'), *args], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, **(env or {})}, **kwargs)


def test_digits_main_job(tmp_path):
    """The README's main job: >= 96% test accuracy, results.json, plot, and a Hub export that reproduces it."""
    results = recipe.main(['--config', DIGITS, f'output_dir={tmp_path}'])
    # Seeds 0-4 (commit after 2351fdb): fusion 95.0-98.1%, last 97.2-99.7%; this is seed 0.
    assert results['test_accuracy'][results['prediction']] >= 0.93, results['test_accuracy']
    assert max(results['test_accuracy'].values()) >= 0.96, results['test_accuracy']
    on_disk = json.loads((tmp_path / 'results.json').read_text())
    assert on_disk['test_accuracy'] == results['test_accuracy']
    assert on_disk['command'].startswith('python recipes/train.py --config ')  # not started by accelerate launch
    assert set(on_disk['strategies']) == {'fusion', 'last', 'best'}
    assert on_disk['strategies']['best']['blocks_run'] == on_disk['best_block']  # numbered from 1
    assert on_disk['mode'] == 'fused' and on_disk['head_init_scale'] == 0.25
    assert on_disk['cudagraph_skips'] is None  # no CUDA graphs asked for
    assert (tmp_path / 'block_accuracy.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    history = [json.loads(line) for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
    assert any('val/fusion' in h for h in history)
    # The figures that chose the best epoch are the ones reported (and that chose the best block) for its weights.
    best_epoch = on_disk['history'][on_disk['best_epoch'] - 1]
    assert on_disk['val_accuracy'] == {'blocks': best_epoch['val_block_acc'], 'fusion': best_epoch['val_fusion_acc']}

    model = timm.create_model(f'local-dir:{tmp_path / "export"}', pretrained=True).eval()
    assert model.prediction == 'fusion' and model.best_block == results['best_block'] - 1
    test = load_tensors('digits', 'test', 16, 1)
    for strategy in ('fusion', 'last', 'best'):
        model.set_prediction(strategy)
        with torch.no_grad():
            accuracy = (model(to_model_input(test.images)).argmax(1) == test.labels).double().mean().item()
        assert accuracy == pytest.approx(results['test_accuracy'][strategy], abs=1e-9), strategy

    # recipes/validate.py on the run folder (its export/) reproduces the run's test figures exactly.
    tested = validate.main(['--model', str(tmp_path), '--config', DIGITS, '--out', str(tmp_path / 'test.json')])
    assert tested['test_accuracy'] == results['test_accuracy']
    assert tested['test_block_accuracy'] == results['test_block_accuracy']
    assert tested['best_block'] == results['best_block'] and tested['dataset']['images'] == 359
    assert tested['strategies'] == results['strategies']
    assert json.loads((tmp_path / 'test.json').read_text())['command'].startswith('python recipes/validate.py --model')


@pytest.mark.parametrize('override,message', [
    ('train.epoch=3', "unknown config key 'train.epoch'.*did you mean 'train.epochs'"),
    ('modle.name=asge_cnn', "unknown config key 'modle'.*did you mean 'model'"),
    ('data.img_size=3', r'data.img_size=3 is too small for asge_cnn_tiny.*at least 4x4'),
    ('model.args.pool_type=max', "unknown pool_type 'max'"),
    ('train.mixed_precision=fp16', "train.mixed_precision='fp16'; choose one of auto, no, bf16"),
    ('train.compile=fastest', "train.compile='fastest'; choose one of auto, false, true, default, reduce-overhead"),
    ('train.cpu=1', 'train.cpu=1 must be true or false'),
    ('train.max_steps=1e3', "train.max_steps='1e3' must be a whole number, at least 1 \\(or null\\)"),
    ('train.batch_size=0', 'train.batch_size=0 must be a whole number, at least 1'),
    ('train.seed=4294967296', 'train.seed=4294967296 must be a whole number from 0 to 4294967295'),
    ('data.channels=4', "data.channels=4; choose one of 1, 3"),
    ('data.grayscale_p=2', 'data.grayscale_p=2 must be a number from 0 to 1'),
    ('model.prediction=fuse', "model.prediction='fuse'; choose one of fusion, last, best"),
    ('train.mode=sgd', "train.mode='sgd'; choose one of fused, lean, backprop"),
    ('data.color_jitter=[0.4,0.4]', r'color_jitter=\[0.4, 0.4\] must be \[brightness, contrast, saturation, hue\]'),
    ('train.min_lr=1', 'train.min_lr=1 must be at most train.lr=0.002'),
    ('train.lr=1e308', 'train.lr=1e[+]?308 must be a number from 1e-12 to 1'),
    ('train.weight_decay=-1', 'train.weight_decay=-1 must be a number from 0 to 1'),
    ('data.hflip=maybe', "data.hflip='maybe' must be true or false"),
    ('model.name=asge_cnnn', "model.name='asge_cnnn' is not an ASGE model; choose one of asge_cnn, asge_cnn_tiny"),
    ('model.name=resnet18', "model.name='resnet18' is not an ASGE model"),
    ('model.args.foo=1', "cannot build model 'asge_cnn_tiny' with model.args=.*unexpected keyword argument 'foo'"),
    ('model.args=3', "config key 'model.args' in the command line must be a mapping"),
])
def test_config_errors_stop_at_once(tmp_path, override, message):
    with pytest.raises(RecipeError, match=message):
        recipe.main(['--config', DIGITS, f'output_dir={tmp_path}', *override.split()])


def test_config_files_that_are_not_yaml_mappings_stop_with_where(tmp_path):
    for name, text, message in [
            ('broken.yaml', 'train: [1, 2\n', r"config file '.*broken.yaml' is not valid YAML.*line 2"),
            ('list.yaml', '- 1\n- 2\n', 'holds a list, not a mapping of sections')]:
        (tmp_path / name).write_text(text)
        with pytest.raises(RecipeError, match=message):
            load_config(str(tmp_path / name), [])
    with pytest.raises(RecipeError, match=r"override 'data.path=\[a' is not valid YAML"):
        load_config(DIGITS, ['data.path=[a'])
    (tmp_path / 'file').write_text('')
    with pytest.raises(RecipeError, match=r"cannot create output_dir '.*file/run' or write in it"):
        recipe.main(['--config', DIGITS, f'output_dir={tmp_path}/file/run'])


def test_auto_settings_are_fast_on_cuda_and_plain_on_the_cpu():
    """train.mixed_precision, channels_last and compile default to auto; an explicit value wins."""
    train = load_config(DIGITS, [])['train']
    assert {k: resolve_auto(train, cuda=False)[k] for k in ('mixed_precision', 'channels_last', 'compile')} == \
        {'mixed_precision': 'no', 'channels_last': False, 'compile': False}
    assert {k: resolve_auto(train, cuda=True)[k] for k in ('mixed_precision', 'channels_last', 'compile')} == \
        {'mixed_precision': 'bf16', 'channels_last': True, 'compile': 'reduce-overhead'}
    explicit = load_config(DIGITS, ['train.compile=true', 'train.mixed_precision=no'])['train']
    assert resolve_auto(explicit, cuda=True)['compile'] is True
    assert resolve_auto(explicit, cuda=True)['mixed_precision'] == 'no'


def test_a_batch_larger_than_the_data_is_said(tmp_path, capsys):
    recipe.main(['--config', DIGITS, f'output_dir={tmp_path}', 'train.batch_size=5000', 'train.max_steps=1'])
    assert ('note: train.batch_size=5000 is more than the 1294 training images of each process: every epoch is one '
            'step of 1294 images') in capsys.readouterr().out


def test_model_args_override_adds_to_the_config_file():
    # digits.yaml sets model.args {drop_rate: 0.1, pool_type: rms}; one more argument must not drop those two.
    config = load_config(DIGITS, ['model.args.head_init_scale=1e-1', 'model.args.drop_rate=0.2'])
    # YAML 1.1 reads 1e-1 as a string; a model argument that reads as a number becomes one.
    assert config['model']['args'] == {'drop_rate': 0.2, 'pool_type': 'rms', 'head_init_scale': 0.1}


def test_epoch_checkpoints_test_curve_and_step_clock(tmp_path, capsys, monkeypatch):
    plotted, draw = [], recipe.plot_history  # epochs in the plot, each time it is drawn
    monkeypatch.setattr(recipe, 'plot_history',
                        lambda history, *args: plotted.append(len(history)) or draw(history, *args))
    monkeypatch.setattr(recipe, 'PLOT_INTERVAL_S', 3600.0)  # the 60 s default, and a slow machine can't reach it
    results = recipe.main(['--config', DIGITS, f'output_dir={tmp_path}', 'train.epochs=3', 'train.checkpoint_epochs=2',
                           'train.test_every_epoch=true'])
    # 21 steps per epoch: a checkpoint after epoch 2 and, as the last epoch always saves, after epoch 3; not after 1.
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['step_00000042', 'step_00000063']
    # The epoch-2 checkpoint comes before the plot's interval is up: one plot, at the end, of all three epochs.
    assert plotted == [3] and (tmp_path / 'block_accuracy.png').stat().st_size > 0
    history = results['history']
    assert [h['epoch'] for h in history] == [0, 1, 2]
    assert all(0 <= h['test_fusion_acc'] <= 1 and len(h['test_block_acc']) == 4 for h in history)
    step_times = [h['step_time_s'] for h in history]
    assert 0 < step_times[0] < step_times[1] < step_times[2] == pytest.approx(results['step_time_s'], abs=0.01)
    assert all(h['step_time_s'] < h['time_s'] for h in history)  # evaluation and checkpoints are not step time
    assert json.loads((tmp_path / 'results.json').read_text())['history'] == history
    # Each epoch's log line has what a run cut off mid-way (a timed-out GPU call) must still report.
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith('epoch ')]
    for h, line in zip(history, lines, strict=True):
        assert f"| test fusion {100 * h['test_fusion_acc']:.2f}% |" in line
        assert line.endswith(f"| so far {h['step_time_s']:.1f} s in training steps, {h['time_s']:.1f} s in all")
    assert f"run: {results['command']} | commit {results['commit']} | {results['hardware']}" in out.splitlines()
    # So bench/accuracy_report.py reads off the log what it reads off results.json, but the final test.
    log = tmp_path / 'train.log'
    log.write_text(out)
    from_log, from_json = summarise(log), summarise(tmp_path / 'results.json')
    for key in ('dataset', 'batch_size', 'lr', 'epochs', 'commit', 'hardware', 'command', 'val_fusion_by_epoch',
                'test_fusion_by_epoch', 'time_to_target'):
        assert from_log[key] == from_json[key], key
    assert from_log['step_time_s'] == pytest.approx(from_json['step_time_s'], abs=0.051)  # logged to 0.1 s
    assert from_log['test_accuracy'] is None and from_json['test_accuracy']['fusion'] > 0


def test_profile_steps_writes_where_the_time_goes_without_changing_training(tmp_path, capsys):
    args = ['--config', DIGITS, 'train.epochs=2']
    plain = recipe.main(args + [f'output_dir={tmp_path / "plain"}'])
    profiled = recipe.main(args + [f'output_dir={tmp_path / "profiled"}', 'train.profile_steps=3'])
    assert [h['val_block_acc'] for h in profiled['history']] == [h['val_block_acc'] for h in plain['history']]
    assert not (tmp_path / 'plain' / 'profile.txt').exists()
    profile = (tmp_path / 'profiled' / 'profile.txt').read_text()
    assert profile.startswith('3 training steps;') and 'sorted by self_cpu_time_total:' in profile
    assert 'aten::convolution' in profile and 'Optimizer.step' in profile  # the whole step: forward, backward, AdamW
    with pytest.raises(RecipeError, match='train.profile_steps=-1 must be a whole number'):
        recipe.main(args + [f'output_dir={tmp_path / "bad"}', 'train.profile_steps=-1'])
    # A run of one epoch (of the two scheduled) profiles its last steps; one too short for any says so.
    recipe.main(args + [f'output_dir={tmp_path / "one"}', 'train.profile_steps=4', 'train.stop_after_epochs=1'])
    assert (tmp_path / 'one' / 'profile.txt').read_text().startswith('4 training steps;')
    capsys.readouterr()
    recipe.main(args + [f'output_dir={tmp_path / "short"}', 'train.profile_steps=4', 'train.max_steps=1'])
    assert 'train.profile_steps=4: no steps left to profile in this run' in capsys.readouterr().out
    assert not (tmp_path / 'short' / 'profile.txt').exists()


def test_resume_into_another_model_stops_with_a_message(tmp_path):
    args = ['--config', DIGITS, f'output_dir={tmp_path}', 'train.max_steps=2']
    recipe.main(args)
    with pytest.raises(RecipeError, match=r"(?s)cannot resume from .*step_00000002: it does not fit this run.s model.*"
                                         r"new output_dir"):
        recipe.main(args + ['model.args.fusion_start=2', '--resume'])


def _flip_middle_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


@pytest.mark.parametrize('name, damage', [
    ('model.safetensors', _flip_middle_byte), ('optimizer.bin', lambda b: b[:len(b) // 2]),
    ('custom_checkpoint_1.pkl', 'custom_checkpoint_0.pkl'), ('random_states_0.pkl', None),
    ('best/config.json', lambda b: b[:10]), ('manifest.json', None),
])
def test_resume_from_a_corrupt_checkpoint_stops_with_a_message(tmp_path, name, damage):
    """A bit flip, a cut-short, swapped or missing checkpoint file is named (the manifest), nothing is unpickled."""
    args = ['--config', DIGITS, f'output_dir={tmp_path}', 'train.max_steps=2']
    recipe.main(args)
    path = tmp_path / 'checkpoints' / 'step_00000002' / name
    if damage is None:
        path.unlink()
    else:  # another file's bytes (a swap), or these bytes damaged
        path.write_bytes((path.parent / damage).read_bytes() if isinstance(damage, str) else damage(path.read_bytes()))
    damaged = path.read_bytes() if damage else None
    with pytest.raises(RecipeError, match=rf'step_00000002: the checkpoint is corrupt or incomplete \({name}: '
                                         rf'(missing|changed since it was saved)\)') as err:
        recipe.main(args + ['--resume'])
    assert 'weights_only' not in str(err.value)  # torch's advice to unpickle anyway is not passed on
    assert path.exists() is bool(damage) and (not damage or path.read_bytes() == damaged)  # left as it was


def test_resume_names_and_fresh_runs_into_a_used_output_dir(tmp_path, capsys):
    """--resume takes the latest checkpoint, a step folder or a run folder; a fresh run never mixes into old ones."""
    args = ['--config', DIGITS, f'output_dir={tmp_path / "run"}', 'train.max_steps=2']
    recipe.main(args)
    with pytest.raises(RecipeError, match=r'run holds checkpoints of an earlier run \(step_00000002\); continue it '
                                         r'with --resume, or train into a new output_dir'):
        recipe.main(args)
    # `--resume key=value`: the override after the flag is an override, not a checkpoint path.
    resumed = recipe.main(args + ['--resume', 'train.max_steps=3'])
    assert resumed['steps'] == 3 and 'resumed from' in capsys.readouterr().out
    step = tmp_path / 'run' / 'checkpoints' / 'step_00000003'
    assert recipe.main(args[:-1] + ['train.max_steps=4', '--resume', str(step)])['steps'] == 4
    other = ['--config', DIGITS, f'output_dir={tmp_path / "other"}', 'train.max_steps=4']
    with pytest.raises(RecipeError, match=r'step_00000003 is not a checkpoint of output_dir .*other.*pass '
                                         r'output_dir=.*run$'):
        recipe.main(other + ['--resume', str(step)])
    for path in (tmp_path / 'nowhere', tmp_path / 'run'):
        with pytest.raises(RecipeError, match=r'is not a checkpoint \(a folder holding model.safetensors.*--resume '
                                             r'alone'):
            recipe.main(other + ['--resume', str(path)])
    with pytest.raises(RecipeError, match='--resume found no checkpoint in .*empty.checkpoints; train without'):
        recipe.main(['--config', DIGITS, f'output_dir={tmp_path / "empty"}', '--resume'])


def test_a_run_holds_its_output_dir(tmp_path):
    """A second run, or a --resume, on the folder of a live run is refused; the folder is free again after it."""
    args = ['--config', DIGITS, f'output_dir={tmp_path}', 'train.max_steps=2']
    with hold_output_dir(tmp_path):  # a live run (in another process, the lock is the same)
        for extra in ([], ['--resume']):
            with pytest.raises(RecipeError, match='in use by another run'):
                recipe.main(args + extra)
        assert not (tmp_path / 'checkpoints').exists()
    assert recipe.main(args)['steps'] == 2


def test_a_full_disk_while_checkpointing_keeps_the_earlier_checkpoints(tmp_path, monkeypatch):
    args = ['--config', DIGITS, f'output_dir={tmp_path}', 'train.max_steps=2']
    recipe.main(args)
    save_state = recipe.Accelerator.save_state

    def fill_the_disk(self, output_dir=None, **kwargs):
        save_state(self, output_dir, **kwargs)  # writes most of the files, then the disk is full
        raise RuntimeError('[enforce fail at inline_container.cc:626] . unexpected pos; No space left on device')

    monkeypatch.setattr(recipe.Accelerator, 'save_state', fill_the_disk)
    with pytest.raises(RecipeError, match=r'no space left on .*checkpoints/step_00000003 .*earlier checkpoints '
                                         r'are kept'):
        recipe.main(args[:-1] + ['train.max_steps=3', '--resume'])
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['step_00000002']  # no partial folder
    monkeypatch.undo()
    assert recipe.main(args[:-1] + ['train.max_steps=3', '--resume'])['steps'] == 3


def test_a_full_disk_at_the_export_is_one_message_and_a_resume_finishes(tmp_path, monkeypatch):
    from timm_asge.recipe import results
    args = ['--config', DIGITS, f'output_dir={tmp_path}', 'train.max_steps=2']
    save = results.save_pretrained

    def full_at_export(model, directory, **kwargs):
        if Path(directory).name == 'export':
            raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                               'space left on device" }) os error 28')
        return save(model, directory, **kwargs)

    monkeypatch.setattr(results, 'save_pretrained', full_at_export)
    with pytest.raises(RecipeError, match=r'no space left on .*earlier checkpoints are kept.*then --resume'):
        recipe.main(args)
    assert not (tmp_path / 'export').exists() and not (tmp_path / 'results.json').exists()
    monkeypatch.undo()
    assert recipe.main(args + ['--resume'])['steps'] == 2 and (tmp_path / 'export' / 'model.safetensors').is_file()


def test_stop_after_epochs_keeps_the_full_schedule_and_resumes_it(tmp_path):
    """The first N epochs of a longer recipe train exactly as the full run's first N; --resume finishes the run."""
    args = ['--config', DIGITS, 'train.epochs=3']
    full = recipe.main(args + [f'output_dir={tmp_path / "full"}', 'train.keep_checkpoints=3'])
    first = recipe.main(args + [f'output_dir={tmp_path / "part"}', 'train.stop_after_epochs=1'])
    assert first['epochs'] == 1 and [h['epoch'] for h in first['history']] == [0]
    # A schedule squeezed into one epoch would already differ here (lr 2e-3 -> 1e-5 instead of the first third).
    assert first['history'][0]['train_fusion_acc'] == full['history'][0]['train_fusion_acc'] > 0
    assert first['history'][0]['val_block_acc'] == full['history'][0]['val_block_acc']
    rest = recipe.main(args + [f'output_dir={tmp_path / "part"}', '--resume', 'latest'])
    assert [h['epoch'] for h in rest['history']] == [0, 1, 2]
    for got, want in zip(rest['history'], full['history']):
        assert got['train_fusion_acc'] == want['train_fusion_acc']
        assert got['val_block_acc'] == want['val_block_acc']
    assert rest['test_accuracy'] == full['test_accuracy']

    # Resumed from the checkpoint of epoch 2 with nothing left to train, the run ends with the best model of its own
    # two epochs, which that checkpoint kept, not with the full run's epoch-3 weights left in best/.
    assert full['best_epoch'] == 3
    best_of_two = load_file(str(tmp_path / 'full' / 'checkpoints' / 'step_00000042' / 'best' / 'model.safetensors'))
    again = recipe.main(args + [f'output_dir={tmp_path / "full"}', 'train.stop_after_epochs=2', '--resume',
                                str(tmp_path / 'full' / 'checkpoints' / 'step_00000042')])
    assert again['best_epoch'] == 2 and again['history'] == full['history'][:2]
    restored = load_file(str(tmp_path / 'full' / 'best' / 'model.safetensors'))
    assert restored.keys() == best_of_two.keys() and all(torch.equal(restored[k], best_of_two[k]) for k in restored)
    assert again['test_accuracy'] != full['test_accuracy']


def test_resume_refuses_to_delete_a_foreign_file_in_best(tmp_path):
    args = ['--config', DIGITS, f'output_dir={tmp_path}', 'train.max_steps=2']
    recipe.main(args)
    (tmp_path / 'best' / 'notes.txt').write_text('mine')
    with pytest.raises(RecipeError, match=r'best holds notes.txt, which resuming would delete'):
        recipe.main(args[:-1] + ['train.max_steps=3', '--resume'])
    assert (tmp_path / 'best' / 'notes.txt').read_text() == 'mine'


def test_cosine_schedule_is_the_authors_per_epoch_cosine_for_every_group():
    """Per epoch: each group's rate is the authors' CosineAnnealingLR(T_max=epochs) stepped at epoch ends; the
    read-out bias group stays at K times the blocks' rate to the end (the sum of their K biases, floor included)."""
    model = timm.create_model('asge_cnn_tiny')
    lr, min_lr, steps_per_epoch, epochs = 2e-3, 1e-5, 5, 4
    optimizer = torch.optim.AdamW(param_groups(model, lr))
    fused_blocks = len(model.stages) - model.fusion_start
    authors = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr)
    authors_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(authors, T_max=epochs, eta_min=min_lr)
    schedule = cosine_schedule(optimizer, lr, min_lr, steps_per_epoch * epochs, steps_per_epoch, False)
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            rates = {g['name']: g['lr'] for g in optimizer.param_groups}
            assert rates['stages.0'] == rates['head'] == pytest.approx(authors.param_groups[0]['lr'], rel=1e-12)
            assert rates['head.bias'] == pytest.approx(fused_blocks * rates['head'], rel=1e-12)
            optimizer.step()
            schedule.step()
        authors.step()
        authors_schedule.step()
    # After every step instead: torch's CosineAnnealingLR over all steps.
    optimizer = torch.optim.AdamW(param_groups(model, lr))
    reference = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr)
    reference_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=20, eta_min=min_lr)
    schedule = cosine_schedule(optimizer, lr, min_lr, 20, steps_per_epoch, True)
    for _ in range(20):
        optimizer.step(), schedule.step(), reference.step(), reference_schedule.step()
        assert optimizer.param_groups[0]['lr'] == pytest.approx(reference.param_groups[0]['lr'], rel=1e-9)
    assert optimizer.param_groups[-1]['lr'] == pytest.approx(fused_blocks * min_lr, rel=1e-9)


def test_sched_on_updates_false_holds_the_rate_for_each_epoch(tmp_path):
    recipe.main(['--config', DIGITS, f'output_dir={tmp_path}', 'train.epochs=2', 'train.log_every=1',
                 'train.sched_on_updates=false'])
    # Logged after each step: the rate of the next one. 21 steps per epoch; the rate moves once, after step 21.
    rates = [entry['lr'] for line in (tmp_path / 'log.jsonl').read_text().splitlines()
             if 'lr' in (entry := json.loads(line))]
    assert rates[:20] == [pytest.approx(2e-3)] * 20
    assert rates[20:41] == [pytest.approx(1e-5 + (2e-3 - 1e-5) / 2)] * 21


def test_results_record_the_commit_the_run_started_from(tmp_path, monkeypatch):
    """A long run records the checkout it started from, not where HEAD has moved by the end."""
    heads = iter(['started-here', 'moved-on'])
    monkeypatch.setattr(recipe, 'git_commit', lambda: next(heads))
    results = recipe.main(['--config', DIGITS, f'output_dir={tmp_path}', 'train.epochs=1', 'train.max_steps=2'])
    assert results['commit'] == 'started-here'
    assert json.loads((tmp_path / 'results.json').read_text())['commit'] == 'started-here'


def test_compiled_channels_last_training_matches_eager(tmp_path):
    """``train.compile`` (torch.compile through accelerate) with channels_last trains the eager step's weights.

    The aot_eager backend traces the step as inductor does, without generating C++ (a minute on a cold cache here);
    test_compile.py checks inductor's kernels on the same step."""
    common = ['--config', DIGITS, 'train.epochs=1', 'train.max_steps=4', 'model.args.drop_rate=0.0']
    recipe.main(common + [f'output_dir={tmp_path / "eager"}'])
    proc = run_recipe(*common, f'output_dir={tmp_path / "compiled"}', 'train.compile=true', 'train.channels_last=true',
                      'train.compile_backend=aot_eager', timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    eager = load_file(tmp_path / 'eager' / 'export' / 'model.safetensors')
    compiled = load_file(tmp_path / 'compiled' / 'export' / 'model.safetensors')
    assert eager.keys() == compiled.keys()
    # AdamW turns float rounding in tiny gradients into differences far below one step (lr 2e-3).
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-3, atol=1e-4, msg=lambda m: f'{key}: {m}')


def test_cudagraph_fallbacks_are_counted_only_where_cuda_graphs_were_asked_for(monkeypatch):
    """Inductor's silent fall-back from CUDA graphs shows up in the log and results.json (see cudagraph_skips)."""
    import torch._dynamo.utils
    monkeypatch.setitem(torch._dynamo.utils.counters['inductor'], 'cudagraph_skips', 3)
    cuda = torch.device('cuda')  # only its type is read: no GPU needed
    assert cudagraph_skips(cuda, 'reduce-overhead') == 3
    assert cudagraph_skips(cuda, 'max-autotune') == 3
    for mode in (False, True, 'default', 'max-autotune-no-cudagraphs'):
        assert cudagraph_skips(cuda, mode) is None, mode
    assert cudagraph_skips(torch.device('cpu'), 'reduce-overhead') is None  # no CUDA graphs on the CPU


def test_dataset_errors(tmp_path):
    import datasets
    import numpy as np

    images = [np.full((8, 8), i, dtype=np.uint8) for i in range(20)]
    ds = datasets.Dataset.from_dict({'picture': images, 'digit': [i % 3 for i in range(20)]},
                                    features=datasets.Features({'picture': datasets.Image(),
                                                                'digit': datasets.Value('int64')}))
    folder = tmp_path / 'toy'
    for split in ('train', 'test'):
        ds.to_parquet(str(folder / f'{split}-00000-of-00001.parquet'))
    with pytest.raises(RecipeError, match=r"no ClassLabel column \(columns: \['picture', 'digit'\]\); set "
                                         r"data.label_column"):
        recipe.main(['--config', DIGITS, f'output_dir={tmp_path}/o', f'data.path={folder}'])
    with pytest.raises(RecipeError, match=r"no label column 'label'.*columns: \['picture', 'digit'\]"):
        recipe.main(['--config', DIGITS, f'output_dir={tmp_path}/o', f'data.path={folder}', 'data.label_column=label'])
    with pytest.raises(RecipeError, match=r"has no split 'validation'; it has \['test', 'train'\]. Set "
                                         r"data.train_split / data.test_split in the config"):
        recipe.main(['--config', DIGITS, f'output_dir={tmp_path}/o', f'data.path={folder}',
                     'data.label_column=digit', 'data.test_split=validation'])
    with pytest.raises(RecipeError, match="folder './does/not/exist' does not exist"):
        recipe.main(['--config', DIGITS, f'output_dir={tmp_path}/o', 'data.path=./does/not/exist'])
    # A column setting naming the wrong kind of column says which columns would do.
    with pytest.raises(RecipeError, match=r"data.image_column='digit' holds Value.*not images.*\['picture'\]"):
        recipe.main(['--config', DIGITS, f'output_dir={tmp_path}/o', f'data.path={folder}',
                     'data.label_column=digit', 'data.image_column=digit'])
    with pytest.raises(RecipeError, match=r"data.label_column='picture' holds Image.*not integer class labels.*"
                                         r"\['digit'\]"):
        recipe.main(['--config', DIGITS, f'output_dir={tmp_path}/o', f'data.path={folder}',
                     'data.label_column=picture'])
    # Integer labels (no ClassLabel) name their classes '0'..'K-1', held in memory or streamed alike.
    for in_memory in ('true', 'false'):
        results = recipe.main(['--config', DIGITS, f'output_dir={tmp_path}/{in_memory}', f'data.path={folder}',
                               'data.label_column=digit', 'data.val_size=5', f'data.in_memory={in_memory}',
                               'data.num_workers=0', 'train.batch_size=8', 'train.max_steps=1'])
        assert results['dataset']['label_names'] == ['0', '1', '2'], in_memory
    with pytest.raises(RecipeError, match=r"training split's 15 images make no full batch of train.batch_size=64"):
        recipe.main(['--config', DIGITS, f'output_dir={tmp_path}/o', f'data.path={folder}', 'data.label_column=digit',
                     'data.val_size=5', 'data.in_memory=false', 'data.num_workers=0'])
    # A test split with a class the training split lacks (integer labels 0-3 against 0-2) is refused.
    ds.map(lambda row, i: {'digit': i % 4}, with_indices=True).to_parquet(str(folder / 'test-00000-of-00001.parquet'))
    with pytest.raises(RecipeError, match=r"test split's classes \(4: .*train split \(3: .*same classes"):
        recipe.main(['--config', DIGITS, f'output_dir={tmp_path}/o', f'data.path={folder}', 'data.label_column=digit'])


@pytest.mark.parametrize('bad', ['cut', 'null'])
def test_streamed_data_names_an_unreadable_image(tmp_path, bad):
    """In DataLoader workers too, a cut-short or null image stops the run with one line naming it."""
    import io

    import datasets
    import numpy as np
    from PIL import Image
    jpeg = io.BytesIO()
    Image.fromarray(np.full((16, 16), 90, dtype=np.uint8)).save(jpeg, format='JPEG')
    images = [{'bytes': jpeg.getvalue(), 'path': f'{i}.jpg'} for i in range(24)]
    images[5] = {'bytes': jpeg.getvalue()[:60], 'path': 'bad.jpg'} if bad == 'cut' else None
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=['a', 'b'])})
    ds = datasets.Dataset.from_dict({'image': images, 'label': [i % 2 for i in range(24)]}, features=features)
    for split in ('train', 'test'):
        ds.to_parquet(str(tmp_path / 'data' / f'{split}-00000-of-00001.parquet'))
    where = 'image bad.jpg' if bad == 'cut' else 'the image of row'
    with pytest.raises(RecipeError, match=rf"^{where}.* in split '(train|test)' cannot be read \(.*\); fix or remove"):
        recipe.main(['--config', DIGITS, f'output_dir={tmp_path / "out"}', f'data.path={tmp_path / "data"}',
                     'data.in_memory=false', 'data.num_workers=2', 'data.val_size=4', 'train.batch_size=4'])


def test_unreachable_hub_id_says_how_to_pass_a_local_path(tmp_path):
    proc = run_recipe('--config', DIGITS, f'output_dir={tmp_path}', 'data.source=ylecun/mnist',
                      env={'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'hf')},
                      timeout=300)
    assert proc.returncode != 0
    assert "could not load dataset 'ylecun/mnist'" in proc.stderr
    assert 'data.path=/path/to/folder' in proc.stderr


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    forward = recipe.LocalLearner.forward
    calls = {'n': 0}

    def poisoned(self, images, labels):
        out = forward(self, images, labels)
        calls['n'] += 1
        if calls['n'] == 13:
            out['block_losses'] = out['block_losses'].clone()
            out['block_losses'][2] = float('nan')
        return out

    monkeypatch.setattr(recipe.LocalLearner, 'forward', poisoned)
    with pytest.raises(RecipeError, match=r'non-finite loss in block 3 at step 13.*last good checkpoint .*step_0+10'):
        recipe.main(['--config', DIGITS, f'output_dir={tmp_path}', 'train.checkpoint_every=5', 'train.log_every=5',
                     'train.epochs=2'])
    checkpoints = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
    assert checkpoints == ['step_00000005', 'step_00000010']
    weights = load_file(str(tmp_path / 'checkpoints' / 'step_00000010' / 'model.safetensors'))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_kill_and_resume_matches_uninterrupted_run(tmp_path, capsys):
    """A run killed (SIGKILL) after its first step checkpoint and resumed ends with the uninterrupted run's weights.

    Only the killed run needs a process of its own; the other two run in this one (each process start imports timm
    and torch, about 8 s here)."""
    args = ['--config', DIGITS, 'train.epochs=2', 'train.checkpoint_every=7', 'train.keep_checkpoints=100']
    recipe.main([*args, f'output_dir={tmp_path / "full"}'])

    out = tmp_path / 'killed'
    proc = subprocess.Popen([sys.executable, str(ROOT / 'recipes' / 'train.py'), *args, f'output_dir={out}'],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((out / 'checkpoints').glob('step_*')) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / 'results.json').exists(), 'the run finished before it could be killed'
    capsys.readouterr()
    recipe.main([*args, f'output_dir={out}', '--resume'])
    assert 'resumed from' in ''.join(capsys.readouterr())

    for name in ('export/model.safetensors', 'checkpoints/step_00000042/model.safetensors'):
        a, b = load_file(str(tmp_path / 'full' / name)), load_file(str(out / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    full_results = json.loads((tmp_path / 'full' / 'results.json').read_text())
    resumed_results = json.loads((out / 'results.json').read_text())
    assert full_results['test_accuracy'] == resumed_results['test_accuracy']
    # The resumed epoch's training accuracy counts the batches before the kill too; the log never goes back.
    assert [h['train_block_acc'] for h in full_results['history']] == \
        [h['train_block_acc'] for h in resumed_results['history']]
    logged = [json.loads(line).get('step') for line in (out / 'log.jsonl').read_text().splitlines()]
    steps = [step for step in logged if step is not None]
    assert steps == sorted(steps)  # never back to an earlier step



def test_streamed_data_resumes_mid_epoch_with_the_same_crops(tmp_path):
    """DataLoader workers seed each image's crop and flip from (seed, epoch, image), so a run resumed mid-epoch,
    whose batches land on other workers, ends with the uninterrupted run's weights."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20, 20), dtype=np.uint8) for _ in range(48)]
    ds = datasets.Dataset.from_dict({'image': images, 'label': [i % 3 for i in range(48)]},
                                    features=datasets.Features({'image': datasets.Image(),
                                                                'label': datasets.ClassLabel(num_classes=3)}))
    for split in ('train', 'test'):
        ds.to_parquet(str(tmp_path / 'toy' / f'{split}-00000-of-00001.parquet'))
    out = tmp_path / 'run'
    args = ['--config', DIGITS, f'output_dir={out}', f'data.path={tmp_path / "toy"}', 'data.in_memory=false',
            'data.val_size=8', 'data.num_workers=2', 'train.batch_size=8', 'train.epochs=2', 'train.checkpoint_every=3',
            'train.keep_checkpoints=100']
    recipe.main(args)  # 5 steps an epoch: step 3 is mid-way through the first, step 6 through the second
    full = load_file(str(out / 'checkpoints' / 'step_00000010' / 'model.safetensors'))
    for step in ('step_00000003', 'step_00000006'):
        recipe.main(args + ['--resume', str(out / 'checkpoints' / step)])
        resumed = load_file(str(out / 'checkpoints' / 'step_00000010' / 'model.safetensors'))
        assert full.keys() == resumed.keys()
        for key in full:
            assert torch.equal(full[key], resumed[key]), (step, key)


def test_two_cpu_processes_train_in_sync(tmp_path):
    """`accelerate launch` with 2 gloo processes: the ranks end with identical weights.

    Lean mode only: its multi-process path is the recipe's own (all_reduce_gradients over a model prepared for
    evaluation); fused mode is accelerate's plain DDP, which tests/test_distributed.py runs in both modes with the
    recipe's calls, checking that every sample is seen once.
    """
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--main_process_port', str(free_port()), str(ROOT / 'recipes' / 'train.py'), '--config', DIGITS,
           f'output_dir={tmp_path}', 'train.epochs=1', 'train.mode=lean']
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, timeout=600,
                          env={**os.environ, 'ACCELERATE_USE_CPU': '1', 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['num_processes'] == 2
    assert results['command'].startswith('accelerate launch recipes/train.py --config ')
    checksums = results['rank_weight_checksums']
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    # One epoch of 1,294 images over 2 ranks at batch 64: 647 per rank, 11 steps each.
    assert results['steps'] == 11


@pytest.mark.shared_data
def test_fashion_mnist_config_improves_on_the_cpu(tmp_path):
    """The FashionMNIST recipe on the exact offline copy, with a short CPU budget (narrow VGG8, 120 steps).

    Seeds 0-2 reach 50-55% fusion test accuracy against about 10% untrained."""
    path = shared_dataset('fashion_mnist')
    widths = [16, 32, 32, 64, 64, 64, 64]
    # Evaluation (30,000 images) costs as much as training here; CPUs run this net 1.5x faster at batch 250 than 2000.
    results = recipe.main([
        '--config', str(ROOT / 'recipes' / 'configs' / 'fashion_mnist.yaml'), f'output_dir={tmp_path}',
        f'data.path={path}', 'train.cpu=true', 'train.max_steps=120', 'train.batch_size=64', 'train.lr=5e-3',
        f'model.args.widths={widths}', 'train.eval_batch_size=250', 'train.log_every=50'])
    assert results['dataset']['splits'] == {'train': 50000, 'validation': 10000, 'test': 10000}
    assert results['dataset']['label_names'][0] == 'T - shirt / top'

    # The same network untrained, on the first 2,000 test images (about 200 a class): training must lift every
    # strategy far above it.
    torch.manual_seed(0)
    untrained = timm.create_model('asge_cnn', widths=widths, in_chans=1, pool_type='avg').eval()
    test = load_tensors(str(path), 'test', 32, 1)
    images, labels = test.images[:2000], test.labels[:2000]
    with torch.no_grad():
        predictions = torch.cat([untrained(to_model_input(batch)).argmax(1) for batch in images.split(250)])
    before = (predictions == labels).double().mean().item()
    assert before < 0.25
    assert results['val_accuracy']['fusion'] > before + 0.25, (before, results['val_accuracy'])
    for strategy, accuracy in results['test_accuracy'].items():
        assert accuracy > before + 0.25, (strategy, before, results['test_accuracy'])


@pytest.mark.shared_data
def test_imagenet_config_streams_imagenette_through_dataloader_workers(tmp_path):
    """The ImageNet recipe's DataLoader path (workers decode and augment) on real Imagenette images, tiny budget."""
    path = shared_dataset('imagenette')
    results = recipe.main([
        '--config', str(ROOT / 'recipes' / 'configs' / 'imagenet.yaml'), f'output_dir={tmp_path}', f'data.path={path}',
        'train.cpu=true', 'train.mixed_precision=no', 'train.channels_last=false', 'data.img_size=64',
        'data.num_workers=2', 'data.val_size=200', 'train.max_steps=3', 'train.batch_size=16', 'train.log_every=1',
        'train.eval_batch_size=256', 'model.args.widths=[8, 8, 16, 16, 32, 32, 32, 32]'])
    assert results['dataset']['num_classes'] == 10
    assert results['dataset']['splits'] == {'train': 9269, 'validation': 200, 'test': 3925}
    assert results['steps'] == 3
    model = timm.create_model(f'local-dir:{tmp_path / "export"}', pretrained=True)
    assert model.num_classes == 10 and model.pretrained_cfg['label_names'][0] == 'tench'
    tested = validate.main(['--model', f'local-dir:{tmp_path / "export"}', '--config', str(ROOT / 'recipes' / 'configs'
                            / 'imagenet.yaml'), f'data.path={path}', 'train.cpu=true', 'train.mixed_precision=no',
                            'data.img_size=64', 'data.num_workers=2', 'train.eval_batch_size=256'])
    assert tested['dataset']['split'] == 'validation' and tested['dataset']['images'] == 3925
    assert tested['test_accuracy'] == results['test_accuracy']  # the same streamed batches as the run's own test


def test_epoch_summary_is_printed_above_the_progress_bar(tmp_path, monkeypatch):
    """On a terminal the bar (stderr) and the summary (stdout) share a line: the summary must start a fresh one."""
    import io
    screen = io.StringIO()
    monkeypatch.setattr(sys, 'stdout', screen)
    monkeypatch.setattr(sys, 'stderr', screen)
    recipe.main(['--config', DIGITS, f'output_dir={tmp_path}', 'train.max_steps=2'])
    segments = screen.getvalue().replace('\r', '\n').splitlines()
    assert any(s.startswith('epoch 1: val acc per block') for s in segments), screen.getvalue()[-2000:]
    assert not any('it/s' in s and 'epoch 1: val acc' in s for s in segments)


def test_a_config_error_under_accelerate_launch_is_one_line(tmp_path):
    """The shipped launcher config passes every value (no "values were not passed" warning); -q keeps accelerate's
    traceback out, so the recipe's own message is all the user sees."""
    proc = subprocess.run(
        [sys.executable, '-m', 'accelerate.commands.launch', '-q', '--config_file', 'recipes/accelerate.yaml',
         'recipes/train.py', '--config', DIGITS, f'output_dir={tmp_path}', 'train.epoch=3'],
        cwd=ROOT, text=True, capture_output=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["error: unknown config key 'train.epoch' in the command line; did you "
                                                "mean 'train.epochs'?"], proc.stderr
    assert 'were not passed' not in proc.stdout + proc.stderr


def test_backprop_baseline_is_recorded_and_trains_the_first_block_otherwise(tmp_path):
    """train.mode=backprop (end-to-end gradients) moves block 1's weights away from fused mode's local learning."""
    model = timm.create_model('asge_cnn_tiny', in_chans=1)
    try:
        recipe.LocalLearner(model, 'backprop')
    except ValueError:
        pytest.skip('the engine has no backprop mode yet')
    common = ['--config', DIGITS, 'train.max_steps=3', 'model.args.drop_rate=0.0']
    fused = recipe.main(common + [f'output_dir={tmp_path / "fused"}'])
    backprop = recipe.main(common + [f'output_dir={tmp_path / "backprop"}', 'train.mode=backprop'])
    assert (fused['mode'], backprop['mode']) == ('fused', 'backprop')
    a = load_file(str(tmp_path / 'fused' / 'export' / 'model.safetensors'))
    b = load_file(str(tmp_path / 'backprop' / 'export' / 'model.safetensors'))
    untrained = model.state_dict()
    first = next(k for k in a if k.startswith('stages.0') and k.endswith('weight'))
    assert not torch.equal(a[first], b[first])
    assert not torch.equal(b[first], untrained[first])  # it trained at all
