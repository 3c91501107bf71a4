"""Text-encoder conditions: a tiny CLIP in SD's layout encodes the recipe's prompts file; random states (warned)
where a checkpoint has no text encoder or the recipe names no prompts; bad prompts files and a missing transformers
package are refused before the UNet loads."""

from __future__ import annotations

import importlib.util
import json
import re
import logging
from pathlib import Path

import pytest
import torch

from lowbit_deploy.errors import UserError
from lowbit_deploy.models import load_model

PROMPTS = ["a cat", "a red dog", "the dog sat"]


def clip_encode(root: Path, prompts: list[str]) -> torch.Tensor:
    """The reference: diffusers' SD pipelines' encoding (pad to model_max_length, last hidden state), done here with
    transformers directly."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    encoder = CLIPTextModel.from_pretrained(str(root / "text_encoder")).eval()
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    with torch.no_grad():
        return encoder(tokens.input_ids).last_hidden_state


def test_conditions_are_the_clip_encodings_of_the_prompts(clip_checkpoint, prompts_file):
    from lowbit_deploy.models.text_conditions import TextConditionSource

    bundle = load_model(clip_checkpoint, prompts_file=prompts_file)
    source = bundle.condition
    assert isinstance(source, TextConditionSource)
    assert bundle.condition_report == {"kind": "text_encoder", "text_encoder": str(clip_checkpoint / "text_encoder"),
                                       "prompts_file": str(prompts_file), "prompts": 3, "seq_len": 12,
                                       "truncated_prompts": 0, "null": "the empty prompt's encoding"}
    reference = clip_encode(clip_checkpoint, PROMPTS)
    assert (source.seq_len, source.dim, source.num_classes) == (12, 16, None)
    assert source.encoded.states.dtype == torch.float32
    torch.testing.assert_close(source.for_prompts(PROMPTS), reference, rtol=0, atol=1e-6)
    # Each prompt differs from the others and from the empty prompt: the encodings carry the text.
    assert all(not torch.allclose(reference[i], reference[j]) for i in range(3) for j in range(i + 1, 3))
    # The unconditional state is the empty prompt's encoding, as diffusers uses for guidance.
    null = source.null(4)
    assert null.shape == (4, 12, 16)
    torch.testing.assert_close(null, clip_encode(clip_checkpoint, [""]).expand(4, -1, -1), rtol=0, atol=1e-6)
    assert not torch.allclose(null[0], reference[0])


def test_sample_draws_file_prompts_reproducibly(clip_checkpoint, prompts_file):
    source = load_model(clip_checkpoint, prompts_file=prompts_file).condition
    states, labels = source.sample(16, torch.Generator().manual_seed(3))
    again, _ = source.sample(16, torch.Generator().manual_seed(3))
    assert labels is None and states.shape == (16, 12, 16) and torch.equal(states, again)
    rows = source.for_prompts(PROMPTS)
    picked = [next(i for i in range(3) if torch.equal(state, rows[i])) for state in states]
    assert set(picked) == {0, 1, 2}  # 16 uniform draws over 3 prompts: each seen (seeded, so not flaky)
    with pytest.raises(UserError, match="not in the prompts file"):
        source.for_prompts(["a bird"])
    with pytest.raises(UserError, match="class labels only exist for the embedded default"):
        source.for_labels([1])


def test_text_conditions_drive_the_unet(clip_checkpoint, prompts_file):
    bundle = load_model(clip_checkpoint, prompts_file=prompts_file)
    states, _ = bundle.condition.sample(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        output = bundle.unet(torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), encoder_hidden_states=states).sample
    assert output.shape == (2, 1, 8, 8) and torch.isfinite(output).all()


def test_long_prompts_are_cut_and_counted(clip_checkpoint, tmp_path, caplog):
    path = tmp_path / "long.txt"
    path.write_text("a cat\n" + "a cat sat on the red dog and the dog sat on the cat\n")
    with caplog.at_level(logging.WARNING, logger="lowbit_deploy"):
        bundle = load_model(clip_checkpoint, prompts_file=path)
    assert bundle.condition_report["truncated_prompts"] == 1
    assert "1 of 2 prompts are longer than the text encoder's 12 tokens" in caplog.text
    torch.testing.assert_close(bundle.condition.encoded.states, clip_encode(clip_checkpoint, path.read_text()
                                                                            .splitlines()), rtol=0, atol=1e-6)


def make_tiny_sdxl_unet():
    """The tiny SDXL UNet factory of tests/tinymodels.py (added with the SDXL UNet support)."""
    import tinymodels

    factory = getattr(tinymodels, "make_tiny_sdxl_unet", None)
    if factory is None:
        pytest.skip("tests/tinymodels.py has no make_tiny_sdxl_unet yet (SDXL UNet support)")
    return factory


def _random_warning(bundle) -> str:
    assert bundle.condition_report["kind"] == "random"
    return bundle.condition_report["warning"]


@pytest.mark.parametrize("case", ["no_text_encoder", "no_prompts_file", "sdxl_unet_without_text_encoder_2"])
def test_random_conditions_are_warned(case, clip_checkpoint, foreign_checkpoint, prompts_file, tmp_path, caplog):
    from lowbit_deploy.models.conditioning import RandomConditionSource

    if case == "sdxl_unet_without_text_encoder_2":
        root = tmp_path / "sdxl-one-encoder"
        make_tiny_sdxl_unet()(cross_attention_dim=16).save_pretrained(root / "unet")
        for name in ("text_encoder", "tokenizer"):
            (clip_checkpoint / name).rename(root / name)
    else:
        root = foreign_checkpoint if case == "no_text_encoder" else clip_checkpoint
    with caplog.at_level(logging.WARNING, logger="lowbit_deploy"):
        bundle = load_model(root, prompts_file=None if case == "no_prompts_file" else prompts_file)
    assert isinstance(bundle.condition, RandomConditionSource)
    warning = _random_warning(bundle)
    reason = {"no_text_encoder": f"{root.resolve()} has no text_encoder/ and tokenizer/",
              "no_prompts_file": "the recipe names no prompts file",
              "sdxl_unet_without_text_encoder_2": "no text_encoder_2/ and tokenizer_2/ for this SDXL UNet's pooled "
                                                  "text_embeds"}[case]
    assert reason in warning and "conditions.prompts_file" in warning and warning in caplog.text


def test_default_model_ignores_prompts_file_with_a_warning(prompts_file):
    bundle = load_model(None, prompts_file=prompts_file)
    assert bundle.condition.num_classes == 10
    assert bundle.condition_report["kind"] == "prompts"
    assert "is not used" in bundle.condition_report["warning"]


@pytest.mark.parametrize("content, message", [
    (None, r"\(recipe key conditions.prompts_file\) does not exist"),
    ("", "is empty"),
    ("\n\n  \n", "is empty"),
    ("a cat\n\na dog\n", r"has empty lines \(2\)"),
    ("a cat\n   \na dog\n", r"has empty lines \(2\)"),
    (b"\xff\xfe a cat", "is not readable UTF-8"),
])
@pytest.mark.parametrize("checkpoint", ["clip_checkpoint", "foreign_checkpoint"])
def test_bad_prompts_files(content, message, checkpoint, tmp_path, request, monkeypatch):
    root = request.getfixturevalue(checkpoint)
    path = tmp_path / "prompts.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    # Refused before the UNet loads (on either layout: a bad prompts file is bad input even where it is not used).
    monkeypatch.setattr("lowbit_deploy.models.loading._load_unet", _must_not_load)
    with pytest.raises(UserError, match=re.escape(f"prompts file {path} ") + message):
        load_model(root, prompts_file=path)


def _must_not_load(*args, **kwargs):
    raise AssertionError("the UNet was loaded before the bad input was found")


def test_missing_transformers_names_the_extra(clip_checkpoint, prompts_file, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "transformers" else real(name, *args))
    monkeypatch.setattr("lowbit_deploy.models.loading._load_unet", _must_not_load)
    with pytest.raises(UserError, match=r"`transformers` package is not installed; install it with "
                                        r"`pip install 'lowbit-deploy\[text\]'`"):
        load_model(clip_checkpoint, prompts_file=prompts_file)


def test_text_encoder_of_another_width_is_refused(tmp_path, prompts_file, tiny_clip_writer):
    from tinymodels import make_tiny_unet

    root = tmp_path / "mismatched"
    make_tiny_unet(cross_attention_dim=16).save_pretrained(root / "unet")
    tiny_clip_writer(root, hidden=8)
    with pytest.raises(UserError, match="give states of width text_encoder 8, but the UNet's cross-attention takes 16"):
        load_model(root, prompts_file=prompts_file)


def test_tokenizer_longer_than_the_encoder_is_refused(tmp_path, prompts_file, tiny_clip_writer):
    from tinymodels import make_tiny_unet

    root = tmp_path / "long-tokenizer"
    make_tiny_unet(cross_attention_dim=16).save_pretrained(root / "unet")
    tiny_clip_writer(root, max_length=40)
    with pytest.raises(UserError, match="pads to 40 tokens but the text encoder has 16 positions"):
        load_model(root, prompts_file=prompts_file)


def test_recipe_prompts_file_is_relative_to_the_recipe(tmp_path, tiny_recipe_dict):
    import yaml

    from lowbit_deploy.recipes import load_recipe, parse_recipe

    folder = tmp_path / "recipes"
    folder.mkdir()
    tiny_recipe_dict["conditions"] = {"prompts_file": "prompts/cats.txt"}
    (folder / "r.yaml").write_text(yaml.safe_dump(tiny_recipe_dict))
    recipe = load_recipe(folder / "r.yaml")
    assert recipe.conditions.prompts_file == str((folder / "prompts" / "cats.txt").resolve())
    tiny_recipe_dict["conditions"] = {"prompt_file": "x.txt"}
    with pytest.raises(UserError, match="conditions.prompt_file"):
        parse_recipe(tiny_recipe_dict)


def _states_of(args, kwargs) -> torch.Tensor:
    """The encoder_hidden_states of a UNet call (keyword, or diffusers' third positional argument)."""
    return (kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]).detach().clone()


