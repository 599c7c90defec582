"""The recipe's train/validation/test splits and how it iterates them, on one process or many."""
import contextlib
import math
from typing import Any, Dict, Iterator, List, Tuple

import torch
from accelerate import Accelerator

from ..augment import augment_batch, check_color_jitter
from ..data import (
    SplitNotFoundError, UnreadableImageError, epoch_batches, find_columns, image_loader, label_names,
    load_dataset_split, load_tensors, num_batches, split_train_val, to_model_input,
)
from .config import RecipeError

__all__ = ['RecipeData', 'load_split', 'split_label_names', 'eval_batches']


class RecipeData:
    """The train/validation/test splits and how to iterate them.

    Small benchmarks are decoded once into uint8 tensors kept on the training device, shuffled per epoch with a
    seeded permutation sharded over processes, and augmented there in batches. With ``data.in_memory: false``
    (ImageNet) DataLoader workers decode and augment, and accelerate shards the training loader.
    """

    def __init__(self, config: Dict[str, Any], accelerator: Accelerator):
        self.cfg, self.train_cfg, self.accelerator = config['data'], config['train'], accelerator
        cfg = self.cfg
        seed = self.train_cfg['seed'] if cfg['split_seed'] is None else cfg['split_seed']
        try:
            if cfg['color_jitter'] is not None:
                check_color_jitter(cfg['color_jitter'])  # before minutes of decoding, not at the first batch
            with accelerator.main_process_first():
                train = load_split(cfg, cfg['train_split'])
                self.test = load_split(cfg, cfg['test_split'])
                self.train, self.val = split_train_val(train, cfg['val_size'], seed)
            self.label_names = split_label_names(cfg, train)
            test_names = split_label_names(cfg, self.test)
        except SplitNotFoundError as err:
            raise RecipeError(f'{err}. Set data.train_split / data.test_split in the config') from None
        except ValueError as err:
            raise RecipeError(str(err)) from None
        if test_names != self.label_names[:len(test_names)]:  # a model trained on these cannot predict them
            raise RecipeError(f"the {cfg['test_split']} split's classes ({len(test_names)}: {test_names[:12]}) are not "
                              f"those of the {cfg['train_split']} split ({len(self.label_names)}: "
                              f"{self.label_names[:12]}); use splits of the same classes")
        if cfg['in_memory']:
            self.train, self.val, self.test = (s.to(accelerator.device) for s in (self.train, self.val, self.test))
        self.sizes = {'train': len(self.train), 'validation': len(self.val), 'test': len(self.test)}
        self.augment_gen = torch.Generator(device=accelerator.device)
        per_process = math.ceil(self.sizes['train'] / accelerator.num_processes)
        batch_size = self.train_cfg['batch_size']
        if cfg['in_memory'] and batch_size > per_process:
            accelerator.print(f'note: train.batch_size={batch_size} is more than the {per_process} training images of '
                              f'each process: every epoch is one step of {per_process} images')
        if not cfg['in_memory']:
            self.train_loader = accelerator.prepare(image_loader(
                self.train, cfg['img_size'], cfg['channels'], batch_size, train=True, num_workers=cfg['num_workers'],
                image_column=cfg['image_column'], label_column=cfg['label_column'], seed=self.train_cfg['seed']))
        if self.steps_per_epoch() == 0:  # streamed batches drop the last, incomplete one
            raise RecipeError(f"the training split's {self.sizes['train']} images make no full batch of "
                              f'train.batch_size={batch_size} on each of {accelerator.num_processes} process(es); '
                              f'lower train.batch_size')

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def steps_per_epoch(self) -> int:
        if self.cfg['in_memory']:
            return num_batches(self.sizes['train'], self.train_cfg['batch_size'], self.accelerator.num_processes)
        return len(self.train_loader)

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
        """``(batch index, float images, labels)`` of one epoch on this process, from batch ``start`` on."""
        acc, cfg, seed = self.accelerator, self.cfg, self.train_cfg['seed']
        if not cfg['in_memory']:
            self.train_loader.set_epoch(epoch)
            loader = acc.skip_first_batches(self.train_loader, start) if start else self.train_loader
            with _unreadable_images():
                for index, batch in enumerate(loader, start):
                    yield index, to_model_input(batch['image']), batch['label']
            return
        # Inductor compiles the jitter with the step (another backend generates no fused kernels for it).
        compile_jitter = self.train_cfg['compile'] is not False and self.train_cfg['compile_backend'] == 'inductor'
        augment = dict(crop_padding=cfg['crop_padding'], hflip=cfg['hflip'], color_jitter=cfg['color_jitter'],
                       grayscale_p=cfg['grayscale_p'], compile_jitter=compile_jitter)
        for index, images, labels in epoch_batches(self.train, self.train_cfg['batch_size'], epoch, seed,
                                                   acc.process_index, acc.num_processes, start=start):
            # Seeded per batch: a run resumed mid-epoch draws the same augmentation as an uninterrupted one.
            self.augment_gen.manual_seed(seed * 1_000_003 + epoch * 10_007 + index + acc.process_index * 7_919_111)
            yield index, augment_batch(to_model_input(images), self.augment_gen, **augment), labels

    def eval_batches(self, split: str) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """``(float images, labels)`` of this process's shard of ``'validation'`` or ``'test'``."""
        data = self.val if split == 'validation' else self.test
        return eval_batches(self.accelerator, self.cfg, data, self.train_cfg['eval_batch_size'])


