"""Hugging Face Hub support for ASGE models: save, export a training run with its model card, push, checked loading.

A Hub repo of an ASGE model is timm's: ``config.json`` and ``model.safetensors`` from timm's ``save_for_hf`` (its
``model_args`` rebuild the network, prediction strategy included) and a card from ``hub_cards/template.md``. Plain
timm loads it once ``timm_asge`` is imported. Command line::

    python -m timm_asge.hub export outputs/digits outputs/hub/asge_cnn_tiny.digits \\
        --metadata hub_cards/asge_cnn_tiny.digits.yaml
    python -m timm_asge.hub push outputs/hub/asge_cnn_tiny.digits --repo-id timm-asge/asge_cnn_tiny.digits --dry-run
"""
import argparse
import copy
import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.errors import RevisionNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file

import timm
from timm.models import load_pretrained, save_for_hf

from .fileio import atomic_dir, file_sha256
from .models.asge_cnn import PREDICTIONS

__all__ = ['CheckpointError', 'save_pretrained', 'create_model_checked', 'build_card', 'export', 'push', 'main']

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
CARD_NAME = 'README.md'
REPO_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
# hub_cards/ sits next to the package in a source checkout, where exports are made.
CARDS_DIR = Path(__file__).resolve().parent.parent / 'hub_cards'
# Parameters and buffers a checkpoint may ask for: far above any ASGE network (asge_vgg11_w64 for ImageNet: 20M), far
# below what a hostile config.json could make the loader allocate.
MAX_NUMBERS = 2 ** 28


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and what to do."""


def save_pretrained(model: torch.nn.Module, directory: Union[str, Path], label_names: Sequence[str] = ()) -> Path:
    """Write ``model`` to ``directory`` as ``config.json`` + ``model.safetensors``, atomically, for
    ``timm.create_model('local-dir:<directory>', pretrained=True)``.

    Raises:
        FileExistsError: ``directory`` holds other files than an earlier save (replacing it would delete them).
    """
    if not all(t.is_contiguous() for t in model.state_dict().values()):
        # safetensors stores row-major tensors only (a model trained in channels_last is not).
        model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    model_config = {'label_names': list(label_names)} if label_names else None
    with atomic_dir(directory, replaceable=(CONFIG_NAME, WEIGHTS_NAME)) as tmp:
        _save(model, tmp, model_config)
    return Path(directory)


def _save(model: torch.nn.Module, folder: Path, model_config: Optional[Dict[str, Any]]) -> None:
    """timm's ``save_for_hf``, with the weights' SHA-256 in ``config.json`` for :func:`create_model_checked`."""
    save_for_hf(model, folder, model_config=model_config, model_args=model.architecture_args(), safe_serialization=True)
    config = json.loads((folder / CONFIG_NAME).read_text(encoding='utf-8'))
    config['weights_sha256'] = file_sha256(folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2), encoding='utf-8')


# --- checked loading -------------------------------------------------------------------------------------------------

def _check_architecture(arch: Any, source: str) -> None:
    if not isinstance(arch, str) or not arch.startswith('asge_'):
        raise CheckpointError(f'{source} is for architecture {arch!r}, not an ASGE model (asge_*); load it with '
                              f'timm.create_model')
    if not timm.is_model(arch):
        raise CheckpointError(f'{source} needs architecture {arch!r}, which this timm-asge lacks (it has '
                              f'{", ".join(timm.list_models("asge*"))}); upgrade timm-asge or fix the name')


def _check_config(path: Path, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """A timm config of an ASGE network this package can build, and of a bounded size (a Hub repo is untrusted)."""
    try:
        config = json.loads(path.read_text(encoding='utf-8'))
        arch = config['architecture']
        assert isinstance(config['pretrained_cfg'], dict) and isinstance(config.get('model_args', {}), dict)
    except FileNotFoundError:
        raise CheckpointError(f'no {CONFIG_NAME} at {path}; save the model with timm_asge.hub.save_pretrained') \
            from None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
        raise CheckpointError(f'{path} is not a timm config ({type(e).__name__}: {e}); download or export it '
                              f'again') from None
    _check_architecture(arch, str(path))
    args = {'num_classes': config.get('num_classes', config['pretrained_cfg'].get('num_classes')),
            **config.get('model_args', {}), **kwargs}
    try:  # on the meta device: sizes without memory
        network = timm.create_model(arch, device='meta', **{k: v for k, v in args.items() if v is not None})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f'{path} describes no valid {arch} ({e}); download or export it again') from None
    numbers = sum(t.numel() for t in (*network.parameters(), *network.buffers()))
    if numbers > MAX_NUMBERS:
        raise CheckpointError(f'{path} describes a network of {numbers:,} numbers, more than the {MAX_NUMBERS:,} '
                              f'loaded from a checkpoint; it is not an ASGE export: download or export it again')
    return config


def _read_weights(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f'no {WEIGHTS_NAME} at {path}; only safetensors weights are read: save the model '
                              f'with timm_asge.hub.save_pretrained')
    try:
        state_dict = load_file(path, device='cpu')
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f'{path} is corrupt or truncated ({e}); delete it, then download or export it '
                              f'again') from None
    broken = [k for k, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        raise CheckpointError(f'{path} holds NaN or infinite values in {", ".join(broken[:3])}'
                              f'{" and more" if len(broken) > 3 else ""}; it is not a trained model: export it again')
    return state_dict


def _check_card_hashes(card: Optional[Path], files: Dict[str, Path], digest: Callable[[Path], str]) -> None:
    """The files an export's card recorded (``sha256`` in its metadata) are the files being loaded."""
    if card is None or not card.is_file():
        return
    recorded = ModelCard.load(card).data.to_dict().get('sha256') or {}
    for name, path in files.items():
        if name in recorded and digest(path) != recorded[name]:
            raise CheckpointError(f'{path} is not the {name} its model card {card} was exported with (SHA-256 '
                                  f'differs); download or export the repo again')


