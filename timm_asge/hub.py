"""Hugging Face Hub support for ASGE models: save, export a training run, model cards, push, checked loading.

A Hub repo for an ASGE model is exactly what timm reads: ``config.json`` (timm's format, every architecture option in
``model_args``), ``model.safetensors`` (the fixed projections included) and a ``README.md`` model card generated from
``hub_cards/template.md``, the run's ``results.json`` and a metadata file ``hub_cards/<arch>.<tag>.yaml``. Loading
needs nothing from this module::

    import timm, timm_asge
    model = timm.create_model('hf-hub:timm-asge/asge_cnn_tiny.digits', pretrained=True)

Command line::

    python -m timm_asge.hub export outputs/digits outputs/hub/asge_cnn_tiny.digits \\
        --metadata hub_cards/asge_cnn_tiny.digits.yaml --record
    python -m timm_asge.hub push outputs/hub/asge_cnn_tiny.digits --repo-id timm-asge/asge_cnn_tiny.digits --dry-run
    python -m timm_asge.hub table --write README.md
"""
import argparse
import contextlib
import copy
import json
import logging
import math
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import validate_repo_id

import timm
from timm.models import load_pretrained, save_for_hf

from .checkpoint import (
    CONFIG_NAME, UNSAFE_SUFFIXES, WEIGHTS_NAME, CheckpointError, check_architecture, check_folder,
    checkpoint_filter_fn, read_config, read_safetensors,
)
from .fileio import atomic_dir, atomic_path
from .models.asge_cnn import HF_ORG, PREDICTIONS, AsgeCnn

__all__ = [
    'save_pretrained', 'create_model_checked', 'export', 'build_card', 'push', 'PushResult', 'load_metadata',
    'record_results', 'pretrained_table', 'update_readme', 'main', 'CheckpointError', 'HubError',
]

_logger = logging.getLogger(__name__)

README_NAME = 'README.md'
REPO_FILES = (CONFIG_NAME, WEIGHTS_NAME, README_NAME)
# hub_cards/ lives in the repository next to the package (editable installs, source checkouts).
CARDS_DIR = Path(__file__).resolve().parent.parent / 'hub_cards'
TEMPLATE_NAME = 'template.md'
README_SECTION_NAME = 'readme_section.md'
PRETRAINED_MARKER = '<!-- section: pretrained (owner: hub) -->'
# results.json keys a card is rendered from; `export --record` copies them into the metadata file.
RESULT_KEYS = (
    'model', 'dataset', 'config_file', 'command', 'commit', 'hardware', 'epochs', 'train_time_s', 'best_epoch',
    'best_block', 'prediction', 'test_accuracy', 'strategies', 'recipe',
)
# Options a registry-name load may build differently from the exported config without changing the weights'
# meaning: `prediction` is a runtime choice (`best_block` travels in the weights), dropout is off at inference.
RUNTIME_ARGS = ('prediction', 'best_block', 'drop_rate')
DATA_CFG_KEYS = ('input_size', 'mean', 'std', 'num_classes', 'interpolation', 'crop_pct', 'label_names')
PAPER = dict(
    title='Adaptive Spatial Goodness Encoding: Advancing and Scaling Forward-Forward Learning',
    authors='Q. Gong, R. B. Staszewski, K. Xu',
    arxiv='2509.12394',
    url='https://arxiv.org/abs/2509.12394',
    venue='ICASSP 2026',
)
CITATION = """@inproceedings{gong2026asge,
  title = {Adaptive Spatial Goodness Encoding: Advancing and Scaling Forward-Forward Learning},
  author = {Gong, Q. and Staszewski, R. B. and Xu, K.},
  booktitle = {ICASSP 2026},
  year = {2026},
  eprint = {2509.12394},
  archivePrefix = {arXiv},
  url = {https://arxiv.org/abs/2509.12394}
}"""


class HubError(ValueError):
    """A publishing step that cannot go on as asked; the message says what is wrong and what to do."""


def save_pretrained(
        model: AsgeCnn,
        directory: Union[str, Path],
        label_names: Optional[Sequence[str]] = None,
) -> Path:
    """Write ``model`` to ``directory`` in timm's Hub layout, atomically (the folder appears complete or not at all).

    ``config.json`` carries every architecture option (``model.architecture_args()``: widths, down-sampling,
    pooling, grid exponent, prediction strategy and chosen block), so ``timm.create_model('local-dir:<directory>',
    pretrained=True)`` or ``'hf-hub:<org>/<name>'`` rebuilds the same network. Weights are safetensors only.
    """
    model_config = {'label_names': list(label_names)} if label_names else None
    if not all(t.is_contiguous() for t in model.state_dict().values()):
        # Trained in channels_last: safetensors stores row-major tensors only, so save a row-major copy.
        model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    with _new_folder(directory, (CONFIG_NAME, WEIGHTS_NAME)) as tmp:
        save_for_hf(
            model, tmp, model_config=model_config, model_args=model.architecture_args(), safe_serialization=True)
    return Path(directory)


