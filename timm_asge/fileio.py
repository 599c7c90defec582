"""Atomic file and folder writes: a crash leaves either the old file or the new one, never half of one."""
import contextlib
import hashlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Collection, Iterator, Union

__all__ = ['atomic_path', 'atomic_dir', 'file_sha256']


def _temporary_name(path: Path) -> Path:
    return path.with_name(f'.{path.name}.{secrets.token_hex(6)}.tmp')


@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on error delete it.

    The new file keeps the permissions of the file it replaces (a new file gets the usual ``0o666`` less umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # created through the umask, unlike mkstemp
    try:
        yield tmp
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: Union[str, os.PathLike], replaceable: Collection[str] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (the old folder is removed last).

    Args:
        path: The folder to write.
        replaceable: Names an existing folder at ``path`` may hold (what an earlier write put there). Anything else
            raises ``FileExistsError`` before anything is written: replacing the folder would delete it.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f'{path} is a file, not a folder; choose a folder path to write')
        foreign = sorted(p.name for p in path.iterdir() if p.name not in replaceable)
        if foreign:
            shown = ', '.join(foreign[:5]) + (f' and {len(foreign) - 5} more' if len(foreign) > 5 else '')
            raise FileExistsError(
                f'{path} already holds {shown}, which writing this folder would delete (the whole folder is '
                f'replaced); write to a new or empty folder, or move those files out first')
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    os.mkdir(tmp, 0o777)  # through the umask, unlike mkdtemp's 0o700
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f'.{path.name}.old')
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (checkpoints can be far larger than worth holding twice)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()
