"""The latent proxies' autoencoder and data.

``ProxyAutoencoder`` maps 128x128 RGB to 32x32x4 latents (4x downsampling, a few residual conv
blocks each way). It is a plain autoencoder with a light regulariser in the manner of a KL
autoencoder with fixed variance: the decoder learns from latents with Gaussian noise added, and an
L2 penalty keeps the encoder from outgrowing that noise, so nearby latents decode to nearby images.
Latents are normalised to unit variance (``(z - shift) * scale``, as diffusers' VAEs do with
``shift_factor`` and ``scaling_factor``), measured on training crops after training.

Images come from the same photographs as the pixel proxies, at twice the resolution (short side
448 instead of 224), so a 128x128 crop shows what a 64x64 crop of the pixel proxies shows. Clips
for the Wan-shaped proxy pan and zoom over the same training regions; the image autoencoder
encodes them frame by frame (no temporal compression, unlike Wan's own VAE).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenreduce.quality.proxy.data import PhotoBank, photo_bank, sample_crops

SHORT_SIDE = 448  # photo scale of the latent proxies (the pixel proxies use 224)
CROP = 128  # decoded image size
LATENT_CHANNELS = 4
DOWNSAMPLE = 4
LATENT_NOISE = 0.1  # decoder input noise during training (the regulariser)
LATENT_L2 = 1e-4


def latent_bank() -> PhotoBank:
    return photo_bank(short_side=SHORT_SIDE)


class _Res(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, 1, 1),
            nn.GroupNorm(8, cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, 1, 1),
        )  # fmt: skip
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ProxyAutoencoder(nn.Module):
    """Images ``(N, 3, H, W)`` in [-1, 1] <-> normalised latents ``(N, 4, H/4, W/4)``."""

    shift: torch.Tensor  # buffers (registered in __init__)
    scale: torch.Tensor

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w1, w2 = width, 2 * width
        self.encoder = nn.Sequential(
            nn.Conv2d(3, w1, 3, 1, 1), _Res(w1, w1),
            nn.Conv2d(w1, w1, 3, 2, 1), _Res(w1, w2),
            nn.Conv2d(w2, w2, 3, 2, 1), _Res(w2, w2),
            nn.GroupNorm(8, w2), nn.SiLU(), nn.Conv2d(w2, LATENT_CHANNELS, 3, 1, 1),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.Conv2d(LATENT_CHANNELS, w2, 3, 1, 1), _Res(w2, w2), _Res(w2, w2),
            _Up(w2, w2), _Res(w2, w1),
            _Up(w1, w1), _Res(w1, w1),
            nn.GroupNorm(8, w1), nn.SiLU(), nn.Conv2d(w1, 3, 3, 1, 1),
        )  # fmt: skip
        # Latent normalisation (diffusers' shift_factor / scaling_factor), set after training.
        self.register_buffer("shift", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Raw latents (unnormalised)."""
        return self.encoder(images)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> unit-variance latents; clips ``(N, F, 3, H, W)`` -> ``(N, 4, F, h, w)``."""
        if images.dim() == 5:
            n, f = images.shape[:2]
            z = self.encode_latents(images.flatten(0, 1))
            return z.unflatten(0, (n, f)).transpose(1, 2)
        return (self.encode(images) - self.shift) * self.scale

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Unit-variance latents -> images in [-1, 1] (float32); 5-D latents -> ``(N, F, 3, H, W)``."""
        if latents.dim() == 5:
            n, f = latents.shape[0], latents.shape[2]
            return self.decode_latents(latents.transpose(1, 2).flatten(0, 1)).unflatten(0, (n, f))
        z = latents.to(self.scale.dtype) / self.scale + self.shift
        return self.decode(z).clamp(-1, 1)

    def fingerprint(self) -> str:
        """Hash of the float16 weights as saved: a latent proxy names the autoencoder it learned on."""
        digest = hashlib.sha256()
        for name, value in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().half().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def round_to_half(model: nn.Module) -> None:
    """Weights as they will be saved and loaded (float16), so what trains on them sees the same."""
    with torch.no_grad():
        for value in model.state_dict().values():
            value.copy_(value.half().float())


# --------------------------------------------------------------------------- clips


