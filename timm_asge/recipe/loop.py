"""The recipe's training pieces: the model, the schedule, one epoch of local learning, evaluation, the NaN stop."""
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import timm
import torch
from accelerate import Accelerator

from ..engine import all_reduce_gradients, evaluate
from ..fileio import atomic_path
from ..models import AsgeCnn
from .config import RecipeError
from .data import RecipeData
from .state import Checkpoints, TrainState

__all__ = ['build_model', 'cosine_schedule', 'train_one_epoch', 'accuracy_on', 'strategy_metric', 'start_profiler']


def build_model(config: Dict[str, Any], num_classes: int) -> AsgeCnn:
    """The configured ASGE model, refused with what to change when it cannot be built or cannot read the images."""
    name, args, data_cfg = config['model']['name'], config['model']['args'], config['data']
    choices = ', '.join(timm.list_models('asge*'))
    if not isinstance(name, str) or not name.startswith('asge_') or not timm.is_model(name):
        raise RecipeError(f'model.name={name!r} is not an ASGE model; choose one of {choices}')
    try:
        model = timm.create_model(name, num_classes=num_classes, in_chans=data_cfg['channels'], **args)
    except (TypeError, ValueError) as err:
        raise RecipeError(f'cannot build model {name!r} with model.args={args}: {err}') from None
    check_img_size(model, data_cfg['img_size'], name)
    return model


def check_img_size(model: AsgeCnn, img_size: int, name: str) -> None:
    """Refuse a ``data.img_size`` too small for the network's down-sampling and goodness grids."""
    if img_size < model.min_input_size:
        raise RecipeError(f'data.img_size={img_size} is too small for {name}: it needs at least '
                          f'{model.min_input_size}x{model.min_input_size}; raise data.img_size')


