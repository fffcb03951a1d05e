"""``hf-svdq`` command line: compress, inspect, eval, analyze."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..compression.decisions import RESIDUAL_METHODS
from ..real_model import SMOLLM2_ALIAS
from . import analyze as cli_analyze
from . import export as cli_export
from . import hub as cli_hub

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _parse_rank_map(text: str) -> dict[str, int]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--rank-map is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('--rank-map must be a JSON object like {"*.q_proj": 64}')
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-svdq", description="Low-rank INT8 compression for transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compress(sub)
    _add_inspect_and_eval(sub)
    cli_analyze.add_parser(sub)
    cli_hub.add_parser(sub)
    cli_export.add_parser(sub)
    return parser


def _add_compress(sub: Any) -> None:
    compress = sub.add_parser("compress", help="compress a model and save a reloadable checkpoint")
    compress.add_argument("model", help=f"local folder or Hub id; {SMOLLM2_ALIAS} = bundled SmolLM2-135M-Instruct")
    compress.add_argument("outdir", type=Path, help="output folder (written atomically; never the source or inside it)")
    compress.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    ranks = compress.add_mutually_exclusive_group()
    ranks.add_argument("--rank", type=int, help="one rank for every compressed layer")
    ranks.add_argument("--rank-map", type=_parse_rank_map, help='JSON {pattern: rank}, e.g. {"*.self_attn.*": 96}')
    ranks.add_argument("--energy", type=float, help="per matrix, keep this share of squared singular values")
    ranks.add_argument("--target-bpw", type=float, help="global budget: bits per weight over compressed layers")
    ranks.add_argument("--target-param-ratio", type=float, help="global budget: share of parameters kept (low rank only)")
    ranks.add_argument("--policy", type=Path, help="policy.json from `hf-svdq analyze` (per-layer ranks and dense layers)")
    compress.add_argument("--skip", nargs="*", default=[], metavar="PATTERN", help="module patterns kept dense")
    compress.add_argument("--residual-bits", type=int, choices=(4, 8), help="W ~ Q + L R: quantize, then low-rank the error")
    compress.add_argument("--group-size", type=int, default=64, help="quantization group size (residual mode)")
    compress.add_argument("--residual-method", choices=RESIDUAL_METHODS, help="default: gptq when calibrated, else rtn")
    compress.add_argument("--bit-choices", type=int, nargs="+", choices=(4, 8), metavar="BITS",
                          help="with --target-bpw: base widths each layer may get, e.g. 4 8 (mixed precision)")
    compress.add_argument("--heal-steps", type=int, default=0,
                          help="after compressing, distil the low-rank factors against the dense model this many steps")
    compress.add_argument("--calibration", help="UTF-8 text file, or a dataset: default, austen (bundled), model (sampled)")
    compress.add_argument("--calib-samples", type=int, default=32, help="calibration windows (32 x 256 tokens: ~3 min on 2 cores)")
    compress.add_argument("--calib-seq-len", type=int, default=256)
    compress.add_argument("--dtype", choices=_DTYPES, default="auto", help="load (and compute) dtype")
    compress.add_argument("--int8-head", action="store_true",
                          help="decode with an in-memory INT8 copy of the output head (stored as is; see README)")
    compress.add_argument("--prompt", action="append", default=None,
                          help="afterwards, answer this with the dense and the compressed model side by side (repeatable; "
                               "default: the 3 of a fixed set of questions the dense model answers most surely)")
    compress.add_argument("--no-check", action="store_true",
                          help="skip the check after saving (answers side by side, held-out perplexity, loop detector)")
    compress.add_argument("--max-new-tokens", type=int, default=64, help="answer length in the check")
    compress.add_argument("--json", action="store_true", help="print the summary as JSON")
    compress.add_argument("--resume", action="store_true",
                          help="continue an interrupted compression from its last finished block (same bytes)")
    compress.add_argument("--in-memory", action="store_true",
                          help="load the whole dense model first instead of streaming it from disk a block at a time")
    compress.add_argument("--no-memory-check", action="store_true",
                          help="start even when the predicted peak memory exceeds what is available")


def _add_inspect_and_eval(sub: Any) -> None:
    inspect = sub.add_parser("inspect", help="per-layer table of a saved checkpoint")
    inspect.add_argument("checkpoint", help="checkpoint folder or Hub id")
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument("--summary", action="store_true", help="summary lines only")
    evaluate = sub.add_parser("eval", help="perplexity, agreement with a reference, generation health, speed, size")
    evaluate.add_argument("model", help=f"checkpoint folder, Hub id or {SMOLLM2_ALIAS}")
    evaluate.add_argument("--text", type=Path, required=True, help="UTF-8 text file for perplexity")
    evaluate.add_argument("--reference", help="dense model to compare against (same tokenizer)")
    evaluate.add_argument("--window", type=int, default=512)
    evaluate.add_argument("--stride", type=int, default=512)
    evaluate.add_argument("--max-tokens", type=int, default=8192, help="cap on scored text tokens (0 = all)")
    evaluate.add_argument("--max-new-tokens", type=int, default=64)
    evaluate.add_argument("--prompts", type=Path, help="file with one generation prompt per line")
    evaluate.add_argument("--dtype", choices=_DTYPES, default="auto")
    evaluate.add_argument("--json", type=Path, help="also write the full result as JSON here")


def _torch_dtype(name: str) -> object:
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _compress_config(args: argparse.Namespace) -> Any:
    """The ``SVDQuantConfig`` the compress arguments ask for (the recommended mode without a rank policy)."""
    from ..calibration.source import CalibrationConfig
    from ..integration.config import SVDQuantConfig

    recommended = all(getattr(args, k) is None for k in ("rank", "rank_map", "energy", "target_bpw", "target_param_ratio", "policy"))
    calibration = None
    if args.calibration is not None or recommended:
        calibration = CalibrationConfig.coerce_source(args.calibration or "default", args.calib_samples, args.calib_seq_len)
    if args.heal_steps and calibration is None:
        raise ValueError("--heal-steps needs calibration text (--calibration FILE or a dataset name)")
    if recommended:
        if args.residual_bits is not None or args.residual_method is not None or args.bit_choices is not None:
            raise ValueError("the recommended mode (no rank policy given) fixes --residual-bits/--residual-method/--bit-choices; "
                             "give a rank policy (e.g. --target-bpw) to choose them")
        config = SVDQuantConfig.recommended(calibration=calibration, group_size=args.group_size, skip=args.skip,
                                            int8_head=args.int8_head)
        print(f"recommended mode: {config.describe()} (give --rank/--target-bpw/... for another)", file=sys.stderr)
        return config
    if args.policy is not None:
        if args.skip:
            raise ValueError("--skip cannot be combined with --policy: the policy lists the layers kept dense")
        config = SVDQuantConfig.from_policy(args.policy, calibration)
        config.int8_head = args.int8_head
        return config
    return SVDQuantConfig(
        rank=args.rank if args.rank is not None else args.rank_map, skip=args.skip, energy=args.energy,
        target_bits_per_weight=args.target_bpw, target_param_ratio=args.target_param_ratio,
        residual_bits=args.residual_bits, group_size=args.group_size, residual_method=args.residual_method,
        calibration=calibration, int8_head=args.int8_head, bit_choices=args.bit_choices,
    )


def _load_tokenizer(source: str) -> Any:
    """The source's tokenizer to save beside the checkpoint, or None (with a note) when it cannot load."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, ImportError) as err:  # ImportError: e.g. a slow tokenizer needing protobuf
        print(f"note: no tokenizer saved ({type(err).__name__}: {str(err).strip()[:200]})", file=sys.stderr)
        return None


