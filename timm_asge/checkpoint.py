"""Safe, validating reads of ASGE checkpoints in timm's Hub layout (``config.json`` + ``model.safetensors``).

timm's own errors for a bad checkpoint are accurate but terse (``Unknown model (...)``, ``Error while deserializing
header``, a wall of ``size mismatch`` lines). The helpers here check the same things first and raise a
:class:`CheckpointError` that names the file, the problem and the fix. Weights are only ever read with safetensors:
nothing is unpickled.
"""
import difflib
import inspect
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

import timm
from timm.models import adapt_input_conv

__all__ = [
    'CONFIG_NAME', 'WEIGHTS_NAME', 'UNSAFE_SUFFIXES', 'CheckpointError', 'read_config', 'check_architecture',
    'read_safetensors', 'check_folder', 'checkpoint_filter_fn', 'corrupt_pretrained_error',
]

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
# Formats that torch.load / pickle would read: never loaded, never published.
UNSAFE_SUFFIXES = ('.bin', '.pt', '.pth', '.pkl', '.pickle', '.ckpt', '.tar')
# Architecture options a loader may change: everything else must match the checkpoint exactly.
ADAPTABLE_ARGS = ('num_classes', 'in_chans')
# Newer timm adapts a first conv from any channel count (its pretrained_cfg's input_size); older timm (1.0.29, the
# GPU machine's) only from 3. Told apart by adapt_input_conv's signature.
_TIMM_ADAPTS_ANY_CHANNELS = 'base_chans' in inspect.signature(adapt_input_conv).parameters


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded as it is; the message says what is wrong and what to do."""


def read_config(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read and check a timm Hub ``config.json`` (a file, or a folder holding one).

    Returns:
        The parsed config, with at least ``architecture`` (str) and ``pretrained_cfg`` (dict).
    """
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(
            f'no {CONFIG_NAME} at {path}: a timm checkpoint folder holds {CONFIG_NAME} and {WEIGHTS_NAME}; '
            f'write one with timm_asge.hub.save_pretrained or `python -m timm_asge.hub export`')
    try:
        config = json.loads(path.read_text(encoding='utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f'{path} is not valid JSON ({e}); the file is corrupt or truncated: download or export '
                              f'it again') from e
    if not isinstance(config, dict) or not isinstance(config.get('architecture'), str):
        raise CheckpointError(
            f'{path} has no "architecture" entry, so it is not a timm model config; export the model with '
            f'timm_asge.hub.save_pretrained or `python -m timm_asge.hub export`')
    if 'pretrained_cfg' not in config:
        raise CheckpointError(
            f'{path} has no "pretrained_cfg" entry, so timm cannot build the model from it; export the model with '
            f'timm_asge.hub.save_pretrained or `python -m timm_asge.hub export`')
    for key in ('pretrained_cfg', 'model_args'):
        if not isinstance(config.get(key, {}), dict):
            raise CheckpointError(f'{path}: "{key}" must be a JSON object, got {type(config[key]).__name__}')
    return config


def check_architecture(name: str, source: str = 'the checkpoint') -> None:
    """Raise a :class:`CheckpointError` unless ``name`` is a model timm can build.

    Args:
        name: Architecture name, without a pretrained tag.
        source: Where the name came from, for the message.
    """
    if timm.is_model(name):
        return
    asge = timm.list_models('asge*')
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.75)
    hint = f' Did you mean {", ".join(repr(c) for c in close)}?' if close else ''
    raise CheckpointError(
        f'{source} names architecture {name!r}, which is not registered in timm.{hint} ASGE architectures '
        f'register when you `import timm_asge` before calling timm.create_model; this installed timm-asge provides '
        f'{", ".join(asge) or "none (is timm_asge imported?)"}. If the checkpoint needs a newer timm-asge, upgrade it '
        f'(pip install -U timm-asge); otherwise fix "architecture" in config.json.')


