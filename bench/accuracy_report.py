"""Accuracy, epoch time and time to the paper's accuracy of recipe runs, beside the paper and the authors' code.

Reads the ``results.json`` of ``recipes/train.py`` runs (with ``train.test_every_epoch=true`` the history holds a
test accuracy per epoch, so the time to reach the paper's figure can be read off; the reported accuracy is still
that of the best-validation epoch). Times are the recipe's ``step_time_s``: training steps only, synchronised at
epoch ends, without evaluation or checkpoints (``time_s``, the wall clock, is in the JSON beside it). ``s/epoch``
averages the whole run, torch.compile's compilation included; ``steady`` is the median epoch after the first.

A run cut off before it wrote ``results.json`` (a GPU call's time limit) is read from its log instead: the ``run:``
line gives the command, commit and hardware, and every epoch line its accuracy and time; it has no final test.
Logs older than the ``run:`` line take it from ``--log-run``. Pass a run's log only where its results.json is missing.

Usage:
    python bench/accuracy_report.py outputs/fashion_mnist/results.json outputs/mnist/results.json
    python bench/accuracy_report.py $OUT/*-results.json $OUT/fashion_mnist-recipe.log \\
        --out bench/results/accuracy-H100.json
"""
import argparse
import json
import math
import re
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from cpu_throughput import environment, write_record  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
# Published ASGE test accuracy (%) and the issue's targets on our data copies (CIFAR-10: JPEG copy, 3.3 points less).
PAPER = {'fashion_mnist': 93.41, 'mnist': 99.65, 'cifar10': 90.62, 'cifar100': 65.42}
TARGET = {'fashion_mnist': 93.41, 'mnist': 99.65, 'cifar10': 87.3}
# The authors' public code on one H100 80GB (VGG8, batch 128, fp32, their loaders): seconds per epoch (issue 5).
AUTHORS_EPOCH_S = {'fashion_mnist': (7.1, 8.1), 'cifar10': (8.6, 9.3)}
# ... and their validation accuracy (%) after that many epochs of the 100-epoch schedule: the curve to match.
AUTHORS_VAL_AT = {'fashion_mnist': (8, 89.2)}


def first_epoch_at(history: List[Dict[str, Any]], target: float) -> Optional[Dict[str, Any]]:
    """The first epoch whose test accuracy (fusion) reaches ``target`` percent, if the history has test accuracy."""
    for record in history:
        if record.get('test_fusion_acc') is not None and 100 * record['test_fusion_acc'] >= target - 1e-9:
            return record
    return None


def steady_epoch_s(history: List[Dict[str, Any]]) -> Optional[float]:
    """Median training-step time of the epochs after the first (which also pays for torch.compile and warm-up)."""
    times = [b['step_time_s'] - a['step_time_s'] for a, b in zip(history, history[1:])]
    return statistics.median(times) if times else None


RUN_LINE = re.compile(r'run: (?P<command>.+) \| commit (?P<commit>\S+) \| (?P<hardware>.+)')
TRAINING_LINE = re.compile(r'training (?P<model>\S+) \(.*\) on (?P<images>\d+) images .* (?P<processes>\d+) process')
EPOCH_LINE = re.compile(
    r'epoch (?P<epoch>\d+): val acc per block .* \| fusion (?P<val>[\d.]+)% \| train fusion [\d.]+%'
    r'(?: \| test fusion (?P<test>[\d.]+)%)? \| so far (?P<step>[\d.]+) s in training steps, (?P<all>[\d.]+) s in all')


def has_run_line(path: Path) -> bool:
    return path.suffix == '.log' and RUN_LINE.search(path.read_text(errors='replace')) is not None


