"""The ASGE method itself: locality of the gradients, lean == fused, fixed projections, goodness sizes, `best`."""
import pytest
import torch
import torch.nn.functional as F
import timm
from safetensors.torch import load_file, save_file

from timm_asge import LocalLearner, param_groups
from timm_asge.goodness import grid_size, spatial_goodness, rms_norm, rms_pool2d


def _tiny(**kwargs):
    torch.manual_seed(0)
    return timm.create_model('asge_cnn_tiny', **kwargs)


def _batch(n=8, chans=1, size=16, num_classes=10):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, chans, size, size, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_no_gradient_crosses_a_block_boundary():
    """(a) Changing block k+1's loss leaves block k's gradient unchanged."""
    model = _tiny(drop_rate=0.0)
    images, labels = _batch()

    # Recompute the local losses by hand to weight block 2's loss differently.
    def weighted_backward(weight):
        model.zero_grad()
        x = model.stem(images)
        losses = []
        for block in model.stages:
            y = block.features(x.detach())
            losses.append(F.cross_entropy(block.scores(y), labels))
            with torch.no_grad():
                x = block.transition(y)
        (losses[0] + losses[1] + weight * losses[2] + losses[3]).backward()
        return _grads(model)

    base = weighted_backward(1.0)
    changed = weighted_backward(7.0)
    for name in base:
        if name.startswith(('stages.0.', 'stages.1.', 'stages.3.')):
            torch.testing.assert_close(base[name], changed[name], rtol=0, atol=0)
    assert not torch.allclose(base['stages.2.conv.weight'], changed['stages.2.conv.weight'])


def test_engine_gradients_are_each_blocks_own():
    """Every conv's gradient from the engine's total loss (fusion included) is that of its own block's loss alone."""
    model = _tiny(drop_rate=0.0)
    images, labels = _batch()
    model.zero_grad()
    LocalLearner(model)(images, labels)['loss'].backward()
    full = _grads(model)
    assert full['head.fc.weight'].abs().sum() > 0
    x = model.stem(images)
    for i, block in enumerate(model.stages):
        model.zero_grad()
        y = block.features(x.detach())
        F.cross_entropy(block.scores(y), labels).backward()
        torch.testing.assert_close(full[f'stages.{i}.conv.weight'], block.conv.weight.grad)
        torch.testing.assert_close(full[f'stages.{i}.conv.bias'], block.conv.bias.grad)
        x = block.transition(y)


@pytest.mark.parametrize('drop_rate', [0.0, 0.1])
def test_lean_and_fused_give_the_same_gradients(drop_rate):
    """(b) Per-block backward inside forward equals one backward of the summed losses."""
    images, labels = _batch(16)
    model = _tiny(drop_rate=drop_rate)
    fused, lean = LocalLearner(model, 'fused'), LocalLearner(model, 'lean')

    torch.manual_seed(123)
    out_fused = fused(images, labels)
    out_fused['loss'].backward()
    grads_fused = _grads(model)
    model.zero_grad(set_to_none=True)

    torch.manual_seed(123)
    out_lean = lean(images, labels)
    assert not out_lean['loss'].requires_grad
    grads_lean = _grads(model)

    assert grads_fused.keys() == grads_lean.keys() == {n for n, _ in model.named_parameters()}
    for name in grads_fused:
        torch.testing.assert_close(grads_lean[name], grads_fused[name], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out_lean['block_losses'], out_fused['block_losses'])
    assert torch.equal(out_lean['correct'], out_fused['correct'])


def test_projections_fixed_in_training_and_saved(tmp_path):
    """(c) R and b never change in training and survive a save/load."""
    model = _tiny()
    projections = {n: b.clone() for n, b in model.named_buffers() if '.proj.' in n}
    assert len(projections) == 2 * len(model.stages)
    assert all(not p.requires_grad for p in model.buffers())
    engine = LocalLearner(model)
    optimizer = torch.optim.AdamW(param_groups(model, 1e-2, 1e-2))
    images, labels = _batch(32)
    conv_before = model.stages[0].conv.weight.clone()
    for _ in range(3):
        optimizer.zero_grad()
        engine(images, labels)['loss'].backward()
        optimizer.step()
    assert not torch.equal(conv_before, model.stages[0].conv.weight)
    for name, buffer in model.named_buffers():
        if name in projections:
            assert torch.equal(buffer, projections[name]), name

    path = tmp_path / 'model.safetensors'
    save_file(model.state_dict(), path)
    assert projections.keys() <= load_file(path).keys()
    other = timm.create_model('asge_cnn_tiny', projection_seed=5)
    assert not torch.equal(other.stages[0].proj.weight, projections['stages.0.proj.weight'])
    other.load_state_dict(load_file(path))
    for name, buffer in other.named_buffers():
        if name in projections:
            assert torch.equal(buffer, projections[name])
    # Same seed -> same projections in a fresh process or rank, so DDP ranks agree without a broadcast.
    assert torch.equal(timm.create_model('asge_cnn_tiny').stages[2].proj.weight, projections['stages.2.proj.weight'])


