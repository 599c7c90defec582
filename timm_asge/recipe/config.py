"""The recipe's settings: defaults, a YAML file, then ``key=value`` overrides, checked once before anything loads."""
import copy
import difflib
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

__all__ = ['DEFAULTS', 'RecipeError', 'load_config', 'resolve_auto']

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
        'split_seed': None,  # null: train.seed; 42 with torch's random_split is the authors' MNIST split
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
        'max_steps': None,  # stop early after this many optimizer steps
        'stop_after_epochs': None,  # end after N epochs of a schedule that still spans `epochs` (resume continues)
        'batch_size': 128,  # per process
        'lr': 2e-4,
        'min_lr': 1e-5,  # cosine floor; every param group decays to the same fraction of its own rate
        'sched_on_updates': True,  # cosine after every step; false: per epoch, as the authors' code
        'weight_decay': 1e-3,
        'mode': 'fused',  # fused | lean | backprop (the end-to-end baseline)
        'mixed_precision': 'auto',  # auto (bf16 on CUDA, no on the CPU) | no | bf16
        'channels_last': 'auto',  # auto (true on CUDA) | true | false
        'compile': 'auto',  # auto ('reduce-overhead' on CUDA, false on the CPU) | false | true | a torch.compile mode
        'compile_backend': 'inductor',  # or aot_eager: traces the step without code generation
        'seed': 0,
        'cpu': False,
        'log_every': 50,  # steps between log lines (and NaN checks)
        'checkpoint_every': 0,  # steps between checkpoints; 0: at epoch ends only
        'checkpoint_epochs': 1,  # epochs between checkpoints and plots; the last epoch always saves
        'keep_checkpoints': 2,
        'eval_batch_size': 1000,
        'test_every_epoch': False,  # also test every epoch, for the curve only (the best epoch is chosen on validation)
        'profile_steps': 0,  # torch.profiler over this many steps of the second epoch -> profile.txt
        'tensorboard': False,  # also log to TensorBoard, in <output_dir>/tensorboard
    },
}
# Settings whose default is null, by type; a null default may stay null.
TYPES = {'output_dir': str, 'data.path': str, 'data.image_column': str, 'data.label_column': str, 'data.cache_dir': str,
         'data.split_seed': int, 'data.color_jitter': list, 'train.max_steps': int, 'train.stop_after_epochs': int}
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
CHOICES = {
    'model.prediction': ('fusion', 'last', 'best'),
    'data.channels': (1, 3),
    'train.mode': ('fused', 'lean', 'backprop'),
    # fp16 needs a loss scaler, which lean mode's per-block backward cannot apply.
    'train.mixed_precision': ('auto', 'no', 'bf16'),
    'train.channels_last': ('auto', True, False),
    'train.compile': ('auto', False, True, *COMPILE_MODES),
    'train.compile_backend': ('inductor', 'aot_eager', 'eager'),
}
RANGES = {  # (least, most), both allowed
    'data.val_size': (0, None), 'data.img_size': (1, None), 'data.crop_padding': (0, None),
    'data.grayscale_p': (0, 1), 'data.num_workers': (0, None), 'data.split_seed': (0, 2**32 - 1),
    'train.epochs': (1, None), 'train.max_steps': (1, None), 'train.stop_after_epochs': (1, None),
    'train.batch_size': (1, None), 'train.lr': (1e-12, 1), 'train.min_lr': (0, None),
    'train.weight_decay': (0, 1),  # AdamW's decoupled decay: a factor of (1 - lr * weight_decay) a step
    'train.seed': (0, 2**32 - 1), 'train.log_every': (1, None), 'train.checkpoint_every': (0, None),
    'train.checkpoint_epochs': (1, None), 'train.keep_checkpoints': (1, None), 'train.eval_batch_size': (1, None),
    'train.profile_steps': (0, None),
}


class RecipeError(ValueError):
    """A setting, dataset or checkpoint the recipe cannot use; the message says what to change."""


