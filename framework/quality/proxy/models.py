"""The proxy models: architectures, learned "prompts", sampling, and their weight files.

The pixel proxies (``sdxl``, ``flux``) generate 64x64 RGB images in pixel space (no VAE),
conditioned on a class, so their highest attention grid is 32x32 tokens:

- SDXL-shaped ``UNet2DConditionModel``: a first level without attention, cross-attention levels
  at 32x32 and 16x16 (3 and 8 transformer blocks), text-time added conditioning, epsilon
  prediction on SDXL's noise schedule, sampled with SDXL's Euler scheduler.
- Flux-shaped ``FluxTransformer2DModel``: 4 double-stream and 8 single-stream blocks, joint
  attention with 4 conditioning tokens, 3-axis RoPE, 2x2 pixel patches (32x32 tokens),
  rectified flow sampled with the flow-matching Euler scheduler.

The latent proxies (``sdxl-latent``, ``flux-latent``, ``wan-latent``) have the same shapes but
denoise the 32x32x4 latents of a small autoencoder (see ``latent.py``) and decode them to 128x128
images, so merge errors pass through a decoder as in the real models: the SDXL-shaped UNet attends
at 16x16 and 8x8, the Flux-shaped transformer sees 16x16 tokens of 2x2 latent patches, and the
Wan-shaped ``WanTransformer3DModel`` denoises 5-frame clips (1x2x2 patches: 5x16x16 tokens).

A "prompt" is a learned table of conditioning tokens and a pooled vector per class, plus one null
entry for classifier-free guidance: it stands where the text encoders would be.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

IMAGE_SIZE = 64
TEXT_TOKENS = 4

SDXL_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 128],
    "layers_per_block": 1,
    "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [2, 4, 8],
    "cross_attention_dim": 64,
    "norm_num_groups": 16,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 64 + 6 * 8,
}
SDXL_POOLED = 64

FLUX_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 12,  # 3 channels x 2x2 pixels per token
    "num_layers": 4,
    "num_single_layers": 8,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "guidance_embeds": False,
    "axes_dims_rope": [8, 12, 12],
}

# Scheduler settings: SDXL's and Flux's own kinds, at the proxies' scale.
SDXL_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}
KINDS = ("sdxl", "flux")
LATENT_KINDS = ("sdxl-latent", "flux-latent", "wan-latent")
LATENT_IMAGE_KINDS = ("sdxl-latent", "flux-latent")  # the image (not video) latent proxies


@dataclass(frozen=True)
class Spec:
    """What a proxy kind denoises: ``channels x size x size`` (per frame), decoded to ``image``."""

    arch: str  # sdxl, flux or wan: the denoiser class and the sampler
    channels: int
    size: int
    image: int
    frames: int = 1


SPECS: dict[str, Spec] = {
    "sdxl": Spec("sdxl", 3, IMAGE_SIZE, IMAGE_SIZE),
    "flux": Spec("flux", 3, IMAGE_SIZE, IMAGE_SIZE),
    "sdxl-latent": Spec("sdxl", 4, 32, 128),
    "flux-latent": Spec("flux", 4, 32, 128),
    "wan-latent": Spec("wan", 4, 32, 128, frames=5),
}

WAN_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 64,
    "freq_dim": 64,
    "ffn_dim": 256,
    "num_layers": 8,
    "rope_max_seq_len": 64,
}


def spec(kind: str) -> Spec:
    if kind not in SPECS:
        raise ValueError(f"unknown proxy kind {kind!r}; choose from {', '.join(SPECS)}")
    return SPECS[kind]


# The proxies' depth is not Flux-dev's (19 + 38 blocks): the paper's "skip the first 5 of each kind"
# becomes skipping the first block of each kind (the same ~1/4 of double-stream blocks).
FLUX_PROXY_ADAPTER = {"skip_double": 1, "skip_single": 1}


def build_denoiser(kind: str) -> nn.Module:
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel, WanTransformer3DModel

    s = spec(kind)
    if s.arch == "sdxl":
        return UNet2DConditionModel(
            **SDXL_CONFIG | {"sample_size": s.size, "in_channels": s.channels, "out_channels": s.channels}
        )
    if s.arch == "flux":
        return FluxTransformer2DModel(**FLUX_CONFIG | {"in_channels": s.channels * 4})
    return WanTransformer3DModel(**WAN_CONFIG)


class PromptTable(nn.Module):
    """Learned conditioning per class; index ``num_classes`` is the null prompt (guidance)."""

    def __init__(self, num_classes: int, tokens: int, dim: int, pooled: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.tokens = nn.Parameter(torch.randn(num_classes + 1, tokens, dim) * 0.5)
        self.pooled = nn.Parameter(torch.randn(num_classes + 1, pooled) * 0.5)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[labels], self.pooled[labels]


def build_prompts(kind: str, num_classes: int) -> PromptTable:
    arch = spec(kind).arch
    if arch == "sdxl":
        return PromptTable(num_classes, TEXT_TOKENS, SDXL_CONFIG["cross_attention_dim"], SDXL_POOLED)
    if arch == "wan":  # Wan has no pooled text vector
        return PromptTable(num_classes, TEXT_TOKENS, WAN_CONFIG["text_dim"], 1)
    return PromptTable(
        num_classes, TEXT_TOKENS, FLUX_CONFIG["joint_attention_dim"], FLUX_CONFIG["pooled_projection_dim"]
    )


def make_scheduler(kind: str) -> Any:
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    if spec(kind).arch == "sdxl":
        return EulerDiscreteScheduler(**SDXL_SCHEDULE, timestep_spacing="leading", steps_offset=1)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def pack(images: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` pixels or latents -> ``(B, H/2 * W/2, 4C)`` Flux tokens (2x2 patches, raster order)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b = tokens.shape[0]
    x = tokens.reshape(b, height // 2, width // 2, -1, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, -1, height, width)


def sdxl_time_ids(batch: int, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    side = float(size)
    return torch.tensor([[side, side, 0.0, 0.0, side, side]], device=device, dtype=dtype).repeat(batch, 1)


@functools.lru_cache(maxsize=8)
def flux_ids(side: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text position ids (fixed per proxy size: built once per size, device and dtype)."""
    from tokenreduce.testing.tiny_flux import image_ids

    return image_ids(side, side, device, dtype), torch.zeros(TEXT_TOKENS, 3, device=device, dtype=dtype)


