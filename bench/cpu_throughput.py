"""Training throughput and peak step memory of ASGE local learning (fused, lean) vs a backprop baseline.

One training step = forward + backward + AdamW step on a synthetic batch (random images and labels, fixed seed).
Variants, all on the same network and optimizer (AdamW over ``timm_asge.param_groups``):
    * ``fused``: ``LocalLearner(model, 'fused')``, one backward over the summed local losses;
    * ``lean``: ``LocalLearner(model, 'lean')``, every block's backward inside forward;
    * ``backprop``: end-to-end cross-entropy through ``model(x)`` with the default ``fusion`` strategy.

Every (model, variant) runs in two fresh subprocesses, one timed (median step time of the timed steps, after the
warm-up) and one for memory, so variants cannot share allocator caches. Peak step memory:
    * CPU: glibc's mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) so every large tensor is its own mapping,
      returned to the OS when freed, and the resident set tracks live tensor memory. After the warm-up steps (weights,
      AdamW state and the batch are resident) the script records VmRSS, resets the kernel's peak-RSS mark
      (``/proc/self/clear_refs``), runs one step and reads VmHWM: peak = VmHWM - VmRSS before. If the mark
      cannot be reset, it falls back to ``ru_maxrss`` minus the RSS before the first step (then AdamW state, 16 bytes
      per parameter, is included; the output says which method ran).
    * CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus ``memory_allocated()``
      before the step (timed steps synchronise after every step).
    Either way the figure covers activations, gradients (``zero_grad`` sets them to None) and temporaries, not the
    weights or optimizer state. The saved-tensor count of a one-image step (``timm_asge.costs``) is printed next to it.

Usage:
    python -m bench.cpu_throughput                      # both models, all variants, defaults below
    python -m bench.cpu_throughput --models asge_cnn_tiny --batch-sizes 256 --steps 10
"""
import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
import timm

import timm_asge  # noqa: F401 (registers the asge_* models)
from timm_asge import LocalLearner, param_groups
from timm_asge.costs import training_activation_bytes
from timm_asge.fileio import atomic_path

REPO = Path(__file__).resolve().parents[1]
INPUT_SIZES = {'asge_cnn_tiny': (1, 16, 16), 'asge_cnn': (3, 32, 32)}
DEFAULT_BATCH = {'asge_cnn_tiny': 128, 'asge_cnn': 64}
VARIANTS = ('fused', 'lean', 'backprop')
# Pinning the threshold turns off glibc's dynamic threshold, which would otherwise keep freed tensors in the heap
# (resident but unused) and hide them from the RSS-based peak.
MALLOC_ENV = {'MALLOC_MMAP_THRESHOLD_': '65536', 'MALLOC_TRIM_THRESHOLD_': '65536'}


def _rss_kib(field: str) -> Optional[int]:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def make_step(model: torch.nn.Module, variant: str, optimizer: torch.optim.Optimizer):
    """Return ``step(images, labels)`` running one training step of ``variant``."""
    learner = LocalLearner(model, variant) if variant != 'backprop' else None

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        if variant == 'backprop':
            F.cross_entropy(model(images), labels).backward()
        elif variant == 'fused':
            learner(images, labels)['loss'].backward()
        else:
            learner(images, labels)  # lean: the backward passes run inside forward
        optimizer.step()

    return step


