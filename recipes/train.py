#!/usr/bin/env python
"""Train an ASGE model layer-locally with accelerate: one CPU, one GPU or many.

    python recipes/train.py --config recipes/configs/digits.yaml [key=value ...]
    accelerate launch -q --config_file recipes/accelerate.yaml recipes/train.py --config recipes/configs/mnist.yaml
    python recipes/train.py --config recipes/configs/digits.yaml --resume          # continue the latest checkpoint

Every block learns from its own loss (``timm_asge.engine.LocalLearner``); one AdamW with a param group per block. The
output folder gets ``results.json`` (test accuracy, parameters, FLOPs and activation memory of each prediction
strategy), ``block_accuracy.png``, ``log.jsonl``, resumable ``checkpoints/`` and ``export/``: the best-validation model
in timm's Hub format, loadable with ``timm.create_model('local-dir:<output>/export', pretrained=True)``.
"""
import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, TorchDynamoPlugin, set_seed
from tqdm.auto import tqdm

from timm_asge.engine import LocalLearner, param_groups
from timm_asge.recipe import (
    Checkpoints, JsonlTracker, RecipeData, RecipeError, TrainState, accuracy_on, build_model, cosine_schedule,
    cudagraph_skips, describe_hardware, finish, git_commit, hold_output_dir, load_config, plot_history, resolve_auto,
    rewind_log, run_command, save_best, start_profiler, strategy_metric, train_one_epoch,
)

PLOT_INTERVAL_S = 60.0  # a plot takes as long as a digits epoch on a CPU: mid-run, at most one a minute