def load_config(path: Optional[str], overrides: List[str]) -> Dict[str, Any]:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides, all checked."""
    config, layers = copy.deepcopy(DEFAULTS), []
    if path:
        if not Path(path).is_file():
            raise RecipeError(f'no config file {path!r}; the benchmark configs are recipes/configs/*.yaml')
        config['name'] = Path(path).stem
        layers.append((_parse(Path(path).read_text(), f'config file {path!r}'), path))
    for item in overrides:
        key, sep, value = item.partition('=')
        if not sep:
            raise RecipeError(f'override {item!r} is not key=value (e.g. train.epochs=5)')
        tree = _parse(value, f'override {item!r}')
        for part in reversed(key.split('.')):
            tree = {part: tree}
        layers.append((tree, 'the command line'))
    for tree, where in layers:
        if not isinstance(tree, dict):
            raise RecipeError(f'{where} holds a {type(tree).__name__}, not a mapping of sections (model:, data:, '
                              f'train:)')
        _merge(config, tree, where)
    if config['train']['mixed_precision'] is False:  # YAML reads a bare `no` as false
        config['train']['mixed_precision'] = 'no'
    for key in [*TYPES, *CHOICES, *RANGES, *_leaf_keys(DEFAULTS)]:
        _check(key, _get(config, key))
    if config['train']['min_lr'] > config['train']['lr']:
        raise RecipeError(f"train.min_lr={config['train']['min_lr']} must be at most train.lr={config['train']['lr']}")
    return config


def resolve_auto(train_cfg: Dict[str, Any], cuda: bool) -> Dict[str, Any]:
    """``auto`` settings for the device: bf16, channels_last and CUDA-graph compilation on CUDA, none on the CPU."""
    fast = {'mixed_precision': 'bf16' if cuda else 'no', 'channels_last': cuda, 'compile': 'reduce-overhead' if cuda
            else False}
    return {**train_cfg, **{key: fast[key] for key in fast if train_cfg[key] == 'auto'}}


def _parse(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f'{where} is not valid YAML: {" ".join(str(err).split())}') from None


def _merge(base: Dict[str, Any], new: Dict[str, Any], where: str, prefix: str = '') -> None:
    for key, value in new.items():
        name = f'{prefix}{key}'
        if key not in base:
            close = difflib.get_close_matches(str(key), list(base), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f'; known keys: {", ".join(base)}'
            raise RecipeError(f"unknown config key '{name}' in {where}{hint}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise RecipeError(f"config key '{name}' in {where} must be a mapping")
            if name == 'model.args':  # free keys, checked by the model
                base[key].update({arg: _number(v) for arg, v in value.items()})
            else:
                _merge(base[key], value, where, f'{name}.')
        else:
            base[key] = _number(value) if isinstance(base[key], float) else value


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as text."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _leaf_keys(tree: Dict[str, Any], prefix: str = '') -> List[str]:
    return [k for key, v in tree.items() if key != 'args'
            for k in (_leaf_keys(v, f'{prefix}{key}.') if isinstance(v, dict) else [f'{prefix}{key}'])]


def _get(config: Dict[str, Any], key: str) -> Any:
    for part in key.split('.'):
        config = config[part]
    return config


def _check(key: str, value: Any) -> None:
    default = _get(DEFAULTS, key)
    if value is None and default is None:
        return
    if key in CHOICES:
        if not any(value == c and type(value) is type(c) for c in CHOICES[key]):
            choices = ', '.join(str(c).lower() if isinstance(c, bool) else str(c) for c in CHOICES[key])
            raise RecipeError(f'{key}={value!r}; choose one of {choices}')
        return
    kind = TYPES.get(key, type(default))
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else type(value) is kind
    least, most = RANGES.get(key, (None, None))
    if not ok or (least is not None and value < least) or (most is not None and value > most):
        bound = '' if least is None else f' from {least} to {most}' if most is not None else f', at least {least}'
        kind_name = {int: 'a whole number', float: 'a number', bool: 'true or false'}.get(kind, f'a {kind.__name__}')
        raise RecipeError(f'{key}={value!r} must be {kind_name}{bound}' + (' (or null)' if default is None else ''))