class _RecordConditions:
    """Records the encoder_hidden_states of every student call in a training run."""

    def __init__(self):
        self.states: list[torch.Tensor] = []

    def on_train_begin(self, run) -> None:
        def hook(module, args, kwargs):
            self.states.append(_states_of(args, kwargs))

        run.student.register_forward_pre_hook(hook, with_kwargs=True)

    def __getattr__(self, name):  # the other callback hooks do nothing
        return lambda *args, **kwargs: None


def test_training_uses_text_conditions(clip_checkpoint, prompts_file, tiny_recipe_dict, tmp_path):
    from lowbit_deploy.qat.trainer import train
    from lowbit_deploy.recipes import parse_recipe

    tiny_recipe_dict["conditions"] = {"prompts_file": str(prompts_file)}
    tiny_recipe_dict["train"]["condition_drop_prob"] = 0.5
    recorder = _RecordConditions()
    run_dir = tmp_path / "run"
    train(parse_recipe(tiny_recipe_dict), run_dir, model_path=str(clip_checkpoint), steps=2, progress=False,
          callbacks=(recorder,))
    report = json.loads((run_dir / "report.json").read_text())["train"]
    assert report["conditions"]["kind"] == "text_encoder" and "warning" not in report["conditions"]
    # Every row the student saw is one of the file's prompts or the empty prompt (dropped conditions).
    allowed = torch.cat([clip_encode(clip_checkpoint, PROMPTS), clip_encode(clip_checkpoint, [""])])
    rows = torch.cat(recorder.states)
    assert len(rows) == 4
    for row in rows:
        assert any(torch.allclose(row, candidate, rtol=0, atol=1e-6) for candidate in allowed)


