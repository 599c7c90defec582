"""Accuracy, epoch time and time to the paper's accuracy of recipe runs, beside the paper and the authors' code.

Reads the ``results.json`` of ``recipes/train.py`` runs (with ``train.test_every_epoch=true`` the history holds a
test accuracy per epoch, so the time to reach the paper's figure can be read off; the reported accuracy is still
that of the best-validation epoch). Times are the recipe's ``step_time_s``: training steps only, synchronised at
epoch ends, without evaluation or checkpoints (``time_s``, the wall clock, is in the JSON beside it). ``s/epoch``
averages the whole run, torch.compile's compilation included; ``steady`` is the median epoch after the first.

A run cut off before it wrote ``results.json`` (a GPU call's time limit) is read from its log instead: the ``run:``
line gives the command, commit and hardware, and every epoch line its accuracy and time; it has no final test.
Logs older than the ``run:`` line take it from ``--log-run``. Pass a run's log only where its results.json is missing.
A record written earlier with ``--out`` adds its runs as they were recorded. ``--plot`` draws every run's validation
curve by epoch beside the authors' point (the same accuracy after the same epochs?) and its test curve by seconds of
training steps beside the target (time to accuracy).

Usage:
    python -m bench.accuracy_report outputs/fashion_mnist/results.json outputs/mnist/results.json
    python -m bench.accuracy_report $OUT/*-results.json $OUT/fashion_mnist-recipe.log \\
        --out bench/results/accuracy-H100.json
    python -m bench.accuracy_report bench/results/accuracy-*.json --plot curves.png
"""
import argparse
import json
import math
import re
import shlex
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from timm_asge.fileio import atomic_path

from bench.cpu_throughput import environment, write_record

if TYPE_CHECKING:  # matplotlib is only needed for --plot, and imported there
    import matplotlib.figure

REPO = Path(__file__).resolve().parents[1]
# Published ASGE test accuracy (%) and the issue's targets on our data copies (CIFAR-10: JPEG copy, 3.3 points less).
PAPER = {'fashion_mnist': 93.41, 'mnist': 99.65, 'cifar10': 90.62, 'cifar100': 65.42}
TARGET = {'fashion_mnist': 93.41, 'mnist': 99.65, 'cifar10': 87.3}
# The authors' public code on one H100 80GB (VGG8, batch 128, fp32, their loaders): seconds per epoch (issue 5).
AUTHORS_EPOCH_S = {'fashion_mnist': (7.1, 8.1), 'cifar10': (8.6, 9.3)}
# ... and their validation accuracy (%) after that many epochs of the 100-epoch schedule: the curve to match.
AUTHORS_VAL_AT = {'fashion_mnist': (8, 89.2)}
# Issue 5's time to accuracy: the target above within this many seconds of training on one H100.
TIME_TO_TARGET_S = {'fashion_mnist': 180}


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
    from timm_asge.recipe import load_config  # the recipe's own defaults + YAML + overrides

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
        # [seconds of training steps so far, test accuracy %] after each epoch: the time-to-accuracy curve.
        test_fusion_by_step_time=[[round(h['step_time_s'], 2), round(100 * h['test_fusion_acc'], 2)]
                                  for h in history if 'test_fusion_acc' in h and h.get('step_time_s') is not None],
    )


def report_rows(path: Path, run_line: Optional[str] = None) -> List[Dict[str, Any]]:
    """The rows of one input: a run's ``results.json`` or log, or every run of a record written with ``--out``."""
    if path.suffix == '.json':
        record = json.loads(path.read_text())
        if 'runs' in record:
            return record['runs']
    return [summarise(path, run_line)]


def run_label(row: Dict[str, Any]) -> str:
    """'NVIDIA H200: batch 512, lr 0.0008, bf16': the machine without 'N x' and versions; done/scheduled epochs."""
    machine = re.sub(r'^\d+ x ', '', row['hardware'].split(', torch')[0])
    precision = 'fp32' if row['mixed_precision'] == 'no' else row['mixed_precision']
    label = f"{machine}: batch {row['batch_size']}, lr {row['lr']:g}, {precision}"
    if row['epochs'] < row['scheduled_epochs']:
        label += f" ({row['epochs']} of {row['scheduled_epochs']} epochs)"
    return label


