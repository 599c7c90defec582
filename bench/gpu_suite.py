"""GPU suite: ASGE local learning (fused, lean) against a backprop baseline of the same network.

Measures, for ``asge_cnn`` (3x32x32) on one CUDA device, every variant in bf16 autocast + channels_last + fused
AdamW (optionally ``torch.compile``):
    (a) training-step throughput (images/s) at several batch sizes;
    (b) peak memory of a step at the memory batch (512): ``torch.cuda.max_memory_allocated()`` after
        ``reset_peak_memory_stats()`` minus ``memory_allocated()`` before the step (so activations, gradients and
        temporaries; not the weights or the AdamW state, which exist before the step);
    (c) FLOP utilisation: measured training FLOPs per image (``timm_asge.costs.training_flops``: forward + conv weight
        gradients, plus conv input gradients for backprop) x images/s / the card's peak dense bf16 FLOP/s;
    (d) a ``torch.profiler`` table of the top ops of one step per variant;
    (e) the on-device augmentation of the CIFAR recipe, eager and compiled, with a check that it makes no host sync.

Variants: ``fused`` (``LocalLearner(model, 'fused')``, one backward over the summed local losses), ``lean``
(``LocalLearner(model, 'lean')``, per-block backward inside forward) and ``backprop`` (end-to-end cross-entropy
through ``model(x)`` with the default ``fusion`` read-out). Data are synthetic (random images and labels on the
device), so the numbers are the training step alone, no input pipeline.

Each measurement runs on its own: one that fails (out of memory, a compile mode a variant cannot run) is recorded
under ``errors`` and the rest still run; the JSON is rewritten after every measurement (``complete: false`` until the
end), so a run cut off at a time limit keeps what it measured. The exit status is 1 when any measurement failed.

``--toy`` runs ``asge_cnn_tiny`` on tiny batches for a few steps, on the CPU if there is no GPU: a smoke test of this
script, not a measurement (CPU memory there is live tensor bytes, counted at dispatch).

Usage:
    python -m bench.gpu_suite                     # on the GPU machine: ~2-4 min without --compile
    python -m bench.gpu_suite --compile           # torch.compile the step's forward (adds compile time per run)
    python -m bench.gpu_suite --compile --compile-mode reduce-overhead   # ... with CUDA graphs
    python -m bench.gpu_suite --toy               # CPU smoke test
"""
import argparse
import re
import sys
import time
import weakref
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch._dynamo
import torch.nn.functional as F
import timm
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

import timm_asge  # noqa: F401 (registers the asge_* models)
from timm_asge import LocalLearner, param_groups
from timm_asge.augment import augment_batch
from timm_asge.costs import training_activation_bytes, training_flops
from timm_asge.data import to_model_input

from bench.cpu_throughput import environment, write_record

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ('fused', 'lean', 'backprop')
CUDAGRAPH_MODES = ('reduce-overhead', 'max-autotune')  # torch.compile modes that wrap graphs in CUDA graphs
# Peak dense (no sparsity) bf16 tensor-core FLOP/s from the vendor data sheets, matched on the device name.
PEAK_BF16_FLOPS = (
    ('H200', 989e12),
    ('H100 PCIe', 756e12),
    ('H100', 989e12),  # SXM
    ('A100', 312e12),
    ('L40S', 362e12),
)


def peak_flops(device_name: str) -> Optional[float]:
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage created inside the mode and still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(ret.alias_info is not None for ret in func._schema.returns):
            return out  # a view or an in-place/out= result: no new memory, maybe of a storage made before the mode
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage not in self._seen:  # views and in-place results share a storage already counted
                    nbytes = storage.nbytes()
                    self._seen[storage] = nbytes
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, nbytes)
        return out


