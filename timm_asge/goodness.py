"""Spatial goodness: the read-out that turns an ASGE block's feature map into class scores, and the block itself.

The pieces of one ASGE block (Gong, Staszewski, Xu, "Adaptive Spatial Goodness Encoding", arXiv:2509.12394) that carry
no trainable weights: the adaptive grid size, the grid-pooled goodness vector, the fixed random projection to class
scores, RMS pooling and the parameter-free per-sample RMS normalisation; then ``AsgeBlock``, a conv3x3 with them.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'grid_size', 'spatial_goodness', 'relu_spatial_goodness', 'rms_norm', 'rms_pool2d', 'RmsNorm', 'FixedProjection',
    'AsgeBlock', 'POOL_TYPES',
]

POOL_TYPES = ('rms', 'avg')  # down-sampling between blocks: the paper's, or the authors' code's

# Added to the RMS before dividing so an all-zero map stays zero instead of NaN.
_RMS_EPS = 1e-6
# Goodness cells at least this large (16x16) are reduced over a view of the map. Measured on a CPU (fp32 and bf16):
# 1.4-2.3x faster than pooling the squares at 16x16 cells, but 0.9-6x slower at 8x8 and smaller.
_MIN_VIEW_CELL_AREA = 256


def grid_size(channels: int, ref_channels: int, alpha: float = 1.0) -> int:
    """Side of the goodness grid of a block with ``channels`` (C_l), ``P_l = (C_L / C_l) ** alpha``, rounded to the
    nearest integer and at least 1 (exact for power-of-two widths: 512 -> 1, 256 -> 2, 128 -> 4 with C_L = 512)."""
    if channels <= 0 or ref_channels <= 0:
        raise ValueError(f'channel counts must be positive, got channels={channels}, ref_channels={ref_channels}')
    return max(1, int(round((ref_channels / channels) ** alpha)))


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 input. (Not ``torch.promote_types``: torch.compile breaks its graph there.)"""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _cells(y: torch.Tensor, grid: int) -> Optional[torch.Tensor]:
    """``y`` (B, C, H, W) viewed as (B, C, P, H/P, P, W/P), or None if the cells are not all the same size.

    Splitting a dimension is always a view, whatever the memory format (channels_last included): no copy.
    """
    height, width = y.shape[-2:]
    if height % grid or width % grid:
        return None
    return y.unflatten(-2, (grid, height // grid)).unflatten(-1, (grid, width // grid))


def spatial_goodness(y: torch.Tensor, grid: int) -> torch.Tensor:
    """Mean of ``y**2`` over each cell of a ``grid x grid`` partition of every channel: (B, C, H, W) -> (B, C * P * P).

    Accumulated in float32 (float64 for float64 input): squares of bf16 activations lose too much precision. Large
    equal cells are reduced in one pass over a view of ``y`` (no full-size temporary); smaller or unequal cells go
    through adaptive pooling of the squares (reductions over small strided windows are slow).
    """
    dtype = _accumulation_dtype(y)
    cells = _cells(y, grid)
    area = 0 if cells is None else cells.shape[-3] * cells.shape[-1]
    if area < _MIN_VIEW_CELL_AREA:
        return F.adaptive_avg_pool2d(y.to(dtype).square(), grid).flatten(1)
    return (torch.linalg.vector_norm(cells, dim=(-3, -1), dtype=dtype).square() / area).flatten(1)


class _ReluSpatialGoodness(torch.autograd.Function):
    """ReLU and spatial goodness as one autograd node that keeps only the ReLU output for its backward.

    With ``y = relu(z)`` and ``g = cell_mean(y**2)``: ``dL/dz = y * broadcast(2 / area * dL/dg)`` (``y`` is zero where
    ``z <= 0``, so no separate ReLU mask). Autograd's own graph would keep a float32 copy of ``y`` and the squares and
    build several full-size gradients; this node builds one, in ``y``'s dtype and memory format.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, grid: int):
        # In place: the pre-activation is never needed again, and a copy would double the block's largest tensor.
        z.relu_()
        g = spatial_goodness(z, grid)  # autograd is off inside forward: no graph for g's own computation
        ctx.grid = grid
        ctx.set_materialize_grads(False)  # y gets no gradient: no full-size zeros for it in backward
        ctx.mark_dirty(z)
        ctx.save_for_backward(z)
        ctx.mark_non_differentiable(z)
        return z, g

    @staticmethod
    def backward(ctx, grad_y: Optional[torch.Tensor], grad_g: torch.Tensor):
        (y,) = ctx.saved_tensors
        batch, channels, height, width = y.shape
        grid = ctx.grid
        grad_cells = grad_g.reshape(batch, channels, grid, grid)
        cells = _cells(y, grid)
        if cells is None:
            grad_z = torch.ops.aten._adaptive_avg_pool2d_backward(grad_cells.to(y.dtype).contiguous(), y)
            return grad_z.mul_(y).mul_(2), None
        scale = (grad_cells * (2 / (cells.shape[-3] * cells.shape[-1]))).to(y.dtype)[:, :, :, None, :, None]
        # The product keeps y's memory format, so folding the cells back is a view (and traceable by torch.compile).
        return (cells * scale).reshape(y.shape), None


def relu_spatial_goodness(z: torch.Tensor, grid: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``y = relu(z)`` and its spatial goodness ``g``, with a memory-lean backward through ``g`` only.

    The values and gradients of ``y = F.relu(z); g = spatial_goodness(y, grid)``, but ``y`` has no gradient path (the
    local losses never differentiate through a block's output) and the backward keeps only ``y``. The ReLU runs in
    place on a conv output; a leaf or a view is copied first, so the caller's tensor is never changed.
    """
    if not torch.is_grad_enabled() or not z.requires_grad:
        y = F.relu(z)
        return y, spatial_goodness(y, grid)
    if z.is_leaf or z._base is not None:
        z = z.clone()
    return _ReluSpatialGoodness.apply(z, grid)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Divide every sample by the root mean square of all its elements (no learned parameters)."""
    if torch.is_grad_enabled() and x.requires_grad:
        rms = x.float().square().mean(dim=tuple(range(1, x.ndim)), keepdim=True).sqrt()
        return (x / (rms + _RMS_EPS)).to(x.dtype)
    # Without autograd (the engine's transitions, inference): one float32-accumulated reduction, no full-size
    # temporary, and the result straight in x's dtype (in bf16 the divisor is rounded to bf16: a per-sample scale
    # within 0.4% of the exact one).
    dtype = _accumulation_dtype(x)
    norm = torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True, dtype=dtype)
    rms = norm / math.sqrt(math.prod(x.shape[1:]))
    return x / (rms + _RMS_EPS).to(x.dtype)


def rms_pool2d(x: torch.Tensor, kernel_size: int = 2) -> torch.Tensor:
    """RMS pooling, ``sqrt(avg_pool(x**2))``, the down-sampling the paper describes."""
    # The epsilon keeps the gradient of sqrt finite where a whole window is zero (common after ReLU). Windows this
    # small are pooled fastest by the pooling kernel, at the price of one full-size float32 temporary.
    return (F.avg_pool2d(x.float().square(), kernel_size) + _RMS_EPS ** 2).sqrt().to(x.dtype)


class RmsNorm(nn.Module):
    """Module form of :func:`rms_norm`: the ASGE stem, and the last step of every block's output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x)


class FixedProjection(nn.Module):
    """Fixed random map from a goodness vector to class scores, ``a = g @ R + b``.

    ``R ~ N(0, 1) / sqrt(N)`` with shape (in_features, N) and ``b ~ N(0, 1) / sqrt(N)`` are drawn once from their own
    seeded generator and kept as persistent buffers: never trained, always saved with the weights, and identical in
    every process that builds the same model, so DDP ranks agree without broadcasting them.
    """

    def __init__(self, in_features: int, num_classes: int, seed: int, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.seed = seed
        if torch.device(device or 'cpu').type == 'meta':  # shapes only (timm builds on meta to size or defer init)
            weight, bias = torch.empty(in_features, num_classes, device='meta'), torch.empty(num_classes, device='meta')
        else:
            generator = torch.Generator().manual_seed(seed)
            scale = 1.0 / math.sqrt(max(num_classes, 1))
            weight = torch.randn(in_features, num_classes, generator=generator) * scale
            bias = torch.randn(num_classes, generator=generator) * scale
        self.register_buffer('weight', weight.to(device=device, dtype=dtype))
        self.register_buffer('bias', bias.to(device=device, dtype=dtype))

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        # In the goodness vector's float32 even under autocast: a (B, C*P*P) x (C*P*P, N) product costs nothing, and
        # skipping autocast saves three casts per block and step.
        with torch.autocast(g.device.type, enabled=False):
            return torch.addmm(self.bias.to(g.dtype), g, self.weight.to(g.dtype))

    def extra_repr(self) -> str:
        return f'in_features={self.in_features}, num_classes={self.num_classes}, seed={self.seed}'


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ValueError that lists them."""
    if value not in choices:
        raise ValueError(f'unknown {name} {value!r}; choose one of {", ".join(repr(c) for c in choices)}')
    return value


class AsgeBlock(nn.Module):
    """One ASGE block: conv3x3 + ReLU (``features``, the map Y), goodness scores of Y (``scores``), then
    ``transition``: optional 2x2 down-sampling, dropout and RMS norm into the next block's input."""

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

    def scores(self, y: torch.Tensor) -> torch.Tensor:
        return self.proj(spatial_goodness(y, self.grid))

    def transition(self, y: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            y = rms_pool2d(y, 2) if self.pool_type == 'rms' else F.avg_pool2d(y, 2)
        return self.norm(self.drop(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transition(self.features(x))
