"""Peak memory of one training step, counted tensor by tensor: ASGE local learning (fused, lean) vs backprop.

The issue-5 memory target is about batch 512 on a GPU: ``lean``'s peak step memory at most half of backprop's for
the same network. What a step allocates does not depend on the device, so this script counts it on any machine,
without computing anything: the step runs under ``FakeTensorMode`` (tensors with shapes and dtypes but no data) and a
dispatch mode adds every new tensor storage to a running total and removes it when the storage is freed. The peak of
that total over one step, after a warm-up step has created the AdamW state, is the step's extra memory: activations,
gradients and temporaries, not weights or optimizer state (what ``torch.cuda.max_memory_allocated()`` minus the
memory allocated before the step reports on a GPU, less the caching allocator's rounding and cuDNN workspaces).

The step is ``gpu_suite.build``'s (same model, fused AdamW, bf16 autocast when asked), so the figures line up with
the GPU suite's measured ones. Tensors keep the default (NCHW) layout: fake tensors cannot be converted to
channels_last in place, and the layout does not change a tensor's size.

Usage:
    python -m bench.step_memory                       # asge_cnn, batch 512, fp32 and bf16 autocast
    python -m bench.step_memory --model asge_vgg11 --batch-size 64
"""
import argparse
from pathlib import Path
from typing import Any, Dict

import torch
import timm
from torch._subclasses.fake_tensor import FakeTensorMode

from timm_asge import engine
from timm_asge.costs import training_activation_bytes

from bench.cpu_throughput import environment, write_record
from bench.gpu_suite import VARIANTS, LiveTensorBytes, build

REPO = Path(__file__).resolve().parents[1]


def step_peak_bytes(args: argparse.Namespace, variant: str) -> Dict[str, Any]:
    """Peak extra bytes of one training step of ``variant`` (after one warm-up step), without computing it."""
    original_check = engine.check_batch
    # The CPU label check reads label values, which fake tensors do not have; the batch here is valid.
    engine.check_batch = lambda *args, **kwargs: None
    try:
        with FakeTensorMode():
            model, step = build(args, variant, args.batch_size, torch.device('cpu'))
            step()
            meter = LiveTensorBytes()
            with meter:
                step()
    finally:
        engine.check_batch = original_check
    # Outside FakeTensorMode: the package measures saved tensors on a real one-image step.
    saved = training_activation_bytes(timm.create_model(args.model), args.input_size, variant) * args.batch_size
    return dict(variant=variant, precision='bf16 autocast' if args.amp else 'fp32', batch_size=args.batch_size,
                peak_step_mib=meter.peak / 2 ** 20, saved_activation_mib=saved / 2 ** 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='asge_cnn')
    parser.add_argument('--batch-size', type=int, default=512)
    parser.add_argument('--out', default=None, help='JSON path (default bench/results/step_memory-<model>.json)')
    args = parser.parse_args()
    args.compile, args.channels_last = False, False
    args.input_size = tuple(timm.create_model(args.model).pretrained_cfg['input_size'])

    rows = []
    for amp in (False, True):
        args.amp = amp
        rows += [step_peak_bytes(args, variant) for variant in VARIANTS]

    print(f"{args.model} {'x'.join(map(str, args.input_size))}, batch {args.batch_size}, fused AdamW: "
          f"peak extra memory of one training step (tensor bytes, counted without computing)")
    header = f"{'precision':<14} {'variant':<9} {'peak MiB':>9} {'x backprop':>10} {'saved act. MiB fp32':>22}"
    print(header + '\n' + '-' * len(header))
    verdicts = {}
    for row in rows:
        backprop = next(r for r in rows if r['precision'] == row['precision'] and r['variant'] == 'backprop')
        row['ratio_to_backprop'] = row['peak_step_mib'] / backprop['peak_step_mib']
        print(f"{row['precision']:<14} {row['variant']:<9} {row['peak_step_mib']:>9.1f} "
              f"{row['ratio_to_backprop']:>10.2f} {row['saved_activation_mib']:>22.1f}")
        if row['variant'] == 'lean':
            verdicts[row['precision']] = row['ratio_to_backprop'] <= 0.5
    print('\ntarget, lean <= 0.5 x backprop: '
          + ', '.join(f"{p}: {'met' if ok else 'NOT met'}" for p, ok in verdicts.items()))

    record = dict(
        environment=dict(
            environment('cpu'),
            method='FakeTensorMode + dispatch-level live storage bytes (no compute; device-independent count)',
        ),
        settings=dict(model=args.model, input_size=list(args.input_size), batch_size=args.batch_size,
                      fused_adamw=True),
        results=rows,
        lean_at_most_half_of_backprop=verdicts,
    )
    out = Path(args.out) if args.out else REPO / 'bench' / 'results' / f'step_memory-{args.model}.json'
    write_record(out, record)


if __name__ == '__main__':
    main()
