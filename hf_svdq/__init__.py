"""hf_svdq: low-rank (SVD) compression with INT8 factors as a transformers quantization backend.

Importing the package is cheap (it also runs at interpreter start through the autoload hook);
the public names below are imported on first use.
"""

__version__ = "0.1.0"

_LAZY = {
    "FORMAT_VERSION": ".format",
    "QUANT_METHOD": ".format",
    "SVDQuantConfig": ".config",
    "CalibrationConfig": ".calibration",
    "SVDQLinear": ".modules",
    "SVDQResidualLinear": ".residual",
    "SVDQuantizer": ".quantizer",
    "register": ".registration",
    "smollm2_checkpoint": ".real_model",
    "evaluate": ".evaluation",
    "analyze": ".analyze",
    "AnalysisSettings": ".analyze",
    "push_checkpoint": ".hub",
    "build_model_card": ".model_card",
    "export": ".serving",
    "export_gguf": ".gguf_export",
    "export_awq_lora": ".awq_export",
}

__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "AnalysisSettings",
    "CalibrationConfig",
    "SVDQLinear",
    "SVDQResidualLinear",
    "SVDQuantConfig",
    "SVDQuantizer",
    "__version__",
    "analyze",
    "build_model_card",
    "evaluate",
    "export",
    "export_awq_lora",
    "export_gguf",
    "push_checkpoint",
    "register",
    "smollm2_checkpoint",
]

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing would cost every interpreter start (autoload)
if TYPE_CHECKING:
    from typing import Any

    from .analyze import AnalysisSettings as AnalysisSettings
    from .analyze import analyze as analyze
    from .awq_export import export_awq_lora as export_awq_lora
    from .calibration import CalibrationConfig as CalibrationConfig
    from .config import SVDQuantConfig as SVDQuantConfig
    from .evaluation import evaluate as evaluate
    from .format import FORMAT_VERSION as FORMAT_VERSION
    from .format import QUANT_METHOD as QUANT_METHOD
    from .gguf_export import export_gguf as export_gguf
    from .hub import push_checkpoint as push_checkpoint
    from .model_card import build_model_card as build_model_card
    from .modules import SVDQLinear as SVDQLinear
    from .quantizer import SVDQuantizer as SVDQuantizer
    from .real_model import smollm2_checkpoint as smollm2_checkpoint
    from .registration import register as register
    from .residual import SVDQResidualLinear as SVDQResidualLinear
    from .serving import export as export


def __getattr__(name: str) -> "Any":
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