@pytest.mark.parametrize('channels,grid', [(64, 8), (128, 4), (256, 2), (512, 1)])
def test_goodness_length(channels, grid):
    """(d) The goodness vector has C_l * P_l**2 entries (authors' C_L = 512)."""
    assert grid_size(channels, 512) == grid
    y = torch.rand(2, channels, 32, 32)
    g = spatial_goodness(y, grid)
    assert g.shape == (2, channels * grid ** 2)
    # Each entry is the mean of y**2 over its cell, channel-major.
    cell = 32 // grid
    torch.testing.assert_close(g[:, 0], y[:, 0, :cell, :cell].square().mean(dim=(-1, -2)))
    torch.testing.assert_close(g[:, grid ** 2], y[:, 1, :cell, :cell].square().mean(dim=(-1, -2)))
    model = timm.create_model('asge_vgg11_w64')
    assert [b.proj.in_features for b in model.stages][:4] == [64 * 64, 128 * 16, 256 * 4, 256 * 4]


def test_grid_rounding_and_alpha():
    assert grid_size(96, 512) == 5
    assert grid_size(1024, 512) == 1
    assert grid_size(128, 512, alpha=0.5) == 2


def test_rms_helpers():
    x = torch.randn(3, 4, 8, 8) * 5
    normed = rms_norm(x)
    torch.testing.assert_close(normed.square().mean(dim=(1, 2, 3)), torch.ones(3), rtol=1e-4, atol=1e-4)
    y = torch.rand(1, 1, 2, 2)
    torch.testing.assert_close(rms_pool2d(y).flatten(), y.square().mean().sqrt().reshape(1), rtol=1e-5, atol=1e-5)


def test_fusion_read_out_starts_as_the_authors_per_block_heads():
    # Their read-out is one Kaiming-normal, zero-bias Linear(C_l, N) per block; ours is one Linear over the
    # concatenation, so each block's columns must have their own head's spread, sqrt(2 / C_l), here and after a reset.
    torch.manual_seed(0)
    model = timm.create_model('asge_cnn')

    def column_spreads():
        weight, start, spreads = model.head.fc.weight, 0, []
        for width in model.widths[model.fusion_start:]:
            spreads.append((weight[:, start:start + width].std().item(), (2 / width) ** 0.5))
            start += width
        assert start == weight.shape[1]
        return spreads

    for got, expected in column_spreads():
        assert got == pytest.approx(expected, rel=0.1)
    assert not model.head.fc.bias.any()
    model.reset_classifier(100)
    for got, expected in column_spreads():
        assert got == pytest.approx(expected, rel=0.05)
    assert not model.head.fc.bias.any()

    # head_init_scale multiplies that init (timm's ConvNeXt has the same knob); initial weights only, so it is no
    # architecture option for config.json (a run's results.json records it with the recipe).
    torch.manual_seed(0)
    scaled = timm.create_model('asge_cnn', head_init_scale=0.25)
    torch.manual_seed(0)
    torch.testing.assert_close(scaled.head.fc.weight, timm.create_model('asge_cnn').head.fc.weight * 0.25)
    assert 'head_init_scale' not in scaled.architecture_args()
    for bad in (-1, float('nan'), float('inf'), True, '0.1'):
        with pytest.raises(ValueError, match=f'head_init_scale must be a finite number >= 0, got {bad!r}'):
            timm.create_model('asge_cnn_tiny', head_init_scale=bad)

    # The same init wherever a read-out is built anew: after a reset (keeping the scale), after pruning blocks
    # (on the model's dtype), and once per pooling for a concatenating pool.
    scaled.reset_classifier(10)
    spread = scaled.head.fc.weight[:, :256].std().item()
    assert spread == pytest.approx(0.25 * (2 / 256) ** 0.5, rel=0.15)
    tiny = timm.create_model('asge_cnn_tiny').to(torch.bfloat16)  # widths 32, 64, 64, 128
    tiny.prune_intermediate_layers([2], prune_head=False)  # keeps blocks 0-2: read-out over 64 + 64 columns
    assert tiny.head.fc.weight.dtype == torch.bfloat16 and tiny.head.fc.weight.shape == (10, 128)
    assert not tiny.head.fc.bias.any()
    catavgmax = timm.create_model('asge_cnn', global_pool='catavgmax').head.fc
    assert catavgmax.in_features == 2 * 2560 and not catavgmax.bias.any()
    for start in (0, 2560):  # block 2's columns of the average and of the max pooling
        assert catavgmax.weight[:, start:start + 256].std().item() == pytest.approx((2 / 256) ** 0.5, rel=0.1)


