"""Trustworthy measurement: FLOPs from a real forward pass, interleaved throughput, accuracy."""
from .accuracy import ImageNetFolder, evaluate, evaluate_many, read_wnids
from .flops import count_flops, gmacs
from .speed import compare_throughput

__all__ = ["ImageNetFolder", "compare_throughput", "count_flops", "evaluate", "evaluate_many",
           "gmacs", "read_wnids"]
