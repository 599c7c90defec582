#!/usr/bin/env python
"""Train an ASGE model layer-locally with accelerate: one CPU, one GPU or many.

    accelerate launch recipes/train.py --config recipes/configs/digits.yaml [key=value ...]
    python recipes/train.py --config recipes/configs/fashion_mnist.yaml data.path=/data/fashion_mnist train.epochs=5
    python recipes/train.py --config recipes/configs/digits.yaml --resume          # continue the latest checkpoint

Every block learns from its own loss (``timm_asge.engine.LocalLearner``); one AdamW with a param group per block.
The output folder gets ``results.json`` (test accuracy, parameters, FLOPs and activation memory of each prediction
strategy), ``block_accuracy.png``, ``log.jsonl``, resumable ``checkpoints/`` and ``export/``: the best-validation
model in timm's Hub format, loadable with ``timm.create_model('local-dir:<output>/export', pretrained=True)``.
"""
import argparse
import copy
import difflib
import json
import math
import os
import pickle
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import timm
import torch
import yaml
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import DataLoaderConfiguration, DynamoBackend, TorchDynamoPlugin, set_seed
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

import timm_asge  # noqa: F401  (registers the asge_* models)
from timm_asge.costs import strategy_costs
from timm_asge.data import augment_batch, check_color_jitter, epoch_batches, find_columns, image_loader
from timm_asge.data import SplitNotFoundError, label_names, load_dataset_split
from timm_asge.data import load_tensors, num_batches, split_train_val, to_model_input
from timm_asge.engine import LocalLearner, all_reduce_gradients, evaluate, param_groups, pick_best_block
from timm_asge.fileio import atomic_dir, atomic_path
from timm_asge.hub import CONFIG_NAME, WEIGHTS_NAME, save_pretrained
from timm_asge.models.asge_cnn import PREDICTIONS

DEFAULTS: Dict[str, Any] = {
    'name': 'run',
    'output_dir': None,  # default: outputs/<name>
    'model': {
        'name': 'asge_cnn',
        'args': {},  # any AsgeCnn constructor argument (widths, pool_type, alpha, drop_rate, ...)
        'prediction': 'fusion',  # strategy of the exported model: fusion | last | best
    },
    'data': {
        'source': 'digits',  # 'digits', a Hub id, or a local folder (parquet layout or imagefolder)
        'path': None,  # a local folder; overrides source (use it offline)
        'image_column': None,  # found from the dataset's features when None
        'label_column': None,
        'train_split': 'train',
        'test_split': 'test',
        'val_size': 0.1,  # count, or fraction of the training split
        # Seed of the train/validation split (null: train.seed). It is torch's random_split after manual_seed, so 42
        # is the authors' split of MNIST and FashionMNIST.
        'split_seed': None,
        'img_size': 32,
        'channels': 3,
        'crop_padding': 0,
        'hflip': False,
        'color_jitter': None,  # [brightness, contrast, saturation, hue]
        'grayscale_p': 0.0,
        'cache_dir': None,
        'in_memory': True,  # decode once to device tensors; false: DataLoader workers decode (ImageNet)
        'num_workers': 8,  # DataLoader workers when in_memory is false
    },
    'train': {
        'epochs': 100,
        'max_steps': None,  # stop early after this many optimizer steps (short budgets, smoke tests)
        # End the run after this many epochs while the schedule still spans `epochs` (the first N epochs of the
        # full recipe, e.g. to compare curves; --resume with a larger value continues the same schedule).
        'stop_after_epochs': None,
        'batch_size': 128,  # per process
        'lr': 2e-4,
        'min_lr': 1e-5,  # cosine floor of `lr`; every param group decays to the same fraction of its own rate
        # Cosine learning rate after every optimizer step (true), or held for each epoch and moved at its end (false,
        # what the authors' code does; timm's train.py calls this --sched-on-updates).
        'sched_on_updates': True,
        'weight_decay': 1e-3,
        'mode': 'fused',  # fused | lean
        'mixed_precision': 'no',  # no | bf16
        'seed': 0,
        'cpu': False,
        'log_every': 50,  # steps between progress/log updates (and NaN checks)
        'checkpoint_every': 0,  # steps between checkpoints; 0 = at epoch ends only
        # Epochs between end-of-epoch checkpoints and plots (plots at most once a minute); the last epoch always saves.
        'checkpoint_epochs': 1,
        'keep_checkpoints': 2,
        'eval_batch_size': 1000,
        'channels_last': False,
        'compile': False,  # torch.compile the training step: false, true, or a mode ('reduce-overhead', ...)
        # torch.compile backend (timm's --torchcompile BACKEND): inductor, or e.g. aot_eager to trace without code
        # generation (a quick check that the step compiles; no faster than eager)
        'compile_backend': 'inductor',
        'test_every_epoch': False,  # also test every epoch, for the curve only (the best epoch is chosen on validation)
        # torch.profiler over this many steps early in the second epoch (past compilation) -> profile.txt; profiling
        # slows those steps, so leave it off for timing runs.
        'profile_steps': 0,
    },
}

# Whole-number settings: (key, smallest and largest allowed value (None: no limit), whether null is allowed). Checked
# before anything loads, so a typo stops the run at once instead of after minutes of decoding or training.
WHOLE_NUMBERS = (
    ('train.epochs', 1, None, False), ('train.max_steps', 1, None, True), ('train.stop_after_epochs', 1, None, True),
    ('train.batch_size', 1, None, False), ('train.eval_batch_size', 1, None, False),
    ('train.log_every', 1, None, False),
    ('train.checkpoint_every', 0, None, False), ('train.checkpoint_epochs', 1, None, False),
    ('train.keep_checkpoints', 1, None, False), ('train.profile_steps', 0, None, False),
    ('data.img_size', 1, None, False), ('data.channels', 1, None, False), ('data.crop_padding', 0, None, False),
    ('data.num_workers', 0, None, False),
    # Seeds python, numpy and torch (accelerate's set_seed); numpy takes [0, 2**32).
    ('train.seed', 0, 2**32 - 1, False),
)
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
CUDAGRAPH_MODES = ('reduce-overhead', 'max-autotune')  # the modes that wrap compiled graphs in CUDA graphs
# Drawing block_accuracy.png takes 0.2-0.6 s on a CPU, as long as a whole epoch of the digits job or of FashionMNIST
# on a GPU, so mid-run it is redrawn at most this often; the run's last epoch always draws it.
PLOT_INTERVAL_S = 60.0
BEST_FILES = (CONFIG_NAME, WEIGHTS_NAME)  # what save_pretrained writes into out/best (and each checkpoint keeps)


class JsonlTracker(GeneralTracker):
    """accelerate tracker writing one JSON line per ``log`` call: always available, easy to read back."""

    name = 'jsonl'
    requires_logging_directory = False

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        with self.path.open('a') as f:
            f.write(json.dumps({'config': values}) + '\n')

    def log(self, values: dict, step: Optional[int] = None, **kwargs) -> None:
        with self.path.open('a') as f:
            f.write(json.dumps({'step': step, **values}) + '\n')


