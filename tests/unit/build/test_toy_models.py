"""The hand-built toy ONNX models used by the build tests are valid and compute the dense reference in ONNX Runtime
(through the export stage's local function), so a TensorRT build of them tests the real contract."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit_deploy.quant.packing import PackingFormat


def test_toy_chain_runs_in_onnxruntime() -> None:
    ort = pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    import onnx

    from lowbit_deploy.build.toy_models import conv_chain_model, random_weight

    rng = np.random.default_rng(0)
    weights = [random_weight("w0", (8, 8, 3, 3), 3, PackingFormat.INT8_WORDS, rng),
               random_weight("w1", (4, 8, 3, 3), 17, PackingFormat.INT32_WORDS, rng)]
    model = conv_chain_model(weights, (1, 8, 8, 8))
    if not model.functions:
        pytest.skip("lowbit_deploy.export.lowbit_ops is not available: no reference function to run")
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, 8, 8, 8)).astype(np.float32)
    (y,) = session.run(None, {"x": x})
    dense = [torch.from_numpy(w.dequantized()) for w in weights]
    conv = torch.nn.functional.conv2d
    expected = conv(torch.relu(conv(torch.from_numpy(x), dense[0], padding=1)), dense[1], padding=1).numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
