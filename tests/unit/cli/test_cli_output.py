"""The CLI output contract (cli_output.py, docs/ci.md): --json, exit codes, the closing line on every exit, --debug,
--quiet, -v, progress bars only on a terminal, and `inspect` on a real tiny run."""

import json
import logging

import pytest
import yaml
from click.testing import CliRunner

from lowbit_deploy.cli import main
from lowbit_deploy.cli_output import RESULT_FORMAT, ExitCode, OutputSettings

CLOSING = ("PASSED | Runtime: ", "FAILED | Runtime: ")


def invoke(*args: str):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def parsed(result) -> dict:
    """The --json object: stdout must hold exactly one JSON document and nothing else."""
    document = json.loads(result.stdout)
    assert document["format"] == RESULT_FORMAT
    assert document["exit_code"] == result.exit_code
    return document


def assert_closes(result, verdict: str, stream: str = "stdout") -> None:
    lines = getattr(result, stream).strip().splitlines()
    assert lines and lines[-1].startswith(f"{verdict} | Runtime: "), result.output
    assert sum(line.startswith(CLOSING) for line in result.output.splitlines()) == 1, result.output


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A finished tiny run (train -> export -> validate, no engine), made without progress flags (auto)."""
    from tinymodels import TINY_RECIPE, make_tiny_unet

    root = tmp_path_factory.mktemp("cli-output")
    make_tiny_unet().save_pretrained(root / "model" / "unet")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    result = invoke("--json", "run", recipe, "--out", root / "run", "--model", root / "model", "--no-build")
    assert result.exit_code == 0, result.output
    return root, result


def test_json_of_a_passing_run_holds_every_stage(chain):
    _, result = chain
    document = parsed(result)
    assert document["command"] == "run" and document["status"] == "passed" and document["error"] is None
    summary = document["result"]
    assert {"train", "export", "build", "validate"} <= summary.keys() and summary["validate"]["passed"] is True
    assert summary["export"]["onnx_bytes"] > 0
    assert_closes(result, "PASSED", stream="stderr")


@pytest.mark.trt
def test_json_of_train_export_and_build(chain, tmp_path):
    import shutil

    from lowbit_deploy.engines.tensorrt_import import tensorrt_importable

    root, _ = chain
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    recipe = root / "recipe.yaml"
    trained = parsed(invoke("--json", "train", recipe, "--out", tmp_path / "fresh", "--model", root / "model",
                            "--steps", "1"))
    assert trained["status"] == "passed" and trained["result"]["steps"] == 1, trained
    exported = parsed(invoke("--json", "export", run))
    assert exported["status"] == "passed" and exported["result"]["onnx_bytes"] > 0, exported
    if not tensorrt_importable("tensorrt_rtx"):
        pytest.skip("tensorrt_rtx is not installed: build's JSON is not checked")
    built = parsed(invoke("--json", "build", run, "--plugin", "python"))
    assert built["status"] == "passed" and built["result"]["plugin_layers"] > 0, built


def test_json_of_a_passing_command(chain):
    root, _ = chain
    result = invoke("--json", "validate", root / "run", "--skip-sampling")
    document = parsed(result)
    assert result.exit_code == 0 and document["status"] == "passed" and document["error"] is None
    assert document["command"] == "validate" and document["runtime_s"] >= 0
    assert {item["artifact"]: item["status"] for item in document["result"]["parity"]}["onnxruntime"] == "passed"
    assert_closes(result, "PASSED", stream="stderr")  # human lines move to stderr so stdout parses
    assert "[onnxruntime] passed" in result.stderr


def test_json_of_a_failing_gate_after_the_command(chain):
    root, _ = chain
    result = invoke("validate", root / "run", "--skip-sampling", "--max-abs", "0", "--json")
    document = parsed(result)
    assert result.exit_code == ExitCode.FAILED == 1
    assert document["status"] == "failed" and document["error"] is None
    assert document["result"]["passed"] is False
    assert_closes(result, "FAILED", stream="stderr")


def test_json_of_bad_input(tmp_path):
    result = invoke("--json", "export", tmp_path / "nothing-here")
    document = parsed(result)
    assert result.exit_code == ExitCode.BAD_INPUT == 2
    assert document["status"] == "error" and document["error"]["kind"] == "bad_input"
    assert "lowbit-deploy train" in document["error"]["message"] and document["result"] is None
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {document['error']['message'].splitlines()[0]}"]


def test_usage_error_prints_one_error_and_the_closing_line():
    result = invoke("validate", "--no-such-flag")
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--no-such-flag" in errors[0] and "lowbit-deploy validate --help" in errors[0]
    assert_closes(result, "FAILED")
    assert "Traceback" not in result.output


def test_usage_error_with_json_still_parses():
    result = invoke("--json", "validate")  # missing RUN_DIR
    document = parsed(result)
    assert document["exit_code"] == 2 and document["error"]["kind"] == "bad_input"
    assert "RUN_DIR" in document["error"]["message"]


def test_missing_command_is_a_usage_error():
    result = invoke()
    assert result.exit_code == 2 and "Commands:" in result.output
    assert_closes(result, "FAILED")


@pytest.mark.parametrize("args", [["--help"], ["validate", "--help"], ["--version"]])
def test_help_and_version_print_only_what_was_asked(args):
    result = invoke(*args)
    assert result.exit_code == 0
    assert not any(line.startswith(CLOSING) for line in result.output.splitlines())


def _raise_from_inspect(monkeypatch, error: BaseException) -> None:
    def broken(run_dir):
        raise error

    monkeypatch.setattr("lowbit_deploy.inspect_run.inspect_run", broken)


def test_ctrl_c_closes_with_exit_130(monkeypatch, tmp_path):
    _raise_from_inspect(monkeypatch, KeyboardInterrupt())
    result = invoke("inspect", tmp_path)
    assert result.exit_code == ExitCode.INTERRUPTED == 130
    assert "Aborted!" not in result.output and "error: interrupted (Ctrl-C)" in result.stderr
    assert_closes(result, "FAILED")
    json_result = invoke("--json", "inspect", tmp_path)
    assert parsed(json_result)["error"]["kind"] == "interrupted"


def test_internal_error_is_one_line_with_exit_70(monkeypatch, tmp_path):
    _raise_from_inspect(monkeypatch, RuntimeError("boom\non two lines"))
    result = invoke("inspect", tmp_path)
    assert result.exit_code == ExitCode.INTERNAL_ERROR == 70
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: internal error: RuntimeError: boom on two lines; rerun with --debug for the traceback "
                      "and report it"]
    assert "Traceback" not in result.output
    assert_closes(result, "FAILED")
    assert parsed(invoke("--json", "inspect", tmp_path))["error"]["kind"] == "internal"


def test_debug_shows_the_traceback(monkeypatch, tmp_path):
    _raise_from_inspect(monkeypatch, RuntimeError("boom"))
    result = invoke("--debug", "inspect", tmp_path)
    assert result.exit_code == 70
    assert "Traceback (most recent call last)" in result.stderr and "RuntimeError: boom" in result.stderr
    assert "report it with the traceback above" in result.stderr
    assert_closes(result, "FAILED")


def test_user_errors_have_a_traceback_only_with_debug(tmp_path):
    plain = invoke("inspect", tmp_path / "absent")
    assert plain.exit_code == 2 and "Traceback" not in plain.output
    debug = invoke("inspect", tmp_path / "absent", "--debug")
    assert debug.exit_code == 2 and "Traceback" in debug.stderr and "UserError" in debug.stderr


def test_quiet_keeps_only_the_closing_line(tmp_path):
    result = invoke("-q", "inspect", tmp_path)
    assert result.exit_code == 0
    assert result.stdout.strip().splitlines() == [result.stdout.strip()]
    assert_closes(result, "PASSED")


def test_verbose_shows_the_library_log(monkeypatch, tmp_path):
    def logging_inspect(run_dir):
        logging.getLogger("lowbit_deploy.inspect_run").info("reading %s", run_dir)
        return {"run_dir": str(run_dir)}

    monkeypatch.setattr("lowbit_deploy.inspect_run.inspect_run", logging_inspect)
    monkeypatch.setattr("lowbit_deploy.inspect_run.describe_run", lambda info: [])
    assert "reading" in invoke("-v", "inspect", tmp_path).stderr
    assert "reading" not in invoke("inspect", tmp_path).stderr


@pytest.mark.parametrize("args, expected", [
    (["--json", "validate", "x"], OutputSettings(json=True)),
    (["validate", "x", "-vv", "--debug"], OutputSettings(debug=True, verbosity=2)),
    (["-qv", "inspect", "--", "--json"], OutputSettings(quiet=True, verbosity=1)),
])
def test_output_settings_from_raw_arguments(args, expected):
    assert OutputSettings.from_args(args) == expected


def test_progress_bars_only_on_a_terminal_unless_forced(chain, tmp_path):
    root, run_result = chain
    assert "QAT" not in run_result.stderr  # the chain ran without --progress, and CliRunner is not a terminal
    forced = invoke("train", root / "recipe.yaml", "--out", tmp_path / "run", "--model", root / "model",
                    "--steps", "1", "--progress")
    assert forced.exit_code == 0, forced.output
    assert "QAT" in forced.stderr


def test_inspect_describes_the_tiny_run(chain):
    root, _ = chain
    run = root / "run"
    result = invoke("inspect", run, "--json")
    info = parsed(result)["result"]
    report = json.loads((run / "report.json").read_text())
    assert info["checkpoint"]["status"] == "ok" and info["checkpoint"]["recipe"] == "tiny-test"
    plan = info["plan"]
    assert plan["average_bits"] == pytest.approx(report["train"]["average_bits"])
    assert plan["by_grid_bits"] == report["train"]["plan"]["layers"]
    assert plan["by_role"]["quantized"] == report["train"]["quantized_layers"] == sum(
        entry["layers"] for entry in plan["by_bits"].values())
    assert set(plan["by_bits"]) == {"2", "8"}  # TINY_RECIPE: balanced 2-bit and signed 8-bit layers
    onnx_info = info["onnx"]
    assert onnx_info["lowbit_nodes"] == report["export"]["lowbit_nodes"]
    assert onnx_info["stored_bits_per_weight"] == pytest.approx(report["export"]["stored_bits_per_weight"])
    assert onnx_info["quantized_weights"] == report["export"]["quantized_weights"]
    assert info["signature"]["from"] == "model.onnx" and info["signature"]["inputs"][0] == "sample"
    assert info["files"]["bytes"]["model.onnx"] == (run / "model.onnx").stat().st_size
    # The last validate in this module may have been a failing gate: inspect reports what report.json holds.
    backends = {item["artifact"]: item["status"] for item in info["validation"]["backends"]}
    assert backends == {item["artifact"]: item["status"] for item in report["validate"]["parity"]}
    assert backends["onnxruntime"] in ("passed", "failed") and backends["tensorrt"].startswith("not run")
    assert info["validation"]["passed"] is report["validate"]["passed"]
    assert info["build"]["status"].startswith("not run")
    human = invoke("inspect", run)
    assert human.exit_code == 0 and "stored bits per quantized weight" in human.stdout
    assert_closes(human, "PASSED")
