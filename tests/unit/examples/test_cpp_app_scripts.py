"""The Python side of examples/cpp_app (CPU): the tensor-directory format, make_inputs.py on a run's signature and
compare.py's gates against ONNX Runtime. The C++ program itself is compiled and run in tests/trt/test_cpp_app.py."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tinymodels import TINY_RECIPE

APP_DIR = Path(__file__).resolve().parents[3] / "examples" / "cpp_app"
sys.path.insert(0, str(APP_DIR))

import compare as compare_script  # noqa: E402
import make_inputs as make_inputs_script  # noqa: E402
from tensor_dir import MANIFEST, TensorDirError, read_tensors, write_tensors  # noqa: E402

CACHED_STEPS = 3


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory) -> Path:
    """The embedded default model quantized (0 QAT steps) and exported with cached time features (step_index input),
    the signature of runs/demo; ~5 s on one CPU thread."""
    from lowbit_deploy.export.onnx_export import export_run
    from lowbit_deploy.qat.trainer import train
    from lowbit_deploy.recipes import parse_recipe

    data = copy.deepcopy(TINY_RECIPE)
    data["name"] = "cpp-app-scripts"
    data["quantize"]["scale_init_iterations"] = 1
    data["quantize"]["layers"][2:4] = [{"pattern": "time_embedding.*", "cache": True},
                                       {"pattern": "*.time_emb_proj", "cache": True}]
    data["schedule"] = {"num_steps": CACHED_STEPS}
    data["train"] = {"steps": 0, "batch_size": 2, "checkpoint_every": 1, "data": "gaussian"}
    data["export"] = {"export_fp16_reference": False}
    data["validate"]["sampling"].pop("num_steps")
    root = tmp_path_factory.mktemp("cpp-app-scripts") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(parse_recipe(data), root, progress=False)
        export_run(root)
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "uint8", "int32", "int64", "bool"])
@pytest.mark.parametrize("shape", [(2, 3, 4), (5,), (), (0, 3)])
def test_tensor_directory_round_trips_every_dtype_and_rank(tmp_path, dtype, shape) -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 50).astype(dtype)
    write_tensors(tmp_path, {"x": array, "y": array.reshape(-1)})
    back = read_tensors(tmp_path)
    assert list(back) == ["x", "y"]
    assert back["x"].dtype == array.dtype and back["x"].shape == shape and np.array_equal(back["x"], array)
    assert (tmp_path / "x.bin").stat().st_size == array.nbytes
    shape_text = ",".join(map(str, shape)) or "scalar"
    assert f"x {dtype} {shape_text}" in (tmp_path / MANIFEST).read_text().splitlines()


def test_tensor_directory_reader_names_the_problem(tmp_path) -> None:
    with pytest.raises(TensorDirError, match="no tensors.txt"):
        read_tensors(tmp_path)
    write_tensors(tmp_path, {"x": np.zeros((2, 3), np.float32)})
    (tmp_path / "x.bin").write_bytes(b"\0" * 20)
    with pytest.raises(TensorDirError, match=r"holds 5 float32 values; shape \[2, 3\] needs 6"):
        read_tensors(tmp_path)
    (tmp_path / MANIFEST).write_text("x float64 2,3\n")
    with pytest.raises(TensorDirError, match="float64"):
        read_tensors(tmp_path)
    (tmp_path / MANIFEST).write_text("x float32 2;3\n")
    with pytest.raises(TensorDirError, match="not like 2,4,64,64"):
        read_tensors(tmp_path)
    with pytest.raises(TensorDirError, match="cannot be a file name"):
        write_tensors(tmp_path, {"../x": np.zeros(1, np.float32)})


def test_make_inputs_follow_the_run_signature_and_the_seed(cached_run, tmp_path) -> None:
    from lowbit_deploy.runtime.ort import read_signature

    signature = read_signature(cached_run / "model.onnx")
    assert make_inputs_script.main([str(cached_run), str(tmp_path / "a"), "--batch", "3", "--seed", "1"]) == 0
    inputs = read_tensors(tmp_path / "a")
    assert tuple(inputs) == signature.input_names == ("sample", "step_index", "encoder_hidden_states")
    assert inputs["sample"].shape == (3, *signature.sample_shape) and inputs["sample"].dtype == np.float32
    assert inputs["step_index"].dtype == np.int64 and inputs["step_index"].shape == (3,)
    assert 0 <= inputs["step_index"].min() and inputs["step_index"].max() < CACHED_STEPS
    assert inputs["encoder_hidden_states"].shape == (3, signature.seq_len, signature.cross_attention_dim)
    make_inputs_script.make_inputs(str(cached_run / "model.onnx"), tmp_path / "b", batch=3, seed=1)
    make_inputs_script.make_inputs(str(cached_run), tmp_path / "c", batch=3, seed=2)
    for name in inputs:
        assert (tmp_path / "a" / f"{name}.bin").read_bytes() == (tmp_path / "b" / f"{name}.bin").read_bytes()
    assert (tmp_path / "a" / "sample.bin").read_bytes() != (tmp_path / "c" / "sample.bin").read_bytes()


def test_make_inputs_without_a_run_is_a_clean_error(tmp_path, capsys) -> None:
    assert make_inputs_script.main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "no ONNX model" in capsys.readouterr().err


def test_compare_passes_onnx_runtimes_own_output_and_fails_a_perturbed_one(cached_run, tmp_path, capsys) -> None:
    """compare.py stands in for the GPU step here: a fake app output (ONNX Runtime's own, then perturbed)."""
    from lowbit_deploy.runtime.ort import OrtRunner

    inputs = make_inputs_script.make_inputs(str(cached_run), tmp_path / "in", batch=2, seed=0)
    reference = OrtRunner(cached_run / "model.onnx")({k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
    write_tensors(tmp_path / "same", {"noise_pred": reference})
    write_tensors(tmp_path / "off", {"noise_pred": reference + 0.1})
    args = [str(cached_run), str(tmp_path / "in")]

    assert compare_script.main([*args, str(tmp_path / "same")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("PASSED | cpp_app vs onnxruntime")
    assert compare_script.main([*args, str(tmp_path / "off")]) == 1
    out = capsys.readouterr().out
    assert "max_abs 0.1 > 0.05 (passes with --max-abs" in out and out.strip().splitlines()[-1].startswith("FAILED")
    assert compare_script.main([*args, str(tmp_path / "off"), "--max-abs", "0.2", "--min-cosine", "0.9",
                                "--min-sqnr-db", "10"]) == 0
    capsys.readouterr()
    assert compare_script.main([*args, str(tmp_path / "in")]) == 2
    assert "lacks output(s) noise_pred" in capsys.readouterr().err
