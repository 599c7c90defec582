#!/usr/bin/env python
"""Test a trained ASGE model on a benchmark split: every block and every prediction strategy.

    python recipes/validate.py --model local-dir:outputs/digits/export --config recipes/configs/digits.yaml
    python recipes/validate.py --model outputs/digits --config recipes/configs/digits.yaml --out digits-test.json
    accelerate launch -q --config_file recipes/accelerate.yaml recipes/validate.py --model hf-hub:<org>/<name> \\
        --config recipes/configs/mnist.yaml data.path=/data/mnist

``--model`` takes a timm name (``hf-hub:org/name[@revision]``, ``local-dir:<folder>``, a registry name with published
weights) or a training run's folder; the weights are checked before any data is decoded. The data comes from the
config's ``data`` section as in training, without augmentation: its test split, or ``--split``. ``best`` reads the
block chosen on validation when the model was trained; it is never chosen on the split under test.
"""
import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from accelerate import Accelerator

from timm_asge.costs import strategy_costs
from timm_asge.data import SplitNotFoundError
from timm_asge.hub import create_model_checked
from timm_asge.models import AsgeCnn
from timm_asge.recipe import (
    RecipeError, accuracy_on, check_img_size, describe_hardware, eval_batches, git_commit, load_config, load_split,
    resolve_auto, run_command, split_label_names, write_json,
)


def model_source(model: str) -> str:
    """The timm name of ``--model``: a folder holding ``config.json`` (or a run folder's ``export/``) is a local dir."""
    folder = Path(model).expanduser()
    if model.startswith(('hf-hub:', 'local-dir:')) or not (folder.exists() or '/' in model):
        return model  # a timm name, or a registry name with published weights (asge_cnn.mnist)
    for candidate in (folder, folder / 'export'):
        if (candidate / 'config.json').is_file():
            return f'local-dir:{candidate}'
    raise RecipeError(f'{model} is no folder holding config.json (nor export/config.json); pass a folder written by '
                      f'recipes/train.py, or hf-hub:{model} for a Hub repo')


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
    data_cfg, train_cfg = config['data'], config['train']
    split = args.split or data_cfg['test_split']
    source = model_source(args.model)
    try:
        model = create_model_checked(source).eval()
    except ValueError as err:  # the Hub module's errors: missing, corrupt or foreign weights
        raise RecipeError(str(err)) from None
    if not isinstance(model, AsgeCnn):
        raise RecipeError(f'{source} is a {type(model).__name__}, not an ASGE model')
    if model.in_chans != data_cfg['channels']:  # checked before any data is decoded
        raise RecipeError(f"{source} reads {model.in_chans}-channel images but data.channels={data_cfg['channels']}; "
                          f'set data.channels={model.in_chans}')
    check_img_size(model, data_cfg['img_size'], source)
    if args.out and Path(args.out).is_dir():
        raise RecipeError(f'--out {args.out} is a folder; pass a file path such as {Path(args.out) / "results.json"}')

    precision = resolve_auto(train_cfg, cuda=not train_cfg['cpu'] and torch.cuda.is_available())['mixed_precision']
    accelerator = Accelerator(cpu=train_cfg['cpu'], mixed_precision=precision)
    try:
        with accelerator.main_process_first():
            data = load_split(data_cfg, split)
        names = split_label_names(data_cfg, data)
    except SplitNotFoundError as err:
        raise RecipeError(f'{err}. Pass one of them to --split') from None
    except ValueError as err:
        raise RecipeError(str(err)) from None
    if model.num_classes != len(names):
        raise RecipeError(f'{source} has {model.num_classes} classes but the dataset has {len(names)}; test it on the '
                          f'dataset it was trained on (or set data.label_column)')
    trained_names = model.pretrained_cfg.get('label_names')
    if trained_names and list(trained_names) != list(names):
        accelerator.print(f'note: the model was trained with class names {list(trained_names)[:4]}..., the dataset '
                          f'has {names[:4]}...: check that this is the dataset it was trained on')
    if data_cfg['in_memory']:
        data = data.to(accelerator.device)
    model.to(accelerator.device)

    start = time.perf_counter()
    accuracy = accuracy_on(accelerator, model, eval_batches(accelerator, data_cfg, data, train_cfg['eval_batch_size']))
    seconds = time.perf_counter() - start
    blocks = accuracy[:-1].tolist()
    best = model.best_block  # chosen on validation when the model was trained; never on the split under test
    by_strategy = {'fusion': accuracy[-1].item(), 'last': blocks[-1], 'best': None if best is None else blocks[best]}
    costs = strategy_costs(model, (data_cfg['channels'], data_cfg['img_size'], data_cfg['img_size']))
    results = {
        'model': args.model,
        'architecture': model.pretrained_cfg.get('architecture'),
        'dataset': {'source': data_cfg['path'] or data_cfg['source'], 'split': split, 'images': len(data),
                    'img_size': data_cfg['img_size'], 'label_names': names},
        'test_accuracy': by_strategy,
        'test_block_accuracy': blocks,
        'best_block': None if best is None else best + 1,  # numbered from 1, as in training's results.json
        'strategies': {name: {'test_accuracy': by_strategy[name], **cost} for name, cost in costs.items()},
        'eval_time_s': round(seconds, 2),
        'config_file': args.config,
        'command': run_command(argv, 'recipes/validate.py'),
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
    try:
        main()
    except RecipeError as err:
        sys.exit(f'error: {err}')