def plot_curves(rows: List[Dict[str, Any]], path: Path) -> 'matplotlib.figure.Figure':
    """One row of panels per dataset: validation accuracy by epoch, with the authors' point, and test accuracy by
    seconds of training steps, with the target (time to accuracy). Runs of any machine share the epoch axis. Returns
    the (closed) figure."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    # 20, 50, 100 on the log axes rather than 10^1, 10^2 (minor ticks: only the 2s and 5s, or they collide).
    major = FuncFormatter(lambda value, _: f'{value:g}')
    minor = FuncFormatter(lambda value, _: f'{value:g}' if f'{value:g}'[0] in '25' else '')

    datasets = list(dict.fromkeys(r['dataset'] for r in rows))
    fig, axes = plt.subplots(len(datasets), 2, figsize=(13, 4.2 * len(datasets)), squeeze=False)
    for (by_epoch, by_time), name in zip(axes, datasets):
        runs = [r for r in rows if r['dataset'] == name]
        for r in runs:
            curve = by_epoch.plot(range(1, len(r['val_fusion_by_epoch']) + 1), r['val_fusion_by_epoch'],
                                  marker='.', ms=3, label=run_label(r))
            if r.get('test_fusion_by_step_time'):  # absent from records written before it was kept
                seconds, accuracy = zip(*r['test_fusion_by_step_time'])
                by_time.plot(seconds, accuracy, marker='.', ms=3, color=curve[0].get_color(), label=run_label(r))
        if name in AUTHORS_VAL_AT:
            epoch, accuracy = AUTHORS_VAL_AT[name]
            by_epoch.plot([epoch], [accuracy], 'k*', ms=12, label=f"authors' code, H100: {accuracy}% after {epoch}")
        if name in TARGET:
            by_time.axhline(TARGET[name], color='k', ls='--', lw=1, label=f'target {TARGET[name]}%')
        # The first epochs sit far below the rest: start the axis at the lowest accuracy after epoch 2.
        values = [a for r in runs for a in r['val_fusion_by_epoch']]
        later = [a for r in runs for a in r['val_fusion_by_epoch'][2:]] or values
        top = max(values + [TARGET.get(name, 0)])
        # Log scale: the first epochs (where a larger batch trails) get as much room as the rest of the schedule.
        by_epoch.set(xlabel='epoch (log scale)', ylabel='validation accuracy, fusion (%)',
                     title=f'{name}: accuracy by epoch', ylim=(min(later) - 1, min(100, top + 0.5)), xscale='log')
        by_time.set(xlabel='seconds of training steps', ylabel='test accuracy, fusion (%)',
                    title=f'{name}: time to accuracy', ylim=by_epoch.get_ylim())
        if any(r.get('test_fusion_by_step_time') for r in runs):
            by_time.set_xscale('log')  # a GPU run's seconds beside a CPU run's hours
            by_time.set_xlabel('seconds of training steps (log scale)')
            if name in TIME_TO_TARGET_S:
                by_time.axvline(TIME_TO_TARGET_S[name], color='k', ls=':', lw=1,
                                label=f'{TIME_TO_TARGET_S[name]} s (on an H100)')
        else:
            by_time.text(0.5, 0.5, 'no test accuracy per epoch\n(train.test_every_epoch=true records it)',
                         ha='center', va='center', transform=by_time.transAxes)
        for ax in (by_epoch, by_time):
            if ax.get_xscale() == 'log':
                ax.xaxis.set_major_formatter(major)
                ax.xaxis.set_minor_formatter(minor)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7, loc='lower right')
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=110)
    plt.close(fig)
    return fig


def _fmt(value: Optional[float], spec: str) -> str:
    return '-'.rjust(int(re.match(r'\d*', spec)[0] or 0)) if value is None else format(value, spec)


def target_status(row: Dict[str, Any]) -> str:
    """'met' / 'NOT met' for a finished run, 'cut off' for a log without a final test, 'stopped' for a run tested
    before the end of its schedule (``train.stop_after_epochs``) that missed the target, '-' without a target."""
    if not row['target']:
        return '-'
    if row['test_accuracy'] is None:
        return 'cut off'
    if row['target_met']:
        return 'met'
    return 'stopped' if row['epochs'] < row['scheduled_epochs'] else 'NOT met'


def main() -> None:
    """Print the report table and, with ``--out``, write it as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('results', nargs='+', type=Path,
                        help='results.json files or logs (*.log) of recipe runs, or records written with --out')
    parser.add_argument('--log-run', default=None,
                        help="'COMMAND | commit HASH | HARDWARE' for logs written before the recipe printed it")
    parser.add_argument('--out', type=Path, default=None, help='JSON to write (default: print only)')
    parser.add_argument('--note', default=None, help='a remark kept in the JSON (when and how the runs were made)')
    parser.add_argument('--plot', type=Path, default=None,
                        help='PNG to draw: validation accuracy by epoch and test accuracy by time, per dataset')
    args = parser.parse_intermixed_args()  # inputs may follow --log-run and the other options
    without_run_line = [str(p) for p in args.results if p.suffix == '.log' and not has_run_line(p)]
    if args.log_run and len(without_run_line) > 1:
        parser.error(f"--log-run names one run, but {', '.join(without_run_line)} all lack a 'run:' line: "
                     f'report them one at a time')
    rows = [row for path in args.results for row in report_rows(path, args.log_run)]

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
    if args.plot:
        plot_curves(rows, args.plot)
        print(f'wrote {args.plot}')


if __name__ == '__main__':
    main()
