"""Latency benchmark: every variant on the same model, interleaved, eager and CUDA-graph (PERFORMANCE.md).

>>> from tokenreduce.bench import BenchSettings, run_bench
>>> run_bench(BenchSettings(archs=["sdxl"], ratios=[0.5]))
"""

from tokenreduce.bench.runner import BenchSettings, run_bench
from tokenreduce.bench.variants import Variant, VariantSet, default_variants

__all__ = ["BenchSettings", "Variant", "VariantSet", "default_variants", "run_bench"]
