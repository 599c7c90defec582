"""Data for ASGE training: image datasets through Hugging Face ``datasets``, decoded once into uint8 tensors.

Small benchmarks (MNIST, FashionMNIST, CIFAR) fit in memory: they are decoded once, cached as safetensors, kept on
the training device and augmented there in batches (``timm_asge.augment``). Large ones (ImageNet) go through a
``DataLoader`` with workers (``image_loader``).

Sources: ``'digits'`` (scikit-learn's bundled handwritten digits, no download), a Hub id (``'ylecun/mnist'``) or a
local folder in the Hub's parquet layout or an imagefolder.
"""
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torchvision import transforms as T

from .fileio import atomic_path

__all__ = [
    'ImageData', 'SplitNotFoundError', 'UnreadableImageError', 'load_dataset_split', 'find_columns', 'label_names',
    'load_tensors', 'split_train_val', 'epoch_indices', 'epoch_batches', 'num_batches', 'to_model_input',
    'image_loader',
]

_MODES = {1: 'L', 3: 'RGB'}  # PIL's mode for each channel count
# Label columns tried in order when a dataset has several ClassLabel features (CIFAR-100: fine before coarse).
_LABEL_PREFERENCE = ('label', 'fine_label', 'labels', 'target')


class SplitNotFoundError(ValueError):
    """A dataset has no split of the requested name; callers add how their user picks another."""

    def __init__(self, source: str, split: str, available: Sequence[str]):
        super().__init__(f'dataset {source!r} has no split {split!r}; it has {sorted(available)}')


class UnreadableImageError(ValueError):
    """A row whose image cannot be decoded (corrupt, cut short or null); the message names its split and row or path."""


@dataclass
class ImageData:
    """Decoded images (N, C, H, W) uint8 and labels (N,) int64, with the dataset's class names."""
    images: torch.Tensor
    labels: torch.Tensor
    label_names: List[str]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device) -> 'ImageData':
        return ImageData(self.images.to(device), self.labels.to(device), self.label_names)


