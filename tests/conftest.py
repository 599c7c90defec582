import importlib.util
import os
import socket
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get('TIMM_ASGE_SHARED_DATA', ROOT.parent / 'shared' / 'data'))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Decoded-tensor cache per test session, so tests never read a user's cache or each other's partial files."""
    monkeypatch.setenv('TIMM_ASGE_CACHE', str(tmp_path_factory.getbasetemp() / 'tensor-cache'))


def load_script(name: str) -> ModuleType:
    """``recipes/<name>.py`` as a module (its ``main`` runs in this process; the script is no package)."""
    spec = importlib.util.spec_from_file_location(f'recipes_{name}', ROOT / 'recipes' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f'offline dataset {path} is absent (needs ../shared/data)')
    return path


def free_port() -> int:
    """A TCP port nobody listens on now, for a 2-process `accelerate launch` (its rendezvous)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]
