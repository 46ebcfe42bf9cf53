"""Generation recipes of the first-party families for ``tokenreduce bench --generation``.

Each recipe says what the family's diffusers pipeline does around the denoiser: the scheduler
and its published config, ``set_timesteps``, classifier-free guidance, and the VAE decode (a VAE
built from the published config; the ``tiny-*`` architectures get a small VAE with the same
downsampling). Values are those of the published ``scheduler_config.json`` / ``vae/config.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from tokenreduce.bench.generation import GenerationRecipe, register
from tokenreduce.bench.models import DenoiserCall
from tokenreduce.hookspecs import hookimpl

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage, AutoencoderKLWan, ModelMixin

GUIDANCE = {"sdxl": 5.0, "flux": 3.5, "wan": 5.0, "sd3": 3.5, "qwenimage": 4.0}

# stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json
SDXL_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
# stabilityai/stable-diffusion-xl-base-1.0, vae/config.json
SDXL_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# black-forest-labs/FLUX.1-dev, scheduler/scheduler_config.json
FLUX_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
# black-forest-labs/FLUX.1-dev, vae/config.json
FLUX_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}
# Wan-AI/Wan2.1-T2V-*-Diffusers, scheduler/scheduler_config.json (flow_shift 3.0); the model card
# recommends flow_shift 5.0 at 720p.
WAN_SCHEDULER = {
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "solver_order": 2,
    "solver_type": "bh2",
    "timestep_spacing": "linspace",
    "use_flow_sigmas": True,
}
# stabilityai/stable-diffusion-3.5-large, scheduler/scheduler_config.json
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
# stabilityai/stable-diffusion-3.5-large, vae/config.json: Flux.1's VAE design, its own scaling
SD3_VAE = {**FLUX_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}
# Qwen/Qwen-Image, scheduler/scheduler_config.json
QWEN_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}
#: A small VAE of the published shape (8x spatial downsampling) for the tiny architectures.
TINY_KL = {
    "block_out_channels": [4, 4, 8, 8],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "mid_block_add_attention": False,
}


def _on_meta(cls: type[ModelMixin], config: dict[str, Any]) -> nn.Module:
    with torch.device("meta"):
        return cls.from_config(config).eval()


def _tiny(arch: str) -> bool:
    return arch.startswith("tiny-")


def _kl(config: dict[str, Any], arch: str, latent_channels: int) -> nn.Module:
    from diffusers import AutoencoderKL

    if _tiny(arch):
        config = {**config, **TINY_KL, "latent_channels": latent_channels, "sample_size": 64}
    return _on_meta(AutoencoderKL, config)


def _noise_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Starting noise of one sample shaped like ``x`` (the guidance batch is built from it)."""
    return torch.randn(1, *x.shape[1:], generator=generator, device=x.device, dtype=x.dtype)


def _guided(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


class HiddenStatesRecipe(GenerationRecipe):
    """A transformer pipeline: the starting noise has the shape of the denoiser's ``hidden_states``
    (one sample), and the scheduler's timesteps are set with its defaults."""

    def set_timesteps(self, scheduler: Any, steps: int, latents: torch.Tensor, device: Any) -> torch.Tensor:
        scheduler.set_timesteps(steps, device=device)
        return latents

    def initial_latents(self, call: DenoiserCall, generator: torch.Generator) -> torch.Tensor:
        return _noise_like(call.kwargs["hidden_states"], generator)


class SdxlRecipe(GenerationRecipe):
    """StableDiffusionXLPipeline: Euler, guidance in one batch of 2 (uncond, cond), epsilon."""

    guidance_passes = 1

    def scheduler(self, arch: str, height: int, width: int) -> Any:
        from diffusers import EulerDiscreteScheduler

        return EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)

    def set_timesteps(self, scheduler: Any, steps: int, latents: torch.Tensor, device: Any) -> torch.Tensor:
        scheduler.set_timesteps(steps, device=device)
        return latents * scheduler.init_noise_sigma

    def initial_latents(self, call: DenoiserCall, generator: torch.Generator) -> torch.Tensor:
        return _noise_like(call.args[0], generator)

    def predict(
        self,
        forward: Callable[..., Any],
        call: DenoiserCall,
        latents: torch.Tensor,
        t: torch.Tensor,
        scheduler: Any,
        context: Callable[[str], Any],
    ) -> torch.Tensor:
        batch = call.args[0].shape[0]
        x = scheduler.scale_model_input(latents.expand(batch, *latents.shape[1:]), t)
        out = forward(x, t, **call.kwargs, return_dict=False)[0]
        if batch < 2:
            return out
        uncond, cond = out.chunk(2)
        return _guided(uncond, cond, GUIDANCE["sdxl"])

    def vae(self, arch: str) -> nn.Module | None:
        return _kl(SDXL_VAE, arch, latent_channels=4)

    def decode(self, vae: AutoencoderKL, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        latents = latents.to(next(vae.parameters()).dtype)
        return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]


