"""The run-directory lock and the output-location checks (lowbit_deploy.run_dir)."""

import os

import pytest

from lowbit_deploy.errors import UserError
from lowbit_deploy.run_dir import check_output_dir, run_lock


def _hold_lock_in_child(run_dir):
    """Fork a child that takes the lock and waits; returns (pid, write end that releases it when closed)."""
    ready_read, ready_write = os.pipe()
    release_read, release_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(release_write)  # else the child's own copy keeps the pipe open and it never sees EOF
            with run_lock(run_dir):
                os.write(ready_write, b"1")
                os.read(release_read, 1)
        finally:
            os._exit(0)
    os.close(release_read)
    assert os.read(ready_read, 1) == b"1"
    return pid, release_write


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    pid, release = _hold_lock_in_child(tmp_path)
    try:
        with pytest.raises(UserError, match=rf"in use by pid {pid} .*wait for it to finish .*or choose another"):
            with run_lock(tmp_path):
                pass
    finally:
        os.close(release)
        os.waitpid(pid, 0)
    with run_lock(tmp_path):  # free again once the holder is gone
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        with run_lock(tmp_path):
            os._exit(9)  # dies holding it: no release code runs
    os.waitpid(pid, 0)
    with run_lock(tmp_path):
        pass


def test_the_lock_is_reentrant_within_a_process_and_writes_nothing(tmp_path):
    with run_lock(tmp_path):
        with run_lock(tmp_path / "."):
            pass
        with run_lock(tmp_path):
            pass
    assert list(tmp_path.iterdir()) == []


def test_an_output_below_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"file\S* is a file, not a folder; choose an --out"):
        check_output_dir(tmp_path / "file" / "run")
    with pytest.raises(UserError, match="is a file, not a folder; pass a new folder"):
        check_output_dir(tmp_path / "file")


def test_a_creatable_output_is_accepted_and_nothing_is_created(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only-mode folders; see the /sys case")
def test_a_read_only_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(UserError, match="is not writable .*choose a writable location"):
        check_output_dir(locked / "run")


@pytest.mark.skipif(not os.path.isdir("/sys") or os.access("/sys", os.W_OK) and os.geteuid() != 0,
                    reason="needs /sys, which refuses new entries")
def test_a_location_that_refuses_new_files_is_refused_even_for_root():
    with pytest.raises(UserError, match="is not writable"):
        check_output_dir("/sys/lowbit-deploy-run")


def test_a_failed_stage_removes_the_empty_folders_its_lock_created_and_keeps_written_ones(tmp_path):
    new = tmp_path / "a" / "b" / "run"
    with pytest.raises(UserError):
        with run_lock(new):
            raise UserError("bad input found after the lock")
    assert not (tmp_path / "a").exists()

    with pytest.raises(KeyboardInterrupt):
        with run_lock(new):
            (new / "checkpoint").mkdir()
            raise KeyboardInterrupt
    assert (new / "checkpoint").is_dir()  # something was written: nothing is removed

    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(UserError):
        with run_lock(existing):
            raise UserError("bad input")
    assert existing.is_dir()  # a folder the user made stays
