"""An AWQ (GEMM) reader written from the published packing, independent of hf_svdq's writer.

Follows AutoAWQ ``awq/utils/packing_utils.py`` (``unpack_awq``, ``reverse_awq_order``,
``dequantize_gemm``; https://github.com/casper-hansen/AutoAWQ) and vLLM's ``awq_triton.py``
(``AWQ_REVERSE_ORDER``): ``qweight`` int32 ``[in, out/8]``, nibble ``k`` of each int32 read with
``>> 4k``, columns put back in order by ``AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]``, and
``w = (q - z) * s`` with ``qzeros``/``scales`` repeated over ``group_size`` input rows. Computed in
float32 (the exact value; engines compute it in fp16).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(0, 32, 4)
    values = torch.bitwise_right_shift(packed[:, :, None], shifts[None, None, :]).view(packed.shape[0], -1)
    order = torch.arange(values.shape[1]).view(-1, 8)[:, AWQ_REVERSE_ORDER].view(-1)
    return torch.bitwise_and(values[:, order], 15)


def dequantize_gemm(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 weight ``[out, in]`` (nn.Linear's layout) of one AWQ GEMM layer."""
    q, z = _unpack(qweight), _unpack(qzeros)
    s = scales.float().repeat_interleave(group_size, dim=0)
    return ((q - z.repeat_interleave(group_size, dim=0)).float() * s).T.contiguous()


def load_awq_as_dense(folder: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A plain transformers model whose AWQ layers hold their dequantized weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "awq" and qc["version"] == "gemm" and qc["bits"] == 4 and qc["zero_point"]
    state = load_file(str(folder / "model.safetensors"))
    for key in [k for k in state if k.endswith(".qweight")]:
        layer = key[: -len(".qweight")]
        state[f"{layer}.weight"] = dequantize_gemm(state.pop(key), state.pop(f"{layer}.qzeros"),
                                                   state.pop(f"{layer}.scales"), qc["group_size"])
    hf_config = AutoConfig.from_pretrained(folder)
    del hf_config.quantization_config
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise ValueError(f"AWQ folder does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.eval()
