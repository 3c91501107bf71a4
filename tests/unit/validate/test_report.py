import torch
from PIL import Image

from lowbit_deploy.validate.report import render_markdown, write_sample_grid


def test_sample_grid_has_three_panels_of_tiles(tmp_path):
    images = torch.linspace(-1, 1, 10 * 16 * 16).reshape(10, 1, 16, 16)
    write_sample_grid(tmp_path / "grid.png", [("FP", images), ("quantized (torch)", images), ("ORT", images)])
    grid = Image.open(tmp_path / "grid.png")
    panel_width = (5 * 17 - 1) * 4
    assert grid.size == (3 * panel_width + 2 * 6, (2 * 17 - 1) * 4 + 14)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_markdown_reports_verdict_and_not_run_artifacts():
    report = {"validate": {"passed": True, "parity": [
        {"artifact": "onnxruntime", "status": "passed", "failures": [],
         "stats": {"max_abs": 1e-7, "max_rel": 1e-5, "cosine": 1.0, "sqnr_db": 130.0}},
        {"artifact": "tensorrt", "status": "not run: no GPU", "failures": [], "stats": None}],
        "sampling": {"status": "passed", "psnr_ort_vs_torch_db": 120.0, "grid_png": "/x/samples.png"}}}
    text = render_markdown(report)
    assert "**PASSED**" in text and "| tensorrt | not run: no GPU |" in text and "![samples](samples.png)" in text


def test_markdown_states_where_conditions_came_from():
    base = {"passed": True, "parity": [], "sampling": {"status": "passed"}}
    warned = render_markdown({"validate": {**base, "conditions": {"kind": "random", "warning": "random conditions: "
                                                                  "no text encoder"}}})
    assert "Conditions: random -- **warning**: random conditions: no text encoder" in warned
    real = render_markdown({"validate": {**base, "conditions": {"kind": "text_encoder", "prompts": 3}}})
    assert "Conditions: text_encoder" in real and "warning" not in real