def results_from_log(path: Path, run_line: Optional[str] = None) -> Dict[str, Any]:
    """What ``summarise`` needs, read off a training log (no final test: ``test_accuracy`` is None).

    The recipe settings come from the logged command through the recipe's own loader, so from the config file as it
    is in this checkout, not at the logged commit.
    """
    text = path.read_text(errors='replace')
    run = RUN_LINE.search(text) or (RUN_LINE.fullmatch(f'run: {run_line}') if run_line else None)
    training = TRAINING_LINE.search(text)
    if run is None or training is None:
        raise SystemExit(f"error: {path} has no 'run:' line (logs before it: pass --log-run \"COMMAND | commit HASH "
                         f"| HARDWARE\") or no 'training ...' line; is it a recipes/train.py log?")
    if str(REPO / 'recipes') not in sys.path:
        sys.path.insert(0, str(REPO / 'recipes'))
    from train import load_config  # the recipe's own defaults + YAML + overrides

    words = shlex.split(run['command'])
    script = next((i for i, word in enumerate(words) if word.endswith('train.py')), None)
    if script is None:
        raise SystemExit(f"error: the run line of {path} names no recipes/train.py command: {run['command']!r}")
    argv = words[script + 1:]
    config_file = None
    for i, word in enumerate(argv):
        if word == '--config' and i + 1 < len(argv):
            config_file = argv[i + 1]
        elif word.startswith('--config='):
            config_file = word.split('=', 1)[1]
    config = load_config(config_file and str(REPO / config_file), [a for a in argv if '=' in a and a[0] != '-'])
    history = []
    for m in EPOCH_LINE.finditer(text):
        history.append(dict(epoch=int(m['epoch']) - 1, val_fusion_acc=float(m['val']) / 100,
                            step_time_s=float(m['step']), time_s=float(m['all'])))
        if m['test'] is not None:
            history[-1]['test_fusion_acc'] = float(m['test']) / 100
    if not history:
        raise SystemExit(f'error: {path} has no finished epoch')
    # Times run on across a resume (the log holds only the resumed part then): count epochs the same way.
    epochs = max(h['epoch'] for h in history) + 1
    # As in results.json: whole batches per process, the last one padded.
    batch, processes = config['train']['batch_size'], int(training['processes'])
    steps_per_epoch = math.ceil(int(training['images']) / (batch * processes))
    return {
        'model': training['model'], 'dataset': {'name': config['name']}, 'recipe': config, 'command': run['command'],
        'commit': None if run['commit'] == 'None' else run['commit'], 'hardware': run['hardware'],
        'epochs': epochs, 'steps': steps_per_epoch * epochs, 'num_processes': processes,
        'step_time_s': history[-1]['step_time_s'], 'train_time_s': history[-1]['time_s'], 'best_epoch': None,
        'test_accuracy': None, 'history': history,
    }


def summarise(path: Path, run_line: Optional[str] = None) -> Dict[str, Any]:
    """One report row from a run's ``results.json`` or, for a run cut off before it, its log."""
    results = results_from_log(path, run_line) if path.suffix == '.log' else json.loads(path.read_text())
    name = results['dataset']['name']
    # A run stopped mid-epoch and resumed records that epoch twice: keep the last record of each epoch.
    history = list({record['epoch']: record for record in results.get('history', [])}.values())
    train_cfg = results['recipe']['train']
    epochs = results['epochs']
    val_by_epoch = {record['epoch'] + 1: 100 * record['val_fusion_acc'] for record in history}
    authors_at = AUTHORS_VAL_AT.get(name)
    step_time = results.get('step_time_s')
    target = TARGET.get(name)
    reached = first_epoch_at(history, target) if target else None
    # Every step trains batch_size images per process (the epoch's last shard is padded to a full batch).
    images = results['steps'] * train_cfg['batch_size'] * results.get('num_processes', 1)
    test_accuracy = results['test_accuracy'] and {k: 100 * v for k, v in results['test_accuracy'].items()}
    return dict(
        file=str(path), dataset=name, model=results['model'], hardware=results['hardware'], commit=results['commit'],
        command=results['command'], epochs=epochs, scheduled_epochs=train_cfg.get('epochs', epochs),
        batch_size=train_cfg['batch_size'], lr=train_cfg['lr'],
        mixed_precision=train_cfg['mixed_precision'], compile=train_cfg.get('compile', False),
        channels_last=train_cfg['channels_last'], mode=train_cfg['mode'],
        test_accuracy=test_accuracy, best_epoch=results['best_epoch'], paper=PAPER.get(name), target=target,
        target_met=bool(target and test_accuracy and test_accuracy['fusion'] >= target),
        step_time_s=step_time, wall_time_s=results['train_time_s'],
        epoch_s=step_time / epochs if step_time else None, steady_epoch_s=steady_epoch_s(history),
        images_per_s=images / step_time if step_time else None,
        authors_epoch_s=AUTHORS_EPOCH_S.get(name),
        authors_val_at=None if authors_at is None else dict(
            epoch=authors_at[0], authors=authors_at[1], ours=val_by_epoch.get(authors_at[0])),
        time_to_target=None if reached is None else dict(
            epoch=reached['epoch'] + 1, step_time_s=reached.get('step_time_s'), wall_time_s=reached['time_s']),
        val_fusion_by_epoch=[round(100 * h['val_fusion_acc'], 2) for h in history],
        test_fusion_by_epoch=[round(100 * h['test_fusion_acc'], 2) for h in history if 'test_fusion_acc' in h],
    )