def test_fusion_read_out_trains_as_the_authors_summed_heads():
    # Their read-out: one Linear(C_l, N) per fused block (own bias), logits summed, one AdamW. Ours: one Linear over
    # the concatenation with param_groups' head groups. Same logits after every AdamW step, decay included.
    torch.manual_seed(0)
    model = timm.create_model('asge_cnn_tiny', num_classes=5).double()  # fused blocks: widths 64, 64, 128
    widths = model.widths[model.fusion_start:]
    heads = torch.nn.ModuleList(torch.nn.Linear(w, 5).double() for w in widths)
    with torch.no_grad():
        for head, start, width in zip(heads, [0, 64, 128], widths):
            head.weight.copy_(model.head.fc.weight[:, start:start + width])
            head.bias.zero_()
    theirs = torch.optim.AdamW(heads.parameters(), lr=1e-2, weight_decay=0.1)
    ours = torch.optim.AdamW([g for g in param_groups(model, 1e-2, 0.1) if g['name'].startswith('head')])
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        features = torch.rand(16, sum(widths), generator=g, dtype=torch.float64)
        labels = torch.randint(0, 5, (16,), generator=g)
        chunks = features.split(widths, dim=1)
        for optimizer, logits in ((theirs, lambda: sum(h(c) for h, c in zip(heads, chunks))),
                                  (ours, lambda: model.head.fc(features))):
            optimizer.zero_grad()
            F.cross_entropy(logits(), labels).backward()
            optimizer.step()
        with torch.no_grad():
            torch.testing.assert_close(model.head.fc(features), sum(h(c) for h, c in zip(heads, chunks)))
    assert model.head.fc.bias.abs().sum() > 0  # the biases did move


def test_best_runs_only_k_blocks():
    """(e) `best` at block k runs blocks 0..k and no later block."""
    model = _tiny().eval()
    calls = []
    for i, block in enumerate(model.stages):
        block.conv.register_forward_hook(lambda m, inp, out, i=i: calls.append(i))
    x = torch.rand(2, 1, 16, 16)
    model.set_prediction('best', best_block=1)
    logits = model(x)
    assert calls == [0, 1]
    y = model.stages[1].features(model.stages[0](model.stem(x)))
    torch.testing.assert_close(logits, model.stages[1].scores(y))
    calls.clear()
    model.set_prediction('last')
    model(x)
    assert calls == [0, 1, 2, 3]


def test_best_block_travels_in_the_architecture_args_not_the_weights():
    """One source of truth: the constructor argument, which architecture_args (config.json) hands back."""
    model = _tiny()
    model.set_prediction('best', best_block=2)
    args = model.architecture_args()
    assert args['prediction'] == 'best' and args['best_block'] == 2
    assert not any('best' in key for key in model.state_dict())
    restored = timm.create_model('asge_cnn_tiny', **args)
    restored.load_state_dict(model.state_dict())
    assert restored.prediction == 'best' and restored.read_block == 2
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(restored.eval()(x), model.eval()(x))
    # Loading weights leaves the choice alone; a negative index counts from the end.
    fresh = timm.create_model('asge_cnn_tiny', prediction='best', best_block=-1)
    fresh.load_state_dict(model.state_dict())
    assert fresh.best_block == 3 and fresh.read_block == 3


def test_backprop_mode_is_end_to_end_training_of_the_fusion_read_out():
    """`backprop` gives the gradients of cross_entropy(model(x), y) with fusion; a gradient crosses the blocks."""
    images, labels = _batch(16)
    model = _tiny(drop_rate=0.0)
    out = LocalLearner(model, 'backprop')(images, labels)
    out['loss'].backward()
    backprop = _grads(model)
    torch.testing.assert_close(out['loss'], out['fusion_loss'])
    assert out['block_losses'].shape == (4,) and not out['block_losses'].requires_grad
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    reference = _grads(model)
    assert backprop.keys() == reference.keys() == {n for n, _ in model.named_parameters()}
    for name in reference:
        torch.testing.assert_close(backprop[name], reference[name])
    model.zero_grad(set_to_none=True)
    LocalLearner(model, 'fused')(images, labels)['loss'].backward()
    local = _grads(model)
    for block in range(3):  # every block that feeds a later one gets a different gradient end to end
        assert not torch.allclose(local[f'stages.{block}.conv.weight'], backprop[f'stages.{block}.conv.weight'])
    torch.testing.assert_close(local['head.fc.weight'], backprop['head.fc.weight'])  # the read-out's own loss


@pytest.mark.parametrize('size', [16, 19, 22])
def test_fusion_features_average_to_each_blocks_own_average(size):
    """Pooled fusion features are each block's global average, also where down-sampling rounds an odd side down."""
    model = _tiny().eval()
    x = torch.rand(2, 1, size, size)
    pooled = model.forward_features(x).mean(dim=(2, 3))
    h, averages = model.stem(x), []
    for i, block in enumerate(model.stages):
        h = block(h)
        if i >= model.fusion_start:
            averages.append(h.mean(dim=(2, 3)))
    torch.testing.assert_close(pooled, torch.cat(averages, dim=1))
    torch.testing.assert_close(model(x), model.head.fc(torch.cat(averages, dim=1)))


def test_inference_path_is_differentiable():
    """`model(x)` is plain autograd: every parameter of the default strategy gets a gradient."""
    for prediction in ('fusion', 'last'):
        model = _tiny(prediction=prediction)
        model(torch.rand(2, 1, 16, 16)).sum().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None and not n.startswith('head.')]
        assert not missing, missing
        if prediction == 'fusion':
            assert all(p.grad is not None for p in model.parameters())


def test_torch_compile_and_export():
    model = _tiny().eval()
    x = torch.rand(2, 1, 16, 16)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))
