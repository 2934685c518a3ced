"""Trustworthy measurement: FLOPs from a real forward pass, interleaved throughput, accuracy."""
from ..data import ImageNetFolder, read_wnids
from .accuracy import evaluate, evaluate_many
from .compare import BASELINE, build_variants, measure_variants
from .flops import count_flops, gmacs
from .speed import compare_throughput

__all__ = ["BASELINE", "ImageNetFolder", "build_variants", "compare_throughput", "count_flops", "evaluate", "evaluate_many",
           "gmacs", "measure_variants", "read_wnids"]