def _load_digits(split: str, img_size: int, channels: int) -> ImageData:
    from sklearn.datasets import load_digits

    if split not in ('train', 'test'):
        raise SplitNotFoundError('digits', split, ['train', 'test'])
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().mul(255 / 16).round()[:, None].expand(-1, channels, -1, -1)
    if img_size != images.shape[-1]:
        images = F.interpolate(images, size=(img_size, img_size), mode='bilinear', antialias=True, align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8).contiguous()
    # A fixed, seeded 80/20 train/test split of the 1,797 digits (scikit-learn ships no split).
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    index = perm[len(images) // 5:] if split == 'train' else perm[:len(images) // 5]
    return ImageData(images[index], torch.from_numpy(digits.target)[index].long(), [str(i) for i in range(10)])


def load_dataset_split(source: str, split: str):
    """One split of a Hub id or a local folder (parquet files or an imagefolder), not decoded."""
    local = Path(source).expanduser()
    try:
        if local.is_dir():
            ds = datasets.load_dataset(str(local))  # infers parquet or imagefolder from the files
        elif source.startswith(('.', '/', '~')):
            raise ValueError(f'data folder {source!r} does not exist')
        else:
            ds = datasets.load_dataset(source)
    except (ConnectionError, OSError) as err:
        raise ValueError(f'could not load dataset {source!r} ({type(err).__name__}: {err}); offline, pass a local '
                         f'copy: data.path=/path/to/folder (<split>-*.parquet files or an imagefolder)') from err
    except ValueError as err:  # datasets refuses a split file with no rows: 'Instruction "test" corresponds to no data'
        raise ValueError(f'dataset {source!r} has an empty split ({err}); remove its file or give it rows') from None
    if split not in ds:
        raise SplitNotFoundError(source, split, list(ds))
    if not len(ds[split]):
        raise ValueError(f'split {split!r} of dataset {source!r} has no rows; give it rows or choose another split')
    return ds[split]


def find_columns(features, image_column: Optional[str] = None, label_column: Optional[str] = None) -> Tuple[str, str]:
    """Pick the image and label columns from a dataset's features, or check that the configured ones fit."""
    columns = list(features)
    # An Image feature, or the {bytes, path} struct a parquet file without Hugging Face metadata holds.
    images = [n for n, f in features.items()
              if isinstance(f, datasets.Image) or (isinstance(f, dict) and {'bytes', 'path'} <= set(f))]
    class_labels = [n for n, f in features.items() if isinstance(f, datasets.ClassLabel)]
    class_labels.sort(key=lambda n: _LABEL_PREFERENCE.index(n) if n in _LABEL_PREFERENCE else len(_LABEL_PREFERENCE))
    labels = class_labels + [n for n, f in features.items()
                             if isinstance(f, datasets.Value) and f.dtype.startswith(('int', 'uint'))]
    if image_column is None and not images:
        raise ValueError(f'the dataset has no image column (columns: {columns}); set data.image_column')
    if label_column is None and not class_labels:
        raise ValueError(f'the dataset has no ClassLabel column (columns: {columns}); set data.label_column')
    image_column = images[0] if image_column is None else image_column
    label_column = class_labels[0] if label_column is None else label_column
    for role, name, fits, kind in (('image', image_column, images, 'images'),
                                   ('label', label_column, labels, 'integer class labels')):
        if name not in features:
            raise ValueError(f'the dataset has no {role} column {name!r} (columns: {columns}); '
                             f'set data.{role}_column to one of them')
        if name not in fits:
            hint = f'set it to one of {fits}' if fits else 'the dataset has none'
            raise ValueError(f'data.{role}_column={name!r} holds {features[name]}, not {kind}; {hint}')
    return image_column, label_column


def label_names(dataset, label_column: str) -> List[str]:
    """Class names of a ClassLabel column, else ``'0'..'K-1'`` for integer labels up to K - 1."""
    if isinstance(dataset.features[label_column], datasets.ClassLabel):
        return list(dataset.features[label_column].names)
    return [str(i) for i in range(int(max(dataset[label_column])) + 1)]


def load_tensors(
        source: str,
        split: str,
        img_size: int,
        channels: int,
        image_column: Optional[str] = None,
        label_column: Optional[str] = None,
        cache_dir: Optional[os.PathLike] = None,
) -> ImageData:
    """Decode a whole split of ``source`` (``'digits'``, a Hub id or a local folder) once into uint8 tensors of
    ``channels`` x ``img_size`` x ``img_size``, cached as safetensors in ``cache_dir`` (``$TIMM_ASGE_CACHE`` or
    ``~/.cache/timm_asge``). Columns not given are found from the features (:func:`find_columns`)."""
    if channels not in (1, 3):
        raise ValueError(f'data.channels must be 1 or 3, got {channels}')
    if source == 'digits':
        return _load_digits(split, img_size, channels)
    cache_dir = Path(cache_dir or os.environ.get('TIMM_ASGE_CACHE', Path.home() / '.cache' / 'timm_asge'))
    local = Path(source).expanduser()
    # A local source is keyed by its files' names, sizes and modification times: a replaced file is decoded again.
    identity = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(local.resolve().rglob('*'))
                if f.is_file()] if local.is_dir() else source
    key = json.dumps([identity, split, img_size, channels, image_column, label_column])
    cache_file = cache_dir / f'{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors'
    try:
        tensors = load_file(cache_file)
        return ImageData(tensors['images'], tensors['labels'], json.loads(bytes(tensors['label_names'].tolist())))
    except (SafetensorError, OSError, KeyError, ValueError):  # not cached yet, or a cut-short entry: decode again
        pass

    ds = load_dataset_split(source, split)
    image_column, label_column = find_columns(ds.features, image_column, label_column)
    names = label_names(ds, label_column)
    # Decode the raw bytes with PIL ourselves: ~30x faster than the torch formatter for 60k small PNGs.
    table = ds.cast_column(image_column, datasets.Image(decode=False)).with_format('arrow')[:]
    images = torch.empty(len(table), channels, img_size, img_size, dtype=torch.uint8)
    for i, item in enumerate(table[image_column].to_pylist()):
        try:
            image = Image.open(io.BytesIO(item['bytes']) if item['bytes'] else item['path']).convert(_MODES[channels])
        except (OSError, TypeError, ValueError) as err:  # a corrupt or cut-short file, or no image at all (null)
            raise UnreadableImageError(f'row {i} of split {split!r} of {source!r} holds no readable image '
                             f'({type(err).__name__}: {err}); fix or remove that row') from None
        if image.size != (img_size, img_size):
            image = image.resize((img_size, img_size), Image.BILINEAR)
        images[i] = torch.from_numpy(np.atleast_3d(np.array(image))).permute(2, 0, 1)
    labels = torch.tensor(table[label_column].to_pylist(), dtype=torch.long)
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(names)):
        raise ValueError(f'dataset {source!r} has labels outside [0, {len(names)}) (min {int(labels.min())}, '
                         f'max {int(labels.max())}); unlabelled splits (label -1) cannot be used for training or test')
    name_bytes = torch.tensor(list(json.dumps(names).encode()), dtype=torch.uint8)
    with atomic_path(cache_file) as tmp:
        save_file({'images': images, 'labels': labels, 'label_names': name_bytes}, str(tmp))
    return ImageData(images, labels, names)