def run_worker(model_name: str, variant: str, batch_size: int, warmup: int, steps: int, device: str,
               measure: str) -> Dict[str, Any]:
    """Measure one (model, variant) in this process: ``measure='time'`` (throughput) or ``'memory'`` (peak step)."""
    torch.manual_seed(0)
    dev = torch.device(device)
    input_size = INPUT_SIZES[model_name]
    model = timm.create_model(model_name).to(dev).train()
    optimizer = torch.optim.AdamW(param_groups(model, lr=2e-4, weight_decay=1e-3))
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(batch_size, *input_size, generator=generator).to(dev)
    labels = torch.randint(0, model.num_classes, (batch_size,), generator=generator).to(dev)
    step = make_step(model, variant, optimizer)
    cuda = dev.type == 'cuda'

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    rss_before_first = _rss_kib('VmRSS')
    for _ in range(warmup):
        step(images, labels)
    sync()
    result = dict(model=model_name, variant=variant, batch_size=batch_size)
    if measure == 'time':
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step(images, labels)
            sync()
            times.append(time.perf_counter() - start)
        return dict(result, step_times_s=times)

    # The last step's gradients go before the baseline is read, so the step's own gradients count in its peak.
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        method = 'torch.cuda.max_memory_allocated - memory_allocated before the step'
    else:
        before_kib = _rss_kib('VmRSS')
        reset = _reset_peak_rss() and _rss_kib('VmHWM') is not None
        method = ('VmHWM - VmRSS before the step (peak reset via /proc/self/clear_refs, glibc mmap threshold pinned)'
                  if reset else 'ru_maxrss - VmRSS before the first step (includes AdamW state)')
    step(images, labels)
    sync()
    if cuda:
        peak_bytes = torch.cuda.max_memory_allocated(dev) - before
    elif reset:
        peak_bytes = (_rss_kib('VmHWM') - before_kib) * 1024
    else:
        peak_bytes = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - (rss_before_first or 0)) * 1024
    return dict(
        result,
        peak_step_mib=peak_bytes / 2 ** 20,
        saved_activation_mib=training_activation_bytes(model, input_size, variant) * batch_size / 2 ** 20,
        memory_method=method,
    )


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        return subprocess.run(['git', *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def commit() -> str:
    """HEAD's hash; where the checkout came without .git (the GPU machine), ``$TIMM_ASGE_COMMIT``."""
    head = _git('rev-parse', 'HEAD')
    return os.environ.get('TIMM_ASGE_COMMIT', head) if head == 'unknown' else head


def dirty() -> Optional[bool]:
    """Whether the tree has uncommitted changes (None where git cannot tell)."""
    status = _git('status', '--porcelain', '--', '.', ':!bench/results')  # results written by this session's runs
    return None if status == 'unknown' else bool(status)


def write_record(out: Path, record: Dict[str, Any]) -> None:
    """Write a benchmark's JSON record (creating bench/results/ if needed) and say where."""
    with atomic_path(out) as tmp:  # (creates the folder) an interrupted write leaves the earlier record whole
        tmp.write_text(json.dumps(record, indent=2) + '\n')
    print(f'wrote {out}')


def environment(device: str) -> Dict[str, Any]:
    """Machine, versions, commit and command of this run, for the JSON record."""
    env = dict(
        hostname=platform.node(),
        cpu=_cpu_model(),
        cpu_cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
        timm=timm.__version__,
        timm_asge=timm_asge.__version__,
        commit=commit(),
        dirty=dirty(),
        command=' '.join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv),
        date=datetime.now(timezone.utc).isoformat(timespec='seconds'),
        device=device,
    )
    if device.startswith('cuda'):
        env['gpu'] = torch.cuda.get_device_name(torch.device(device))
    return env


def _format_table(rows) -> str:
    header = (f"{'model':<14} {'variant':<9} {'batch':>5} {'img/s':>9} {'step ms (median)':>16} {'peak step MiB':>14} "
              f"{'saved act. MiB':>18}")
    lines = [header, '-' * len(header)]
    for r in rows:
        lines.append(
            f"{r['model']:<14} {r['variant']:<9} {r['batch_size']:>5} {r['images_per_s']:>9.1f} "
            f"{1000 * r['step_s_median']:>16.1f} {r['peak_step_mib']:>14.1f} {r['saved_activation_mib']:>18.1f}")
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description='ASGE training throughput and peak step memory (fused/lean/backprop)')
    parser.add_argument('--models', nargs='+', default=list(INPUT_SIZES), choices=list(INPUT_SIZES))
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument('--batch-sizes', nargs='+', type=int, default=None,
                        help='one per model (default: 128 for asge_cnn_tiny, 64 for asge_cnn)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps first (allocate AdamW state, kernels)')
    parser.add_argument('--steps', type=int, default=5, help='timed steps; the median step time is reported')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', default=None, help='JSON path (default bench/results/cpu_throughput-<host>.json)')
    parser.add_argument('--worker', nargs=4, metavar=('MODEL', 'VARIANT', 'BATCH', 'MEASURE'), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        model_name, variant, batch, measure = args.worker
        print(json.dumps(run_worker(model_name, variant, int(batch), args.warmup, args.steps, args.device, measure)))
        return

    batch_sizes = args.batch_sizes or [DEFAULT_BATCH[m] for m in args.models]
    if len(batch_sizes) != len(args.models):
        parser.error(f'--batch-sizes needs one value per model ({len(args.models)})')
    rows = []
    for model_name, batch in zip(args.models, batch_sizes):
        for variant in args.variants:
            row = dict(model=model_name, variant=variant, input_size=list(INPUT_SIZES[model_name]), batch_size=batch,
                       warmup_steps=args.warmup, timed_steps=args.steps)
            for measure in ('time', 'memory'):
                cmd = [sys.executable, __file__, '--worker', model_name, variant, str(batch), measure,
                       '--warmup', str(args.warmup), '--steps', str(args.steps), '--device', args.device]
                # Only the memory run pins glibc's mmap threshold: the extra page faults would slow the timed run.
                env = {**os.environ, **MALLOC_ENV} if measure == 'memory' else None
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f'{model_name}/{variant} ({measure}) failed:\n{done.stderr}')
                row.update(json.loads(done.stdout.strip().splitlines()[-1]))
            row['step_s_median'] = statistics.median(row['step_times_s'])
            row['images_per_s'] = batch / row['step_s_median']
            rows.append(row)
            print(f"  {model_name} {variant}: {row['images_per_s']:.1f} img/s, {row['peak_step_mib']:.1f} MiB",
                  file=sys.stderr)

    env = environment(args.device)
    print(f"{env['cpu']} ({env['cpu_cores']} cores, {env['torch_threads']} torch threads), device {args.device}, "
          f"torch {env['torch']}, timm {env['timm']}")
    print(_format_table(rows))
    print(f"peak step memory: {rows[0]['memory_method']}; activations + gradients + temporaries, not weights or "
          f"optimizer state. backprop = end-to-end cross-entropy through the 'fusion' read-out.")
    host = env['hostname'] or platform.machine()
    out = Path(args.out) if args.out else REPO / 'bench' / 'results' / f'cpu_throughput-{host}.json'
    write_record(out, {'environment': env, 'results': rows})


if __name__ == '__main__':
    main()
