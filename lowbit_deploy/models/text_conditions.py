"""Real conditions for checkpoints that ship a CLIP text encoder (SD1.x/2.x layout: ``text_encoder/`` + ``tokenizer/``).

The prompts of the recipe's ``conditions.prompts_file`` are encoded once, in batches, when the model loads: the
encoder is frozen, so its outputs are the whole of what training, sampling and validation need, and the encoder is
dropped afterwards (its memory is free before the UNet loads). As in diffusers' SD pipelines the condition is the
text encoder's last hidden state over tokens padded to ``tokenizer.model_max_length``, and the unconditional (CFG)
state is the encoding of the empty prompt. transformers is an optional extra (``lowbit-deploy[text]``), imported
only here.
"""

from __future__ import annotations

import contextlib
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
                        f"key to train on random conditions (a run reads the file again to validate or resume: "
                        f"restore it there)")
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
    null: torch.Tensor       # [1, seq_len, dim] float32, the unconditional state (the empty prompt's, or zeros)
    truncated: int           # prompts longer than the tokenizer's max length (cut as diffusers does)
    pooled: torch.Tensor | None = None       # SDXL: [P, D] text_embeds (text_encoder_2's projection)
    null_pooled: torch.Tensor | None = None  # SDXL: [1, D]


@dataclass(frozen=True)
class _Encoder:
    """One tokenizer + CLIP text encoder pair of a pipeline folder."""

    encoder_dir: str
    tokenizer_dir: str
    with_projection: bool = False  # SDXL's text_encoder_2 (CLIPTextModelWithProjection: pooled text_embeds)


SD_ENCODERS = (_Encoder(TEXT_ENCODER_DIR, TOKENIZER_DIR),)
SDXL_ENCODERS = (_Encoder(TEXT_ENCODER_DIR, TOKENIZER_DIR), _Encoder(*SDXL_DIRS, with_projection=True))


def _load_clip(root: Path, pair: _Encoder, variant: str | None):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    encoder_dir = root / pair.encoder_dir
    config = _read_json(encoder_dir / "config.json")
    if config.get("model_type", "clip_text_model") != "clip_text_model":
        raise UserError(f"{encoder_dir} holds a {config.get('model_type')!r} text encoder; lowbit-deploy encodes "
                        f"prompts with CLIP text encoders (SD1.x/2.x, SDXL); drop conditions.prompts_file to train on "
                        f"random conditions")
    found = sorted(encoder_dir.glob("*.safetensors"))
    if not found:
        raise UserError(f"{encoder_dir} has no safetensors weights (lowbit-deploy loads safetensors only); re-save "
                        f"the text encoder with save_pretrained, or drop conditions.prompts_file")
    # The variant chosen for the UNet applies where the text encoder has it too (as diffusers pipelines load).
    use_variant = variant if variant and any(f".{variant}." in path.name for path in found) else None
    model_class = CLIPTextModelWithProjection if pair.with_projection else CLIPTextModel
    try:
        with _quiet_transformers():
            tokenizer = CLIPTokenizer.from_pretrained(str(root / pair.tokenizer_dir), local_files_only=True)
            encoder = model_class.from_pretrained(str(encoder_dir), local_files_only=True, use_safetensors=True,
                                                  variant=use_variant)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        summary = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot load the CLIP text encoder and tokenizer from {root}: {summary}; check "
                        f"{pair.encoder_dir}/ and {pair.tokenizer_dir}/ (re-save them with save_pretrained)") from None
    seq_len = int(tokenizer.model_max_length)
    if seq_len > encoder.config.max_position_embeddings:
        raise UserError(f"{root / pair.tokenizer_dir} pads to {seq_len} tokens but the text encoder has "
                        f"{encoder.config.max_position_embeddings} positions; set model_max_length in its "
                        f"tokenizer_config.json to at most that")
    return tokenizer, encoder.float().eval().requires_grad_(False)