@contextlib.contextmanager
def _new_folder(directory: Union[str, Path], replaceable: Sequence[str]) -> Iterator[Path]:
    """``atomic_dir``, refusing (as a HubError) to replace a folder that holds anything but an earlier export, or to
    write where no folder can be made."""
    with contextlib.ExitStack() as stack:
        try:
            tmp = stack.enter_context(atomic_dir(directory, replaceable))
        except OSError as e:  # only what creating the folder raised: errors of the writing itself pass unchanged
            if isinstance(e, FileExistsError) and e.errno is None:  # atomic_dir's own refusal, which says what to do
                raise HubError(str(e)) from None
            raise HubError(f'cannot create a folder at {directory} ({e.strerror or e}); pass a writable path') from e
        yield tmp


# --- checked loading -------------------------------------------------------------------------------------------------

def _hf_split(name: str) -> Tuple[str, Optional[str]]:
    repo_id, _, revision = name.partition('@')
    return repo_id, revision or None


def _fetch(repo_id: str, filename: str, revision: Optional[str], cache_dir: Optional[Union[str, Path]]) -> Path:
    """Download (or find in the cache) one file of a Hub repo; a missing file or repo is a CheckpointError."""
    where = repo_id + (f'@{revision}' if revision else '')
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, library_name='timm'))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f'{filename} of {where} is not in the local Hugging Face cache and the Hub cannot be reached (offline, '
            f'or HF_HUB_OFFLINE=1); connect once to download it, or load a folder with "local-dir:<path>"') from None
    except EntryNotFoundError:
        raise CheckpointError(
            f'the Hub repo {where} has no {filename}, so it is not a timm model in timm-asge\'s format; export it '
            f'with `python -m timm_asge.hub export` and push all of {", ".join(REPO_FILES)}') from None
    except RevisionNotFoundError:
        raise CheckpointError(
            f'the Hub repo {repo_id} has no revision {revision!r}; check the name after "@"') from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f'no Hub repo {repo_id} (or it is private or gated): check the name, or log in with `hf auth login` / '
            f'HF_TOKEN') from None


def create_model_checked(
        model_name: str,
        cache_dir: Optional[Union[str, Path]] = None,
        **kwargs,
) -> torch.nn.Module:
    """``timm.create_model(model_name, pretrained=True, **kwargs)`` with every check done first, and clear errors.

    Accepts the same names as timm: ``'hf-hub:org/name[@revision]'``, ``'local-dir:/path'`` or a registry name with
    Hub weights (``'asge_cnn_tiny.digits'``). The config's architecture must be registered, the weights must be a
    readable ``model.safetensors`` (nothing is unpickled) and fit the network; only ``num_classes`` and ``in_chans``
    may be changed through ``kwargs`` (adapted the way timm adapts other models).

    Raises:
        CheckpointError: Naming the problem (unknown architecture, missing/corrupt/truncated weights, shapes that do
            not match) and what to do.
    """
    kwargs.pop('pretrained', None)
    if kwargs.get('features_only'):
        raise ValueError(
            'create_model_checked loads a whole model; for feature maps load it with '
            'timm.create_model(model_name, pretrained=True, features_only=True), or call '
            'model.forward_intermediates(x) on the model this function returns')
    if model_name.startswith('local-dir:'):
        folder = Path(model_name[len('local-dir:'):]).expanduser()
        check_folder(folder)
        model_name = f'local-dir:{folder}'  # timm itself does not expand ~
        weights = folder / WEIGHTS_NAME
    elif model_name.startswith('hf-hub:'):
        repo_id, revision = _hf_split(model_name[len('hf-hub:'):])
        config_file = _fetch(repo_id, CONFIG_NAME, revision, cache_dir)
        check_architecture(read_config(config_file)['architecture'], source=f'config.json of {repo_id}')
        weights = _fetch(repo_id, WEIGHTS_NAME, revision, cache_dir)
    else:
        arch = model_name.split('.', 1)[0]
        check_architecture(arch, source=f'the model name {model_name!r}')
        try:
            cfg = timm.models.get_pretrained_cfg(model_name)
        except RuntimeError:  # an unknown tag
            cfg = None
        if cfg is None or not cfg.hf_hub_id:
            raise CheckpointError(
                f'{model_name!r} has no published weights; list the ones that do with '
                f'timm.list_models("asge*", pretrained=True), or load a folder with "local-dir:<path>"')
        repo_id, revision = _hf_split(cfg.hf_hub_id)
        weights = _fetch(repo_id, cfg.hf_hub_filename or WEIGHTS_NAME, revision, cache_dir)
    state_dict = read_safetensors(weights)

    # Build the network the config describes without weights, then load the checked state dict through timm's own
    # loader so in_chans / num_classes adaptation is exactly timm's.
    model = timm.create_model(model_name, pretrained=False, cache_dir=cache_dir, **kwargs)
    pretrained_cfg = dict(model.pretrained_cfg, source=None, state_dict=state_dict)
    load_pretrained(
        model,
        pretrained_cfg=pretrained_cfg,
        num_classes=model.num_classes,
        in_chans=getattr(model, 'in_chans', 3),
        filter_fn=checkpoint_filter_fn,
    )
    return model


