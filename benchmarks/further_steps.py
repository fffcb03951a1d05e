"""What the next decode steps would buy, measured on SmolLM2-135M-Instruct INT4 g64 + r24 (compiled kernels).

* **percall**: one decode call of a real 192x576 layer through its module, through the dispatch function, the
  compiled kernel alone and the kernel on a 4x576 layer (its fixed cost), weights in cache: the Python per call.
* **calls** (fused q/k/v and gate/up): the blocks' 210 linear calls a token (q, k, v, o, gate, up, down) against
  120, with q/k/v stacked into one layer and gate/up into one (codes, scales and zeros stacked; the corrections
  stacked block-diagonally, so a fused call computes exactly the separate outputs: checked). Module calls on
  1-row inputs over the 30 blocks' own weights (out of cache, as in decode), alternated, median of
  ``--passes``, 1 and 2 threads. The block-diagonal correction does 3x (q/k/v) and 2x (gate/up) the
  correction work and reads +7% bytes a fused kernel would not, so the measured saving is a lower bound.
  Realizing it inside transformers, whose modeling code calls each projection as its own module, was tried
  (commit 64c9c45: the first sibling's call computed the set in one compiled call, the others returned the
  kept outputs): ``generate()`` paired with and without it gave 0.97x / 0.965x (9 pairs), so it was removed.
* **head** (an INT4 head): the tied 49152x576 head as an in-memory INT4 copy (RTN, group 32 or 64, the residual
  layout, read by the same kernels) against the float head and the library's INT8 per-row copy
  (``int8_head=True``): decode ms per token paired in one process (``generate()``, 64 greedy tokens, median of
  3 alternations) and perplexity over 1,024 held-out tokens of *Emma* with every row through the decode
  kernels, against the float head (the body is the same model in every row).

    python benchmarks/further_steps.py [--what percall,calls,head] [--passes 15]

Prints the CPU first; JSON rows go to ``benchmarks/results/further-steps.jsonl``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _stacked(layers: list[Any]) -> Any:
    """One residual layer computing ``layers``' outputs one after another (block-diagonal correction)."""
    from hf_svdq.nn.residual import SVDQResidualLinear

    first = layers[0]
    outs, ranks = [m.out_features for m in layers], [m.rank for m in layers]
    fused = SVDQResidualLinear(first.in_features, sum(outs), sum(ranks), first.bits, first.group_size, bias=False)
    u = torch.zeros(sum(outs), sum(ranks), dtype=torch.int8)
    row = col = 0
    for m in layers:
        u[row:row + m.out_features, col:col + m.rank] = m.weight_u
        row, col = row + m.out_features, col + m.rank
    tensors = {"weight": torch.cat([m.weight for m in layers]), "weight_scale": torch.cat([m.weight_scale for m in layers]),
               "weight_zero": torch.cat([m.weight_zero for m in layers]), "weight_u": u,
               "weight_u_scale": torch.cat([m.weight_u_scale for m in layers]),
               "weight_vh": torch.cat([m.weight_vh for m in layers]),
               "weight_vh_scale": torch.cat([m.weight_vh_scale for m in layers])}
    for name, value in tensors.items():
        setattr(fused, name, nn.Parameter(value.contiguous(), requires_grad=False))
    return fused


def calls(model: Any, passes: int) -> list[dict[str, Any]]:
    """ms per token of the blocks' linears as 210 calls and as 120 (see the module docstring)."""
    torch.manual_seed(0)
    separate, fused = [], []
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        x, h = torch.randn(1, 1, attn.q_proj.in_features), torch.randn(1, 1, mlp.down_proj.in_features)
        qkv, gate_up = _stacked([attn.q_proj, attn.k_proj, attn.v_proj]), _stacked([mlp.gate_proj, mlp.up_proj])
        with torch.no_grad():
            expected = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
            if not torch.allclose(qkv(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())):
                raise RuntimeError("the stacked q/k/v layer does not compute the separate outputs")
        separate += [(attn.q_proj, x), (attn.k_proj, x), (attn.v_proj, x), (attn.o_proj, x), (mlp.gate_proj, x),
                     (mlp.up_proj, x), (mlp.down_proj, h)]
        fused += [(qkv, x), (attn.o_proj, x), (gate_up, x), (mlp.down_proj, h)]
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {"210 calls": [], "120 calls": []}
        with torch.no_grad():
            for i in range(passes + 3):
                for name, work in (("210 calls", separate), ("120 calls", fused)):
                    start = time.perf_counter()
                    for module, inp in work:
                        module(inp)
                    if i >= 3:
                        times[name].append(1e3 * (time.perf_counter() - start))
        a, b = statistics.median(times["210 calls"]), statistics.median(times["120 calls"])
        rows.append({"what": "calls", "threads": threads, "210 calls ms": a, "120 calls ms": b, "saved ms": a - b,
                     "saved us per call": 1e3 * (a - b) / 90})
    torch.set_num_threads(1)
    return rows


