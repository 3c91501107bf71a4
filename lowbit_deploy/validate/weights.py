"""Exact weight parity of an exported ONNX file: what it stores, and what ONNX Runtime decodes from it.

Output gates cannot see every corruption: the float32 outputs of two correct runtimes already differ by op-ordering
noise (~130 dB SQNR on the default model), and one scale moved by one fp16 ulp changes the output by less than that
(benchmarks/mutation.py measures it). Weights, though, are exact by contract -- the packed codes, the fp16 scales and
the stored float parameters are the deployed model's bytes, and the op's decode is defined bit for bit -- so here
they are compared for equality:

1. every initializer named after a deployed-model tensor holds exactly its bytes, and every packed layer's
   ``.packed`` / ``.scale`` initializers exist;
2. every ``lowbit::UnpackDequantize`` node, executed by ONNX Runtime through its local function (in chunks, so a
   large model never holds all decoded weights at once), gives exactly the torch reference's decoded weight.

Native INT4 layers (export/native_int4.py) are held to the same contract: their codes must be stored as INT4 (and
compare, widened, with the int8 codes the torch model holds), and their ``DequantizeLinear`` is decoded like a
lowbit node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..export.lowbit_ops import OP_DOMAIN, OP_TYPE

DEFAULT_CHUNK_LAYERS = 32
_MAX_LISTED = 5


@dataclass
class WeightParity:
    initializers_checked: int
    initializers_unmatched: int  # exporter constants with no deployed-model tensor of that name (not compared)
    decoded_layers_checked: int
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"initializers_checked": self.initializers_checked,
                "initializers_unmatched": self.initializers_unmatched,
                "decoded_layers_checked": self.decoded_layers_checked, "failures": self.failures}


def _differs(stored: np.ndarray, reference: np.ndarray) -> str | None:
    if stored.dtype != reference.dtype or stored.shape != reference.shape:
        return f"{stored.dtype}{list(stored.shape)} instead of {reference.dtype}{list(reference.shape)}"
    if stored.tobytes() == reference.tobytes():
        return None
    wrong = np.flatnonzero(stored.reshape(-1).view(np.uint8 if stored.itemsize == 1 else f"u{stored.itemsize}")
                           != reference.reshape(-1).view(np.uint8 if reference.itemsize == 1
                                                         else f"u{reference.itemsize}"))
    first = int(wrong[0])
    return (f"{wrong.size} of {stored.size} values differ (first at flat index {first}: "
            f"{stored.reshape(-1)[first].item()!r} instead of {reference.reshape(-1)[first].item()!r})")


def _listed(failures: list[str]) -> list[str]:
    if len(failures) <= _MAX_LISTED:
        return failures
    return failures[:_MAX_LISTED] + [f"... and {len(failures) - _MAX_LISTED} more"]


def _stored(tensor) -> np.ndarray:
    """The initializer's values; INT4 (two codes per byte) as the int8 codes the deployed model holds."""
    from onnx import TensorProto, numpy_helper

    array = numpy_helper.to_array(tensor)
    return array.astype(np.int8) if tensor.data_type == TensorProto.INT4 else array


def _check_native_initializers(model, native_layers) -> list[str]:
    from onnx import TensorProto

    from ..export.native_int4 import CODES, SCALE

    types = {tensor.name: tensor.data_type for tensor in model.graph.initializer}
    failures = [f"initializer {layer}.{suffix} is missing" for layer in native_layers for suffix in (CODES, SCALE)
                if f"{layer}.{suffix}" not in types]
    return failures + [f"initializer {layer}.{CODES} is {TensorProto.DataType.Name(types[f'{layer}.{CODES}'])}, "
                       f"not INT4" for layer in native_layers
                       if types.get(f"{layer}.{CODES}", TensorProto.INT4) != TensorProto.INT4]