def test_training_report_warns_about_random_conditions(foreign_checkpoint, tiny_recipe_dict, tmp_path):
    from lowbit_deploy.qat.trainer import train
    from lowbit_deploy.recipes import parse_recipe

    run_dir = tmp_path / "run"
    train(parse_recipe(tiny_recipe_dict), run_dir, model_path=str(foreign_checkpoint), steps=1, progress=False)
    conditions = json.loads((run_dir / "report.json").read_text())["train"]["conditions"]
    assert conditions["kind"] == "random" and "has no text encoder" in conditions["warning"]
    assert "text_encoder/ and tokenizer/" in conditions["warning"]


@pytest.mark.slow
def test_export_and_validate_use_the_recorded_prompts(clip_checkpoint, prompts_file, tiny_recipe_dict, tmp_path):
    """The whole chain on the tiny CLIP checkpoint: validate reloads the text conditions the run recorded (parity
    inputs and sampling) and reports them."""
    from lowbit_deploy.export.onnx_export import export_run
    from lowbit_deploy.models.text_conditions import TextConditionSource
    from lowbit_deploy.qat.trainer import train
    from lowbit_deploy.recipes import parse_recipe
    from lowbit_deploy.validate.parity import prepare_validation, validate_run

    tiny_recipe_dict["conditions"] = {"prompts_file": str(prompts_file)}
    run_dir = tmp_path / "run"
    train(parse_recipe(tiny_recipe_dict), run_dir, model_path=str(clip_checkpoint), steps=1, progress=False)
    export_run(run_dir)
    context = prepare_validation(run_dir)
    assert isinstance(context.bundle.condition, TextConditionSource)
    report = validate_run(run_dir)
    assert report.passed
    entry = json.loads((run_dir / "report.json").read_text())["validate"]
    assert entry["conditions"]["kind"] == "text_encoder" and entry["conditions"]["prompts"] == 3
    assert "Conditions: text_encoder" in (run_dir / "report.md").read_text()


