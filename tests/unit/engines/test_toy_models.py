"""The hand-built toy ONNX models used by the build tests are valid and compute the dense reference in ONNX Runtime
(through the export stage's local function), so a TensorRT build of them tests the real contract."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit_deploy.quant.packing import PackingFormat


CHAINS = {
    "v1": [(3, PackingFormat.INT8_WORDS), (17, PackingFormat.INT32_WORDS)],
    "v2": [(3, PackingFormat.BITSTREAM), (17, PackingFormat.BITSTREAM)],
}


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_toy_chain_runs_in_onnxruntime(chain) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    import onnx

    from lowbit_deploy.engines.toy_models import conv_chain_model, random_weight

    rng = np.random.default_rng(0)
    (levels0, fmt0), (levels1, fmt1) = CHAINS[chain]
    weights = [random_weight("w0", (8, 8, 3, 3), levels0, fmt0, rng),
               random_weight("w1", (4, 8, 3, 3), levels1, fmt1, rng)]
    model = conv_chain_model(weights, (1, 8, 8, 8))
    assert [imp.version for imp in model.opset_import if imp.domain == "lowbit"] == [int(chain[1])]
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


def test_toy_chain_refuses_mixed_op_versions() -> None:
    from lowbit_deploy.engines.toy_models import conv_chain_model, random_weight

    rng = np.random.default_rng(0)
    weights = [random_weight("w0", (8, 8, 3, 3), 3, PackingFormat.INT8_WORDS, rng),
               random_weight("w1", (4, 8, 3, 3), 3, PackingFormat.BITSTREAM, rng)]
    with pytest.raises(ValueError, match="mixes"):
        conv_chain_model(weights, (1, 8, 8, 8))