def _fmt(value: Optional[float], spec: str) -> str:
    return '-'.rjust(int(re.match(r'\d*', spec)[0] or 0)) if value is None else format(value, spec)


def target_status(row: Dict[str, Any]) -> str:
    """'met' / 'NOT met' for a finished run, 'cut off' for a log without a final test, '-' without a target."""
    if not row['target']:
        return '-'
    if row['test_accuracy'] is None:
        return 'cut off'
    return 'met' if row['target_met'] else 'NOT met'


def main() -> None:
    """Print the report table and, with ``--out``, write it as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('results', nargs='+', type=Path, help='results.json files or logs (*.log) of recipe runs')
    parser.add_argument('--log-run', default=None,
                        help="'COMMAND | commit HASH | HARDWARE' for logs written before the recipe printed it")
    parser.add_argument('--out', type=Path, default=None, help='JSON to write (default: print only)')
    parser.add_argument('--note', default=None, help='a remark kept in the JSON (when and how the runs were made)')
    args = parser.parse_args()
    without_run_line = [str(p) for p in args.results if p.suffix == '.log' and not has_run_line(p)]
    if args.log_run and len(without_run_line) > 1:
        parser.error(f"--log-run names one run, but {', '.join(without_run_line)} all lack a 'run:' line: "
                     f'report them one at a time')
    rows = [summarise(path, args.log_run) for path in args.results]

    header = (f"{'dataset':<14} {'epochs':>6} {'batch':>5} {'prec':>5} {'fusion %':>8} {'last %':>7} {'best %':>7} "
              f"{'paper %':>7} {'target':>7} {'s/epoch':>8} {'steady':>7} {'authors s/ep':>12} {'img/s':>9} "
              f"{'to target':>16}")
    print(header + '\n' + '-' * len(header))
    for r in rows:
        acc = r['test_accuracy'] or dict.fromkeys(('fusion', 'last', 'best'))  # a cut-off log has no final test
        authors = '-' if not r['authors_epoch_s'] else '{}-{}'.format(*r['authors_epoch_s'])
        reached = r['time_to_target']
        to_target = '-' if not reached else f"ep {reached['epoch']}, {reached['step_time_s']:.0f} s"
        # A run stopped early (train.stop_after_epochs, or still going) shows done/scheduled epochs.
        epochs = str(r['epochs']) if r['epochs'] >= r['scheduled_epochs'] else f"{r['epochs']}/{r['scheduled_epochs']}"
        print(f"{r['dataset']:<14} {epochs:>6} {r['batch_size']:>5} {r['mixed_precision']:>5} "
              f"{_fmt(acc['fusion'], '8.2f')} {_fmt(acc['last'], '7.2f')} {_fmt(acc['best'], '7.2f')} "
              f"{_fmt(r['paper'], '7.2f')} {target_status(r):>7} {_fmt(r['epoch_s'], '8.2f')} "
              f"{_fmt(r['steady_epoch_s'], '.2f'):>7} {authors:>12} {_fmt(r['images_per_s'], ',.0f'):>9} "
              f"{to_target:>16}")
    for r in rows:
        print(f"\n{r['dataset']}: {r['hardware']}, commit {r['commit']}\n  {r['command']}\n"
              f"  validation (fusion) by epoch: {r['val_fusion_by_epoch']}")
        if r['test_fusion_by_epoch']:
            print(f"  test (fusion) by epoch: {r['test_fusion_by_epoch']}")
        if r['authors_val_at']:
            at = r['authors_val_at']
            print(f"  validation after epoch {at['epoch']}: ours {_fmt(at['ours'], '.2f')}%, the authors' code "
                  f"{at['authors']}%")
    if args.out:
        # The report's own machine, commit and command; each run's hardware and commit are in its row.
        record = dict(environment=environment('cpu'), runs=rows)
        if args.note:
            record['note'] = args.note
        write_record(args.out, record)


if __name__ == '__main__':
    main()
