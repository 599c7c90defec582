"""Costs measured on the model (FLOP counter, saved-tensor hooks, modules run), checked against counts by hand."""
import pytest
import torch
import timm

from timm_asge.costs import strategy_costs, training_activation_bytes, training_flops
from timm_asge.engine import MODES

TINY_INPUT = (1, 16, 16)
NUM_CLASSES = 10

# asge_cnn_tiny at 1x16x16, by hand. Widths 32, 64, 64, 128; down-sampling after blocks 1 and 2; grids 4, 2, 2, 1.
# Block maps: 16x16, 16x16, 8x8, 4x4; outputs: 16x16, 8x8, 4x4, 4x4.
CONV_PARAMS = [1 * 9 * 32 + 32, 32 * 9 * 64 + 64, 64 * 9 * 64 + 64, 64 * 9 * 128 + 128]  # 320, 18496, 36928, 73856
CONV_FLOPS = [2 * 1 * 9 * 32 * 256, 2 * 32 * 9 * 64 * 256, 2 * 64 * 9 * 64 * 64, 2 * 64 * 9 * 128 * 16]
Y = [32 * 256, 64 * 256, 64 * 64, 128 * 16]  # 8192, 16384, 4096, 2048
IN = [1 * 256, 32 * 256, 64 * 64, 64 * 16]  # 256, 8192, 4096, 1024
OUT = [32 * 256, 64 * 64, 64 * 16, 128 * 16]  # 8192, 4096, 1024, 2048
GOODNESS = [32 * 16, 64 * 4, 64 * 4, 128 * 1]  # C * P * P
FUSION_FEATURES = 64 + 64 + 128  # blocks 1..3 (fusion_start=1)
# What autograd saves besides float32 activations: the label (int64) and a few scalars per loss.
SCALARS = 64


def _tiny(**kwargs):
    torch.manual_seed(0)
    return timm.create_model('asge_cnn_tiny', **kwargs)


def test_strategy_costs_of_tiny_by_hand():
    model = _tiny(best_block=1)
    rng = torch.get_rng_state()
    costs = strategy_costs(model, TINY_INPUT)
    assert torch.equal(torch.get_rng_state(), rng) and model.prediction == 'fusion'  # the model is left alone
    assert set(costs) == {'fusion', 'last', 'best'}

    fusion = costs['fusion']
    assert fusion['params'] == sum(CONV_PARAMS) + FUSION_FEATURES * NUM_CLASSES + NUM_CLASSES == 132_170
    assert fusion['fixed_buffers'] == 0
    assert fusion['flops'] == sum(CONV_FLOPS) + 2 * FUSION_FEATURES * NUM_CLASSES
    assert fusion['blocks_run'] == 4

    last = costs['last']
    assert last['params'] == sum(CONV_PARAMS) == 129_600
    assert last['fixed_buffers'] == 128 * NUM_CLASSES + NUM_CLASSES
    assert last['flops'] == sum(CONV_FLOPS) + 2 * GOODNESS[3] * NUM_CLASSES
    assert last['blocks_run'] == 4

    best = costs['best']
    assert best['params'] == CONV_PARAMS[0] + CONV_PARAMS[1] == 18_816
    assert best['fixed_buffers'] == GOODNESS[1] * NUM_CLASSES + NUM_CLASSES == 2_570
    assert best['flops'] == CONV_FLOPS[0] + CONV_FLOPS[1] + 2 * GOODNESS[1] * NUM_CLASSES
    assert best['blocks_run'] == 2

    # Back-propagating through `fusion` is the engine's backprop baseline: the same saved tensors.
    assert fusion['activation_bytes'] == training_activation_bytes(model, TINY_INPUT, 'backprop')
    assert best['activation_bytes'] < last['activation_bytes'] < fusion['activation_bytes']


