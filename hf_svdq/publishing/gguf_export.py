"""Export an hf_svdq checkpoint to llama.cpp: a base ``.gguf`` and a GGUF LoRA adapter.

The residual mode maps onto llama.cpp's own types (facts in ``../shared/notes/kernels-and-serving.md``
and llama.cpp's ``gguf-py/gguf/quants.py``):

* An INT4 group of ``g`` inputs (``g`` a multiple of 32) with fp16 scale ``s`` and integer zero ``z``
  holds ``(q - z) * s``. That is ``g / 32`` **Q4_1** blocks ``q * d + m`` with ``d = s`` and
  ``m = fp16(-z * s)``. The only change is the fp16 rounding of ``m``: half an fp16 ulp of ``z * s``,
  reported per layer type in the summary.
* An INT8 base is written as F32 ``(q - z) * s``. That is exact: an 8-bit integer times an fp16 scale
  fits float32's mantissa. Dense layers keep their stored float type (bf16 becomes F32).
* The INT8 low-rank correction ``(U u) (V v)`` becomes a LoRA pair (``lora_b = U diag(u)``,
  ``lora_a = diag(v) V``) in a GGUF adapter with ``adapter.lora.alpha = 0``. llama.cpp then scales
  every pair by the ``--lora`` scale alone (1.0), whatever its rank.
* Llama's ``q_proj``/``k_proj`` rows are permuted into llama.cpp's rotary layout (as its
  ``convert_hf_to_gguf.py`` does). The permutation moves whole rows, so Q4_1 blocks and the LoRA
  ``lora_b`` rows move with them.

* Mixture-of-experts stacks (Mixtral, Qwen3-MoE) become llama.cpp's 3-D expert tensors
  ``blk.N.ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps`` (numpy ``[E, out, in]``; ``gate_up_proj`` is
  split at its middle row into gate and up, as transformers concatenates them), Q4_1 like any INT4 layer.
  Their corrections become 3-D LoRA pairs (``lora_a`` ``[E, r, in]``, ``lora_b`` ``[E, out, r]``), which
  llama.cpp applies through ``build_lora_mm_id`` to the routed experts only. The router is
  ``ffn_gate_inp`` (float).

Supported: the Llama, Qwen2, Mixtral and Qwen3-MoE architectures (SmolLM2, Llama 2/3, Qwen2/2.5 layouts without rope scaling) with a BPE
(GPT-2 style) tokenizer whose pre-tokenizer llama.cpp knows (:data:`PRE_TOKENIZERS`). Pure low-rank
layers have no quantized base to map and are refused, with the reason. The tokenizer, its merges,
special tokens and chat template are carried over.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..algorithms.groupquant import dequantize_groups, unpack_codes
from ..format import layout as fmt
from ..format.checkpoint import stack_tensor_names, tensor_owners
from ..integration.config import SVDQuantConfig

CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на "
    "Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)
"""The text llama.cpp encodes to fingerprint a BPE pre-tokenizer (``conversion/base.py``, ``get_vocab_base_pre``)."""

PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
"""sha256 of ``str(tokenizer.encode(CHKTXT))`` -> llama.cpp's ``tokenizer.ggml.pre`` (same source)."""

Q4_1_BLOCK = 32
ARCHITECTURES = {"llama": True, "qwen2": False, "mixtral": True, "qwen3_moe": False}
"""model_type -> whether q/k rows are permuted (llama.cpp's converter permutes Llama's and Mixtral's, not Qwen's)."""
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "mixtral": "llama", "qwen3_moe": "qwen3moe"}
"""model_type -> llama.cpp architecture (Mixtral is llama.cpp's ``llama`` with experts)."""