class MemoryMeter:
    """Peak memory of the code between ``start()`` and ``stop()``, above what was allocated at ``start()``.

    CUDA: the caching allocator's statistics. Other devices (toy runs): live tensor bytes, counted at dispatch.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            self.counter = LiveTensorBytes()
            self.counter.__enter__()

    def stop(self) -> int:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.before
        self.counter.__exit__(None, None, None)
        return self.counter.peak


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def build(args, variant: str, batch_size: int, device: torch.device):
    """Fresh model, fused AdamW, synthetic batch and a ``step()`` closure for one (variant, batch size)."""
    torch.manual_seed(0)
    model = timm.create_model(args.model, device=device).train()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    if args.channels_last:
        model = model.to(memory_format=memory_format)
    # Fused AdamW exists on CUDA and (torch >= 2.4) on the CPU.
    optimizer = torch.optim.AdamW(param_groups(model, lr=2e-4, weight_decay=1e-3), fused=True)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(batch_size, *args.input_size, generator=generator)
    images = images.to(device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, model.num_classes, (batch_size,), generator=generator).to(device)
    # What is compiled is what the recipe's train.compile compiles: the whole learner (or, for backprop, the model).
    forward = LocalLearner(model, variant) if variant != 'backprop' else model
    if args.compile:
        torch._dynamo.reset()  # each run compiles its own model; stale guards from the previous run only cost time
        forward = torch.compile(forward, mode=args.compile_mode)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else nullcontext()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            if variant == 'backprop':
                loss = F.cross_entropy(forward(images), labels)
            else:
                loss = forward(images, labels)['loss']  # lean: already backpropagated block by block
        if variant != 'lean':
            loss.backward()
        optimizer.step()

    return model, step


def measure(args, variant: str, batch_size: int, device: torch.device, peak: Optional[float]) -> Dict[str, Any]:
    model, step = build(args, variant, batch_size, device)
    skips_before = torch._dynamo.utils.counters['inductor']['cudagraph_skips']
    for _ in range(args.warmup):
        step()
    model.zero_grad(set_to_none=True)  # so the step's own gradients count in its peak, not in the baseline
    meter = MemoryMeter(device)
    meter.start()
    try:
        step()
    finally:  # a failing step must not leave the CPU counter's dispatch mode on for the rows after it
        peak_bytes = meter.stop()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    elapsed = time.perf_counter() - start
    images_per_s = batch_size * args.steps / elapsed
    flops_per_image = training_flops(model, args.input_size, variant)
    return dict(
        variant=variant,
        batch_size=batch_size,
        step_ms=1000 * elapsed / args.steps,
        images_per_s=images_per_s,
        peak_step_mib=peak_bytes / 2 ** 20,
        saved_activation_mib=training_activation_bytes(model, args.input_size, variant) * batch_size / 2 ** 20,
        train_gflop_per_image=flops_per_image / 1e9,
        achieved_tflops=flops_per_image * images_per_s / 1e12,
        flop_utilisation=flops_per_image * images_per_s / peak if peak else None,
        # Inductor falls back from CUDA graphs silently (reason in the off-by-default `cudagraphs` log).
        cudagraph_skips=(torch._dynamo.utils.counters['inductor']['cudagraph_skips'] - skips_before
                         if args.compile and args.compile_mode in CUDAGRAPH_MODES and device.type == 'cuda' else None),
    )


def profile(args, variant: str, device: torch.device, row_limit: int) -> Dict[str, Any]:
    """Profile one step after warm-up; return the printed table and the top ops."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    _, step = build(args, variant, args.memory_batch, device)
    for _ in range(max(args.warmup, 1)):
        step()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with torch_profile(activities=activities) as prof:
        step()
        _sync(device)
    sort_by = 'self_cuda_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    events = prof.key_averages()
    table = events.table(sort_by=sort_by, row_limit=row_limit)
    time_attr = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    ranked = sorted(events, key=lambda e: getattr(e, time_attr, 0) or 0, reverse=True)[:row_limit]
    top = [dict(name=e.key, calls=e.count, self_ms=(getattr(e, time_attr, 0) or 0) / 1000) for e in ranked]
    return dict(variant=variant, batch_size=args.memory_batch, sort_by=sort_by, table=table, top_ops=top)


