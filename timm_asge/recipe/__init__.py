"""The training recipe's reusable parts: config, data, the epoch loop, checkpoints and resume, results.

``recipes/train.py`` and ``recipes/validate.py`` are thin scripts over this package.
"""
from .config import DEFAULTS, RecipeError, load_config, resolve_auto
from .data import RecipeData, eval_batches, load_split, split_label_names
from .loop import accuracy_on, build_model, check_img_size, cosine_schedule, start_profiler, strategy_metric, \
    train_one_epoch
from .results import JsonlTracker, cudagraph_skips, describe_hardware, finish, git_commit, plot_history, \
    rewind_log, run_command, save_best, write_json
from .state import Checkpoints, TrainState, hold_output_dir

__all__ = [
    'DEFAULTS', 'RecipeError', 'load_config', 'resolve_auto', 'RecipeData', 'eval_batches', 'load_split',
    'split_label_names', 'accuracy_on', 'build_model', 'check_img_size', 'cosine_schedule', 'start_profiler',
    'strategy_metric', 'train_one_epoch', 'JsonlTracker', 'cudagraph_skips', 'describe_hardware', 'finish',
    'git_commit', 'plot_history', 'rewind_log', 'run_command', 'save_best', 'write_json', 'Checkpoints', 'TrainState',
    'hold_output_dir',
]
