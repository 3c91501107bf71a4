"""Atomic, durable, reproducible artifact writing.

Every artifact appears whole or not at all: it is written to a temporary file in the same folder, fsynced, renamed
over the target, and the folder is fsynced so the rename itself survives a power cut. Safetensors files are written
here rather than by ``safetensors.torch.save_file``, whose Rust side keeps the metadata in a randomly seeded hash map:
the same tensors and metadata then give different bytes on every call. ``update_report`` holds the run directory's
lock (:mod:`lowbit_deploy.run_dir`) around its read-modify-write, so two stages never lose each other's entries.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

if TYPE_CHECKING:
    import torch

TEMP_SUFFIX = ".tmp"


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it is fsynced and replaces ``target`` (and the folder
    is fsynced), on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; artifacts are ordinary files, readable like anything else the user writes.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        # Without the fsync a crash after the rename can leave a zero-length file under the final name.
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete temporary files a killed process left in ``folder`` (call only while holding the run lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.glob(f".*{TEMP_SUFFIX}") if p.is_file())
    for path in stale:
        path.unlink(missing_ok=True)
    return [p.name for p in stale]


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json_atomic(target: str | os.PathLike, data: object) -> None:
    write_text_atomic(target, json.dumps(data, indent=2, sort_keys=True) + "\n")


_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def _safetensors_layout(tensors: Mapping[str, torch.Tensor],
                        metadata: Mapping[str, str] | None) -> tuple[bytes, list[tuple[str, torch.Tensor]]]:
    """The encoded, padded header and the tensors in storage order: widest dtype first, then by name (the order
    safetensors itself uses), metadata keys sorted -- so the same content always gives the same bytes."""
    ordered = sorted(tensors.items(), key=lambda item: (-item[1].element_size(), item[0]))
    header: dict = {"__metadata__": {str(k): str(v) for k, v in sorted((metadata or {}).items())}} if metadata else {}
    offset = 0
    for name, tensor in ordered:
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded, ordered


def _tensor_buffer(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of ``tensor`` as a view: no copy for a contiguous CPU tensor; a device tensor or a strided
    view is copied to a contiguous CPU tensor first (one tensor at a time, so the copy is bounded by the largest)."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors encoding of ``tensors`` with a byte-stable header (see :func:`_safetensors_layout`)."""
    header, ordered = _safetensors_layout(tensors, metadata)
    return header + b"".join(bytes(_tensor_buffer(tensor)) for _, tensor in ordered)


def write_safetensors_atomic(target: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                             metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file atomically and byte-reproducibly: the bytes of :func:`safetensors_bytes`.

    The tensors are streamed into the temporary file one at a time from their own storage, so saving a model's
    state dict or an optimizer's moments adds at most one tensor's size to the resident memory (building the file
    in memory first held every tensor twice more: the SD1.5 train state outgrew 24 GB that way)."""
    header, ordered = _safetensors_layout(tensors, metadata)
    with atomic_path(target) as tmp:
        write_chunks(tmp, itertools.chain([header], (_tensor_buffer(tensor) for _, tensor in ordered)))
    return Path(target)


def write_chunks(path: Path, chunks: Iterable[bytes | memoryview]) -> None:
    """Write ``chunks`` one after another into ``path``, each as it comes (the crash tests cut this write)."""
    with open(path, "wb") as handle:
        for chunk in chunks:
            handle.write(chunk)


def update_report(run_dir: str | os.PathLike, stage: str, entry: dict) -> dict:
    """Merge one stage's entry into ``run_dir/report.json`` (read, update, atomic rewrite) under the run lock."""
    from .run_dir import run_lock

    path = Path(run_dir) / "report.json"
    with run_lock(run_dir, wait_seconds=30.0):
        report = json.loads(path.read_text()) if path.is_file() else {}
        report[stage] = entry
        write_json_atomic(path, report)
    return report


def save_small_module(folder: str | os.PathLike, config: dict, module) -> None:
    """Write ``config.json`` + ``model.safetensors`` for a small ``nn.Module`` (each file atomically)."""
    folder = Path(folder)
    write_json_atomic(folder / "config.json", config)
    write_safetensors_atomic(folder / "model.safetensors", dict(module.state_dict()))


def load_small_module(folder: str | os.PathLike, what: str, fix: str) -> tuple[dict, dict]:
    """Read what :func:`save_small_module` wrote: ``(config, state_dict)``, or a UserError naming ``fix``."""
    from safetensors.torch import load_file

    from .errors import UserError

    folder = Path(folder)
    try:
        return json.loads((folder / "config.json").read_text()), load_file(str(folder / "model.safetensors"))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the {what} from {folder}: {error}; {fix}") from error
