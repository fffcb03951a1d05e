"""The compressed layer types, in one place for code that handles all of them."""

from __future__ import annotations

from .low_rank import SVDQLinear
from .residual import SVDQResidualLinear

COMPRESSED_LAYERS = (SVDQLinear, SVDQResidualLinear)
"""Every module type hf_svdq puts in place of a dense Linear."""

__all__ = ["COMPRESSED_LAYERS", "SVDQLinear", "SVDQResidualLinear"]
