"""Costs of an ASGE network, measured on the model itself for one image.

* ``params``: trainable parameters of the modules a forward pass runs; ``fixed_buffers``: the fixed projections it
  reads (stored with the weights, never trained).
* ``flops``: what ``torch.utils.flop_counter.FlopCounterMode`` counts (convolutions and matrix products; elementwise
  work such as the goodness, pooling and norms is not counted, the usual convention).
* ``activation_bytes``: the peak of the tensors autograd holds for backward during a training step, seen through
  ``torch.autograd.graph.saved_tensors_hooks`` (weights and buffers excluded).

Measurements run on a copy of the model, on its device and dtype, and leave the random number generators as they were.
"""
import copy
import weakref
from typing import Callable, Dict, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .engine import LocalLearner, check_batch
from .models.asge_cnn import AsgeCnn

__all__ = ['strategy_costs', 'training_flops', 'training_activation_bytes']


def _one_image(model: nn.Module, input_size: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    param = next(model.parameters())
    return torch.rand(1, *input_size, device=param.device, dtype=param.dtype), torch.zeros(
        1, dtype=torch.long, device=param.device)


def _rng_kept(model: nn.Module):
    """Random draws (images, dropout) inside leave the caller's generators as they were."""
    device = next(model.parameters()).device
    return torch.random.fork_rng(devices=[device] if device.type == 'cuda' else [])


def _saved_peak(model: nn.Module, step: Callable[[], None]) -> int:
    """Peak bytes of the distinct storages autograd keeps saved for backward while ``step()`` runs."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    live: Dict[int, list] = {}  # storage address -> [bytes, saved references still alive]
    peak = 0

    class Saved:
        def __init__(self, tensor: torch.Tensor):
            self.tensor = tensor

    def release(key: int) -> None:
        live[key][1] -= 1
        if not live[key][1]:
            del live[key]

    def pack(tensor: torch.Tensor):
        nonlocal peak
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in weights:
            return tensor
        live.setdefault(key, [storage.nbytes(), 0])[1] += 1
        peak = max(peak, sum(size for size, _ in live.values()))
        saved = Saved(tensor)
        weakref.finalize(saved, release, key)  # the graph drops it after backward (or when it is freed)
        return saved

    def unpack(saved):
        return saved.tensor if isinstance(saved, Saved) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        step()
    return peak


def _training_step(model: AsgeCnn, input_size: Sequence[int], mode: str, measure: str) -> int:
    model = copy.deepcopy(model).train()
    learner = LocalLearner(model, mode)

    def step():
        out = learner(images, labels)
        if mode != 'lean':
            out['loss'].backward()

    with _rng_kept(model):
        images, labels = _one_image(model, input_size)
        if measure == 'flops':
            with FlopCounterMode(display=False) as counter:
                step()
            return counter.get_total_flops()
        return _saved_peak(model, step)


def training_flops(model: AsgeCnn, input_size: Sequence[int], mode: str) -> int:
    """FLOPs of one image's training step (forward and backward) in engine mode ``mode``."""
    return _training_step(model, input_size, mode, 'flops')


def training_activation_bytes(model: AsgeCnn, input_size: Sequence[int], mode: str) -> int:
    """Peak bytes autograd holds for one image's training step in engine mode ``mode``."""
    return _training_step(model, input_size, mode, 'activation_bytes')


def _strategy_costs(model: AsgeCnn, strategy: str, input_size: Sequence[int]) -> Dict[str, int]:
    """The costs of ``strategy`` on ``model`` (a copy: it is switched to the strategy and trained one step)."""
    model.set_prediction(strategy)
    images, labels = _one_image(model, input_size)
    used = set()
    hooks = [module.register_forward_hook(lambda m, *_: used.add(m)) for module in model.modules()]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(images)
    for hook in hooks:
        hook.remove()
    activation_bytes = _saved_peak(model, lambda: F.cross_entropy(model.train()(images), labels).backward())
    return dict(
        params=sum(p.numel() for m in used for p in m.parameters(recurse=False) if p.requires_grad),
        fixed_buffers=sum(b.numel() for m in used for b in m.buffers(recurse=False)),
        flops=counter.get_total_flops(),
        activation_bytes=activation_bytes,
        blocks_run=sum(block.conv in used for block in model.stages),
    )


def strategy_costs(model: AsgeCnn, input_size: Sequence[int]) -> Dict[str, Dict[str, int]]:
    """Parameters, fixed buffers, FLOPs, activation memory and blocks run by each prediction strategy for one image
    of ``input_size`` (C, H, W): ``fusion``, ``last`` and, once a block is chosen, ``best``.

    ``activation_bytes`` comes from a training step of ``cross_entropy(model(x), y)`` with the strategy (what
    back-propagating through it holds), the rest from one inference forward.
    """
    model = copy.deepcopy(model)
    strategies = ('fusion', 'last') + (('best',) if model.best_block is not None else ())
    costs = {}
    with _rng_kept(model):
        check_batch(model, *_one_image(model, input_size))
        for strategy in strategies:
            costs[strategy] = _strategy_costs(model, strategy, input_size)
    return costs
