"""Benchmark on SmolLM2-135M-Instruct: decode and prefill speed, load time, memory, checkpoint bytes.

Each compressed variant is written once (the parent compresses it), then every measurement runs in a
fresh child process per variant and repeat (clean memory readings), interleaved so machine noise hits
all variants alike. The parent prints one table of medians with ratios against dense float32 measured
in the same run.

    python benchmarks/load_and_decode.py [--repeats 3] [--tokens 64] [--prefill 512] [--json out.json]
    python benchmarks/load_and_decode.py --avx2   # every kernel capped at AVX2: a proxy for an AVX2-only CPU

The first line printed names the CPU and its flags; a figure from one kind of CPU is no claim about another.
``--avx2`` caps PyTorch (``ATEN_CPU_CAPABILITY=avx2``), MKL (``MKL_ENABLE_INSTRUCTIONS=AVX2``), oneDNN
(``ONEDNN_MAX_CPU_ISA=AVX2``) and hf_svdq's compiled kernels (``HF_SVDQ_ISA=avx2``) in every child: the same
cores and memory, AVX2 instructions only. Compressed variants are written once into the hf_svdq cache
(``bench/``) and reused.

Columns: decode tokens/s (greedy ``generate``, ``--tokens`` new tokens) at 1 and 2 threads, each also
as a paired ratio (dense fp32 loaded in the same process and timed in alternation with the variant);
prefill
seconds for one ``--prefill``-token forward with the active kernels and with the pure-PyTorch reference
(``HF_SVDQ_KERNELS=reference``, the path every release before the fused kernels used); load seconds;
peak RSS of the process after load + decode; checkpoint bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TEXT = HERE.parent.parent / "shared" / "data" / "text"


def variants(text_dir: Path) -> dict[str, dict[str, Any] | None]:
    """name -> SVDQuantConfig kwargs (None = dense; ``dtype`` = dense in that dtype; ``same_as`` = the
    checkpoint of that variant with ``int8_head`` switched on in its config.json: the flag changes
    nothing on disk, so the weights are byte-identical)."""
    calibration = {"file": str(text_dir / "sensesensibility.txt"), "n_samples": 32, "seq_len": 256}
    return {
        "dense fp32": None,
        "dense bf16": {"dtype": "bfloat16"},
        "INT8 per-row": {"rank": 0, "residual_bits": 8, "group_size": None},
        "INT8 per-row + INT8 head": {"same_as": "INT8 per-row", "int8_head": True},
        "INT4 g64 + r24 (data-free)": {"rank": 24, "residual_bits": 4, "group_size": 64},
        "INT4 g64 + r24 + INT8 head": {"same_as": "INT4 g64 + r24 (data-free)", "int8_head": True},
        "recommended (5.0 bpw)": {"recommended": True, "calibration": calibration},
        "recommended + INT8 head": {"same_as": "recommended (5.0 bpw)", "int8_head": True},
        "plain low rank r128": {"rank": 128},
    }


AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "HF_SVDQ_ISA": "avx2"}


def _slug(name: str) -> str:
    return "smollm2-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def cached(name: str, kwargs: dict[str, Any]) -> tuple[Path, float | None]:
    """The compression ``name`` (``kwargs`` as in :func:`variants`), written once into the hf_svdq cache
    (``bench/``) and reused; the seconds it took, or ``None`` when it was there already."""
    from hf_svdq.real_model import cache_root

    folder = cache_root() / "bench" / _slug(name)
    if (folder / "config.json").is_file():
        return folder, None
    return folder, compress(name, kwargs, folder)


def compress(name: str, kwargs: dict[str, Any], folder: Path) -> float:
    from transformers import AutoModelForCausalLM

    import hf_svdq
    from hf_svdq.calibration.source import CalibrationConfig
    from hf_svdq.real_model import smollm2_checkpoint

    kwargs = dict(kwargs)
    if "calibration" in kwargs:
        kwargs["calibration"] = CalibrationConfig(**kwargs["calibration"])
    config = (hf_svdq.SVDQuantConfig.recommended(calibration=kwargs["calibration"]) if kwargs.pop("recommended", False)
              else hf_svdq.SVDQuantConfig(**kwargs))
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), quantization_config=config)
    seconds = time.perf_counter() - start
    model.save_pretrained(folder)
    print(f"compressed {name!r} in {seconds:.0f} s", file=sys.stderr)
    return seconds


def _decode_tok_s(model: Any, ids: Any, tokens: int) -> float:
    import torch

    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)  # warm-up (and JIT)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return tokens / (time.perf_counter() - start)


def _prefill_s(model: Any, length: int) -> float:
    import torch

    ids = torch.randint(100, 40000, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids[:, :32])  # warm-up
        start = time.perf_counter()
        model(ids)
    return time.perf_counter() - start


def child(folder: str, dtype: str | None, tokens: int, prefill: int) -> dict[str, float]:
    sys.path.insert(0, str(HERE))
    import _memory as mem
    import torch
    from transformers import AutoModelForCausalLM

    import hf_svdq  # noqa: F401  (registers the quantizer; the autoload hook would too)
    from hf_svdq.kernels import backend, cpp

    torch.set_num_threads(1)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype) if dtype else None)
    result = {"load_s": time.perf_counter() - start}
    ids = torch.tensor([[1, 504, 3458, 282, 2115, 314]])
    result["decode_1t"] = _decode_tok_s(model, ids, tokens)
    torch.set_num_threads(2)
    result["decode_2t"] = _decode_tok_s(model, ids, tokens)
    torch.set_num_threads(1)
    result["peak_rss"] = mem.peak_rss()
    chosen = backend.active()
    kernels = chosen.name + (f"-{cpp.isa_name(chosen.isa)}" if chosen.compiled is not None else "")
    result["backend"] = kernels if any("SVDQ" in type(m).__name__ for m in model.modules()) else "-"
    active, reference = [], []
    for _ in range(3):  # alternated, so a slow spell of the machine hits both paths
        for choice, times in (("auto", active), ("reference", reference)):
            os.environ[backend.BACKEND_ENV] = choice
            backend.reset()
            times.append(_prefill_s(model, prefill))
    result["prefill_s"] = statistics.median(active)
    result["prefill_reference_s"] = statistics.median(reference)
    os.environ[backend.BACKEND_ENV] = "auto"
    backend.reset()
    result.update(_paired_decode(model, ids, tokens))
    return result


def _paired_decode(model: Any, ids: Any, tokens: int, pairs: int = 3) -> dict[str, float]:
    """Decode speed relative to dense fp32 loaded into this same process, timed in alternation
    (dense, this, dense, this, ...), so a slow spell of the shared machine hits both sides of a pair.
    Returns the median over pairs of dense seconds / this model's seconds, at 1 and 2 threads."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_svdq.real_model import smollm2_checkpoint

    dense = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint())
    result = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        ratios = []
        for _ in range(pairs):
            dense_s = tokens / _decode_tok_s(dense, ids, tokens)
            ratios.append(dense_s / (tokens / _decode_tok_s(model, ids, tokens)))
        result[f"paired_{threads}t"] = statistics.median(ratios)
    torch.set_num_threads(1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--text-dir", type=Path, default=TEXT)
    parser.add_argument("--only", nargs="*", help="run only these variants (dense fp32 always runs)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--avx2", action="store_true", help="cap every kernel at AVX2 (a proxy for an AVX2-only CPU)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dtype, args.tokens, args.prefill)))
        return

    sys.path.insert(0, str(HERE))
    from moe_decode import cpu

    from hf_svdq.real_model import smollm2_checkpoint

    child_env = dict(os.environ)
    if args.avx2:
        child_env.update(AVX2_CAPS)
    print(f"CPU: {cpu()}" + ("; capped at AVX2 (" + " ".join(f"{k}={v}" for k, v in AVX2_CAPS.items()) + ")"
                             if args.avx2 else ""), flush=True)
    every = variants(args.text_dir)
    wanted = {n for n in every if n == "dense fp32" or not args.only or n in args.only}
    wanted |= {every[n]["same_as"] for n in list(wanted) if every[n] and "same_as" in every[n]}  # type: ignore[index]
    table = {n: k for n, k in every.items() if n in wanted}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in table}
    compress_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders: dict[str, tuple[Path, str | None]] = {}
        for i, (name, kwargs) in enumerate(table.items()):
            if kwargs is None or "dtype" in kwargs:
                folders[name] = (smollm2_checkpoint(), (kwargs or {}).get("dtype"))
            elif "same_as" in kwargs:
                folders[name] = (Path(tmp) / str(i), None)
                shutil.copytree(folders[kwargs["same_as"]][0], folders[name][0])
                config_file = folders[name][0] / "config.json"
                config = json.loads(config_file.read_text())
                config["quantization_config"]["int8_head"] = kwargs["int8_head"]
                config_file.write_text(json.dumps(config, indent=2))
            else:
                folder, seconds = cached(name, kwargs)
                folders[name] = (folder, None)
                if seconds is not None:
                    compress_s[name] = seconds
        for _ in range(args.repeats):
            for name, (folder, dtype) in folders.items():
                cmd = [sys.executable, __file__, "--child", str(folder), "--tokens", str(args.tokens),
                       "--prefill", str(args.prefill)] + (["--dtype", dtype] if dtype else [])
                out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                     env=child_env).stdout.strip().splitlines()[-1]
                row = json.loads(out)
                row["checkpoint_bytes"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
                runs[name].append(row)
    medians = {n: {k: statistics.median(r[k] for r in rs) if not isinstance(rs[0][k], str) else rs[0][k] for k in rs[0]}
               for n, rs in runs.items()}
    print(render(medians, args))
    if args.json:
        meta = {"cpu": cpu(), "avx2_cap": args.avx2, "repeats": args.repeats, "tokens": args.tokens,
                "prefill": args.prefill, "compress_s": compress_s}
        args.json.write_text(json.dumps({"meta": meta, "medians": medians, "runs": runs}, indent=2))


def render(medians: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    dense = medians["dense fp32"]
    lines = [
        (f"SmolLM2-135M-Instruct, CPU, medians of {args.repeats}; decode {args.tokens} new tokens, prefill "
        f"{args.prefill} tokens at 1 thread; x = ratio to dense fp32 in this run (higher is better for tok/s, "
        "lower for seconds and bytes)"),
        (f"{'variant':<36} {'kernels':>15} {'1t tok/s':>9} {'x':>5} {'paired':>6} {'2t tok/s':>9} {'x':>5} {'paired':>6} "
         f"{'prefill s':>10} {'x ref':>6} {'load s':>7} {'peak RSS MB':>12} {'x':>5} {'ckpt MB':>8} {'x':>6}"),
    ]
    for name, row in medians.items():
        lines.append(
            f"{name:<36} {row['backend']:>15} {row['decode_1t']:>9.1f} {row['decode_1t'] / dense['decode_1t']:>5.2f} "
            f"{row['paired_1t']:>6.2f} {row['decode_2t']:>9.1f} {row['decode_2t'] / dense['decode_2t']:>5.2f} "
            f"{row['paired_2t']:>6.2f} {row['prefill_s']:>10.2f} "
            f"{row['prefill_reference_s'] / row['prefill_s']:>6.2f} {row['load_s']:>7.2f} {row['peak_rss'] / 1e6:>12.0f} "
            f"{row['peak_rss'] / dense['peak_rss']:>5.2f} {row['checkpoint_bytes'] / 1e6:>8.0f} "
            f"{row['checkpoint_bytes'] / dense['checkpoint_bytes']:>6.3f}"
        )
    lines.append("x: ratio of medians across processes; paired: median of dense/this decode time over 3 pairs timed in "
                 "alternation inside one process (robust to slow spells of a shared machine)")
    lines.append("x ref: prefill time of the pure-PyTorch reference path / this path (>= 1 means the new path is not slower)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
