"""The README stays true: its engine example runs and learns, and CI runs exactly its test command."""
import re

import torch

from conftest import ROOT
from timm_asge.data import load_tensors

README = (ROOT / 'README.md').read_text()


def _code_after(heading: str, lang: str) -> str:
    section = README[README.index(heading):]
    return re.search(rf'```{lang}\n(.*?)```', section, flags=re.S).group(1)


def test_engine_example_learns_digits_with_every_strategy():
    """The engine alone (no recipe) teaches asge_cnn_tiny real handwritten digits (scikit-learn's 8x8 digits at
    16x16): every prediction strategy reaches 90% on the held-out test images (seeds 0-2: 93.0-98.3%)."""
    namespace = {}
    torch.manual_seed(0)
    exec(compile(_code_after('### Train with the engine', 'python'), 'README.md', 'exec'), namespace)
    model, to_model_input = namespace['model'], namespace['to_model_input']
    assert model.best_block is not None  # set by the example's choose_best_block on the validation images
    test = load_tensors('digits', 'test', 16, 1)
    model.eval()
    accuracy = {}
    for strategy in ('fusion', 'last', 'best'):
        model.set_prediction(strategy)
        with torch.no_grad():
            accuracy[strategy] = (model(to_model_input(test.images)).argmax(1) == test.labels).float().mean().item()
    assert min(accuracy.values()) >= 0.90, accuracy


def test_ci_runs_the_readme_test_command():
    quickstart = README[README.index('## Quick start'):README.index('### Use a model')]
    commands = re.findall(r'```bash\n(.*?)\n```', quickstart, flags=re.S)
    assert len(commands) == 2, commands
    setup_and_main_job, tests = commands
    assert 'recipes/configs/digits.yaml' in setup_and_main_job
    ci = (ROOT / '.ci' / 'run').read_text().splitlines()
    assert tests in ci, f'.ci/run must run the README test command {tests!r}'
