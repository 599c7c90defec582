"""Analytic costs of the prediction strategies and of a training step, checked by hand and against PyTorch."""
import pytest
import torch
import torch.nn.functional as F
import timm
from torch.utils.flop_counter import FlopCounterMode

from timm_asge import LocalLearner
from timm_asge.costs import block_shapes, strategy_costs, training_activation_bytes, training_flops

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


def _tiny(**kwargs):
    torch.manual_seed(0)
    return timm.create_model('asge_cnn_tiny', **kwargs)


def test_block_shapes_of_tiny():
    shapes = block_shapes(_tiny(), TINY_INPUT)
    assert [s['in'] for s in shapes] == IN
    assert [s['y'] for s in shapes] == Y
    assert [s['out'] for s in shapes] == OUT
    assert [s['goodness'] for s in shapes] == GOODNESS


def test_strategy_costs_of_tiny_by_hand():
    costs = strategy_costs(_tiny(best_block=1), TINY_INPUT)
    assert set(costs) == {'fusion', 'last', 'best'}

    fusion = costs['fusion']
    assert fusion['params'] == sum(CONV_PARAMS) + FUSION_FEATURES * NUM_CLASSES + NUM_CLASSES == 132_170
    assert fusion['fixed_buffers'] == 0
    assert fusion['flops'] == sum(CONV_FLOPS) + 2 * FUSION_FEATURES * NUM_CLASSES
    assert fusion['blocks_run'] == 4

    last = costs['last']
    assert last['params'] == sum(CONV_PARAMS) == 129_600
    assert last['fixed_buffers'] == 128 * NUM_CLASSES + NUM_CLASSES
    assert last['flops'] == sum(CONV_FLOPS) + 2 * Y[3] + 2 * GOODNESS[3] * NUM_CLASSES
    assert last['blocks_run'] == 4

    best = costs['best']
    assert best['params'] == CONV_PARAMS[0] + CONV_PARAMS[1] == 18_816
    assert best['fixed_buffers'] == GOODNESS[1] * NUM_CLASSES + NUM_CLASSES == 2_570
    assert best['flops'] == CONV_FLOPS[0] + CONV_FLOPS[1] + 2 * Y[1] + 2 * GOODNESS[1] * NUM_CLASSES
    assert best['blocks_run'] == 2

    # The peak of every strategy here is block 1's conv: its input plus its 64x16x16 map.
    for strategy in costs.values():
        assert strategy['activation_bytes'] == 4 * (IN[1] + Y[1])


def test_best_at_block_k_counts_only_k_plus_one_blocks():
    model = _tiny()
    assert 'best' not in strategy_costs(model, TINY_INPUT)
    previous = None
    for k in range(4):
        model.set_prediction('fusion', best_block=k)
        best = strategy_costs(model, TINY_INPUT)['best']
        assert best['blocks_run'] == k + 1
        assert best['params'] == sum(CONV_PARAMS[:k + 1])
        assert best['params'] == sum(p.numel() for p in model.stages[:k + 1].parameters())
        assert best['fixed_buffers'] == model.stages[k].proj.weight.numel() + model.stages[k].proj.bias.numel()
        if previous is not None:
            assert best['flops'] > previous['flops']
        previous = best
    # Only block 0 runs: the peak is its scoring step (32x16x16 map + goodness + scores), not block 1's conv.
    model.set_prediction('best', best_block=0)
    assert strategy_costs(model, TINY_INPUT)['best']['activation_bytes'] == 4 * (Y[0] + GOODNESS[0] + NUM_CLASSES)
    # `best` at the last block costs what `last` costs.
    model.set_prediction('best', best_block=3)
    costs = strategy_costs(model, TINY_INPUT)
    assert costs['best'] == costs['last']


@pytest.mark.parametrize('prediction', ['fusion', 'last', 'best'])
def test_flops_match_torch_flop_counter(prediction):
    """Matrix-product FLOPs equal PyTorch's count of the real forward; the goodness (elementwise) is on top."""
    model = _tiny(best_block=2).eval()
    model.set_prediction(prediction)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.rand(1, *TINY_INPUT))
    cost = strategy_costs(model, TINY_INPUT)[prediction]
    goodness = 0 if prediction == 'fusion' else 2 * block_shapes(model, TINY_INPUT)[model.read_block]['y']
    assert cost['flops'] - goodness == counter.get_total_flops()


def test_fusion_flops_count_the_read_out_a_wider_pooling_feeds():
    """catavgmax concatenates two poolings: the read-out multiplies twice as many features."""
    model = _tiny(global_pool='catavgmax').eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.rand(1, *TINY_INPUT))
    assert strategy_costs(model, TINY_INPUT)['fusion']['flops'] == counter.get_total_flops()


