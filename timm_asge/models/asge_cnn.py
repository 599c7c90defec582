"""ASGE CNNs: convolutional networks trained block by block with Adaptive Spatial Goodness Encoding

Papers:
    `Adaptive Spatial Goodness Encoding: Advancing and Scaling Forward-Forward Learning` - https://arxiv.org/abs/2509.12394
    (Q. Gong, R. B. Staszewski, K. Xu; ICASSP 2026)

Every block is conv3x3 + ReLU with its own local classifier: its spatial goodness (mean of squared activations over
an adaptive P x P grid per channel) times a fixed random projection gives class scores trained with cross-entropy.
The training engine (``timm_asge.engine``) keeps gradients inside each block; ``forward`` is a plain differentiable
inference path. Prediction strategies: ``fusion`` (a trainable linear read-out over the pooled outputs of blocks
2..L), ``last`` (the last block's scores) and ``best`` (the scores of the block best on validation).

Adapted for timm by the timm-asge authors from the method description and the authors' code (KCL-KAI-Lab/ASGE).
"""
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..goodness import (
    AsgeBlock, FixedProjection, RmsNorm, check_choice, grid_size, relu_spatial_goodness, spatial_goodness,
)

__all__ = ['AsgeCnn', 'PREDICTIONS']

PREDICTIONS = ('fusion', 'last', 'best')
# What architecture_args hands back (head_init_scale only sets initial weights, which a checkpoint replaces).
_ARCH_ARGS = (
    'widths', 'downsample', 'num_classes', 'in_chans', 'global_pool', 'pool_type', 'alpha', 'grid_ref_channels',
    'drop_rate', 'prediction', 'best_block', 'fusion_start', 'projection_seed',
)


