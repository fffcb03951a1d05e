"""``SVDQuantizer``: the transformers ``HfQuantizer`` lifecycle for hf_svdq.

This is the only module that touches transformers' quantizer hooks. Three paths:

* **Reload** of an hf_svdq checkpoint: ``_process_model_before_weight_loading`` (meta model) reads the
  resolved ranks from the saved config, checks every compressed tensor in the safetensors header and
  swaps in compressed modules with exact shapes; the tensors then load like any parameters.
* **Quantize-on-load** (plain low rank, fixed ranks, no data): the same swap with a float placeholder;
  ``param_needs_quantization`` routes each dense ``<layer>.weight`` to :class:`SVDQuantizeOp`, which
  factorizes it (float32 SVD), fills the module in place and drops the dense tensor.
* **After load** (calibration, residual mode, energy or budget policies): the dense model loads as
  usual and ``_process_model_after_weight_loading`` compresses it (:mod:`hf_svdq.compression.compress`).

``_process_model_after_weight_loading`` also refuses any compressed layer left unfilled.
"""

from __future__ import annotations

import copy
import logging
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer

from ..algorithms.linalg import low_rank_int8
from ..calibration.source import calibration_tokenizer
from ..compression.decisions import LayerDecision, recorded_dense, recorded_ranks
from ..compression.memory import release_free_memory
from ..compression.plan import (
    compression_settings,
    find_linear_layers,
    log_plan,
    plan_from_resolved,
    protected_layers,
    resolve_plan,
)
from ..format import layout as fmt
from ..format.checkpoint import check_expert_stack, check_layer, check_single_or_sharded, read_headers
from ..nn.experts import SVDQExperts
from ..nn.layers import COMPRESSED_LAYERS, SVDQLinear, SVDQResidualLinear
from ..nn.low_rank import dense_element_bytes, dense_weight_of
from .config import SVDQuantConfig
from .moe import keep_fused_expert_names, quantize_stack, restore_conversions, swap_in_experts
from .recording import record_coverage, record_result

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class SVDQuantizer(HfQuantizer):
    """Quantize-on-load and reload of hf_svdq checkpoints inside ``from_pretrained``."""

    requires_calibration = False
    quantization_config: SVDQuantConfig

    def __init__(self, quantization_config: SVDQuantConfig, **kwargs: Any) -> None:
        # Work on a copy: resolving the plan writes into the config, and the caller may reuse theirs.
        super().__init__(copy.deepcopy(quantization_config), **kwargs)
        self.non_finite: list[str] = []  # source weights refused during quantize-on-load
        if self.pre_quantized and not self.quantization_config.is_resolved:
            raise ValueError(
                "this checkpoint's quantization_config (quant_method 'svdq') has no resolved `ranks`; "
                "it was not written by hf_svdq's save_pretrained"
            )

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("hf_svdq does not support disk offload (device_map contains 'disk')")

    @property
    def _after_load(self) -> bool:
        """Compress after the dense weights have loaded (calibration, residual, data-chosen ranks)."""
        return not self.pre_quantized and self.quantization_config.compresses_after_load

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> None:
        config = self.quantization_config
        specs = find_linear_layers(model)
        if config.is_resolved:
            decisions = plan_from_resolved(specs, config)
            if self.pre_quantized:
                _check_checkpoint(kwargs.get("checkpoint_files"), decisions, model)
        else:
            decisions = resolve_plan(specs, config, protected_layers(model), dense_element_bytes(model))
        self._decisions = decisions
        if self._after_load:
            return  # the dense model loads as usual; _process_model_after_weight_loading compresses it
        if not config.is_resolved:
            config.ranks, config.dense = recorded_ranks(decisions), recorded_dense(decisions)
            log_plan(decisions)
        for decision in decisions:
            if decision.rank is not None and not decision.spec.experts:
                _swap_in(model, decision, dense_placeholder=not self.pre_quantized)
        swap_in_experts(model, decisions, dense_placeholder=not self.pre_quantized)

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs: Any) -> bool:
        if self.pre_quantized:
            return False
        module_name, _, tensor_name = param_name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, SVDQExperts):  # an expert stack: its codes carry the stack's dense name
            param = module._parameters.get(tensor_name)
            return tensor_name in module.formats and param is not None and param.is_meta and param.is_floating_point()
        if tensor_name != fmt.LEFT:
            return False
        return isinstance(module, SVDQLinear) and module.weight.is_meta

    def get_quantize_ops(self) -> ConversionOps:
        return SVDQuantizeOp(self)

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> None:
        config = self.quantization_config
        if self.non_finite:
            raise ValueError("; ".join(self.non_finite))
        if self._after_load:
            from ..compression.blockwise import compress_model

            ids = None
            if config.calibration is not None:
                ids = config.calibration.token_ids(calibration_tokenizer(config.calibration, getattr(model.config, "name_or_path", None)), model)
            result = compress_model(model, compression_settings(config), self._decisions, ids)
            record_result(model, config, result)
            keep_fused_expert_names(model)
            _attach_hub(model)
            _maybe_int8_head(model, config)
            return
        if not self.pre_quantized:
            record_coverage(model, config, self._decisions, {})
        keep_fused_expert_names(model)
        _attach_hub(model)
        _maybe_int8_head(model, config)
        for name, module in model.named_modules():
            if isinstance(module, SVDQExperts):
                unfilled = set(module.formats) - getattr(module, "_hf_svdq_filled", set())
                if not self.pre_quantized and unfilled:
                    raise RuntimeError(f"hf_svdq: {name}.{min(unfilled)} was never compressed during loading (the "
                                       "expert stack did not reach the quantizer); refusing to return a model with "
                                       "uninitialized experts. Please report it with your transformers version.")
            elif not isinstance(module, COMPRESSED_LAYERS):
                continue
            elif not self.pre_quantized and not getattr(module, "_hf_svdq_filled", False):
                raise RuntimeError(
                    f"hf_svdq: {name} was never compressed during loading (its dense weight did not reach "
                    "the quantizer); refusing to return a model with uninitialized factors. This "
                    "transformers version or architecture routes the weight differently: please report it."
                )
            for tensor_name, param in module.named_parameters(recurse=False):
                if param.is_meta:
                    raise RuntimeError(
                        f"hf_svdq: {name}.{tensor_name} was not loaded (not in the checkpoint?); "
                        "refusing to return a model with uninitialized factors"
                    )
                param.requires_grad_(False)

    def get_state_dict_and_metadata(self, model: PreTrainedModel) -> tuple[None, dict[str, str]]:
        # no metadata of ours: safetensors writes header metadata from a hash map, so a second key next to
        # transformers' "format" lands in a different order on each save (not byte-identical); the format
        # version lives in config.json (quantization_config.format_version), checked on load
        return None, {}

    def _dequantize(self, model: PreTrainedModel, dtype: torch.dtype | None = None) -> PreTrainedModel:
        from ..nn.head import SVDQInt8Head

        restore_conversions(model)  # dense experts again: save them as transformers would
        if isinstance(dtype, str):  # some transformers versions pass config.dtype, a string such as "float32"
            dtype = getattr(torch, dtype.removeprefix("torch."))
        for name, module in list(model.named_modules()):
            if isinstance(module, (*COMPRESSED_LAYERS, SVDQInt8Head, SVDQExperts)):
                model.set_submodule(name, module.to_dense_module(dtype))
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Adapters (PEFT LoRA, see :mod:`hf_svdq.integration.peft_lora`) train on top of the frozen compressed layers."""
        return True

    @property
    def is_compileable(self) -> bool:
        return True


class SVDQuantizeOp(ConversionOps):
    """Factorizes one dense weight as it arrives and fills its :class:`SVDQLinear` in place."""

    def __init__(self, hf_quantizer: SVDQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(  # type: ignore[override]  # (transformers' signature differs between 5.x releases)
        self,
        input_dict: dict[str, Any],
        model: nn.Module | None = None,
        full_layer_name: str | None = None,
        missing_keys: set[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        if model is None or full_layer_name is None:
            raise ValueError("SVDQuantizeOp needs the model and the full layer name")
        value = next(iter(input_dict.values()))
        dense = value[0] if isinstance(value, (list, tuple)) else value
        if not dense.is_floating_point():
            raise TypeError(f"hf_svdq: {full_layer_name} arrived as {dense.dtype}, expected a float dense weight")
        module_name, _, tensor_name = full_layer_name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, SVDQExperts):
            return quantize_stack(module, tensor_name, dense, full_layer_name, missing_keys, self.hf_quantizer.non_finite)
        if not isinstance(module, SVDQLinear):
            raise TypeError(f"hf_svdq: {module_name} is {type(module).__name__}, expected SVDQLinear")
        weight = dense.t() if module.transposed else dense
        expected = (module.out_features, module.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(f"hf_svdq: {full_layer_name} has shape {tuple(dense.shape)}, expected {expected}")
        if not torch.isfinite(weight).all():
            # raised from _process_model_after_weight_loading: some transformers versions swallow the
            # message of an error raised here into a report that does not show it
            self.hf_quantizer.non_finite.append(
                f"{full_layer_name} has {int((~torch.isfinite(weight)).sum())} non-finite value(s) (NaN/Inf): refusing to compress it")
            weight = torch.zeros_like(weight)
        module.load_factors(low_rank_int8(weight, module.rank, module.weight_scale.dtype))
        module._is_hf_initialized = True  # type: ignore[assignment]
        module._hf_svdq_filled = True  # type: ignore[assignment]
        for param in module.parameters(recurse=False):
            param._is_hf_initialized = True  # type: ignore[attr-defined]
        if missing_keys is not None:
            for tensor_name in fmt.FACTOR_NAMES:
                missing_keys.discard(f"{module_name}.{tensor_name}")
        del dense, weight, value
        release_free_memory()
        return {}


def _check_checkpoint(files: list[str] | None, decisions: list[LayerDecision], model: nn.Module | None = None) -> None:
    """Refuse a checkpoint whose factor tensors are missing or misshapen, that is not safetensors, or
    whose folder holds both a single-file and a sharded save (one of them stale), before anything loads."""
    if not files:
        return
    pickled = [f for f in files if not str(f).endswith(".safetensors")]
    if pickled:
        raise ValueError(f"{pickled[0]}: an hf_svdq checkpoint must be safetensors (its factors are checked against the "
                         "header before loading; a pickled checkpoint can neither be checked nor trusted)")
    check_single_or_sharded(files)
    safetensors = [str(f) for f in files]
    headers = read_headers(safetensors)
    if model is not None:  # the other tensors: a shape the model does not have is named here, not reinitialised
        compressed = tuple(d.spec.name if d.spec.experts else f"{d.spec.name}." for d in decisions if d.rank is not None)
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        for name, (shape, _) in headers.items():
            if name in shapes and not name.startswith(compressed) and shape != shapes[name]:
                raise ValueError(f"checkpoint tensor {name} has shape {list(shape)}; the model expects {list(shapes[name])}")
    for d in decisions:
        if d.rank is not None and d.spec.experts:
            check_expert_stack(headers, d.spec.name, d.spec.experts, d.spec.out_features, d.spec.in_features, d.rank,
                               d.bits, d.group_size)
        elif d.rank is not None:
            check_layer(headers, d.spec.name, d.spec.out_features, d.spec.in_features, d.rank, d.bits, d.group_size)


def _swap_in(model: nn.Module, decision: LayerDecision, dense_placeholder: bool) -> None:
    """Put the (meta) compressed module ``decision`` plans in place of its dense layer."""
    name, rank = decision.spec.name, decision.rank
    assert rank is not None
    old = model.get_submodule(name)
    if isinstance(old, COMPRESSED_LAYERS):
        return
    weight, transposed = dense_weight_of(old)
    out_features, in_features = weight.shape
    bias = getattr(old, "bias", None) is not None
    if decision.bits is not None:  # only reached on reload: residual mode compresses after load
        model.set_submodule(name, SVDQResidualLinear(
            in_features, out_features, rank, decision.bits, decision.group_size or in_features,
            bias=bias, dtype=weight.dtype, device="meta", transposed=transposed,
        ))
        return
    new = SVDQLinear(in_features, out_features, rank, bias=bias, dtype=weight.dtype, device="meta", transposed=transposed)
    if dense_placeholder:
        # Quantize-on-load: the dense weight must reach SVDQuantizeOp in its float load dtype. A float
        # placeholder stops transformers <= 5.20 from casting it to the int8 dtype of the factor first.
        new.weight = nn.Parameter(torch.empty(new.weight.shape, dtype=weight.dtype, device="meta"), requires_grad=False)
    model.set_submodule(name, new)


def _maybe_int8_head(model: nn.Module, config: SVDQuantConfig) -> None:
    if config.int8_head:
        from ..nn.head import install_int8_head

        name = install_int8_head(model)
        if name is not None:
            logger.info("hf_svdq: %s keeps an in-memory INT8 copy for decode (int8_head=True)", name)


def register(auto_module: ModuleType | None = None) -> None:
    """Make ``quant_method="svdq"`` known to transformers; safe to call any number of times.

    ``auto_module`` is ``transformers.quantizers.auto`` when called by the import hook while that
    module is still being set up; otherwise it is imported here.
    """
    if auto_module is None:
        from transformers.quantizers import auto as auto_module
    assert auto_module is not None

    for mapping, cls in (
        (auto_module.AUTO_QUANTIZATION_CONFIG_MAPPING, SVDQuantConfig),
        (auto_module.AUTO_QUANTIZER_MAPPING, SVDQuantizer),
    ):
        current = mapping.get(fmt.QUANT_METHOD)
        if current is cls:
            continue
        if current is not None and current.__module__.split(".")[0] != "hf_svdq":
            logger.warning("hf_svdq: replacing %s registered for quant_method %r", current, fmt.QUANT_METHOD)
        # Direct assignment: transformers' register_* decorators refuse a second registration,
        # which a module reload (or a stale class) would otherwise hit.
        mapping[fmt.QUANT_METHOD] = cls


register()  # importing the quantizer registers it (also mid-import of transformers, see _autoload)


def _attach_hub(model: nn.Module) -> None:
    """Give the model hf_svdq's ``push_to_hub`` (card, tokenizer, one atomic commit; see :mod:`hf_svdq.publishing.hub`)."""
    from types import MethodType

    from ..publishing.hub import model_push_to_hub

    model.push_to_hub = MethodType(model_push_to_hub, model)  # type: ignore[method-assign,assignment]