# --- metadata and results --------------------------------------------------------------------------------------------

def load_metadata(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a ``hub_cards/<arch>.<tag>.yaml`` metadata file."""
    path = Path(path)
    if not path.is_file():
        raise HubError(f'no metadata file at {path}; copy one of {CARDS_DIR}/*.yaml and edit it')
    try:
        metadata = yaml.safe_load(path.read_text(encoding='utf-8'))
    except yaml.YAMLError as e:
        raise HubError(f'{path} is not valid YAML: {e}') from e
    if not isinstance(metadata, dict) or not isinstance(metadata.get('name'), str) or '.' not in metadata['name']:
        raise HubError(f'{path} must be a YAML mapping with name: <architecture>.<tag> (e.g. asge_cnn.mnist)')
    for key in ('dataset', 'paper', 'results'):
        if not isinstance(metadata.get(key) or {}, dict):
            raise HubError(f'{path}: {key} must be a mapping, got {metadata[key]!r}')
    accuracy = (metadata.get('paper') or {}).get('accuracy')
    if accuracy is not None and (isinstance(accuracy, bool) or not isinstance(accuracy, (int, float))):
        raise HubError(f'{path}: paper.accuracy must be a number (percent), got {accuracy!r}')
    if metadata.get('published') and not isinstance(metadata.get('repo_id'), str):
        raise HubError(f'{path}: published: true needs the repo_id it was published to (repo_id: <org>/<name>)')
    return metadata


def read_results(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a training run's ``results.json`` and check the keys a card needs."""
    path = Path(path)
    if path.is_dir():
        path = path / 'results.json'
    if not path.is_file():
        raise HubError(f'no results.json at {path}: pass the output folder of recipes/train.py (it writes '
                       f'results.json and export/ when training finishes)')
    try:
        results = json.loads(path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as e:
        raise HubError(f'{path} is not valid JSON ({e}); rerun the training or restore the file') from e
    _check_results(results, str(path))
    return results


def _check_results(results: Dict[str, Any], source: str) -> None:
    missing = [k for k in ('model', 'dataset', 'test_accuracy') if k not in results]
    if missing:
        raise HubError(f'{source} lacks {", ".join(missing)}; it must come from recipes/train.py')
    accuracy = results['test_accuracy']
    if not isinstance(accuracy, dict) or not accuracy:
        raise HubError(f'{source}: test_accuracy must map prediction strategies to accuracies')
    for strategy, value in accuracy.items():
        if strategy not in PREDICTIONS:
            raise HubError(f'{source}: unknown prediction strategy {strategy!r} in test_accuracy '
                           f'(expected {", ".join(PREDICTIONS)})')
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise HubError(f'{source}: test_accuracy[{strategy!r}] = {value!r} is not a fraction in [0, 1]')
    if not isinstance(results['dataset'], dict) or 'name' not in results['dataset']:
        raise HubError(f'{source}: dataset must be a mapping with at least a name')


def _results_for_metadata(results: Dict[str, Any]) -> Dict[str, Any]:
    return {k: results[k] for k in RESULT_KEYS if k in results}


def record_results(metadata_path: Union[str, Path], results: Dict[str, Any]) -> None:
    """Store a run's results (and its hardware and commit) in a metadata file, keeping its leading comment."""
    path = Path(metadata_path)
    metadata = load_metadata(path)
    metadata['results'] = _results_for_metadata(results)
    for key in ('hardware', 'commit'):
        if results.get(key) is not None:
            metadata[key] = results[key]
    _write_metadata(path, metadata)


def _write_metadata(path: Path, metadata: Dict[str, Any]) -> None:
    # Keep the file's leading comment block: it tells readers how the file is used.
    lines = path.read_text(encoding='utf-8').splitlines(keepends=True)
    header = []
    for line in lines:
        if not line.startswith('#'):
            break
        header.append(line)
    body = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=120)
    with atomic_path(path) as tmp:
        tmp.write_text(''.join(header) + body, encoding='utf-8')


def default_name(results: Dict[str, Any]) -> str:
    """``<architecture>.<dataset name>``: the registry-style name of a run's checkpoint."""
    return f'{results["model"]}.{results["dataset"]["name"]}'


# --- model card ------------------------------------------------------------------------------------------------------

def _si(value: Optional[float], unit: str = '') -> str:
    if value is None:
        return '-'
    for factor, prefix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if abs(value) >= factor:
            return f'{value / factor:.2f} {prefix}{unit}'
    return f'{value:g} {unit}'.strip()


def _bytes(value: Optional[float]) -> str:
    if value is None:
        return '-'
    for factor, prefix in ((2 ** 30, 'GiB'), (2 ** 20, 'MiB'), (2 ** 10, 'KiB')):
        if value >= factor:
            return f'{value / factor:.2f} {prefix}'
    return f'{value:g} B'


def _pct(value: Optional[float]) -> str:
    return '-' if value is None else f'{100 * value:.2f}'


def _template(name: str, template_dir: Optional[Union[str, Path]]) -> Path:
    path = Path(template_dir or CARDS_DIR) / name
    if not path.is_file():
        raise HubError(f'card template {path} not found: run from a timm-asge source checkout (hub_cards/ sits next '
                       f'to the package) or pass template_dir')
    return path


def build_card(
        results: Dict[str, Any],
        metadata: Optional[Dict[str, Any]] = None,
        repo_id: Optional[str] = None,
        template_dir: Optional[Union[str, Path]] = None,
        notes: Sequence[str] = (),
) -> str:
    """Render a model card (``README.md``) for a trained checkpoint.

    Args:
        results: The run's ``results.json`` (or the ``results`` stored in its metadata file).
        metadata: The checkpoint's ``hub_cards/<name>.yaml`` entries: name, dataset title and Hub id, license,
            paper accuracy, config file. Values from ``results`` win for what the run measured.
        repo_id: Hub repo the card describes (its usage snippet loads from it); defaults to the metadata's.
        template_dir: Folder holding ``template.md``; defaults to the repository's ``hub_cards/``.
        notes: Extra remarks for the usage section (e.g. how a registry-name load differs).

    Returns:
        The card text: YAML metadata (``library_name: timm``, license, datasets, tags, ``model-index`` with the
        test accuracy of every prediction strategy), then the body from the template.
    """
    metadata = dict(metadata or {})
    _check_results(results, 'results')
    name = metadata.get('name') or default_name(results)
    repo_id = repo_id or metadata.get('repo_id') or f'{HF_ORG}/{name}'
    arch = name.split('.', 1)[0]
    dataset = dict(metadata.get('dataset') or {})
    dataset.update({k: v for k, v in results['dataset'].items() if v is not None})
    dataset_title = dataset.get('title') or dataset['name']
    hub_id = dataset.get('hub_id')
    paper = dict(metadata.get('paper') or {})
    license_ = metadata.get('license', 'apache-2.0')

    accuracy = results['test_accuracy']
    strategies = results.get('strategies') or {}
    rows = []
    for strategy in PREDICTIONS:
        if strategy not in accuracy:
            continue
        costs = strategies.get(strategy, {})
        rows.append(dict(
            strategy=strategy,
            accuracy=_pct(accuracy[strategy]),
            params=_si(costs.get('params')),
            flops=_si(costs.get('flops')),
            activation=_bytes(costs.get('activation_bytes')),
        ))
    eval_results = [
        EvalResult(
            task_type='image-classification',
            task_name='Image Classification',
            dataset_type=hub_id or dataset['name'],
            dataset_name=dataset_title,
            dataset_split='test',
            metric_type='accuracy',
            metric_name=f'Top-1 accuracy ({strategy})',
            metric_value=float(accuracy[strategy]),
        )
        for strategy in PREDICTIONS if strategy in accuracy
    ]
    card_data = ModelCardData(
        library_name='timm',
        license=license_,
        tags=['image-classification', 'timm', 'forward-forward', 'asge', 'local-learning'],
        datasets=[hub_id] if hub_id else None,
        pipeline_tag='image-classification',
        metrics=['accuracy'],
        model_name=name,
        eval_results=eval_results,
    )
    recipe = results.get('recipe')
    best_block = results.get('best_block')
    registered, registry_notes = _registry_notes(name, repo_id, results.get('prediction'))
    card = ModelCard.from_template(
        card_data,
        template_path=str(_template(TEMPLATE_NAME, template_dir)),
        name=name,
        arch=arch,
        repo_id=repo_id,
        registered=registered,
        description=metadata.get('description', ''),
        dataset=dataset,
        dataset_title=dataset_title,
        hub_id=hub_id,
        splits=dataset.get('splits') or {},
        prediction=results.get('prediction'),
        best_block=best_block,
        rows=rows,
        paper=PAPER,
        paper_accuracy=paper.get('accuracy'),
        paper_network=paper.get('network'),
        config_file=results.get('config_file') or metadata.get('config_file'),
        command=results.get('command'),
        commit=results.get('commit') or metadata.get('commit'),
        hardware=results.get('hardware') or metadata.get('hardware'),
        epochs=results.get('epochs'),
        best_epoch=results.get('best_epoch'),
        train_time=None if results.get('train_time_s') is None else f'{results["train_time_s"]:.0f} s',
        recipe_yaml=yaml.safe_dump(recipe, sort_keys=False, width=120).strip() if recipe else None,
        notes=registry_notes + list(notes),
        citation=CITATION,
    )
    return str(card).rstrip() + '\n'


# --- export ----------------------------------------------------------------------------------------------------------

def _same(a: Any, b: Any) -> bool:
    """Compare JSON-ish values, treating tuples as lists and ints as floats."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=0, abs_tol=1e-12)
    return a == b


def _registry_model(name: str) -> Optional[torch.nn.Module]:
    """The network ``timm.create_model(name, pretrained=True)`` builds (on the meta device: no memory, no init)."""
    if name not in timm.list_models(pretrained=True):
        return None
    return timm.create_model(name, pretrained=False, device='meta')


def registry_conflicts(name: str, config: Dict[str, Any]) -> List[str]:
    """Compare an exported config with what ``timm.create_model(name, pretrained=True)`` would build.

    A registry-name load downloads only the weights and builds the network from the local entrypoint and pretrained
    config, so publishing under a registry name whose network or data config differs would load wrong results.
    Runtime choices (``RUNTIME_ARGS``: prediction strategy, dropout) may differ; the card says how.

    Returns:
        The differences that change what the weights compute (empty if ``name`` is not a registry name).
    """
    reference = _registry_model(name)
    if reference is None:
        return []
    ref_args = reference.architecture_args() if hasattr(reference, 'architecture_args') else {}
    args = config.get('model_args', {})
    errors = [
        f'model_args.{key}: exported {args.get(key)!r}, registry builds {want!r}'
        for key, want in ref_args.items() if key not in RUNTIME_ARGS and not _same(args.get(key), want)
    ]
    ref_cfg = reference.pretrained_cfg
    cfg = dict(config.get('pretrained_cfg', {}), label_names=config.get('label_names'))
    for key in DATA_CFG_KEYS:
        want, got = ref_cfg.get(key), cfg.get(key)
        if want is not None and got is not None and not _same(got, want):
            errors.append(f'pretrained_cfg.{key}: exported {got!r}, registry has {want!r}')
    return errors


def _registry_notes(name: str, repo_id: str, prediction: Optional[str]) -> Tuple[bool, List[str]]:
    """Whether the registry name loads from ``repo_id``, and how such a load differs from ``hf-hub:``."""
    reference = _registry_model(name)
    if reference is None or reference.pretrained_cfg.get('hf_hub_id') != repo_id:
        return False, []
    notes = []
    default = getattr(reference, 'prediction', None)
    if prediction and default and prediction != default:
        notes.append(
            f"Loaded by its registry name, the model uses the architecture's default prediction strategy "
            f"`{default}`; pass `prediction='{prediction}'` to `timm.create_model` (or call "
            f"`model.set_prediction('{prediction}')`) for the published one (the chosen block is stored in the "
            f"weights), or load it with `hf-hub:`.")
    return True, notes


def _check_data_config(config: Dict[str, Any], src: Path) -> None:
    """The pretrained config's data fields must describe the images the network reads (timm builds transforms from
    them: a 3-value mean on 1-channel images silently broadcasts them to 3 channels)."""
    cfg, in_chans = config.get('pretrained_cfg', {}), config.get('model_args', {}).get('in_chans')
    if in_chans is None:
        return
    problems = []
    if cfg.get('input_size') and cfg['input_size'][0] != in_chans:
        problems.append(f'input_size {cfg["input_size"]}')
    for key in ('mean', 'std'):
        if cfg.get(key) is not None and len(cfg[key]) != in_chans:
            problems.append(f'{key} {cfg[key]}')
    if problems:
        raise HubError(
            f'{src / CONFIG_NAME}: the model reads {in_chans}-channel images but its pretrained_cfg has '
            f'{", ".join(problems)}, so timm would build the wrong transforms. Create the model with the tagged name '
            f'whose pretrained config describes the data (e.g. timm.create_model(\'asge_cnn.mnist\', ...) rather '
            f'than \'asge_cnn\' with in_chans=1), or pass pretrained_cfg_overlay=dict(input_size=..., mean=..., '
            f'std=...), and save it again.')


def export(
        run_dir: Union[str, Path],
        out_dir: Union[str, Path],
        metadata: Optional[Union[str, Path, Dict[str, Any]]] = None,
        name: Optional[str] = None,
        repo_id: Optional[str] = None,
        check_registry: bool = True,
        record: bool = False,
        template_dir: Optional[Union[str, Path]] = None,
) -> Path:
    """Turn a training output folder into a Hub repo folder: ``config.json``, ``model.safetensors``, ``README.md``.

    The weights are copied byte for byte from ``<run_dir>/export`` after checking that they load into the network
    ``config.json`` describes; the card is rendered from ``results.json`` and the metadata.

    Args:
        run_dir: Output folder of ``recipes/train.py`` (``results.json`` + ``export/``).
        out_dir: Folder to write (replaced atomically).
        metadata: A ``hub_cards/<name>.yaml`` file (or its parsed mapping).
        name: ``<architecture>.<tag>``; defaults to the metadata's, else ``<model>.<dataset name>``.
        repo_id: Hub repo the card's usage snippet loads from; defaults to the metadata's, else ``timm-asge/<name>``.
        check_registry: Refuse to export under a registry name whose built-in network or data config differs.
        record: Write the run's results into the metadata file (needs a metadata path).
        template_dir: Folder with the card template (default ``hub_cards/``).

    Returns:
        ``out_dir``.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    results = read_results(run_dir)
    metadata_path = Path(metadata) if isinstance(metadata, (str, Path)) else None
    meta = load_metadata(metadata_path) if metadata_path else dict(metadata or {})
    name = name or meta.get('name') or default_name(results)
    meta['name'] = name
    repo_id = repo_id or meta.get('repo_id') or f'{HF_ORG}/{name}'
    arch, _, tag = name.partition('.')

    src = run_dir / 'export'
    config = check_folder(src)
    for what, value in (('config.json', config['architecture']), ('results.json', results['model'])):
        if value != arch:
            raise HubError(f'{what} in {run_dir} is for architecture {value!r}, but the checkpoint is named {name!r}; '
                           f'pass the matching --metadata / --name')
    # Load through the checked path: proves config and weights agree before anything is written.
    model = create_model_checked(f'local-dir:{src}')
    if hasattr(model, 'architecture_args'):
        missing = [k for k, v in model.architecture_args().items()
                   if k not in config.get('model_args', {}) or not _same(config['model_args'][k], v)]
        if missing:
            raise HubError(f'{src / CONFIG_NAME} does not record model_args {", ".join(missing)}; re-save the model '
                           f'with timm_asge.hub.save_pretrained, which writes every architecture option')
    _check_data_config(config, src)
    label_names = config.get('label_names') or results['dataset'].get('label_names')
    if label_names is not None and len(label_names) != config.get('num_classes'):
        raise HubError(f'{len(label_names)} label names for {config.get("num_classes")} classes in {src}')

    if check_registry:
        errors = registry_conflicts(name, config)
        if errors:
            raise HubError(
                f'{name!r} is a registry name, and `timm.create_model({name!r}, pretrained=True)` would build a '
                f'different network from the one trained, so the published weights would give wrong results:\n  '
                + '\n  '.join(errors)
                + '\nTrain with the registry configuration, or publish under another name (--name '
                  f'{arch}.<new tag>) and load it with hf-hub:.')

    config = json.loads(json.dumps(config))
    config['pretrained_cfg']['tag'] = tag
    if label_names is not None:
        config['label_names'] = list(label_names)
        config['pretrained_cfg']['label_names'] = list(label_names)
    card = build_card(results, meta, repo_id=repo_id, template_dir=template_dir)

    with _new_folder(out_dir, REPO_FILES) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + '\n', encoding='utf-8')
        shutil.copyfile(src / WEIGHTS_NAME, tmp / WEIGHTS_NAME)
        (tmp / README_NAME).write_text(card, encoding='utf-8')
    if record:
        if metadata_path is None:
            raise HubError('record needs a metadata file (--metadata hub_cards/<name>.yaml) to write the results to')
        record_results(metadata_path, results)
    _logger.info(f'Exported {name} to {out_dir}')
    return out_dir


