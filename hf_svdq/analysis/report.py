"""The readable side of an analysis: ``report.md``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .analyze import Analysis


_HEADER = (
    "| layer | rank | bytes % | weight rel err | output rel err | SQNR dB | KL alone | loops alone | KL leave-one-out | class | policy |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
)


def _measures(label: str, m: Mapping[str, float]) -> str:
    return (f"| {label} | {m['perplexity']:.3f} | {m['kl']:.4f} | {m['top1']:.3f} | {int(m['loops'])} | "
            f"{m['repeated_3gram_rate']:.3f} |")


def markdown_report(analysis: Analysis, files: Mapping[str, str]) -> str:
    """Summary, model-family sensitivity, pillars, per-layer table and the policy, as markdown."""
    info, policy = analysis.info, analysis.policy
    setting = {k: v for k, v in info["setting"].items() if v not in (None, [], {}) and k not in ("ranks", "dense")}
    lines = [
        f"# Sensitivity analysis: {info.get('name_or_path') or info.get('model_type')}",
        "",
        f"Setting: `{setting}`  ",
        (f"Probes: {', '.join(info['modes'])} by {info['grouping']}; {info['eval_tokens']} tokens, "
         f"{len(info['prompts'])} prompt(s) x {info['max_new_tokens']} new tokens.  "),
        "Timings: " + ", ".join(f"{k} {v:.0f}" for k, v in analysis.timings.items()),
        "",
        "| model state | perplexity | KL vs dense | top-1 | loops | repeated 3-grams |",
        "|---|---|---|---|---|---|",
        _measures("dense", analysis.dense),
        _measures("everything compressed", analysis.all_compressed),
        "",
        "## By module family",
        "",
        "| family | groups | median KL alone | max KL alone | pillars | sensitive |",
        "|---|---|---|---|---|---|",
    ]
    for fam, s in sorted(analysis.family_summary().items()):
        lines.append(f"| {fam} | {s['groups']} | {s['median_kl_alone']:.2e} | {s['max_kl_alone']:.2e} | "
                     f"{s['pillars']} | {s['sensitive']} |")
    flagged = [(g, c, why) for g, (c, why) in analysis.classes.items() if c != "robust"]
    lines += ["", "## Pillars and sensitive groups", ""]
    lines += [f"- **{c}** `{g}`: {why}" for g, c, why in sorted(flagged, key=lambda x: (x[1] != "pillar", x[0]))] or ["none"]
    for key, title in (("heatmap", "Sensitivity heatmap"), ("ranks", "Policy ranks")):
        if key in files:
            lines += ["", f"![{title}]({files[key]})"]
    if policy is None:
        lines += ["", "## Policy", "", f"No policy: {analysis.policy_error}", "", "## Per layer", "", *_HEADER]
        return "\n".join(lines + _layer_rows(analysis, {})) + "\n"
    criterion = ", ".join(f"{k} = {v:g}" if isinstance(v, (int, float)) else f"{k} = {v}" for k, v in policy["criterion"].items())
    predicted = policy["predicted"]
    lines += [
        "", "## Policy", "",
        (f"`{files.get('policy', 'policy.json')}` ({criterion}): {len(policy['ranks'])} layer(s) compressed, "
         f"{sum(1 for r in analysis.rows if r.name in policy['dense'])} analysed layer(s) kept dense; predicted "
         f"{predicted['bits_per_weight']:.2f} bits/weight over the analysed layers, summed KL {predicted['kl']:.4f}."),
        "Load it with `SVDQuantConfig.from_policy(path, calibration=...)` or `hf-svdq compress MODEL OUT --policy path`.",
        "", "## Per layer", "", *_HEADER,
    ]
    lines += _layer_rows(analysis, policy["ranks"])
    return "\n".join(lines) + "\n"


def _layer_rows(analysis: Analysis, ranks: Mapping[str, int]) -> list[str]:
    lines = []
    group_of = {n: g for g, members in analysis.groups.items() for n in members}
    loo = analysis.probes.get("leave_one_out", {})
    for r in analysis.rows:
        g = group_of.get(r.name)
        alone = analysis.probes["alone"].get(g) if g else None
        out_err = "-" if r.output_rel_error is None else f"{r.output_rel_error:.3f}"
        kl_alone = "-" if alone is None else f"{alone['kl']:.2e}"
        loops_alone = "-" if alone is None else str(int(alone["loops"]))
        kl_loo = f"{loo[g]['kl']:.3f}" if g in loo else "-"
        cls = analysis.classes[g][0] if g else "-"
        rank = "dense" if r.rank is None else r.rank
        lines.append(
            f"| {r.name} | {rank} | {100 * r.compressed_bytes / r.dense_bytes:.0f} | {r.weight_rel_error:.3f} | {out_err} | "
            f"{r.sqnr_db:.1f} | {kl_alone} | {loops_alone} | {kl_loo} | {cls} | {ranks.get(r.name, 'dense')} |"
        )
    return lines
