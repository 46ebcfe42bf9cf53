"""``tokenreduce train-proxies``: train the proxy models, the feature extractor and the latent
proxies' autoencoder.

Deterministic for a given machine and software: fixed seeds, fixed step counts, and PyTorch's
deterministic algorithms enforced (an op without a deterministic implementation raises instead
of warning; the cuBLAS workspace is fixed). Minutes on one GPU; a few steps run on a CPU in the
tests.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from tokenreduce.quality.proxy.data import PhotoBank, photo_bank, sample_crops
from tokenreduce.quality.proxy.features import ProxyFeatures, features_path
from tokenreduce.quality.proxy.models import (
    IMAGE_SIZE,
    KINDS,
    LATENT_KINDS,
    SDXL_SCHEDULE,
    ProxyPipeline,
    build_denoiser,
    build_prompts,
    pack,
    predict,
    save_proxy,
    spec,
    weights_path,
)

if TYPE_CHECKING:
    from tokenreduce.quality.proxy.latent import ProxyAutoencoder

PARTS = ("features", *KINDS, "ae", *LATENT_KINDS)
# Parts trained by default: the pixel proxies (the latent ones are asked for by name or --latent).
DEFAULT_PARTS = ("features", *KINDS)
Sampler = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch: int = 128
    lr: float = 6e-4
    warmup: int = 100
    ema: float = 0.999
    uncond: float = 0.1  # probability of the null prompt (classifier-free guidance)
    seed: int = 0


@contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """PyTorch's deterministic mode for the block; the previous global settings come back after."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    # Strict: memory-efficient attention picks its deterministic backward only without warn_only.
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        torch.backends.cuda.matmul.allow_tf32 = saved[3]
        torch.backends.cudnn.allow_tf32 = saved[4]