def test_params_match_the_model():
    model = _tiny()
    costs = strategy_costs(model, TINY_INPUT)
    assert costs['fusion']['params'] == sum(p.numel() for p in model.parameters())
    assert costs['last']['params'] == sum(p.numel() for p in model.stages.parameters())


def test_training_activation_bytes_of_tiny_by_hand():
    model = _tiny()
    # Local graph of block l: input + Y (the one map the fused ReLU-goodness node keeps) + N log-probabilities.
    graphs = [IN[i] + Y[i] + NUM_CLASSES for i in range(4)]
    read_out = FUSION_FEATURES + NUM_CLASSES
    # Lean: block 2's graph is the peak (24586 elements); later blocks add the pooled (4x4) fusion inputs kept so far.
    fusion_inputs = [64 * 16, 64 * 16, 128 * 16]  # outputs of blocks 2..4 pooled to the final 4x4
    assert training_activation_bytes(model, TINY_INPUT, 'lean') == 4 * max(
        graphs[0], graphs[1], graphs[2] + fusion_inputs[0], graphs[3] + sum(fusion_inputs[:2]),
        sum(fusion_inputs) + read_out) == 4 * 24_586
    assert training_activation_bytes(model, TINY_INPUT, 'fused') == 4 * (sum(graphs) + OUT[3] + read_out)
    # Backprop: conv input, Y, RMS pooling's Y**2 and pooled map (blocks 1, 2), dropout mask and output.
    backprop = sum(IN) + sum(Y) + (Y[1] + OUT[1]) + (Y[2] + OUT[2]) + 2 * sum(OUT) + read_out
    assert training_activation_bytes(model, TINY_INPUT, 'backprop') == 4 * backprop == 4 * 100_874
    assert training_activation_bytes(model, TINY_INPUT, 'lean') < training_activation_bytes(
        model, TINY_INPUT, 'fused') < training_activation_bytes(model, TINY_INPUT, 'backprop')
    with pytest.raises(ValueError, match='training mode'):
        training_activation_bytes(model, TINY_INPUT, 'sideways')


def test_training_flops_of_tiny_by_hand():
    model = _tiny()
    read_out = 2 * FUSION_FEATURES * NUM_CLASSES
    scores = sum(2 * y + 2 * g * NUM_CLASSES for y, g in zip(Y, GOODNESS))
    local = 2 * sum(CONV_FLOPS) + scores + read_out  # forward + weight gradients, no input gradients
    assert training_flops(model, TINY_INPUT, 'lean') == training_flops(model, TINY_INPUT, 'fused') == local
    # Backprop adds the input gradients of blocks 1..3 and skips the goodness of the fusion forward.
    assert training_flops(model, TINY_INPUT, 'backprop') == 3 * sum(CONV_FLOPS) - CONV_FLOPS[0] + read_out


def test_training_flops_of_asge_cnn_near_3_8_gflop():
    """Forward + weight gradients of the paper's VGG8 at 32x32 is about 3.8 GFLOP per image."""
    model = timm.create_model('asge_cnn')
    assert training_flops(model, (3, 32, 32), 'lean') == pytest.approx(3.83e9, rel=0.01)


def _saved_bytes_per_image(model, loss_fn, batch_size):
    """Bytes of the distinct storages autograd saves for backward (weights and buffers excluded), per image."""
    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn()
    return sum(saved.values()) / batch_size


def test_training_model_matches_autograd_saved_tensors():
    """The analytic model agrees with what autograd really saves (up to a few scalars per block)."""
    model = _tiny().train()
    batch_size = 8
    images, labels = torch.rand(batch_size, *TINY_INPUT), torch.randint(0, NUM_CLASSES, (batch_size,))
    last_output_bytes = 4 * OUT[3]  # kept by the engine for the read-out, but not saved by autograd
    fused = _saved_bytes_per_image(model, lambda: LocalLearner(model, 'fused')(images, labels), batch_size)
    assert fused == pytest.approx(training_activation_bytes(model, TINY_INPUT, 'fused') - last_output_bytes, abs=64)
    backprop = _saved_bytes_per_image(model, lambda: F.cross_entropy(model(images), labels), batch_size)
    assert backprop == pytest.approx(training_activation_bytes(model, TINY_INPUT, 'backprop'), abs=64)


def test_rejects_wrong_input():
    model = _tiny()
    with pytest.raises(ValueError, match='channels'):
        strategy_costs(model, (3, 16, 16))
    with pytest.raises(ValueError, match='too small'):
        strategy_costs(model, (1, 2, 2))
