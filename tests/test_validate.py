"""recipes/validate.py: a saved model tested on a config's data, its figures and its refusals."""
import json

import pytest
import timm
import torch

from conftest import ROOT, load_script
from timm_asge.data import load_tensors, to_model_input
from timm_asge.hub import save_pretrained
from timm_asge.recipe import RecipeError

validate = load_script('validate')

DIGITS = str(ROOT / 'recipes' / 'configs' / 'digits.yaml')
DIGIT_NAMES = [str(i) for i in range(10)]


def _saved(folder, label_names=DIGIT_NAMES, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model('asge_cnn_tiny', **kwargs).eval()
    save_pretrained(model, folder, label_names=label_names)
    return model


def test_untrained_model_figures_are_its_own_predictions(tmp_path):
    """Every block's and the read-out's accuracy are what the model predicts; `best` is only what training chose."""
    model = _saved(tmp_path / 'model')
    test = load_tensors('digits', 'test', 16, 1)
    expected = []
    with torch.no_grad():
        for prediction, block in [('best', i) for i in range(len(model.stages))] + [('fusion', None)]:
            model.set_prediction(prediction, best_block=block)
            expected.append((model(to_model_input(test.images)).argmax(1) == test.labels).double().mean().item())

    results = validate.main(['--model', f'local-dir:{tmp_path / "model"}', '--config', DIGITS,
                             'train.eval_batch_size=64', '--out', str(tmp_path / 'out.json')])
    assert results['test_block_accuracy'] == pytest.approx(expected[:-1], abs=1e-12)
    assert results['test_accuracy']['fusion'] == pytest.approx(expected[-1], abs=1e-12)
    assert results['test_accuracy']['last'] == results['test_block_accuracy'][-1]
    assert results['test_accuracy']['best'] is None and results['best_block'] is None  # never chosen on the test set
    assert set(results['strategies']) == {'fusion', 'last'}
    assert json.loads((tmp_path / 'out.json').read_text())['test_accuracy'] == results['test_accuracy']


def test_folder_names_resolve_to_timm_names(tmp_path):
    (tmp_path / 'run').mkdir()
    _saved(tmp_path / 'run' / 'export')
    assert validate.model_source(str(tmp_path / 'run')) == f'local-dir:{tmp_path / "run" / "export"}'
    assert validate.model_source(str(tmp_path / 'run' / 'export')) == f'local-dir:{tmp_path / "run" / "export"}'
    assert validate.model_source('hf-hub:someone/model') == 'hf-hub:someone/model'
    assert validate.model_source('asge_cnn.mnist') == 'asge_cnn.mnist'


@pytest.mark.parametrize('make,args,message', [
    (dict(in_chans=3), [], 'reads 3-channel images but data.channels=1; set data.channels=3'),
    (dict(num_classes=5), [], 'has 5 classes but the dataset has 10'),
    ({}, ['data.img_size=3'], r'data.img_size=3 is too small for .*at least 4x4'),
    ({}, ['--split', 'validation'],
     r"dataset 'digits' has no split 'validation'; it has \['test', 'train'\]. Pass one of them to --split$"),
    ({}, ['data.test_split=validation'], r"no split 'validation'.*--split$"),
    ({}, ['data.colour=1'], "unknown config key 'data.colour'"),
    ({}, ['data.in_memory=false'], r"bundled 'digits' dataset is held in memory only; set data.in_memory=true"),
    ({}, ['--out', '/'], r'--out / is a folder; pass a file path such as /results.json$'),
    ({}, ['train.eval_batch_size=0'], 'train.eval_batch_size=0 must be'),
    ({}, ['data.img_size=abc'], "data.img_size='abc' must be"),
    ({}, ['train.mixed_precision=fp8'], "train.mixed_precision='fp8'; choose one of"),
])
def test_a_model_that_does_not_fit_the_data_stops_with_what_to_change(tmp_path, make, args, message):
    _saved(tmp_path / 'model', label_names=None, **make)
    with pytest.raises(RecipeError, match=message):
        validate.main(['--model', str(tmp_path / 'model'), '--config', DIGITS, *args])


def test_missing_or_corrupt_models_stop_with_a_message(tmp_path):
    with pytest.raises(RecipeError, match="someone/model is no folder holding config.json.*hf-hub:someone/model"):
        validate.main(['--model', 'someone/model', '--config', DIGITS])
    with pytest.raises(RecipeError, match="no config file 'nope.yaml'"):
        validate.main(['--model', 'someone/model', '--config', 'nope.yaml'])
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty.json').write_text('{}')
    with pytest.raises(RecipeError, match='empty.json is no folder holding config.json'):
        validate.main(['--model', str(tmp_path / 'empty.json'), '--config', DIGITS])
    with pytest.raises(RecipeError, match='is no folder holding config.json'):
        validate.main(['--model', str(tmp_path / 'empty'), '--config', DIGITS])
    _saved(tmp_path / 'model')
    (tmp_path / 'model' / 'model.safetensors').write_bytes(b'not safetensors')
    with pytest.raises(RecipeError, match='model.safetensors'):
        validate.main(['--model', str(tmp_path / 'model'), '--config', DIGITS])


def test_other_class_names_are_noted(tmp_path, capsys):
    _saved(tmp_path / 'model', label_names=[f'c{i}' for i in range(10)])
    validate.main(['--model', str(tmp_path / 'model'), '--config', DIGITS])
    out = capsys.readouterr().out
    assert "trained with class names ['c0', 'c1', 'c2', 'c3']..., the dataset has ['0', '1', '2', '3']" in out


def test_a_model_that_cannot_read_the_images_stops_before_any_data_is_decoded(tmp_path, monkeypatch):
    _saved(tmp_path / 'model', in_chans=3)
    monkeypatch.setattr(validate, 'load_split', lambda *args: pytest.fail('decoded the data first'))
    with pytest.raises(RecipeError, match='reads 3-channel images'):
        validate.main(['--model', str(tmp_path / 'model'), '--config', DIGITS])