class TrainState:
    """Counters and history saved with every checkpoint (``register_for_checkpointing``)."""

    def __init__(self):
        self.epoch, self.batch, self.step = 0, 0, 0
        self.best_metric, self.best_epoch = -1.0, -1
        self.history: List[Dict[str, Any]] = []
        self.train_time = 0.0  # wall clock of the run, evaluation and checkpoints included
        self.step_time = 0.0  # training steps alone (synchronised at epoch ends): what the speed figures use

    def state_dict(self) -> Dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        vars(self).update(state)


def load_config(path: Optional[str], overrides: List[str]) -> Dict[str, Any]:
    """Defaults, then the YAML file, then ``key=value`` overrides; unknown keys stop with a suggestion."""
    config = copy.deepcopy(DEFAULTS)
    if path:
        if not Path(path).is_file():
            raise SystemExit(f'error: no config file {path!r}; the benchmark configs are recipes/configs/*.yaml')
        with open(path) as f:
            loaded = _read_yaml(f, where=f'config file {path!r}', remedy='fix the file') or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f'error: config file {path!r} holds a {type(loaded).__name__}, not a mapping of sections '
                             f'(model:, data:, train:); see recipes/configs/*.yaml')
        _merge(config, loaded, where=path)
        config.setdefault('name', Path(path).stem)
        if config['name'] == DEFAULTS['name']:
            config['name'] = Path(path).stem
    for item in overrides:
        key, sep, value = item.partition('=')
        if not sep:
            raise SystemExit(f'error: override {item!r} is not key=value (e.g. train.epochs=5)')
        nested: Dict[str, Any] = {}
        node = nested
        *parents, leaf = key.split('.')
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _read_yaml(value, where=f'override {item!r}',
                                remedy=f'for text, put YAML quotes inside the shell\'s: "{key}=\'{value}\'"')
        _merge(config, nested, where='the command line')
    # YAML reads a bare `no` as False.
    if config['train']['mixed_precision'] in (False, None):
        config['train']['mixed_precision'] = 'no'
    return config


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == 'tag:yaml.org,2002:merge':
                continue  # `<<: *anchor` merges a mapping in, whose keys this mapping may override
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                break
            if duplicate:
                raise _DuplicateKeyError(None, None, f'key {key!r} is given twice', key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(stream, where: str, remedy: str) -> Any:
    try:
        return yaml.load(stream, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, 'problem_mark', None)
        at = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        if isinstance(err, _DuplicateKeyError):
            remedy = 'give each key once'
        raise SystemExit(f"error: {where} is not valid YAML ({getattr(err, 'problem', None) or err}{at}); {remedy}"
                         ) from err


def _merge(base: Dict[str, Any], new: Dict[str, Any], where: str, prefix: str = '') -> None:
    for key, value in new.items():
        if key not in base:
            close = difflib.get_close_matches(key, list(base), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f'; known keys: {", ".join(base)}'
            raise SystemExit(f"error: unknown config key '{prefix}{key}' in {where}{hint}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise SystemExit(f"error: config key '{prefix}{key}' in {where} must be a mapping")
            if key == 'args':  # model constructor arguments: free keys (the model checks them), added to the YAML's
                base[key] = {**base[key], **{name: _number_if_numeric(arg) for name, arg in value.items()}}
            else:
                _merge(base[key], value, where, prefix=f'{prefix}{key}.')
        elif isinstance(base[key], float) and not isinstance(value, bool) and isinstance(value, (str, int)):
            # YAML 1.1 reads `2e-3` (no dot) as a string.
            try:
                base[key] = float(value)
            except ValueError:
                raise SystemExit(f"error: config key '{prefix}{key}' in {where} must be a number, got {value!r}")
        else:
            base[key] = value


def _number_if_numeric(value: Any) -> Any:
    """YAML 1.1 reads `1e-1` (no dot) as a string; a free model argument that reads as a number is one."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def describe_hardware(accelerator: Accelerator) -> str:
    if accelerator.device.type == 'cuda':
        device = torch.cuda.get_device_name(accelerator.device)
    else:
        device = platform.processor() or platform.machine()
        try:
            with open('/proc/cpuinfo') as f:
                device = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
        except (OSError, StopIteration):
            pass
        device = f'{os.cpu_count()}-core CPU ({device}), {torch.get_num_threads()} thread(s) per process'
    return f'{accelerator.num_processes} x {device}, torch {torch.__version__}'


def idle_cores_hint(accelerator: Accelerator) -> Optional[str]:
    """A note when CPU training leaves cores idle: ``accelerate launch`` sets ``OMP_NUM_THREADS=1`` unless told."""
    if accelerator.device.type != 'cpu':
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    per_process = max(cores // accelerator.num_processes, 1)
    if torch.get_num_threads() > 1 or per_process == 1:  # more than accelerate's default: chosen, leave it
        return None
    return (f'note: {torch.get_num_threads()} thread(s) per process on {cores} cores (OMP_NUM_THREADS='
            f'{os.environ.get("OMP_NUM_THREADS", "unset")}; `accelerate launch` sets 1 unless told); for speed pass '
            f'`accelerate launch --num_cpu_threads_per_process {per_process}` or set OMP_NUM_THREADS={per_process}')


def run_command(argv: List[str], script: str = 'recipes/train.py') -> str:
    """The command line of this run, as a user would type it again."""
    # `accelerate launch` exports ACCELERATE_MIXED_PRECISION to the processes it starts; a plain `python` run
    # (bench/device/run.sh) is recorded as such.
    launcher = 'accelerate launch' if 'ACCELERATE_MIXED_PRECISION' in os.environ else 'python'
    return shlex.join([*launcher.split(), script, *argv])


def git_commit() -> Optional[str]:
    """HEAD's hash; where the checkout came without .git (the GPU machine), ``$TIMM_ASGE_COMMIT``."""
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get('TIMM_ASGE_COMMIT') or None


class RecipeData:
    """The train/validation/test splits and how to iterate them.

    Small benchmarks are decoded once into uint8 tensors kept on the training device, shuffled per epoch with a
    seeded permutation sharded over processes, and augmented there in batches. With ``data.in_memory: false``
    (ImageNet) DataLoader workers decode and augment, and accelerate shards the training loader.
    """

    def __init__(self, config: Dict[str, Any], accelerator: Accelerator):
        self.data_cfg, self.train_cfg, self.accelerator = config['data'], config['train'], accelerator
        data_cfg = self.data_cfg
        seed = self.train_cfg['seed'] if data_cfg['split_seed'] is None else data_cfg['split_seed']
        try:
            if data_cfg['color_jitter'] is not None:
                check_color_jitter(data_cfg['color_jitter'])  # before minutes of decoding, not at the first batch
            with accelerator.main_process_first():
                train = load_split(data_cfg, data_cfg['train_split'])
                self.test = load_split(data_cfg, data_cfg['test_split'])
                self.train, self.val = split_train_val(train, data_cfg['val_size'], seed)
            self.label_names = split_label_names(data_cfg, train)
            if data_cfg['in_memory']:
                device = accelerator.device
                self.train, self.val, self.test = self.train.to(device), self.val.to(device), self.test.to(device)
        except SplitNotFoundError as err:
            raise SystemExit(f'error: {err}. Set data.train_split / data.test_split in the config') from err
        except ValueError as err:
            raise SystemExit(f'error: {err}') from err
        self.sizes = {'train': len(self.train), 'validation': len(self.val), 'test': len(self.test)}
        per_process = math.ceil(self.sizes['train'] / accelerator.num_processes)
        if self.train_cfg['batch_size'] > per_process and data_cfg['in_memory']:  # streamed: an error, below
            accelerator.print(f"note: train.batch_size={self.train_cfg['batch_size']} is more than the {per_process} "
                              f"training images of each process: every epoch is one step of {per_process} images")
        self.augment_gen = torch.Generator(device=accelerator.device)
        if not data_cfg['in_memory']:
            self.train_loader = accelerator.prepare(image_loader(
                self.train, data_cfg['img_size'], data_cfg['channels'], self.train_cfg['batch_size'], train=True,
                num_workers=data_cfg['num_workers'], image_column=data_cfg['image_column'],
                label_column=data_cfg['label_column'], seed=self.train_cfg['seed']))

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def steps_per_epoch(self) -> int:
        if self.data_cfg['in_memory']:
            return num_batches(self.sizes['train'], self.train_cfg['batch_size'], self.accelerator.num_processes)
        return len(self.train_loader)

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
        """``(batch index, float images, labels)`` of one epoch on this process, from batch ``start`` on."""
        acc, cfg, seed = self.accelerator, self.data_cfg, self.train_cfg['seed']
        if not cfg['in_memory']:
            self.train_loader.set_epoch(epoch)
            loader = acc.skip_first_batches(self.train_loader, start) if start else self.train_loader
            for index, batch in enumerate(loader, start):
                yield index, to_model_input(batch['image']), batch['label']
            return
        # The jitter is compiled with the step, by inductor (another backend generates no fused kernels for it).
        compile_jitter = (self.train_cfg['compile'] not in (False, None)
                          and self.train_cfg['compile_backend'] == 'inductor')
        augment = dict(crop_padding=cfg['crop_padding'], hflip=cfg['hflip'], color_jitter=cfg['color_jitter'],
                       grayscale_p=cfg['grayscale_p'], compile_jitter=compile_jitter)
        for index, images, labels in epoch_batches(self.train, self.train_cfg['batch_size'], epoch, seed,
                                                   acc.process_index, acc.num_processes, start=start):
            # Seeded per batch: a run resumed mid-epoch draws the same augmentation as an uninterrupted one.
            self.augment_gen.manual_seed(seed * 1_000_003 + epoch * 10_007 + index + acc.process_index * 7_919_111)
            yield index, augment_batch(to_model_input(images), self.augment_gen, **augment), labels

    def eval_batches(self, split: str) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """``(float images, labels)`` of this process's shard of ``'validation'`` or ``'test'`` (no padding)."""
        data = self.val if split == 'validation' else self.test
        return eval_batches(self.accelerator, self.data_cfg, data, self.train_cfg['eval_batch_size'])


def load_split(data_cfg: Dict[str, Any], split: str):
    """One split of the configured dataset: uint8 tensors (``data.in_memory``) or a ``datasets.Dataset`` to stream."""
    source = data_cfg['path'] or data_cfg['source']
    if source == 'digits' and not data_cfg['in_memory']:
        raise ValueError("the bundled 'digits' dataset is held in memory only; set data.in_memory=true")
    if data_cfg['in_memory']:
        return load_tensors(source, split, img_size=data_cfg['img_size'], channels=data_cfg['channels'],
                            cache_dir=data_cfg['cache_dir'], image_column=data_cfg['image_column'],
                            label_column=data_cfg['label_column'])
    return load_dataset_split(source, split)


def split_label_names(data_cfg: Dict[str, Any], data) -> List[str]:
    """Class names of a split that :func:`load_split` returned."""
    if data_cfg['in_memory']:
        return data.label_names
    return label_names(data, find_columns(data.features, data_cfg['image_column'], data_cfg['label_column'])[1])


def eval_batches(accelerator: Accelerator, data_cfg: Dict[str, Any], data, batch_size: int
                 ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``(float images, labels)`` of this process's shard of an evaluation split (no augmentation, no padding)."""
    acc = accelerator
    if data_cfg['in_memory']:
        for _, images, labels in epoch_batches(data, batch_size, rank=acc.process_index, world_size=acc.num_processes,
                                               shuffle=False):
            yield to_model_input(images), labels
        return
    shard = data.shard(num_shards=acc.num_processes, index=acc.process_index, contiguous=True)
    loader = image_loader(shard, data_cfg['img_size'], data_cfg['channels'], batch_size, train=False,
                          num_workers=data_cfg['num_workers'], image_column=data_cfg['image_column'],
                          label_column=data_cfg['label_column'])
    for batch in loader:
        yield (to_model_input(batch['image'].to(acc.device, non_blocking=True)),
               batch['label'].to(acc.device, non_blocking=True))


def accuracy_on(accelerator: Accelerator, model, batches: Iterator[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Accuracy of every block and of the fusion read-out over this process's batches, reduced over processes."""
    with accelerator.autocast():
        correct, total = evaluate(model, batches)
    return accelerator.reduce(correct, 'sum').double() / accelerator.reduce(total, 'sum')


def evaluate_split(accelerator: Accelerator, model, data: RecipeData, split: str) -> torch.Tensor:
    """Accuracy of every block and of the fusion read-out on ``'validation'`` or ``'test'``."""
    return accuracy_on(accelerator, model, data.eval_batches(split))


def build_model(config: Dict[str, Any], num_classes: int):
    data_cfg, model_cfg = config['data'], config['model']
    name, asge_models = model_cfg['name'], ', '.join(timm.list_models('asge*'))
    not_asge = (f"error: model.name={name!r} is not an ASGE model, and the recipe trains layer by layer only those: "
                f"choose one of {asge_models}")
    if not isinstance(name, str) or not timm.is_model(name):
        raise SystemExit(f'error: there is no model {name!r} in timm\'s registry; choose one of {asge_models}')
    try:
        model = timm.create_model(model_cfg['name'], num_classes=num_classes, in_chans=data_cfg['channels'],
                                  **model_cfg['args'])
    except (TypeError, ValueError, RuntimeError) as err:
        if not name.startswith('asge_'):  # another family's model refuses the ASGE arguments: say why it can't work
            raise SystemExit(not_asge) from err
        raise SystemExit(f"error: cannot build model {name!r} with model.args={model_cfg['args']}: {err}. "
                         f"Available: {asge_models}") from err
    if not isinstance(model, timm_asge.AsgeCnn):
        raise SystemExit(not_asge)
    check_img_size(model, data_cfg['img_size'], model_cfg['name'])
    return model


def check_img_size(model, img_size: int, name: str, remedy: str = 'raise data.img_size or choose a shallower model'
                   ) -> None:
    """Stop when ``data.img_size`` is too small for the network's down-sampling and goodness grids."""
    if img_size < model.min_input_size:
        raise SystemExit(
            f'error: data.img_size={img_size} is too small for {name}: its {sum(model.downsample)} down-sampling '
            f'steps and goodness grids {model.grids} need at least {model.min_input_size}x{model.min_input_size}; '
            f'{remedy}')


class StepProfiler:
    """torch.profiler over a window of training steps; ``write`` puts its tables (self time per op, on the device and
    on the host) in ``profile.txt``. Recording slows the profiled steps."""

    def __init__(self, first: int, steps: int, done: int, device: torch.device):
        """
        Args:
            first: Steps trained before the window opens; one more warm-up step keeps the profiler's start-up out.
            steps: Steps recorded.
            done: Steps trained so far (at most ``first``: a resumed run).
            device: The training device (CUDA adds device times).
        """
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == 'cuda':
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.first, self.steps, self.device = first, steps, device
        schedule = torch.profiler.schedule(skip_first=first - done, wait=0, warmup=1, active=steps, repeat=1)
        self.profiler = torch.profiler.profile(activities=activities, schedule=schedule)
        self.profiler.start()
        self.recording = True

    def closes_after(self, done: int) -> bool:
        """Whether the step that brings the count to ``done`` is the window's last."""
        return done >= self.first + 1 + self.steps

    def step(self, done: int) -> None:
        """Call after every training step with the steps trained so far."""
        if self.recording:
            self.profiler.step()
            if self.closes_after(done):  # the schedule has closed the trace; nothing more to record
                self.stop()

    def stop(self) -> None:
        if self.recording:
            self.profiler.stop()
            self.recording = False

    def write(self, path: Path, done: int) -> None:
        """Write the tables of the steps recorded (fewer than ``steps`` if the run ended inside the window)."""
        self.stop()
        recorded = min(max(done - self.first - 1, 0), self.steps)
        if not recorded:
            return
        events = self.profiler.key_averages()
        sections = [f'{recorded} training steps; self times summed over them (divide by {recorded} for one step)']
        sort_keys = (['self_cuda_time_total'] if self.device.type == 'cuda' else []) + ['self_cpu_time_total']
        for sort_by in sort_keys:
            sections.append(f'sorted by {sort_by}:\n' + events.table(sort_by=sort_by, row_limit=30))
        with atomic_path(path) as tmp:
            tmp.write_text('\n\n'.join(sections) + '\n')


def write_profile(accelerator: Accelerator, profiler: StepProfiler, path: Path, done: int) -> None:
    """Close the profiler's window and write its tables; a failure there is a warning, never the run's end."""
    try:
        profiler.step(done)
        profiler.write(path, done)
    except Exception as err:  # noqa: BLE001 (a diagnostic must not stop training, nor leave other ranks waiting)
        profiler.recording = False
        accelerator.print(f'warning: no profile written to {path}: {err}')


def check_finite(accelerator: Accelerator, window: List[torch.Tensor], first_step: int, checkpoint: str) -> None:
    """Stop with the block and step of the first non-finite loss in ``window`` (one host sync per call)."""
    if not window:
        return
    losses = torch.stack(window)  # (steps, blocks + 1)
    bad = accelerator.reduce((~torch.isfinite(losses)).any().float(), 'sum')
    if bad.item() == 0:
        return
    rows, cols = torch.nonzero(~torch.isfinite(losses), as_tuple=True)
    where = 'on another process'
    if len(rows):
        block = int(cols[0])
        name = 'the fusion read-out' if block == losses.shape[1] - 1 else f'block {block}'
        where = f'in {name} at step {first_step + int(rows[0]) + 1} (loss {losses[rows[0], cols[0]].item()})'
    raise SystemExit(f'error: non-finite loss {where}; training stopped. The last good checkpoint is '
                     f'{checkpoint or "none (none saved yet)"}. Lower train.lr, or use train.mixed_precision=no')


def save_checkpoint(accelerator: Accelerator, out: Path, state: TrainState, keep: int) -> str:
    """``save_state`` into a temporary folder, then rename: a crash never leaves a half-written checkpoint."""
    ckpt_dir = out / 'checkpoints'
    final = ckpt_dir / f'step_{state.step:08d}'
    tmp = ckpt_dir / f'.tmp_step_{state.step:08d}'
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if (out / 'best').is_dir():
            # out/best lies outside accelerate's state: the checkpoint keeps the best weights as of its step, so a
            # resume from it cannot end with those of a later epoch that it never trains (see restore_best).
            link_files(out / 'best', tmp / 'best')
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(ckpt_dir.glob('step_*'))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return str(final)


def link_files(src: Path, dst: Path) -> None:
    """Hard-link every file of the folder ``src`` into the folder ``dst`` (a copy where links fail)."""
    dst.mkdir(exist_ok=True)
    for path in src.iterdir():
        try:
            os.link(path, dst / path.name)  # not a copy: out/best is replaced as a new folder, never written in place
        except OSError:  # another file system, or one without links
            shutil.copy2(path, dst / path.name)


def restore_best(accelerator: Accelerator, ckpt: Path, out: Path, state: TrainState) -> None:
    """Put the checkpoint's best-validation model (as of its step) back into ``out/best``, on every process alike.

    Resumed from an earlier checkpoint, a run would otherwise end with the weights a later, abandoned epoch saved
    there, reported under this run's best epoch.
    """
    saved, best = ckpt / 'best', out / 'best'
    if not saved.is_dir():
        if best.is_dir() and state.best_epoch >= 0:  # (before the first epoch's end there is no best to keep)
            accelerator.print(f'warning: {ckpt} was written by an earlier timm-asge, whose checkpoints do not keep the '
                              f'best model: {best} is left as it is, and may hold a later epoch\'s weights than this '
                              f'run reaches')
        return
    foreign = sorted(p.name for p in best.iterdir() if p.name not in BEST_FILES) if best.is_dir() else []
    if foreign:  # checked by every process, so all stop alike
        raise SystemExit(f'error: {best} holds {", ".join(foreign)}, which putting back the best model of {ckpt} '
                         f'would delete; move them out of {best} and resume again')
    if accelerator.is_main_process:
        with atomic_dir(best, BEST_FILES) as tmp:
            link_files(saved, tmp)
    accelerator.wait_for_everyone()


def cosine_schedule(optimizer: torch.optim.Optimizer, lr: float, min_lr: float, total_steps: int,
                    steps_per_epoch: int, on_updates: bool) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from each param group's rate to ``min_lr / lr`` of it, stepped once per optimizer step.

    Every group decays by the same factor, so the read-out's bias group (K times the rate, see ``param_groups``)
    ends at K times ``min_lr``, as the sum of the authors' K biases does. With ``on_updates=False`` the rate holds
    for a whole epoch and moves at its end: the authors' ``CosineAnnealingLR(T_max=epochs)`` stepped per epoch.

    Args:
        optimizer: The optimizer, its groups' ``lr`` already set.
        lr: The recipe's base rate (``train.lr``).
        min_lr: Where the base rate ends (``train.min_lr``).
        total_steps: Optimizer steps in the whole schedule.
        steps_per_epoch: Optimizer steps per epoch.
        on_updates: Move the rate after every step (true) or every epoch (false).
    """
    floor = min_lr / lr
    epochs = max(math.ceil(total_steps / steps_per_epoch), 1)

    def factor(step: int) -> float:
        progress = step / max(total_steps, 1) if on_updates else (step // steps_per_epoch) / epochs
        return floor + (1 - floor) * (1 + math.cos(math.pi * min(progress, 1.0))) / 2

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so host clocks measure it (a no-op on the CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def cudagraph_skips(device: torch.device, compile_mode: Any, since: int = 0) -> Optional[int]:
    """Compiled graphs that ran without the CUDA graphs their mode asked for, after ``since`` (None: none asked for).

    Inductor falls back silently (the reason goes to the ``cudagraphs`` log, off by default) and such a graph is
    launch-bound again, so the recipe says so in its log and in results.json. The counter is per process: pass its
    value at the start of a run as ``since``.
    """
    if device.type != 'cuda' or compile_mode not in CUDAGRAPH_MODES:
        return None
    import torch._dynamo.utils  # the counters inductor bumps on every fallback
    return int(torch._dynamo.utils.counters['inductor']['cudagraph_skips']) - since


def check_checkpoint_files(ckpt: Path, num_custom: int) -> None:
    """Stop, naming the file, if a checkpoint's files are missing or damaged, before accelerate reads them.

    accelerate's own errors name no file, a truncated torch file reads as a shape error ("PytorchStreamReader
    failed"), and unreadable random states are skipped silently. Each torch file is a zip archive whose CRCs are
    checked here; nothing is unpickled. ``num_custom`` is the number of objects registered for checkpointing (a
    missing one would read as a checkpoint of another run).
    """
    files = [ckpt / 'model.safetensors', ckpt / 'optimizer.bin',
             *(ckpt / f'custom_checkpoint_{i}.pkl' for i in range(num_custom))]
    # Every process checks every process's random states (small files), so all stop alike, before any collective
    # call (else the others die on a closed connection). They may be absent where more processes resume than wrote.
    files += sorted(ckpt.glob('random_states_*.pkl'))
    if (ckpt / 'best').is_dir():  # put back into out/best on resume (see restore_best)
        files += [ckpt / 'best' / name for name in BEST_FILES]
    for path in files:
        try:
            if path.suffix == '.safetensors':
                with safe_open(path, framework='pt'):
                    pass
            elif path.suffix == '.json':
                json.loads(path.read_text(encoding='utf-8'))
            else:
                with zipfile.ZipFile(path) as archive:
                    if (member := archive.testzip()) is not None:
                        raise zipfile.BadZipFile(f'{member} fails its checksum')
            continue
        except FileNotFoundError:
            detail = 'it is missing'
        except (zipfile.BadZipFile, EOFError) as err:  # EOFError: cut short inside a member
            detail = f'not a whole torch file: {str(err) or type(err).__name__}'
        except (SafetensorError, OSError, ValueError) as err:
            detail = f'{err}' if str(err) else type(err).__name__
        raise corrupt_checkpoint(ckpt, f'{path.relative_to(ckpt)}: {detail}')


def corrupt_checkpoint(ckpt: Path, detail: str) -> SystemExit:
    return SystemExit(f'error: cannot resume from {ckpt}: the checkpoint is corrupt or incomplete ({detail}). Resume '
                      f'from an earlier one (--resume {ckpt.parent}/step_...) or train into a new output_dir')


def latest_checkpoint(out: Path) -> Optional[Path]:
    found = sorted((out / 'checkpoints').glob('step_*'))
    return found[-1] if found else None


def plot_history(history: List[Dict[str, Any]], path: Path, num_blocks: int) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    epochs = [h['epoch'] + 1 for h in history]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for b in range(num_blocks):
        ax.plot(epochs, [100 * h['val_block_acc'][b] for h in history], label=f'block {b + 1}', marker='.')
    ax.plot(epochs, [100 * h['val_fusion_acc'] for h in history], label='fusion', color='black', lw=2)
    ax.set_xlabel('epoch')
    ax.set_ylabel('validation accuracy (%)')
    ax.set_title('ASGE per-block validation accuracy')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=120)
    plt.close(fig)


def check_config(config: Dict[str, Any]) -> None:
    """Stop with a message on any setting of the wrong kind or out of range, before anything loads."""
    train_cfg = config['train']
    if train_cfg['mixed_precision'] not in ('no', 'bf16'):
        raise SystemExit(f"error: train.mixed_precision={train_cfg['mixed_precision']!r} is not supported; use 'no' "
                         f"or 'bf16' (fp16 needs a loss scaler that lean mode's per-block backward cannot apply)")
    if isinstance(train_cfg['lr'], bool) or not isinstance(train_cfg['lr'], (int, float)) or not train_cfg['lr'] > 0:
        raise SystemExit(f"error: train.lr={train_cfg['lr']!r} must be a positive number")
    if not isinstance(train_cfg['min_lr'], (int, float)) or not 0 <= train_cfg['min_lr'] <= train_cfg['lr']:
        raise SystemExit(f"error: train.min_lr={train_cfg['min_lr']!r} must be between 0 and "
                         f"train.lr={train_cfg['lr']!r} (where the cosine schedule ends)")
    split_seed = config['data']['split_seed']
    if split_seed is not None and (isinstance(split_seed, bool) or not isinstance(split_seed, int)):
        raise SystemExit(f'error: data.split_seed={split_seed!r} must be a whole number (or null: train.seed)')
    if not isinstance(train_cfg['sched_on_updates'], bool):
        raise SystemExit(f"error: train.sched_on_updates={train_cfg['sched_on_updates']!r}; use true (cosine after "
                         f"every step) or false (after every epoch, as the authors' code)")
    check_whole_numbers(config)
    if config['model']['prediction'] not in PREDICTIONS:
        raise SystemExit(f"error: model.prediction={config['model']['prediction']!r}; choose one of "
                         f"{', '.join(PREDICTIONS)}")
    if config['data']['channels'] not in (1, 3):
        raise SystemExit(f"error: data.channels={config['data']['channels']!r} must be 1 (greyscale) or 3 (RGB): the "
                         f"images are converted to one of those as they load")
    grayscale_p = config['data']['grayscale_p']
    if isinstance(grayscale_p, bool) or not isinstance(grayscale_p, (int, float)) or not 0 <= grayscale_p <= 1:
        raise SystemExit(f'error: data.grayscale_p={grayscale_p!r} must be a probability between 0 and 1')
    if train_cfg['mode'] not in ('fused', 'lean'):
        raise SystemExit(f"error: train.mode={train_cfg['mode']!r}; choose 'fused' or 'lean'")


def check_whole_numbers(config: Dict[str, Any]) -> None:
    """Stop with a message naming the first setting of ``WHOLE_NUMBERS`` that is not a whole number in range."""
    for key, least, most, nullable in WHOLE_NUMBERS:
        section, name = key.split('.')
        value = config[section][name]
        if value is None and nullable:
            continue
        too_large = most is not None and isinstance(value, int) and value > most
        if isinstance(value, bool) or not isinstance(value, int) or value < least or too_large:
            bound = f', at least {least}' if most is None else f' from {least} to {most}'
            raise SystemExit(f'error: {key}={value!r} must be a whole number{bound}'
                             + (' (or null)' if nullable else ''))


def find_resume_checkpoint(resume: str, out: Path) -> Path:
    """The checkpoint ``--resume`` names: the latest in ``out``, or one of ``out/checkpoints/step_*``.

    A checkpoint of another output folder is refused: the run it continues keeps its best-validation model, history
    and results in its own folder.
    """
    if resume == 'latest':
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise SystemExit(f'error: --resume found no checkpoint in {out / "checkpoints"}; train without --resume')
        return ckpt
    path = Path(resume)
    if not (path / 'model.safetensors').is_file():
        raise SystemExit(
            f'error: --resume {path} is not a checkpoint (a folder holding model.safetensors, such as '
            f'{out / "checkpoints" / "step_00000100"}); pass --resume alone for the latest one in output_dir')
    if path.resolve().parent != (out / 'checkpoints').resolve():
        raise SystemExit(
            f'error: --resume {path} is not a checkpoint of output_dir {out}; a run continues in its own folder '
            f'(best model, history, results): pass output_dir={path.resolve().parent.parent}')
    return path


def write_json(path: Path, payload: Dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + '\n')


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', help='YAML config (recipes/configs/<benchmark>.yaml)')
    parser.add_argument('--resume', nargs='?', const='latest', default=None,
                        help='continue from the latest checkpoint in the output folder, or from the given folder')
    parser.add_argument('overrides', nargs='*', help='config overrides, e.g. train.epochs=5 data.path=/data/mnist')
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.resume not in (None, 'latest') and '=' in args.resume and not Path(args.resume).exists():
        # `--resume train.epochs=3`: argparse gave the optional value an override that came after the flag.
        args.overrides.append(args.resume)
        args.resume = 'latest'
    args.argv = argv
    args.commit = git_commit()  # now, not at the end: the checkout may move on during a long run
    config = load_config(args.config, args.overrides)
    out = Path(config['output_dir'] or Path('outputs') / config['name'])
    train_cfg = config['train']
    check_config(config)
    dynamo_plugin = None  # accelerate's own default: none, or `accelerate launch --dynamo_backend ...`
    backend = train_cfg['compile_backend'] = train_cfg['compile_backend'] or 'inductor'  # null: the default
    # Those of the backends both torch.compile and accelerate's TorchDynamoPlugin know that need no other package
    # (tvm, say, is listed by both and fails at the first step without apache-tvm).
    backends = sorted(set(torch._dynamo.list_backends(exclude_tags=())) & {b.value.lower() for b in DynamoBackend}
                      & {'inductor', 'aot_eager', 'eager', 'cudagraphs'})
    if backend not in backends:
        raise SystemExit(f"error: train.compile_backend={backend!r}; use one of {', '.join(backends)}")
    if train_cfg['compile'] not in (False, None):
        if train_cfg['compile'] is not True and train_cfg['compile'] not in COMPILE_MODES:
            raise SystemExit(f"error: train.compile={train_cfg['compile']!r}; use false, true or a torch.compile "
                             f"mode: {', '.join(COMPILE_MODES)}")
        mode = None if train_cfg['compile'] is True else train_cfg['compile']
        if mode not in (None, 'default') and backend != 'inductor':
            raise SystemExit(f'error: train.compile={mode!r} is a mode of the inductor backend; with '
                             f'train.compile_backend={backend!r} use train.compile=true')
        dynamo_plugin = TorchDynamoPlugin(backend=backend, mode=mode)
    profile_steps, stop_after = train_cfg['profile_steps'], train_cfg['stop_after_epochs']
    resume_from = find_resume_checkpoint(args.resume, out) if args.resume else None
    if resume_from is None and latest_checkpoint(out) is not None:
        # A fresh run would number its checkpoints from step 0 among the earlier run's and prune or resume the wrong
        # ones; and its results would replace the earlier run's.
        raise SystemExit(
            f'error: {out} holds checkpoints of an earlier run ({latest_checkpoint(out).name}); continue it with '
            f'--resume, or train into a new output_dir=<folder> (or delete {out} first)')

    accelerator = Accelerator(cpu=train_cfg['cpu'], mixed_precision=train_cfg['mixed_precision'],
                              log_with=[JsonlTracker(out / 'log.jsonl')] + (['tensorboard'] if _has_tensorboard()
                                                                           else []),
                              project_dir=str(out), dynamo_plugin=dynamo_plugin,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    if accelerator.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=out).close()  # a folder that exists may still refuse files
        except OSError as err:
            raise SystemExit(f'error: cannot create output_dir {str(out)!r} or write in it ({err.strerror}); pass a '
                             f'writable output_dir=<folder>') from err
    set_seed(train_cfg['seed'])
    data = RecipeData(config, accelerator)
    model = build_model(config, data.num_classes)
    if train_cfg['channels_last']:
        model = model.to(memory_format=torch.channels_last)
    engine = LocalLearner(model, train_cfg['mode'])
    fused_adamw = accelerator.device.type == 'cuda'
    optimizer = torch.optim.AdamW(param_groups(model, train_cfg['lr'], train_cfg['weight_decay']), fused=fused_adamw)
    world = accelerator.num_processes
    steps_per_epoch = data.steps_per_epoch()
    if steps_per_epoch == 0:  # streamed batches drop the last, incomplete one
        raise SystemExit(f"error: the training split's {data.sizes['train']} images make no full batch of "
                         f"train.batch_size={train_cfg['batch_size']} on each of {world} process(es); lower "
                         f"train.batch_size")
    total_steps = steps_per_epoch * train_cfg['epochs']
    if train_cfg['max_steps']:
        total_steps = min(total_steps, train_cfg['max_steps'])
    # Stepped by us once per optimizer step (a prepared scheduler would step once per process).
    scheduler = cosine_schedule(optimizer, train_cfg['lr'], train_cfg['min_lr'], total_steps, steps_per_epoch,
                                train_cfg['sched_on_updates'])
    # Lean mode runs its backward inside forward, where DDP cannot sync: keep it unwrapped and all-reduce by hand.
    lean_multi = train_cfg['mode'] == 'lean' and world > 1
    if lean_multi:
        engine = accelerator.prepare_model(engine, evaluation_mode=True)
        optimizer = accelerator.prepare_optimizer(optimizer)
    else:
        engine, optimizer = accelerator.prepare(engine, optimizer)
    state = TrainState()
    checkpointed = [scheduler, state]
    accelerator.register_for_checkpointing(*checkpointed)

    if resume_from is not None:
        ckpt = resume_from
        check_checkpoint_files(ckpt, len(checkpointed))
        try:
            accelerator.load_state(str(ckpt))
        except (ValueError, RuntimeError, KeyError) as err:  # shapes, parameter groups or state keys differ
            raise SystemExit(
                f'error: cannot resume from {ckpt}: it does not fit this run\'s model and optimizer ({err}). It was '
                f'written by another config or an older timm-asge; resume with the same config and version, or train '
                f'into a new output_dir') from None
        except (SafetensorError, pickle.UnpicklingError, EOFError, OSError) as err:  # truncated, overwritten, missing
            # torch's weights-only refusal suggests weights_only=False, which must not be followed for a bad file.
            detail = 'a state file is not a readable torch file' if isinstance(err, pickle.UnpicklingError) else (
                str(err).splitlines()[0] if str(err) else 'a file ends early')
            raise corrupt_checkpoint(ckpt, detail) from None
        restore_best(accelerator, ckpt, out, state)
        accelerator.print(f'resumed from {ckpt}: epoch {state.epoch + 1}, batch {state.batch}, step {state.step}')
    accelerator.init_trackers(config['name'], config=_flatten(config))

    device = accelerator.device
    num_blocks = len(model.stages)
    last_ckpt = str(latest_checkpoint(out) or '')
    # A log cut off before results.json is written still says what ran where (bench/accuracy_report.py reads it).
    accelerator.print(f"run: {run_command(args.argv)} | commit {args.commit} | {describe_hardware(accelerator)}")
    if hint := idle_cores_hint(accelerator):
        accelerator.print(hint)
    accelerator.print(
        f"training {config['model']['name']} ({sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{num_blocks} blocks) on {data.sizes['train']} images ({data.sizes['validation']} validation, "
        f"{data.sizes['test']} test), {world} process(es) on {device}, {train_cfg['mode']} mode")

    # `disable` only where it must be set, so TQDM_DISABLE=1 can silence the bar in logs.
    progress = tqdm(total=total_steps, initial=state.step, desc='train', dynamic_ncols=True,
                    **({} if accelerator.is_local_main_process else {'disable': True}))
    start = time.perf_counter() - state.train_time
    stop = state.step >= total_steps
    end_epoch = min(train_cfg['epochs'], stop_after or train_cfg['epochs'])
    profiler, skips_reported, plotted_at = None, False, time.perf_counter()
    skips_before = cudagraph_skips(device, train_cfg['compile']) or 0
    if profile_steps and accelerator.is_main_process:
        # Early in the second epoch, past torch.compile's first steps; a shorter run profiles its last steps.
        run_steps = min(total_steps, end_epoch * steps_per_epoch)
        first = min(steps_per_epoch + 5, max(run_steps - profile_steps - 1, 0))
        if state.step:  # resumed: past the steps that compile again
            first = max(first, state.step + 5)
        epoch_end = (first // steps_per_epoch + 1) * steps_per_epoch  # no evaluation inside the window
        steps = min(profile_steps, run_steps - first - 1, epoch_end - first - 1)
        if steps > 0:
            profiler = StepProfiler(first, steps, state.step, device)
        else:
            accelerator.print(f'train.profile_steps={profile_steps}: no steps left to profile in this run (after a '
                              f'warm-up step, within one epoch)')
    while state.epoch < end_epoch and not stop:
        engine.train()
        correct_sum = torch.zeros(num_blocks + 1, device=device, dtype=torch.long)
        seen, window, window_start = 0, [], state.step
        synchronize(device)
        epoch_start = time.perf_counter()
        step_checkpoint = False
        for batch, images, labels in data.train_batches(state.epoch, start=state.batch):
            if train_cfg['channels_last']:
                images = images.contiguous(memory_format=torch.channels_last)
            outputs = engine(images, labels)
            if train_cfg['mode'] == 'fused':
                accelerator.backward(outputs['loss'])
            elif lean_multi:
                all_reduce_gradients(engine)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            correct_sum += outputs['correct']
            seen += labels.shape[0]
            window.append(torch.cat([outputs['block_losses'], outputs['fusion_loss'][None]]).float())
            state.step += 1
            state.batch = batch + 1
            progress.update(1)
            if profiler is not None and profiler.closes_after(state.step):
                # Closing the trace and writing its tables now (so a run cut off later still has them) is not
                # training time.
                synchronize(device)
                paused = time.perf_counter()
                write_profile(accelerator, profiler, out / 'profile.txt', state.step)
                profiler = None
                epoch_start += time.perf_counter() - paused
            elif profiler is not None:
                profiler.step(state.step)
            if state.step % train_cfg['log_every'] == 0:
                check_finite(accelerator, window, window_start, last_ckpt)
                losses = torch.stack(window).mean(0).tolist()
                window, window_start = [], state.step
                accelerator.log({'train/loss_block_last': losses[-2], 'train/loss_fusion': losses[-1],
                                 'lr': scheduler.get_last_lr()[0]}, step=state.step)
                progress.set_postfix(epoch=state.epoch + 1, loss=f'{losses[-1]:.3f}')
            step_checkpoint = bool(train_cfg['checkpoint_every']) and state.step % train_cfg['checkpoint_every'] == 0
            # On an epoch's last batch the step checkpoint waits for the epoch's end (evaluation, history), so a
            # resumed run never re-enters a finished epoch.
            if step_checkpoint and state.batch < steps_per_epoch:
                check_finite(accelerator, window, window_start, last_ckpt)
                synchronize(device)
                state.step_time += time.perf_counter() - epoch_start
                state.train_time = time.perf_counter() - start
                last_ckpt = save_checkpoint(accelerator, out, state, train_cfg['keep_checkpoints'])
                epoch_start = time.perf_counter()
            if state.step >= total_steps:
                stop = True
                break
        synchronize(device)
        state.step_time += time.perf_counter() - epoch_start
        check_finite(accelerator, window, window_start, last_ckpt)

        # End of epoch (or of the step budget): per-block accuracy, best model, checkpoint, plot.
        train_acc = (accelerator.reduce(correct_sum, 'sum').double()
                     / max(accelerator.reduce(torch.tensor(seen, device=device), 'sum').item(), 1))
        val_acc = evaluate_split(accelerator, model, data, 'validation')
        metric = _strategy_metric(val_acc, config['model']['prediction'])
        record = {'epoch': state.epoch, 'step': state.step, 'train_block_acc': train_acc[:-1].tolist(),
                  'train_fusion_acc': train_acc[-1].item(), 'val_block_acc': val_acc[:-1].tolist(),
                  'val_fusion_acc': val_acc[-1].item(), 'step_time_s': state.step_time,
                  'time_s': time.perf_counter() - start}
        if train_cfg['test_every_epoch']:
            test_acc = evaluate_split(accelerator, model, data, 'test')
            record.update(test_block_acc=test_acc[:-1].tolist(), test_fusion_acc=test_acc[-1].item())
        state.history.append(record)
        accelerator.log({f'val/block{b + 1}': a for b, a in enumerate(record['val_block_acc'])}
                        | {'val/fusion': record['val_fusion_acc'], 'epoch': state.epoch + 1}, step=state.step)
        # The line carries test accuracy and time too, so a log cut off mid-run (a timed-out GPU call) still has them.
        test_part = f" | test fusion {100 * record['test_fusion_acc']:.2f}%" if 'test_fusion_acc' in record else ''
        accelerator.print(
            f"epoch {state.epoch + 1}: val acc per block "
            f"{' '.join(f'{100 * a:.1f}' for a in record['val_block_acc'])} | fusion "
            f"{100 * record['val_fusion_acc']:.2f}% | train fusion {100 * record['train_fusion_acc']:.2f}%{test_part}"
            f" | so far {record['step_time_s']:.1f} s in training steps, {record['time_s']:.1f} s in all")
        skips = cudagraph_skips(device, train_cfg['compile'], skips_before)
        if skips and not skips_reported:
            skips_reported = True
            accelerator.print(f"warning: train.compile={train_cfg['compile']}: {skips} compiled graph(s) ran without "
                              f"CUDA graphs (launch-bound again); rerun with TORCH_LOGS=cudagraphs to see why")
        if metric > state.best_metric:
            state.best_metric, state.best_epoch = metric, state.epoch
            if accelerator.is_main_process:
                save_pretrained(accelerator.unwrap_model(engine).model, out / 'best', label_names=data.label_names)
        last_epoch = stop or state.epoch + 1 >= end_epoch
        save = last_epoch or (state.epoch + 1) % train_cfg['checkpoint_epochs'] == 0 or step_checkpoint
        if save and accelerator.is_main_process and (last_epoch or time.perf_counter() - plotted_at >= PLOT_INTERVAL_S):
            plot_history(state.history, out / 'block_accuracy.png', num_blocks)
            plotted_at = time.perf_counter()
        if not (stop and state.batch < steps_per_epoch):
            state.epoch, state.batch = state.epoch + 1, 0
        state.train_time = time.perf_counter() - start
        if save:
            last_ckpt = save_checkpoint(accelerator, out, state, train_cfg['keep_checkpoints'])
    progress.close()
    if profiler is not None:  # the run ended inside the window
        write_profile(accelerator, profiler, out / 'profile.txt', state.step)
    accelerator.wait_for_everyone()
    results = finish(accelerator, config, args, out, model, state, data, skips_before)
    accelerator.end_training()
    return results


def _flatten(config: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
    """``{'train': {'lr': 1}}`` -> ``{'train.lr': 1}`` with lists as strings (what TensorBoard hparams accept)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


def _strategy_metric(val_acc: torch.Tensor, prediction: str) -> float:
    if prediction == 'fusion':
        return val_acc[-1].item()
    if prediction == 'last':
        return val_acc[-2].item()
    return val_acc[:-1].max().item()


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
        return True
    except ImportError:
        return False


def finish(accelerator, config, args, out: Path, model, state: TrainState, data: RecipeData,
           skips_before: int = 0) -> Dict[str, Any]:
    """Reload the best-validation weights, choose `best`, test every strategy, write results and the export."""
    model.load_state_dict(load_file(str(out / 'best' / 'model.safetensors')))
    # Evaluated again rather than read from the history: resumed from a checkpoint of an earlier timm-asge (no best/
    # kept, see restore_best), out/best can hold weights that this run's history never measured.
    val_acc = evaluate_split(accelerator, model, data, 'validation')
    best_block = pick_best_block(val_acc[:-1].tolist())
    model.set_prediction(model.prediction, best_block=best_block)
    test_acc = evaluate_split(accelerator, model, data, 'test')
    accuracy = {'fusion': test_acc[-1].item(), 'last': test_acc[-2].item(), 'best': test_acc[best_block].item()}
    input_size = (config['data']['channels'], config['data']['img_size'], config['data']['img_size'])
    costs = strategy_costs(model, input_size)
    model.set_prediction(config['model']['prediction'])
    # Ranks must agree bit for bit: a cheap end-of-run proof that gradients were synchronised.
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()[None]
    checksums = accelerator.gather(checksum).tolist()
    world = accelerator.num_processes
    data_cfg = config['data']
    results = {
        'model': config['model']['name'],
        'dataset': {'name': config['name'], 'hub_id': None if data_cfg['path'] or data_cfg['source'] == 'digits'
                    else data_cfg['source'], 'path': data_cfg['path'], 'num_classes': data.num_classes,
                    'label_names': data.label_names, 'splits': data.sizes},
        'recipe': config,
        'config_file': args.config,
        'command': run_command(args.argv),
        'commit': args.commit,
        'hardware': describe_hardware(accelerator),
        'num_processes': world,
        'rank_weight_checksums': checksums,
        'epochs': state.epoch + (1 if state.batch else 0),
        'steps': state.step,
        'train_time_s': round(state.train_time, 2),
        'step_time_s': round(state.step_time, 2),
        'cudagraph_skips': cudagraph_skips(accelerator.device, config['train']['compile'], skips_before),
        'best_epoch': state.best_epoch + 1,
        'best_block': best_block,
        'prediction': config['model']['prediction'],
        'val_accuracy': {'blocks': val_acc[:-1].tolist(), 'fusion': val_acc[-1].item()},
        'test_accuracy': accuracy,
        'test_block_accuracy': test_acc[:-1].tolist(),
        'strategies': {name: {'test_accuracy': accuracy[name], **costs[name]} for name in costs},
        'history': state.history,
    }
    if accelerator.is_main_process:
        save_pretrained(model, out / 'export', label_names=data.label_names)
        write_json(out / 'results.json', results)
        accelerator.print(
            'test accuracy: ' + ', '.join(f'{k} {100 * v:.2f}%' for k, v in accuracy.items())
            + f' (best = block {best_block + 1}); results in {out / "results.json"}, model in {out / "export"}')
    accelerator.wait_for_everyone()
    return results


if __name__ == '__main__':
    main()
