"""Accuracy, epoch time and time to the paper's accuracy of recipe runs, beside the paper and the authors' code.

Reads the ``results.json`` of ``recipes/train.py`` runs (with ``train.test_every_epoch=true`` the history holds a
test accuracy per epoch, so the time to reach the paper's figure can be read off; the reported accuracy is still
that of the best-validation epoch). Times are the recipe's ``step_time_s``: training steps only, synchronised at
epoch ends, without evaluation or checkpoints (``time_s``, the wall clock, is in the JSON beside it). ``s/epoch``
averages the whole run, torch.compile's compilation included; ``steady`` is the median epoch after the first.

Usage:
    python bench/accuracy_report.py outputs/fashion_mnist/results.json outputs/mnist/results.json
    python bench/accuracy_report.py $OUT/*-results.json --out bench/results/accuracy-H100.json
"""
import argparse
import json
import statistics
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


def summarise(path: Path) -> Dict[str, Any]:
    results = json.loads(path.read_text())
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
    return dict(
        file=str(path), dataset=name, model=results['model'], hardware=results['hardware'], commit=results['commit'],
        command=results['command'], epochs=epochs, scheduled_epochs=train_cfg.get('epochs', epochs),
        batch_size=train_cfg['batch_size'], lr=train_cfg['lr'],
        mixed_precision=train_cfg['mixed_precision'], compile=train_cfg.get('compile', False),
        channels_last=train_cfg['channels_last'], mode=train_cfg['mode'],
        test_accuracy={k: 100 * v for k, v in results['test_accuracy'].items()},
        best_epoch=results['best_epoch'], paper=PAPER.get(name), target=target,
        target_met=target is not None and 100 * results['test_accuracy']['fusion'] >= target,
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
    return '-' if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('results', nargs='+', type=Path, help='results.json files of recipe runs')
    parser.add_argument('--out', type=Path, default=None, help='JSON to write (default: print only)')
    args = parser.parse_args()
    rows = [summarise(path) for path in args.results]

    header = (f"{'dataset':<14} {'epochs':>6} {'batch':>5} {'prec':>5} {'fusion %':>8} {'last %':>7} {'best %':>7} "
              f"{'paper %':>7} {'target':>7} {'s/epoch':>8} {'steady':>7} {'authors s/ep':>12} {'img/s':>9} "
              f"{'to target':>16}")
    print(header + '\n' + '-' * len(header))
    for r in rows:
        acc = r['test_accuracy']
        authors = '-' if not r['authors_epoch_s'] else '{}-{}'.format(*r['authors_epoch_s'])
        reached = r['time_to_target']
        to_target = '-' if not reached else f"ep {reached['epoch']}, {reached['step_time_s']:.0f} s"
        # A run stopped early (train.stop_after_epochs, or still going) shows done/scheduled epochs.
        epochs = str(r['epochs']) if r['epochs'] >= r['scheduled_epochs'] else f"{r['epochs']}/{r['scheduled_epochs']}"
        print(f"{r['dataset']:<14} {epochs:>6} {r['batch_size']:>5} {r['mixed_precision']:>5} "
              f"{acc['fusion']:>8.2f} {acc['last']:>7.2f} {acc['best']:>7.2f} {_fmt(r['paper'], '.2f'):>7} "
              f"{('met' if r['target_met'] else 'NOT met') if r['target'] else '-':>7} {_fmt(r['epoch_s'], '.2f'):>8} "
              f"{_fmt(r['steady_epoch_s'], '.2f'):>7} {authors:>12} {_fmt(r['images_per_s'], ',.0f'):>9} "
              f"{to_target:>16}")
    for r in rows:
        print(f"\n{r['dataset']}: {r['hardware']}, commit {r['commit']}\n  {r['command']}\n"
              f"  validation (fusion) by epoch: {r['val_fusion_by_epoch']}")
        if r['authors_val_at']:
            at = r['authors_val_at']
            print(f"  validation after epoch {at['epoch']}: ours {_fmt(at['ours'], '.2f')}%, the authors' code "
                  f"{at['authors']}%")
    if args.out:
        # The report's own machine, commit and command; each run's hardware and commit are in its row.
        write_record(args.out, dict(environment=environment('cpu'), runs=rows))


if __name__ == '__main__':
    main()
