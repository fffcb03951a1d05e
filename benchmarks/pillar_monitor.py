"""Does a watched layer's statistic announce a loop before the tokens show it, and does a local
intervention beat the global repetition penalties? (issue 23)

    python benchmarks/pillar_monitor.py detect      # record every layer's statistics while generating
    python benchmarks/pillar_monitor.py analyze     # lead time and false alarms, rule chosen on half the prompts
    python benchmarks/pillar_monitor.py intervene   # noise at the watched layers vs repetition_penalty / no_repeat_ngram_size
    python benchmarks/pillar_monitor.py overhead    # the monitor's cost per decoded token
    python benchmarks/pillar_monitor.py table       # the README's tables from the saved results

SmolLM2-135M-Instruct, dense and three models that loop (``_pillar_runs.MODELS``); the 64 prompts of
``benchmarks/pillar_prompts.txt`` through the chat template, greedy, batched with left padding.
``detect`` watches the output of every decoder layer and of the 23 layers the SmolLM2 policy calls
pillars (``results/analysis-smollm2-policy/policy.json``), with the ``rms`` and the ``entropy``
statistics, and records the token loop detector per step. ``analyze`` replays the monitor's alarm
rule over the records: candidates (statistic x watched set x direction x threshold x patience) are
ranked on the even-numbered prompts by detection rate minus false-alarm rate, and reported on the
odd-numbered ones. A looping generation is *detected* when the alarm comes no later than the step
at which the token loop detector first sees the loop and no more than ``WINDOW`` tokens before the
loop's periodic run begins (earlier alarms are *early*, a miss); lead = the step the tokens show the
loop minus the alarm step. A false alarm is any alarm on a generation that never loops.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _pillar_runs import (
    MODELS,
    POLICY,
    batch_inputs,
    dense_nll,
    generate,
    load,
    prompts,
    summarize,
    text_measures,
    tokenizer,
    trim,
)
from _pillar_tables import tables

from hf_svdq.evaluation.degeneration import detect_loop
from hf_svdq.integration.peft_lora import pillar_modules
from hf_svdq.monitoring import AlarmRule, PillarMonitor, replay
from hf_svdq.real_model import cache_root

RESULTS = Path(__file__).resolve().parent / "results"
TRACES = cache_root() / "bench" / "pillar-traces"
STATS = ("rms", "entropy")
THRESHOLDS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
PATIENCE = (1, 2, 4)
WARMUP = (2, 8, 16)
WINDOW = 8
"""An alarm detects a loop when it comes at most this many tokens before the loop's periodic run begins
(and no later than the token detector sees the loop): an alarm at the answer's third token says nothing
about a loop 40 tokens on (it is counted as early, a miss)."""
TOKEN_TRIGGER_REPEATS = 2.0
"""The token detector's bar when it triggers the intervention: 2 copies of at least 4 tokens in all (the
best token baseline of ``analyze``), earlier than the 2.5 copies / 6 tokens that define a loop."""


def _watch(model: Any) -> list[str]:
    layers = [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    return layers + pillar_modules(POLICY)


def detect(args: argparse.Namespace) -> None:
    tok, texts = tokenizer(), prompts()
    inputs = batch_inputs(tok, texts)
    TRACES.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        model = load(name)
        watch = _watch(model)
        never = AlarmRule(threshold=1e30)  # record only
        monitors = [PillarMonitor(model, watch, statistic=s, rule=never) for s in STATS]
        start = time.perf_counter()
        ids = generate(model, inputs, args.max_new_tokens, logits_processor=monitors)
        seconds = time.perf_counter() - start
        traces = [m.trace() for m in monitors]
        for m in monitors:
            m.remove()
        record = {"modules": watch, "ids": ids, "loop": traces[0].loop, "active": traces[0].active,
                  "logits_entropy": traces[0].logits_entropy, **{f"values_{s}": t.values for s, t in zip(STATS, traces, strict=True)}}
        torch.save(record, TRACES / f"{name.replace(' ', '_').replace('%', 'pc')}.pt")
        loops = int(traces[0].loop.any(0).sum())
        print(f"{name}: {loops}/{len(texts)} generations loop (token detector), {seconds:.0f} s", flush=True)


def _first(mask: torch.Tensor) -> torch.Tensor:
    """First True step per row of a [steps, batch] mask, -1 where none."""
    steps = torch.arange(mask.shape[0])[:, None].expand_as(mask)
    return torch.where(mask, steps, mask.shape[0]).min(0).values.masked_fill(~mask.any(0), -1)


def _token_alarm(ids: torch.Tensor, active: torch.Tensor, repeats: float) -> torch.Tensor:
    """First step at which the token loop detector, at ``repeats`` copies and 4 tokens, sees a loop."""
    first = torch.full((ids.shape[0],), -1, dtype=torch.long)
    for b in range(ids.shape[0]):
        for step in range(1, active.shape[0]):
            if active[step, b] and detect_loop(ids[b, :step].tolist(), min_repeats=repeats, min_span=4):
                first[b] = step
                break
    return first


def _loop_start(ids: torch.Tensor, loop_step: torch.Tensor) -> torch.Tensor:
    """Where each loop's periodic run began (its first token's step), -1 for rows that never loop."""
    start = torch.full_like(loop_step, -1)
    for b in (loop_step >= 0).nonzero().flatten().tolist():
        s = int(loop_step[b])
        loop = detect_loop(ids[b, :s].tolist())
        start[b] = s - round(loop.repeats * loop.period) if loop else s
    return start


def _score(alarm: torch.Tensor, loop_step: torch.Tensor, rows: torch.Tensor, loop_start: torch.Tensor) -> dict[str, Any]:
    looping = rows & (loop_step >= 0)
    clean = rows & (loop_step < 0)
    early = looping & (alarm >= 0) & (alarm < loop_start - WINDOW)
    detected = looping & (alarm >= 0) & (alarm <= loop_step) & ~early
    before_start = int((detected & (alarm <= loop_start)).sum()) / max(int(looping.sum()), 1)
    leads = (loop_step - alarm)[detected].tolist()
    tpr = int(detected.sum()) / max(int(looping.sum()), 1)
    fpr = int((clean & (alarm >= 0)).sum()) / max(int(clean.sum()), 1)
    return {"looping": int(looping.sum()), "clean": int(clean.sum()), "detection_rate": round(tpr, 3),
            "early_alarm_rate": round(int(early.sum()) / max(int(looping.sum()), 1), 3),
            "false_alarm_rate": round(fpr, 3), "youden": round(tpr - fpr, 3), "before_loop_start_rate": round(before_start, 3),
            "lead_median": statistics.median(leads) if leads else None,
            "lead_quartiles": [float(q) for q in torch.tensor(leads, dtype=torch.float).quantile(torch.tensor([0.25, 0.75]))] if leads else None}


def _macro(alarm: torch.Tensor, loop_step: torch.Tensor, rows: torch.Tensor, loop_start: torch.Tensor,
           models: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Pooled scores plus the per-model average: detection over the models with >= 3 looping rows,
    false alarms over those with >= 3 clean rows (so no single model's loops decide the ranking)."""
    pooled = _score(alarm, loop_step, rows, loop_start)
    per = [_score(alarm, loop_step, rows & sel, loop_start) for sel in models.values()]
    tpr = statistics.mean([p["detection_rate"] for p in per if p["looping"] >= 3] or [0.0])
    fpr = statistics.mean([p["false_alarm_rate"] for p in per if p["clean"] >= 3] or [0.0])
    return {**pooled, "macro_detection_rate": round(tpr, 3), "macro_false_alarm_rate": round(fpr, 3),
            "macro_youden": round(tpr - fpr, 3)}


