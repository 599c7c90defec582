"""Data for ASGE training: image datasets through Hugging Face ``datasets``, decoded once into uint8 tensors.

Small benchmarks (MNIST, FashionMNIST, CIFAR) fit in memory: they are decoded once, cached as safetensors, kept on
the training device and augmented there in batches (no per-image PIL work in the training loop). Large ones
(ImageNet) go through a ``DataLoader`` with workers (``image_loader``).

Sources: ``'digits'`` (scikit-learn's bundled handwritten digits, no download), a Hub id (``'ylecun/mnist'``) or a
local folder in the Hub's parquet layout or an imagefolder.
"""
import functools
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .fileio import atomic_path

__all__ = [
    'ImageData', 'SplitNotFoundError', 'load_dataset_split', 'find_columns', 'decode_images', 'load_tensors',
    'split_train_val', 'epoch_batches', 'augment_batch', 'check_color_jitter', 'to_model_input', 'default_cache_dir',
    'image_transform', 'image_loader', 'label_names',
]

def default_cache_dir() -> Path:
    """Where decoded tensors are cached: ``$TIMM_ASGE_CACHE``, else ``~/.cache/timm_asge``."""
    return Path(os.environ.get('TIMM_ASGE_CACHE', Path.home() / '.cache' / 'timm_asge'))
# Label columns tried in order when a dataset has several ClassLabel features (CIFAR-100: fine before coarse).
_LABEL_PREFERENCE = ('label', 'fine_label', 'labels', 'target')


class SplitNotFoundError(ValueError):
    """A dataset has no split of the requested name; ``available`` lists the splits it has.

    The message names both; callers add how their user picks a split (a config key, a command-line flag).
    """

    def __init__(self, source: str, split: str, available: Sequence[str]):
        self.source, self.split, self.available = source, split, sorted(available)
        super().__init__(f'dataset {source!r} has no split {split!r}; it has {self.available}')


@dataclass
class ImageData:
    """Decoded images (N, C, H, W) uint8 and labels (N,) int64, with the dataset's class names."""
    images: torch.Tensor
    labels: torch.Tensor
    label_names: List[str]

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, index: torch.Tensor) -> 'ImageData':
        return ImageData(self.images[index], self.labels[index], self.label_names)

    def to(self, device) -> 'ImageData':
        return ImageData(self.images.to(device), self.labels.to(device), self.label_names)


def _load_digits(split: str):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().mul(255 / 16).round().to(torch.uint8)[:, None]
    labels = torch.from_numpy(digits.target).long()
    # A fixed, seeded 80/20 train/test split of the 1,797 digits (scikit-learn ships no split).
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = len(labels) // 5
    if split not in ('train', 'test'):
        raise SplitNotFoundError('digits', split, ['train', 'test'])
    index = perm[n_test:] if split == 'train' else perm[:n_test]
    return images[index], labels[index], [str(i) for i in range(10)]


def load_dataset_split(source: str, split: str, cache_dir: Optional[str] = None):
    """Load one split of a Hub id, a local parquet folder or an imagefolder as a ``datasets.Dataset``.

    Raises a :class:`SplitNotFoundError` when the split is missing, and a ValueError that says what to do when a Hub id
    cannot be reached (offline).
    """
    import datasets

    local = Path(source).expanduser()
    try:
        if local.is_dir():
            builder = 'imagefolder' if _looks_like_imagefolder(local) else None
            ds = (datasets.load_dataset('imagefolder', data_dir=str(local), cache_dir=cache_dir) if builder
                  else datasets.load_dataset(str(local), cache_dir=cache_dir))
        elif local.suffix == '.parquet' and local.exists():
            ds = datasets.load_dataset('parquet', data_files={split: str(local)}, cache_dir=cache_dir)
        else:
            if source.startswith(('.', '/', '~')):
                raise ValueError(f'data folder {source!r} does not exist')
            ds = datasets.load_dataset(source, cache_dir=cache_dir)
    except (ConnectionError, OSError, FileNotFoundError) as err:
        raise ValueError(
            f'could not load dataset {source!r} ({type(err).__name__}: {err}). If this machine is offline, download '
            f'the dataset elsewhere and pass its local folder instead (data.path=/path/to/folder, a folder of '
            f'<split>-*.parquet files as on the Hub or an imagefolder)') from err
    if split not in ds:
        raise SplitNotFoundError(source, split, list(ds))
    return ds[split]