def sample_clips(
    regions: list[torch.Tensor], count: int, size: int, frames: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` clips ``(count, frames, 3, size, size)`` panning and zooming linearly over a class
    region (window side from 0.75 to 1.5 ``size``, start and end placed at random), and labels."""
    device = regions[0].device
    labels = torch.randint(len(regions), (count,), generator=generator, device=generator.device).to(device)
    u = torch.rand(count, 7, generator=generator, device=generator.device).to(device)
    t = torch.linspace(0, 1, frames, device=device)
    clips = torch.empty(count, frames, 3, size, size, device=device)
    for i in range(count):
        region = regions[int(labels[i])]
        h, w = region.shape[-2:]
        side = size * (0.75 + 0.75 * u[i, 0:2])  # start and end window side, pixels
        side = side.clamp(max=min(h, w))
        # Window centres, pixels, inside the region at either end.
        cy = side / 2 + u[i, 2:4] * (h - side)
        cx = side / 2 + u[i, 4:6] * (w - side)
        s, y, x = (v[0] + (v[1] - v[0]) * t for v in (side, cy, cx))
        # affine_grid maps output [-1, 1] to input [-1, 1] (align_corners=False: pixel edges).
        theta = torch.zeros(frames, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 1, 1] = s / w, s / h
        theta[:, 0, 2], theta[:, 1, 2] = 2 * x / w - 1, 2 * y / h - 1
        grid = F.affine_grid(theta, [frames, 3, size, size], align_corners=False)
        clip = F.grid_sample(region.expand(frames, -1, -1, -1), grid, mode="bilinear", align_corners=False)
        clips[i] = clip.flip(-1) if u[i, 6] < 0.5 else clip
    return clips, labels


def latent_batch(
    kind: str, bank: PhotoBank, ae: ProxyAutoencoder, count: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training latents for a latent proxy: crops (or clips for Wan), encoded without gradients."""
    from tokenreduce.quality.proxy.models import spec

    s = spec(kind)
    if s.arch == "wan":
        images, labels = sample_clips(bank.train, count, s.image, s.frames, generator)
    else:
        images, labels = sample_crops(bank.train, count, s.image, generator)
    with torch.no_grad():
        return ae.encode_latents(images), labels


# --------------------------------------------------------------------------- training


def train_autoencoder(
    bank: PhotoBank,
    steps: int,
    batch: int,
    device: torch.device,
    seed: int = 0,
    lr: float = 1e-3,
    eval_crops: int = 256,
) -> tuple[ProxyAutoencoder, dict[str, Any]]:
    """Train, round to float16, then measure the latent normalisation on ``eval_crops`` training
    crops and the reconstruction PSNR on as many held-out crops."""
    import time

    from tokenreduce.quality.proxy.train import TrainSettings, _autocast, _schedule, loss_curve

    torch.manual_seed(seed)
    ae = ProxyAutoencoder().to(device)
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = _schedule(opt, TrainSettings(steps=steps, batch=batch, lr=lr, warmup=min(100, steps)))
    gen = torch.Generator(device).manual_seed(seed + 1)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        images, _ = sample_crops(bank.train, batch, CROP, gen)
        noise = torch.randn(batch, LATENT_CHANNELS, CROP // 4, CROP // 4, generator=gen, device=device)
        with _autocast(device):
            z = ae.encode(images)
            out = ae.decode(z + LATENT_NOISE * noise)
        loss = (out.float() - images).abs().mean() + LATENT_L2 * z.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == steps - 1:
            losses.append(loss.item())
    seconds = time.perf_counter() - start
    ae.eval()
    round_to_half(ae)
    count = eval_crops
    with torch.no_grad():
        images, _ = sample_crops(bank.train, count, CROP, gen)
        z = torch.cat([ae.encode(images[i : i + 64]) for i in range(0, count, 64)])
        ae.shift.fill_(z.mean().item())
        ae.scale.fill_(1.0 / z.std().item())
        round_to_half(ae)
        held, _ = sample_crops(bank.heldout, count, CROP, gen, flip=False)
        recon = torch.cat(
            [ae.decode_latents(ae.encode_latents(held[i : i + 64])) for i in range(0, count, 64)]
        )
        mse = ((recon - held) / 2).pow(2).mean(dim=(1, 2, 3))
        psnr = (-10 * torch.log10(mse.clamp_min(1e-10))).mean().item()
    tail = losses[-10:]
    record = {
        "settings": {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "crop": CROP},
        "seconds": round(seconds, 1),
        "loss_start": round(losses[0], 5),
        "loss_end": round(sum(tail) / len(tail), 5),
        "loss_curve": loss_curve(losses),
        "heldout_psnr_db": round(psnr, 2),
        "shift": float(ae.shift),
        "scale": float(ae.scale),
        "params": sum(p.numel() for p in ae.parameters()),
    }
    return ae, record


# --------------------------------------------------------------------------- weight file


def ae_path(folder: Path | None = None) -> Path:
    from tokenreduce.quality.proxy.models import WEIGHTS_DIR

    return (folder or WEIGHTS_DIR) / "ae.safetensors"


def save_autoencoder(ae: ProxyAutoencoder, record: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().half().cpu().contiguous() for k, v in ae.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"record": json.dumps(record)})


def load_autoencoder(folder: Path | None = None, device: str | torch.device = "cpu") -> ProxyAutoencoder:
    from safetensors.torch import load_file

    path = ae_path(folder)
    if not path.is_file():
        raise FileNotFoundError(
            f"no proxy autoencoder at {path}: train it with `tokenreduce train-proxies --parts ae`"
        )
    ae = ProxyAutoencoder()
    ae.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return ae.eval().to(device)