# SDXL: two CLIPs (text_encoder/ hidden 8 + text_encoder_2/ hidden 8 with an 8-wide projection) for the tiny SDXL
# UNet (cross-attention 16, text_embeds 8).
@pytest.fixture
def sdxl_checkpoint(tmp_path, tiny_clip_writer) -> Path:
    root = tmp_path / "tiny-sdxl"
    make_tiny_sdxl_unet()(cross_attention_dim=16).save_pretrained(root / "unet")  # skips without SDXL support
    from tinymodels import TINY_SDXL_TEXT_DIM

    tiny_clip_writer(root, hidden=8)
    tiny_clip_writer(root, hidden=8, seed=1, encoder_dir="text_encoder_2", tokenizer_dir="tokenizer_2",
                     projection_dim=TINY_SDXL_TEXT_DIM)
    return root


def sdxl_encode(root: Path, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference, as diffusers' SDXL pipeline encodes: both encoders' penultimate hidden states concatenated,
    text_encoder_2's projected text_embeds pooled."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    states = []
    for encoder_dir, tokenizer_dir, model_class in (("text_encoder", "tokenizer", CLIPTextModel),
                                                    ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection)):
        tokenizer = CLIPTokenizer.from_pretrained(str(root / tokenizer_dir))
        encoder = model_class.from_pretrained(str(root / encoder_dir)).eval()
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            output = encoder(ids, output_hidden_states=True)
        states.append(output.hidden_states[-2])
    return torch.cat(states, dim=-1), output.text_embeds