def _download(repo_id: str, filename: str, revision: Optional[str], cache_dir: Optional[Union[str, Path]]) -> Path:
    where = f'{repo_id}@{revision}' if revision else repo_id
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, library_name='timm'))
    except LocalEntryNotFoundError:  # before EntryNotFoundError, its base class
        raise CheckpointError(f'{filename} of {where} is not in the Hugging Face cache and the Hub cannot be reached; '
                              f'connect once, or load a folder with "local-dir:<path>"') from None
    except EntryNotFoundError:
        raise CheckpointError(f'{where} has no {filename}; publish it with `python -m timm_asge.hub push`') from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise CheckpointError(f'no Hub repo {where} (or it is private or gated); check the name, or log in with '
                              f'`hf auth login`') from None


def create_model_checked(model_name: str, cache_dir: Optional[Union[str, Path]] = None, **kwargs) -> torch.nn.Module:
    """``timm.create_model(model_name, pretrained=True, **kwargs)`` for ASGE checkpoints, checked first.

    Takes timm's names: ``'hf-hub:org/name[@revision]'``, ``'local-dir:/path'`` or a registry name with published
    weights (read from its Hub repo). Only safetensors are read (nothing is unpickled). ``num_classes`` and
    ``in_chans`` may differ from the checkpoint's: timm adapts them as for any model.

    Raises:
        CheckpointError: A missing, corrupt or truncated file, an architecture that is not ASGE, or weights that do
            not fit the network the config describes; the message names the file.
    """
    kwargs.pop('pretrained', None)
    if kwargs.get('features_only'):
        raise ValueError('create_model_checked loads a whole model; call forward_intermediates on it for features')
    if not model_name.startswith(('local-dir:', 'hf-hub:')):  # a registry name: load its Hub repo, config included
        _check_architecture(model_name.split('.', 1)[0], f'the model name {model_name!r}')
        try:
            hf_hub_id = timm.models.get_pretrained_cfg(model_name).hf_hub_id
        except RuntimeError:  # an unknown tag
            hf_hub_id = None
        if not hf_hub_id:
            raise CheckpointError(f'{model_name!r} has no published weights; see timm.list_models("asge*", '
                                  f'pretrained=True), or load a folder with "local-dir:<path>"')
        model_name = f'hf-hub:{hf_hub_id}'
    if model_name.startswith('local-dir:'):
        folder = Path(model_name[len('local-dir:'):]).expanduser()
        model_name = f'local-dir:{folder}'  # timm does not expand ~
        config, weights, card = folder / CONFIG_NAME, folder / WEIGHTS_NAME, folder / CARD_NAME
        recorded = _check_config(config, kwargs).get('weights_sha256')
    else:
        repo_id, _, revision = model_name[len('hf-hub:'):].partition('@')
        config = _download(repo_id, CONFIG_NAME, revision or None, cache_dir)
        recorded = _check_config(config, kwargs).get('weights_sha256')
        weights = _download(repo_id, WEIGHTS_NAME, revision or None, cache_dir)
        try:
            card = _download(repo_id, CARD_NAME, revision or None, cache_dir)
        except CheckpointError:  # a repo without our card has no hashes to check
            card = None
    state_dict = _read_weights(weights)
    digest = functools.cache(file_sha256)  # the weights are checked against config.json and the card: hash once
    if recorded is not None and digest(weights) != recorded:
        raise CheckpointError(f'{weights} is not the file saved with {config} (SHA-256 differs); download or export '
                              f'it again')
    _check_card_hashes(card, {CONFIG_NAME: config, WEIGHTS_NAME: weights}, digest)

    # Build without weights, then load the checked state dict through timm's loader: its num_classes / in_chans
    # adaptation is the one every timm model gets.
    model = timm.create_model(model_name, pretrained=False, cache_dir=cache_dir, **kwargs)
    pretrained_cfg = dict(model.pretrained_cfg, source=None, state_dict=state_dict)
    try:
        load_pretrained(model, pretrained_cfg=pretrained_cfg, num_classes=model.num_classes, in_chans=model.in_chans)
    except RuntimeError as e:  # load_state_dict's size mismatch / missing or unexpected keys
        detail = '; '.join(line.strip() for line in str(e).splitlines()[1:4])
        raise CheckpointError(f'{weights} does not fit the network its config describes ({detail}); export config '
                              f'and weights together again') from None
    return model