def predict(
    kind: str,
    denoiser: nn.Module,
    x: torch.Tensor,
    timestep: torch.Tensor,
    tokens: torch.Tensor,
    pooled: torch.Tensor,
) -> torch.Tensor:
    """One denoiser call in the model's own input layout (SDXL: ``(B, C, H, W)``, Flux: packed
    tokens, Wan: ``(B, C, F, H, W)``); Flux and Wan take the flow time ``sigma`` in [0, 1]."""
    s = spec(kind)
    if s.arch == "sdxl":
        time_ids = sdxl_time_ids(x.shape[0], s.image, x.device, x.dtype)
        return denoiser(
            x,
            timestep,
            encoder_hidden_states=tokens,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            return_dict=False,
        )[0]
    if s.arch == "wan":  # Wan embeds the timestep on the 0..1000 scale itself
        return denoiser(
            hidden_states=x,
            timestep=(timestep * 1000).expand(x.shape[0]).to(x.dtype),
            encoder_hidden_states=tokens,
            return_dict=False,
        )[0]
    img_ids, txt_ids = flux_ids(s.size // 2, x.device, x.dtype)
    return denoiser(
        hidden_states=x,
        timestep=timestep.expand(x.shape[0]).to(x.dtype),
        encoder_hidden_states=tokens,
        pooled_projections=pooled,
        img_ids=img_ids,
        txt_ids=txt_ids,
        return_dict=False,
    )[0]


@dataclass
class ProxyPipeline:
    """A class-conditional sampler with a pipeline's shape: ``unet`` or ``transformer`` plus
    ``scheduler`` (and ``vae`` for the latent proxies), so ``tokenreduce.apply(pipe, config)``
    hooks its step clock as for diffusers."""

    kind: str
    denoiser: nn.Module
    prompts: PromptTable
    class_names: list[str]
    scheduler: Any = None
    record: dict[str, Any] = field(default_factory=dict)
    vae: Any = None  # a ProxyAutoencoder: latents -> images (latent kinds only)

    def __post_init__(self) -> None:
        self.spec = spec(self.kind)
        if self.scheduler is None:
            self.scheduler = make_scheduler(self.kind)
        if (self.vae is None) != (self.kind in KINDS):
            raise ValueError(
                f"a {self.kind!r} proxy {'needs' if self.vae is None else 'takes no'} autoencoder"
            )

    @property
    def unet(self) -> nn.Module | None:
        return self.denoiser if self.spec.arch == "sdxl" else None

    @property
    def transformer(self) -> nn.Module | None:
        return self.denoiser if self.spec.arch != "sdxl" else None

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ProxyPipeline:
        # Cast only when asked: diffusers warns about `to(dtype)` even when nothing changes.
        cast = dtype is not None and dtype != self.dtype
        for module in (self.denoiser, self.prompts):
            module.to(device)
            if cast:
                module.to(dtype)
        if self.vae is not None:
            self.vae.to(device)  # decodes in float32
        return self

    def noise(self, seeds: list[int]) -> torch.Tensor:
        """Initial noise, one CPU generator per seed: an image does not depend on its batch."""
        s = self.spec
        shape = (s.channels, s.size, s.size) if s.arch != "wan" else (s.channels, s.frames, s.size, s.size)
        return torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(int(v))) for v in seeds]
        )

    @torch.no_grad()
    def __call__(
        self, labels: list[int], seeds: list[int], steps: int = 20, guidance: float = 3.0
    ) -> torch.Tensor:
        """Images ``(N, 3, S, S)`` (Wan: clips ``(N, F, 3, S, S)``) in [0, 1], float32 on the CPU."""
        if len(labels) != len(seeds):
            raise ValueError(f"{len(labels)} labels but {len(seeds)} seeds")
        bad = [label for label in labels if not 0 <= label < len(self.class_names)]
        if bad:
            raise ValueError(f"labels {bad} out of range: {len(self.class_names)} classes")
        device, dtype, arch = self.device, self.dtype, self.spec.arch
        n = len(labels)
        cond = torch.tensor(labels, device=device)
        null = torch.full_like(cond, self.prompts.num_classes)
        tokens, pooled = self.prompts(torch.cat([null, cond]))
        tokens, pooled = tokens.to(dtype), pooled.to(dtype)
        x = self.noise(seeds).to(device)
        self.scheduler.set_timesteps(steps, device=device)
        x = x * getattr(self.scheduler, "init_noise_sigma", 1.0)
        if arch == "flux":
            x = pack(x)
        for t in self.scheduler.timesteps:
            model_in = torch.cat([x, x])
            if arch == "sdxl":
                model_in = self.scheduler.scale_model_input(model_in, t)
                timestep = t
            else:
                timestep = t / self.scheduler.config.num_train_timesteps
            out = predict(self.kind, self.denoiser, model_in.to(dtype), timestep, tokens, pooled).float()
            uncond, conditional = out[:n], out[n:]
            guided = uncond + guidance * (conditional - uncond)
            x = self.scheduler.step(guided, t, x, return_dict=False)[0]
        if arch == "flux":
            x = unpack(x, self.spec.size, self.spec.size)
        x = x.float()
        if self.vae is not None:
            x = self.vae.decode_latents(x)
        return ((x + 1) / 2).clamp(0, 1).cpu()