def _write_extras(args: argparse.Namespace, folder: Path, tokenizer: Any, source: str) -> None:
    """The tokenizer and the model card, into the output folder before it is published."""
    from ..publishing.hub import base_model_of
    from ..publishing.model_card import write_model_card

    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    try:
        write_model_card(folder, args.outdir.name, base_model=base_model_of(source))
    except ValueError as err:  # e.g. every layer stayed dense: no card to write
        print(f"note: no model card written ({err})", file=sys.stderr)


def _save_compressed(args: argparse.Namespace, model: Any, tokenizer: Any, source: str) -> None:
    """Weights, tokenizer and card into ``args.outdir``, atomically."""
    from ..format.output_folder import atomic_folder

    with atomic_folder(args.outdir, overwrite=args.overwrite) as folder:
        model.save_pretrained(folder)
        _write_extras(args, folder, tokenizer, source)


def _check_compressed(args: argparse.Namespace, model: Any, tokenizer: Any, source: str) -> Any:
    """The after-compress check against the dense model (None when skipped)."""
    from transformers import AutoModelForCausalLM

    if args.no_check:
        return None
    if tokenizer is None:
        print("note: no check (the model has no tokenizer)", file=sys.stderr)
        return None
    from ..evaluation.check import quick_check

    dense = AutoModelForCausalLM.from_pretrained(source, dtype=_torch_dtype(args.dtype))
    try:
        return quick_check(model, dense, tokenizer, args.prompt, args.max_new_tokens)
    except ValueError as err:  # e.g. a tokenizer that cannot encode the held-out text: the checkpoint still stands
        print(f"note: check skipped ({err})", file=sys.stderr)
        return None