# --- model card ------------------------------------------------------------------------------------------------------

def _si(value: Optional[float]) -> str:
    if value is None:
        return '-'
    for factor, prefix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if abs(value) >= factor:
            return f'{value / factor:.2f} {prefix}'
    return f'{value:g}'


def _mib(value: Optional[float]) -> str:
    return '-' if value is None else f'{value / 2 ** 20:.2f} MiB'


def build_card(
        results: Dict[str, Any],
        metadata: Optional[Dict[str, Any]] = None,
        repo_id: Optional[str] = None,
        template: Union[str, Path] = CARDS_DIR / 'template.md',
        sha256: Optional[Dict[str, str]] = None,
) -> str:
    """The model card (``README.md``) of a trained checkpoint: metadata with a ``model-index`` entry per prediction
    strategy, then the template's body.

    Args:
        results: The run's ``results.json``.
        metadata: A ``hub_cards/<name>.yaml``: name, description, license, dataset title and Hub id, paper accuracy.
        repo_id: Hub repo the card's usage snippet loads; defaults to the metadata's, else ``timm-asge/<name>``.
        template: Jinja card template.
        sha256: SHA-256 of the repo's files, recorded in the card and checked by create_model_checked.
    """
    metadata = metadata or {}
    dataset = {**metadata.get('dataset', {}), **{k: v for k, v in results['dataset'].items() if v is not None}}
    dataset_title = dataset.get('title') or dataset['name']
    name = metadata.get('name') or f'{results["model"]}.{dataset["name"]}'
    accuracy = results['test_accuracy']
    strategies = [s for s in PREDICTIONS if s in accuracy]
    card_data = ModelCardData(
        library_name='timm',
        license=metadata.get('license', 'apache-2.0'),
        tags=['image-classification', 'timm', 'forward-forward', 'asge', 'local-learning'],
        datasets=[dataset['hub_id']] if dataset.get('hub_id') else None,
        pipeline_tag='image-classification',
        metrics=['accuracy'],
        model_name=name,
        sha256=sha256,
        eval_results=[EvalResult(
            task_type='image-classification',
            dataset_type=dataset.get('hub_id') or dataset['name'],
            dataset_name=dataset_title,
            dataset_split='test',
            metric_type='accuracy',
            metric_name=f'Top-1 accuracy ({s})',
            metric_value=float(accuracy[s]),
        ) for s in strategies],
    )
    costs = results.get('strategies', {})
    rows = [dict(
        strategy=s,
        accuracy=f'{100 * accuracy[s]:.2f}',
        params=_si(costs.get(s, {}).get('params')),
        flops=_si(costs.get(s, {}).get('flops')),
        memory=_mib(costs.get(s, {}).get('activation_bytes')),
    ) for s in strategies]
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        name=name,
        repo_id=repo_id or metadata.get('repo_id') or f'timm-asge/{name}',
        description=metadata.get('description', ''),
        dataset=dataset,
        dataset_title=dataset_title,
        rows=rows,
        block_accuracy=[f'{100 * a:.2f}' for a in results.get('test_block_accuracy', [])],
        paper_accuracy=metadata.get('paper', {}).get('accuracy'),
        config_file=results.get('config_file') or metadata.get('config_file'),
        recipe_yaml=yaml.safe_dump(results['recipe'], sort_keys=False).strip() if results.get('recipe') else None,
        **{k: results.get(k) for k in (
            'model', 'prediction', 'best_block', 'command', 'commit', 'hardware', 'epochs', 'best_epoch',
            'train_time_s')},
    )
    return str(card).rstrip() + '\n'


