"""What an evaluation makes: its runs, every image (one per run, prompt and seed), where each image
is stored, and the batches they are made in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenreduce.config import ConfigError, load_config
from tokenreduce.quality.protocol.settings import ProtocolError

BASELINE = "baseline"


@dataclass(frozen=True)
class Run:
    name: str
    config: str | None  # preset name or config file; None: the unmodified model
    ratio: float | None = None  # replaces the config's ratio when given

    @property
    def overrides(self) -> dict[str, Any]:
        return {} if self.ratio is None else {"ratio": self.ratio}


@dataclass(frozen=True)
class Item:
    run: str
    prompt: int
    seed: int


def plan_runs(configs: Sequence[str], ratios: Sequence[float] | None) -> list[Run]:
    """The baseline, then every config (at every ratio of ``ratios`` when given). Each config is
    loaded once here, so a typo fails before any model is loaded."""
    runs = [Run(BASELINE, None)]
    for source in configs:
        stem = Path(source).stem if Path(source).suffix or Path(source).exists() else source
        each: Sequence[float | None] = ratios or [None]
        for ratio in each:
            run = Run(stem if ratio is None else f"{stem}@{ratio:g}", source, ratio)
            try:
                load_config(source, **run.overrides)
            except ConfigError as exc:
                raise ConfigError(f"{run.name}: {exc}") from None
            runs.append(run)
    names = [r.name for r in runs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ProtocolError(
            f"two runs would be named {', '.join(repeated)} (one folder each): rename a config file"
        )
    return runs


def image_path(output: Path, item: Item) -> Path:
    return output / "images" / item.run / f"{item.prompt:05d}_s{item.seed}.png"


def plan_batches(
    runs: Sequence[Run], prompts: int, seeds: Sequence[int], batch_size: int
) -> list[list[Item]]:
    """Every image, in fixed batches of one run each. The batches do not depend on the number of
    processes, so neither does any image."""
    batches = []
    for run in runs:
        items = [Item(run.name, p, s) for p in range(prompts) for s in seeds]
        batches += [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    return batches