def measure_augmentation(args, device: torch.device, compiled: bool) -> Dict[str, Any]:
    """Time the CIFAR recipe's on-device augmentation of one batch and check that it makes no host sync.

    The augmentation: uint8 to float, crop, flip, colour jitter, greyscale; the check: CUDA's sync debug mode.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (args.memory_batch, 3, *args.input_size[1:]), dtype=torch.uint8, device=device,
                           generator=generator)

    def augment() -> torch.Tensor:
        return augment_batch(to_model_input(images), generator, crop_padding=4, hflip=True,
                             color_jitter=(0.4, 0.4, 0.4, 0.1), grayscale_p=0.2, compile_jitter=compiled)

    for _ in range(max(args.warmup, 2)):  # the compiled jitter compiles on its first call
        augment()
    host_sync = None
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode('error')
        try:
            augment()
        except RuntimeError as err:
            host_sync = str(err).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode('default')
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        augment()
    _sync(device)
    batch_ms = 1000 * (time.perf_counter() - start) / args.steps
    return dict(compiled=compiled, batch_size=args.memory_batch, batch_ms=batch_ms,
                images_per_s=1000 * args.memory_batch / batch_ms, host_sync=host_sync)


def _table(rows: List[Dict[str, Any]]) -> str:
    header = (f"{'variant':<9} {'batch':>5} {'img/s':>10} {'step ms':>9} {'peak MiB':>9} {'act. MiB fp32':>14} "
              f"{'GFLOP/img':>9} {'TFLOP/s':>8} {'util':>6}")
    lines = [header, '-' * len(header)]
    for r in rows:
        util = f"{100 * r['flop_utilisation']:.1f}%" if r['flop_utilisation'] is not None else '-'
        lines.append(
            f"{r['variant']:<9} {r['batch_size']:>5} {r['images_per_s']:>10.1f} {r['step_ms']:>9.2f} "
            f"{r['peak_step_mib']:>9.1f} {r['saved_activation_mib']:>14.1f} "
            f"{r['train_gflop_per_image']:>9.3f} {r['achieved_tflops']:>8.2f} {util:>6}")
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description='ASGE GPU suite: throughput, memory, FLOP utilisation, profile')
    parser.add_argument('--toy', action='store_true', help='asge_cnn_tiny, tiny batches, few steps (CPU smoke test)')
    parser.add_argument('--model', default=None, help='default asge_cnn (asge_cnn_tiny with --toy)')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=None, help='default 128 256 512 1024')
    parser.add_argument('--memory-batch', type=int, default=None, help='batch of the memory/profile runs (512)')
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument('--warmup', type=int, default=None, help='default 5 (2 with --toy; torch.compile needs 2)')
    parser.add_argument('--steps', type=int, default=None, help='timed steps, default 20 (2 with --toy)')
    parser.add_argument('--no-amp', dest='amp', action='store_false', help='float32 instead of bf16 autocast')
    parser.add_argument('--no-channels-last', dest='channels_last', action='store_false')
    parser.add_argument('--compile', action='store_true', help='torch.compile the learner (backprop: the model)')
    parser.add_argument('--compile-mode', default=None, help="torch.compile mode, e.g. 'reduce-overhead'")
    parser.add_argument('--no-profile', dest='profile', action='store_false')
    parser.add_argument('--profile-rows', type=int, default=15)
    parser.add_argument('--peak-tflops', type=float, default=None, help='override the peak bf16 TFLOP/s of the card')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', default=None, help='JSON path (default bench/results/gpu_suite-<device>.json)')
    args = parser.parse_args()

    toy = args.toy
    args.model = args.model or ('asge_cnn_tiny' if toy else 'asge_cnn')
    args.batch_sizes = args.batch_sizes or ([4, 8] if toy else [128, 256, 512, 1024])
    args.memory_batch = args.memory_batch or (8 if toy else 512)
    args.warmup = args.warmup if args.warmup is not None else (2 if toy else 5)
    args.steps = args.steps if args.steps is not None else (2 if toy else 20)
    device = torch.device(args.device)
    if device.type != 'cuda' and not toy:
        parser.error('no CUDA device: run with --toy for the CPU smoke test, or on the GPU machine')
    if args.compile:
        # Lean mode's graph breaks give every block its own frames on shared code objects; the default recompile
        # limit (8) would silently fall back to eager after the 8th.
        for name in ('recompile_limit', 'cache_size_limit'):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
    probe = timm.create_model(args.model)
    args.input_size = tuple(probe.pretrained_cfg['input_size'])
    env = environment(str(device))
    device_name = env['gpu'] if device.type == 'cuda' else f"CPU {env['cpu']}"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_flops(device_name) if device.type == 'cuda' else None)

    batch_sizes = sorted(set(args.batch_sizes) | {args.memory_batch})
    tag = re.sub(r'[^A-Za-z0-9._-]+', '-', device_name).strip('-') + ('-toy' if toy else '')
    out = Path(args.out) if args.out else REPO / 'bench' / 'results' / f'gpu_suite-{tag}.json'
    rows, errors, profiles, augmentation = [], [], [], []

    def save(complete: bool) -> None:
        # Written after every row, so a run cut off at the device call's time limit still leaves what it measured.
        record = dict(
            environment=dict(env, device=device_name, cuda=torch.version.cuda, toy=toy),
            settings=dict(
                model=args.model, input_size=list(args.input_size), amp_bf16=args.amp,
                channels_last=args.channels_last, compile=args.compile, compile_mode=args.compile_mode,
                fused_adamw=True, warmup=args.warmup, steps=args.steps, memory_batch=args.memory_batch,
                peak_flops=peak,
            ),
            complete=complete,
            results=rows,
            errors=errors,
            augmentation=augmentation,
            profiles=[{k: v for k, v in p.items() if k != 'table'} for p in profiles],
        )
        write_record(out, record)

    def attempt(what: Dict[str, Any], measurement, results: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        """Run one measurement into ``results`` and save the record; a failure (out of memory, a compile mode a variant
        cannot run) is recorded under ``errors`` and costs only this measurement."""
        result = None
        try:
            result = measurement()
            results.append(result)
        except Exception as e:  # noqa: BLE001 (recorded, and the other measurements still run)
            message = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            errors.append(dict(what, error=message))
            print(f'{what}: failed ({message})', file=sys.stderr)
        finally:
            if device.type == 'cuda':
                try:
                    torch.cuda.empty_cache()
                except Exception:  # noqa: BLE001 (a sticky CUDA error raises here too; it is recorded above)
                    pass
        save(complete=False)
        return result

    for batch_size in batch_sizes:
        for variant in args.variants:
            row = attempt(dict(variant=variant, batch_size=batch_size),
                          lambda: measure(args, variant, batch_size, device, peak), rows)
            if row is not None:
                skipped = row['cudagraph_skips']
                print(f"  {variant:<9} batch {batch_size:>5}: {row['images_per_s']:.1f} img/s"
                      + (f' ({skipped} compiled graph(s) without CUDA graphs: TORCH_LOGS=cudagraphs says why)'
                         if skipped else ''), file=sys.stderr)
    if args.profile:
        for variant in args.variants:
            attempt(dict(variant=variant, batch_size=args.memory_batch, profile=True),
                    lambda: profile(args, variant, device, args.profile_rows), profiles)
    # Measured once, in the run without --compile (the step's compile mode does not change it); the compiled jitter
    # costs a compilation, so the CPU smoke test leaves it out.
    if not args.compile:
        for compiled in (False,) if toy else (False, True):
            attempt(dict(augmentation=True, compiled=compiled), lambda: measure_augmentation(args, device, compiled),
                    augmentation)

    settings = (f"{args.model} {'x'.join(map(str, args.input_size))}, {'bf16 autocast' if args.amp else 'fp32'}, "
                f"{'channels_last' if args.channels_last else 'NCHW'}, fused AdamW"
                f"{', torch.compile' if args.compile else ''}{' ' + args.compile_mode if args.compile_mode else ''}; "
                f"{args.warmup} warm-up + {args.steps} timed steps")
    print(f'\n{device_name}: {settings}')
    print(f"peak bf16: {peak / 1e12:.0f} TFLOP/s" if peak else 'peak FLOP/s unknown: utilisation not computed')
    print('\n(a) throughput, (b) peak step memory, (c) FLOP utilisation')
    print(_table(rows))
    for r in rows:
        if r['cudagraph_skips']:
            print(f"{r['variant']} at batch {r['batch_size']}: {r['cudagraph_skips']} compiled graph(s) ran without "
                  f"CUDA graphs, so that row is not all CUDA graphs (TORCH_LOGS=cudagraphs says why)")
    print(f'\nmemory at batch {args.memory_batch}: max_memory_allocated - allocated before the step '
          f"({'CUDA' if device.type == 'cuda' else 'CPU: live tensor bytes counted at dispatch'}); "
          '"act. MiB fp32" is the saved-tensor count of a float32 one-image step times the batch (bf16 stores less)')
    for p in profiles:
        print(f"\n(d) profile: {p['variant']}, batch {p['batch_size']}, sorted by {p['sort_by']}")
        print(p['table'])

    if augmentation:
        print(f'\n(e) on-device augmentation of one batch of {args.memory_batch} (CIFAR recipe: crop, flip, colour '
              f'jitter, greyscale), not part of the steps above')
        for a in augmentation:
            checked = 'no host sync' if device.type == 'cuda' else ''
            sync = f"HOST SYNC: {a['host_sync']}" if a['host_sync'] else checked
            kind = 'compiled' if a['compiled'] else 'eager'
            print(f"  {kind:<8} {a['batch_ms']:8.2f} ms  {a['images_per_s']:12.1f} img/s  {sync}")

    for e in errors:
        print(f"FAILED: {', '.join(f'{k}={v}' for k, v in e.items() if k != 'error')}: {e['error']}")
    save(complete=True)
    if errors:  # the record keeps what was measured; the exit status says it is not everything
        sys.exit(1)


if __name__ == '__main__':
    main()
