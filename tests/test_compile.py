"""torch.compile of the local-learning step: one graph for the fused step, the eager step's gradients."""
import pytest
import timm
import torch
import torch._dynamo

from timm_asge import LocalLearner


@pytest.mark.parametrize('mode', ['fused', 'lean'])
def test_compiled_bf16_channels_last_step_matches_eager(mode):
    """The recipe's GPU settings (bf16 autocast, channels_last, inductor) on the CPU."""
    torch.manual_seed(0)
    # Two blocks, one of them down-sampling: every kind of block, half of asge_cnn_tiny's kernels to generate (each
    # takes seconds to compile on a cold cache).
    model = timm.create_model('asge_cnn_tiny', widths=(8, 16), downsample=(False, True), drop_rate=0.0).train()
    model = model.to(memory_format=torch.channels_last)
    images = torch.rand(16, 1, 16, 16).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (16,))

    def gradients(learner):
        model.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = learner(images, labels)
        if mode == 'fused':
            out['loss'].backward()
        return out['loss'].detach(), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = gradients(LocalLearner(model, mode))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(LocalLearner(model, mode))
    gradients(compiled)  # compiles
    loss, grads = gradients(compiled)
    breaks = torch._dynamo.utils.counters['graph_break']
    # Fused: the whole step is one graph. Lean: it breaks only where each block runs its own backward.
    assert all('backward' in reason for reason in breaks) and (mode == 'lean' or not breaks), dict(breaks)
    torch.testing.assert_close(loss, eager_loss, rtol=2e-3, atol=0)
    for got, want in zip(grads, eager_grads):
        # bf16 rounding differs between fused kernels and eager ones: compare against each tensor's scale.
        assert (got - want).abs().max() <= 2e-2 * want.abs().max()
