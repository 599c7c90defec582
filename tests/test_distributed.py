"""Two gloo processes launched by `accelerate launch`: ranks cover every sample once per epoch and stay in sync.

Run as a script by the test (fresh processes: forking a pytest process whose torch thread pool is already in use
deadlocks the children, so accelerate's fork-based debug_launcher is not used).
"""
import os
import subprocess
import sys
import warnings

import torch
import timm
from accelerate import Accelerator

import timm_asge  # noqa: F401
from conftest import free_port
from timm_asge import LocalLearner, param_groups
from timm_asge.data import ImageData, epoch_batches, to_model_input
from timm_asge.engine import all_reduce_gradients

NUM_SAMPLES, BATCH = 200, 16


def _train_two_epochs(mode: str):
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2
    torch.manual_seed(0)
    model = timm.create_model('asge_cnn_tiny', drop_rate=0.0)
    # Each image carries its sample id in two pixels, so the ranks can report exactly what they trained on.
    ids = torch.arange(NUM_SAMPLES)
    images = torch.rand(NUM_SAMPLES, 1, 16, 16, generator=torch.Generator().manual_seed(1)).mul(200).to(torch.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = (ids // 256).to(torch.uint8), (ids % 256).to(torch.uint8)
    data = ImageData(images, ids % 10, [str(i) for i in range(10)])
    engine = LocalLearner(model, mode)
    optimizer = torch.optim.AdamW(param_groups(model, 1e-2))
    if mode == 'lean':
        engine, optimizer = accelerator.prepare_model(engine, evaluation_mode=True), accelerator.prepare(optimizer)
    else:
        engine, optimizer = accelerator.prepare(engine, optimizer)
    for epoch in range(2):
        seen = []
        for _, batch_images, labels in epoch_batches(data, BATCH, epoch, seed=3, rank=rank, world_size=world):
            seen.append(batch_images[:, 0, 0, 0].long() * 256 + batch_images[:, 0, 0, 1].long())
            out = engine(to_model_input(batch_images), labels)
            if mode == 'fused':
                accelerator.backward(out['loss'])
            else:
                all_reduce_gradients(engine)
            optimizer.step()
            optimizer.zero_grad()
        everyone = accelerator.gather(torch.cat(seen))
        covered = sorted(everyone.tolist()) == list(range(NUM_SAMPLES))
        assert covered, f'{mode}: epoch {epoch} did not cover each sample once'
    flat = torch.cat([p.detach().flatten() for p in accelerator.unwrap_model(engine).parameters()])
    gathered = accelerator.gather(flat[None])
    assert torch.equal(gathered[0], gathered[1]), f'{mode}: ranks diverged'
    assert not torch.equal(flat, torch.cat([p.flatten() for p in timm.create_model('asge_cnn_tiny').parameters()]))
    return accelerator



def test_two_gloo_ranks_cover_the_epoch_once_and_stay_identical():
    """Both modes, one after the other in the same two processes (a launch costs more than the training)."""
    # FIXME: about one full-suite run in five or more, the launch fails at start-up (once both ranks aborted with
    # SIGABRT); never reproduced alone. A launch that fails without a failed assertion (an abort, a rendezvous error)
    # earns one more on a fresh port, and its stderr then shows in the warnings summary, so CI logs say why; a failed
    # assertion (samples not covered once, ranks diverged) fails at once, and a steady error fails both launches.
    failures = []
    for _ in range(2):
        cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
               '--main_process_port', str(free_port()), __file__]
        proc = subprocess.run(cmd, text=True, capture_output=True, timeout=300,
                              env={**os.environ, 'ACCELERATE_USE_CPU': '1', 'OMP_NUM_THREADS': '1'})
        if proc.returncode == 0:
            break
        failures.append(f'exit {proc.returncode}; stdout: {proc.stdout[-300:]!r}; stderr: {proc.stderr[-3000:]}')
        if 'AssertionError' in proc.stderr:
            break
    assert proc.returncode == 0, '\n\n'.join(failures)
    assert proc.stdout.count('RANK OK fused') == proc.stdout.count('RANK OK lean') == 2, proc.stdout
    if failures:
        warnings.warn(f'the first 2-process launch failed, the second passed: {failures[0]}')


if __name__ == '__main__':
    for mode in ('fused', 'lean'):
        accelerator = _train_two_epochs(mode)
        print(f'RANK OK {mode}', flush=True)
    # As the recipe does: tear the process group down before exit. Left to the interpreter's exit, one rank of a
    # loaded machine died in the gloo group's destructor ("terminate called without an active exception", SIGABRT).
    accelerator.end_training()