def _load_traces(models: list[str]) -> dict[str, Any]:
    records = [torch.load(TRACES / f"{m.replace(' ', '_').replace('%', 'pc')}.pt") for m in models]
    steps = min(r["loop"].shape[0] for r in records)
    cat = {k: torch.cat([r[k][:steps] for r in records], dim=1) for k in ("loop", "active", "logits_entropy", *(f"values_{s}" for s in STATS))}
    cat["ids"] = torch.cat([r["ids"][:, :steps] for r in records], dim=0)
    cat["modules"] = records[0]["modules"]
    cat["model"] = [m for m, r in zip(models, records, strict=True) for _ in range(r["loop"].shape[1])]
    return cat


def _candidates(modules: list[str]) -> dict[str, list[int]]:
    """The watched sets, by name, as indices into ``modules`` (``_watch``: decoder layers, then the pillars)."""
    layers = [i for i, m in enumerate(modules) if m.count(".") == 2]
    sets = {"pillars (policy)": [i for i, m in enumerate(modules) if m.count(".") > 2], "all layers": layers}
    sets.update({modules[i]: [i] for i in layers})
    return sets


def analyze(args: argparse.Namespace) -> dict[str, Any]:
    t = _load_traces(args.models)
    n = t["loop"].shape[1]
    loop_step = _first(t["loop"])
    loop_start = _loop_start(t["ids"], loop_step)
    prompt_index = torch.arange(n) % len(prompts())
    tune, held = prompt_index % 2 == 0, prompt_index % 2 == 1
    models = {m: torch.tensor([x == m for x in t["model"]]) for m in args.models}
    rows = []
    signals = [(s, name, idx) for s in STATS for name, idx in _candidates(t["modules"]).items()]
    signals.append(("logits entropy", "output distribution", None))
    for stat, name, idx in signals:
        values = t["logits_entropy"][..., None] if idx is None else t[f"values_{stat}"][..., idx]
        for direction in ("up", "down"):
            for threshold in THRESHOLDS:
                for patience, warmup in itertools.product(PATIENCE, WARMUP):
                    rule = AlarmRule(threshold=threshold, direction=direction, patience=patience, warmup=warmup)
                    alarm = replay(values, rule, t["active"])
                    rows.append({"statistic": stat, "watch": name, "direction": direction, "threshold": threshold,
                                 "patience": patience, "warmup": warmup,
                                 "tune": _macro(alarm, loop_step, tune, loop_start, models),
                                 "held_out": _macro(alarm, loop_step, held, loop_start, models),
                                 "held_out_by_model": {m: _score(alarm, loop_step, held & sel, loop_start) for m, sel in models.items()}})
    for repeats in (1.5, TOKEN_TRIGGER_REPEATS):  # baseline: the token loop detector itself, at a lower bar
        alarm = _token_alarm(t["ids"], t["active"], repeats)
        rows.append({"statistic": f"token loop detector, {repeats} repeats", "watch": "generated tokens", "direction": None,
                     "threshold": repeats, "patience": 1, "warmup": 0,
                     "tune": _macro(alarm, loop_step, tune, loop_start, models),
                     "held_out": _macro(alarm, loop_step, held, loop_start, models),
                     "held_out_by_model": {m: _score(alarm, loop_step, held & sel, loop_start) for m, sel in models.items()}})
    rows.sort(key=lambda r: -r["tune"]["macro_youden"])
    per_model = {m: {"loops": int(((loop_step >= 0) & torch.tensor([x == m for x in t["model"]])).sum()), "rows": t["model"].count(m)}
                 for m in args.models}
    best_watchable = next(r for r in rows if r["statistic"] in STATS)
    result = {"per_model": per_model, "best": rows[:10], "chosen": best_watchable,
              "best_logits_entropy": next(r for r in rows if r["statistic"] == "logits entropy"),
              "best_pillars": next(r for r in rows if r["watch"] == "pillars (policy)"),
              "token_baselines": [r for r in rows if r["watch"] == "generated tokens"],
              "default_rule_pillars_rms": next(r for r in rows if r["watch"] == "pillars (policy)" and r["statistic"] == "rms"
                                               and r["direction"] == "up" and r["threshold"] == 4.0 and r["patience"] == 2
                                               and r["warmup"] == 8)}
    print(json.dumps({k: v for k, v in result.items() if k != "best"}, indent=1))
    for r in rows[:10]:
        print(r["statistic"], r["watch"], r["direction"], r["threshold"], r["patience"], r["warmup"], "tune", r["tune"]["macro_youden"],
              "held", r["held_out"])
    return result