@dataclass
class GGUFExport:
    """What :func:`export_gguf` wrote."""

    base: Path
    adapter: Path | None
    tensors: dict[str, str] = field(default_factory=dict)  # gguf name -> type written
    max_offset_error: dict[str, float] = field(default_factory=dict)  # layer type -> max |m - (-z s)|

    def summary(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for kind in self.tensors.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        files = [self.base] + ([self.adapter] if self.adapter else [])
        return {"files": {p.name: p.stat().st_size for p in files}, "tensor_types": kinds,
                "q4_1_offset_rounding_max_abs": self.max_offset_error}


def q4_1_blocks(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> tuple[np.ndarray, float]:
    """Our INT4 layout (``[out, in/g, g/2]`` codes, fp16 scales, uint8 zeros) as Q4_1 bytes ``[out, in/32 * 20]``,
    and the largest rounding of the block offset ``m = fp16(-z s)``. ``group_size`` must be a multiple of 32."""
    if group_size % Q4_1_BLOCK:
        raise ValueError(f"group size {group_size} is not a multiple of 32: INT4 groups map onto Q4_1 blocks of 32 only then")
    codes = unpack_codes(packed, 4)  # [out, in]
    out, n = codes.shape
    repeat = group_size // Q4_1_BLOCK
    d = scale.to(torch.float16).repeat_interleave(repeat, dim=1)  # [out, in/32]
    exact = -(zero.to(torch.float32) * scale.to(torch.float32))
    m16 = exact.to(torch.float16)
    error = float((m16.float() - exact).abs().max()) if exact.numel() else 0.0
    m = m16.repeat_interleave(repeat, dim=1)
    blocks = codes.view(out, n // Q4_1_BLOCK, 2, Q4_1_BLOCK // 2)  # elements j and j + 16 share a byte
    qs = (blocks[:, :, 0, :] | (blocks[:, :, 1, :] << 4)).numpy()
    d_bytes = d.numpy().view(np.uint8).reshape(out, -1, 2)
    m_bytes = m.numpy().view(np.uint8).reshape(out, -1, 2)
    return np.concatenate([d_bytes, m_bytes, qs], axis=-1).reshape(out, -1), error


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF Llama q/k rows -> llama.cpp's rotary layout (``convert_hf_to_gguf.py``'s ``permute``)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tokenizer_metadata(writer: Any, folder: Path, vocab_size: int) -> None:
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    chkhsh = hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(chkhsh)
    if pre is None:
        raise ValueError(f"tokenizer pre-tokenizer fingerprint {chkhsh} is not one llama.cpp is known to match "
                         f"({sorted(set(PRE_TOKENIZERS.values()))}); exporting it would tokenize differently in llama.cpp")
    vocab = tokenizer.get_vocab()
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(writer)


def _model_metadata(writer: Any, config: dict[str, Any]) -> None:
    rope = config.get("rope_parameters") or {}
    if config.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {config.get('rope_scaling') or rope} is not exported yet (only plain rope)")
    heads = config["num_attention_heads"]
    writer.add_name(str(config.get("_name_or_path") or config.get("_model_name_or_path") or "hf_svdq export"))
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    experts = config.get("num_local_experts") or config.get("num_experts")
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config["num_experts_per_tok"])
        if config.get("moe_intermediate_size"):
            writer.add_expert_feed_forward_length(config["moe_intermediate_size"])


def _check_moe(config: dict[str, Any]) -> None:
    """Refuse MoE settings llama.cpp's graph for the architecture does not compute (naming the setting)."""
    arch = config.get("model_type")
    if arch == "mixtral" and config.get("sliding_window"):
        raise ValueError(f"Mixtral with sliding_window {config['sliding_window']}: llama.cpp's llama graph has no sliding window")
    if arch == "qwen3_moe":
        if not config.get("norm_topk_prob"):
            raise ValueError("Qwen3-MoE with norm_topk_prob false: llama.cpp's qwen3moe graph renormalises the top-k weights")
        if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
            raise ValueError("Qwen3-MoE with dense-MLP layers (mlp_only_layers / decoder_sparse_step) is not exported yet")


def _layer_tensors(handle: Any, name: str) -> Iterator[str]:
    yield from (k for k in handle.keys() if k.startswith(name + "."))  # noqa: SIM118


def _gguf_compatible(config: dict[str, Any]) -> tuple[SVDQuantConfig, str]:
    """The checkpoint's config and architecture, if GGUF can hold them; ValueError naming what does not map."""
    qconfig = SVDQuantConfig.from_dict(config.get("quantization_config") or {})
    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF export supports model_type {sorted(ARCHITECTURES)} (SmolLM2, Llama, Qwen2, Mixtral, "
                         f"Qwen3-MoE); got {arch!r}")
    _check_moe(config)
    if qconfig.residual_bits is None:
        raise ValueError("pure low-rank checkpoints have no quantized base for GGUF to hold; export a residual-mode "
                         "(residual_bits=4) checkpoint, whose base maps onto Q4_1 and whose correction onto a LoRA adapter")
    return qconfig, str(arch)


def _writers(base_path: Path, lora_path: Path, arch: str) -> tuple[Any, Any]:
    """The base model writer (Q4_1 file type) and the LoRA adapter writer (alpha 0: scale 1 for every rank)."""
    import gguf

    base = gguf.GGUFWriter(str(base_path), arch)
    base.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    base.add_quantization_version(gguf.GGML_QUANT_VERSION)
    lora = gguf.GGUFWriter(str(lora_path), arch)
    lora.add_type(gguf.GGUFType.ADAPTER)
    lora.add_string(gguf.Keys.Adapter.TYPE, "lora")
    lora.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # scale = --lora scale for every rank
    return base, lora


def export_gguf(checkpoint: str | Path, out_dir: str | Path, *, tokenizer: str | Path | None = None,
                progress: bool = True) -> GGUFExport:
    """Write ``model.gguf`` (and ``lora.gguf`` when any layer has a correction) for llama.cpp into ``out_dir``;
    the tokenizer is read from ``tokenizer`` (a folder; default: the checkpoint's own files).

    Raises:
        ValueError: naming what does not map (architecture, tokenizer, a pure low-rank layer, a group size).
    """
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the gguf package: pip install 'hf-svdq[gguf]'") from None

    folder = Path(checkpoint)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    qconfig, arch = _gguf_compatible(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    gguf_arch = GGUF_ARCH[arch]
    names = gguf.TensorNameMap(getattr(gguf.MODEL_ARCH, gguf_arch.upper()), config["num_hidden_layers"])
    permute = ARCHITECTURES[arch]
    compressed = set(qconfig.ranks or {})
    result = GGUFExport(out / "model.gguf", None)
    base, lora = _writers(result.base, out / "lora.gguf", gguf_arch)
    _model_metadata(base, config)
    _tokenizer_metadata(base, Path(tokenizer) if tokenizer is not None else folder, config["vocab_size"])
    owner = tensor_owners(folder)
    has_lora = False
    stacks = stack_tensor_names(list(owner))
    for hf_name in tqdm(sorted(owner), desc="exporting to GGUF", disable=not progress):
        layer, _, tensor_name = hf_name.rpartition(".")
        stack = stacks.get(hf_name)
        if stack is not None:
            if hf_name == stack:  # the stack's other tensors are written with its codes
                has_lora |= _write_stack(base, lora, owner, stack, stack in compressed, qconfig, names, result)
            continue
        if layer in compressed and tensor_name != "bias":
            if tensor_name != fmt.CODES:
                continue  # the layer's other tensors are written with its codes
            has_lora |= _write_layer(base, lora, owner, layer, qconfig, names, (heads, kv_heads) if permute else None, result)
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"tensor {hf_name} has no llama.cpp name for the {arch} architecture")
        tensor = owner[hf_name].get_tensor(hf_name)
        tensor = tensor.float() if tensor.dtype not in (torch.float16, torch.float32) else tensor
        if permute and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = permute_rows(tensor, heads if "q_proj" in hf_name else kv_heads)
        base.add_tensor(gguf_name, tensor.numpy())
        result.tensors[gguf_name] = "F16" if tensor.dtype == torch.float16 else "F32"
    _write_files((base, lora) if has_lora else (base,), progress)
    if has_lora:
        result.adapter = out / "lora.gguf"
    return result


def _write_stack(base: Any, lora: Any, owner: dict[str, Any], stack: str, is_compressed: bool, qconfig: SVDQuantConfig,
                 names: Any, result: GGUFExport) -> bool:
    """One expert stack as llama.cpp's 3-D ``ffn_*_exps`` tensors (``gate_up_proj`` split into gate and up),
    its correction as 3-D LoRA pairs; True when it has one."""
    import gguf

    module, _, last = stack.rpartition(".")

    def get(tensor: str) -> torch.Tensor:
        key = f"{module}.{fmt.expert_tensor_name(last, tensor)}"
        return owner[key].get_tensor(key)

    first = get(fmt.CODES)
    rows = first.shape[1]
    parts = (("gate_proj", slice(0, rows // 2)), ("up_proj", slice(rows // 2, rows))) if last == "gate_up_proj" \
        else (("down_proj" if last == "down_proj" else "up_proj", slice(0, rows)),)
    bits, group = qconfig.bits_for(stack), qconfig.group_size
    has_lora = False
    for part, sel in parts:
        gguf_name = names.get_name(f"{module}.{part}.weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise ValueError(f"expert stack {stack} has no llama.cpp name for this architecture")
        if not is_compressed:  # a dense stack (a skip pattern): float, [E, out, in]
            base.add_tensor(gguf_name, first[:, sel].float().numpy())
            result.tensors[gguf_name] = "F32"
            continue
        if bits is None:
            raise ValueError(f"{stack} is pure low rank: no quantized base for GGUF to hold")
        codes, scale, zero = first[:, sel], get(fmt.GROUP_SCALE)[:, sel], get(fmt.GROUP_ZERO)[:, sel]
        if bits == 4:
            group = group or codes.shape[2] * codes.shape[3] * 2
            blocks = [q4_1_blocks(codes[e], scale[e], zero[e], group) for e in range(codes.shape[0])]
            base.add_tensor(gguf_name, np.stack([b for b, _ in blocks]), raw_dtype=gguf.GGMLQuantizationType.Q4_1)
            result.tensors[gguf_name] = "Q4_1"
            kind = f"experts.{part}"
            result.max_offset_error[kind] = max([result.max_offset_error.get(kind, 0.0)] + [e for _, e in blocks])
        else:
            weight = torch.stack([dequantize_groups(unpack_codes(codes[e], 8), scale[e], zero[e], codes.shape[3], torch.float32)
                                  for e in range(codes.shape[0])])
            base.add_tensor(gguf_name, weight.numpy())
            result.tensors[gguf_name] = "F32"
        if f"{module}.{fmt.expert_tensor_name(last, fmt.CORR_LEFT)}" not in owner:
            continue
        lora_b = get(fmt.CORR_LEFT)[:, sel].float() * get(fmt.CORR_LEFT_SCALE)[:, sel].float()[..., None]
        lora_a = get(fmt.RIGHT).float() * get(fmt.RIGHT_SCALE).float()[..., None]
        lora.add_tensor(gguf_name + ".lora_a", lora_a.contiguous().numpy())
        lora.add_tensor(gguf_name + ".lora_b", lora_b.contiguous().numpy())
        has_lora = True
    return has_lora


def _write_files(writers: tuple[Any, ...], progress: bool) -> None:
    for writer in writers:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()


def _write_layer(base: Any, lora: Any, owner: dict[str, Any], layer: str, qconfig: SVDQuantConfig, names: Any,
                 heads: tuple[int, int] | None, result: GGUFExport) -> bool:
    """One compressed layer: its base into ``base``, its correction (if any) into ``lora``; True when it has one.
    ``heads``: (query heads, key/value heads) when q/k rows are permuted into llama.cpp's rotary layout."""
    import gguf

    def get(tensor: str) -> torch.Tensor:
        return owner[f"{layer}.{tensor}"].get_tensor(f"{layer}.{tensor}")

    gguf_name = names.get_name(layer + ".weight", try_suffixes=(".weight",))
    if gguf_name is None:
        raise ValueError(f"layer {layer} has no llama.cpp name for this architecture")
    bits, group = qconfig.bits_for(layer), qconfig.group_size
    codes, scale, zero = get(fmt.CODES), get(fmt.GROUP_SCALE), get(fmt.GROUP_ZERO)
    rows = None if heads is None else heads[0] if layer.endswith("q_proj") else heads[1] if layer.endswith("k_proj") else None

    def arrange(t: torch.Tensor) -> torch.Tensor:
        return permute_rows(t, rows) if rows else t

    kind = layer.rpartition(".")[2]
    if bits == 4:
        group = group or codes.shape[1] * codes.shape[2] * 2
        data, error = q4_1_blocks(arrange(codes), arrange(scale), arrange(zero), group)
        base.add_tensor(gguf_name, data, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        result.tensors[gguf_name] = "Q4_1"
        result.max_offset_error[kind] = max(result.max_offset_error.get(kind, 0.0), error)
    else:
        weight = dequantize_groups(unpack_codes(codes, 8), scale, zero, codes.shape[2], torch.float32)  # exact
        base.add_tensor(gguf_name, arrange(weight).numpy())
        result.tensors[gguf_name] = "F32"
    if f"{layer}.{fmt.CORR_LEFT}" not in owner:
        return False
    lora_b = get(fmt.CORR_LEFT).float() * get(fmt.CORR_LEFT_SCALE).float()[:, None]
    lora_a = get(fmt.RIGHT).float() * get(fmt.RIGHT_SCALE).float()[:, None]
    lora.add_tensor(gguf_name + ".lora_a", lora_a.numpy())
    lora.add_tensor(gguf_name + ".lora_b", arrange(lora_b).numpy())
    return True
