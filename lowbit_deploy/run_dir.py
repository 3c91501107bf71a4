"""The run directory as a shared resource: the lock that keeps two processes from writing one run, and the checks
that every output location is usable before a long stage starts.

The lock is an ``fcntl.flock`` on the run directory itself, not on a lock file: taking it writes nothing, so a
command refused for a bad input leaves the directory exactly as it was, and the kernel drops the lock when its
holder dies (a killed run never leaves a stale lock behind). Taking it removes the temporary files a killed writer
left (nothing else can be writing them). The holder's pid is read back from ``/proc/locks``.
Locks are re-entrant within one process: ``run`` holds the lock while its stages take it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .errors import UserError

# (st_dev, st_ino) of a locked directory -> [file descriptor, depth]
_HELD: dict[tuple[int, int], list[int]] = {}


def lock_holder(path: str | os.PathLike) -> str:
    """Who holds a flock on ``path``: "pid N (command line)" from /proc/locks, or "another process"."""
    try:
        info = os.stat(path)
        with open("/proc/locks") as locks:
            lines = locks.read().splitlines()
    except OSError:
        return "another process"
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    for line in lines:
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == device and fields[4] != str(os.getpid()):
            pid = fields[4]
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                command = ""
            return f"pid {pid}" + (f" ({command[:120]})" if command else "")
    return "another process"


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, *, wait_seconds: float = 0.0) -> Iterator[Path]:
    """Hold the exclusive lock of ``run_dir`` (created if missing) for the ``with`` body.

    Another process holding it is a :class:`UserError` naming that process, at once or after ``wait_seconds``
    (short critical sections such as a report update wait; stages refuse at once)."""
    run_dir = Path(run_dir)
    created = _missing_folders(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(run_dir, wait_seconds) as locked:
            yield locked
    except BaseException:
        _remove_if_empty(created)  # a stage refused for a bad input leaves no new empty folder behind
        raise


def _missing_folders(path: Path) -> list[Path]:
    """The folders ``path.mkdir(parents=True)`` would create, deepest first."""
    missing = []
    path = path.absolute()
    while not path.exists() and not path.is_symlink() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()  # fails (and stops) at the first folder that is not empty
        except OSError:
            return


@contextlib.contextmanager
def _locked(run_dir: Path, wait_seconds: float) -> Iterator[Path]:
    info = os.stat(run_dir)
    key = (info.st_dev, info.st_ino)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield run_dir
        finally:
            _HELD[key][1] -= 1
        return
    fd = os.open(str(run_dir), os.O_RDONLY)
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = lock_holder(run_dir)
                os.close(fd)
                raise UserError(f"{run_dir} is in use by {holder}, which is writing this run directory; wait for "
                                f"it to finish (or stop it), or choose another directory") from None
            time.sleep(0.1)
    _HELD[key] = [fd, 1]
    try:
        _sweep_temporaries(run_dir)
        yield run_dir
    finally:
        del _HELD[key]
        os.close(fd)  # closing the only descriptor releases the flock


def _sweep_temporaries(run_dir: Path) -> None:
    """Temporary files left by a process killed mid-write (in the run and its sub-folders, e.g. checkpoint/): with
    the lock held no other process is writing, so every one is stale."""
    from .io import remove_stale_temporaries

    for folder in (run_dir, *(child for child in run_dir.iterdir() if child.is_dir())):
        remove_stale_temporaries(folder)


def _nearest_existing(path: Path) -> Path:
    ancestor = path
    while not ancestor.exists() and not ancestor.is_symlink() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    return ancestor


def check_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Refuse an output folder that cannot be created or written, before any work starts (nothing is written)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file, not a folder; pass a new folder or an existing run directory")
    ancestor = _nearest_existing(path.absolute())
    if not ancestor.is_dir():
        raise UserError(f"cannot create {option} {path}: {ancestor} is a file, not a folder; choose an {option} "
                        f"whose parent folders are folders (or move the file away)")
    problem = None
    if not os.access(ancestor, os.W_OK | os.X_OK):
        problem = "permission denied"
    else:
        # access() says yes to root everywhere, but a read-only mount or a pseudo file system still refuses.
        try:
            with tempfile.TemporaryFile(prefix=".lowbit-deploy-probe.", dir=ancestor):
                pass
        except OSError as error:
            problem = error.strerror or str(error)
    if problem:
        where = "it" if ancestor == path.absolute() else f"its nearest existing folder {ancestor}"
        raise UserError(f"cannot write {option} {path}: {where} is not writable ({problem}); choose a writable "
                        f"location for {option} or fix the folder's permissions")
    return path


def check_run_dir_exists(run_dir: str | os.PathLike, produced_by: str) -> Path:
    """An input run directory (export/build/validate) must exist and be a folder."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"RUN_DIR {run_dir} is a file; pass the run directory that `{produced_by}` wrote")
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; run `{produced_by}` first, or check the path")
    return run_dir


def check_onnx_matches_checkpoint(run_dir: str | os.PathLike):
    """``run_dir/model.onnx`` must have been exported from ``run_dir``'s checkpoint (same deployed signature):
    a file copied from another run would be built or validated against the wrong model. Returns the signature."""
    from .qat.checkpoint import checkpoint_file, read_metadata
    from .runtime.ort import read_signature
    from .signature import DeployedSignature

    run_dir = Path(run_dir)
    onnx_path = run_dir / "model.onnx"
    exported = read_signature(onnx_path)
    trained = DeployedSignature.from_json(read_metadata(checkpoint_file(run_dir))["signature"])
    if exported != trained:
        differences = [f"{key}: onnx {value!r} vs checkpoint {trained.to_dict()[key]!r}"
                       for key, value in exported.to_dict().items() if trained.to_dict().get(key) != value]
        raise UserError(f"{onnx_path} was exported from another model: its signature differs from the checkpoint's "
                        f"({'; '.join(differences)[:300]}); run `lowbit-deploy export {run_dir}` to export this "
                        f"run's checkpoint again")
    return exported