def split_train_val(data: Any, val_size: float, seed: int) -> Tuple[Any, Any]:
    """Seeded split of ``ImageData`` or a ``datasets.Dataset`` into train and validation (``val_size``: a count or a
    fraction): the one ``random_split(data, [train, val])`` makes after ``torch.manual_seed(seed)``, so seed 42 on MNIST
    or FashionMNIST gives the authors' split."""
    n_val = int(val_size) if val_size >= 1 else int(round(len(data) * val_size))
    if not 0 < n_val < len(data):
        raise ValueError(f'data.val_size={val_size} leaves no training or no validation samples of {len(data)}')
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    train, val = perm[:len(data) - n_val], perm[len(data) - n_val:]
    if isinstance(data, ImageData):
        return tuple(ImageData(data.images[i], data.labels[i], data.label_names) for i in (train, val))
    return data.select(train.tolist()), data.select(val.tolist())


def epoch_indices(num_samples: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """This rank's sample order for one epoch: every ``world_size``-th index of one seeded permutation, padded by
    wrapping around (as ``DistributedSampler``) so every rank runs the same number of steps."""
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    padded = math.ceil(num_samples / world_size) * world_size
    return torch.cat([perm, perm[:padded - num_samples]])[rank::world_size]


def epoch_batches(
        data: ImageData,
        batch_size: int,
        epoch: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        start: int = 0,
) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(batch index, images, labels)`` of one epoch from tensors already on the device, from batch ``start``
    on (a run resumed mid-epoch skips the batches it trained on). Without ``shuffle`` (evaluation), each rank takes
    every ``world_size``-th sample in order, unpadded.
    """
    if shuffle:
        index = epoch_indices(len(data), epoch, seed, rank, world_size).to(data.labels.device)
    else:
        index = torch.arange(rank, len(data), world_size, device=data.labels.device)
    for b in range(start, math.ceil(len(index) / batch_size)):
        batch = index[b * batch_size:(b + 1) * batch_size]
        yield b, data.images[batch], data.labels[batch]


def num_batches(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Batches per rank in a shuffled epoch of :func:`epoch_batches`."""
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to floats in [0, 1] (the model RMS-normalises them itself, so no mean/std)."""
    return images.float().div_(255)


class _EpochSampler(torch.utils.data.Sampler):
    """A seeded order per epoch whose keys carry the epoch (``epoch * N + i``) to seed each image's augmentation.

    Epochs follow ``set_epoch`` (which accelerate's prepared loader calls before each pass); without it, each pass is
    the next epoch.
    """

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

    def __getitems__(self, keys: List[int]) -> List[Dict[str, Any]]:
        rows = [key % len(self.dataset) for key in keys]
        try:
            batch = self.dataset[rows]  # one read (and decode) of the batch's rows
        except (OSError, ValueError):  # a file PIL cannot open: find which
            for row in rows:
                try:
                    self.dataset[row]
                except (OSError, ValueError) as err:
                    raise self._unreadable(row, err) from None
            raise
        samples = []
        for key, row, image, label in zip(keys, rows, batch[self.image_column], batch[self.label_column]):
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only (torch.manual_seed would reseed the GPU's too, which fork_rng(devices=[]) does
                # not restore); the seed in the high bits, so no (seed, key) pair shares another's draws.
                torch.default_generator.manual_seed(((self.seed % 2 ** 32) << 32) + key % 2 ** 32)
                try:
                    samples.append({'image': self.transform(image), 'label': label})
                except (OSError, TypeError, ValueError) as err:  # a null image, or one cut short (read lazily)
                    raise self._unreadable(row, err) from None
        return samples

    def _unreadable(self, row: int, err: Exception) -> UnreadableImageError:
        raw = self.dataset.cast_column(self.image_column, datasets.Image(decode=False))[row][self.image_column]
        where = f"image {raw['path']}" if raw and raw.get('path') else f'the image of row {row}'
        return UnreadableImageError(f'{where} in split {str(self.dataset.split)!r} cannot be read '
                                    f'({type(err).__name__}: {err}); fix or remove it')


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
    """DataLoader over a ``datasets.Dataset`` too large for memory (ImageNet), decoding in worker processes; yields
    ``{'image': uint8 (B, C, H, W), 'label': int64 (B,)}``.

    Training takes a random resized crop and flip seeded per (``seed``, epoch, image), so a run resumed mid-epoch
    draws what the uninterrupted run drew. Evaluation resizes to ``img_size / 0.875`` and takes the centre crop.
    """
    image_column, label_column = find_columns(dataset.features, image_column, label_column)
    dataset = dataset.cast_column(image_column, datasets.Image(mode=_MODES[channels]))
    if train:
        ops = [T.RandomResizedCrop(img_size), T.RandomHorizontalFlip()]
    else:
        ops = [T.Resize(int(img_size / 0.875)), T.CenterCrop(img_size)]
    transform = T.Compose(ops + [T.PILToTensor()])
    return torch.utils.data.DataLoader(
        _SeededImages(dataset, transform, image_column, label_column, seed),
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