# --- push ------------------------------------------------------------------------------------------------------------

@dataclass
class PushResult:
    """What ``push`` uploaded (or, for a dry run, would upload)."""
    repo_id: str
    files: List[str] = field(default_factory=list)
    dry_run: bool = True
    commit_url: Optional[str] = None


def check_repo_folder(folder: Union[str, Path], repo_id: Optional[str] = None) -> List[str]:
    """Check a folder is ready to publish: the three files, loadable weights, a card that parses and names repo_id.

    Returns:
        The file names to upload.
    """
    folder = Path(folder)
    check_folder(folder)
    read_safetensors(folder / WEIGHTS_NAME)
    unsafe = sorted(p.name for p in folder.iterdir() if p.suffix in UNSAFE_SUFFIXES)
    if unsafe:
        raise HubError(f'{folder} holds pickle-based files ({", ".join(unsafe)}); remove them: only '
                       f'{", ".join(REPO_FILES)} are published')
    readme = folder / README_NAME
    if not readme.is_file():
        raise HubError(f'{folder} has no {README_NAME}; create the folder with `python -m timm_asge.hub export`')
    try:
        card = ModelCard.load(readme)
    except (yaml.YAMLError, ValueError) as e:
        reason = ' '.join(str(e).split())
        raise HubError(f'{readme} is not a valid model card ({reason}); regenerate it with '
                       f'`python -m timm_asge.hub export`') from None
    if not card.data.eval_results:
        raise HubError(f'{readme} has no model-index results; regenerate it with `python -m timm_asge.hub export`')
    if repo_id is not None and f'hf-hub:{repo_id}' not in card.text:
        raise HubError(f'{readme} was rendered for another repo (its usage snippet does not load hf-hub:{repo_id}); '
                       f'export again with --repo-id {repo_id}')
    return list(REPO_FILES)


