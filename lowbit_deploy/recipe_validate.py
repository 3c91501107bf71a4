"""The recipe's ``validate`` section: parity gates per backend, the floor-following gates, the sampling comparison.
The schema (recipes.py) uses and re-exports every name."""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import Field, model_validator

from .recipe_types import _Strict


class Tolerances(_Strict):
    """Output gates of one backend (worst case over the parity batches)."""

    max_abs: Annotated[float, Field(ge=0)]
    max_rel: Optional[Annotated[float, Field(ge=0)]] = None
    min_cosine: Annotated[float, Field(ge=-1, le=1)]
    min_sqnr_db: float


# Fixed gates, calibrated in docs/gates.md, used where follow_floor does not set them. TensorRT (fp16/TF32 kernels)
# is provisional: no engine could run where it was set.
ONNXRUNTIME_GATES = Tolerances(max_abs=2e-5, min_cosine=1 - 1e-10, min_sqnr_db=120.0)
TENSORRT_GATES = Tolerances(max_abs=5e-2, min_cosine=0.9999, min_sqnr_db=40.0)
PER_LAYER_MIN_SQNR_DB = 110.0


class FloorGates(_Strict):
    """Gates relative to the model's float32 noise floor F: the deployed torch model in float32 vs float64 on the
    parity inputs (validate/floor.py). On the default model F = 131.3 dB and clean artifacts measured: ONNX Runtime
    130.5 dB, per-layer minimum 124.4 dB, sampling PSNR 113.9 dB (docs/gates.md). A null field uses the fixed gate."""

    output_margin_db: Optional[float] = 10.0     # ONNX Runtime output SQNR >= F - 10
    max_abs_factor: Optional[Annotated[float, Field(gt=0)]] = 10.0  # max abs <= 10 x the floor's max abs
    per_layer_margin_db: Optional[float] = 20.0  # every layer and block output >= F - 20
    sampling_margin_db: Optional[float] = 30.0   # sampling PSNR (errors accumulate over the steps) >= F - 30
    # Quantized activations: sampling PSNR >= min(F - 30, P1 - 5), P1 the PSNR one rounding flip per image at the
    # first step gives (validate/flip_floor.py). Clean tiny activation-quantized runs that flipped measured 40.6..59.4
    # dB with P1 35.1..40.6 dB: >= 10 dB above this gate (docs/gates.md).
    sampling_flip_margin_db: Optional[float] = 5.0


class Gates(_Strict):
    """Parity gates per backend; ``validate --per-layer`` gates every layer output at ``per_layer_min_sqnr_db``;
    ``follow_floor`` (null: off) replaces the ONNX Runtime, per-layer and sampling values by floor-relative ones."""

    onnxruntime: Tolerances = ONNXRUNTIME_GATES
    tensorrt: Tolerances = TENSORRT_GATES
    per_layer_min_sqnr_db: float = PER_LAYER_MIN_SQNR_DB
    follow_floor: Optional[FloorGates] = FloorGates()

    def for_backend(self, backend: str) -> Tolerances:
        return getattr(self, backend)


class SamplingSection(_Strict):
    num_samples: Annotated[int, Field(ge=1)] = 10
    num_steps: Optional[Annotated[int, Field(ge=1)]] = Field(None, description="null = schedule.num_steps")
    guidance_scale: Annotated[float, Field(ge=1)] = 3.0
    seed: int = 1234
    # Used where validate.gates.follow_floor is off: ORT vs torch samples measured 113.9..122.4 dB on the default
    # model (docs/gates.md); the old 40 dB let real bugs pass.
    min_psnr_db: float = 100.0


class ValidateSection(_Strict):
    batches: Annotated[int, Field(ge=1)] = 2
    batch_size: Annotated[int, Field(ge=1)] = 4
    seed: int = 0
    gates: Gates = Gates()
    sampling: SamplingSection = SamplingSection()

    @model_validator(mode="before")
    @classmethod
    def _explicit_gates_win(cls, data):
        """A gate written in the recipe is used as written: it turns off following the noise floor for that gate
        (unless ``gates.follow_floor`` is given too). ``tolerances:`` (recipes and checkpoints written before
        per-backend gates) is one fixed output gate for every backend."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        gates = dict(data.get("gates") or {})
        if "tolerances" in data:
            shared = data.pop("tolerances")
            for backend in ("onnxruntime", "tensorrt"):
                gates.setdefault(backend, shared)
        if "follow_floor" not in gates:
            floor = FloorGates().model_dump()
            if "onnxruntime" in gates:
                floor.update(output_margin_db=None, max_abs_factor=None)
            if "per_layer_min_sqnr_db" in gates:
                floor["per_layer_margin_db"] = None
            if isinstance(data.get("sampling"), dict) and "min_psnr_db" in data["sampling"]:
                floor.update(sampling_margin_db=None, sampling_flip_margin_db=None)
            gates["follow_floor"] = floor
        data["gates"] = gates
        return data
