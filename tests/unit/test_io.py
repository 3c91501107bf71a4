"""Atomic, durable and reproducible writes (lowbit_deploy.io)."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lowbit_deploy.io import atomic_path, safetensors_bytes, update_report, write_safetensors_atomic

TENSORS = {
    "weight": torch.randn(3, 4),
    "half": torch.randn(5).half(),
    "brain": torch.randn(2, 2).bfloat16(),
    "codes": torch.arange(7, dtype=torch.uint8),
    "index": torch.tensor(3, dtype=torch.int64),
    "mask": torch.tensor([True, False]),
    "empty": torch.zeros(0, 4),
}


def test_safetensors_bytes_round_trip_through_safetensors(tmp_path):
    path = write_safetensors_atomic(tmp_path / "t.safetensors", TENSORS, {"format": "x", "step": "2"})
    loaded = load_file(str(path))
    assert loaded.keys() == TENSORS.keys()
    for name, tensor in TENSORS.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "x", "step": "2"}


def test_same_tensors_and_metadata_give_the_same_bytes_whatever_the_insertion_order():
    metadata = {"z": "1", "a": json.dumps({"b": 1}), "format": "f"}
    forward = safetensors_bytes(TENSORS, metadata)
    backward = safetensors_bytes(dict(reversed(list(TENSORS.items()))), dict(reversed(list(metadata.items()))))
    assert forward == backward
    assert len(forward) % 8 == 0 or int.from_bytes(forward[:8], "little") % 8 == 0


def test_atomic_path_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    with atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("data")
    assert synced[0].endswith(".tmp") and synced[1] == str(tmp_path)
    assert (tmp_path / "out.txt").read_text() == "data"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_concurrent_report_updates_lose_no_entry(tmp_path):
    """Four processes merge 10 entries each into one report.json; the lock serialises the read-modify-writes."""
    children = []
    for worker in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            status = 1
            try:
                for item in range(10):
                    update_report(tmp_path, f"w{worker}-{item}", {"worker": worker})
                status = 0
            finally:
                os._exit(status)
        children.append(pid)
    assert all(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0 for pid in children)
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report) == 40


def test_the_streamed_file_holds_exactly_the_in_memory_encoding_strided_views_included(tmp_path):
    strided = {**TENSORS, "transposed": torch.randn(4, 3).t(), "every_other": torch.arange(10.0)[::2]}
    path = write_safetensors_atomic(tmp_path / "t.safetensors", strided, {"format": "x"})
    assert path.read_bytes() == safetensors_bytes(strided, {"format": "x"})
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[name], tensor) for name, tensor in strided.items())