def cmd_compress(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    from ..format.inspect import checkpoint_report, format_report
    from ..format.output_folder import check_output_folder
    from ..real_moe import resolve_model_id

    config = _compress_config(args)
    source = resolve_model_id(args.model)
    check_output_folder(args.outdir, [source], overwrite=args.overwrite)  # before any work
    if args.resume and (args.in_memory or args.heal_steps):
        raise ValueError("--resume continues a streaming compression; it does not combine with --in-memory or --heal-steps")
    tokenizer = _load_tokenizer(source)
    dtype = _torch_dtype(args.dtype)
    start = time.perf_counter()
    model = None
    streamed = not args.in_memory and not args.heal_steps
    if streamed:
        streamed = _compress_streaming(args, config, source, tokenizer)
        seconds = time.perf_counter() - start
    if not streamed:
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config, dtype=dtype)
        seconds = time.perf_counter() - start
        if args.heal_steps:
            from ..compression.healing import heal_with_config

            teacher = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
            healed = heal_with_config(model, teacher, tokenizer, args.heal_steps)
            print(f"healing: {healed.steps} steps on {healed.tokens} tokens, KL to dense {healed.kl_before:.4f} -> "
                  f"{healed.kl_after:.4f} ({healed.seconds:.0f} s)", file=sys.stderr)
            del teacher
        _save_compressed(args, model, tokenizer, source)
    report = checkpoint_report(args.outdir)
    if model is None and not args.no_check and tokenizer is not None:
        model = AutoModelForCausalLM.from_pretrained(args.outdir, dtype=dtype)
    check = _check_compressed(args, model, tokenizer, source)
    how = "compress (streamed from disk, a block at a time)" if streamed else "load + compress"
    if args.json:
        result = {"load_and_compress_seconds": seconds, "streamed": streamed, **report.to_dict()}
        print(json.dumps({**result, "check": None if check is None else check.to_dict()}, indent=2))
    else:
        from ..evaluation.check import format_quick_check

        print(format_report(report, per_layer=False))
        print(f"{how}: {seconds:.1f} s; saved to {args.outdir}")
        if check is not None:
            print(format_quick_check(check))
    return 0


def _compress_streaming(args: argparse.Namespace, config: Any, source: str, tokenizer: Any) -> bool:
    """``compress`` a block at a time from disk to disk (:mod:`hf_svdq.streaming`); False (with a note) when
    this model or config needs the whole model in memory."""
    from ..streaming import StreamingUnsupported, compress_checkpoint

    dtype = _torch_dtype(args.dtype)
    try:
        done = compress_checkpoint(source, args.outdir, config, dtype=None if dtype == "auto" else dtype,  # type: ignore[arg-type]
                                   resume=args.resume, overwrite=args.overwrite, memory_check=not args.no_memory_check,
                                   finish=lambda folder: _write_extras(args, folder, tokenizer, source))
    except StreamingUnsupported as err:
        print(f"note: {err}; loading the whole model instead", file=sys.stderr)
        return False
    print(done.estimate.describe(), file=sys.stderr)
    return True


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..format.checkpoint import resolve_checkpoint
    from ..format.inspect import checkpoint_report, format_report

    report = checkpoint_report(resolve_checkpoint(args.checkpoint))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report, per_layer=not args.summary))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..evaluation.metrics import DEFAULT_PROMPTS, EvalSettings, evaluate, format_evaluation
    from ..real_moe import resolve_model_id

    settings = EvalSettings(args.window, args.stride, args.max_tokens or None, args.max_new_tokens)
    if not args.text.is_file():
        raise FileNotFoundError(f"--text {args.text} does not exist")
    prompts = DEFAULT_PROMPTS
    if args.prompts:
        prompts = tuple(line.strip() for line in args.prompts.read_text().splitlines() if line.strip())
    source = resolve_model_id(args.model)
    dtype = _torch_dtype(args.dtype)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    reference = None
    if args.reference:
        reference = AutoModelForCausalLM.from_pretrained(resolve_model_id(args.reference), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(source)
    result = evaluate(model, tokenizer, args.text.read_text(encoding="utf-8"), reference, settings, prompts)
    result["model"], result["reference"], result["text"] = args.model, args.reference, str(args.text)
    print(format_evaluation(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"compress": cmd_compress, "inspect": cmd_inspect, "eval": cmd_eval, "analyze": cli_analyze.cmd_analyze,
                "push": cli_hub.cmd_push, "export": cli_export.cmd_export}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"hf-svdq {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
