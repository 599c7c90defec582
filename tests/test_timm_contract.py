"""timm's generic model contract, copied from timm's own ``tests/test_models.py`` (test_model_default_cfgs,
test_model_features, forward_intermediates), run over every registered ``asge_*`` model."""
import pytest
import torch
import timm

import timm_asge  # noqa: F401  (registers the models)

MODELS = timm.list_models('asge*')
# The ImageNet network at 224x224 is slow on a 2-core CPU; check it at its smallest valid size instead.
SMALL_INPUT = {'asge_vgg11_w64': (3, 64, 64)}


def _input_size(name, model):
    return SMALL_INPUT.get(name, model.pretrained_cfg['input_size'])


def test_models_registered():
    assert {'asge_cnn', 'asge_cnn_tiny', 'asge_vgg11', 'asge_vgg11_w64'} <= set(MODELS)
    assert timm.list_models(module='asge_cnn') == MODELS
    # No checkpoint is published yet: no name may claim weights, and no tag exists.
    assert timm.list_models('asge*', pretrained=True) == []
    with pytest.raises(RuntimeError, match='tag'):
        timm.create_model('asge_cnn.mnist')


def test_unpublished_weights_are_refused_and_exports_load(tmp_path):
    with pytest.raises(RuntimeError, match='No pretrained weights exist for asge_cnn'):  # timm's own refusal
        timm.create_model('asge_cnn', pretrained=True)
    # An export written by timm's save_for_hf loads, weights and strategy included.
    model = timm.create_model('asge_cnn_tiny', prediction='best', best_block=1).eval()
    timm.models.save_for_hf(model, tmp_path, model_args=model.architecture_args(), safe_serialization=True)
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert loaded.prediction == 'best' and loaded.best_block == 1
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize('name', MODELS)
@torch.no_grad()
def test_model_default_cfgs(name):
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    state_dict = model.state_dict()
    in_chans, *img = _input_size(name, model)
    pool_size = cfg['pool_size'] if name not in SMALL_INPUT else tuple(s * img[0] // cfg['input_size'][1]
                                                                         for s in cfg['pool_size'])
    x = torch.randn(2, in_chans, *img)

    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    assert model.in_chans == cfg['input_size'][0]

    features = model.forward_features(x)
    assert features.ndim == 4 and features.shape[1] == model.num_features
    assert tuple(features.shape[-2:]) == tuple(pool_size)
    assert model.forward_head(features, pre_logits=True).shape[1] == model.head_hidden_size
    torch.testing.assert_close(model.forward_head(features), model(x))

    model.reset_classifier(0)
    assert model.num_classes == 0
    out = model(x)
    assert out.ndim == 2 and out.shape[-1] == model.head_hidden_size
    model.reset_classifier(0, '')
    assert model(x).ndim == 4

    model = timm.create_model(name, num_classes=0, global_pool='').eval()
    assert model(x).ndim == 4

    classifiers = cfg['classifier'] if isinstance(cfg['classifier'], (tuple, list)) else (cfg['classifier'],)
    for classifier in classifiers:
        assert classifier + '.weight' in state_dict
        assert classifier + '.bias' in state_dict
    assert cfg['first_conv'] + '.weight' in state_dict


@pytest.mark.parametrize('name', MODELS)
@torch.no_grad()
def test_model_features(name):
    model = timm.create_model(name, features_only=True).eval()
    in_chans, *img = _input_size(name, model)
    outputs = model(torch.randn(2, in_chans, *img))
    assert len(outputs) == len(model.feature_info.channels())
    for out, chs, reduction in zip(outputs, model.feature_info.channels(), model.feature_info.reduction()):
        assert out.shape[1] == chs
        assert out.shape[-1] == img[-1] // reduction


@pytest.mark.parametrize('name', MODELS)
@torch.no_grad()
def test_model_forward_intermediates(name):
    model = timm.create_model(name).eval()
    in_chans, *img = _input_size(name, model)
    x = torch.randn(2, in_chans, *img)
    features, intermediates = model.forward_intermediates(x)
    torch.testing.assert_close(features, model.forward_features(x))
    assert len(intermediates) == len(model.feature_info)
    for out, info in zip(intermediates, model.feature_info):
        assert out.shape[1] == info['num_chs'] and out.shape[-1] == img[-1] // info['reduction']
    only = model.forward_intermediates(x, indices=2, intermediates_only=True, stop_early=True)
    for a, b in zip(only, intermediates[-2:]):
        torch.testing.assert_close(a, b)
    model.prune_intermediate_layers(indices=[1])
    assert len(model.stages) == 2
    assert model(x).shape[1] == model.widths[1]



def test_pruned_network_reads_the_images_its_blocks_can():
    """Two blocks of asge_cnn need 4x4 images, not the whole network's 16x16 (timm's getter features prune)."""
    assert timm.create_model('asge_cnn').min_input_size == 16
    model = timm.create_model('asge_cnn', features_only=True, feature_cls='getter', out_indices=(0, 1)).eval()
    with torch.no_grad():
        features = model(torch.rand(1, 3, 4, 4))
    assert [f.shape[1:] for f in features] == [(128, 4, 4), (256, 2, 2)]


@pytest.mark.parametrize('name', MODELS)
def test_model_api(name):
    model = timm.create_model(name)
    matcher = model.group_matcher()
    assert matcher['stem'] == r'^stem' and 'blocks' in matcher
    groups = timm.models.group_parameters(model, matcher)
    assert len(groups) >= len(model.stages)
    assert model.get_classifier() is model.head.fc
    assert model.default_cfg is model.pretrained_cfg or model.default_cfg == model.pretrained_cfg
    model.set_grad_checkpointing(True)
    in_chans, *img = _input_size(name, model)
    x = torch.randn(2, in_chans, *img)
    model.eval()
    with_ckpt = model(x)
    model.set_grad_checkpointing(False)
    torch.testing.assert_close(with_ckpt, model(x))


def test_create_variants():
    model = timm.create_model('asge_cnn', num_classes=100, in_chans=3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    model = timm.create_model('asge_cnn', in_chans=1, prediction='last')
    assert model.prediction == 'last'
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    features = timm.create_model('asge_cnn', features_only=True, out_indices=(1, 3))
    outs = features(torch.randn(1, 3, 32, 32))
    assert [o.shape[1] for o in outs] == [256, 512]