def _looks_like_imagefolder(path: Path) -> bool:
    return not any(path.glob('**/*.parquet')) and any(p.is_dir() for p in path.iterdir())


def find_columns(features, image_column: Optional[str] = None, label_column: Optional[str] = None) -> Tuple[str, str]:
    """Pick the image and label columns from a dataset's features (or check the configured ones exist)."""
    import datasets

    columns = list(features)
    if image_column is None:
        found = [name for name, feat in features.items() if isinstance(feat, datasets.Image)]
        if not found:
            raise ValueError(f'the dataset has no image column (columns: {columns}); set data.image_column')
        image_column = found[0]
    if label_column is None:
        found = [name for name, feat in features.items() if isinstance(feat, datasets.ClassLabel)]
        found.sort(key=lambda n: _LABEL_PREFERENCE.index(n) if n in _LABEL_PREFERENCE else len(_LABEL_PREFERENCE))
        if not found:
            raise ValueError(f'the dataset has no ClassLabel column (columns: {columns}); set data.label_column')
        label_column = found[0]
    for role, name in (('image', image_column), ('label', label_column)):
        if name not in features:
            raise ValueError(f'the dataset has no {role} column {name!r} (columns: {columns}); '
                             f'set data.{role}_column to one of them')
    if not _is_image(features[image_column]):
        images = [n for n, f in features.items() if _is_image(f)]
        raise ValueError(f'data.image_column={image_column!r} holds {features[image_column]}, not images; set it to '
                         f'an image column ({images or "the dataset has none"})')
    if not _is_label(features[label_column]):
        labels = [n for n, f in features.items() if _is_label(f)]
        raise ValueError(f'data.label_column={label_column!r} holds {features[label_column]}, not integer class '
                         f'labels; set it to a label column ({labels or "the dataset has none"})')
    return image_column, label_column


def _is_image(feature) -> bool:
    import datasets

    # An Image feature, or the {bytes, path} struct a parquet file without Hugging Face metadata holds.
    return isinstance(feature, datasets.Image) or (isinstance(feature, dict) and {'bytes', 'path'} <= set(feature))


def _is_label(feature) -> bool:
    import datasets

    return isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(('int', 'uint')))


def label_names(dataset, label_column: str) -> List[str]:
    """Class names of a ClassLabel column, else ``'0'..'K-1'`` for integer labels up to K - 1."""
    import datasets

    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return [str(i) for i in range(int(max(dataset[label_column])) + 1)]


def decode_images(encoded: Sequence[dict], size: int, channels: int) -> torch.Tensor:
    """Decode encoded images (``{'bytes', 'path'}`` dicts), convert to ``channels`` and resize to ``size``.

    Returns:
        uint8 tensor (N, channels, size, size). Resizing is bilinear with antialiasing, done once here.
    """
    import numpy as np
    from PIL import Image

    mode = {1: 'L', 3: 'RGB'}[channels]
    out = torch.empty(len(encoded), channels, size, size, dtype=torch.uint8)
    for i, item in enumerate(encoded):
        image = Image.open(io.BytesIO(item['bytes']) if item.get('bytes') else item['path']).convert(mode)
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        array = np.array(image)
        out[i] = torch.from_numpy(array[:, :, None] if array.ndim == 2 else array).permute(2, 0, 1)
    return out


