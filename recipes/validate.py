#!/usr/bin/env python
"""Test a trained ASGE model on a benchmark split: every block and every prediction strategy.

    python recipes/validate.py --model local-dir:outputs/digits/export --config recipes/configs/digits.yaml
    python recipes/validate.py --model outputs/digits --config recipes/configs/digits.yaml --out digits-test.json
    accelerate launch recipes/validate.py --model hf-hub:timm-asge/asge_cnn.mnist --config recipes/configs/mnist.yaml \\
        data.path=/data/mnist

``--model`` takes what ``timm.create_model(..., pretrained=True)`` loads (``hf-hub:org/name[@revision]``,
``local-dir:<folder>``, a registry name with published weights) or a training run's folder (its ``export/``). The
weights are read with safetensors only and checked against the network before any data is decoded. The data comes
from the config's ``data`` section exactly as in training (``key=value`` overrides work the same way): its test split,
or the split ``--split`` names, without augmentation; ``train.eval_batch_size``, ``train.mixed_precision`` and
``train.cpu`` apply too. ``best`` reads the block chosen on the validation split when the model was trained (stored in
its weights); it is never chosen on the split under test, and is reported as not chosen when the model has none.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from accelerate import Accelerator

import timm_asge  # registers the asge_* models
from timm_asge.costs import strategy_costs
from timm_asge.data import SplitNotFoundError
from timm_asge.hub import CheckpointError, create_model_checked
from train import (
    accuracy_on, check_config, check_img_size, describe_hardware, eval_batches, git_commit, load_config, load_split,
    run_command, split_label_names, write_json,
)

SCRIPT = 'recipes/validate.py'


def model_source(model: str) -> str:
    """The timm name of ``--model``: a folder holding ``config.json`` (or a run folder's ``export/``) is a local dir."""
    if model.startswith(('hf-hub:', 'local-dir:')):
        return model
    folder = Path(model).expanduser()
    if folder.is_file():
        raise SystemExit(f'error: {folder} is a file; pass the folder that holds config.json and model.safetensors '
                         f'(a run folder or its export/)')
    if folder.is_dir():
        for candidate in (folder, folder / 'export'):
            if (candidate / 'config.json').is_file():
                return f'local-dir:{candidate}'
        raise SystemExit(f'error: {folder} holds no config.json (nor export/config.json); pass a folder written by '
                         f'recipes/train.py or `python -m timm_asge.hub export`, or an hf-hub:/local-dir: name')
    if model.startswith(('.', '/', '~')) or '/' in model:
        raise SystemExit(f'error: there is no folder {model!r}; if it is a Hub repo, write hf-hub:{model}')
    return model  # a registry name with published weights, e.g. asge_cnn.mnist


def check_input(model, data_cfg: Dict[str, Any], source: str) -> None:
    """Stop, before any data is decoded, when the model cannot read images of the configured shape."""
    if model.in_chans != data_cfg['channels']:
        raise SystemExit(f"error: {source} reads {model.in_chans}-channel images but data.channels="
                         f"{data_cfg['channels']}; set data.channels={model.in_chans} (use the config of the dataset "
                         f"the model was trained on)")
    check_img_size(model, data_cfg['img_size'], source, remedy='raise data.img_size')


def check_classes(model, data_cfg: Dict[str, Any], names: List[str], source: str) -> List[str]:
    """Stop when the dataset has another class count; return notes on differences that only change the result."""
    if model.num_classes != len(names):
        raise SystemExit(f'error: {source} has {model.num_classes} classes but the dataset has {len(names)}; test it '
                         f'on the dataset it was trained on (or set data.label_column)')
    notes = []
    trained_names = model.pretrained_cfg.get('label_names')
    if trained_names and list(trained_names) != list(names):
        notes.append(f'note: the model was trained with class names {list(trained_names)[:4]}..., the dataset has '
                     f'{names[:4]}...: check that this is the dataset it was trained on')
    input_size = model.pretrained_cfg.get('input_size')
    if input_size and input_size[-1] != data_cfg['img_size']:
        notes.append(f"note: the model was trained on {input_size[-1]}x{input_size[-1]} images, tested here at "
                     f"data.img_size={data_cfg['img_size']}")
    return notes


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Test the model on the split and print its figures; returns them (also written to ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', required=True,
                        help='hf-hub:org/name, local-dir:<folder>, a run folder, or a registry name with weights')
    parser.add_argument('--config', required=True, help='YAML config whose data section names the dataset')
    parser.add_argument('--split', help="split to test (default: the config's data.test_split)")
    parser.add_argument('--out', help='also write the results as JSON to this file')
    parser.add_argument('overrides', nargs='*', help='config overrides, e.g. data.path=/data/mnist')
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    check_config(config)
    data_cfg, train_cfg = config['data'], config['train']
    split = args.split or data_cfg['test_split']
    source = model_source(args.model)
    try:
        model = create_model_checked(source).eval()
    except (CheckpointError, ValueError) as err:
        raise SystemExit(f'error: {err}') from err
    if not isinstance(model, timm_asge.AsgeCnn):
        raise SystemExit(f'error: {source} is a {type(model).__name__}, not an ASGE model')

    check_input(model, data_cfg, source)
    if args.out:  # before the evaluation, not after it
        if Path(args.out).is_dir():
            raise SystemExit(f'error: --out {args.out} is a folder; pass a file path such as '
                             f'{Path(args.out) / "results.json"}')
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=Path(args.out).parent).close()
        except OSError as err:
            raise SystemExit(f'error: cannot write --out {args.out} ({err.strerror}); pass a writable path') from err

    accelerator = Accelerator(cpu=train_cfg['cpu'], mixed_precision=train_cfg['mixed_precision'])
    try:
        with accelerator.main_process_first():
            data = load_split(data_cfg, split)
        names = split_label_names(data_cfg, data)
    except SplitNotFoundError as err:
        remedy = 'Pass one of them to --split' if args.split else 'Pass one of them to --split or set data.test_split'
        raise SystemExit(f'error: {err}. {remedy}') from err
    except ValueError as err:
        raise SystemExit(f'error: {err}') from err
    for note in check_classes(model, data_cfg, names, source):
        accelerator.print(note)
    if data_cfg['in_memory']:
        data = data.to(accelerator.device)
    model.to(accelerator.device)

    start = time.perf_counter()
    accuracy = accuracy_on(accelerator, model, eval_batches(accelerator, data_cfg, data, train_cfg['eval_batch_size']))
    seconds = time.perf_counter() - start
    blocks = accuracy[:-1].tolist()
    best = model.best_block
    by_strategy = {'fusion': accuracy[-1].item(), 'last': blocks[-1], 'best': None if best is None else blocks[best]}
    input_size = (data_cfg['channels'], data_cfg['img_size'], data_cfg['img_size'])
    costs = strategy_costs(model, input_size)
    results = {
        'model': args.model,
        'architecture': model.pretrained_cfg.get('architecture'),
        'dataset': {'source': data_cfg['path'] or data_cfg['source'], 'split': split, 'images': len(data),
                    'img_size': data_cfg['img_size'], 'label_names': names},
        'test_accuracy': by_strategy,
        'test_block_accuracy': blocks,
        'best_block': best,
        'strategies': {name: {'test_accuracy': by_strategy[name], **cost} for name, cost in costs.items()},
        'eval_time_s': round(seconds, 2),
        'config_file': args.config,
        'command': run_command(argv, SCRIPT),
        'commit': git_commit(),
        'hardware': describe_hardware(accelerator),
    }
    best_part = 'not chosen (the model stores no best block)' if best is None else \
        f'{100 * blocks[best]:.2f}% (block {best + 1}, chosen on validation)'
    accelerator.print(
        f"{args.model} on {results['dataset']['source']} {split} ({len(data)} images): fusion "
        f"{100 * by_strategy['fusion']:.2f}%, last {100 * by_strategy['last']:.2f}%, best {best_part}\n"
        f"per block: {' '.join(f'{100 * a:.2f}' for a in blocks)}")
    if args.out and accelerator.is_main_process:
        write_json(Path(args.out), results)
        accelerator.print(f'results in {args.out}')
    accelerator.end_training()
    return results


if __name__ == '__main__':
    main()
