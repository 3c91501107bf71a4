"""Real conditions for checkpoints that ship a CLIP text encoder (SD1.x/2.x layout: ``text_encoder/`` + ``tokenizer/``).

The prompts of the recipe's ``conditions.prompts_file`` are encoded once, in batches, when the model loads: the
encoder is frozen, so its outputs are the whole of what training, sampling and validation need, and the encoder is
dropped afterwards (its memory is free before the UNet loads). As in diffusers' SD pipelines the condition is the
text encoder's last hidden state over tokens padded to ``tokenizer.model_max_length``, and the unconditional (CFG)
state is the encoding of the empty prompt. transformers is an optional extra (``lowbit-deploy[text]``), imported
only here.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..errors import UserError
from .conditioning import ConditionSource

TEXT_ENCODER_DIR, TOKENIZER_DIR = "text_encoder", "tokenizer"
SDXL_DIRS = ("text_encoder_2", "tokenizer_2")
INSTALL_HINT = "pip install 'lowbit-deploy[text]'"
# Prompts per text-encoder forward: bounds the activations' memory for long prompt files.
ENCODE_BATCH = 32
logger = logging.getLogger(__name__)


def has_text_encoder(root: Path) -> bool:
    """Whether ``root`` is laid out like an SD1.x/2.x pipeline folder with a CLIP text encoder and its tokenizer."""
    return (root / TEXT_ENCODER_DIR / "config.json").is_file() and (root / TOKENIZER_DIR).is_dir()


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line (UTF-8; trailing whitespace and the final newline dropped); empty lines are errors."""
    path = Path(path)
    fix = "write one prompt per line (UTF-8), e.g. `a photo of a cat`"
    if not path.is_file():
        raise UserError(f"prompts file {path} (recipe key conditions.prompts_file) does not exist; {fix}, or drop the "
                        f"key to train on random conditions")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"prompts file {path} is not readable UTF-8 text ({error}); {fix}") from None
    prompts = [line.rstrip() for line in lines]
    while prompts and not prompts[-1]:
        prompts.pop()  # blank lines at the end are an editor's, not prompts
    if not prompts:
        raise UserError(f"prompts file {path} is empty; {fix}")
    empty = [str(number) for number, prompt in enumerate(prompts, start=1) if not prompt.strip()]
    if empty:
        listed = ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else "")
        raise UserError(f"prompts file {path} has empty lines ({listed}); remove them (the empty prompt is already "
                        f"the unconditional state of guidance)")
    return prompts


def check_transformers(root: Path) -> None:
    if importlib.util.find_spec("transformers") is None:
        raise UserError(f"{root} has a text encoder and the recipe names a prompts file, but the `transformers` "
                        f"package is not installed; install it with `{INSTALL_HINT}`, or drop conditions.prompts_file "
                        f"to train on random conditions")


@dataclass(frozen=True)
class EncodedPrompts:
    prompts: tuple[str, ...]
    states: torch.Tensor     # [P, seq_len, dim] float32, the prompts' encodings
    null: torch.Tensor       # [1, seq_len, dim] float32, the empty prompt's
    truncated: int           # prompts longer than the tokenizer's max length (cut as diffusers does)


def _load_clip(root: Path, variant: str | None):
    from transformers import CLIPTextModel, CLIPTokenizer

    encoder_dir = root / TEXT_ENCODER_DIR
    config = _read_json(encoder_dir / "config.json")
    if config.get("model_type", "clip_text_model") != "clip_text_model":
        raise UserError(f"{encoder_dir} holds a {config.get('model_type')!r} text encoder; lowbit-deploy encodes "
                        f"prompts with CLIP text encoders (SD1.x/2.x); drop conditions.prompts_file to train on random "
                        f"conditions")
    found = sorted(encoder_dir.glob("*.safetensors"))
    if not found:
        raise UserError(f"{encoder_dir} has no safetensors weights (lowbit-deploy loads safetensors only); re-save "
                        f"the text encoder with save_pretrained, or drop conditions.prompts_file")
    # The variant chosen for the UNet applies where the text encoder has it too (as diffusers pipelines load).
    use_variant = variant if variant and any(f".{variant}." in path.name for path in found) else None
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(root / TOKENIZER_DIR), local_files_only=True)
        encoder = CLIPTextModel.from_pretrained(str(encoder_dir), local_files_only=True, use_safetensors=True,
                                                variant=use_variant)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        summary = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot load the CLIP text encoder and tokenizer from {root}: {summary}; check "
                        f"{TEXT_ENCODER_DIR}/ and {TOKENIZER_DIR}/ (re-save them with save_pretrained)") from None
    return tokenizer, encoder.float().eval().requires_grad_(False)


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not readable JSON ({error}); re-save the text encoder with save_pretrained") \
            from None