@contextlib.contextmanager
def _quiet_transformers():
    """No loading progress bars of transformers' own on the CLI's stderr (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not readable JSON ({error}); re-save the text encoder with save_pretrained") \
            from None


def _run_encoder(tokenizer, encoder, texts: list[str], penultimate: bool,
                 pooled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states ``[N, seq_len, hidden]`` (last, or the penultimate layer's for SDXL) and, with ``pooled``, the
    projection model's text_embeds ``[N, D]``, encoded ``ENCODE_BATCH`` prompts at a time."""
    use_mask = bool(getattr(encoder.config, "use_attention_mask", False))  # diffusers masks only where asked to
    states, embeds = [], []
    for start in range(0, len(texts), ENCODE_BATCH):
        tokens = tokenizer(texts[start:start + ENCODE_BATCH], padding="max_length",
                           max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
        output = encoder(tokens.input_ids, attention_mask=tokens.attention_mask if use_mask else None,
                         output_hidden_states=penultimate)
        states.append((output.hidden_states[-2] if penultimate else output.last_hidden_state).float())
        if pooled:
            embeds.append(output.text_embeds.float())
    return torch.cat(states), torch.cat(embeds) if pooled else None


@torch.no_grad()
def encode_prompts(root: Path, prompts: Sequence[str], dim: int, variant: str | None = None,
                   pooled_dim: int | None = None, zeros_for_empty: bool = False) -> EncodedPrompts:
    """``prompts`` and the empty prompt through ``root``'s CLIP, as diffusers' pipelines encode them.

    SD1.x/2.x (``pooled_dim`` None): ``text_encoder``'s last hidden state over tokens padded to
    ``model_max_length``. SDXL (``pooled_dim``: the UNet's text_embeds width): both encoders' penultimate hidden
    states concatenated, and ``text_encoder_2``'s projected ``text_embeds``; ``zeros_for_empty`` (SDXL's
    ``force_zeros_for_empty_prompt``) makes the unconditional state zeros instead of the empty prompt's encoding.
    ``dim`` is the UNet's cross-attention width; text encoders of another width belong to another model."""
    pairs = SD_ENCODERS if pooled_dim is None else SDXL_ENCODERS
    texts = [*prompts, ""]
    # SD1.5's CLIP on 2 CPU cores: ~0.5 s per prompt; said up front, since it runs before any progress bar.
    logger.info("encoding %d prompts with %s", len(prompts), " + ".join(pair.encoder_dir for pair in pairs))
    states, pooled, seq_lens, truncated = [], None, set(), 0
    for pair in pairs:
        tokenizer, encoder = _load_clip(root, pair, variant)
        seq_len = int(tokenizer.model_max_length)
        seq_lens.add(seq_len)
        lengths = [len(ids) for ids in tokenizer(texts[:-1], truncation=False, verbose=False).input_ids]
        truncated = max(truncated, sum(length > seq_len for length in lengths))
        hidden, embeds = _run_encoder(tokenizer, encoder, texts, pooled_dim is not None, pair.with_projection)
        states.append(hidden)
        pooled = embeds if embeds is not None else pooled
        del encoder  # frozen: its outputs are all that is kept
    widths = {pair.encoder_dir: state.shape[-1] for pair, state in zip(pairs, states)}
    if len(seq_lens) != 1:
        raise UserError(f"the tokenizers in {root} pad to different lengths ({sorted(seq_lens)}); their encodings "
                        f"cannot be concatenated: set the same model_max_length in both tokenizer_config.json files")
    if sum(widths.values()) != dim:
        listed = " + ".join(f"{name} {width}" for name, width in widths.items())
        listed += f" = {sum(widths.values())}" if len(widths) > 1 else ""
        raise UserError(f"the text encoders in {root} give states of width {listed}, but "
                        f"the UNet's cross-attention takes {dim}: they belong to different models; put the matching "
                        f"text encoders there, or drop conditions.prompts_file to train on random conditions")
    if pooled is not None and pooled.shape[-1] != pooled_dim:
        raise UserError(f"{root / SDXL_DIRS[0]} projects to {pooled.shape[-1]} features, but the UNet's text_embeds "
                        f"take {pooled_dim}: they belong to different models; put the matching text_encoder_2 there")
    encoded = torch.cat(states, dim=-1)
    if truncated:
        logger.warning("%d of %d prompts are longer than the text encoder's %d tokens and were cut to fit",
                       truncated, len(prompts), seq_lens.pop())
    null, null_pooled = encoded[-1:].clone(), None if pooled is None else pooled[-1:].clone()
    if zeros_for_empty:
        null, null_pooled = torch.zeros_like(null), None if pooled is None else torch.zeros_like(null_pooled)
    return EncodedPrompts(tuple(prompts), encoded[:-1].contiguous(), null, truncated,
                          None if pooled is None else pooled[:-1].contiguous(), null_pooled)


class TextConditionSource(ConditionSource):
    """Conditions from a prompts file encoded by the checkpoint's CLIP text encoder(s) (see the module docstring).

    ``sample`` draws prompts uniformly with the caller's generator; ``null`` is the unconditional encoding. For SDXL
    the pooled ``text_embeds`` travel with their prompt (``sample_conditions``); other added conditions (``time_ids``)
    keep the interface's defaults."""

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

    def _pooled_spec(self) -> bool:
        return self.encoded.pooled is not None and any(spec.name == "text_embeds" for spec in self.added_specs)

    def _added_for(self, index: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        from .conditioning import draw_added

        pooled = self._pooled_spec()
        specs = [spec for spec in self.added_specs if not (pooled and spec.name == "text_embeds")]
        added = draw_added(specs, len(index), generator, self.added_sample_shape)
        if pooled:
            added["text_embeds"] = self.encoded.pooled[index]
        return {spec.name: added[spec.name] for spec in self.added_specs}

    def sample_conditions(self, batch: int, generator: torch.Generator):
        """Prompts drawn from the file with their states and (SDXL) pooled text_embeds."""
        from .conditioning import Conditions

        index = torch.randint(0, len(self.prompts), (batch,), generator=generator)
        return Conditions(self.encoded.states[index], self._added_for(index, generator))

    def draw_added(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if not self._pooled_spec():
            return super().draw_added(batch, generator)
        return self._added_for(torch.randint(0, len(self.prompts), (batch,), generator=generator), generator)

    def null_added(self, batch: int) -> dict[str, torch.Tensor]:
        added = super().null_added(batch)
        if self._pooled_spec():
            added["text_embeds"] = self.encoded.null_pooled.expand(batch, -1).clone()
        return added

    def prompt(self, label: int) -> str:
        raise UserError("class prompts only exist for the embedded default model; this checkpoint is conditioned "
                        "on the prompts of conditions.prompts_file")


def sdxl_text_embeds_dim(config: dict) -> int | None:
    """The width of an SDXL UNet's pooled ``text_embeds`` (its projection input less the 6 time ids' features), or
    None for UNets without SDXL's ``text_time`` embedding."""
    if config.get("addition_embed_type") != "text_time":
        return None
    return int(config["projection_class_embeddings_input_dim"]) - 6 * int(config["addition_time_embed_dim"])


def text_conditions(root: Path, prompts_file: str | os.PathLike, dim: int, variant: str | None = None,
                    pooled_dim: int | None = None) -> tuple[TextConditionSource, dict]:
    """The condition source of ``root``'s text encoder(s) over ``prompts_file``, and its entry for the reports;
    ``pooled_dim``: SDXL (see :func:`encode_prompts`)."""
    prompts = read_prompts(prompts_file)
    check_transformers(root)
    # SDXL pipelines default to zeros for the empty (negative) prompt unless model_index.json says otherwise.
    index_path = root / "model_index.json"
    zeros = pooled_dim is not None and bool(
        (_read_json(index_path) if index_path.is_file() else {}).get("force_zeros_for_empty_prompt", True))
    encoded = encode_prompts(root, prompts, dim, variant, pooled_dim, zeros)
    source = TextConditionSource(encoded)
    encoders = [pair.encoder_dir for pair in (SD_ENCODERS if pooled_dim is None else SDXL_ENCODERS)]
    return source, {"kind": "text_encoder", "text_encoder": ", ".join(str(root / name) for name in encoders),
                    "prompts_file": str(prompts_file), "prompts": len(prompts), "seq_len": source.seq_len,
                    "truncated_prompts": encoded.truncated,
                    "null": "zeros (force_zeros_for_empty_prompt)" if zeros else "the empty prompt's encoding"}