def push(
        folder: Union[str, Path],
        repo_id: str,
        token: Optional[str] = None,
        dry_run: bool = False,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: str = 'Add ASGE model',
        create_pr: bool = False,
) -> PushResult:
    """Upload an exported folder (``config.json``, ``model.safetensors``, ``README.md``) to a Hub model repo.

    Args:
        folder: Output of :func:`export`.
        repo_id: ``org/name``; created if missing.
        token: Hub token; None uses ``HF_TOKEN`` or the cached ``hf auth login`` token.
        dry_run: Check everything and report the files, upload nothing (no network access).
        private: Create the repo private.
        revision: Branch to commit to.
        commit_message: Commit message.
        create_pr: Open a pull request instead of committing to the branch.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f'invalid repo id {repo_id!r}: {e}') from e
    if '/' not in repo_id:
        raise HubError(f'repo id {repo_id!r} needs an owner: <user or org>/<name>')
    files = check_repo_folder(folder, repo_id)
    if dry_run:
        return PushResult(repo_id=repo_id, files=files, dry_run=True)
    api = HfApi(token=token, library_name='timm')
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_url.repo_id,
        folder_path=str(folder),
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
        allow_patterns=files,
    )
    return PushResult(repo_id=repo_url.repo_id, files=files, dry_run=False,
                      commit_url=getattr(commit, 'commit_url', None))


# --- README table ----------------------------------------------------------------------------------------------------

def _card_files(cards_dir: Union[str, Path]) -> List[Path]:
    return sorted(p for p in Path(cards_dir).glob('*.yaml'))


def pretrained_table(cards_dir: Union[str, Path, None] = None) -> str:
    """Render the README's "Pretrained models" section from every ``hub_cards/*.yaml``."""
    import jinja2  # huggingface_hub's card templates need it too

    cards_dir = Path(cards_dir or CARDS_DIR)
    rows = []
    metas = sorted((load_metadata(p) for p in _card_files(cards_dir)), key=lambda m: (m.get('order', 1000), m['name']))
    for meta in metas:
        results = meta.get('results') or {}
        accuracy = results.get('test_accuracy') or {}
        dataset = meta.get('dataset') or {}
        paper = (meta.get('paper') or {}).get('accuracy')
        if not results:
            status = 'not yet trained'
        elif meta.get('published'):
            status = f'[on the Hub](https://huggingface.co/{meta["repo_id"]})'
        else:
            status = 'trained, not yet on the Hub'
        rows.append(dict(
            name=meta['name'],
            repo_id=meta.get('repo_id') or f'{HF_ORG}/{meta["name"]}',
            dataset=dataset.get('title') or dataset.get('name', ''),
            fusion=_pct(accuracy.get('fusion')) if results else '-',
            last=_pct(accuracy.get('last')) if results else '-',
            best=_pct(accuracy.get('best')) if results else '-',
            paper='-' if paper is None else f'{paper:.2f}',
            config=meta.get('config_file') or '',
            status=status,
            trained=bool(results),
            published=bool(meta.get('published')),
        ))
    template = jinja2.Template(_template(README_SECTION_NAME, cards_dir).read_text(encoding='utf-8'))
    text = template.render(rows=rows)
    return re.sub(r'\n{3,}', '\n\n', text).strip() + '\n'


