"""hf_svdq: low-rank (SVD) compression with INT8 factors as a transformers quantization backend.

Importing the package is cheap (it also runs at interpreter start through the autoload hook);
the public names below are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .format import FORMAT_VERSION, QUANT_METHOD

__version__ = "0.1.0"

_LAZY = {
    "SVDQuantConfig": ".config",
    "SVDQLinear": ".modules",
    "SVDQuantizer": ".quantizer",
    "register": ".registration",
    "smollm2_checkpoint": ".real_model",
}

__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "__version__", *_LAZY]

if TYPE_CHECKING:
    from .config import SVDQuantConfig
    from .modules import SVDQLinear
    from .quantizer import SVDQuantizer
    from .real_model import smollm2_checkpoint
    from .registration import register


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
