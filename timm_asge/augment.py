"""Augmentation of image batches on their own device: per-image randomness, no per-image PIL work, no host sync.

The paper's augmentation (random crop with padding, horizontal flip, colour jitter, random greyscale) with
torchvision's semantics, for the in-memory datasets the recipe keeps on the training device.
"""
import functools
import math
import numbers
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import rgb_to_grayscale

__all__ = ['augment_batch', 'check_color_jitter']


def augment_batch(
        images: torch.Tensor,
        generator: torch.Generator,
        crop_padding: int = 0,
        hflip: bool = False,
        color_jitter: Optional[Sequence[float]] = None,
        grayscale_p: float = 0.0,
        compile_jitter: bool = False,
) -> torch.Tensor:
    """The paper's augmentation, batched on the images' device with per-sample randomness and no host sync.

    Args:
        images: Float images in [0, 1], (B, C, H, W).
        generator: Random generator on the images' device (seeded per batch, so a resumed run repeats it).
        crop_padding: Random crop of the original size from the image zero-padded by this many pixels.
        hflip: Horizontal flip with probability 0.5.
        color_jitter: (brightness, contrast, saturation, hue) with torchvision's ``ColorJitter`` semantics: every
            image draws its own factors and its own order of the four ops, each op is torchvision's. RGB only.
        grayscale_p: Probability of replacing an RGB image by its greyscale version.
        compile_jitter: Run the colour jitter's arithmetic through ``torch.compile``: a few fused kernels instead of
            about a hundred small ones (on a GPU the eager version is launch-bound).
    """
    b, c, h, w = images.shape
    device = images.device
    strengths = check_color_jitter(color_jitter) if color_jitter is not None else (0,) * 4
    if crop_padding:
        # Every (h, w) window of the padded images, (B, C, rows, columns, h, w); each image takes its own.
        windows = F.pad(images, (crop_padding,) * 4).unfold(2, h, 1).unfold(3, w, 1)
        offset = torch.randint(0, 2 * crop_padding + 1, (2, b), device=device, generator=generator)
        images = windows[torch.arange(b, device=device), :, offset[0], offset[1]]
    if hflip:
        flip = torch.rand(b, 1, 1, 1, device=device, generator=generator) < 0.5
        images = torch.where(flip, images.flip(-1), images)
    if c == 3 and any(strengths):
        # torchvision leaves out an op whose range is one point (strength 0), so it takes no place in the order.
        ops = tuple(i for i, strength in enumerate(strengths) if strength)
        draws = torch.rand(b, 4 + len(ops), device=device, generator=generator)
        # Python numbers only: a host tensor copied to the GPU would wait for the queued steps (a host sync).
        ranges = [(max(0.0, 1 - s), 1 + s) for s in strengths[:3]] + [(-strengths[3], strengths[3])]
        factors = torch.stack([draws[:, k] * (high - low) + low for k, (low, high) in enumerate(ranges)], dim=1)
        rank = draws[:, 4:].argsort(dim=1)  # a uniform random order of the ops that are on, per image
        order = sum((rank == k) * op for k, op in enumerate(ops))
        apply = _compiled_color_jitter() if compile_jitter else _color_jitter
        images = apply(images, factors, order, ops)
    if c == 3 and grayscale_p:
        to_gray = torch.rand(b, 1, 1, 1, device=device, generator=generator) < grayscale_p
        images = torch.where(to_gray, rgb_to_grayscale(images).expand_as(images), images)
    return images


def check_color_jitter(color_jitter: Sequence[float]) -> Tuple[float, float, float, float]:
    """``(brightness, contrast, saturation, hue)`` as floats, or a ValueError saying what torchvision would accept."""
    valid = isinstance(color_jitter, (list, tuple)) and len(color_jitter) == 4 and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 <= v < math.inf for v in color_jitter)
    if not valid or color_jitter[3] > 0.5:
        raise ValueError(f'color_jitter={color_jitter!r} must be [brightness, contrast, saturation, hue] as in '
                         f"torchvision's ColorJitter: three numbers >= 0 and a hue in [0, 0.5] (0 turns an op off), "
                         f'e.g. [0.4, 0.4, 0.4, 0.1]')
    return tuple(float(v) for v in color_jitter)


def _color_jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, ops: Tuple[int, ...]):
    """torchvision's ColorJitter, image by image.

    Image i applies the ops ``order[i]`` (0 brightness, 1 contrast, 2 saturation, 3 hue) in that order, op k with
    ``factors[i, k]``. Each round computes every op in ``ops`` for the whole batch and keeps the one each image's
    order names there, so the batch never splits by op (that would need a host sync).
    """
    for step in range(order.shape[1]):
        op = order[:, step].view(-1, 1, 1, 1)
        factor = factors.gather(1, order[:, step:step + 1]).view(-1, 1, 1, 1)
        gray = rgb_to_grayscale(images) if 1 in ops or 2 in ops else None
        other = images.new_zeros(())  # brightness blends with black
        if 1 in ops:
            other = torch.where(op == 1, gray.mean(dim=(1, 2, 3), keepdim=True), other)
        if 2 in ops:
            other = torch.where(op == 2, gray, other)
        # torchvision's blend, clamped after each op.
        out = (factor * images + (1.0 - factor) * other).clamp(0, 1) if ops != (3,) else images
        if 3 in ops:
            out = torch.where(op == 3, _shift_hue(images, factor), out)
        images = out
    return images


@functools.cache
def _compiled_color_jitter():
    return torch.compile(_color_jitter)


def _shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_hue`` (to HSV, hue + shift turns mod 1, back to RGB) with a shift per image.

    HSV's value is the channel maximum and value x saturation the chroma (max - min), so only the hue is computed;
    the way back uses the case-free form of HSV -> RGB: channel n (R 5, G 3, B 1) is
    ``max - chroma * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 * hue) mod 6``.
    """
    r, g, b = images.unbind(1)
    high, low = images.amax(dim=1), images.amin(dim=1)
    chroma = high - low
    divisor = torch.where(chroma == 0, 1.0, chroma)
    rc, gc, bc = (high - r) / divisor, (high - g) / divisor, (high - b) / divisor
    sixths = torch.where(high == r, bc - gc, torch.where(high == g, 2.0 + rc - bc, 4.0 + gc - rc))  # as torchvision
    sixths = (sixths + 6 * shift.view(-1, 1, 1)) % 6
    channels = [(n + sixths) % 6 for n in (5, 3, 1)]
    return torch.stack([high - chroma * torch.minimum(k, 4 - k).clamp(0, 1) for k in channels], dim=1)
