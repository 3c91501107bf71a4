"""Atomic artifact writing: every artifact appears whole or not at all (temp file in the same folder + rename)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it replaces ``target``, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; artifacts are ordinary files, readable like anything else the user writes.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json_atomic(target: str | os.PathLike, data: object) -> None:
    write_text_atomic(target, json.dumps(data, indent=2, sort_keys=True) + "\n")


def update_report(run_dir: str | os.PathLike, stage: str, entry: dict) -> dict:
    """Merge one stage's entry into ``run_dir/report.json`` (read, update, atomic rewrite)."""
    path = Path(run_dir) / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    report[stage] = entry
    write_json_atomic(path, report)
    return report


def save_small_module(folder: str | os.PathLike, config: dict, module) -> None:
    """Write ``config.json`` + ``model.safetensors`` for a small ``nn.Module`` (each file atomically)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    write_json_atomic(folder / "config.json", config)
    state = {name: tensor.detach().contiguous() for name, tensor in module.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))


def load_small_module(folder: str | os.PathLike, what: str, fix: str) -> tuple[dict, dict]:
    """Read what :func:`save_small_module` wrote: ``(config, state_dict)``, or a UserError naming ``fix``."""
    from safetensors.torch import load_file

    from .errors import UserError

    folder = Path(folder)
    try:
        return json.loads((folder / "config.json").read_text()), load_file(str(folder / "model.safetensors"))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the {what} from {folder}: {error}; {fix}") from error