def cosine_schedule(
        optimizer: torch.optim.Optimizer,
        lr: float,
        min_lr: float,
        total_steps: int,
        steps_per_epoch: int,
        on_updates: bool,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from each param group's rate to ``min_lr / lr`` of it, stepped once per optimizer step.

    Every group decays by the same factor, so the read-out's bias group (K times the rate, see ``param_groups``) ends
    at K times ``min_lr``, as the sum of the authors' K biases does. With ``on_updates=False`` the rate holds for an
    epoch and moves at its end: the authors' ``CosineAnnealingLR(T_max=epochs)`` stepped per epoch.
    """
    floor, epochs = min_lr / lr, max(math.ceil(total_steps / steps_per_epoch), 1)

    def factor(step: int) -> float:
        progress = step / max(total_steps, 1) if on_updates else (step // steps_per_epoch) / epochs
        return floor + (1 - floor) * (1 + math.cos(math.pi * min(progress, 1.0))) / 2

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(
        accelerator: Accelerator,
        engine: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        data: RecipeData,
        state: TrainState,
        checkpoints: Checkpoints,
        train_cfg: Dict[str, Any],
        total_steps: int,
        progress,
        profiler: Optional[torch.profiler.profile] = None,
) -> torch.Tensor:
    """Train the rest of ``state.epoch`` (from ``state.batch``), or up to ``total_steps``.

    Returns:
        Training accuracy of every block and of the fusion read-out over the batches trained, reduced over processes.
    """
    device, mode = accelerator.device, train_cfg['mode']
    num_blocks = len(accelerator.unwrap_model(engine).model.stages)
    correct = torch.zeros(num_blocks + 1, device=device, dtype=torch.long)
    seen, window, window_start = 0, [], state.step
    if state.batch and state.epoch_correct and accelerator.is_main_process:  # resumed mid-epoch: all processes' counts
        correct += torch.tensor(state.epoch_correct, device=device)
        seen = state.epoch_seen
    steps_per_epoch, every = data.steps_per_epoch(), train_cfg['checkpoint_every']
    _synchronize(device)
    clock = time.perf_counter()
    for batch, images, labels in data.train_batches(state.epoch, start=state.batch):
        if train_cfg['channels_last']:
            images = images.contiguous(memory_format=torch.channels_last)
        outputs = engine(images, labels)
        if mode != 'lean':
            accelerator.backward(outputs['loss'])
        elif accelerator.num_processes > 1:  # lean mode's backward runs inside forward, where DDP cannot sync
            all_reduce_gradients(engine)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        correct += outputs['correct']
        seen += labels.shape[0]
        window.append(torch.cat([outputs['block_losses'], outputs['fusion_loss'][None]]).float())
        state.step, state.batch = state.step + 1, batch + 1
        progress.update(1)
        if profiler is not None:
            profiler.step()
        if state.step % train_cfg['log_every'] == 0:
            check_finite(accelerator, window, window_start, checkpoints.last)
            losses = torch.stack(window).mean(0).tolist()
            window, window_start = [], state.step
            accelerator.log({'train/loss_block_last': losses[-2], 'train/loss_fusion': losses[-1],
                             'lr': scheduler.get_last_lr()[0]}, step=state.step)
            progress.set_postfix(epoch=state.epoch + 1, loss=f'{losses[-1]:.3f}')
        # On an epoch's last batch the checkpoint waits for the epoch's end (evaluation, history).
        if every and state.step % every == 0 and state.batch < steps_per_epoch:
            check_finite(accelerator, window, window_start, checkpoints.last)
            _synchronize(device)
            state.step_time += time.perf_counter() - clock
            state.epoch_correct = accelerator.reduce(correct.clone(), 'sum').tolist()
            state.epoch_seen = int(accelerator.reduce(torch.tensor(seen, device=device), 'sum').item())
            checkpoints.save(state)
            clock = time.perf_counter()
        if state.step >= total_steps:
            break
    _synchronize(device)
    state.step_time += time.perf_counter() - clock
    check_finite(accelerator, window, window_start, checkpoints.last)
    return accelerator.reduce(correct, 'sum').double() / max(accelerator.reduce(
        torch.tensor(seen, device=device), 'sum').item(), 1)


def check_finite(accelerator: Accelerator, window: List[torch.Tensor], first_step: int, last: Optional[Path]) -> None:
    """Stop with the block (numbered from 1) and step of the first non-finite loss in ``window``."""
    if not window:
        return
    losses = torch.stack(window)  # (steps, blocks + 1)
    if accelerator.reduce((~torch.isfinite(losses)).any().float(), 'sum').item() == 0:
        return
    where = 'on another process'
    rows, cols = torch.nonzero(~torch.isfinite(losses), as_tuple=True)
    if len(rows):
        block = int(cols[0])
        name = 'the fusion read-out' if block == losses.shape[1] - 1 else f'block {block + 1}'
        where = f'in {name} at step {first_step + int(rows[0]) + 1} (loss {losses[rows[0], cols[0]].item()})'
    raise RecipeError(f'non-finite loss {where}; training stopped. The last good checkpoint is {last or "none"}. '
                      f'Lower train.lr, or use train.mixed_precision=no')


def accuracy_on(accelerator: Accelerator, model: AsgeCnn, batches) -> torch.Tensor:
    """Accuracy of every block and of the fusion read-out over this process's batches, reduced over processes."""
    with accelerator.autocast():
        correct, total = evaluate(model, batches)
    return accelerator.reduce(correct, 'sum').double() / accelerator.reduce(total, 'sum')


def strategy_metric(val_acc: torch.Tensor, prediction: str) -> float:
    """The validation accuracy that chooses the best epoch for the exported model's strategy."""
    return {'fusion': val_acc[-1], 'last': val_acc[-2], 'best': val_acc[:-1].max()}[prediction].item()


def start_profiler(
        profile_steps: int,
        run_steps: int,
        steps_per_epoch: int,
        done: int,
        device: torch.device,
        path: Path,
) -> Optional[torch.profiler.profile]:
    """torch.profiler over up to ``profile_steps`` steps early in the second epoch (past compilation), or a short
    run's last steps, inside one epoch (no evaluation in the window); writes the ops' self times to ``path``. None
    when this run (which ends at step ``run_steps``, ``done`` steps were trained before it) has no steps left for it.
    """
    first = min(steps_per_epoch + 5, max(run_steps - profile_steps - 1, 0))
    first = max(first, done + 5) if done else first
    steps = min(profile_steps, run_steps - first - 1, (first // steps_per_epoch + 1) * steps_per_epoch - first - 1)
    if steps <= 0:
        return None
    cuda = device.type == 'cuda'
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])

    def write(prof: torch.profiler.profile) -> None:
        events = prof.key_averages()
        tables = [f'sorted by {key}:\n' + events.table(sort_by=key, row_limit=30)
                  for key in ['self_cuda_time_total'] * cuda + ['self_cpu_time_total']]
        with atomic_path(path) as tmp:
            tmp.write_text('\n\n'.join([f'{steps} training steps; self times summed over them', *tables]) + '\n')

    # One warm-up step keeps the profiler's own start-up out of the figures.
    schedule = torch.profiler.schedule(skip_first=first - done, wait=0, warmup=1, active=steps, repeat=1)
    profiler = torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=write)
    profiler.start()
    return profiler


def _synchronize(device: torch.device) -> None:
    """Wait for queued device work, so host clocks measure it."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
