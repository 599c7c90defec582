"""What a run leaves behind: log.jsonl, block_accuracy.png, results.json and the Hub export of the best model."""
import json
import os
import platform
import shlex
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from safetensors.torch import load_file

from ..costs import strategy_costs
from ..engine import pick_best_block
from ..fileio import atomic_path
from ..hub import save_pretrained
from ..models import AsgeCnn
from .data import RecipeData
from .loop import accuracy_on
from .state import WRITE_ERRORS, TrainState, write_error

__all__ = ['JsonlTracker', 'describe_hardware', 'run_command', 'git_commit', 'plot_history', 'write_json',
           'cudagraph_skips', 'save_best', 'finish']


class JsonlTracker(GeneralTracker):
    """accelerate tracker writing one JSON line per ``log`` call: always available, easy to read back."""

    name = 'jsonl'
    requires_logging_directory = False

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        with self.path.open('a') as f:
            f.write(json.dumps({'config': values}) + '\n')

    def log(self, values: dict, step: Optional[int] = None, **kwargs) -> None:
        with self.path.open('a') as f:
            f.write(json.dumps({'step': step, **values}) + '\n')


def rewind_log(path: Path, step: int) -> None:
    """Drop the log records after ``step``: a run resumed from there logs those steps again."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if (json.loads(line).get('step') or 0) <= step]
        with atomic_path(path) as tmp:
            tmp.write_text(''.join(kept))


def describe_hardware(accelerator: Accelerator) -> str:
    if accelerator.device.type == 'cuda':
        device = torch.cuda.get_device_name(accelerator.device)
    else:
        device = f'{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), ' \
                 f'{torch.get_num_threads()} thread(s) per process'
    return f'{accelerator.num_processes} x {device}, torch {torch.__version__}'


def run_command(argv: List[str], script: str) -> str:
    """The command line of this run, as a user would type it again."""
    launcher = 'accelerate launch' if 'ACCELERATE_MIXED_PRECISION' in os.environ else 'python'  # set by the launcher
    return shlex.join([*launcher.split(), script, *argv])


def git_commit() -> Optional[str]:
    """HEAD's hash; where the checkout came without .git (the GPU machine), ``$TIMM_ASGE_COMMIT``."""
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=Path(__file__).parent, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get('TIMM_ASGE_COMMIT') or None


def cudagraph_skips(device: torch.device, compile_mode: Any, since: int = 0) -> Optional[int]:
    """Compiled graphs that ran without the CUDA graphs their mode asked for (None: none asked for).

    Inductor falls back silently and such a graph is launch-bound again, so the recipe reports it.
    """
    if device.type != 'cuda' or compile_mode not in ('reduce-overhead', 'max-autotune'):
        return None
    import torch._dynamo.utils  # the counters inductor bumps on every fallback
    return int(torch._dynamo.utils.counters['inductor']['cudagraph_skips']) - since


def plot_history(history: List[Dict[str, Any]], path: Path, num_blocks: int) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    epochs = [h['epoch'] + 1 for h in history]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for b in range(num_blocks):
        ax.plot(epochs, [100 * h['val_block_acc'][b] for h in history], label=f'block {b + 1}', marker='.')
    ax.plot(epochs, [100 * h['val_fusion_acc'] for h in history], label='fusion', color='black', lw=2)
    ax.set(xlabel='epoch', ylabel='validation accuracy (%)', title='ASGE per-block validation accuracy')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=120)
    plt.close(fig)


def write_json(path: Path, payload: Dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + '\n')


def save_best(model: AsgeCnn, out: Path, label_names: List[str]) -> None:
    """Export the best-validation model so far to ``out/best`` (in timm's Hub format, as the final export)."""
    try:
        save_pretrained(model, out / 'best', label_names=label_names)
    except WRITE_ERRORS as err:
        raise write_error(err, out / 'best') from None


def finish(
        accelerator: Accelerator,
        config: Dict[str, Any],
        out: Path,
        model: AsgeCnn,
        state: TrainState,
        data: RecipeData,
        run: Dict[str, Any],
) -> Dict[str, Any]:
    """Reload the best-validation weights, choose ``best``, test every strategy, write results.json and the export.

    Block numbers in results.json count from 1, as on the console (``best_block``).
    """
    model.load_state_dict(load_file(str(out / 'best' / 'model.safetensors')))
    best_index = pick_best_block(state.best_val['blocks'])
    model.set_prediction(model.prediction, best_block=best_index)
    test_acc = accuracy_on(accelerator, model, data.eval_batches('test'))
    accuracy = {'fusion': test_acc[-1].item(), 'last': test_acc[-2].item(), 'best': test_acc[best_index].item()}
    input_size = (config['data']['channels'], config['data']['img_size'], config['data']['img_size'])
    costs = strategy_costs(model, input_size)
    model.set_prediction(config['model']['prediction'])
    # Ranks must agree bit for bit: a cheap end-of-run proof that gradients were synchronised.
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()[None]
    data_cfg = config['data']
    results = {
        'model': config['model']['name'],
        'dataset': {'name': config['name'], 'hub_id': None if data_cfg['path'] or data_cfg['source'] == 'digits'
                    else data_cfg['source'], 'path': data_cfg['path'], 'num_classes': data.num_classes,
                    'label_names': data.label_names, 'splits': data.sizes},
        'recipe': config,
        **run,
        'hardware': describe_hardware(accelerator),
        'num_processes': accelerator.num_processes,
        'rank_weight_checksums': accelerator.gather(checksum).tolist(),
        'mode': config['train']['mode'],
        'head_init_scale': getattr(model, 'head_init_scale', None),
        'epochs': state.epoch + (1 if state.batch else 0),
        'steps': state.step,
        'train_time_s': round(state.train_time, 2),
        'step_time_s': round(state.step_time, 2),
        'best_epoch': state.best_epoch + 1,
        'best_block': best_index + 1,
        'prediction': config['model']['prediction'],
        'val_accuracy': state.best_val,
        'test_accuracy': accuracy,
        'test_block_accuracy': test_acc[:-1].tolist(),
        'strategies': {name: {'test_accuracy': accuracy[name], **costs[name]} for name in costs},
        'history': state.history,
    }
    if accelerator.is_main_process:
        try:
            save_pretrained(model, out / 'export', label_names=data.label_names)
            write_json(out / 'results.json', results)
        except WRITE_ERRORS as err:
            raise write_error(err, out) from None
        accelerator.print(
            'test accuracy: ' + ', '.join(f'{k} {100 * v:.2f}%' for k, v in accuracy.items())
            + f' (best = block {best_index + 1}); results in {out / "results.json"}, model in {out / "export"}')
    accelerator.wait_for_everyone()
    return results
