"""The settings of an evaluation, from the command line, and the checks of their values alone."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_OUTPUT = "eval-results"
DEFAULT_CONFIGS = ("toma",)
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dino-vitb16"
FID_FEATURES = ("inception", "dino")


class ProtocolError(ValueError):
    """An evaluation that cannot run as asked (raised before anything is generated)."""


@dataclass
class EvalSettings:
    model: str
    prompts_file: Path
    output: Path = Path(DEFAULT_OUTPUT)
    prompt_template: str = "{}"
    configs: list[str] = field(default_factory=lambda: list(DEFAULT_CONFIGS))
    ratios: list[float] | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None
    dtype: str | None = None
    batch_size: int = 1
    reference: Path | None = None
    clip_model: str = DEFAULT_CLIP
    dino_model: str = DEFAULT_DINO
    fid_features: str = "inception"
    inception_weights: Path | None = None
    limit: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EvalSettings:
        if not args.prompts:
            raise ProtocolError("--prompts FILE is required with --model")
        seeds = list(args.seeds) if args.seeds else list(range(_positive(args.num_seeds or 1, "--num-seeds")))
        settings = cls(
            model=args.model,
            prompts_file=Path(args.prompts),
            output=Path(args.output or DEFAULT_OUTPUT),
            prompt_template=args.prompt_template,
            configs=list(args.configs or DEFAULT_CONFIGS),
            ratios=None if args.ratios is None else list(args.ratios),
            seeds=seeds,
            steps=args.steps,
            height=args.height,
            width=args.width,
            guidance_scale=args.guidance_scale,
            dtype=args.dtype,
            batch_size=args.batch_size or 1,
            reference=None if args.reference is None else Path(args.reference),
            clip_model=args.clip_model,
            dino_model=args.dino_model,
            fid_features=args.fid_features,
            inception_weights=None if args.inception_weights is None else Path(args.inception_weights),
            limit=args.limit,
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Checks of the values alone (files and models are checked later, still before generating)."""
        _positive(self.batch_size, "--batch-size")
        for value, flag in ((self.steps, "--steps"), (self.limit, "--limit")):
            if value is not None:
                _positive(value, flag)
        for value, flag in ((self.height, "--height"), (self.width, "--width")):
            if value is not None and (value <= 0 or value % 8):
                raise ProtocolError(f"{flag} must be a positive multiple of 8, got {value}")
        if not self.seeds or min(self.seeds) < 0 or len(set(self.seeds)) != len(self.seeds):
            raise ProtocolError(f"--seeds must be distinct non-negative integers, got {self.seeds}")
        if not self.configs:
            raise ProtocolError("--configs needs at least one config file or preset")
        if self.ratios is not None and len(set(self.ratios)) != len(self.ratios):
            raise ProtocolError(f"--ratios has repeated values: {self.ratios}")
        if self.fid_features not in FID_FEATURES:
            raise ProtocolError(f"--fid-features must be one of {', '.join(FID_FEATURES)}")
        if "{}" not in self.prompt_template:
            raise ProtocolError(
                f"--prompt-template {self.prompt_template!r} has no '{{}}' where the prompt goes"
            )

    def record(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def _positive(value: int, flag: str) -> int:
    if value < 1:
        raise ProtocolError(f"{flag} must be at least 1, got {value}")
    return value