@pytest.mark.parametrize("force_zeros", [None, False])
def test_sdxl_prompts_use_both_encoders_and_pooled_embeds(sdxl_checkpoint, prompts_file, force_zeros):
    if force_zeros is not None:
        (sdxl_checkpoint / "model_index.json").write_text(json.dumps({"force_zeros_for_empty_prompt": force_zeros}))
    bundle = load_model(sdxl_checkpoint, prompts_file=prompts_file)
    source = bundle.condition
    assert bundle.condition_report["kind"] == "text_encoder" and "text_encoder_2" in bundle.condition_report[
        "text_encoder"]
    states, pooled = sdxl_encode(sdxl_checkpoint, PROMPTS)
    torch.testing.assert_close(source.for_prompts(PROMPTS), states, rtol=0, atol=1e-6)
    conditions = source.sample_conditions(8, torch.Generator().manual_seed(2))
    assert set(conditions.added) == {"text_embeds", "time_ids"}
    for row, embeds in zip(conditions.encoder_hidden_states, conditions.added["text_embeds"]):
        index = next(i for i in range(3) if torch.allclose(row, states[i], rtol=0, atol=1e-6))
        torch.testing.assert_close(embeds, pooled[index], rtol=0, atol=1e-6)  # the same prompt's pooled embeds
    null = source.null_conditions(2)
    if force_zeros is None:  # SDXL's default: zeros for the empty prompt
        assert not null.encoder_hidden_states.any() and not null.added["text_embeds"].any()
    else:
        empty_states, empty_pooled = sdxl_encode(sdxl_checkpoint, [""])
        torch.testing.assert_close(null.encoder_hidden_states, empty_states.expand(2, -1, -1), rtol=0, atol=1e-6)
        torch.testing.assert_close(null.added["text_embeds"], empty_pooled.expand(2, -1), rtol=0, atol=1e-6)
    with torch.no_grad():
        output = bundle.unet(torch.randn(8, 4, 8, 8), torch.full((8,), 10), **conditions.unet_keywords()).sample
    assert output.shape == (8, 4, 8, 8) and torch.isfinite(output).all()


def test_sdxl_encoders_of_another_width_are_refused(sdxl_checkpoint, prompts_file, tiny_clip_writer):
    import shutil

    shutil.rmtree(sdxl_checkpoint / "text_encoder_2")
    shutil.rmtree(sdxl_checkpoint / "tokenizer_2")
    tiny_clip_writer(sdxl_checkpoint, hidden=8, encoder_dir="text_encoder_2", tokenizer_dir="tokenizer_2",
                     projection_dim=6)
    with pytest.raises(UserError, match="projects to 6 features, but the UNet's text_embeds take 8"):
        load_model(sdxl_checkpoint, prompts_file=prompts_file)


def test_sdxl_training_uses_prompts_and_their_pooled_embeds(sdxl_checkpoint, prompts_file, tiny_recipe_dict,
                                                            tmp_path):
    from lowbit_deploy.qat.trainer import train
    from lowbit_deploy.recipes import parse_recipe

    tiny_recipe_dict["conditions"] = {"prompts_file": str(prompts_file)}
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Record(_RecordConditions):
        def on_train_begin(self, run) -> None:
            def hook(module, args, kwargs):
                seen.append((_states_of(args, kwargs), kwargs["added_cond_kwargs"]["text_embeds"].detach().clone()))

            run.student.register_forward_pre_hook(hook, with_kwargs=True)

    run_dir = tmp_path / "run"
    train(parse_recipe(tiny_recipe_dict), run_dir, model_path=str(sdxl_checkpoint), steps=2, progress=False,
          callbacks=(Record(),))
    assert json.loads((run_dir / "report.json").read_text())["train"]["conditions"]["kind"] == "text_encoder"
    states, pooled = sdxl_encode(sdxl_checkpoint, PROMPTS)
    states = torch.cat([states, torch.zeros_like(states[:1])])  # the null: zeros, SDXL's default
    pooled = torch.cat([pooled, torch.zeros_like(pooled[:1])])
    rows = [(state, embeds) for batch_states, batch_embeds in seen for state, embeds in zip(batch_states, batch_embeds)]
    assert len(rows) == 4
    for state, embeds in rows:  # a prompt (or the zero null) with its own pooled embeds
        index = next(i for i in range(4) if torch.allclose(state, states[i], rtol=0, atol=1e-6))
        torch.testing.assert_close(embeds, pooled[index], rtol=0, atol=1e-6)
