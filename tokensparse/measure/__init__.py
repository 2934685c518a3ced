"""Trustworthy measurement: FLOPs from a real forward pass, interleaved throughput, accuracy."""
from ..data import ImageNetFolder, read_wnids
from ..utils import eval_mode
from ._common import check_finite_parameters, measurement_device
from .accuracy import evaluate, evaluate_many, fidelity, kept_logprob
from .compare import BASELINE, MeasuredRow, build_variants, measure_variants, measured, random_predictors, wide_spread
from .embedding import cosine_to, embed_many, embedding_fidelity, embedding_of, is_classifier
from .flops import count_flops, gmacs
from .speed import compare_throughput, speedup_range, timed_runs

__all__ = [
           "BASELINE",
           "ImageNetFolder",
           "MeasuredRow",
           "build_variants",
           "check_finite_parameters",
           "compare_throughput",
           "cosine_to",
           "count_flops",
           "embed_many",
           "embedding_fidelity",
           "embedding_of",
           "eval_mode",
           "evaluate",
           "evaluate_many",
           "fidelity",
           "gmacs",
           "is_classifier",
           "kept_logprob",
           "measure_variants",
           "measured",
           "measurement_device",
           "random_predictors",
           "read_wnids",
           "speedup_range",
           "timed_runs",
           "wide_spread",
]