# --------------------------------------------------------------------------- weight files

WEIGHTS_DIR = Path(__file__).parent / "weights"


def weights_path(kind: str, folder: Path | None = None) -> Path:
    return (folder or WEIGHTS_DIR) / f"{kind}-proxy.safetensors"


def save_proxy(pipe: ProxyPipeline, path: Path) -> None:
    """Weights in float16 (a few MB), the class names and how the model was made as metadata
    (latent kinds: also the fingerprint of the autoencoder they were trained on)."""
    from safetensors.torch import save_file

    tensors = {f"denoiser.{k}": v.detach().half().contiguous() for k, v in pipe.denoiser.state_dict().items()}
    tensors.update(
        {f"prompts.{k}": v.detach().half().contiguous() for k, v in pipe.prompts.state_dict().items()}
    )
    metadata = {
        "kind": pipe.kind,
        "class_names": json.dumps(pipe.class_names),
        "record": json.dumps(pipe.record),
    }
    if pipe.vae is not None:
        metadata["autoencoder"] = pipe.vae.fingerprint()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def load_proxy(
    kind: str, folder: Path | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> ProxyPipeline:
    from safetensors import safe_open

    spec(kind)
    path = weights_path(kind, folder)
    if not path.is_file():
        part = kind.split("-")[0]
        how = f"--parts {part}" if kind in KINDS else f"--parts ae {kind}"
        raise FileNotFoundError(
            f"no {kind} proxy weights at {path}: train them with `tokenreduce train-proxies {how}`"
        )
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    if metadata.get("kind") != kind:
        raise ValueError(f"{path} holds a {metadata.get('kind')!r} proxy, not {kind!r}")
    vae = None
    if kind not in KINDS:
        from tokenreduce.quality.proxy.latent import load_autoencoder

        vae = load_autoencoder(path.parent)
        if vae.fingerprint() != metadata.get("autoencoder"):
            raise ValueError(
                f"{path} was trained on another autoencoder than {path.parent}/ae.safetensors: "
                f"retrain it with `tokenreduce train-proxies --parts {kind}`"
            )
    names = json.loads(metadata["class_names"])
    denoiser, prompts = build_denoiser(kind), build_prompts(kind, len(names))
    denoiser.load_state_dict(
        {k[len("denoiser.") :]: v for k, v in state.items() if k.startswith("denoiser.")}
    )
    prompts.load_state_dict({k[len("prompts.") :]: v for k, v in state.items() if k.startswith("prompts.")})
    pipe = ProxyPipeline(
        kind, denoiser.eval(), prompts, names, record=json.loads(metadata.get("record", "{}")), vae=vae
    )
    return pipe.to(device, dtype)
