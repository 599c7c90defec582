"""Every mistake a user can make with a model or the engine stops with a message naming the problem."""
import pytest
import torch
import timm

from timm_asge import LocalLearner


def test_wrong_channel_count():
    model = timm.create_model('asge_cnn', in_chans=1)
    with pytest.raises(ValueError, match=r'1-channel images but got 3 channels.*in_chans=3'):
        LocalLearner(model)(torch.rand(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))


def test_integer_images_say_how_to_convert():
    model = timm.create_model('asge_cnn_tiny')
    images = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r'float batch .*got torch.uint8.*images.float\(\) / 255'):
        LocalLearner(model)(images, torch.zeros(2, dtype=torch.long))
    assert model(images.float() / 255).shape == (2, 10)


def test_image_too_small_for_the_depth():
    model = timm.create_model('asge_cnn')
    assert model.min_input_size == 16
    for side in (8, 12):
        with pytest.raises(ValueError, match=rf'{side}x{side} are too small.*at least 16x16'):
            LocalLearner(model)(torch.rand(1, 3, side, side), torch.zeros(1, dtype=torch.long))
    assert model(torch.rand(1, 3, 16, 16)).shape == (1, 10)


def test_labels_out_of_range():
    model = timm.create_model('asge_cnn_tiny', num_classes=5)
    engine = LocalLearner(model)
    with pytest.raises(ValueError, match=r'labels \[7\] lie outside \[0, 5\)'):
        engine(torch.rand(3, 1, 16, 16), torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match=r'labels \[-1\] lie outside'):
        engine(torch.rand(2, 1, 16, 16), torch.tensor([-1, 1]))


def test_labels_that_are_not_class_indices():
    engine = LocalLearner(timm.create_model('asge_cnn_tiny'))
    images = torch.rand(4, 1, 16, 16)
    with pytest.raises(ValueError, match=r'integer tensor of shape \(4,\), got torch.float32 of shape \(4, 10\); '
                                         r'pass labels.argmax\(1\)'):
        engine(images, torch.eye(10)[:4])
    # Integer one-hot labels (torch.nn.functional.one_hot) are argmax-ed too: reshaping would give B x C labels.
    with pytest.raises(ValueError, match=r'got torch.int64 of shape \(4, 10\); pass labels.argmax\(1\)'):
        engine(images, torch.nn.functional.one_hot(torch.arange(4), 10))
    with pytest.raises(ValueError, match=r'got torch.int64 of shape \(4, 2, 5\); pass one class index per image$'):
        engine(images, torch.zeros(4, 2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r'got torch.float32 of shape \(4,\); pass labels.reshape\(-1\).long\(\)'):
        engine(images, torch.zeros(4))
    # A column of integer labels is reshaped, not argmax-ed (which would make every label 0).
    with pytest.raises(ValueError, match=r'got torch.int64 of shape \(4, 1\); pass labels.reshape\(-1\)'):
        engine(images, torch.tensor([[3], [1], [7], [2]]))
    with pytest.raises(ValueError, match=r'got torch.int64 of shape \(\); pass one class index per image$'):
        engine(images, torch.tensor(3))
    with pytest.raises(ValueError, match=r'shape \(4,\), got torch.int64 of shape \(3,\)'):
        engine(images, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r'labels \[300\] lie outside \[0, 10\)'):
        engine(images, torch.tensor([0, 300, 9, 1], dtype=torch.uint16))
    # Other integer labels (uint8 from a tensor dataset, int32 from numpy, uint16 for many classes) give the int64
    # result.
    labels = torch.tensor([0, 3, 9, 1])
    torch.manual_seed(0)
    expected = engine(images, labels)['block_losses']
    for dtype in (torch.uint8, torch.int32, torch.uint16, torch.uint64):
        torch.manual_seed(0)
        assert torch.equal(engine(images, labels.to(dtype))['block_losses'], expected)


def test_unknown_names():
    with pytest.raises(ValueError, match=r"unknown pool_type 'max'; choose one of 'rms', 'avg'"):
        timm.create_model('asge_cnn_tiny', pool_type='max')
    with pytest.raises(ValueError, match=r"unknown prediction strategy 'mean'; choose one of 'fusion', 'last', 'best'"):
        timm.create_model('asge_cnn_tiny', prediction='mean')
    with pytest.raises(ValueError, match="unknown engine mode 'fast'"):
        LocalLearner(timm.create_model('asge_cnn_tiny'), mode='fast')
    with pytest.raises(ValueError, match='downsample has 2 entries but widths has 3'):
        timm.create_model('asge_cnn_tiny', widths=[8, 8, 8], downsample=[True, False])
    with pytest.raises(ValueError, match='best_block=9 is not a block index'):
        timm.create_model('asge_cnn_tiny').set_prediction('best', best_block=9)


def test_best_before_a_block_was_chosen():
    model = timm.create_model('asge_cnn_tiny')
    with pytest.raises(ValueError, match=r"'best' needs a chosen block.*choose_best_block"):
        model.set_prediction('best')
    with pytest.raises(ValueError, match="'best' needs a chosen block"):
        timm.create_model('asge_cnn_tiny', prediction='best')
    assert model.prediction == 'fusion'  # a refused switch leaves the model as it was


def test_unpooled_read_out_with_classes():
    # timm's own ClassifierHead would fail inside its Linear with a bare shape mismatch.
    model = timm.create_model('asge_cnn_tiny', global_pool='')
    with pytest.raises(ValueError, match="global_pool='' leaves the fusion features unpooled"):
        LocalLearner(model)
    assert model.forward_head(model.forward_features(torch.rand(2, 1, 16, 16)), pre_logits=True).ndim == 4
    model.reset_classifier(0)
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 256, 4, 4)
