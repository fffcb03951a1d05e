"""``hf-svdq analyze``: sensitivity analysis of a model, written as report, pictures and policy."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from ..real_model import SMOLLM2_ALIAS

MODES = ("plain", "whitened", "residual")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("analyze", help="find sensitive / pillar layers and emit a compression policy")
    p.add_argument("model", help=f"dense model folder, Hub id or {SMOLLM2_ALIAS}")
    p.add_argument("--text", type=Path, required=True, help="UTF-8 text for the probes' perplexity and KL")
    p.add_argument("--out", type=Path, required=True, help="folder for report.md/json, policy.json and the PNGs")
    p.add_argument("--calibration", help="UTF-8 text file for activation statistics (use a different text), or a bundled "
                                         "dataset name ('austen')")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--mode", choices=MODES, help="setting to analyse (default: whitened with --calibration, else plain)")
    setting = p.add_mutually_exclusive_group()
    setting.add_argument("--rank", type=int, help="one rank for every layer")
    setting.add_argument("--energy", type=float, help="per matrix, keep this share of squared singular values")
    setting.add_argument("--target-param-ratio", type=float, help="share of parameters kept (default 0.8; low rank)")
    setting.add_argument("--target-bpw", type=float, help="bits per weight (default 5.0 in residual mode)")
    p.add_argument("--skip", nargs="*", default=[], metavar="PATTERN", help="module patterns never compressed")
    p.add_argument("--residual-bits", type=int, choices=(4, 8), default=4, help="residual mode: base quantizer bits")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--bit-choices", type=int, nargs="+", choices=(4, 8), metavar="BITS",
                   help="residual mode: probe every layer at these base bits (INT4 with correction ranks 0/16/32/64, "
                        "INT8) and allocate the --target-bpw budget over the measured KLs; writes policy.json with "
                        "per-layer bits")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--budget", type=float, help="policy byte budget in bits per weight over the analysed layers "
                                                   "(default: the bytes of the analysed setting)")
    goal.add_argument("--max-ppl-ratio", type=float, help="policy quality floor: predicted perplexity ratio to dense")
    p.add_argument("--pillars", choices=("dense", "protect"), default="protect",
                   help="policy: let the budget choose pillar ranks at 10x cost (default), or keep pillars dense (the study's skip policy)")
    p.add_argument("--reuse-probes", type=Path, metavar="DIR",
                   help="take the probe measures from DIR/report.json of an earlier run (same model and flags)")
    p.add_argument("--group", choices=("layer", "block", "type"), default="layer", help="probe granularity")
    p.add_argument("--probes", nargs="+", choices=("alone", "leave_one_out"), default=["alone", "leave_one_out"])
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--prompts", type=int, default=3, help="how many of the default prompts to generate from")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib needed)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")


def _setting(args: argparse.Namespace) -> object:
    from ..calibration.source import CalibrationConfig
    from ..integration.config import SVDQuantConfig

    mode = args.mode or ("whitened" if args.calibration else "plain")
    if mode == "whitened" and args.calibration is None:
        raise ValueError("--mode whitened needs --calibration FILE")
    if mode == "plain" and args.calibration is not None:
        raise ValueError("--mode plain is data-free; drop --calibration or use --mode whitened")
    if args.bit_choices and (mode != "residual" or args.calibration is None):
        raise ValueError("--bit-choices needs --mode residual and --calibration")
    calibration = None
    if args.calibration is not None:
        calibration = dataclasses.replace(
            CalibrationConfig.coerce_source(args.calibration, args.calib_samples, args.calib_seq_len), sequential=False)
    policy: dict[str, object] = {}
    if args.rank is not None:
        policy["rank"] = args.rank
    elif args.energy is not None:
        policy["energy"] = args.energy
    elif args.target_param_ratio is not None:
        policy["target_param_ratio"] = args.target_param_ratio
    elif args.target_bpw is not None:
        policy["target_bits_per_weight"] = args.target_bpw
    elif mode == "residual":
        policy["target_bits_per_weight"] = 5.0
    else:
        policy["target_param_ratio"] = 0.8
    residual: dict[str, object] = {"residual_bits": args.residual_bits, "group_size": args.group_size} if mode == "residual" else {}
    if args.bit_choices:
        residual.update(bit_choices=sorted(set(args.bit_choices) | {args.residual_bits}), refine_steps=1, rank_floor=0)
    return SVDQuantConfig(skip=args.skip, calibration=calibration, **policy, **residual)  # type: ignore[arg-type]


def cmd_analyze(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..analysis.analyze import AnalysisSettings, analyze, pillars
    from ..evaluation.metrics import DEFAULT_PROMPTS
    from ..real_moe import resolve_model_id

    if not args.text.is_file():
        raise FileNotFoundError(f"--text {args.text} does not exist")
    if args.calibration is not None and Path(args.calibration).resolve() == args.text.resolve():
        raise ValueError("--calibration and --text are the same file: never calibrate on the text you evaluate on")
    if not 1 <= args.prompts <= len(DEFAULT_PROMPTS):
        raise ValueError(f"--prompts must be between 1 and {len(DEFAULT_PROMPTS)}, got {args.prompts}")
    config = _setting(args)
    settings = AnalysisSettings(
        grouping=args.group, modes=tuple(args.probes), eval_tokens=args.eval_tokens, prompts=DEFAULT_PROMPTS[: args.prompts],
        max_new_tokens=args.max_new_tokens, budget_bits_per_weight=args.budget, max_ppl_ratio=args.max_ppl_ratio,
        pillars=args.pillars,
    )
    reuse = None
    if args.reuse_probes is not None:
        report = args.reuse_probes / "report.json"
        if not report.is_file():
            raise FileNotFoundError(f"--reuse-probes: {report} does not exist")
        reuse = json.loads(report.read_text(encoding="utf-8"))
    source = resolve_model_id(args.model)
    dtype = "auto" if args.dtype == "auto" else getattr(__import__("torch"), args.dtype)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    start = time.perf_counter()
    if args.bit_choices:
        return _option_analysis(model, tokenizer, config, args, start)
    analysis = analyze(model, tokenizer, config, args.text.read_text(encoding="utf-8"), settings, reuse=reuse)  # type: ignore[arg-type]
    analysis.timings["total_s"] = time.perf_counter() - start
    analysis.info["text"] = str(args.text)
    analysis.info["calibration_text"] = None if args.calibration is None else str(args.calibration)
    paths = analysis.write(args.out, plots=not args.no_plots)
    families = analysis.family_summary()
    print(json.dumps({"families": families, "pillars": pillars(analysis),
                      "timings_s": analysis.timings, "files": {k: str(v) for k, v in paths.items()}}, indent=2))
    if analysis.policy is None:
        print(f"hf-svdq analyze: no policy written: {analysis.policy_error}", file=sys.stderr)
        return 3
    return 0


def _option_analysis(model: object, tokenizer: object, config: object, args: argparse.Namespace, start: float) -> int:
    """``--bit-choices``: probe the residual options of every layer and allocate the budget over them."""
    from ..analysis.analyze import analyze_options
    from ..evaluation.metrics import DEFAULT_PROMPTS

    analysis = analyze_options(model, tokenizer, config, args.text.read_text(encoding="utf-8"),  # type: ignore[arg-type]
                               eval_tokens=args.eval_tokens, prompts=DEFAULT_PROMPTS[: args.prompts])
    analysis.timings["total_s"] = time.perf_counter() - start
    paths = analysis.write(args.out)
    dense, plan, predicted = analysis.dense_measures, analysis.plan_measures, analysis.policy["predicted"]
    print(json.dumps({"bits_per_weight": predicted["bits_per_weight"], "layer_bits": len(analysis.policy["layer_bits"]),
                      "predicted_kl": predicted["kl"], "measured_kl": plan["kl"],
                      "measured_ppl_ratio": plan["perplexity"] / dense["perplexity"], "loops": plan["loops"],
                      "timings_s": analysis.timings, "files": {k: str(v) for k, v in paths.items()}}, indent=2))
    return 0
