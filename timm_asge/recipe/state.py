"""Checkpoints the recipe can resume from exactly, mid-epoch included, and refuses when corrupt or foreign."""
import contextlib
import errno
import fcntl
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from accelerate import Accelerator
from safetensors import SafetensorError

from ..fileio import atomic_dir, file_sha256
from .config import RecipeError

__all__ = ['TrainState', 'Checkpoints', 'BEST_FILES', 'WRITE_ERRORS', 'hold_output_dir', 'write_error']

BEST_FILES = ('config.json', 'model.safetensors')  # what the Hub export writes into out/best
MANIFEST = 'manifest.json'  # size and SHA-256 of every other file of a checkpoint, written last
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)  # torch's and safetensors' writers wrap the OSError


@contextlib.contextmanager
def hold_output_dir(out: Path, holder: bool = True) -> Iterator[None]:
    """Hold ``out`` for this run (an exclusive lock on ``out/.lock``, released when the process ends, also by a kill):
    a second run or a ``--resume`` started while this one is alive is refused instead of mixing its files in."""
    if not holder:  # one process of a multi-process run holds it for all
        yield
        return
    with open(out / '.lock', 'a') as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RecipeError(f'{out} is in use by another run; wait for it to end, or pass another '
                              f'output_dir=<folder>') from None
        yield


class TrainState:
    """Counters and history saved with every checkpoint (``register_for_checkpointing``)."""

    def __init__(self):
        self.epoch, self.batch, self.step = 0, 0, 0
        self.best_metric, self.best_epoch = -1.0, -1
        self.best_val: Dict[str, Any] = {}  # validation accuracy of the best epoch's weights: blocks, fusion
        self.history: List[Dict[str, Any]] = []
        self.train_time = 0.0  # wall clock of the run, evaluation and checkpoints included
        self.step_time = 0.0  # training steps alone: what the speed figures use
        # The epoch's training counts so far, all processes', kept by mid-epoch checkpoints for the epoch's accuracy.
        self.epoch_correct: List[int] = []
        self.epoch_seen = 0

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
        """``save_state`` into a temporary folder, then the manifest, then rename: a crash never leaves a half-written
        checkpoint, and resume notices any file that went missing or changed since."""
        acc, final = self.accelerator, self.folder / f'step_{state.step:08d}'
        tmp = final.with_name(f'.tmp_{final.name}')
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
            acc.wait_for_everyone()
            if acc.is_main_process:
                if (self.out / 'best').is_dir():  # outside accelerate's state; a resume puts it back (see resume)
                    _link_files(self.out / 'best', tmp / 'best')
                _write_manifest(tmp)
        except WRITE_ERRORS as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_error(err, final) from None
        if acc.is_main_process:
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

    def resume(self, ckpt: Path) -> None:
        """Load ``ckpt`` into the prepared objects and put back its best model, after checking every file."""
        _check_manifest(ckpt)
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


def _write_manifest(ckpt: Path) -> None:
    files = sorted(p for p in ckpt.rglob('*') if p.is_file())
    manifest = {str(p.relative_to(ckpt)): {'size': p.stat().st_size, 'sha256': file_sha256(p)} for p in files}
    (ckpt / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _check_manifest(ckpt: Path) -> None:
    """Refuse a checkpoint whose files differ from its manifest (missing, cut short, changed, swapped), naming the
    file, before accelerate reads anything. Every process checks every file, so all stop alike; nothing is unpickled.
    """
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise _corrupt(ckpt, f'{MANIFEST}: {"missing" if isinstance(err, FileNotFoundError) else "unreadable"}') \
            from None
    for name, expected in manifest.items():
        path = ckpt / name
        if not path.is_file():
            raise _corrupt(ckpt, f'{name}: missing')
        if path.stat().st_size != expected['size'] or file_sha256(path) != expected['sha256']:
            raise _corrupt(ckpt, f'{name}: changed since it was saved')


def write_error(err: Exception, where: Path) -> RecipeError:
    """A failed write as one message that says whether the disk is full; what was written before is kept."""
    full = getattr(err, 'errno', None) == errno.ENOSPC or 'No space' in str(err) or 'os error 28' in str(err)
    return RecipeError(f'{"no space left on" if full else "cannot write"} {where} ({err}); the earlier checkpoints '
                       f'are kept (a run needs room for keep_checkpoints + 1): free space, then --resume')


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
