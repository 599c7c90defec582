"""The README stays true: its examples run and give the right answers, and CI runs exactly its test command."""
import re

import pytest
import torch
from PIL import Image
from timm.models import save_for_hf

from conftest import ROOT
from timm_asge.data import load_tensors, to_model_input

README = (ROOT / 'README.md').read_text()


def _code_after(heading: str, lang: str) -> str:
    section = README[README.index(heading):]
    return re.search(rf'```{lang}\n(.*?)```', section, flags=re.S).group(1)


@pytest.fixture(scope='module')
def engine_example():
    """Runs the README's engine example once; returns its namespace (model, to_model_input, ...)."""
    namespace = {}
    torch.manual_seed(0)
    exec(compile(_code_after('### Train with the engine', 'python'), 'README.md', 'exec'), namespace)
    return namespace


def test_engine_example_learns_digits_with_every_strategy(engine_example):
    """The engine alone (no recipe) teaches asge_cnn_tiny real handwritten digits (scikit-learn's 8x8 digits at
    16x16): every prediction strategy reaches 90% on the held-out test images (seeds 0-2: 93.0-98.3%)."""
    model = engine_example['model']
    assert model.best_block is not None  # set by the example's choose_best_block on the validation images
    test = load_tensors('digits', 'test', 16, 1)
    model.eval()
    accuracy = {}
    for strategy in ('fusion', 'last', 'best'):
        model.set_prediction(strategy)
        with torch.no_grad():
            accuracy[strategy] = (model(to_model_input(test.images)).argmax(1) == test.labels).float().mean().item()
    assert min(accuracy.values()) >= 0.90, accuracy


def test_use_a_model_snippet_predicts_like_the_training_pipeline(engine_example, tmp_path, capsys):
    """The README's prediction snippet (timm's transform from the model's pretrained_cfg, a PIL image) gives the
    same label as the model on the training pipeline's tensors, for an exported model loaded with local-dir:."""
    model = engine_example['model'].eval()
    model.set_prediction('fusion')
    labels = [str(i) for i in range(10)]
    save_for_hf(model, tmp_path / 'export', model_config={'label_names': labels}, safe_serialization=True)
    snippet = _code_after('### Use a model', 'python').replace('outputs/digits/export', str(tmp_path / 'export'))
    test = load_tensors('digits', 'test', 16, 1)
    with torch.no_grad():
        expected = model(to_model_input(test.images[:8])).argmax(1).tolist()
    printed = []
    for i in range(8):
        Image.fromarray(test.images[i, 0].numpy()).save(tmp_path / 'digit.png')
        exec(compile(snippet.replace('digit.png', str(tmp_path / 'digit.png')), 'README.md', 'exec'), {})
        printed.append(capsys.readouterr().out.split()[0])
    assert printed == [labels[k] for k in expected]
    assert sum(p == str(t) for p, t in zip(printed, test.labels[:8].tolist())) >= 7  # and they are right


def test_ci_runs_the_readme_test_command():
    quickstart = README[README.index('## Quick start'):README.index('### Use a model')]
    commands = re.findall(r'```bash\n(.*?)\n```', quickstart, flags=re.S)
    assert len(commands) == 2, commands
    setup_and_main_job, tests = commands
    assert 'recipes/configs/digits.yaml' in setup_and_main_job
    assert '--index-url' not in setup_and_main_job  # a fresh machine that reaches only PyPI runs it as is
    ci = (ROOT / '.ci' / 'run').read_text().splitlines()
    assert tests in ci, f'.ci/run must run the README test command {tests!r}'


def test_readme_reads_in_five_minutes():
    assert len(README.splitlines()) <= 200