def update_readme(readme: Union[str, Path], cards_dir: Union[str, Path, None] = None) -> bool:
    """Replace the README section after ``PRETRAINED_MARKER`` (up to the next section marker) with the table.

    Returns:
        True if the file changed.
    """
    readme = Path(readme)
    text = readme.read_text(encoding='utf-8')
    start = text.find(PRETRAINED_MARKER)
    if start < 0:
        raise HubError(f'{readme} has no "{PRETRAINED_MARKER}" marker; add it where the table belongs')
    body_start = start + len(PRETRAINED_MARKER)
    nxt = re.search(r'^<!-- section:', text[body_start:], flags=re.MULTILINE)
    end = body_start + nxt.start() if nxt else len(text)
    new = text[:body_start] + '\n' + pretrained_table(cards_dir) + '\n' + text[end:]
    if new == text:
        return False
    with atomic_path(readme) as tmp:
        tmp.write_text(new, encoding='utf-8')
    return True


# --- command line ----------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m timm_asge.hub', description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('export', help='turn a training output folder into a Hub repo folder')
    p.add_argument('run_dir', help='output folder of recipes/train.py (results.json + export/)')
    p.add_argument('out_dir', help='folder to write: config.json, model.safetensors, README.md')
    p.add_argument('--metadata', help='hub_cards/<arch>.<tag>.yaml of the checkpoint')
    p.add_argument('--name', help='<arch>.<tag> (default: from the metadata, else <model>.<dataset>)')
    p.add_argument('--repo-id', help='Hub repo the card loads from (default: metadata repo_id, else timm-asge/<name>)')
    p.add_argument('--record', action='store_true', help="store the run's results in the metadata file")
    p.add_argument('--no-registry-check', dest='check_registry', action='store_false',
                   help='allow a registry name whose built-in network differs (publish for hf-hub: loading only)')

    p = sub.add_parser('push', help='upload an exported folder to the Hugging Face Hub')
    p.add_argument('folder', help='output of the export command')
    p.add_argument('--repo-id', required=True, help='<user or org>/<name>')
    p.add_argument('--dry-run', action='store_true', help='check and list the files; upload nothing')
    p.add_argument('--private', action='store_true', help='create the repo private')
    p.add_argument('--revision', help='branch to commit to')
    p.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    p.add_argument('--commit-message', default='Add ASGE model')
    p.add_argument('--metadata', help='hub_cards/<name>.yaml: mark it published after a successful upload')

    p = sub.add_parser('card', help="print a model card from a metadata file's recorded results")
    p.add_argument('metadata', help='hub_cards/<arch>.<tag>.yaml with results recorded')
    p.add_argument('--repo-id')

    p = sub.add_parser('table', help='print (or write into README.md) the "Pretrained models" section')
    p.add_argument('--cards', default=str(CARDS_DIR), help='folder of metadata files')
    p.add_argument('--write', metavar='README', help='rewrite this README section in place')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    try:
        if args.command == 'export':
            out = export(args.run_dir, args.out_dir, metadata=args.metadata, name=args.name, repo_id=args.repo_id,
                         check_registry=args.check_registry, record=args.record)
            print(f'wrote {", ".join(REPO_FILES)} to {out}')
        elif args.command == 'push':
            result = push(args.folder, args.repo_id, dry_run=args.dry_run, private=args.private,
                          revision=args.revision, commit_message=args.commit_message, create_pr=args.create_pr)
            if result.dry_run:
                print(f'dry run: would upload {", ".join(result.files)} from {args.folder} to {result.repo_id}; '
                      f'nothing was uploaded')
            else:
                print(f'uploaded {", ".join(result.files)} to https://huggingface.co/{result.repo_id}'
                      + (f' ({result.commit_url})' if result.commit_url else ''))
                if args.metadata and (args.create_pr or args.revision not in (None, 'main')):
                    print(f'{args.metadata}: not marked published: the upload went to '
                          f'{"a pull request" if args.create_pr else "branch " + args.revision}, and timm loads a '
                          f'registry name from main; mark it once that is merged')
                elif args.metadata:
                    _mark_published(args.metadata, result.repo_id)
        elif args.command == 'card':
            meta = load_metadata(args.metadata)
            if not meta.get('results'):
                raise HubError(f'{args.metadata} has no results yet: train, then export with --record')
            sys.stdout.write(build_card(meta['results'], meta, repo_id=args.repo_id))
        elif args.command == 'table':
            if args.write:
                changed = update_readme(args.write, args.cards)
                print(f'{args.write}: {"updated" if changed else "already up to date"}')
            else:
                sys.stdout.write(pretrained_table(args.cards))
    except (HubError, CheckpointError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


def _mark_published(metadata_path: Union[str, Path], repo_id: str) -> None:
    path = Path(metadata_path)
    metadata = load_metadata(path)
    if metadata.get('repo_id') != repo_id:
        _logger.warning(f'{path} describes {metadata.get("repo_id")}, not {repo_id}: not marking it published')
        return
    metadata['published'] = True
    _write_metadata(path, metadata)


if __name__ == '__main__':
    sys.exit(main())