def load_tensors(
        source: str,
        split: str,
        img_size: int,
        channels: int,
        image_column: Optional[str] = None,
        label_column: Optional[str] = None,
        cache_dir: Optional[os.PathLike] = None,
) -> ImageData:
    """Decode a whole split once into uint8 tensors, cached as safetensors for later runs.

    Args:
        source: ``'digits'``, a Hub id or a local folder.
        split: Split name.
        img_size: Side the images are resized to.
        channels: 1 (greyscale) or 3 (RGB).
        image_column: Image column (found from the features if None).
        label_column: Label column (the ClassLabel feature if None).
        cache_dir: Where decoded tensors are cached (``$TIMM_ASGE_CACHE`` or ``~/.cache/timm_asge``).
    """
    if channels not in (1, 3):
        raise ValueError(f'data.channels must be 1 or 3, got {channels}')
    if source == 'digits':
        images, labels, names = _load_digits(split)
        images = _resize_uint8(images.expand(-1, channels, -1, -1), img_size)
        return _checked(ImageData(images, labels, names), source)

    cache_dir = Path(cache_dir or default_cache_dir())
    key = json.dumps([str(Path(source).expanduser().resolve()) if Path(source).exists() else source, split, img_size,
                      channels, image_column, label_column])
    cache_file = cache_dir / f'{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors'
    if cache_file.exists():
        tensors = load_file(cache_file)
        names = json.loads(bytes(tensors['label_names'].tolist()).decode())
        return ImageData(tensors['images'], tensors['labels'], names)

    import datasets
    import pyarrow.compute as pc

    ds = load_dataset_split(source, split)
    image_column, label_column = find_columns(ds.features, image_column, label_column)
    names = label_names(ds, label_column)
    # Decode the raw bytes with PIL ourselves: ~30x faster than the torch formatter for 60k small PNGs.
    raw = ds.cast_column(image_column, datasets.Image(decode=False)).with_format('arrow')
    table = raw[:]
    encoded = [{'bytes': b, 'path': p} for b, p in zip(pc.struct_field(table[image_column], 'bytes').to_pylist(),
                                                      pc.struct_field(table[image_column], 'path').to_pylist())]
    images = decode_images(encoded, img_size, channels)
    labels = torch.tensor(table[label_column].to_pylist(), dtype=torch.long)
    data = _checked(ImageData(images, labels, names), source)
    name_bytes = torch.tensor(list(json.dumps(names).encode()), dtype=torch.uint8)
    with atomic_path(cache_file) as tmp:
        save_file({'images': data.images, 'labels': data.labels, 'label_names': name_bytes}, str(tmp))
    return data


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.contiguous()
    resized = F.interpolate(images.float(), size=(size, size), mode='bilinear', antialias=True, align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


def _checked(data: ImageData, source: str) -> ImageData:
    labels = data.labels
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= data.num_classes):
        raise ValueError(f'dataset {source!r} has labels outside [0, {data.num_classes}) (min {int(labels.min())}, '
                         f'max {int(labels.max())}); unlabelled splits (label -1) cannot be used for training or test')
    return data


def split_train_val(data: Any, val_size: float, seed: int) -> Tuple[Any, Any]:
    """Seeded random split of the training set into train and validation (``val_size``: count or fraction).

    The split ``torch.utils.data.random_split(data, [train, val])`` makes after ``torch.manual_seed(seed)``, so seed
    42 on MNIST or FashionMNIST (in their original order) gives the authors' split.

    Args:
        data: Decoded ``ImageData``, or a ``datasets.Dataset`` (split with ``select``, still undecoded).
        val_size: Validation samples: a count, or a fraction of ``data``.
        seed: Seed of the permutation.
    """
    n_val = int(val_size) if val_size >= 1 else int(round(len(data) * val_size))
    if not 0 < n_val < len(data):
        raise ValueError(f'data.val_size={val_size} leaves no training or no validation samples of {len(data)}')
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_train = len(data) - n_val
    if isinstance(data, ImageData):
        return data.subset(perm[:n_train]), data.subset(perm[n_train:])
    return data.select(perm[:n_train].tolist()), data.select(perm[n_train:].tolist())


