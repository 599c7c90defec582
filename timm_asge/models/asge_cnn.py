"""ASGE CNNs: convolutional networks trained block by block with Adaptive Spatial Goodness Encoding

Papers:
    `Adaptive Spatial Goodness Encoding: Advancing and Scaling Forward-Forward Learning` - https://arxiv.org/abs/2509.12394
    (Q. Gong, R. B. Staszewski, K. Xu; ICASSP 2026)

Every block is conv3x3 + ReLU with its own local classifier: the block's spatial goodness (mean of squared
activations over an adaptive P x P grid per channel) times a fixed random projection gives class scores trained
with cross-entropy. Blocks never exchange gradients; the training engine (``timm_asge.engine``) detaches between
them. The model's ``forward`` is a plain, differentiable inference path, so timm's tooling, ``torch.compile``,
export and back-prop fine-tuning work on it.

Prediction strategies (the paper's v2 names; definitions inferred from the authors' code, see README):
    * ``fusion``: a trainable linear read-out over the pooled outputs of blocks 2..L, logits summed.
    * ``last``: the last block's fixed-projection scores; no trainable head.
    * ``best``: the fixed-projection scores of the block most accurate on validation; later blocks are not run.

Adapted for timm by the timm-asge authors from the method description and the authors' public code
(KCL-KAI-Lab/ASGE).
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..goodness import (
    FixedProjection, RmsNorm, check_choice, grid_size, relu_spatial_goodness, rms_pool2d, spatial_goodness,
)

__all__ = ['AsgeCnn', 'AsgeBlock', 'PREDICTIONS', 'POOL_TYPES']

PREDICTIONS = ('fusion', 'last', 'best')
POOL_TYPES = ('rms', 'avg')


class AsgeBlock(nn.Module):
    """One ASGE block: conv3x3 + ReLU, a goodness read-out with a fixed projection, then the output transition.

    ``features`` gives the activation map Y the local loss reads; ``scores`` maps Y to class scores; ``transition``
    down-samples (optional), applies dropout and RMS-normalises Y into the next block's input. ``forward`` is
    ``transition(features(x))``, so the block is an ordinary stage for ``features_only`` and ``forward_intermediates``.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            num_classes: int,
            grid: int,
            downsample: bool = False,
            pool_type: str = 'rms',
            drop_rate: float = 0.1,
            projection_seed: int = 0,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_chs: Input channels.
            out_chs: Output channels C_l.
            num_classes: Classes N of the fixed projection.
            grid: Goodness grid side P_l.
            downsample: Halve the resolution after the block.
            pool_type: Down-sampling, ``'rms'`` (the paper) or ``'avg'`` (the authors' code).
            drop_rate: Dropout on the block output.
            projection_seed: Seed of the fixed projection R, b.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grid = grid
        self.downsample = downsample
        self.pool_type = check_choice('pool_type', pool_type, POOL_TYPES)
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=3, padding=1, bias=True, **dd)
        self.act = nn.ReLU()
        self.proj = FixedProjection(out_chs * grid * grid, num_classes, seed=projection_seed, **dd)
        self.drop = nn.Dropout(drop_rate)
        self.norm = RmsNorm()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))

    def goodness(self, y: torch.Tensor) -> torch.Tensor:
        return spatial_goodness(y, self.grid)

    def local_forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``features(x)`` (without a gradient path) and its class scores, for the block's local loss.

        Same values as ``y = features(x); scores(y)``, but ReLU and goodness form one autograd node whose backward
        keeps only ``y`` (see :func:`~timm_asge.goodness.relu_spatial_goodness`); forward hooks on ``act`` do not
        run here.
        """
        y, goodness = relu_spatial_goodness(self.conv(x), self.grid)
        return y, self.proj(goodness)

    def scores(self, y: torch.Tensor) -> torch.Tensor:
        return self.proj(self.goodness(y))

    def transition(self, y: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            y = rms_pool2d(y, 2) if self.pool_type == 'rms' else F.avg_pool2d(y, 2)
        return self.norm(self.drop(y))

    def reset_projection(self, num_classes: int) -> None:
        old = self.proj
        self.proj = FixedProjection(
            old.in_features,
            num_classes,
            seed=old.seed,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transition(self.features(x))


class AsgeCnn(nn.Module):
    """ASGE convolutional network (VGG-style stack of ASGE blocks).

    The model always holds every block's fixed projection and the fusion read-out, so one checkpoint serves all
    three prediction strategies; ``set_prediction`` switches between them. ``num_features`` and
    ``head_hidden_size`` follow the active strategy: for ``fusion`` the features are the block outputs 2..L,
    pooled to the final resolution and concatenated; for ``last``/``best`` they are the read block's activation map
    and the pre-logits are its goodness vector.
    """

    def __init__(
            self,
            widths: Sequence[int] = (128, 256, 256, 512, 512, 512, 512),
            downsample: Sequence[bool] = (False, True, False, True, True, True, False),
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            pool_type: str = 'rms',
            alpha: float = 1.0,
            grid_ref_channels: Optional[int] = None,
            drop_rate: float = 0.1,
            prediction: str = 'fusion',
            best_block: Optional[int] = None,
            fusion_start: int = 1,
            projection_seed: int = 0,
            head_init_scale: float = 1.0,
            device=None,
            dtype=None,
    ):
        """
        Args:
            widths: Output channels of each block.
            downsample: Per block, whether a 2x2 down-sampling follows it (same length as ``widths``).
            num_classes: Number of classes.
            in_chans: Input image channels.
            global_pool: Pooling of the fusion read-out (timm pool type; ``''`` keeps maps unpooled).
            pool_type: Down-sampling between blocks, ``'rms'`` (the paper) or ``'avg'`` (the authors' code).
            alpha: Exponent of the adaptive grid ``P_l = (C_ref / C_l) ** alpha``.
            grid_ref_channels: C_ref of the grid rule; defaults to the last block's width (the authors use 512).
            drop_rate: Dropout applied to every block's output during training.
            prediction: Prediction strategy, ``'fusion'``, ``'last'`` or ``'best'``.
            best_block: Index (0-based) of the block ``best`` reads; chosen from validation by the engine.
            fusion_start: First block (0-based) whose output feeds the fusion read-out.
            projection_seed: Base seed of the fixed random projections.
            head_init_scale: Multiplier of the fusion read-out's initial weights. 1 is the authors' Kaiming-normal
                init; nn.Linear's default spread is ``sqrt(C_l / (6 * sum C_l))`` of it (0.13-0.18 for VGG8).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        widths = [int(w) for w in widths]
        downsample = [bool(d) for d in downsample]
        if not widths:
            raise ValueError('widths must list at least one block')
        if len(downsample) != len(widths):
            raise ValueError(
                f'downsample has {len(downsample)} entries but widths has {len(widths)}; give one per block')
        if not 0 <= fusion_start < len(widths):
            raise ValueError(f'fusion_start={fusion_start} must index a block in [0, {len(widths)})')
        if in_chans < 1:
            raise ValueError(f'in_chans must be positive, got {in_chans}')
        if isinstance(head_init_scale, bool) or not isinstance(head_init_scale, (int, float)) \
                or not 0 <= head_init_scale < float('inf'):
            raise ValueError(f'head_init_scale must be a finite number >= 0, got {head_init_scale!r}')
        self.widths = widths
        self.downsample = downsample
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.pool_type = check_choice('pool_type', pool_type, POOL_TYPES)
        self.alpha = float(alpha)
        self.grid_ref_channels = int(grid_ref_channels or widths[-1])
        self.drop_rate = drop_rate
        self.fusion_start = fusion_start
        self.projection_seed = projection_seed
        self.head_init_scale = float(head_init_scale)
        self.grad_checkpointing = False
        self.grids = [grid_size(w, self.grid_ref_channels, self.alpha) for w in widths]
        self.min_input_size = self._min_input_size()

        self.stem = RmsNorm()
        self.feature_info = []
        stages = []
        in_chs, reduction = in_chans, 1
        for i, (out_chs, down, grid) in enumerate(zip(widths, downsample, self.grids)):
            stages.append(AsgeBlock(
                in_chs,
                out_chs,
                num_classes,
                grid,
                downsample=down,
                pool_type=pool_type,
                drop_rate=drop_rate,
                projection_seed=projection_seed * 100_003 + i,
                **dd,
            ))
            reduction *= 2 if down else 1
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'stages.{i}'))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.fusion_features = sum(widths[fusion_start:])
        self.head = ClassifierHead(self.fusion_features, num_classes, pool_type=global_pool, **dd)
        # The chosen block of `best` travels with the weights; -1 means not chosen yet.
        self.register_buffer('best_block', torch.tensor(-1, dtype=torch.long, device=device))
        self.register_load_state_dict_post_hook(_sync_best_block)
        self.best_index: Optional[int] = None
        self.prediction = 'fusion'
        self.set_prediction(prediction, best_block)
        self.init_weights()

    def _map_sizes(self, size: int) -> List[int]:
        """Side of every block's activation map for an input side ``size``."""
        sizes = []
        for down in self.downsample:
            sizes.append(size)
            size = size // 2 if down else size
        return sizes

    def _size_ok(self, size: int) -> bool:
        sizes = self._map_sizes(size)
        return all(s >= g and (s >= 2 or not d) for s, g, d in zip(sizes, self.grids, self.downsample))

    def _min_input_size(self) -> int:
        size = 1
        while not self._size_ok(size):
            size += 1
        return size

    @torch.jit.ignore
    def init_weights(self) -> None:
        for block in self.stages:
            nn.init.kaiming_normal_(block.conv.weight, nonlinearity='relu')
            nn.init.zeros_(block.conv.bias)
        self._init_head()

    def _init_head(self) -> None:
        """Kaiming-normal, zero-bias fusion read-out, as the authors initialise theirs, times ``head_init_scale``.

        Their read-out is one ``Linear(C_l, N)`` per block, logits summed; ours is that sum as one linear layer over
        the concatenation, so each block's slice of columns gets the fan-in of its own head (``std = sqrt(2 / C_l)``),
        not nn.Linear's default over all columns. A pooling that concatenates several poolings (``catavgmax``)
        repeats the block slices once per pooling.
        """
        fc = self.head.fc
        if not isinstance(fc, nn.Linear):
            return  # no read-out (num_classes=0)
        with torch.no_grad():
            start = 0
            for _ in range(fc.in_features // self.fusion_features):
                for width in self.widths[self.fusion_start:]:
                    nn.init.kaiming_normal_(fc.weight[:, start:start + width], nonlinearity='relu')
                    start += width
            fc.weight.mul_(self.head_init_scale)
            nn.init.zeros_(fc.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        if self.prediction == 'fusion':
            return self.head.fc
        return self.stages[self.read_block].proj

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New class count: a fresh fusion read-out and fresh fixed projections (same seeds) in every block."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head.reset(num_classes, pool_type=global_pool)
        self._init_head()
        for block in self.stages:
            block.reset_projection(num_classes)
        self._update_feature_sizes()

    @torch.jit.ignore
    def architecture_args(self) -> Dict[str, Any]:
        """Every constructor argument as JSON-serialisable values: what a Hub ``config.json`` must carry.

        ``head_init_scale`` is left out: it only sets initial weights, which a checkpoint replaces.
        """
        return dict(
            widths=list(self.widths),
            downsample=list(self.downsample),
            num_classes=self.num_classes,
            in_chans=self.in_chans,
            global_pool=self.global_pool,
            pool_type=self.pool_type,
            alpha=self.alpha,
            grid_ref_channels=self.grid_ref_channels,
            drop_rate=self.drop_rate,
            prediction=self.prediction,
            best_block=self.best_index,
            fusion_start=self.fusion_start,
            projection_seed=self.projection_seed,
        )

    @property
    def read_block(self) -> int:
        """Index of the block whose scores `last`/`best` return (the last block run by those strategies)."""
        if self.prediction == 'best':
            return self.best_index
        return len(self.stages) - 1

    def set_prediction(self, prediction: str, best_block: Optional[int] = None) -> None:
        """Choose the prediction strategy.

        Args:
            prediction: ``'fusion'``, ``'last'`` or ``'best'``.
            best_block: Block index for ``best`` (negative counts from the end); keeps the stored choice if None.
        """
        check_choice('prediction strategy', prediction, PREDICTIONS)
        if best_block is not None:
            num_blocks = len(self.stages)
            if not -num_blocks <= best_block < num_blocks:
                raise ValueError(f'best_block={best_block} is not a block index of this {num_blocks}-block network')
            self.best_index = best_block % num_blocks
            self.best_block.fill_(self.best_index)
        if prediction == 'best' and self.best_index is None:
            raise ValueError(
                "prediction 'best' needs a chosen block: run timm_asge.engine.choose_best_block(model, val_loader) "
                "after training, or pass best_block=<index>")
        self.prediction = prediction
        self._update_feature_sizes()

    def _update_feature_sizes(self) -> None:
        if self.prediction == 'fusion':
            self.num_features = self.head_hidden_size = self.fusion_features
        else:
            block = self.stages[self.read_block]
            self.num_features = block.conv.out_channels
            self.head_hidden_size = block.proj.in_features

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the problem if ``x`` is not a batch of images this network can read."""
        if x.ndim != 4:
            raise ValueError(f'expected a batch of images (B, C, H, W), got a tensor of shape {tuple(x.shape)}')
        if not x.is_floating_point():
            raise ValueError(f'expected floating-point images, got {x.dtype}; convert them, e.g. images.float() / 255 '
                             f'(timm_asge.data.to_model_input); the network RMS-normalises its input, so no mean/std')
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f'the model expects {self.in_chans}-channel images but got {x.shape[1]} channels (input shape '
                f'{tuple(x.shape)}); convert the images or create the model with in_chans={x.shape[1]}')
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f'image size {tuple(x.shape[-2:])} is too small for this network: its '
                f'{sum(self.downsample)} down-sampling steps and goodness grids {self.grids} need at least '
                f'{self.min_input_size}x{self.min_input_size}; resize the images or use a shallower network')

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """Spatial size of the last block's output (the fusion features) for an input of ``height x width``."""
        for down in self.downsample:
            if down:
                height, width = height // 2, width // 2
        return height, width

    def fusion_input(self, output: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """A block output brought to the final resolution ``size``, ready to concatenate into the fusion features.

        Global average pooling of the concatenation must equal each block's own global average (the fusion read-out
        is a sum of per-block linear heads on pooled outputs). Where the block's side is a multiple of the final side
        (every even input size), average pooling to ``size`` keeps that exactly. Where down-sampling rounded an odd
        side down, adaptive pooling's windows would overlap and weight some pixels twice, so the block's global
        average is broadcast over ``size`` instead.
        """
        height, width = output.shape[-2:]
        if (height, width) == tuple(size):
            return output
        if height % size[0] or width % size[1]:
            return output.mean(dim=(2, 3), keepdim=True).expand(-1, -1, *size)
        return F.adaptive_avg_pool2d(output, size)

    def _block_features(self, block: AsgeBlock, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(block.features, x, use_reentrant=False)
        return block.features(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        size = self.output_size(*x.shape[-2:])
        x = self.stem(x)
        if self.prediction == 'fusion':
            # Pool each output as soon as it exists, so only one block's full-size maps are alive at a time.
            fused = []
            for i, block in enumerate(self.stages):
                x = block.transition(self._block_features(block, x))
                if i >= self.fusion_start:
                    fused.append(self.fusion_input(x, size))
            return torch.cat(fused, dim=1)
        read = self.read_block
        for block in self.stages[:read]:
            x = block.transition(self._block_features(block, x))
        return self._block_features(self.stages[read], x)

    def check_read_out(self) -> None:
        """Raise a ValueError if the fusion read-out cannot produce class scores (unpooled features, classes > 0)."""
        if not self.global_pool and self.num_classes:
            # timm's ClassifierHead would hand (N, C, H, W) to its Linear and fail with a shape mismatch.
            raise ValueError(
                "global_pool='' leaves the fusion features unpooled (N, C, H, W), which the linear read-out cannot "
                "take: use num_classes=0 (or pre_logits=True) for the unpooled features, or a pooling such as "
                "global_pool='avg' for class scores")

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.prediction == 'fusion':
            if not pre_logits:
                self.check_read_out()
            return self.head(x, pre_logits=pre_logits)
        if not self.global_pool and (pre_logits or self.num_classes == 0):
            return x
        block = self.stages[self.read_block]
        goodness = block.goodness(x)
        return goodness if pre_logits or self.num_classes == 0 else block.proj(goodness)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def block_logits(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Every block's fixed-projection scores and, last, the fusion logits, from one pass (for evaluation)."""
        self.check_input(x)
        size = self.output_size(*x.shape[-2:])
        x = self.stem(x)
        logits, fused = [], []
        for i, block in enumerate(self.stages):
            y = block.features(x)
            logits.append(block.scores(y))
            x = block.transition(y)
            if i >= self.fusion_start:
                fused.append(self.fusion_input(x, size))
        return logits + [self.head(torch.cat(fused, dim=1))]

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns intermediates (block outputs).

        Args:
            x: Input image tensor.
            indices: Take last n blocks if int, all if None, select matching indices if sequence.
            norm: Unused (ASGE blocks end in a parameter-free RMS norm already).
            stop_early: Stop after the last requested block when only intermediates are needed.
            output_fmt: Only ``'NCHW'``.
            intermediates_only: Only return the intermediates.
        """
        assert output_fmt == 'NCHW', 'Output format must be NCHW.'
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.check_input(x)
        size = self.output_size(*x.shape[-2:])
        if intermediates_only and stop_early:
            last = max_index
        elif self.prediction == 'fusion':
            last = len(self.stages) - 1
        else:
            last = max(max_index, self.read_block)
        x = self.stem(x)
        intermediates, fused, features = [], [], None
        for i, block in enumerate(self.stages[:last + 1]):
            y = self._block_features(block, x)
            x = block.transition(y)
            if i in take_indices:
                intermediates.append(x)
            if self.prediction == 'fusion' and i >= self.fusion_start:
                fused.append(self.fusion_input(x, size))
            elif self.prediction != 'fusion' and i == self.read_block:
                features = y
        if intermediates_only:
            return intermediates
        return (torch.cat(fused, dim=1) if self.prediction == 'fusion' else features), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks after the last requested intermediate (and the head if ``prune_head``)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.widths = self.widths[:max_index + 1]
        self.downsample = self.downsample[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        self.grids = self.grids[:max_index + 1]
        self.min_input_size = self._min_input_size()  # fewer blocks may read smaller images
        self.fusion_start = min(self.fusion_start, max_index)
        self.fusion_features = sum(self.widths[self.fusion_start:])
        if self.best_index is not None and self.best_index > max_index:
            self.best_index = None
            self.best_block.fill_(-1)
        weight = self.stages[0].conv.weight
        self.head = ClassifierHead(
            self.fusion_features, self.num_classes, pool_type=self.global_pool, device=weight.device,
            dtype=weight.dtype)
        self._init_head()
        self.set_prediction('fusion')
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices


def _sync_best_block(module: AsgeCnn, incompatible_keys) -> None:
    """After ``load_state_dict``, take the stored `best` block choice (host read once, at load time only)."""
    index = int(module.best_block)
    module.best_index = index if index >= 0 else None
    if module.prediction == 'best' and module.best_index is None:
        module.set_prediction('fusion')
        raise ValueError(
            "the loaded weights carry no chosen block for prediction 'best' (their best_block buffer is -1), so the "
            "model now predicts with 'fusion'; choose a block with timm_asge.engine.choose_best_block(model, "
            "val_loader), or call model.set_prediction('best', best_block=<index>)")
    module._update_feature_sizes()


def _create_asge(variant: str, pretrained: bool = False, **kwargs) -> AsgeCnn:
    num_blocks = len(kwargs.get('widths', ()))
    # The strategy is applied after the weights load: the caller's (or config.json's) block wins over the one stored
    # in the weights, and `prediction='best'` alone reads the stored choice.
    prediction, best_block = kwargs.pop('prediction', 'fusion'), kwargs.pop('best_block', None)
    model = build_model_with_cfg(
        AsgeCnn,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=tuple(range(num_blocks)), flatten_sequential=True),
        **kwargs,
    )
    if isinstance(model, AsgeCnn):  # features_only wrappers read intermediates, not a prediction
        model.set_prediction(prediction, best_block)
    return model


def _classifier_names(num_blocks: int) -> Tuple[str, ...]:
    # Everything that depends on the class count: dropped (and rebuilt fresh) when num_classes changes on load.
    return ('head.fc',) + tuple(f'stages.{i}.proj' for i in range(num_blocks))


def _cfg(url: str = '', num_blocks: int = 7, **kwargs) -> Dict[str, Any]:
    # The network RMS-normalises its input itself, so the data pipeline only scales to [0, 1] (mean 0, std 1).
    return {
        'url': url,
        'hf_hub_filename': 'model.safetensors',
        'num_classes': 10,
        'input_size': (3, 32, 32),
        'pool_size': (2, 2),
        'crop_pct': 1.0,
        'interpolation': 'bilinear',
        'mean': (0.0, 0.0, 0.0),
        'std': (1.0, 1.0, 1.0),
        'first_conv': 'stages.0.conv',
        'classifier': _classifier_names(num_blocks),
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2509.12394',
        'paper_name': 'Adaptive Spatial Goodness Encoding: Advancing and Scaling Forward-Forward Learning',
        **kwargs,
    }


HF_ORG = 'timm-asge'
_GREY = dict(input_size=(1, 32, 32), mean=(0.0,), std=(1.0,))
MNIST_LABELS = tuple(str(i) for i in range(10))
FASHION_MNIST_LABELS = (
    'T - shirt / top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
CIFAR10_LABELS = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
CIFAR100_LABELS = (
    'apple', 'aquarium_fish', 'baby', 'bear', 'beaver', 'bed', 'bee', 'beetle', 'bicycle', 'bottle', 'bowl', 'boy',
    'bridge', 'bus', 'butterfly', 'camel', 'can', 'castle', 'caterpillar', 'cattle', 'chair', 'chimpanzee', 'clock',
    'cloud', 'cockroach', 'couch', 'crab', 'crocodile', 'cup', 'dinosaur', 'dolphin', 'elephant', 'flatfish', 'forest',
    'fox', 'girl', 'hamster', 'house', 'kangaroo', 'keyboard', 'lamp', 'lawn_mower', 'leopard', 'lion', 'lizard',
    'lobster', 'man', 'maple_tree', 'motorcycle', 'mountain', 'mouse', 'mushroom', 'oak_tree', 'orange', 'orchid',
    'otter', 'palm_tree', 'pear', 'pickup_truck', 'pine_tree', 'plain', 'plate', 'poppy', 'porcupine', 'possum',
    'rabbit', 'raccoon', 'ray', 'road', 'rocket', 'rose', 'sea', 'seal', 'shark', 'shrew', 'skunk', 'skyscraper',
    'snail', 'snake', 'spider', 'squirrel', 'streetcar', 'sunflower', 'sweet_pepper', 'table', 'tank', 'telephone',
    'television', 'tiger', 'tractor', 'train', 'trout', 'tulip', 'turtle', 'wardrobe', 'whale', 'willow_tree', 'wolf',
    'woman', 'worm')

default_cfgs = generate_default_cfgs({
    'asge_cnn_tiny.digits': _cfg(
        hf_hub_id=f'{HF_ORG}/asge_cnn_tiny.digits', num_blocks=4, input_size=(1, 16, 16), pool_size=(4, 4),
        mean=(0.0,), std=(1.0,), label_names=MNIST_LABELS),
    # The first tag is the default: CIFAR-10, so a plain `create_model('asge_cnn')` takes RGB input.
    'asge_cnn.cifar10': _cfg(hf_hub_id=f'{HF_ORG}/asge_cnn.cifar10', label_names=CIFAR10_LABELS),
    'asge_cnn.mnist': _cfg(hf_hub_id=f'{HF_ORG}/asge_cnn.mnist', label_names=MNIST_LABELS, **_GREY),
    'asge_cnn.fashion_mnist': _cfg(
        hf_hub_id=f'{HF_ORG}/asge_cnn.fashion_mnist', label_names=FASHION_MNIST_LABELS, **_GREY),
    'asge_vgg11.cifar100': _cfg(
        hf_hub_id=f'{HF_ORG}/asge_vgg11.cifar100', num_blocks=10, num_classes=100, label_names=CIFAR100_LABELS),
    'asge_vgg11_w64': _cfg(
        num_blocks=8, num_classes=1000, input_size=(3, 224, 224), pool_size=(14, 14), crop_pct=0.875,
        interpolation='bicubic'),
})


@register_model
def asge_cnn_tiny(pretrained: bool = False, **kwargs) -> AsgeCnn:
    """ASGE-Tiny: 4 blocks (32, 64*, 64*, 128) at 16x16 greyscale; trains in seconds on a CPU (demos, tests).

    Not a network of the paper's, so its read-out starts at nn.Linear's default spread (0.20-0.29 of the authors'
    Kaiming init for these widths): with the authors' scale, a 20-epoch digits run ends at 83% fusion, not 91%.
    """
    model_args = dict(
        widths=(32, 64, 64, 128), downsample=(False, True, True, False), in_chans=1, head_init_scale=0.25)
    return _create_asge('asge_cnn_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def asge_cnn(pretrained: bool = False, **kwargs) -> AsgeCnn:
    """ASGE VGG8 from the paper: 7 blocks (128, 256*, 256, 512*, 512*, 512*, 512) at 32x32 (MNIST, FashionMNIST,
    CIFAR-10). Average pooling, as in the authors' code that produced the published accuracies; the paper describes
    RMS pooling (``pool_type='rms'``).
    """
    model_args = dict(
        widths=(128, 256, 256, 512, 512, 512, 512),
        downsample=(False, True, False, True, True, True, False),
        pool_type='avg',
    )
    return _create_asge('asge_cnn', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def asge_vgg11(pretrained: bool = False, **kwargs) -> AsgeCnn:
    """ASGE VGG11 from the paper: 10 blocks (128, 256*, 256, 512*, 512, 512*, 512, 512*, 512, 512) at 32x32,
    average pooling as in the authors' code.
    """
    model_args = dict(
        widths=(128, 256, 256, 512, 512, 512, 512, 512, 512, 512),
        downsample=(False, True, False, True, False, True, False, True, False, False),
        pool_type='avg',
    )
    return _create_asge('asge_vgg11', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def asge_vgg11_w64(pretrained: bool = False, **kwargs) -> AsgeCnn:
    """ASGE ImageNet network at 224x224: VGG11's conv stack starting at 64 channels (64*, 128*, 256, 256*, 512,
    512*, 512, 512), its last pooling dropped so the final map is 14x14. Grids 8, 4, 2, 1 (C_ref 512).
    """
    model_args = dict(
        widths=(64, 128, 256, 256, 512, 512, 512, 512),
        downsample=(True, True, False, True, False, True, False, False),
        num_classes=1000,
        pool_type='avg',
    )
    return _create_asge('asge_vgg11_w64', pretrained=pretrained, **dict(model_args, **kwargs))
