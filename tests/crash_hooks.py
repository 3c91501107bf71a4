"""Crash injection for the crash-safety tests: stop the process just before its N-th file-system event.

The hooks wrap the file-system calls the project's writers use (a write, which is cut in half, an fsync, a rename,
an unlink). The crashing process ``os._exit``s: no ``finally`` block or atexit handler runs, as with SIGKILL or a
power cut after the fsyncs.
"""

from __future__ import annotations

import os
import pathlib
from pathlib import Path
from typing import Callable

import pytest

from lowbit_deploy import io as lowbit_io

CRASHED = 77  # the child's exit status when it stopped itself at the chosen event


class EventHooks:
    """Wraps the file-system calls the writers use; ``crash_at`` = N stops the process before the N-th one."""

    def __init__(self, monkeypatch, crash_at: int | None = None) -> None:
        self.events: list[tuple[str, str]] = []
        self.crash_at = crash_at
        real_replace, real_fsync = os.replace, os.fsync
        real_write_bytes, real_write_text, real_unlink = (pathlib.Path.write_bytes, pathlib.Path.write_text,
                                                          pathlib.Path.unlink)
        real_write_chunks = lowbit_io.write_chunks

        def event(kind: str, name: str, partial=None) -> None:
            self.events.append((kind, name))
            if self.crash_at is not None and len(self.events) == self.crash_at:
                if partial is not None:
                    partial()
                os._exit(CRASHED)

        def write_bytes(path, data):
            event("write", path.name, lambda: real_write_bytes(path, data[: len(data) // 2]))
            return real_write_bytes(path, data)

        def write_text(path, text, *args, **kwargs):
            event("write", path.name, lambda: real_write_text(path, text[: len(text) // 2], *args, **kwargs))
            return real_write_text(path, text, *args, **kwargs)

        def write_chunks(path, chunks):  # lowbit_deploy.io's streamed writes (safetensors files)
            chunks = list(chunks)
            event("write", path.name, lambda: real_write_chunks(path, chunks[: max(1, len(chunks) // 2)]))
            return real_write_chunks(path, chunks)

        def replace(source, target, *args, **kwargs):
            event("rename", Path(target).name)
            return real_replace(source, target, *args, **kwargs)

        def fsync(fd):
            event("fsync", os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1])
            return real_fsync(fd)

        def unlink(path, missing_ok=False):
            if path.exists():  # a no-op unlink (a temporary already renamed) changes nothing on disk
                event("unlink", path.name)
            return real_unlink(path, missing_ok=missing_ok)

        monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
        monkeypatch.setattr(pathlib.Path, "write_text", write_text)
        monkeypatch.setattr(pathlib.Path, "unlink", unlink)
        monkeypatch.setattr(lowbit_io, "write_chunks", write_chunks)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "fsync", fsync)


def crash_in_child(work: Callable[[], object], crash_at: int) -> int:
    """Run ``work`` in a forked child stopped before file-system event ``crash_at``; the child's exit status
    (:data:`CRASHED` when it stopped there, 0 when ``work`` finished first)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns to pytest
        status = 1
        try:
            with pytest.MonkeyPatch.context() as monkeypatch:
                EventHooks(monkeypatch, crash_at)
                work()
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _crash_target(work: Callable[..., object], args: tuple, crash_at: int) -> None:  # pragma: no cover - child
    with pytest.MonkeyPatch.context() as monkeypatch:
        EventHooks(monkeypatch, crash_at)
        work(*args)


def crash_in_fresh_process(work: Callable[..., object], args: tuple, crash_at: int) -> int:
    """:func:`crash_in_child` in a spawned interpreter, for work that runs ONNX Runtime or thread pools a forked
    child could deadlock on (their locks are copied held). ``work`` must be importable (a module-level function)."""
    import multiprocessing

    process = multiprocessing.get_context("spawn").Process(target=_crash_target, args=(work, args, crash_at))
    process.start()
    process.join()
    return process.exitcode


def _record_target(work: Callable[..., object], args: tuple, events_path: str) -> None:  # pragma: no cover - child
    import json

    with pytest.MonkeyPatch.context() as monkeypatch:
        hooks = EventHooks(monkeypatch)
        work(*args)
    Path(events_path).write_text(json.dumps(hooks.events))


def run_in_fresh_process(work: Callable[..., object], args: tuple, events_path: Path | None = None) -> None:
    """Run ``work(*args)`` to the end in a spawned interpreter (torch's thread settings and any state earlier tests
    left in this process cannot change its floating-point results); with ``events_path``, its file-system events
    are written there as JSON."""
    import multiprocessing

    if events_path is None:
        process = multiprocessing.get_context("spawn").Process(target=work, args=args)
    else:
        process = multiprocessing.get_context("spawn").Process(target=_record_target,
                                                               args=(work, args, str(events_path)))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise AssertionError(f"{getattr(work, '__name__', work)} failed in a fresh process (exit {process.exitcode})")