def test_best_at_block_k_counts_only_k_plus_one_blocks():
    model = _tiny()
    assert 'best' not in strategy_costs(model, TINY_INPUT)
    previous = None
    for k in range(4):
        model.set_prediction('fusion', best_block=k)
        best = strategy_costs(model, TINY_INPUT)['best']
        assert best['blocks_run'] == k + 1
        assert best['params'] == sum(CONV_PARAMS[:k + 1]) == sum(p.numel() for p in model.stages[:k + 1].parameters())
        assert best['fixed_buffers'] == model.stages[k].proj.weight.numel() + model.stages[k].proj.bias.numel()
        if previous is not None:
            assert best['flops'] > previous['flops'] and best['activation_bytes'] > previous['activation_bytes']
        previous = best
    costs = strategy_costs(model, TINY_INPUT)  # `best` at the last block costs what `last` costs
    assert costs['best'] == costs['last']


def test_fusion_flops_count_the_read_out_a_wider_pooling_feeds():
    """catavgmax concatenates two poolings: the read-out multiplies twice as many features."""
    costs = strategy_costs(_tiny(global_pool='catavgmax'), TINY_INPUT)
    assert costs['fusion']['flops'] == sum(CONV_FLOPS) + 2 * 2 * FUSION_FEATURES * NUM_CLASSES


def test_training_flops_of_tiny_by_hand():
    model = _tiny()
    read_out = 2 * FUSION_FEATURES * NUM_CLASSES
    projections = sum(2 * g * NUM_CLASSES for g in GOODNESS)
    # Local: conv forward + weight gradients (detached inputs: no input gradients), the projections forward and
    # back to the goodness, the read-out forward and its weight gradient.
    local = 2 * sum(CONV_FLOPS) + 2 * projections + 2 * read_out
    assert training_flops(model, TINY_INPUT, 'lean') == training_flops(model, TINY_INPUT, 'fused') == local
    # Backprop adds the input gradients of blocks 1..3 and of the read-out; the block scores are only monitored.
    backprop = 3 * sum(CONV_FLOPS) - CONV_FLOPS[0] + 3 * read_out + projections
    assert training_flops(model, TINY_INPUT, 'backprop') == backprop


def test_training_flops_of_asge_cnn_near_3_8_gflop():
    """Forward + weight gradients of the paper's VGG8 at 32x32 is about 3.8 GFLOP per image."""
    assert training_flops(timm.create_model('asge_cnn'), (3, 32, 32), 'lean') == pytest.approx(3.83e9, rel=0.01)


def test_training_activation_bytes_of_tiny_by_hand():
    model = _tiny()
    # Local graph of block l: input + Y (the one map the fused ReLU-goodness node keeps) + N log-probabilities.
    graphs = [IN[i] + Y[i] + NUM_CLASSES for i in range(4)]
    read_out = FUSION_FEATURES + NUM_CLASSES
    measured = {mode: training_activation_bytes(model, TINY_INPUT, mode) for mode in MODES}
    # Lean: one block's graph at a time; block 1's is the largest.
    assert measured['lean'] == pytest.approx(4 * graphs[1], abs=SCALARS)
    assert measured['fused'] == pytest.approx(4 * (sum(graphs) + read_out), abs=SCALARS)
    # Backprop: conv input, Y, RMS pooling's Y**2 and pooled map (blocks 1, 2), dropout mask and output.
    backprop = sum(IN) + sum(Y) + (Y[1] + OUT[1]) + (Y[2] + OUT[2]) + 2 * sum(OUT) + read_out
    assert measured['backprop'] == pytest.approx(4 * backprop, abs=SCALARS)
    assert measured['lean'] < measured['fused'] < measured['backprop']


def test_rejects_wrong_input():
    model = _tiny()
    with pytest.raises(ValueError, match='in_chans=3'):
        strategy_costs(model, (3, 16, 16))
    with pytest.raises(ValueError, match='too small'):
        strategy_costs(model, (1, 2, 2))
