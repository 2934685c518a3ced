"""tokensparse: dynamic token sparsification for timm vision models.

>>> import timm, tokensparse
>>> model = timm.create_model("deit_small_patch16_224")
>>> tokensparse.patch(model, "tome:r=13")  # doctest: +SKIP
"""
from .api import info, is_patched, list_methods, location_records, patch, patched_method, token_state, unpatch
from .errors import TokenSparseError
from .export import export_onnx
from .methods import MethodInfo
from .spec import format_spec, parse_spec
from .state import LocationInfo

__version__ = "0.1.0"

__all__ = [
    "LocationInfo",
    "MethodInfo",
    "TokenSparseError",
    "__version__",
    "export_onnx",
    "format_spec",
    "info",
    "is_patched",
    "list_methods",
    "location_records",
    "parse_spec",
    "patch",
    "patched_method",
    "token_state",
    "unpatch",
]