# --- export and push -------------------------------------------------------------------------------------------------

def export(
        run_dir: Union[str, Path],
        out_dir: Union[str, Path],
        metadata: Optional[Union[str, Path]] = None,
        name: Optional[str] = None,
        repo_id: Optional[str] = None,
) -> Path:
    """Turn a training run folder into a Hub repo folder: ``config.json``, ``model.safetensors``, ``README.md``.

    The run's ``export/`` model is loaded through :func:`create_model_checked` and saved again with timm's
    ``save_for_hf`` under the name's tag; the card comes from the run's ``results.json`` and the metadata.

    Args:
        run_dir: Output folder of ``recipes/train.py`` (``results.json`` and ``export/``).
        out_dir: Folder to write; replaced atomically, refused if it holds other files than an earlier export.
        metadata: A ``hub_cards/<name>.yaml`` with the card's descriptive fields.
        name: ``<architecture>.<tag>``; defaults to the metadata's, else ``<model>.<dataset>``.
        repo_id: Hub repo the card's usage snippet loads; defaults to the metadata's, else ``timm-asge/<name>``.
    """
    run_dir = Path(run_dir)
    results_file = run_dir / 'results.json'
    try:
        results = json.loads(results_file.read_text(encoding='utf-8'))
    except FileNotFoundError:
        raise ValueError(f'no results.json in {run_dir}: pass the output folder of recipes/train.py') from None
    missing = [k for k in ('model', 'dataset', 'test_accuracy') if k not in results]
    if missing:
        raise ValueError(f'{results_file} lacks {", ".join(missing)}; pass the output folder of recipes/train.py')
    meta = yaml.safe_load(Path(metadata).read_text(encoding='utf-8')) if metadata else {}
    if not isinstance(meta, dict):
        raise ValueError(f'{metadata} must be a YAML mapping (see {CARDS_DIR / "asge_cnn.mnist.yaml"})')
    name = name or meta.get('name') or f'{results["model"]}.{results["dataset"]["name"]}'
    arch, _, tag = name.partition('.')
    model = create_model_checked(f'local-dir:{run_dir / "export"}')
    if arch != model.pretrained_cfg['architecture']:
        raise ValueError(f'the run trained {model.pretrained_cfg["architecture"]!r}, not {arch!r}; pass a matching '
                         f'--name or --metadata')
    model_config = dict(label_names=model.pretrained_cfg.get('label_names'), pretrained_cfg=dict(tag=tag or None))
    with atomic_dir(out_dir, replaceable=REPO_FILES) as tmp:
        _save(model, tmp, model_config)
        hashes = {name: file_sha256(tmp / name) for name in (CONFIG_NAME, WEIGHTS_NAME)}
        card = build_card(results, dict(meta, name=name), repo_id=repo_id, sha256=hashes)
        (tmp / CARD_NAME).write_text(card, encoding='utf-8')
    return Path(out_dir)