def _parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', help='YAML config (recipes/configs/<benchmark>.yaml)')
    parser.add_argument('--resume', nargs='?', const='latest', help='continue the latest checkpoint, or the one given')
    parser.add_argument('overrides', nargs='*', help='config overrides, e.g. train.epochs=5 data.path=/data/mnist')
    args = parser.parse_args(argv)
    if args.resume and '=' in args.resume and not Path(args.resume).exists():  # `--resume train.epochs=3`
        args.overrides.append(args.resume)
        args.resume = 'latest'
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse_args(argv)
    config = load_config(args.config, args.overrides)
    run = {'config_file': args.config, 'command': run_command(argv, 'recipes/train.py'), 'commit': git_commit()}
    cfg = config['train'] = resolve_auto(config['train'], cuda=not config['train']['cpu'] and torch.cuda.is_available())
    out = Path(config['output_dir'] or Path('outputs') / config['name'])
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # a folder that exists may still refuse files
    except OSError as err:
        raise RecipeError(f'cannot create output_dir {str(out)!r} or write in it ({err.strerror}); pass a writable '
                          f'output_dir=<folder>') from None

    # A mode (reduce-overhead, ...) belongs to the inductor backend; another backend compiles with its own defaults.
    mode = cfg['compile'] if isinstance(cfg['compile'], str) and cfg['compile_backend'] == 'inductor' else None
    accelerator = Accelerator(
        cpu=cfg['cpu'], mixed_precision=cfg['mixed_precision'], project_dir=str(out),
        log_with=[JsonlTracker(out / 'log.jsonl')] + (['tensorboard'] if cfg['tensorboard'] else []),
        dynamo_plugin=TorchDynamoPlugin(backend=cfg['compile_backend'], mode=mode) if cfg['compile'] else None,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    with hold_output_dir(out, holder=accelerator.is_main_process):
        return train(args, config, run, out, accelerator)


def train(args: argparse.Namespace, config: Dict[str, Any], run: Dict[str, Any], out: Path,
          accelerator: Accelerator) -> Dict[str, Any]:
    """Build, resume, train epoch by epoch, finish: the run ``main`` set up, in the output folder it holds."""
    cfg = config['train']
    checkpoints = Checkpoints(accelerator, out, cfg['keep_checkpoints'])
    resume_from = checkpoints.find(args.resume) if args.resume else None
    if resume_from is None and checkpoints.last is not None:  # a fresh run would mix its checkpoints into these
        raise RecipeError(f'{out} holds checkpoints of an earlier run ({checkpoints.last.name}); continue it with '
                          f'--resume, or train into a new output_dir=<folder>')
    set_seed(cfg['seed'])
    data = RecipeData(config, accelerator)
    model = build_model(config, data.num_classes)
    if cfg['channels_last']:
        model = model.to(memory_format=torch.channels_last)
    engine = LocalLearner(model, cfg['mode'])
    optimizer = torch.optim.AdamW(param_groups(model, cfg['lr'], cfg['weight_decay']),
                                  fused=accelerator.device.type == 'cuda')
    steps_per_epoch = data.steps_per_epoch()
    total_steps = min(steps_per_epoch * cfg['epochs'], cfg['max_steps'] or math.inf)
    # Stepped once per optimizer step (a prepared scheduler would step once per process).
    scheduler = cosine_schedule(optimizer, cfg['lr'], cfg['min_lr'], total_steps, steps_per_epoch,
                                cfg['sched_on_updates'])
    if cfg['mode'] == 'lean' and accelerator.num_processes > 1:  # lean mode all-reduces its gradients itself
        engine, optimizer = accelerator.prepare_model(engine, evaluation_mode=True), accelerator.prepare(optimizer)
    else:
        engine, optimizer = accelerator.prepare(engine, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    if resume_from is not None:
        checkpoints.resume(resume_from)
        if accelerator.is_main_process:
            rewind_log(out / 'log.jsonl', state.step)
        accelerator.print(f'resumed from {resume_from}: epoch {state.epoch + 1}, batch {state.batch}, '
                          f'step {state.step}')
    accelerator.init_trackers('tensorboard', config=_flatten(config))
    accelerator.print(f"run: {run['command']} | commit {run['commit']} | {describe_hardware(accelerator)}")
    accelerator.print(
        f"training {config['model']['name']} ({sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{len(model.stages)} blocks) on {data.sizes['train']} images ({data.sizes['validation']} validation, "
        f"{data.sizes['test']} test), {accelerator.num_processes} process(es) on {accelerator.device}, {cfg['mode']} "
        f"mode" + (f'; TensorBoard logs in {out / "tensorboard"}' if cfg['tensorboard'] else ''))

    end_epoch = min(cfg['epochs'], cfg['stop_after_epochs'] or cfg['epochs'])
    profiler = None
    if cfg['profile_steps'] and accelerator.is_main_process:
        profiler = start_profiler(cfg['profile_steps'], min(total_steps, end_epoch * steps_per_epoch), steps_per_epoch,
                                  state.step, accelerator.device, out / 'profile.txt')
        if profiler is None:
            accelerator.print(f"train.profile_steps={cfg['profile_steps']}: no steps left to profile in this run")
    start, plotted_at = time.perf_counter() - state.train_time, time.perf_counter()
    skips_before = cudagraph_skips(accelerator.device, cfg['compile']) or 0
    # `disable` only where it must be set, so TQDM_DISABLE=1 can silence the bar in logs.
    with tqdm(total=total_steps, initial=state.step, desc='train', dynamic_ncols=True,
              **({} if accelerator.is_local_main_process else {'disable': True})) as progress:
        while state.epoch < end_epoch and state.step < total_steps:
            engine.train()
            train_acc = train_one_epoch(accelerator, engine, optimizer, scheduler, data, state, checkpoints, cfg,
                                        total_steps, progress, profiler)
            val_acc = accuracy_on(accelerator, model, data.eval_batches('validation'))
            record = {'epoch': state.epoch, 'step': state.step, 'train_block_acc': train_acc[:-1].tolist(),
                      'train_fusion_acc': train_acc[-1].item(), 'val_block_acc': val_acc[:-1].tolist(),
                      'val_fusion_acc': val_acc[-1].item(), 'step_time_s': state.step_time,
                      'time_s': time.perf_counter() - start}
            if cfg['test_every_epoch']:
                test_acc = accuracy_on(accelerator, model, data.eval_batches('test'))
                record.update(test_block_acc=test_acc[:-1].tolist(), test_fusion_acc=test_acc[-1].item())
            state.history.append(record)
            accelerator.log({f'val/block{b + 1}': a for b, a in enumerate(record['val_block_acc'])}
                            | {'val/fusion': record['val_fusion_acc'], 'epoch': state.epoch + 1}, step=state.step)
            if accelerator.is_main_process:
                tqdm.write(_epoch_line(record))  # above the bar, not onto its line
            if (metric := strategy_metric(val_acc, config['model']['prediction'])) > state.best_metric:
                state.best_metric, state.best_epoch = metric, state.epoch
                state.best_val = {'blocks': record['val_block_acc'], 'fusion': record['val_fusion_acc']}
                if accelerator.is_main_process:
                    save_best(accelerator.unwrap_model(engine).model, out, data.label_names)
            stop = state.step >= total_steps
            last_epoch = stop or state.epoch + 1 >= end_epoch
            every = cfg['checkpoint_every']
            save = (last_epoch or (state.epoch + 1) % cfg['checkpoint_epochs'] == 0
                    or bool(every) and state.step % every == 0)
            plot_due = last_epoch or time.perf_counter() - plotted_at > PLOT_INTERVAL_S
            if save and plot_due and accelerator.is_main_process:
                plot_history(state.history, out / 'block_accuracy.png', len(model.stages))
                plotted_at = time.perf_counter()
            if not (stop and state.batch < steps_per_epoch):
                state.epoch, state.batch = state.epoch + 1, 0
            state.train_time = time.perf_counter() - start
            if save:
                checkpoints.save(state)
    if profiler is not None:
        profiler.stop()
    skips = cudagraph_skips(accelerator.device, cfg['compile'], skips_before)
    if skips:
        accelerator.print(f"warning: {skips} compiled graph(s) ran without CUDA graphs; TORCH_LOGS=cudagraphs says why")
    accelerator.wait_for_everyone()
    results = finish(accelerator, config, out, model, state, data, {**run, 'cudagraph_skips': skips})
    accelerator.end_training()
    return results


def _epoch_line(record: Dict[str, Any]) -> str:
    test = f" | test fusion {100 * record['test_fusion_acc']:.2f}%" if 'test_fusion_acc' in record else ''
    blocks = ' '.join(f'{100 * a:.1f}' for a in record['val_block_acc'])
    return (f"epoch {record['epoch'] + 1}: val acc per block {blocks}"
            f" | fusion {100 * record['val_fusion_acc']:.2f}% | train fusion {100 * record['train_fusion_acc']:.2f}%"
            f"{test} | so far {record['step_time_s']:.1f} s in training steps, {record['time_s']:.1f} s in all")


def _flatten(config: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
    """``{'train': {'lr': 1}}`` -> ``{'train.lr': 1}``, other values as text (what TensorBoard's hparams take)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


if __name__ == '__main__':
    try:
        main()
    except RecipeError as err:
        sys.exit(f'error: {err}')  # one line, and a non-zero status (`accelerate launch -q` adds nothing)