def epoch_indices(num_samples: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """This rank's sample order for one epoch.

    Every rank draws the same seeded permutation and takes every ``world_size``-th index from its rank on, so the
    ranks together see each sample once. Like ``DistributedSampler``, the permutation is padded by wrapping around
    to a multiple of ``world_size`` so every rank runs the same number of steps.
    """
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    padded = math.ceil(num_samples / world_size) * world_size
    if padded > num_samples:
        perm = torch.cat([perm, perm[:padded - num_samples]])
    return perm[rank::world_size]


def epoch_batches(
        data: ImageData,
        batch_size: int,
        epoch: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = False,
        start: int = 0,
) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(batch index, images, labels)`` of one epoch from tensors already on the device.

    Args:
        start: Batch index to start from (resuming mid-epoch skips the batches already trained on).
    """
    if shuffle:
        index = epoch_indices(len(data), epoch, seed, rank, world_size).to(data.labels.device)
    else:
        index = torch.arange(rank, len(data), world_size, device=data.labels.device)
    num_batches = len(index) // batch_size if drop_last else math.ceil(len(index) / batch_size)
    for b in range(start, num_batches):
        batch = index[b * batch_size:(b + 1) * batch_size]
        yield b, data.images[batch], data.labels[batch]


def num_batches(num_samples: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    per_rank = math.ceil(num_samples / world_size)
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


def to_model_input(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images to floats in [0, 1] (the model RMS-normalises them itself, so no mean/std)."""
    return images.to(dtype).div_(255)


def augment_batch(
        images: torch.Tensor,
        generator: torch.Generator,
        crop_padding: int = 0,
        hflip: bool = False,
        color_jitter: Optional[Sequence[float]] = None,
        grayscale_p: float = 0.0,
        compile_jitter: bool = False,
) -> torch.Tensor:
    """The paper's augmentation, batched on the images' device with per-sample randomness.

    Args:
        images: Float images in [0, 1], (B, C, H, W).
        generator: Random generator on the images' device (seeded per batch, so a resumed run repeats it).
        crop_padding: Random crop of the original size from the image zero-padded by this many pixels.
        hflip: Horizontal flip with probability 0.5.
        color_jitter: (brightness, contrast, saturation, hue) with torchvision's ``ColorJitter`` semantics: every
            image draws its own factors and its own order of the four ops, each op is torchvision's (same blends,
            clamped after each, hue through HSV). RGB only.
        grayscale_p: Probability of replacing an RGB image by its greyscale version.
        compile_jitter: Run the colour jitter's arithmetic through ``torch.compile``: a few fused kernels instead of
            about a hundred small ones (on a GPU the eager version is launch-bound).
    """
    b, c, h, w = images.shape
    device = images.device
    if color_jitter is not None:
        strengths = check_color_jitter(color_jitter)
    if crop_padding:
        padded = F.pad(images, (crop_padding,) * 4)
        offset = torch.randint(0, 2 * crop_padding + 1, (2, b), device=device, generator=generator)
        rows = (offset[0, :, None] + torch.arange(h, device=device))[:, None, :, None]
        cols = (offset[1, :, None] + torch.arange(w, device=device))[:, None, None, :]
        batch_index = torch.arange(b, device=device)[:, None, None, None]
        channel_index = torch.arange(c, device=device)[None, :, None, None]
        images = padded[batch_index, channel_index, rows, cols]
    if hflip:
        flip = torch.rand(b, 1, 1, 1, device=device, generator=generator) < 0.5
        images = torch.where(flip, images.flip(-1), images)
    if c == 3 and color_jitter is not None and any(strengths):
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
        images = torch.where(to_gray, _gray(images).expand_as(images), images)
    return images


def check_color_jitter(color_jitter: Sequence[float]) -> Tuple[float, float, float, float]:
    """``(brightness, contrast, saturation, hue)`` as floats, or a ValueError saying what torchvision would accept."""
    try:
        if isinstance(color_jitter, str) or any(isinstance(v, bool) for v in color_jitter):
            raise TypeError
        strengths = tuple(float(v) for v in color_jitter)
    except (TypeError, ValueError):
        strengths = ()
    if (len(strengths) != 4 or not all(math.isfinite(v) and v >= 0 for v in strengths)
            or strengths[3] > 0.5):
        raise ValueError(f'color_jitter={color_jitter!r} must be [brightness, contrast, saturation, hue] as in '
                         f"torchvision's ColorJitter: three numbers >= 0 and a hue in [0, 0.5] (0 turns an op off), "
                         f'e.g. [0.4, 0.4, 0.4, 0.1]')
    return strengths


def _color_jitter(
        images: torch.Tensor,
        factors: torch.Tensor,
        order: torch.Tensor,
        ops: Tuple[int, ...],
) -> torch.Tensor:
    """torchvision's ColorJitter, image by image.

    Image i applies the ops ``order[i]`` (0 brightness, 1 contrast, 2 saturation, 3 hue) in that order, op k with
    ``factors[i, k]``. Each round computes every op in ``ops`` for the whole batch and keeps the one each image's
    order names there, so the batch never splits by op (that would need a host sync).
    """
    for step in range(order.shape[1]):
        op = order[:, step].view(-1, 1, 1, 1)
        factor = factors.gather(1, order[:, step:step + 1]).view(-1, 1, 1, 1)
        gray = _gray(images) if 1 in ops or 2 in ops else None
        other = images.new_zeros(())  # brightness blends with black
        if 1 in ops:
            other = torch.where(op == 1, gray.mean(dim=(1, 2, 3), keepdim=True), other)
        if 2 in ops:
            other = torch.where(op == 2, gray, other)
        out = _blend(images, other, factor) if ops != (3,) else images
        if 3 in ops:
            out = torch.where(op == 3, _shift_hue(images, factor), out)
        images = out
    return images


@functools.cache
def _compiled_color_jitter():
    return torch.compile(_color_jitter)


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's blend: ``ratio * images + (1 - ratio) * other``, clamped to [0, 1]."""
    return (ratio * images + (1.0 - ratio) * other).clamp(0, 1)


def _gray(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)  # torchvision's weights


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


class _ToMode:
    """Picklable PIL mode conversion (DataLoader workers may be spawned)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image):
        return image.convert(self.mode)


class _EpochSampler(torch.utils.data.Sampler):
    """A seeded random order for each epoch whose indices carry the epoch too (``epoch * N + i``): each image's
    augmentation is then seeded from (seed, epoch, image) alone, whichever worker decodes it and wherever a resumed run
    starts. Epochs follow ``set_epoch`` (which accelerate's prepared loader calls before each pass); without it, each
    pass is the next epoch."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return iter((epoch_indices(self.num_samples, epoch, self.seed) + epoch * self.num_samples).tolist())


class _SeededImages(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` read in batches, its PIL images transformed under a seed per (epoch, image) key.

    The transform's draws (torchvision's use the global torch generator) come from a forked generator, so neither
    the process's own random state nor the order in which workers take batches changes them.
    """

    def __init__(self, dataset, transform, image_column: str, label_column: str, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed
        self.image_column, self.label_column = image_column, label_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> Dict[str, Any]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: List[int]) -> List[Dict[str, Any]]:
        rows = self.dataset[[key % len(self.dataset) for key in keys]]  # one read of the batch's rows
        samples = []
        for key, image, label in zip(keys, rows[self.image_column], rows[self.label_column]):
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only (torch.manual_seed would reseed the GPU's too, which fork_rng(devices=[]) does
                # not restore); the seed in the high bits, so no (seed, key) pair shares another's draws.
                torch.default_generator.manual_seed(((self.seed % 2 ** 32) << 32) + key % 2 ** 32)
                samples.append({'image': self.transform(image), 'label': label})
        return samples


def image_transform(img_size: int, channels: int, train: bool, crop_pct: float = 0.875):
    """torchvision transform for the streamed (large-dataset) path: uint8 CHW output, no normalisation.

    Training: random resized crop + horizontal flip; evaluation: resize to ``img_size / crop_pct``, centre crop.
    """
    from torchvision import transforms as T

    ops = [_ToMode({1: 'L', 3: 'RGB'}[channels])]
    if train:
        ops += [T.RandomResizedCrop(img_size), T.RandomHorizontalFlip()]
    else:
        ops += [T.Resize(int(math.floor(img_size / crop_pct))), T.CenterCrop(img_size)]
    return T.Compose(ops + [T.PILToTensor()])


def image_loader(
        dataset,
        img_size: int,
        channels: int,
        batch_size: int,
        train: bool,
        num_workers: int = 4,
        image_column: Optional[str] = None,
        label_column: Optional[str] = None,
        seed: int = 0,
) -> torch.utils.data.DataLoader:
    """DataLoader over a ``datasets.Dataset`` too large to decode into memory (ImageNet): decoding and
    augmentation run in worker processes. Yields ``{'image': uint8 (B, C, H, W), 'label': int64 (B,)}``.

    Training shuffles with ``seed`` (a new order each ``set_epoch``) and seeds every image's crop and flip from
    (``seed``, epoch, image), so a run resumed mid-epoch draws what the uninterrupted run drew.
    """
    image_column, label_column = find_columns(dataset.features, image_column, label_column)
    images = _SeededImages(dataset, image_transform(img_size, channels, train), image_column, label_column, seed)
    return torch.utils.data.DataLoader(
        images,
        batch_size=batch_size,
        sampler=_EpochSampler(len(dataset), seed) if train else None,
        drop_last=train,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # Its own generator for the workers' base seed, drawn at every epoch's start: from the global one, the draw of a
        # resumed run's shortened first epoch would shift the dropout masks of every later step.
        generator=torch.Generator().manual_seed(seed),
    )