def _check_initializers(model, state: dict[str, np.ndarray], packed_layers) -> tuple[int, int, list[str]]:

    checked = unmatched = 0
    failures = []
    names = set()
    for tensor in model.graph.initializer:
        names.add(tensor.name)
        if tensor.name not in state:
            unmatched += 1
            continue
        checked += 1
        problem = _differs(_stored(tensor), state[tensor.name])
        if problem:
            failures.append(f"initializer {tensor.name}: {problem}")
    for layer in packed_layers:
        for suffix in ("packed", "scale"):
            if f"unet.{layer}.{suffix}" not in names:
                failures.append(f"initializer unet.{layer}.{suffix} is missing")
    return checked, unmatched, failures


def _decode_model(model, nodes):
    """A model holding only ``nodes`` (lowbit decodes) and their initializers, outputs = the decoded weights."""
    import onnx
    from onnx import helper

    inputs = {name for node in nodes for name in node.input}
    initializers = [tensor for tensor in model.graph.initializer if tensor.name in inputs]
    outputs = [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None) for node in nodes]
    graph = helper.make_graph(list(nodes), "decoded_weights", [], outputs, initializer=initializers)
    sub = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    sub.functions.extend(model.functions)
    return sub


def _check_decoding(model, packed_layers: dict, chunk_layers: int,
                    native_layers: dict | None = None) -> tuple[int, list[str]]:
    import onnxruntime as ort

    from ..export.native_int4 import CODES

    native_codes = {f"{name}.{CODES}": layer for name, layer in (native_layers or {}).items()}
    nodes = [n for n in model.graph.node if (n.domain == OP_DOMAIN and n.op_type == OP_TYPE)
             or (n.op_type == "DequantizeLinear" and n.input[0] in native_codes)]
    failures = []
    for start in range(0, len(nodes), chunk_layers):
        chunk = nodes[start:start + chunk_layers]
        try:
            # Constant folding would decode every weight of the chunk when the session opens and keep it beside
            # the run's outputs (two float32 copies per chunk; an SD1.5 validate grew past 14 GB): decode at run.
            session = ort.InferenceSession(_decode_model(model, chunk).SerializeToString(),
                                           providers=["CPUExecutionProvider"], disabled_optimizers=["ConstantFolding"])
            decoded = session.run([node.output[0] for node in chunk], {})
            del session
        except Exception as error:  # ORT's own exception types: a broken file fails the check, it never passes
            failures.append(f"ONNX Runtime cannot decode {chunk[0].name} .. {chunk[-1].name}: "
                            f"{str(error).splitlines()[0][:300]}")
            continue
        for node, weight in zip(chunk, decoded):
            if node.input[0] in native_codes:
                problem = _differs(weight, native_codes[node.input[0]].weight_value.numpy())
                if problem:
                    failures.append(f"decoded weight of {node.input[0]} (ONNX Runtime vs torch reference): {problem}")
                continue
            layer = node.input[0][len("unet."):-len(".packed")]
            if layer not in packed_layers:
                failures.append(f"{node.name} decodes {node.input[0]}, which the checkpoint does not pack")
                continue
            problem = _differs(weight, packed_layers[layer].weight_value.numpy())
            if problem:
                failures.append(f"decoded weight of {layer} (ONNX Runtime vs torch reference): {problem}")
        del decoded, weight  # before the next chunk's session decodes its own
    return len(nodes), failures


def weight_parity(onnx_path: str | Path, deployed, chunk_layers: int = DEFAULT_CHUNK_LAYERS) -> WeightParity:
    """Compare ``onnx_path``'s stored and decoded weights with ``deployed`` (an export.deployed.DeployedUNet)."""
    import onnx

    model = onnx.load(str(onnx_path))
    state = {name: tensor.detach().cpu().numpy() for name, tensor in deployed.state_dict().items()}
    from ..export.native_int4 import native_int4_layers

    packed_layers = deployed.packed_layers()
    native_layers = native_int4_layers(deployed)
    checked, unmatched, failures = _check_initializers(model, state, packed_layers)
    failures += _check_native_initializers(model, native_layers)
    decoded, decode_failures = _check_decoding(model, packed_layers, chunk_layers, native_layers)
    return WeightParity(checked, unmatched, decoded, _listed(failures + decode_failures))


__all__ = ["WeightParity", "weight_parity"]