def per_call(model: Any, number: int = 20000) -> list[dict[str, Any]]:
    """Microseconds of one decode call of a real 192x576 layer (k_proj of block 0), 1-row input, weights in cache:
    through its module, through ``hf_svdq.kernels.ops.residual_linear``, the compiled kernel alone, and the kernel
    on a 4x576 layer (its fixed cost: argument passing, activation quantization); best of 7 repeats."""
    import timeit

    from hf_svdq.kernels import backend, ops

    layer = model.model.layers[0].self_attn.k_proj
    p = layer._parameters
    x = torch.randn(1, 1, layer.in_features)
    args = (p["weight"], p["weight_scale"], p["weight_zero"], layer.bits, p["weight_u"], p["weight_u_scale"],
            p["weight_vh"], p["weight_vh_scale"], None)
    chosen = backend.active()
    kernel = (x, args[0], args[1], args[2], layer.bits, layer.group_size, layer.out_features, *args[4:8], None,
              chosen.isa, backend.PARALLEL_MIN_WEIGHTS)
    small = (x, args[0][:4].contiguous(), args[1][:4].contiguous(), args[2][:4].contiguous(), layer.bits,
             layer.group_size, 4, args[4][:4].contiguous(), args[5][:4].contiguous(), *args[6:8], None, chosen.isa,
             backend.PARALLEL_MIN_WEIGHTS)
    calls = {"module": lambda: layer(x), "ops.residual_linear": lambda: ops.residual_linear(x, *args),
             "kernel": lambda: chosen.compiled.forward(*kernel), "kernel, 4x576 layer": lambda: chosen.compiled.forward(*small)}
    row: dict[str, Any] = {"what": "per call", "layer": "model.layers.0.self_attn.k_proj"}
    with torch.no_grad():
        for name, call in calls.items():
            row[f"{name} us"] = 1e6 * min(timeit.repeat(call, number=number, repeat=7)) / number
    row["python us"] = row["module us"] - row["kernel us"]
    return [row]


def _int4_head(head: nn.Linear, group_size: int) -> nn.Module:
    """The library's INT8 head copy with an INT4 group copy (RTN) in its place: what an INT4 head would read."""
    from hf_svdq.algorithms.groupquant import pack_codes, quantize_rtn
    from hf_svdq.nn.head import SVDQInt8Head

    copy = SVDQInt8Head(head)
    quantized = quantize_rtn(head.weight.detach().float(), 4, group_size)
    copy.codes, copy.bits = pack_codes(quantized.codes, 4, group_size), 4
    copy.code_scale, copy.code_zero = quantized.scale.to(torch.float16), quantized.zero.to(torch.uint8)
    return copy


def _decode_s(model: Any, ids: torch.Tensor, tokens: int) -> float:
    from load_and_decode import _decode_tok_s

    return 1 / _decode_tok_s(model, ids, tokens)


def heads(model: Any, text_dir: Path, tokens: int) -> list[dict[str, Any]]:
    """Decode speed (paired against the float head) and perplexity of each head variant."""
    from transformers import AutoTokenizer

    from hf_svdq.kernels import backend
    from hf_svdq.nn.head import SVDQInt8Head
    from hf_svdq.real_model import smollm2_checkpoint

    float_head = model.lm_head
    variants = {"float head": float_head, "INT8 per-row head (int8_head)": SVDQInt8Head(float_head),
                "INT4 g64 head": _int4_head(float_head, 64), "INT4 g32 head": _int4_head(float_head, 32)}
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    held_out = tokenizer((text_dir / "emma.txt").read_text()[20000:60000], return_tensors="pt").input_ids[:, :1025]
    ids = torch.tensor([[1, 504, 3458, 282, 2115, 314]])
    rows = []
    for name, head in variants.items():
        model.lm_head = head
        saved = os.environ.get(backend.ROWS_ENV)
        os.environ[backend.ROWS_ENV] = "1024"  # every row through the decode kernels, as decode runs them
        backend.reset()
        with torch.no_grad():
            logits = model(held_out[:, :-1]).logits[0].double()
        ppl = float(F.cross_entropy(logits, held_out[0, 1:]).exp())
        if saved is None:
            os.environ.pop(backend.ROWS_ENV)
        else:
            os.environ[backend.ROWS_ENV] = saved
        backend.reset()
        ratios = []
        for _ in range(3):
            model.lm_head = float_head
            base = _decode_s(model, ids, tokens)
            model.lm_head = head
            ratios.append(base / _decode_s(model, ids, tokens))
        model.lm_head = head
        ms = 1e3 * statistics.median(_decode_s(model, ids, tokens) for _ in range(3))
        extra = sum(t.numel() * t.element_size() for t in head.buffers()) if head is not float_head else 0
        rows.append({"what": "head", "head": name, "perplexity": ppl, "ms per token": ms, "paired vs float head": statistics.median(ratios),
                     "in-memory copy MB": extra / 1e6})
    model.lm_head = float_head
    return rows


def main() -> None:
    from _results import emit
    from decode_split import compressed_folder
    from load_and_decode import TEXT
    from moe_decode import cpu
    from transformers import AutoModelForCausalLM

    import hf_svdq  # noqa: F401
    from hf_svdq.kernels import backend, cpp

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", default="percall,calls,head")
    parser.add_argument("--passes", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--results", type=Path, default=HERE / "results" / "further-steps.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(compressed_folder())
    chosen = backend.active()
    if chosen.compiled is None:
        raise SystemExit(f"the compiled kernels are not active ({chosen.reason})")
    header = {"cpu": cpu(), "isa": cpp.isa_name(chosen.isa)}
    print(f"CPU: {header['cpu']}; hf_svdq kernels: compiled, {header['isa']}", flush=True)
    whats = args.what.split(",")
    rows = per_call(model) if "percall" in whats else []
    rows += calls(model, args.passes) if "calls" in whats else []
    rows += heads(model, TEXT, args.tokens) if "head" in whats else []
    for row in rows:
        emit({"benchmark": "further-steps", **header, **row}, args.results)


if __name__ == "__main__":
    main()
