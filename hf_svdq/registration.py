"""Idempotent registration of hf_svdq's config and quantizer with transformers."""

from __future__ import annotations

import logging
from types import ModuleType

from .format import QUANT_METHOD

logger = logging.getLogger(__name__)


def register(auto_module: ModuleType | None = None) -> None:
    """Make ``quant_method="svdq"`` known to transformers; safe to call any number of times.

    ``auto_module`` is ``transformers.quantizers.auto`` when called by the import hook while that
    module is still being set up; otherwise it is imported here.
    """
    if auto_module is None:
        from transformers.quantizers import auto as auto_module
    from .config import SVDQuantConfig
    from .quantizer import SVDQuantizer

    for mapping, cls in (
        (auto_module.AUTO_QUANTIZATION_CONFIG_MAPPING, SVDQuantConfig),
        (auto_module.AUTO_QUANTIZER_MAPPING, SVDQuantizer),
    ):
        current = mapping.get(QUANT_METHOD)
        if current is cls:
            continue
        if current is not None and current.__module__.split(".")[0] != "hf_svdq":
            logger.warning("hf_svdq: replacing %s registered for quant_method %r", current, QUANT_METHOD)
        # Direct assignment: transformers' register_* decorators refuse a second registration,
        # which a module reload (or a stale class) would otherwise hit.
        mapping[QUANT_METHOD] = cls
