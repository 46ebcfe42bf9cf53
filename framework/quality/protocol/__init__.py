"""The paper's evaluation protocol on real weights: ``tokenreduce eval --model ID_OR_PATH``.

Every run (the unmodified model as ``baseline``, then each config at each ratio) makes one image
per prompt and seed, data-parallel over the processes of an ``accelerate launch`` and resumable.
The main process then measures CLIP-T (image vs prompt), DINO (similarity to the baseline's image)
and FID (against a reference folder), and writes the results. Every input is checked before
anything is generated and before the model is modified.

Modules, in the order of the protocol: ``settings`` (what is asked), ``plan`` (the runs and
images), ``inputs`` (checks and the pipeline), ``generation``, ``scoring``, ``report``, and
``run`` (all of them end to end).
"""

from tokenreduce.quality.protocol.run import evaluate, run_model_eval
from tokenreduce.quality.protocol.settings import (
    DEFAULT_CLIP,
    DEFAULT_CONFIGS,
    DEFAULT_DINO,
    DEFAULT_OUTPUT,
    FID_FEATURES,
    EvalSettings,
    ProtocolError,
)

__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_CONFIGS",
    "DEFAULT_DINO",
    "DEFAULT_OUTPUT",
    "FID_FEATURES",
    "EvalSettings",
    "ProtocolError",
    "evaluate",
    "run_model_eval",
]