def load_split(cfg: Dict[str, Any], split: str):
    """One split of the configured dataset: uint8 tensors (``data.in_memory``) or a ``datasets.Dataset`` to stream."""
    source = cfg['path'] or cfg['source']
    if source == 'digits' and not cfg['in_memory']:
        raise ValueError("the bundled 'digits' dataset is held in memory only; set data.in_memory=true")
    if cfg['in_memory']:
        return load_tensors(source, split, img_size=cfg['img_size'], channels=cfg['channels'],
                            cache_dir=cfg['cache_dir'], image_column=cfg['image_column'],
                            label_column=cfg['label_column'])
    return load_dataset_split(source, split)


def split_label_names(cfg: Dict[str, Any], data) -> List[str]:
    """Class names of a split that :func:`load_split` returned."""
    if cfg['in_memory']:
        return data.label_names
    return label_names(data, find_columns(data.features, cfg['image_column'], cfg['label_column'])[1])


def eval_batches(accelerator: Accelerator, cfg: Dict[str, Any], data, batch_size: int
                 ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``(float images, labels)`` of this process's shard of an evaluation split (no augmentation, no padding)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg['in_memory']:
        for _, images, labels in epoch_batches(data, batch_size, rank=rank, world_size=world, shuffle=False):
            yield to_model_input(images), labels
        return
    shard = data.shard(num_shards=world, index=rank, contiguous=True)
    loader = image_loader(shard, cfg['img_size'], cfg['channels'], batch_size, train=False,
                          num_workers=cfg['num_workers'], image_column=cfg['image_column'],
                          label_column=cfg['label_column'])
    with _unreadable_images():
        for batch in loader:
            device = accelerator.device
            yield (to_model_input(batch['image'].to(device, non_blocking=True)),
                   batch['label'].to(device, non_blocking=True))


@contextlib.contextmanager
def _unreadable_images() -> Iterator[None]:
    """A DataLoader worker's unreadable image as one line: the worker's error arrives wrapped in its traceback."""
    try:
        yield
    except UnreadableImageError as err:  # from a worker: "Caught ... Original Traceback ... UnreadableImageError: ..."
        line = str(err).strip().splitlines()[-1]
        raise RecipeError(line.partition(f'{UnreadableImageError.__name__}: ')[2] or line) from None
