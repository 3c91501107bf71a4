"""ensure_kernel_library(): builds when missing or stale, keeps an up-to-date library, names the fix without nvcc."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lowbit_deploy.engines import kernels
from lowbit_deploy.errors import UserError


@pytest.fixture()
def plugins_copy(tmp_path) -> Path:
    copy = tmp_path / "plugins"
    shutil.copytree(kernels.PLUGINS_DIR, copy, ignore=shutil.ignore_patterns("build"))
    return copy


def test_missing_library_without_nvcc_names_the_fix(plugins_copy, monkeypatch) -> None:
    monkeypatch.setattr(kernels, "find_nvcc", lambda: None)
    with pytest.raises(UserError, match=r"nvcc was not found; install the CUDA toolkit.*make -C"):
        kernels.ensure_kernel_library(plugins_copy)


@pytest.mark.skipif(kernels.find_nvcc() is None, reason="nvcc is not installed")
def test_builds_once_and_rebuilds_when_a_source_changes(plugins_copy, monkeypatch) -> None:
    # One architecture keeps this test fast; the Makefile's default covers sm_75..sm_90 + PTX.
    monkeypatch.setenv("GENCODE", "-gencode arch=compute_75,code=sm_75")
    library = kernels.ensure_kernel_library(plugins_copy)
    assert library == plugins_copy / "build" / kernels.LIBRARY_NAME and library.exists()
    built_at = library.stat().st_mtime_ns
    assert kernels.ensure_kernel_library(plugins_copy).stat().st_mtime_ns == built_at  # up to date: untouched
    header = plugins_copy / "common" / "lowbitFormat.h"
    future = library.stat().st_mtime + 5
    os.utime(header, (future, future))
    assert kernels.ensure_kernel_library(plugins_copy).stat().st_mtime_ns != built_at
    assert kernels.KernelLibrary(library).format_constants()["op_name"] == "UnpackDequantize"
    assert not list((plugins_copy / "build").glob("*.tmp"))


def test_the_loaded_library_is_cached_so_later_calls_neither_scan_nor_build(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(kernels, "ensure_kernel_library", lambda: calls.append(1) or Path("/nonexistent.so"))
    monkeypatch.setattr(kernels, "KernelLibrary", lambda path: ("loaded", path))
    kernels.load_kernel_library.cache_clear()
    try:
        first = kernels.load_kernel_library()
        assert kernels.load_kernel_library() is first and calls == [1]
    finally:
        kernels.load_kernel_library.cache_clear()  # the next caller loads the real library again
