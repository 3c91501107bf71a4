"""Mutations change exactly what they claim, and validate's ONNX checks catch every kind (a reduced version of
benchmarks/mutation.py; the clean artifact passes)."""

import copy

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from lowbit_deploy.validate.mutation import MutationKind, mutate, quantized_layer_names


@pytest.fixture(scope="module")
def exported(tiny_run):
    return onnx.load(str(tiny_run / "model.onnx"))


@pytest.fixture(scope="module")
def context(tiny_run):
    from lowbit_deploy.validate.parity import prepare_validation

    return prepare_validation(tiny_run)


def _arrays(model):
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


def _changed(before, after):
    return {name: (before[name], after[name]) for name in before if before[name].tobytes() != after[name].tobytes()}


def test_every_quantized_layer_is_listed(exported, context):
    assert sorted(quantized_layer_names(exported)) == sorted(context.deployed.packed_layers())


def test_code_mutation_moves_one_code_to_a_neighbouring_level(exported, context):
    layer = quantized_layer_names(exported)[3]
    mutated = copy.deepcopy(exported)
    mutation = mutate(mutated, layer, MutationKind.CODE, seed=1)
    changed = _changed(_arrays(exported), _arrays(mutated))
    assert list(changed) == [f"unet.{layer}.packed"], mutation
    reference = context.deployed.packed_layers()[layer].packed_weight
    from lowbit_deploy.quant.packing import unpack_codes

    codes = [unpack_codes(words, reference.levels, reference.layout.fmt, reference.layout.numel)
             for words in changed[f"unet.{layer}.packed"]]
    differing = np.flatnonzero(codes[0] != codes[1])
    assert differing.size == 1 and abs(int(codes[0][differing[0]]) - int(codes[1][differing[0]])) == 1


def test_scale_mutation_is_one_fp16_ulp(exported):
    layer = quantized_layer_names(exported)[0]
    mutated = copy.deepcopy(exported)
    mutate(mutated, layer, MutationKind.SCALE, seed=0)
    before, after = _changed(_arrays(exported), _arrays(mutated))[f"unet.{layer}.scale"]
    index = np.flatnonzero(before != after)
    assert index.size == 1 and after[index[0]] == np.nextafter(before[index[0]], np.float16(np.inf))


def test_bias_mutation_is_a_relative_1e3_of_one_value(exported):
    layer = next(name for name in quantized_layer_names(exported)
                 if mutate(copy.deepcopy(exported), name, MutationKind.BIAS) is not None)
    mutated = copy.deepcopy(exported)
    mutate(mutated, layer, MutationKind.BIAS, seed=0)
    (name, (before, after)), = _changed(_arrays(exported), _arrays(mutated)).items()
    assert name.startswith(f"unet.{layer}.") and "bias" in name
    index = np.flatnonzero(before != after)
    assert index.size == 1
    relative = abs(float(after[index[0]]) / float(before[index[0]]) - 1)
    assert 5e-4 <= relative <= 2e-3  # 1e-3 rounded to the fp16 grid (one ulp is 2^-11..2^-10 relative)


def test_a_layer_without_bias_has_no_bias_mutation(exported):
    names = [name for name in quantized_layer_names(exported) if name.endswith("to_q")]
    assert names and mutate(copy.deepcopy(exported), names[0], MutationKind.BIAS) is None


def test_clean_artifact_passes_every_onnx_check(tiny_run, context):
    from lowbit_deploy.recipes import Gates
    from lowbit_deploy.validate.parity import check_onnx

    outputs, weights = check_onnx(tiny_run / "model.onnx", context, Gates())
    assert (outputs.status, weights.status) == ("passed", "passed"), (outputs, weights)
    assert weights.details["decoded_layers_checked"] == len(context.deployed.packed_layers())


@pytest.mark.parametrize("kind", list(MutationKind))
@pytest.mark.parametrize("position", [0, 5, -1])
def test_validate_catches_every_mutation_kind(tiny_run, exported, context, tmp_path, kind, position):
    from lowbit_deploy.recipes import Gates
    from lowbit_deploy.validate.parity import check_onnx

    candidates = [name for name in quantized_layer_names(exported)
                  if mutate(copy.deepcopy(exported), name, kind) is not None]
    layer = candidates[position]
    mutated = copy.deepcopy(exported)
    mutation = mutate(mutated, layer, kind, seed=3)
    onnx.save(mutated, str(tmp_path / "model.onnx"))
    outputs, weights = check_onnx(tmp_path / "model.onnx", context, Gates())
    assert weights.status == "failed", mutation
    assert any(layer in failure for failure in weights.failures), weights.failures