@torch.no_grad()
def encode_prompts(root: Path, prompts: Sequence[str], dim: int, variant: str | None = None) -> EncodedPrompts:
    """``prompts`` and the empty prompt through ``root``'s CLIP: last hidden states, ``[N, model_max_length, dim]``.

    ``dim`` is the UNet's cross-attention width; a text encoder of another width belongs to another model."""
    tokenizer, encoder = _load_clip(root, variant)
    seq_len = int(tokenizer.model_max_length)
    hidden = int(encoder.config.hidden_size)
    if hidden != dim:
        raise UserError(f"the text encoder in {root / TEXT_ENCODER_DIR} has hidden size {hidden}, but the UNet's "
                        f"cross-attention takes {dim}: they belong to different models; put the matching text encoder "
                        f"there, or drop conditions.prompts_file to train on random conditions")
    if seq_len > encoder.config.max_position_embeddings:
        raise UserError(f"{root / TOKENIZER_DIR} pads to {seq_len} tokens but the text encoder has "
                        f"{encoder.config.max_position_embeddings} positions; set model_max_length in its "
                        f"tokenizer_config.json to at most that")
    texts = [*prompts, ""]
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False, verbose=False).input_ids]
    use_mask = bool(getattr(encoder.config, "use_attention_mask", False))  # diffusers masks only where asked to
    states = []
    for start in range(0, len(texts), ENCODE_BATCH):
        tokens = tokenizer(texts[start:start + ENCODE_BATCH], padding="max_length", max_length=seq_len,
                           truncation=True, return_tensors="pt")
        mask = tokens.attention_mask if use_mask else None
        states.append(encoder(tokens.input_ids, attention_mask=mask).last_hidden_state.float())
    encoded = torch.cat(states)
    truncated = sum(length > seq_len for length in lengths[:-1])
    if truncated:
        logger.warning("%d of %d prompts are longer than the text encoder's %d tokens and were cut to fit",
                       truncated, len(prompts), seq_len)
    return EncodedPrompts(tuple(prompts), encoded[:-1].contiguous(), encoded[-1:].clone(), truncated)


class TextConditionSource(ConditionSource):
    """Conditions from a prompts file encoded by the checkpoint's CLIP text encoder (see the module docstring).

    ``sample`` draws prompts uniformly with the caller's generator; ``null`` is the empty prompt's encoding."""

    def __init__(self, encoded: EncodedPrompts):
        self.encoded = encoded
        self.prompts = encoded.prompts
        _, self.seq_len, self.dim = encoded.states.shape
        self.num_classes = None

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        index = torch.randint(0, len(self.prompts), (batch,), generator=generator)
        return self.encoded.states[index], None

    def for_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """The cached encodings of prompts from the file, in the given order."""
        rows = {prompt: row for row, prompt in enumerate(self.prompts)}
        unknown = [prompt for prompt in prompts if prompt not in rows]
        if unknown:
            raise UserError(f"prompt {unknown[0]!r} is not in the prompts file; add it there (prompts are encoded "
                            f"once, when the model loads)")
        return self.encoded.states[[rows[prompt] for prompt in prompts]]

    def for_labels(self, labels: Sequence[int]) -> torch.Tensor:
        raise UserError("class labels only exist for the embedded default model; this checkpoint is conditioned on "
                        "the prompts of conditions.prompts_file (use `data: gaussian`)")

    def null(self, batch: int) -> torch.Tensor:
        return self.encoded.null.expand(batch, -1, -1).clone()

    def prompt(self, label: int) -> str:
        raise UserError("class prompts only exist for the embedded default model; this checkpoint is conditioned "
                        "on the prompts of conditions.prompts_file")


def text_conditions(root: Path, prompts_file: str | os.PathLike, dim: int,
                    variant: str | None = None) -> tuple[TextConditionSource, dict]:
    """The condition source of ``root``'s text encoder over ``prompts_file``, and its entry for the reports."""
    prompts = read_prompts(prompts_file)
    check_transformers(root)
    encoded = encode_prompts(root, prompts, dim, variant)
    source = TextConditionSource(encoded)
    return source, {"kind": "text_encoder", "text_encoder": str(root / TEXT_ENCODER_DIR),
                    "prompts_file": str(prompts_file), "prompts": len(prompts), "seq_len": source.seq_len,
                    "truncated_prompts": encoded.truncated}
