"""tokensparse: dynamic token sparsification for timm vision models.

>>> import timm, tokensparse
>>> model = timm.create_model("deit_small_patch16_224")
>>> tokensparse.patch(model, "tome:r=13")  # doctest: +SKIP
"""
from .errors import TokenSparseError
from .methods import MethodInfo, methods
from .patch import info, is_patched, patch, unpatch
from .spec import format_spec, parse_spec
from .state import LocationInfo

__version__ = "0.1.0"

__all__ = [
    "patch", "unpatch", "methods", "info", "is_patched", "parse_spec", "format_spec",
    "MethodInfo", "LocationInfo", "TokenSparseError", "__version__",
]
