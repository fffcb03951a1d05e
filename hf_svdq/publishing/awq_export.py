"""Export an hf_svdq checkpoint for vLLM: an AWQ (GEMM) base folder and a PEFT LoRA adapter.

The residual mode maps onto AWQ's layout (facts in ``../shared/notes/kernels-and-serving.md``;
AutoAWQ ``awq/modules/linear/gemm.py`` and ``awq/utils/packing_utils.py``; vLLM
``model_executor/layers/quantization/awq.py``):

* An INT4 group of ``g`` inputs with fp16 scale ``s`` and integer zero ``z`` holds ``(q - z) * s``:
  AWQ's ``w = s * (q - z)`` with the same ``s`` and ``z``. ``qweight`` is int32 ``[in, out/8]`` and
  ``qzeros`` int32 ``[in/g, out/8]``, eight 4-bit values per int32 with output column
  ``8j + AWQ_ORDER[i]`` in nibble ``i``; ``scales`` is fp16 ``[in/g, out]``. The base is exact.
* Layers AWQ cannot hold as INT4 (an INT8 base, a dense layer, or an INT4 layer that vLLM fuses with one
  of those: q/k/v and gate/up share one kernel) are written dense in the export dtype and listed in
  ``modules_to_not_convert``; the summary gives the largest rounding error of every such conversion.
* The correction ``(U u) (V v)`` is a LoRA pair: ``lora_B = U diag(u)``, ``lora_A = diag(v) V``. Every
  layer gets one rank ``r``, the largest correction rank rounded up to a rank vLLM accepts
  (:data:`VLLM_LORA_RANKS`), padded with zero rows/columns (exact), and ``lora_alpha = r`` (scale 1).
  The pairs are stored in the export dtype: the summary gives that rounding too.

Pure low-rank layers (no quantized base) and group sizes vLLM's AWQ kernels do not take are refused.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..algorithms.groupquant import dequantize_groups, unpack_codes
from ..format import layout as fmt
from ..format.checkpoint import TOKENIZER_FILES, stack_tensor_names, tensor_owners
from ..integration.config import SVDQuantConfig
from .awq_experts import PER_EXPERT_NAMES, original_name, split_expert_stacks

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Nibble ``i`` of a packed int32 holds output column ``8j + AWQ_ORDER[i]`` (AutoAWQ ``packing_utils.py``)."""
AWQ_GROUP_SIZES = (32, 64, 128)
"""Group sizes vLLM's AWQ kernels (``awq``, ``awq_marlin``) run."""
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""Values vLLM accepts for ``--max-lora-rank``."""
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("c_attn",), ("qkv_proj",), ("gate_up_proj",))
"""Projections vLLM runs as one fused kernel: they must all be INT4 or all dense."""
VLLM_FUSED_NAMES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
                    "up_proj": "gate_up_proj"}
"""vLLM's module that runs each projection fused (Llama, Qwen2, Gemma-3 and most decoder models)."""
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
EXTRA_FILES = (*TOKENIZER_FILES, "generation_config.json")
ADAPTER_DIR = "adapter"
PEFT_PREFIX = "base_model.model."
"""PEFT names an adapter tensor ``base_model.model.<module>.lora_A.weight``."""


@dataclass
class AWQExport:
    """What :func:`export_awq_lora` wrote."""

    base: Path
    adapter: Path | None
    lora_rank: int = 0
    awq_layers: list[str] = field(default_factory=list)
    dense_layers: dict[str, str] = field(default_factory=dict)  # layer -> why it is dense
    max_rounding: dict[str, float] = field(default_factory=dict)  # what -> max |exported - stored|

    def summary(self) -> dict[str, Any]:
        files = sorted(p for p in self.base.rglob("*") if p.is_file())
        return {"files": {str(p.relative_to(self.base)): p.stat().st_size for p in files},
                "awq_int4_layers": len(self.awq_layers), "dense_layers": self.dense_layers,
                "lora_rank": self.lora_rank, "max_abs_rounding": self.max_rounding}


