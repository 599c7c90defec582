"""Local learning for ASGE models: every block learns from its own loss, no gradient crosses a block boundary.

``LocalLearner.forward(images, labels)`` returns every block's local loss, so accelerate / DDP wrap it like any model
(the losses must come through the wrapped module's ``__call__``, or DDP never synchronises the gradients). Modes:
``fused`` sums the losses for one backward; ``lean`` runs each block's backward inside ``forward``, right after the
block, so only one block's graph is alive at a time (the same gradients in less memory); ``backprop`` is the baseline:
the same network trained end to end through the fusion read-out.
"""
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .goodness import check_choice
from .models.asge_cnn import AsgeCnn

__all__ = [
    'LocalLearner', 'MODES', 'param_groups', 'evaluate', 'pick_best_block', 'choose_best_block', 'check_batch',
    'all_reduce_gradients',
]

MODES = ('fused', 'lean', 'backprop')


def check_batch(model: AsgeCnn, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise a ValueError naming the problem if ``images`` and ``labels`` are not a batch ``model`` can learn from.

    Label values are checked at once on the CPU; on an accelerator or inside ``torch.compile``, by an asynchronous
    device assert (no host sync) that fails later with a RuntimeError. The recipe checks every label when it loads data.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f'images must be a float batch (B, C, H, W), got {images.dtype} of shape '
                         f'{tuple(images.shape)}; e.g. images.float() / 255 (the network normalises them itself)')
    channels, height, width = images.shape[1:]
    if channels != model.in_chans:
        raise ValueError(f'the model reads {model.in_chans}-channel images but got {channels} channels; convert the '
                         f'images or create the model with in_chans={channels}')
    if min(height, width) < model.min_input_size:
        raise ValueError(f'images of {height}x{width} are too small for this network: its down-sampling and goodness '
                         f'grids need at least {model.min_input_size}x{model.min_input_size}; resize them or use a '
                         f'shallower network')
    integer = not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool)
    if labels.shape != images.shape[:1] or not integer:
        # A column of labels is reshaped, not argmax-ed (which would make every label 0).
        remedy = 'labels.reshape(-1).long()' if labels.numel() == len(images) else \
            'labels.argmax(1) for one-hot or soft labels' if labels.ndim == 2 else 'one class index per image'
        raise ValueError(f'labels must be class indices, an integer tensor of shape ({len(images)},), got '
                         f'{labels.dtype} of shape {tuple(labels.shape)}; pass {remedy}')
    labels, num_classes = labels.long(), model.num_classes
    if labels.device.type == 'cpu' and not torch.compiler.is_compiling():
        bad = labels[(labels < 0) | (labels >= num_classes)].unique().tolist()
        if bad:
            raise ValueError(f'labels {bad[:10]} lie outside [0, {num_classes}) for a {num_classes}-class model; check '
                             f'the label column, or create the model with num_classes=<number of classes>')
    else:
        torch._assert_async(((labels >= 0) & (labels < num_classes)).all(), f'labels outside [0, {num_classes})')