def _schedule(opt: torch.optim.Optimizer, settings: TrainSettings) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up, then cosine decay to a tenth of the rate."""
    import math

    def factor(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def loss_curve(losses: list[float], points: int = 10) -> list[float]:
    """The logged losses (every 10th step) summarised as the means of ``points`` equal spans."""
    spans = [losses[i * len(losses) // points : (i + 1) * len(losses) // points] for i in range(points)]
    return [round(sum(s) / len(s), 5) for s in spans if s]


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def train_denoiser(
    kind: str,
    bank: PhotoBank,
    settings: TrainSettings,
    device: torch.device,
    console: Console | None = None,
    vae: ProxyAutoencoder | None = None,
) -> ProxyPipeline:
    """Train one proxy: on pixel crops of ``bank``, or (latent kinds) on the latents that ``vae``
    gives for crops or clips of ``bank``."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    arch = spec(kind).arch
    if (vae is None) != (kind in KINDS):  # checked before training, not after
        raise ValueError(f"a {kind!r} proxy {'needs' if vae is None else 'takes no'} autoencoder")
    if vae is None:
        sample: Sampler = lambda count, gen: sample_crops(bank.train, count, IMAGE_SIZE, gen)  # noqa: E731
    else:
        from tokenreduce.quality.proxy.latent import latent_batch

        vae = vae.to(device).eval()
        sample = lambda count, gen: latent_batch(kind, bank, vae, count, gen)  # noqa: E731

    torch.manual_seed(settings.seed)
    prompts = build_prompts(kind, len(bank.names))  # a module of ``net``, moved and trained in place
    net = nn.ModuleDict({"denoiser": build_denoiser(kind), "prompts": prompts}).to(device)
    # EMA with warm-up (decay 1 - (1 + step)^-3/4, capped): a fixed decay would keep a third of
    # the initial weights after a thousand steps.
    ema = EMAModel(net.parameters(), decay=settings.ema, use_ema_warmup=True, power=0.75, foreach=True)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, betas=(0.9, 0.99), weight_decay=0.0)
    lr = _schedule(opt, settings)
    ddpm = DDPMScheduler(**SDXL_SCHEDULE)
    alphas = ddpm.alphas_cumprod.to(device)
    gen = torch.Generator(device).manual_seed(settings.seed + 1)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(settings.steps):
        x0, labels = sample(settings.batch, gen)
        drop = torch.rand(settings.batch, generator=gen, device=device) < settings.uncond
        labels = torch.where(drop, len(bank.names), labels)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        if arch == "sdxl":
            t = torch.randint(
                0, ddpm.config.num_train_timesteps, (settings.batch,), generator=gen, device=device
            )
            a = alphas[t].view(-1, 1, 1, 1)
            x_t, target, timestep = a.sqrt() * x0 + (1 - a).sqrt() * noise, noise, t
        else:
            sigma = torch.sigmoid(torch.randn(settings.batch, generator=gen, device=device))
            s = sigma.view(-1, *[1] * (x0.dim() - 1))
            x_t, target, timestep = (1 - s) * x0 + s * noise, noise - x0, sigma
            if arch == "flux":
                x_t, target = pack(x_t), pack(target)
        with _autocast(device):
            tokens, pooled = net["prompts"](labels)
            out = predict(kind, net["denoiser"], x_t, timestep, tokens, pooled)
        loss = F.mse_loss(out.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        lr.step()
        ema.step(net.parameters())
        if step % 10 == 0 or step == settings.steps - 1:
            losses.append(loss.item())
        if console and (step % 500 == 0 or step == settings.steps - 1):
            console.print(f"{kind} step {step}/{settings.steps} loss {loss.item():.4f}")
    seconds = time.perf_counter() - start
    ema.copy_to(net.parameters())
    trained = net
    tail = losses[-10:]
    record = {
        "kind": kind,
        "settings": asdict(settings),
        "seconds": round(seconds, 1),
        "loss_start": round(losses[0], 5),
        "loss_end": round(sum(tail) / len(tail), 5),
        "loss_curve": loss_curve(losses),
        "params": sum(p.numel() for p in trained["denoiser"].parameters()),
    }
    return ProxyPipeline(kind, trained["denoiser"].eval(), prompts, list(bank.names), record=record, vae=vae)


def train_features(
    bank: PhotoBank, steps: int, device: torch.device, seed: int = 0, batch: int = 256
) -> tuple[ProxyFeatures, dict[str, Any]]:
    torch.manual_seed(seed)
    model = ProxyFeatures(len(bank.names)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator(device).manual_seed(seed + 1)
    start = time.perf_counter()
    for _ in range(steps):
        crops, labels = sample_crops(bank.train, batch, IMAGE_SIZE, gen)
        loss = F.cross_entropy(model.logits((crops + 1) / 2), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        crops, labels = sample_crops(bank.heldout, 1024, IMAGE_SIZE, gen)
        accuracy = (model.logits((crops + 1) / 2).argmax(-1) == labels).float().mean().item()
    record = {
        "steps": steps,
        "batch": batch,
        "seconds": round(time.perf_counter() - start, 1),
        "heldout_accuracy": round(accuracy, 4),
    }
    return model, record


# Steps and batch per part when not given (full size: each trains in minutes on one GPU).
DEFAULT_STEPS = {
    "sdxl": 1500,
    "flux": 1500,
    "ae": 3000,
    "sdxl-latent": 3000,
    "flux-latent": 3000,
    "wan-latent": 3000,
}
DEFAULT_BATCH = {"sdxl": 128, "flux": 128, "ae": 32, "sdxl-latent": 128, "flux-latent": 128, "wan-latent": 32}


def train_proxies(
    output: Path,
    *,
    parts: tuple[str, ...] = DEFAULT_PARTS,
    steps: int | None = None,
    feature_steps: int = 1500,
    batch: int | None = None,
    seed: int = 0,
    device: str | None = None,
    console: Console | None = None,
    command: str = "tokenreduce train-proxies",
) -> dict[str, Any]:
    """Train ``parts`` and write ``<kind>-proxy.safetensors``, ``features.safetensors``,
    ``ae.safetensors`` and ``record.json`` (updated in place, so parts may be trained separately;
    latent proxies load the autoencoder from ``output``). ``steps`` and ``batch`` default per part
    (``DEFAULT_STEPS``, ``DEFAULT_BATCH``)."""
    from safetensors.torch import save_file

    from tokenreduce.generate import environment
    from tokenreduce.quality.proxy import latent

    unknown = [k for k in parts if k not in PARTS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    needs_ae = any(p in LATENT_KINDS for p in parts)
    if needs_ae and "ae" not in parts and not latent.ae_path(output).is_file():
        raise FileNotFoundError(
            f"latent proxies learn on the autoencoder in {output}, and there is none: add the part `ae`"
        )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bank = photo_bank().to(dev)
    record: dict[str, Any] = {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "env": environment(),
        "data": {
            "photos": "scikit-image bundled photographs, one class each",
            "classes": bank.names,
            "short_side": 224,
            "heldout_band": 0.3,
            "crop": IMAGE_SIZE,
        },
    }
    if "ae" in parts or needs_ae:
        record["latent_data"] = {
            "short_side": latent.SHORT_SIDE,
            "heldout_band": 0.3,
            "crop": latent.CROP,
            "latent": f"{latent.LATENT_CHANNELS}x{latent.CROP // latent.DOWNSAMPLE}^2",
            "clips": "wan-latent: 5 frames panning and zooming linearly over a training region, "
            "window side 0.75-1.5 crops; the image autoencoder encodes each frame",
        }
    output.mkdir(parents=True, exist_ok=True)

    def done(part: str, entry: dict[str, Any]) -> None:
        record[part] = entry | {"command": command, "date": record["date"], "device": str(dev)}
        if console:
            console.print(
                f"{part}: {entry.get('seconds')} s, loss {entry.get('loss_start')} -> {entry.get('loss_end')}"
            )

    with deterministic(dev):
        if "features" in parts:
            features, record["features"] = train_features(bank, feature_steps, dev, seed)
            state = {k: v.detach().cpu().contiguous() for k, v in features.state_dict().items()}
            save_file(state, str(features_path(output)))
        for kind in (p for p in parts if p in KINDS):
            settings = TrainSettings(
                steps=steps or DEFAULT_STEPS[kind], batch=batch or DEFAULT_BATCH[kind], seed=seed
            )
            pipe = train_denoiser(kind, bank, settings, dev, console)
            pipe.record.update(date=record["date"], env=record["env"], data=record["data"])
            save_proxy(pipe, weights_path(kind, output))
            done(kind, {k: v for k, v in pipe.record.items() if k not in ("env", "data", "date")})
        if needs_ae or "ae" in parts:
            big = latent.latent_bank().to(dev)
        if "ae" in parts:
            ae, entry = latent.train_autoencoder(
                big,
                steps or DEFAULT_STEPS["ae"],
                batch or DEFAULT_BATCH["ae"],
                dev,
                seed,
                eval_crops=min(256, 16 * (batch or DEFAULT_BATCH["ae"])),
            )
            latent.save_autoencoder(ae, entry, latent.ae_path(output))
            done("ae", entry)
        for kind in (p for p in parts if p in LATENT_KINDS):
            # Loaded from the file: the proxy learns on the autoencoder exactly as it is saved.
            ae = latent.load_autoencoder(output, dev)
            settings = TrainSettings(
                steps=steps or DEFAULT_STEPS[kind], batch=batch or DEFAULT_BATCH[kind], seed=seed
            )
            pipe = train_denoiser(kind, big, settings, dev, console, vae=ae)
            pipe.record.update(date=record["date"], env=record["env"], data=record["latent_data"])
            save_proxy(pipe, weights_path(kind, output))
            done(kind, {k: v for k, v in pipe.record.items() if k not in ("env", "data", "date")})
    # Read just before writing: parts may be trained by separate processes into one folder.
    record_file = output / "record.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text(encoding="utf-8")) | record
    record_file.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record