def pack_awq(codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """AWQ GEMM tensors of an INT4 layer: ``codes`` unpacked ``[out, in]`` (0..15), ``zero`` and ``scale``
    ``[out, in/g]`` -> ``qweight`` int32 ``[in, out/8]``, ``qzeros`` int32 ``[in/g, out/8]``, ``scales`` fp16 ``[in/g, out]``."""
    out = codes.shape[0]
    if out % 8:
        raise ValueError(f"AWQ packs 8 output columns per int32; {out} outputs is not a multiple of 8")

    def pack(values: torch.Tensor) -> torch.Tensor:  # [rows, out] in 0..15 -> [rows, out/8] int32
        grouped = values.to(torch.int64).reshape(values.shape[0], out // 8, 8)[:, :, list(AWQ_ORDER)]
        shifts = torch.arange(0, 32, 4, dtype=torch.int64)
        word = (grouped << shifts).sum(-1)
        return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)  # same bits, signed

    return {"qweight": pack(codes.T), "qzeros": pack(zero.T), "scales": scale.to(torch.float16).T.contiguous()}


def _dense_linears(config: dict[str, Any]) -> list[str]:
    """Names of the model's Linear layers (built on the meta device from ``config``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def not_converted(dense: Iterable[str]) -> list[str]:
    """``modules_to_not_convert``: the dense layers, plus vLLM's name of a fused kernel whose parts are all dense
    (``...self_attn.qkv_proj``): vLLM matches this list against its fused module names by substring."""
    names = set(dense)
    for name in dense:
        prefix, _, kind = name.rpartition(".")
        if kind in VLLM_FUSED_NAMES:
            names.add(f"{prefix}.{VLLM_FUSED_NAMES[kind]}")
    return sorted(names)


def _fused_partners(name: str) -> list[str]:
    prefix, _, kind = name.rpartition(".")
    for group in FUSED:
        if kind in group:
            return [f"{prefix}.{k}" for k in group]
    return [name]


def _vllm_rank(rank: int) -> int:
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"correction rank {rank} exceeds the largest LoRA rank vLLM accepts ({VLLM_LORA_RANKS[-1]})")


def export_awq_lora(checkpoint: str | Path, out_dir: str | Path, *, dtype: str = "float16",
                    progress: bool = True) -> AWQExport:
    """Write an AWQ checkpoint of ``checkpoint``'s base into ``out_dir`` and its correction as a PEFT
    adapter into ``out_dir/adapter`` (when any layer has one).

    Raises:
        ValueError: naming what does not map (pure low-rank mode, a group size, an output width).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} (what vLLM's AWQ kernels run), got {dtype!r}")
    target = DTYPES[dtype]
    folder, out = Path(checkpoint), Path(out_dir)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    qconfig = _awq_compatible(config)
    owner = tensor_owners(folder)

    def get(name: str) -> torch.Tensor:
        return owner[name].get_tensor(name)

    compressed = set(qconfig.ranks or {})
    linears = _dense_linears(config)
    model_type = str(config.get("model_type"))
    stack_of = stack_tensor_names(list(owner))
    stacks = sorted(set(stack_of.values()))
    experts = split_expert_stacks(stacks, get, model_type, compressed) if stacks else {}
    virtual = {f"{layer}.{t}": v for layer, entry in experts.items() for t, v in entry.items()}
    if experts:  # each expert is a Linear of its own to AWQ, at its stack's bits
        per_expert = {n: qconfig.bits_for(stack) for n, stack in _expert_stack(experts, stacks, model_type).items()}
        qconfig.layer_bits = {**(qconfig.layer_bits or {}), **{n: b for n, b in per_expert.items() if b is not None}}
        compressed = (compressed - set(stacks)) | {n for n, e in experts.items() if fmt.CODES in e}
        linears = linears + sorted(experts)

    def get_any(name: str) -> torch.Tensor:
        return virtual[name] if name in virtual else get(name)

    result = AWQExport(out, None)
    _assign_layers(result, compressed, linears, qconfig, lambda name: get_any(name).shape, model_type)
    _check_experts(result, experts)
    if experts:  # the original checkpoints' names (Mixtral's block_sparse_moe), and the routers stay dense
        result.dense_layers = {original_name(n, model_type): why for n, why in result.dense_layers.items()}
        for stack in stacks:
            router = original_name(stack.rpartition(".")[0].rpartition(".")[0] + ".gate", model_type)
            result.dense_layers[router] = "router (dense by design)"

    tensors: dict[str, torch.Tensor] = {}
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def note(what: str, exported: torch.Tensor, stored: torch.Tensor) -> None:
        error = float((exported.float() - stored.float()).abs().max()) if stored.numel() else 0.0
        result.max_rounding[what] = max(result.max_rounding.get(what, 0.0), error)

    names = sorted([n for n in owner if n not in stack_of] + list(virtual))
    for name in tqdm(names, desc="exporting to AWQ", disable=not progress):
        layer, _, tensor_name = name.rpartition(".")
        if layer in compressed and tensor_name != "bias":
            if tensor_name == fmt.CODES:
                _write_layer(layer, get_any, qconfig, layer in result.awq_layers, target, tensors, lora, note)
            continue
        tensor = get_any(name)
        name = original_name(name, model_type) if experts else name
        tensors[name] = tensor.to(target) if tensor.is_floating_point() else tensor
        if tensor.is_floating_point():
            note(f"dense tensors ({dtype})", tensors[name], tensor)

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_config(out, config, dtype, qconfig.group_size, result.dense_layers)
    for extra in EXTRA_FILES:
        if (folder / extra).is_file():
            shutil.copyfile(folder / extra, out / extra)
    if lora:
        for a, b in lora.values():
            note(f"LoRA pairs ({dtype})", a.to(target), a)
            note(f"LoRA pairs ({dtype})", b.to(target), b)
        result.lora_rank = _write_adapter(out / ADAPTER_DIR, lora, target)
        result.adapter = out / ADAPTER_DIR
    return result


def _expert_stack(experts: dict[str, Any], stacks: list[str], model_type: str) -> dict[str, str]:
    """Per-expert layer -> the stack it came from."""
    out = {}
    for stack in stacks:
        module, _, last = stack.rpartition(".")
        prefix = original_name(module, model_type) + "."
        parts = ("gate", "up") if last == "gate_up_proj" else ("down",) if last == "down_proj" else ("up",)
        names = {PER_EXPERT_NAMES[model_type][1][p] for p in parts}
        out.update({n: stack for n in experts if n.startswith(prefix) and n.rpartition(".")[2] in names})
    return out


def _check_experts(result: AWQExport, experts: dict[str, Any]) -> None:
    """vLLM runs a MoE layer's experts as one fused kernel of one quantization: every expert must be AWQ INT4."""
    for name in sorted(experts):
        if name not in result.awq_layers:
            raise ValueError(f"expert layer {name} cannot be AWQ INT4 ({result.dense_layers.get(name, 'not compressed')}): "
                             "vLLM quantizes a MoE layer's experts all alike; compress every expert stack at 4 bits "
                             "with a group size of 32, 64 or 128, or use the GGUF export")


def _awq_compatible(config: dict[str, Any]) -> SVDQuantConfig:
    """The checkpoint's config, if AWQ can hold its mode; ValueError naming what does not map otherwise."""
    qconfig = SVDQuantConfig.from_dict(config.get("quantization_config") or {})
    if qconfig.residual_bits is None:
        raise ValueError("pure low-rank checkpoints have no quantized base for AWQ to hold; export a residual-mode "
                         "(residual_bits=4) checkpoint, whose base is AWQ's layout and whose correction is a LoRA adapter")
    if qconfig.group_size not in AWQ_GROUP_SIZES:
        raise ValueError(f"group_size {qconfig.group_size} is not one vLLM's AWQ kernels run {AWQ_GROUP_SIZES}; "
                         "compress with one of those (the GGUF export takes any multiple of 32)")
    return qconfig


def _write_config(out: Path, config: dict[str, Any], dtype: str, group: int | None, dense: dict[str, str]) -> None:
    """The source ``config.json`` with AWQ's ``quantization_config`` in place of ours."""
    awq_config = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group, "zero_point": True,
                  "modules_to_not_convert": not_converted(dense)}
    exported = {k: v for k, v in config.items() if k not in ("quantization_config", "torch_dtype")}
    exported.update(dtype=dtype, quantization_config=awq_config)
    (out / "config.json").write_text(json.dumps(exported, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _assign_layers(result: AWQExport, compressed: set[str], linears: list[str], qconfig: SVDQuantConfig,
                   shape_of: Callable[[str], Any], model_type: object) -> None:
    """Which layers AWQ holds as INT4 (``result.awq_layers``) and which are written dense, and why."""
    not_linear = sorted(compressed - set(linears))
    if not_linear:
        raise ValueError(f"{not_linear[0]} is not an nn.Linear in {model_type!r} (GPT-2's Conv1D?): "
                         "AWQ checkpoints hold nn.Linear layers; the GGUF export or our own format can hold it")
    int4 = {n for n in compressed if qconfig.bits_for(n) == 4}
    for name in sorted(int4):
        blockers = [p for p in _fused_partners(name) if p in linears and p not in int4]
        if blockers:
            result.dense_layers[name] = f"vLLM fuses it with {blockers[0]}, which is not INT4"
        elif shape_of(f"{name}.{fmt.CODES}")[0] % 8:
            result.dense_layers[name] = "output width is not a multiple of 8"
        else:
            result.awq_layers.append(name)
    for name in linears:
        if name not in result.awq_layers and name not in result.dense_layers:
            result.dense_layers[name] = f"INT{qconfig.bits_for(name)} base" if name in compressed else "dense in the checkpoint"


def _write_layer(layer: str, get: Any, qconfig: SVDQuantConfig, as_awq: bool, target: torch.dtype,
                 tensors: dict[str, torch.Tensor], lora: dict[str, tuple[torch.Tensor, torch.Tensor]], note: Any) -> None:
    bits = qconfig.bits_for(layer)
    if bits is None:
        raise ValueError(f"{layer}: the checkpoint's config gives it no base bit width (not a residual-mode layer)")
    codes = unpack_codes(get(f"{layer}.{fmt.CODES}"), bits)
    scale, zero = get(f"{layer}.{fmt.GROUP_SCALE}"), get(f"{layer}.{fmt.GROUP_ZERO}")
    if as_awq:
        for key, value in pack_awq(codes, zero, scale).items():
            tensors[f"{layer}.{key}"] = value
    else:
        weight = dequantize_groups(codes, scale, zero, codes.shape[1] // scale.shape[1], torch.float32)  # exact
        tensors[f"{layer}.weight"] = weight.to(target)
        note(f"INT{bits} layers written dense", tensors[f"{layer}.weight"], weight)
    try:
        bias = get(f"{layer}.bias")
    except KeyError:
        bias = None
    if bias is not None:
        tensors[f"{layer}.bias"] = bias.to(target)
    try:
        left = get(f"{layer}.{fmt.CORR_LEFT}").float() * get(f"{layer}.{fmt.CORR_LEFT_SCALE}").float()[:, None]
    except KeyError:
        return
    right = get(f"{layer}.{fmt.RIGHT}").float() * get(f"{layer}.{fmt.RIGHT_SCALE}").float()[:, None]
    lora[layer] = (right, left)  # lora_A [r, in], lora_B [out, r]


def _write_adapter(folder: Path, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], target: torch.dtype) -> int:
    """PEFT adapter: one rank for all layers (zero-padded: exact), ``lora_alpha = rank`` (scale 1)."""
    rank = _vllm_rank(max(a.shape[0] for a, _ in lora.values()))
    weights: dict[str, torch.Tensor] = {}
    for name, (a, b) in sorted(lora.items()):
        pad = rank - a.shape[0]
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])]) if pad else a
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1) if pad else b
        weights[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.to(target).contiguous()
        weights[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.to(target).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "target_modules": sorted(lora), "bias": "none", "fan_in_fan_out": False, "base_model_name_or_path": None,
        "inference_mode": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return rank
