"""Where a decoded token's time goes, and what ``torch.compile`` with a static cache does to it.

For dense SmolLM2 and its INT4 g64 + r24 compression (written once into the cache), one process per
model and kernel choice:

* **split** (eager, dynamic cache): one token at a time through ``model.forward`` with forward hooks
  timing the linear layers of the blocks, the head, the attention (its own work: rotary, cache update,
  softmax, without its linears) and the rest (embeddings, norms, the MLP's activation, Python);
  the hooks' own cost is measured too (a run without hooks) and reported;
* **compiled**: ``generate()`` with ``cache_implementation="static"`` and the forward compiled
  (``torch.compile(mode="default")``) against eager ``generate()`` in the same process, paired.

    python benchmarks/decode_split.py [--threads 1] [--tokens 64] [--kernels numba,cpp]

Prints the CPU's model and flags first; JSON rows go to ``benchmarks/results/decode-split.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def compressed_folder() -> Path:
    """SmolLM2 INT4 g64 + r24 (data-free), compressed once into the hf_svdq cache (shared with load_and_decode)."""
    from load_and_decode import TEXT, cached, variants

    name = "INT4 g64 + r24 (data-free)"
    return cached(name, variants(TEXT)[name] or {})[0]


def _decode_steps(model: Any, tokens: int, on_start: Any = None) -> float:
    """Seconds per token for ``tokens`` single-token forwards with the KV cache, after 4 warm-up steps
    (``on_start`` is called when the timing starts)."""
    import torch

    ids = torch.tensor([[1, 504, 3458, 282, 2115, 314]])
    with torch.no_grad():
        out = model(ids, use_cache=True)
        past, step = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = 0.0
        for i in range(tokens + 4):
            if i == 4:
                if on_start is not None:
                    on_start()
                start = time.perf_counter()
            out = model(step, past_key_values=past, use_cache=True)
            past, step = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / tokens


def split(model: Any, tokens: int) -> dict[str, float]:
    """Milliseconds per token by part (see the module docstring)."""
    import torch

    head = model.get_output_embeddings()
    linears = [m for n, m in model.named_modules() if n.startswith("model.layers.") and
               (isinstance(m, torch.nn.Linear) or type(m).__name__.startswith("SVDQ"))]
    attention = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    spent = {"linears": 0.0, "head": 0.0, "attention": 0.0}
    inside_attention = [0.0]

    def timer(part: str, inner: bool = False):  # type: ignore[no-untyped-def]
        started: list[float] = []

        def pre(*_: Any) -> None:
            started.append(time.perf_counter())

        def post(module: Any, *_: Any) -> None:
            seconds = time.perf_counter() - started.pop()
            spent[part] += seconds
            if inner:
                inside_attention[0] += seconds
        return pre, post

    handles = []
    for part, modules in (("linears", linears), ("head", [head]), ("attention", attention)):
        for module in modules:
            inner = part == "linears" and any(module in list(a.modules()) for a in attention)
            pre, post = timer(part, inner)
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    def zero() -> None:
        spent.update(dict.fromkeys(spent, 0.0))
        inside_attention[0] = 0.0

    _decode_steps(model, 4)  # warm-up (first calls compile or cache kernels)
    total = _decode_steps(model, tokens, zero)
    for h in handles:
        h.remove()
    bare = _decode_steps(model, tokens)
    ms = {k: 1e3 * v / tokens for k, v in spent.items()}
    ms["attention"] -= 1e3 * inside_attention[0] / tokens
    ms["rest"] = 1e3 * total - sum(ms.values())
    ms["total (hooked)"], ms["total (no hooks)"] = 1e3 * total, 1e3 * bare
    return ms


def compiled_vs_eager(model: Any, tokens: int, pairs: int = 3) -> dict[str, float]:
    """tok/s of eager ``generate()`` and of static-cache + ``torch.compile`` generate(), paired."""
    import torch

    ids = torch.tensor([[1, 504, 3458, 282, 2115, 314]])

    def run(**kwargs: Any) -> float:
        with torch.no_grad():
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **kwargs)
        return tokens / (time.perf_counter() - start)

    run()
    start = time.perf_counter()
    model.forward = torch.compile(model.forward, mode="default", dynamic=False)
    run(cache_implementation="static")
    run(cache_implementation="static")  # the compile of the decode shapes
    compile_s = time.perf_counter() - start
    eager_forward = model.forward._torchdynamo_orig_callable  # type: ignore[attr-defined]
    eager, compiled = [], []
    for _ in range(pairs):
        compiled.append(run(cache_implementation="static"))
        model.forward, compiled_forward = eager_forward, model.forward
        eager.append(run())
        model.forward = compiled_forward
    return {"eager tok/s": statistics.median(eager), "compiled tok/s": statistics.median(compiled),
            "compile s": compile_s, "compiled / eager": statistics.median(c / e for c, e in zip(compiled, eager))}


def child(folder: str, threads: int, tokens: int, what: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    import hf_svdq  # noqa: F401
    from hf_svdq.kernels import backend

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder)
    compressed = any(type(m).__name__.startswith("SVDQ") for m in model.modules())
    out: dict[str, Any] = {"kernels": backend.active().name if compressed else "-"}
    out.update(split(model, tokens) if what == "split" else compiled_vs_eager(model, tokens))
    return out


def main() -> None:
    from moe_decode import cpu

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--kernels", default="numba,cpp")
    parser.add_argument("--what", choices=["split", "compiled", "both"], default="both")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "decode-split.jsonl")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], args.threads, args.tokens, args.child[1])))
        return
    from hf_svdq.real_model import smollm2_checkpoint

    print(f"CPU: {cpu()}; threads {args.threads}; HF_SVDQ_ISA={os.environ.get('HF_SVDQ_ISA', '-')}, "
          f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '-')}")
    runs = [("dense fp32", smollm2_checkpoint(), "auto")]
    runs += [(f"INT4 g64 + r24 ({k})", compressed_folder(), k) for k in args.kernels.split(",")]
    whats = ["split", "compiled"] if args.what == "both" else [args.what]
    for what in whats:
        for name, folder, kernels in runs:
            env = {**os.environ, "HF_SVDQ_KERNELS": kernels, "PYTHONPATH": str(HERE.parent)}
            proc = subprocess.run([sys.executable, __file__, "--child", str(folder), what, "--threads", str(args.threads),
                                   "--tokens", str(args.tokens)], env=env, stdout=subprocess.PIPE, text=True, check=True)
            result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
            print(f"{what:8s} {name:28s} " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in result.items()), flush=True)
            row = {"benchmark": "decode-split", "cpu": cpu(), "threads": args.threads, "what": what, "variant": name,
                   "isa_cap": os.environ.get("HF_SVDQ_ISA"), "aten_cap": os.environ.get("ATEN_CPU_CAPABILITY"), **result}
            args.results.parent.mkdir(parents=True, exist_ok=True)
            with args.results.open("a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
