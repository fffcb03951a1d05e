"""hf_svdq: low-rank (SVD) compression with INT8 factors as a transformers quantization backend.

Importing the package is cheap (it also runs at interpreter start through the autoload hook);
the public names below are imported on first use.
"""

__version__ = "0.1.0"

_LAZY = {
    "FORMAT_VERSION": ".format.layout",
    "QUANT_METHOD": ".format.layout",
    "SVDQuantConfig": ".integration.config",
    "CalibrationConfig": ".calibration.source",
    "SVDQLinear": ".nn.low_rank",
    "SVDQResidualLinear": ".nn.residual",
    "SVDQuantizer": ".integration.quantizer",
    "register": ".integration.quantizer",
    "smollm2_checkpoint": ".real_model",
    "evaluate": ".evaluation.metrics",
    "analyze": ".analysis.analyze",
    "AnalysisSettings": ".analysis.analyze",
    "push_checkpoint": ".publishing.hub",
    "build_model_card": ".publishing.model_card",
    "export": ".publishing.exports",
    "export_gguf": ".publishing.gguf_export",
    "export_awq_lora": ".publishing.awq_export",
    "PillarMonitor": ".monitoring.pillar_monitor",
    "AlarmRule": ".monitoring.statistics",
}

_REGISTERS = ("SVDQuantConfig",)

__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "AlarmRule",
    "AnalysisSettings",
    "CalibrationConfig",
    "PillarMonitor",
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

    from .analysis.analyze import AnalysisSettings as AnalysisSettings
    from .analysis.analyze import analyze as analyze
    from .calibration.source import CalibrationConfig as CalibrationConfig
    from .evaluation.metrics import evaluate as evaluate
    from .format.layout import FORMAT_VERSION as FORMAT_VERSION
    from .format.layout import QUANT_METHOD as QUANT_METHOD
    from .integration.config import SVDQuantConfig as SVDQuantConfig
    from .integration.quantizer import SVDQuantizer as SVDQuantizer
    from .integration.quantizer import register as register
    from .monitoring.pillar_monitor import PillarMonitor as PillarMonitor
    from .monitoring.statistics import AlarmRule as AlarmRule
    from .nn.low_rank import SVDQLinear as SVDQLinear
    from .nn.residual import SVDQResidualLinear as SVDQResidualLinear
    from .publishing.awq_export import export_awq_lora as export_awq_lora
    from .publishing.exports import export as export
    from .publishing.gguf_export import export_gguf as export_gguf
    from .publishing.hub import push_checkpoint as push_checkpoint
    from .publishing.model_card import build_model_card as build_model_card
    from .real_model import smollm2_checkpoint as smollm2_checkpoint


def __getattr__(name: str) -> "Any":
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        if name in _REGISTERS:  # whoever holds a config can pass it to from_pretrained, also with the autoload hook off
            importlib.import_module(".integration.quantizer", __name__).register()
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