def push(
        folder: Union[str, Path],
        repo_id: str,
        dry_run: bool = False,
        token: Optional[str] = None,
        private: bool = False,
        revision: Optional[str] = None,
        create_pr: bool = False,
        commit_message: str = 'Add ASGE model',
) -> List[str]:
    """Upload an exported folder's ``config.json``, ``model.safetensors`` and ``README.md`` to the Hub repo
    ``repo_id`` (created if missing); returns the file names (a dry run only checks).

    The folder is checked first: the weights load, and the card has results and loads ``repo_id``. It is uploaded as
    exported: timm's ``push_to_hf_hub`` would serialise the model again and keep a repo's existing card. ``token``:
    None uses ``HF_TOKEN`` or the ``hf auth login`` one; the rest as in ``HfApi.create_repo`` and ``upload_folder``.
    """
    folder = Path(folder)
    create_model_checked(f'local-dir:{folder}')
    card_file = folder / CARD_NAME
    if not card_file.is_file():
        raise ValueError(f'{folder} has no {CARD_NAME}; write the folder with `python -m timm_asge.hub export`')
    card = ModelCard.load(card_file)
    if not card.data.eval_results or f'hf-hub:{repo_id}' not in card.text:
        raise ValueError(f'{card_file} has no results or was rendered for another repo than {repo_id}; export again '
                         f'with --repo-id {repo_id}')
    if not dry_run:
        api = HfApi(token=token, library_name='timm')
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=list(REPO_FILES), revision=revision,
                          create_pr=create_pr, commit_message=commit_message)
    return list(REPO_FILES)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog='python -m timm_asge.hub', description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('export', help='turn a training run folder into a Hub repo folder')
    p.add_argument('run_dir', help='output folder of recipes/train.py (results.json + export/)')
    p.add_argument('out_dir', help='folder to write: config.json, model.safetensors, README.md')
    p.add_argument('--metadata', help='hub_cards/<arch>.<tag>.yaml with the card\'s descriptive fields')
    p.add_argument('--name', help='<arch>.<tag> (default: the metadata\'s, else <model>.<dataset>)')
    p.add_argument('--repo-id', help='Hub repo the card loads from (default: the metadata\'s, else timm-asge/<name>)')
    p = sub.add_parser('push', help='upload an exported folder to the Hugging Face Hub')
    p.add_argument('folder', help='output of the export command')
    p.add_argument('--repo-id', required=True, help='<user or org>/<name>')
    p.add_argument('--dry-run', action='store_true', help='check and list the files; upload nothing')
    p.add_argument('--private', action='store_true', help='create the repo private')
    p.add_argument('--revision', help='branch to commit to')
    p.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    args = parser.parse_args(argv)
    try:
        if args.command == 'export':
            out = export(args.run_dir, args.out_dir, metadata=args.metadata, name=args.name, repo_id=args.repo_id)
            print(f'wrote {", ".join(REPO_FILES)} to {out}')
        else:
            files = push(args.folder, args.repo_id, dry_run=args.dry_run, private=args.private,
                         revision=args.revision, create_pr=args.create_pr)
            done = 'dry run, nothing uploaded: would upload' if args.dry_run else 'uploaded'
            print(f'{done} {", ".join(files)} to https://huggingface.co/{args.repo_id}')
    except (ValueError, OSError) as e:  # CheckpointError included; OSError: a folder that cannot be written
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