def _flux_shift(seq_len: int, config: Any) -> float:
    """diffusers' ``calculate_shift``: mu grows linearly with the number of image tokens."""
    base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    lo, hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (hi - lo) / (top - base)
    return seq_len * slope + lo - slope * base


class FluxRecipe(HiddenStatesRecipe):
    """FluxPipeline (FLUX.1-dev): FlowMatchEuler with dynamic shift, guidance embedded (one pass)."""

    guidance_passes = 1

    def scheduler(self, arch: str, height: int, width: int) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER)

    def set_timesteps(self, scheduler: Any, steps: int, latents: torch.Tensor, device: Any) -> torch.Tensor:
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = _flux_shift(latents.shape[1], scheduler.config)
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        return latents

    def predict(
        self,
        forward: Callable[..., Any],
        call: DenoiserCall,
        latents: torch.Tensor,
        t: torch.Tensor,
        scheduler: Any,
        context: Callable[[str], Any],
    ) -> torch.Tensor:
        timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
        kwargs = {**call.kwargs, "hidden_states": latents, "timestep": timestep}
        with context("cond"):
            return forward(**kwargs, return_dict=False)[0]

    def vae(self, arch: str) -> nn.Module | None:
        return _kl(FLUX_VAE, arch, latent_channels=FLUX_VAE["latent_channels"] if not _tiny(arch) else 4)

    def decode(self, vae: AutoencoderKL, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        # FluxPipeline._unpack_latents: (B, h*w, C*4) tokens of 2x2 patches -> (B, C, 2h, 2w).
        b, _, packed = latents.shape
        h, w = height // 16, width // 16
        x = latents.view(b, h, w, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        x = x.reshape(b, packed // 4, 2 * h, 2 * w)
        x = x / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(x.to(next(vae.parameters()).dtype), return_dict=False)[0]


class WanRecipe(HiddenStatesRecipe):
    """WanPipeline: UniPC on flow sigmas (the published scheduler), conditional and unconditional
    passes apart (two denoiser calls per step, each in its cache context)."""

    guidance_passes = 2

    def scheduler(self, arch: str, height: int, width: int) -> Any:
        from diffusers import UniPCMultistepScheduler

        shift = 5.0 if min(height, width) >= 720 else 3.0
        return UniPCMultistepScheduler.from_config({**WAN_SCHEDULER, "flow_shift": shift})

    def predict(
        self,
        forward: Callable[..., Any],
        call: DenoiserCall,
        latents: torch.Tensor,
        t: torch.Tensor,
        scheduler: Any,
        context: Callable[[str], Any],
    ) -> torch.Tensor:
        kwargs = {**call.kwargs, "hidden_states": latents, "timestep": t.expand(latents.shape[0])}
        with context("cond"):
            cond = forward(**kwargs, return_dict=False)[0]
        # The negative prompt's embeddings have the prompt's shape; speed does not depend on values.
        with context("uncond"):
            uncond = forward(**kwargs, return_dict=False)[0]
        return _guided(uncond, cond, GUIDANCE["wan"])

    def vae(self, arch: str) -> nn.Module | None:
        from diffusers import AutoencoderKLWan

        if _tiny(arch):  # the tiny transformer has 4 latent channels
            config = {"base_dim": 4, "z_dim": 4, "num_res_blocks": 1, "latents_mean": [0.0] * 4}
            config["latents_std"] = [1.0] * 4
            return _on_meta(AutoencoderKLWan, config)
        return _on_meta(AutoencoderKLWan, {})  # the class defaults are Wan 2.1's published config

    def decode(self, vae: AutoencoderKLWan, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(1, z, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(1, z, 1, 1, 1)
        x = (latents.float() * std + mean).to(next(vae.parameters()).dtype)
        return vae.decode(x, return_dict=False)[0]


class Sd3Recipe(HiddenStatesRecipe, SdxlRecipe):
    """StableDiffusion3Pipeline: flow-match Euler (fixed shift), guidance in one batch of 2."""

    def scheduler(self, arch: str, height: int, width: int) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER)

    def predict(
        self,
        forward: Callable[..., Any],
        call: DenoiserCall,
        latents: torch.Tensor,
        t: torch.Tensor,
        scheduler: Any,
        context: Callable[[str], Any],
    ) -> torch.Tensor:
        batch = call.kwargs["hidden_states"].shape[0]
        x = latents.expand(batch, *latents.shape[1:])
        kwargs = {**call.kwargs, "hidden_states": x, "timestep": t.expand(batch)}
        out = forward(**kwargs, return_dict=False)[0]
        if batch < 2:
            return out
        uncond, cond = out.chunk(2)
        return _guided(uncond, cond, GUIDANCE["sd3"])

    def vae(self, arch: str) -> nn.Module | None:
        return _kl(SD3_VAE, arch, latent_channels=4 if _tiny(arch) else 16)  # the tiny model: 4

    def decode(self, vae: AutoencoderKL, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = latents / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(x.to(next(vae.parameters()).dtype), return_dict=False)[0]


class Flux2Recipe(FluxRecipe):
    """Flux2Pipeline: flow-match Euler with the pipeline's empirical shift, guidance embedded.

    Its VAE (``AutoencoderKLFlux2``) normalises latents with batch-norm statistics, which random
    weights cannot stand for: the decode is not timed."""

    def set_timesteps(self, scheduler: Any, steps: int, latents: torch.Tensor, device: Any) -> torch.Tensor:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = compute_empirical_mu(image_seq_len=latents.shape[1], num_steps=steps)
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        return latents

    def vae(self, arch: str) -> nn.Module | None:
        return None


class QwenImageRecipe(FluxRecipe):
    """QwenImagePipeline: flow-match Euler with dynamic (exponential) shift, true classifier-free
    guidance as two calls with the norm rescale, Wan-design VAE on one frame."""

    guidance_passes = 2

    def scheduler(self, arch: str, height: int, width: int) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(QWEN_SCHEDULER)

    def predict(
        self,
        forward: Callable[..., Any],
        call: DenoiserCall,
        latents: torch.Tensor,
        t: torch.Tensor,
        scheduler: Any,
        context: Callable[[str], Any],
    ) -> torch.Tensor:
        timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
        kwargs = {**call.kwargs, "hidden_states": latents, "timestep": timestep}
        with context("cond"):
            cond = forward(**kwargs, return_dict=False)[0]
        with context("uncond"):
            uncond = forward(**kwargs, return_dict=False)[0]
        guided = _guided(uncond, cond, GUIDANCE["qwenimage"])
        return guided * (cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))

    def vae(self, arch: str) -> nn.Module | None:
        from diffusers import AutoencoderKLQwenImage

        if _tiny(arch):
            return None
        return _on_meta(AutoencoderKLQwenImage, {})  # the class defaults: Qwen-Image's VAE config

    def decode(
        self, vae: AutoencoderKLQwenImage, latents: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        # QwenImagePipeline._unpack_latents: 2x2 patches -> (B, C, 1 frame, H/8, W/8).
        b, _, packed = latents.shape
        h, w = height // 16, width // 16
        x = latents.view(b, h, w, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        x = x.reshape(b, packed // 4, 1, 2 * h, 2 * w)
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean, device=x.device).view(1, z, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=x.device).view(1, z, 1, 1, 1)
        x = (x.float() * std + mean).to(next(vae.parameters()).dtype)
        return vae.decode(x, return_dict=False)[0][:, :, 0]


@hookimpl
def tokenreduce_register(registry: Any) -> None:
    register("sdxl", SdxlRecipe())
    register("flux", FluxRecipe())
    register("wan", WanRecipe())
    # Families whose adapters may not be installed: a recipe without its adapter is never used.
    register("sd3", Sd3Recipe())
    register("flux2", Flux2Recipe())
    register("qwenimage", QwenImageRecipe())
