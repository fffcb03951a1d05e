"""Markdown tables of ``benchmarks/results/pillar-monitor.json`` (``pillar_monitor.py table``)."""

from __future__ import annotations

from typing import Any

SHORT = {"dense": "dense", "whitened SVD -20% params": "-20%", "whitened SVD -40% params": "-40%",
         "plain SVD r128 attn only": "attn-only"}


def _rule(r: dict[str, Any]) -> str:
    if r["watch"] == "generated tokens":
        return f"{r['statistic']} (4+ tokens)"
    if r["statistic"] == "logits entropy":
        return f"next-token entropy, {r['direction']}, z > {r['threshold']:g}, patience {r['patience']}, warmup {r['warmup']}"
    return (f"{r['statistic']} of {r['watch']}, {r['direction']}, z > {r['threshold']:g}, patience {r['patience']}, "
            f"warmup {r['warmup']}")


def detection_table(d: dict[str, Any]) -> str:
    rows = [("tune-chosen layer statistic", d["chosen"]), ("best rule on the policy's pillars", d["best_pillars"]),
            ("default rule on the pillars", d["default_rule_pillars_rms"]), ("output distribution", d["best_logits_entropy"]),
            *(("token detector, lower bar", t) for t in d["token_baselines"] if t["threshold"] == 2.0)]
    models = list(d["per_model"])
    head = "| signal | rule | " + " | ".join(f"{SHORT.get(m, m)}: detected / false alarms" for m in models)
    head += " | mean detected / false alarms | lead (median, IQR) | alarm before the loop starts | too early (a miss) |"
    lines = [head, "|" + "---|" * (len(models) + 6)]
    for label, r in rows:
        cells = []
        for m in models:
            s = r["held_out_by_model"][m]
            det = f"{s['detection_rate']:.0%} of {s['looping']}" if s["looping"] else "-"
            fa = f"{s['false_alarm_rate']:.0%} of {s['clean']}" if s["clean"] else "-"
            cells.append(f"{det} / {fa}")
        h = r["held_out"]
        iqr = h["lead_quartiles"]
        lead = f"{h['lead_median']:g} ({iqr[0]:g}-{iqr[1]:g})" if h["lead_median"] is not None else "-"
        lines.append(f"| {label} | {_rule(r)} | " + " | ".join(cells)
                     + f" | {h['macro_detection_rate']:.0%} / {h['macro_false_alarm_rate']:.0%} | {lead} | "
                       f"{h['before_loop_start_rate']:.0%} | {h['early_alarm_rate']:.0%} |")
    return "\n".join(lines)


def _order(label: str) -> tuple[int, str, float]:
    """none, the monitors, repetition_penalty, no_repeat_ngram_size; each by its number."""
    groups = ("none", "monitor (chosen", "monitor (pillars)", "monitor (pillars, token", "repetition_penalty", "no_repeat")
    group = next((i for i, g in reversed(list(enumerate(groups))) if label.startswith(g)), len(groups))
    head, _, number = label.rpartition(" ")
    try:
        return group, head, float(number)
    except ValueError:
        return group, label, 0.0


def intervention_table(iv: dict[str, Any], model: str) -> str:
    """One model's settings: loops per prompt, distinct-2, and the dense model's perplexity of the generated
    text, over all rows and split by whether the row loops without intervention."""
    rows = iv["models"][model]
    lines = [f"**{model}**", "",
             "| setting | loops per prompt | distinct-2 | dense PPL, all rows | rows that loop without | fluent rows | alarms |",
             "|---|---|---|---|---|---|---|"]
    for label, e in sorted(rows.items(), key=lambda kv: _order(kv[0])):
        a = e["all"]
        cells = [f"{a['loops_per_prompt']:.3f}", f"{a['distinct_2']:.2f}", f"{a['dense_ppl']:.2f}"]
        for part in ("looping without intervention", "fluent without intervention"):
            p = e[part]
            cells.append(f"{p['dense_ppl']:.2f} ({p['loops_per_prompt']:.2f} loops)" if p else "-")
        cells.append("-" if e["alarms"] is None else str(e["alarms"]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overhead_table(o: dict[str, Any]) -> str:
    lines = ["| model | watched | ms per token | overhead |", "|---|---|---|---|"]
    lines += [f"| {m} | {k} | {v['ms_per_token']:.2f} | {v['overhead']:+.1%} |" for m, rows in o.items() for k, v in rows.items()]
    return "\n".join(lines)


def tables(saved: dict[str, Any]) -> str:
    parts = []
    if "detection" in saved:
        parts.append(detection_table(saved["detection"]))
    if "intervention" in saved:
        parts += [intervention_table(saved["intervention"], m) for m in saved["intervention"]["models"]]
    if "overhead" in saved:
        parts.append(overhead_table(saved["overhead"]))
    return "\n\n".join(parts)