class LocalLearner(nn.Module):
    """Training wrapper computing the losses of an :class:`AsgeCnn`: local ones, or end to end as a baseline."""

    def __init__(self, model: AsgeCnn, mode: str = 'fused'):
        super().__init__()
        self.model = model
        self.mode = check_choice('engine mode', mode, MODES)
        self.checked = False
        if not model.global_pool and model.num_classes:  # timm's head would fail inside its Linear
            raise ValueError("global_pool='' leaves the fusion features unpooled, which the read-out cannot take; "
                             "train with a pooling such as global_pool='avg'")

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Every loss (and in ``lean`` mode, with grad enabled, its gradients).

        Returns:
            ``loss`` to call backward on (``lean``: detached), detached ``block_losses`` (L,) and ``fusion_loss``, and
            ``correct`` (L + 1,): correct predictions of every block's scores, then of the fusion read-out.
        """
        model = self.model
        if not self.checked:  # once: shapes and dtypes do not change between batches, and checks cost host syncs
            check_batch(model, images, labels)
            self.checked = True
        labels = labels.long()  # cross_entropy takes int64 class indices only; uint8 or int32 labels are common
        lean = self.mode == 'lean' and torch.is_grad_enabled()
        size = model.output_size(*images.shape[-2:])
        losses, correct, fused = [], [], []
        for i, (y, scores, output) in enumerate(model.iter_blocks(images, local=self.mode != 'backprop', scores=True)):
            del y  # only the scores and the output are needed: the map is freed before the next block runs
            loss = F.cross_entropy(scores.float(), labels)
            if lean:
                loss.backward()
            losses.append(loss.detach() if lean else loss)
            correct.append((scores.detach().argmax(dim=1) == labels).sum())
            if i >= model.fusion_start:
                fused.append(model.fusion_input(output, size))
        # In the local modes the read-out learns from detached block outputs: no gradient reaches the convolutions.
        fusion_logits = model.head(torch.cat(fused, dim=1))
        fusion_loss = F.cross_entropy(fusion_logits.float(), labels)
        if lean:
            fusion_loss.backward()
            fusion_loss = fusion_loss.detach()
        correct.append((fusion_logits.detach().argmax(dim=1) == labels).sum())
        block_losses = torch.stack(losses)
        return {
            'loss': fusion_loss if self.mode == 'backprop' else block_losses.sum() + fusion_loss,
            'block_losses': block_losses.detach(),
            'fusion_loss': fusion_loss.detach(),
            'correct': torch.stack(correct),
        }


def param_groups(model: AsgeCnn, lr: float, weight_decay: float = 0.0) -> List[Dict]:
    """Param groups of one optimizer: one per block, and the fusion read-out's weights and bias.

    The authors' read-out is one ``Linear(C_l, N)`` per fused block under one AdamW: its weights are column slices of
    ours, but its K biases all get the same gradient, so their sum (our one bias) moves K times as far per step and
    decays at the same rate. The bias group gets ``lr * K`` and ``weight_decay / K``: the same AdamW update.
    """
    groups = [{'params': list(block.parameters()), 'lr': lr, 'weight_decay': weight_decay, 'name': f'stages.{i}'}
              for i, block in enumerate(model.stages)]
    head = dict(model.head.named_parameters())
    biases = [param for name, param in head.items() if name.endswith('bias')]
    groups.append({'params': [param for name, param in head.items() if not name.endswith('bias')], 'lr': lr,
                   'weight_decay': weight_decay, 'name': 'head'})
    if biases:
        fused_blocks = len(model.stages) - model.fusion_start
        groups.append({'params': biases, 'lr': lr * fused_blocks, 'weight_decay': weight_decay / fused_blocks,
                       'name': 'head.bias'})
    return groups


@torch.no_grad()
def evaluate(model: AsgeCnn, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Correct predictions of every block's scores and of the fusion read-out over ``batches``, counted by the training
    pass itself (in eval mode: no dropout).

    Returns:
        ``correct`` (L + 1,) on the model's device (blocks, then fusion) and the number of samples (0-dim tensor),
        so the caller can reduce both across processes before dividing.
    """
    was_training = model.training
    learner = LocalLearner(model).eval()
    correct, total = None, 0
    for images, labels in batches:
        batch_correct = learner(images, labels)['correct']
        correct = batch_correct if correct is None else correct + batch_correct
        total += labels.shape[0]
    model.train(was_training)
    if correct is None:
        raise ValueError('evaluate() got no batches; the evaluation split is empty')
    return correct, torch.tensor(total, device=correct.device)


def pick_best_block(block_accuracy: Sequence[float]) -> int:
    """Index of the most accurate block; ties go to the earlier block (fewer FLOPs, parameters and memory)."""
    return max(range(len(block_accuracy)), key=lambda i: (block_accuracy[i], -i))


def choose_best_block(model: AsgeCnn, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[int, List[float]]:
    """Pick the block whose own scores are most accurate on ``batches`` (ties go to the earlier, cheaper block).

    The choice is stored in the model (``model.best_block``, so also ``architecture_args()``); the active strategy
    is left as it is. Returns the block index and every block's accuracy.
    """
    correct, total = evaluate(model, batches)
    accuracy = (correct[:-1].double() / total).tolist()
    best = pick_best_block(accuracy)
    model.set_prediction(model.prediction, best_block=best)
    return best, accuracy


def all_reduce_gradients(module: nn.Module) -> None:
    """Average the gradients of ``module`` over all processes in one flat all-reduce: ``lean`` mode's backward runs
    inside ``forward``, where DDP cannot synchronise it, so the recipe leaves that engine unwrapped and calls this."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, synced in zip(grads, flat.split([grad.numel() for grad in grads])):
        grad.copy_(synced.view_as(grad))
