"""Train the embedded default model: a tiny class-prompted digit UNet, its prompt encoder and a digit classifier.

    python scripts/train_default_model.py --steps 1200 --seed 0 --out lowbit_deploy/models/default

Writes ``{unet,scheduler,prompt_encoder,classifier}/`` (safetensors + json), ``samples.png`` and ``README.md`` with
the measured figures. CPU only, seeded; about 6 minutes on 2 idle cores (20 minutes when the cores are shared).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit_deploy.models.classifier import train_classifier
from lowbit_deploy.models.conditioning import DIGIT_WORDS, PromptEncoder, digit_prompt
from lowbit_deploy.models.digits import load_digits
from lowbit_deploy.models.loading import default_unet_config
from lowbit_deploy.signature import DeployedSignature
from lowbit_deploy.validate.sampling import sample, unet_runner

# Pixel-space DDPM (Ho et al.): a linear schedule that ends near pure noise; samples are clipped to the data range.
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
                    "clip_sample": True, "prediction_type": "epsilon"}
# Paraphrases teach the rest of the vocabulary; the canonical template is what for_labels() uses.
TEMPLATES = ("a handwritten digit {word}", "a picture of the number {word}", "an image of the digit {word}",
             "the handwritten number {word}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1200, help="UNet optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("lowbit_deploy/models/default"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--cond-drop", type=float, default=0.1, help="probability of the empty prompt (for CFG)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--eval-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    return parser.parse_args()


def make_prompts(labels: torch.Tensor, generator: torch.Generator, cond_drop: float) -> list[str]:
    template_ids = torch.randint(0, len(TEMPLATES), (len(labels),), generator=generator)
    canonical = torch.rand(len(labels), generator=generator) < 0.5
    dropped = torch.rand(len(labels), generator=generator) < cond_drop
    prompts = []
    for label, template_id, use_canonical, drop in zip(labels.tolist(), template_ids.tolist(), canonical.tolist(),
                                                       dropped.tolist()):
        template = TEMPLATES[0] if use_canonical else TEMPLATES[template_id]
        prompts.append("" if drop else template.format(word=DIGIT_WORDS[label]))
    return prompts


def lr_factor(step: int, total: int, warmup: int = 50) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_unet(args: argparse.Namespace):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits("train")
    encoder = PromptEncoder(dim=default_unet_config()["cross_attention_dim"])
    unet = UNet2DConditionModel(**default_unet_config(encoder.dim))
    noise_scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    modules = torch.nn.ModuleDict({"unet": unet, "encoder": encoder}).train()
    ema = copy.deepcopy(modules).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, args.steps))
    started = time.perf_counter()
    for step in range(args.steps):
        index = torch.randint(0, images.shape[0], (args.batch_size,), generator=generator)
        x0 = images[index]
        states = encoder.encode(make_prompts(labels[index], generator, args.cond_drop))
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch_size,),
                                  generator=generator)
        prediction = unet(noise_scheduler.add_noise(x0, noise, timesteps), timesteps, states).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_param, param in zip(ema.parameters(), modules.parameters()):
                ema_param.lerp_(param, 1.0 - decay)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - started:6.1f}s", flush=True)
    return ema["unet"], ema["encoder"], noise_scheduler, time.perf_counter() - started, loss.item()


def save_grid(images: torch.Tensor, path: Path, columns: int, scale: int = 2) -> None:
    from PIL import Image

    rows = math.ceil(images.shape[0] / columns)
    size = images.shape[-1]
    canvas = torch.full((rows * (size + 1), columns * (size + 1)), -1.0)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * (size + 1):r * (size + 1) + size, c * (size + 1):c * (size + 1) + size] = image[0]
    pixels = ((canvas + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)


def evaluate(unet, encoder, classifier, scheduler_config: dict, args: argparse.Namespace, out: Path) -> dict:
    per_class = max(1, args.eval_samples // 10)
    prompted = torch.arange(10).repeat_interleave(per_class)
    with torch.no_grad():
        cond = encoder.encode([digit_prompt(label) for label in prompted.tolist()])
        null = encoder.encode([""])
    started = time.perf_counter()
    signature = DeployedSignature((1, 16, 16), cond.shape[1], cond.shape[2])
    images = sample(unet_runner(unet), signature, cond, null, scheduler_config=scheduler_config,
                    num_steps=args.eval_steps, guidance_scale=args.guidance, seed=args.seed)
    seconds = time.perf_counter() - started
    accuracy = classifier.accuracy(images, prompted)
    # Columns are classes 0..9, rows are seeds: one glance shows whether each prompt gives its digit.
    grid_order = images.reshape(10, per_class, 1, 16, 16).transpose(0, 1).reshape(-1, 1, 16, 16)
    save_grid(grid_order[:100], out / "samples.png", columns=10, scale=3)
    return {"generated_accuracy": accuracy, "eval_samples": int(prompted.numel()), "eval_seconds": seconds}


def write_readme(out: Path, args: argparse.Namespace, figures: dict) -> None:
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()
             and p.name != "README.md"}
    lines = [
        "# Embedded default model (generated by scripts/train_default_model.py)",
        "",
        "A tiny SD-like `UNet2DConditionModel` (16x16x1 digits, blocks DownBlock2D + 2x CrossAttnDownBlock2D, "
        f"{figures['unet_params']:,} parameters) conditioned on prompts such as `{digit_prompt(7)}` through a "
        "jointly trained word-level `PromptEncoder` (8 tokens x 64). Trained on scikit-learn's digits (train "
        "split), pixel-space DDPM (1000 steps, linear betas), 10% empty prompts so classifier-free guidance works. "
        "Weights are the EMA of the training run.",
        "",
        "Reproduce (CPU, 2 threads):",
        "",
        "```",
        f"python scripts/train_default_model.py --steps {args.steps} --seed {args.seed} --out {args.out}",
        "```",
        "",
        "## Measured",
        "",
        "| figure | value |",
        "|---|---|",
        f"| UNet training | {args.steps} steps x batch {args.batch_size}, {figures['train_seconds']:.0f} s "
        f"on {args.threads} CPU threads; last-step loss {figures['final_loss']:.4f} |",
        f"| classifier accuracy, real val digits | {figures['classifier_val_accuracy']:.3f} "
        f"({figures['classifier_seconds']:.0f} s to train) |",
        f"| generated digits recognised as the prompted class | {figures['generated_accuracy']:.3f} "
        f"({figures['eval_samples']} samples, DDIM {args.eval_steps} steps, CFG {args.guidance}, "
        f"seed {args.seed}, {figures['eval_seconds']:.0f} s) |",
        "",
        "`samples.png`: columns are the prompted digits 0-9, rows are samples.",
        "",
        "## Files",
        "",
        "| file | bytes |",
        "|---|---|",
        *[f"| {name} | {size:,} |" for name, size in sizes.items()],
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    train_images, train_labels = load_digits("train")
    classifier = train_classifier(train_images, train_labels, seed=args.seed)
    classifier_seconds = time.perf_counter() - started
    val_accuracy = classifier.accuracy(*load_digits("val"))
    print(f"classifier: val accuracy {val_accuracy:.4f} ({classifier_seconds:.1f} s)", flush=True)

    unet, encoder, noise_scheduler, train_seconds, final_loss = train_unet(args)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    noise_scheduler.save_pretrained(out / "scheduler")
    encoder.save(out / "prompt_encoder")
    classifier.save(out / "classifier")

    figures = evaluate(unet, encoder, classifier, dict(noise_scheduler.config), args, out)
    figures.update(classifier_val_accuracy=val_accuracy, classifier_seconds=classifier_seconds,
                   train_seconds=train_seconds, final_loss=final_loss, unet_params=sum(p.numel() for p in unet.parameters()))
    write_readme(out, args, figures)
    print(json.dumps(figures, indent=2))
    print(f"generated-digit accuracy {figures['generated_accuracy']:.3f} vs prompted class")


if __name__ == "__main__":
    main()
