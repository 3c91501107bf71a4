"""Atomic, durable, reproducible artifact writing.

Every artifact appears whole or not at all: it is written to a temporary file in the same folder, fsynced, renamed
over the target, and the folder is fsynced so the rename itself survives a power cut. Safetensors files are written
here rather than by ``safetensors.torch.save_file``, whose Rust side keeps the metadata in a randomly seeded hash map:
the same tensors and metadata then give different bytes on every call. ``update_report`` holds the run directory's
lock (:mod:`lowbit_deploy.run_dir`) around its read-modify-write, so two stages never lose each other's entries.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

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


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors encoding of ``tensors`` with a byte-stable header: metadata keys sorted, tensors in the
    order safetensors itself uses (widest dtype first, then by name), header padded to 8 bytes."""
    import torch

    ordered = sorted(tensors.items(), key=lambda item: (-item[1].element_size(), item[0]))
    header: dict = {"__metadata__": {str(k): str(v) for k, v in sorted((metadata or {}).items())}} if metadata else {}
    chunks, offset = [], 0
    for name, tensor in ordered:
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks)


def write_safetensors_atomic(target: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                             metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file atomically and byte-reproducibly (see :func:`safetensors_bytes`)."""
    payload = safetensors_bytes(tensors, metadata)
    with atomic_path(target) as tmp:
        tmp.write_bytes(payload)
    return Path(target)


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
