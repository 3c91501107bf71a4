"""Build-failure messages without TensorRT: TensorRT's own error lines are quoted, capabilities read as flags."""

from pathlib import Path

import pytest

from lowbit_deploy.engines.engine import build_failure_message, capability_flag, captured_errors


def test_captured_errors_collects_error_lines_only_and_restores_the_logger():
    from polygraphy.logger import G_LOGGER

    original = G_LOGGER.log
    with captured_errors() as errors:
        G_LOGGER.warning("a warning is not a cause")
        G_LOGGER.error("[TRT] 4: [network.cpp::validate] profile 0: sample dimension 0 (max 8) exceeds 4")
        G_LOGGER.error(lambda: "lazy error line")
    assert errors == ["[TRT] 4: [network.cpp::validate] profile 0: sample dimension 0 (max 8) exceeds 4",
                      "lazy error line"]
    assert G_LOGGER.log == original and "log" not in vars(G_LOGGER)


def test_the_failure_message_quotes_tensorrt_not_invalid_engine():
    lines = ["first", "profile dimension mismatch\nsecond line", "profile dimension mismatch\nsecond line", "last"]
    message = build_failure_message(Path("run/model.onnx"), lines, "Invalid Engine")
    assert "TensorRT: first; profile dimension mismatch second line; last." in message
    assert "Invalid Engine" not in message and "\n" not in message
    assert "lowbit-deploy export RUN_DIR" in message  # the fix
    assert "TensorRT: Invalid Engine." in build_failure_message(Path("m.onnx"), [], "Invalid Engine")


@pytest.mark.parametrize("member, flag", [("SM75", "7.5"), ("SM89", "8.9"), ("SM120", "12.0"), ("NONE", "NONE")])
def test_capability_members_read_as_the_flag_takes_them(member, flag):
    assert capability_flag(member) == flag