def _rule(row: dict[str, Any]) -> AlarmRule:
    return AlarmRule(threshold=row["threshold"], direction=row["direction"], patience=row["patience"], warmup=row["warmup"])


def intervene(args: argparse.Namespace, detection: dict[str, Any]) -> dict[str, Any]:
    """Every model under: nothing; the tune-chosen monitor, the best monitor on the policy's pillars (one
    setting when they are the same rule) and the pillars triggered by the token detector at its lower
    bar, each adding noise at its watched modules from its alarm on; repetition_penalty;
    no_repeat_ngram_size."""
    tok, texts = tokenizer(), prompts()
    inputs = batch_inputs(tok, texts)
    dense = load("dense")
    eos = {tok.eos_token_id, tok.pad_token_id}
    keys = ("statistic", "watch", "direction", "threshold", "patience", "warmup", "trigger")
    same = all(detection["chosen"].get(k) == detection["best_pillars"].get(k) for k in keys)
    monitors = {"chosen = pillars" if same else "chosen": detection["chosen"]}
    if not same:  # the tune-chosen rule may watch one layer; the best rule on the policy's pillars too
        monitors["pillars"] = detection["best_pillars"]
    monitors |= {"pillars, token trigger": {"statistic": "rms", "watch": "pillars (policy)", "direction": "up", "threshold": 1e30,
                                           "patience": 1, "warmup": 1, "trigger": "tokens"}}
    settings: list[tuple[str, dict[str, Any]]] = [("none", {})]
    settings += [(f"monitor ({m}) + noise {s}", {"noise": s, "monitor": m}) for m in monitors for s in args.noise]
    settings += [(f"repetition_penalty {p}", {"repetition_penalty": p}) for p in args.penalties]
    settings += [(f"no_repeat_ngram_size {k}", {"no_repeat_ngram_size": k}) for k in args.ngrams]
    if args.only:  # "none" always runs: it defines which rows loop without intervention
        settings = [s for s in settings if s[0] == "none" or any(o in s[0] for o in args.only)]
    out: dict[str, Any] = {"monitors": {k: {key: v[key] for key in keys if key in v}
                                        for k, v in monitors.items()}, "models": {}}
    for name in args.models:
        model = dense if name == "dense" else load(name)
        watch = _watch(model)
        base_loop = None
        for label, kw in settings:
            kw = dict(kw)
            monitor = None
            if "noise" in kw:
                row = monitors[kw.pop("monitor")]
                monitor = PillarMonitor(model, [watch[i] for i in _candidates(watch)[row["watch"]]], statistic=row["statistic"], rule=_rule(row),
                                        trigger=row.get("trigger", "statistic"), intervention="noise",
                                        noise_scale=kw.pop("noise"), seed=args.seed, loop_min_repeats=TOKEN_TRIGGER_REPEATS,
                                        loop_min_span=4)
                kw["logits_processor"] = [monitor]
            start = time.perf_counter()
            generated = trim(generate(model, inputs, args.max_new_tokens, **kw), eos)
            seconds = time.perf_counter() - start
            alarms = sum(r["alarm_step"] is not None for r in monitor.summary()) if monitor else None
            if monitor:
                monitor.remove()
            measures = text_measures(tok, generated)
            nll = dense_nll(dense, inputs, generated)
            looped = [bool(m["loop"]) for m in measures]
            base_loop = looped if base_loop is None else base_loop
            entry: dict[str, Any] = {"all": summarize(measures, nll), "alarms": alarms, "seconds": round(seconds, 1)}
            for part, want in (("looping without intervention", True), ("fluent without intervention", False)):
                sel = [i for i in range(len(texts)) if base_loop[i] == want]
                entry[part] = summarize([measures[i] for i in sel], [nll[i] for i in sel]) if sel else None
            out["models"].setdefault(name, {})[label] = entry
            print(name, "|", label, "|", json.dumps(entry["all"]), "| alarms", alarms, f"| {seconds:.0f} s", flush=True)
    return out


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    """Decode time per token (64 greedy tokens, 1 thread, median of ``--repeats``) with no monitor, the
    policy's 23 pillars watched, and all 30 decoder layers watched, alternated in one process, per model."""
    torch.set_num_threads(1)
    tok = tokenizer()
    inputs = batch_inputs(tok, [prompts()[2]])
    results = {}
    for name in args.models:
        model = load(name)
        watch = _watch(model)
        named = _candidates(watch)
        sets = {"pillars (23 linears)": [watch[i] for i in named["pillars (policy)"]],
                "all decoder layers (30)": [watch[i] for i in named["all layers"]]}
        times: dict[str, list[float]] = {"off": [], **{k: [] for k in sets}}
        tokens = 64
        generate(model, inputs, 8)
        for _ in range(args.repeats):
            for label, runs in times.items():
                monitor = None if label == "off" else PillarMonitor(model, sets[label], rule=AlarmRule(threshold=1e30))
                start = time.perf_counter()
                generate(model, inputs, tokens, min_new_tokens=tokens, logits_processor=[monitor] if monitor else None)
                runs.append((time.perf_counter() - start) / tokens)
                if monitor:
                    monitor.remove()
        med = {k: statistics.median(v) for k, v in times.items()}
        results[name] = {k: {"ms_per_token": round(v * 1e3, 2), "overhead": round(v / med["off"] - 1, 4)} for k, v in med.items()}
        print(name, json.dumps(results[name]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=("detect", "analyze", "intervene", "overhead", "all", "table"))
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--penalties", type=float, nargs="+", default=[1.1, 1.2, 1.3])
    parser.add_argument("--ngrams", type=int, nargs="+", default=[3, 4, 6])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", help="intervene: run only the settings whose label contains one of these")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=RESULTS / "pillar-monitor.json")
    args = parser.parse_args()
    saved = json.loads(args.json.read_text()) if args.json.exists() else {}
    if args.phase == "table":
        print(tables(saved))
        return
    if args.phase in ("detect", "all"):
        detect(args)
    if args.phase in ("analyze", "all"):
        saved["detection"] = analyze(args)
    if args.phase in ("intervene", "all"):
        new = intervene(args, saved["detection"])
        old = saved.setdefault("intervention", new)
        old["monitors"] = new["monitors"]
        for model, rows in new["models"].items():  # merged, so a later run can add settings
            old["models"].setdefault(model, {}).update(rows)
    if args.phase in ("overhead", "all"):
        saved.setdefault("overhead", {}).update(overhead(args))
    args.json.write_text(json.dumps(saved, indent=1) + "\n")


if __name__ == "__main__":
    main()