class AsgeCnn(nn.Module):
    """ASGE convolutional network (VGG-style stack of ASGE blocks).

    One checkpoint serves all three prediction strategies; ``set_prediction`` switches between them. The features
    follow the active strategy: for ``fusion`` the block outputs 2..L pooled to the final resolution and
    concatenated, for ``last``/``best`` the read block's map (its pre-logits: the goodness vector).
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
            best_block: Index (0-based) of the block ``best`` reads, chosen on validation after training.
            fusion_start: First block (0-based) whose output feeds the fusion read-out.
            projection_seed: Base seed of the fixed random projections.
            head_init_scale: Multiplier of the fusion read-out's initial weights (1: the authors' Kaiming-normal).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        widths = [int(w) for w in widths]
        downsample = [bool(d) for d in downsample]
        if not widths or len(downsample) != len(widths):
            raise ValueError(f'downsample has {len(downsample)} entries but widths has {len(widths)}; give one per '
                             f'block (at least one)')
        if not 0 <= fusion_start < len(widths):
            raise ValueError(f'fusion_start={fusion_start} must index a block in [0, {len(widths)})')
        if isinstance(head_init_scale, bool) or not isinstance(head_init_scale, (int, float)) \
                or not 0 <= head_init_scale < float('inf'):
            raise ValueError(f'head_init_scale must be a finite number >= 0, got {head_init_scale!r}')
        self.widths = widths
        self.downsample = downsample
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.pool_type = pool_type
        self.alpha = float(alpha)
        self.grid_ref_channels = int(grid_ref_channels or widths[-1])
        self.drop_rate = drop_rate
        self.fusion_start = fusion_start
        self.projection_seed = projection_seed
        self.head_init_scale = float(head_init_scale)
        self.grad_checkpointing = False
        self.grids = [grid_size(w, self.grid_ref_channels, self.alpha) for w in widths]

        self.stem = RmsNorm()
        self.feature_info = []
        stages = []
        in_chs, reduction = in_chans, 1
        for i, (out_chs, down, grid) in enumerate(zip(widths, downsample, self.grids)):
            stages.append(AsgeBlock(
                in_chs, out_chs, num_classes, grid, downsample=down, pool_type=pool_type, drop_rate=drop_rate,
                projection_seed=projection_seed * 100_003 + i, **dd,
            ))
            reduction *= 2 if down else 1
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'stages.{i}'))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.fusion_features = sum(widths[fusion_start:])
        self.head = ClassifierHead(self.fusion_features, num_classes, pool_type=global_pool, **dd)
        self.prediction, self.best_block = 'fusion', None
        self.set_prediction(prediction, best_block)
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        for block in self.stages:
            nn.init.kaiming_normal_(block.conv.weight, nonlinearity='relu')
            nn.init.zeros_(block.conv.bias)
        self._init_head()

    def _init_head(self) -> None:
        """The authors' Kaiming-normal, zero-bias read-out times ``head_init_scale``: theirs is one ``Linear(C_l, N)``
        per block, logits summed, so each block's slice of our one layer's columns gets its own fan-in."""
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
        return self.head.fc if self.prediction == 'fusion' else self.stages[self.read_block].proj

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New class count: a fresh fusion read-out and fresh fixed projections (same seeds) in every block."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head.reset(num_classes, pool_type=global_pool)
        self._init_head()
        for block in self.stages:
            proj = block.proj
            block.proj = FixedProjection(
                proj.in_features, num_classes, seed=proj.seed, device=proj.weight.device, dtype=proj.weight.dtype)

    @torch.jit.ignore
    def architecture_args(self) -> Dict[str, Any]:
        """The constructor arguments that rebuild this model, as JSON values (a Hub ``config.json``'s model_args)."""
        args = {name: getattr(self, name) for name in _ARCH_ARGS}
        return dict(args, widths=list(self.widths), downsample=list(self.downsample))

    @property
    def read_block(self) -> int:
        """Index of the block whose scores `last`/`best` return (the last block run by those strategies)."""
        return self.best_block if self.prediction == 'best' else len(self.stages) - 1

    def set_prediction(self, prediction: str, best_block: Optional[int] = None) -> None:
        """Switch to ``prediction``; a ``best_block`` (negative counts from the end) replaces the chosen block."""
        check_choice('prediction strategy', prediction, PREDICTIONS)
        num_blocks = len(self.stages)
        if best_block is not None and not -num_blocks <= best_block < num_blocks:
            raise ValueError(f'best_block={best_block} is not a block index of this {num_blocks}-block network '
                             f'(0 to {num_blocks - 1})')
        best_block = self.best_block if best_block is None else best_block % num_blocks
        if prediction == 'best' and best_block is None:
            raise ValueError("prediction 'best' needs a chosen block: run timm_asge.engine.choose_best_block(model, "
                             "val_loader) after training, or pass best_block=<index>")
        self.prediction, self.best_block = prediction, best_block
        if prediction == 'fusion':
            self.num_features = self.head_hidden_size = self.fusion_features
        else:
            block = self.stages[self.read_block]
            self.num_features, self.head_hidden_size = block.conv.out_channels, block.proj.in_features

    @property
    def min_input_size(self) -> int:
        """Smallest image side every block can read: each map at least its grid, and 2 wherever it is pooled."""
        size, scale = 1, 1
        for grid, down in zip(self.grids, self.downsample):
            size = max(size, max(grid, 2 if down else 1) * scale)
            scale *= 2 if down else 1
        return size

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """Spatial size of the last block's output (the fusion features) for an input of ``height x width``."""
        steps = sum(self.downsample)  # each 2x2 down-sampling halves a side, rounding down
        return height >> steps, width >> steps

    def fusion_input(self, output: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """A block output at the final resolution ``size``, to concatenate into the fusion features.

        Pooling the concatenation must give each block's own global average (the read-out sums per-block heads on
        pooled outputs): exact for average pooling where the sides divide; where down-sampling rounded an odd side
        down, adaptive pooling would weight some pixels twice, so the block's mean is broadcast instead.
        """
        height, width = output.shape[-2:]
        if (height, width) == tuple(size):
            return output
        if height % size[0] or width % size[1]:
            return output.mean(dim=(2, 3), keepdim=True).expand(-1, -1, *size)
        return F.adaptive_avg_pool2d(output, size)

    def iter_blocks(
            self,
            x: torch.Tensor,
            stop: Optional[int] = None,
            local: bool = False,
            scores: bool = False,
            output_last: bool = True,
    ) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]:
        """The one block loop of every path: the stem, then blocks ``0..stop-1``, one at a time.

        Args:
            x: Images (B, C, H, W).
            stop: Run only the blocks before this index (all if None).
            local: Local learning (the engine): each block reads a detached input and its transition runs without
                autograd, so no gradient can cross a block.
            scores: Also compute each block's class scores; outside ``local``, without autograd (for monitoring).
            output_last: Run the last block's transition (else it yields no output).

        Yields:
            Per block: the activation map Y, the class scores (or None) and the block's output (the next input).
        """
        x = self.stem(x)
        blocks = self.stages[:stop]
        for i, block in enumerate(blocks):
            if local:
                # One autograd node for ReLU and goodness, which keeps only Y for backward (the memory of lean mode).
                y, goodness = relu_spatial_goodness(block.conv(x.detach()), block.grid)
                block_scores = block.proj(goodness)
            else:
                if self.grad_checkpointing and torch.is_grad_enabled():
                    y = checkpoint(block.features, x, use_reentrant=False)
                else:
                    y = block.features(x)
                with torch.no_grad():
                    block_scores = block.scores(y) if scores else None
            if i == len(blocks) - 1 and not output_last:
                x = None
            else:
                with torch.set_grad_enabled(torch.is_grad_enabled() and not local):
                    x = block.transition(y)
            yield y, block_scores, x
            del y, block_scores  # free this block's map before the next block's conv runs

    def _forward_blocks(
            self,
            x: torch.Tensor,
            take_indices: Sequence[int] = (),
            stop: Optional[int] = None,
    ) -> Tuple[Optional[torch.Tensor], List[torch.Tensor]]:
        """The active strategy's features (None if ``stop`` comes before them) and the outputs in ``take_indices``;
        without ``stop``, up to the last block the strategy or ``take_indices`` needs."""
        fusion = self.prediction == 'fusion'
        stop = stop or max([*take_indices, len(self.stages) - 1 if fusion else self.read_block]) + 1
        size = self.output_size(*x.shape[-2:])
        features, intermediates = [], []
        blocks = self.iter_blocks(x, stop=stop, output_last=fusion or stop - 1 in take_indices)
        for i, (y, _, output) in enumerate(blocks):
            if i in take_indices:
                intermediates.append(output)
            if fusion and i >= self.fusion_start:
                # Pooled as soon as it exists, so only one block's full-size maps are alive at a time.
                features.append(self.fusion_input(output, size))
            elif not fusion and i == self.read_block:
                features.append(y)
        if not features:
            return None, intermediates
        return (torch.cat(features, dim=1) if fusion else features[0]), intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_blocks(x)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.prediction == 'fusion':
            return self.head(x, pre_logits=pre_logits)
        if not self.global_pool and (pre_logits or self.num_classes == 0):
            return x
        block = self.stages[self.read_block]
        goodness = spatial_goodness(x, block.grid)
        return goodness if pre_logits or self.num_classes == 0 else block.proj(goodness)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns intermediates (block outputs), with timm's arguments: ``indices`` takes the
        last n blocks if int, all if None, the matching ones if a sequence; ``norm`` is unused (every block output is
        RMS-normalised already)."""
        assert output_fmt == 'NCHW', 'Output format must be NCHW.'
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stop = max_index + 1 if intermediates_only and stop_early else None
        features, intermediates = self._forward_blocks(x, take_indices, stop)
        return intermediates if intermediates_only else (features, intermediates)

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks after the last requested intermediate (and the head if ``prune_head``)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        keep = max_index + 1
        self.stages = self.stages[:keep]
        self.widths, self.downsample, self.grids = self.widths[:keep], self.downsample[:keep], self.grids[:keep]
        self.feature_info = self.feature_info[:keep]
        self.fusion_start = min(self.fusion_start, max_index)
        self.fusion_features = sum(self.widths[self.fusion_start:])
        if self.best_block is not None and self.best_block > max_index:
            self.best_block = None
        self.head.reset(self.num_classes, in_features=self.fusion_features)
        self._init_head()
        self.set_prediction('fusion')
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices


def _create_asge(variant: str, pretrained: bool = False, **kwargs) -> AsgeCnn:
    return build_model_with_cfg(
        AsgeCnn,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=tuple(range(len(kwargs.get('widths', ())))), flatten_sequential=True),
        **kwargs,
    )


def _cfg(url: str = '', num_blocks: int = 7, **kwargs) -> Dict[str, Any]:
    # The network RMS-normalises its input, so data is only scaled to [0, 1]. Everything that depends on the class
    # count is a classifier: timm drops it (and it is built anew) when num_classes changes on load.
    return {
        'url': url,
        'num_classes': 10,
        'input_size': (3, 32, 32),
        'pool_size': (2, 2),
        'crop_pct': 1.0,
        'interpolation': 'bilinear',
        'mean': (0.0, 0.0, 0.0),
        'std': (1.0, 1.0, 1.0),
        'first_conv': 'stages.0.conv',
        'classifier': ('head.fc',) + tuple(f'stages.{i}.proj' for i in range(num_blocks)),
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2509.12394',
        'paper_name': 'Adaptive Spatial Goodness Encoding: Advancing and Scaling Forward-Forward Learning',
        **kwargs,
    }


# A name gets a tag and an hf_hub_id here only once its weights are on the Hub, so timm.list_models(pretrained=True)
# is true; until then there are no tags.
default_cfgs = generate_default_cfgs({
    'asge_cnn_tiny': _cfg(num_blocks=4, input_size=(1, 16, 16), pool_size=(4, 4), mean=(0.0,), std=(1.0,)),
    'asge_cnn': _cfg(),
    'asge_vgg11': _cfg(num_blocks=10),
    'asge_vgg11_w64': _cfg(
        num_blocks=8, num_classes=1000, input_size=(3, 224, 224), pool_size=(14, 14), crop_pct=0.875,
        interpolation='bicubic'),
})


@register_model
def asge_cnn_tiny(pretrained: bool = False, **kwargs) -> AsgeCnn:
    """ASGE-Tiny: 4 blocks (32, 64*, 64*, 128) at 16x16 greyscale; trains in seconds on a CPU (demos, tests). Not the
    paper's: its read-out starts at a quarter of the authors' init (20 digits epochs: 91% fusion; at theirs, 83%)."""
    model_args = dict(
        widths=(32, 64, 64, 128), downsample=(False, True, True, False), in_chans=1, head_init_scale=0.25)
    return _create_asge('asge_cnn_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def asge_cnn(pretrained: bool = False, **kwargs) -> AsgeCnn:
    """ASGE VGG8 from the paper at 32x32 (MNIST, FashionMNIST, CIFAR-10). Average pooling, as in the authors' code
    that produced the published accuracies; the paper describes RMS pooling (``pool_type='rms'``).
    """
    model_args = dict(
        widths=(128, 256, 256, 512, 512, 512, 512),
        downsample=(False, True, False, True, True, True, False),
        pool_type='avg',
    )
    return _create_asge('asge_cnn', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def asge_vgg11(pretrained: bool = False, **kwargs) -> AsgeCnn:
    """ASGE VGG11 from the paper at 32x32 (CIFAR-100), average pooling as in the authors' code."""
    model_args = dict(
        widths=(128, 256, 256, 512, 512, 512, 512, 512, 512, 512),
        downsample=(False, True, False, True, False, True, False, True, False, False),
        pool_type='avg',
    )
    return _create_asge('asge_vgg11', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def asge_vgg11_w64(pretrained: bool = False, **kwargs) -> AsgeCnn:
    """ASGE ImageNet network at 224x224 (ours): VGG11's conv stack starting at 64 channels, its last pooling dropped
    so the final map is 14x14. Grids 8, 4, 2, 1 (C_ref 512).
    """
    model_args = dict(
        widths=(64, 128, 256, 256, 512, 512, 512, 512),
        downsample=(True, True, False, True, False, True, False, False),
        num_classes=1000,
        pool_type='avg',
    )
    return _create_asge('asge_vgg11_w64', pretrained=pretrained, **dict(model_args, **kwargs))
