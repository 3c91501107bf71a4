"""Backend selection of import_tensorrt: preference order and the install hint when nothing is installed."""

from __future__ import annotations

import importlib.util

import pytest

from lowbit_deploy.engines import tensorrt_import
from lowbit_deploy.errors import UserError


@pytest.fixture()
def fresh_cache():
    tensorrt_import._backend_cached.cache_clear()
    yield
    tensorrt_import._backend_cached.cache_clear()


def test_nothing_installed_names_the_fix(monkeypatch, fresh_cache) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(UserError, match=r"pip install 'lowbit-deploy\[tensorrt-rtx\]'"):
        tensorrt_import.import_tensorrt()


def test_unknown_backend_is_a_user_error(fresh_cache) -> None:
    with pytest.raises(UserError, match="unknown TensorRT backend 'tensorrt_llm'"):
        tensorrt_import.import_tensorrt("tensorrt_llm")


def test_full_tensorrt_is_preferred(monkeypatch, fresh_cache) -> None:
    imported = []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: object())
    monkeypatch.setattr(tensorrt_import.importlib, "import_module",
                        lambda name: imported.append(name) or type("M", (), {"__version__": "10.9"})())
    backend = tensorrt_import.tensorrt_backend()
    assert (backend.name, backend.version, backend.is_rtx) == ("tensorrt", "10.9", False)
    assert imported == ["tensorrt"]
