"""Checkpoints the recipe can resume from exactly, mid-epoch included, and refuses when corrupt or foreign."""
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from accelerate import Accelerator
from safetensors import SafetensorError, safe_open

from ..fileio import atomic_dir
from .config import RecipeError

__all__ = ['TrainState', 'Checkpoints', 'BEST_FILES']

BEST_FILES = ('config.json', 'model.safetensors')  # what the Hub export writes into out/best


class TrainState:
    """Counters and history saved with every checkpoint (``register_for_checkpointing``)."""

    def __init__(self):
        self.epoch, self.batch, self.step = 0, 0, 0
        self.best_metric, self.best_epoch = -1.0, -1
        self.best_val: Dict[str, Any] = {}  # validation accuracy of the best epoch's weights: blocks, fusion
        self.history: List[Dict[str, Any]] = []
        self.train_time = 0.0  # wall clock of the run, evaluation and checkpoints included
        self.step_time = 0.0  # training steps alone: what the speed figures use

    def state_dict(self) -> Dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        vars(self).update(state)


class Checkpoints:
    """``out/checkpoints/step_<N>``: accelerate's state plus the best model as of that step (``best/``)."""

    def __init__(self, accelerator: Accelerator, out: Path, keep: int):
        self.accelerator, self.out, self.keep = accelerator, out, keep
        self.folder = out / 'checkpoints'
        self.last = self.latest()

    def latest(self) -> Optional[Path]:
        found = sorted(self.folder.glob('step_*'))
        return found[-1] if found else None

    def save(self, state: TrainState) -> None:
        """``save_state`` into a temporary folder, then rename: a crash never leaves a half-written checkpoint."""
        acc, final = self.accelerator, self.folder / f'step_{state.step:08d}'
        tmp = final.with_name(f'.tmp_{final.name}')
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if (self.out / 'best').is_dir():  # outside accelerate's state; a resume puts it back (see resume)
                _link_files(self.out / 'best', tmp / 'best')
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in sorted(self.folder.glob('step_*'))[:-self.keep]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        self.last = final

    def find(self, resume: str) -> Path:
        """The checkpoint ``--resume`` names: ``latest`` or one of this output folder's ``step_*``."""
        if resume == 'latest':
            if self.last is None:
                raise RecipeError(f'--resume found no checkpoint in {self.folder}; train without --resume')
            return self.last
        path = Path(resume)
        if not (path / 'model.safetensors').is_file():
            raise RecipeError(f'--resume {path} is not a checkpoint (a folder holding model.safetensors); pass '
                              f'--resume alone for the latest one in output_dir')
        if path.resolve().parent != self.folder.resolve():  # its best model, history and results live elsewhere
            raise RecipeError(f'--resume {path} is not a checkpoint of output_dir {self.out}; pass '
                              f'output_dir={path.resolve().parent.parent}')
        return path

    def resume(self, ckpt: Path, num_custom: int) -> None:
        """Load ``ckpt`` into the prepared objects and put back its best model, after checking every file."""
        _check_files(ckpt, num_custom)
        best = self.out / 'best'
        foreign = sorted(p.name for p in best.iterdir() if p.name not in BEST_FILES) if best.is_dir() else []
        if foreign:
            raise RecipeError(f'{best} holds {", ".join(foreign)}, which resuming would delete; move them out and '
                              f'resume again')
        try:
            self.accelerator.load_state(str(ckpt))
        except (ValueError, RuntimeError, KeyError) as err:  # shapes, parameter groups or state keys differ
            raise RecipeError(f'cannot resume from {ckpt}: it does not fit this run\'s model and optimizer ({err}); '
                              f'resume with the same config, or train into a new output_dir') from None
        except (SafetensorError, pickle.UnpicklingError, EOFError, OSError) as err:
            # torch's refusal suggests weights_only=False, which must never be followed for a damaged file.
            raise _corrupt(ckpt, type(err).__name__) from None
        # Without this, a run resumed from an earlier checkpoint could end with a later, abandoned epoch's best.
        if self.accelerator.is_main_process and (ckpt / 'best').is_dir():
            with atomic_dir(best, BEST_FILES) as tmp:
                _link_files(ckpt / 'best', tmp)
        self.accelerator.wait_for_everyone()
        self.last = ckpt


def _check_files(ckpt: Path, num_custom: int) -> None:
    """Refuse a checkpoint with a missing or damaged file, naming it, before accelerate reads anything.

    Every process checks every file (random states of all ranks included), so all stop alike. Torch files are zip
    archives whose checksums are tested here; nothing is unpickled.
    """
    files = [ckpt / 'model.safetensors', ckpt / 'optimizer.bin', *sorted(ckpt.glob('random_states_*.pkl')),
             *(ckpt / f'custom_checkpoint_{i}.pkl' for i in range(num_custom)),
             *((ckpt / 'best' / name for name in BEST_FILES) if (ckpt / 'best').is_dir() else ())]
    for path in files:
        try:
            if path.suffix == '.safetensors':
                with safe_open(path, framework='pt'):
                    pass
            elif path.suffix == '.json':
                json.loads(path.read_text(encoding='utf-8'))
            else:
                with zipfile.ZipFile(path) as archive:
                    if archive.testzip() is not None:
                        raise zipfile.BadZipFile('a member fails its checksum')
        except FileNotFoundError:
            raise _corrupt(ckpt, f'{path.relative_to(ckpt)}: missing') from None
        except (zipfile.BadZipFile, EOFError, SafetensorError, OSError, ValueError) as err:
            raise _corrupt(ckpt, f'{path.relative_to(ckpt)}: {err or type(err).__name__}') from None


def _corrupt(ckpt: Path, detail: str) -> RecipeError:
    return RecipeError(f'cannot resume from {ckpt}: the checkpoint is corrupt or incomplete ({detail}). Resume from an '
                       f'earlier one (--resume {ckpt.parent}/step_...) or train into a new output_dir')


def _link_files(src: Path, dst: Path) -> None:
    """Hard-link (or, across file systems, copy) every file of ``src`` into ``dst``: out/best is never written in
    place, only replaced, so links are safe."""
    dst.mkdir(exist_ok=True)
    for path in src.iterdir():
        try:
            os.link(path, dst / path.name)
        except OSError:
            shutil.copy2(path, dst / path.name)
