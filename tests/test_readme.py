"""The README stays true: its engine example runs and learns, and CI runs exactly its test command."""
import re

import torch

from conftest import ROOT

README = (ROOT / 'README.md').read_text()


def _code_after(heading: str, lang: str) -> str:
    section = README[README.index(heading):]
    return re.search(rf'```{lang}\n(.*?)```', section, flags=re.S).group(1)


def test_engine_example_trains_and_chooses_best():
    namespace = {}
    torch.manual_seed(0)
    exec(compile(_code_after('### Train with the engine', 'python'), 'README.md', 'exec'), namespace)
    model, val = namespace['model'], namespace['val']
    assert model.best_index is not None
    model.set_prediction('best')
    model.eval()
    with torch.no_grad():
        accuracy = (model(namespace['to_model_input'](val.images)).argmax(1) == val.labels).float().mean().item()
    assert accuracy > 0.9


def test_ci_runs_the_readme_test_command():
    quickstart = README[README.index('## Quick start'):README.index('### Use a model')]
    commands = re.findall(r'```bash\n(.*?)\n```', quickstart, flags=re.S)
    assert len(commands) == 2, commands
    setup_and_main_job, tests = commands
    assert 'recipes/configs/digits.yaml' in setup_and_main_job
    ci = (ROOT / '.ci' / 'run').read_text().splitlines()
    assert tests in ci, f'.ci/run must run the README test command {tests!r}'
