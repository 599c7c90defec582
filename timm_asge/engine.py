"""Local learning for ASGE models: every block learns from its own loss, no gradient crosses a block boundary.

``LocalLearner`` is an ``nn.Module`` whose ``forward(images, labels)`` returns every block's local loss and correct
count plus the fusion read-out's loss, so accelerate / DDP can wrap it like any model (the local losses must come
through the wrapped module's ``__call__``, or DDP never synchronises the gradients).

Two modes give identical gradients:
    * ``fused``: the caller sums the losses and runs one backward (one all-reduce under DDP).
    * ``lean``: each block's backward runs right after its forward, inside ``forward``, so only one block's graph is
      alive at a time: the memory advantage of local learning. ``forward`` then returns detached losses.

A third mode, ``backprop``, is the baseline the method is measured against: the same network trained end to end
through the fusion read-out (block inputs not detached, only the read-out's loss back-propagated).
"""
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .goodness import check_choice
from .models.asge_cnn import AsgeCnn

__all__ = [
    'LocalLearner', 'MODES', 'param_groups', 'evaluate', 'pick_best_block', 'choose_best_block', 'check_labels',
    'all_reduce_gradients',
]

MODES = ('fused', 'lean', 'backprop')


def check_labels(labels: torch.Tensor, num_classes: int, batch_size: Optional[int] = None) -> None:
    """Raise a ValueError if the labels are not one class index per image, or one lies outside ``[0, num_classes)``.

    Shape and dtype are checked everywhere (they are static, also to ``torch.compile``); the values as follows.
    On the CPU the check is immediate. On an accelerator, and inside ``torch.compile``, it is an asynchronous device
    assert (no host sync or graph break in the training step) that fails later with a RuntimeError; the recipe also
    checks every label once, on the host, when it loads the data, with a clear message.
    """
    integer = not (labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool)
    if labels.ndim != 1 or not integer:
        if labels.ndim == 2 and labels.shape[1] > 1:  # one-hot (integer or float) or soft targets
            remedy = 'pass labels.argmax(1) for one-hot or soft targets'
        elif labels.ndim == 1:
            remedy = 'pass labels.long() if they hold whole class numbers'
        elif labels.numel() == (labels.shape[0] if labels.ndim else 1):  # (B, 1), (B, 1, 1), ()
            remedy = 'pass labels.reshape(-1) if they hold one class index per image'
        else:
            remedy = 'pass one class index per image'
        raise ValueError(f'labels must be class indices, an integer tensor of shape (B,), got {labels.dtype} of shape '
                         f'{tuple(labels.shape)}; {remedy}')
    if batch_size is not None and labels.shape[0] != batch_size:
        raise ValueError(f'{labels.shape[0]} labels for {batch_size} images; pass one label per image')
    labels = labels.long()  # min/max and comparisons exist for every integer dtype in int64 (not for uint16 on the CPU)
    if labels.device.type == 'cpu' and not torch.compiler.is_compiling():
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)].unique().tolist()
            raise ValueError(
                f'labels {bad[:10]} lie outside [0, {num_classes}) for a {num_classes}-class model; '
                f'check the dataset label column or create the model with num_classes=<number of classes>')
    else:
        torch._assert_async(((labels >= 0) & (labels < num_classes)).all(), f'labels outside [0, {num_classes})')


class LocalLearner(nn.Module):
    """Training wrapper computing the losses of an :class:`AsgeCnn`: local ones, or end to end as a baseline."""

    def __init__(self, model: AsgeCnn, mode: str = 'fused'):
        """
        Args:
            model: The ASGE network to train.
            mode: ``'fused'`` (sum the returned loss, one backward), ``'lean'`` (per-block backward inside forward)
                or ``'backprop'`` (the baseline: the same network trained end to end through the fusion read-out).
        """
        super().__init__()
        self.model = model
        self.mode = check_choice('engine mode', mode, MODES)
        self.checked = False
        if not model.global_pool and model.num_classes:  # timm's head would fail inside its Linear
            raise ValueError("global_pool='' leaves the fusion features unpooled, which the read-out cannot take; "
                             "train with a pooling such as global_pool='avg'")

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Compute every loss (and, in ``lean`` mode with grad enabled, its gradients).

        Returns:
            ``loss``: what to call backward on (``fused``: the sum of all local losses; ``backprop``: the fusion
            read-out's loss; ``lean``: that sum, detached); ``block_losses``: (L,) detached per-block losses;
            ``fusion_loss``: detached read-out loss; ``correct``: (L + 1,) correct predictions of every block's
            scores, then of the fusion read-out.
        """
        model = self.model
        if not self.checked:  # once: shapes and dtypes do not change between batches, and checks cost host syncs
            model.check_input(images)
            check_labels(labels, model.num_classes, images.shape[0])
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


def param_groups(
        model: AsgeCnn,
        lr: float,
        weight_decay: float = 0.0,
        block_lrs: Optional[Sequence[float]] = None,
) -> List[Dict]:
    """One optimizer param group per block and two for the fusion read-out (weights, bias).

    One optimizer with per-block groups keeps per-block learning rates possible while mixed precision sees a single
    optimizer (accelerate steps a grad scaler once per optimizer, which breaks fp16 with several optimizers).

    The authors' read-out is one ``Linear(C_l, N)`` per fused block under one AdamW. Its weights are our weight's
    column slices, but its K biases all get the same gradient, so their sum (our one bias) moves K times as far per
    step and decays at the same rate: the bias group gets ``lr * K`` and ``weight_decay / K``, the same AdamW update.

    Args:
        model: The ASGE network.
        lr: Learning rate of every group (the fusion read-out's weights included).
        weight_decay: Weight decay of every group.
        block_lrs: Optional learning rate per block, overriding ``lr`` for the blocks.
    """
    if block_lrs is not None and len(block_lrs) != len(model.stages):
        raise ValueError(f'block_lrs has {len(block_lrs)} entries but the model has {len(model.stages)} blocks')
    groups = []
    for i, block in enumerate(model.stages):
        block_lr = lr if block_lrs is None else block_lrs[i]
        groups.append({'params': list(block.parameters()), 'lr': block_lr, 'weight_decay': weight_decay,
                       'name': f'stages.{i}'})
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
    """Correct predictions of every block's scores and of the fusion read-out over ``batches``.

    Returns:
        ``correct`` (L + 1,) on the model's device (blocks, then fusion) and the number of samples (0-dim tensor),
        so the caller can reduce both across processes before dividing.
    """
    was_training = model.training
    model.eval()
    correct, total = None, 0
    for images, labels in batches:
        batch_correct = torch.stack([(out.argmax(dim=1) == labels).sum() for out in model.block_logits(images)])
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
    """Average the gradients of ``module`` over all processes, in one flat all-reduce.

    Used by ``lean`` mode under several processes: its per-block backward runs inside ``forward``, where DDP's
    reducer does not expect it, so the recipe leaves the engine unwrapped and synchronises the gradients here.
    """
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