def read_safetensors(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Load a state dict from a ``.safetensors`` file on the CPU, refusing any other format.

    Raises:
        CheckpointError: The file is missing, not safetensors (e.g. a pickled ``.bin``), corrupt or truncated.
    """
    path = Path(path)
    if path.suffix != '.safetensors':
        raise CheckpointError(
            f'refusing to load {path}: only .safetensors weights are read (pickle-based formats such as '
            f'{", ".join(UNSAFE_SUFFIXES)} can run code when loaded); convert it with safetensors.torch.save_file')
    if not path.is_file():
        raise CheckpointError(f'no weights at {path}: the checkpoint folder must hold {WEIGHTS_NAME}')
    _check_safetensors(path)
    try:
        return load_file(path, device='cpu')
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(path, e) from e


def _corrupt(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(
        f'{path} is corrupt or truncated ({error}). Delete it and download it again (for a Hub model, pass '
        f'force_download=True to huggingface_hub.hf_hub_download or clear the cache entry), or re-export it with '
        f'`python -m timm_asge.hub export`.')


def corrupt_pretrained_error(variant: str, error: Exception, **kwargs) -> CheckpointError:
    """The error for weights that timm's own loader (``timm.create_model(..., pretrained=True)``) could not read.

    timm's loader says only ``Error while deserializing header``; this names the file: the local one, or the Hub
    cache entry (``hf_hub_download`` keeps a damaged cached file until it is deleted or downloaded again).

    Args:
        variant: The architecture being built.
        error: What safetensors raised.
        **kwargs: The ``pretrained_cfg``, ``pretrained_cfg_overlay`` and ``cache_dir`` that timm passed to the model's
            entrypoint.
    """
    cfg = timm.models.resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                             pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    # The source in timm's order (timm.models._builder._resolve_pretrained_source): an `hf-hub:` name, a `local-dir:`
    # folder, a file override, the Hub id of the default config.
    if cfg.file and cfg.source != 'hf-hub':
        path = Path(cfg.file)
        if path.is_dir():  # timm reads model.safetensors first, else the first *.safetensors (this error is theirs)
            read = [path / WEIGHTS_NAME] if (path / WEIGHTS_NAME).exists() else sorted(path.glob('*.safetensors'))
            path = read[0] if read else path / WEIGHTS_NAME
        return _corrupt(path, error)
    if cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition('@')
        filename = _hub_safetensors_name(cfg.hf_hub_filename)
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=kwargs.get('cache_dir'), revision=revision or None)
        if isinstance(cached, str):
            return _corrupt(Path(cached), error)
        return CheckpointError(f'{filename} of {cfg.hf_hub_id} is corrupt or truncated ({error}); download it again '
                               f'(huggingface_hub.hf_hub_download(..., force_download=True))')
    return CheckpointError(f'the pretrained weights of {variant} are corrupt or truncated ({error})')


def _hub_safetensors_name(filename: Optional[str]) -> str:
    # The file timm's load_state_dict_from_hf reads for a config's hf_hub_filename (default pytorch_model.bin): the
    # name itself if it is safetensors, else its safetensors alternative (timm.models._hub._get_safe_alternatives).
    filename = filename or 'pytorch_model.bin'
    if filename.endswith('.safetensors'):
        return filename
    known = {'pytorch_model.bin': WEIGHTS_NAME, 'open_clip_pytorch_model.bin': 'open_clip_model.safetensors'}
    return known.get(filename, filename.removesuffix('.bin') + '.safetensors')


def _check_safetensors(path: Path) -> None:
    # Reads only the header; safetensors also verifies that the tensors cover the file exactly (truncation).
    try:
        with safe_open(path, framework='pt'):
            pass
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(path, e) from e


def check_folder(folder: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Check a checkpoint folder before loading it: config, architecture and weights file.

    Returns:
        The parsed ``config.json``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f'{folder} is not a folder; a timm checkpoint is a folder with {CONFIG_NAME} and '
                              f'{WEIGHTS_NAME}')
    config = read_config(folder)
    check_architecture(config['architecture'], source=str(folder / CONFIG_NAME))
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        unsafe = sorted(p.name for p in folder.iterdir() if p.suffix in UNSAFE_SUFFIXES)
        found = f' (found {", ".join(unsafe)}, which is not read because it is pickle-based)' if unsafe else ''
        raise CheckpointError(f'{folder} has no {WEIGHTS_NAME}{found}; timm-asge publishes and loads safetensors '
                              f'weights only: re-export the model with timm_asge.hub.save_pretrained')
    _check_safetensors(weights)
    return config


def _names(value: Optional[Union[str, Sequence[str]]]) -> List[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def _describe(model: nn.Module) -> str:
    args = getattr(model, 'architecture_args', None)
    if args is None:
        return type(model).__name__
    return f'{type(model).__name__}({", ".join(f"{k}={v!r}" for k, v in args().items())})'


def _adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """timm's ``adapt_input_conv`` rule from any source channel count: sum for 1 channel, else tile and rescale."""
    src = weight.shape[1]
    adapted = weight.float()
    if in_chans == 1:
        adapted = adapted.sum(dim=1, keepdim=True)
    else:
        adapted = adapted.repeat(1, math.ceil(in_chans / src), 1, 1)[:, :in_chans] * (src / in_chans)
    return adapted.to(weight.dtype)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Check that a state dict fits ``model`` before timm loads it (timm's ``pretrained_filter_fn`` hook).

    Shapes may differ only where timm adapts them afterwards: the first conv's input channels (``in_chans``) and,
    when ``num_classes`` differs from the checkpoint's, the class-dependent tensors listed in the pretrained config's
    ``classifier`` (dropped and rebuilt fresh). Anything else means ``config.json`` and the weights describe
    different networks, which would otherwise surface as a long ``size mismatch`` list or, worse, load silently.

    Returns:
        ``state_dict`` unchanged.

    Raises:
        CheckpointError: Listing the tensors that do not fit, and what to do.
    """
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    src_classes = cfg.get('num_classes')
    adapting_classes = src_classes is not None and getattr(model, 'num_classes', src_classes) != src_classes
    classifier_keys = {f'{n}.{p}' for n in _names(cfg.get('classifier')) for p in ('weight', 'bias')}
    first_conv_keys = {f'{n}.weight' for n in _names(cfg.get('first_conv'))}

    expected = model.state_dict()
    mismatched, missing = [], []
    for key, want in expected.items():
        dropped = adapting_classes and key in classifier_keys
        if key not in state_dict:
            if not dropped:
                missing.append(key)
            continue
        got = state_dict[key]
        if not isinstance(got, torch.Tensor):
            mismatched.append(f'{key} is a {type(got).__name__}, not a tensor')
        elif key in first_conv_keys and got.shape == want.shape and want.shape[1] not in (1, 3) \
                and not _TIMM_ADAPTS_ANY_CHANNELS:
            # Older timm "converts" any first conv of a model with other than 1 or 3 input channels, fails on one
            # that already fits, and re-initialises it at random with only a logged warning.
            raise CheckpointError(
                f'timm {timm.__version__} cannot load the {want.shape[1]}-channel first convolution {key} as it is: it '
                f'would replace it with random weights. Upgrade timm (pip install -U "timm>=1.0.31"), or load the '
                f'model with in_chans=1 or 3 (timm then adapts the weights)')
        elif got.shape == want.shape or dropped:
            continue
        elif key in first_conv_keys and got.ndim == want.ndim == 4 and got.shape[0] == want.shape[0] \
                and got.shape[2:] == want.shape[2:]:
            if got.shape[1] != 3 and not _TIMM_ADAPTS_ANY_CHANNELS:
                # Older timm converts first convs from 3 channels only (and leaves 3-channel models alone): bring
                # other weights to the model's 1 or 3 channels here, or to 3 for timm to convert further.
                target = want.shape[1] if want.shape[1] in (1, 3) else 3
                state_dict[key] = _adapt_input_channels(got, target)
            continue  # timm adapts the input channels of the first conv (in_chans)
        else:
            mismatched.append(f'{key}: checkpoint {tuple(got.shape)}, model {tuple(want.shape)}')
    unexpected = [k for k in state_dict if k not in expected and not (adapting_classes and k in classifier_keys)]
    if not (mismatched or missing or unexpected):
        return state_dict

    lines = []
    for title, items in (('shape mismatch', mismatched), ('missing from checkpoint', missing),
                         ('not in the model', unexpected)):
        if items:
            shown = items[:8] + ([f'... and {len(items) - 8} more'] if len(items) > 8 else [])
            lines.append(f'  {title}: ' + '; '.join(shown))
    source = cfg.get('hf_hub_id') or cfg.get('file') or 'the checkpoint'
    raise CheckpointError(
        f'the weights of {source} do not fit the network built from its config ({_describe(model)}):\n'
        + '\n'.join(lines) + '\n'
        f'config.json and model.safetensors describe different networks, or an architecture option was overridden '
        f'at load time. Only {" and ".join(ADAPTABLE_ARGS)} may differ from the checkpoint; re-export config and '
        f'weights together with `python -m timm_asge.hub export` if they were edited separately.')
