"""Rendering of an analysis report (the dict of attnrl.analysis.cli.analyse, as saved in
report.json): the printed summary with verdicts, PNG figures and one HTML page.
Everything here reads only the report dict, so a saved report.json can be re-rendered."""

from __future__ import annotations

import html
import math
from pathlib import Path

ALPHA = 0.01          # verdict threshold on p and on intervals excluding 1 / 0.5
STYLE = ("<style>body{font-family:sans-serif;max-width:1200px;margin:1.2em auto;color:#222}"
         "table{border-collapse:collapse;font-size:13px;margin:.5em 0}"
         "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}"
         ".tok{font-family:monospace;font-size:13px;line-height:1.9;white-space:pre-wrap;"
         "border:1px solid #ccc;padding:.4em;margin-bottom:.3em}"
         ".anchor{outline:2px solid #000;outline-offset:-1px}"
         ".preplan{border-bottom:3px solid #1f3fbf}.lab{font-size:11px;color:#555}"
         ".pair{display:flex;gap:1em}.pair>div{flex:1;min-width:0}"
         "pre{background:#f6f6f6;padding:.6em;white-space:pre-wrap}</style></head><body>")


def _pct(x) -> str:
    return f"{100 * x:.0f}%" if x is not None and math.isfinite(x) else "n/a"


def _ci(ci, fmt="{:.2f}") -> str:
    return "[" + ", ".join(fmt.format(v) for v in ci) + "]"


def coupling_line(name: str, c: dict) -> str:
    coupled = c["p_value"] < ALPHA and c["ratio_ci"][0] > 1
    verdict = "yes" if coupled else "no clear coupling"
    return (f"{name}: {_pct(c['observed'])} vs {_pct(c['chance'])} chance, ratio "
            f"{c['ratio']:.2f} {_ci(c['ratio_ci'])}, {c['p_text']} "
            f"({c['coupled_peaks']}/{c['target_peaks']} peaks) -> {verdict}")


def summary_lines(report: dict) -> list[str]:
    """The short printed summary: one verdict per question."""
    src = report["task"] or report["responses_file"]
    lines = [(f"== attnrl analyze: {report['model']} on {src}: {report['problems']} problems, "
              f"{report['responses']} responses ({report['correct']} correct, "
              f"{_pct(report['accuracy'])}), mean {report['mean_response_tokens']:.0f} tokens")]
    c = report["coupling"]
    tag = f"top {c['p'] * 100:.0f}%, within {c['k']} tokens"
    lines.append(coupling_line(f"FAI peaks follow WAAD peaks ({tag})", c["fai_after_waad"]))
    lines.append(coupling_line(f"FAI peaks follow Delta peaks ({tag})", c["fai_after_delta"]))
    by = c["anchors_after_preplan_by"]
    lines.append(f"Anchors (top {report['signal_config']['q']:.0%} FAI) after preplan tokens: "
                 f"preplan_by=waad ratio {by['waad']['ratio']:.2f} {_ci(by['waad']['ratio_ci'])}"
                 f", preplan_by=delta ratio {by['delta']['ratio']:.2f} "
                 f"{_ci(by['delta']['ratio_ci'])}")
    best = max(c["per_layer"], key=lambda r: r["waad"]["ratio"])
    lines.append(f"Per layer (FAI after WAAD): best layer {best['layer']} ratio "
                 f"{best['waad']['ratio']:.2f} {_ci(best['waad']['ratio_ci'])}; layers with "
                 f"ratio CI above 1: {sum(r['waad']['ratio_ci'][0] > 1 for r in c['per_layer'])}"
                 f"/{len(c['per_layer'])}")
    h = report["heads"]
    lines.append(f"Head split (layers {h['sampled_layers']}): local span "
                 f"{h['local_span_range'][0]:.1f}-{h['local_span_range'][1]:.1f} tokens, global "
                 f"{h['global_span_range'][0]:.1f}-{h['global_span_range'][1]:.1f}; same heads "
                 f"in two disjoint halves: local {_pct(h['stability']['local_overlap'])}, "
                 f"global {_pct(h['stability']['global_overlap'])}")
    o = report["outcome"]
    if report["correct"] in (0, report["responses"]):
        lines.append(f"Correct vs incorrect: not measurable ({report['correct']} of "
                     f"{report['responses']} responses correct)")
        o = {}
    parts = []
    for name, label in (("waad_mean", "WAAD"), ("fai_mean", "FAI"),
                        ("anchor_relative_position", "anchor position")):
        if not o:
            break
        d = o[name]
        excl = d["difference_ci"][0] > 0 or d["difference_ci"][1] < 0
        parts.append(f"{label} {d['correct']['mean']:.3g} vs {d['incorrect']['mean']:.3g} "
                     f"(diff CI {_ci(d['difference_ci'], '{:.3g}')}{', differs' if excl else ''})")
    if parts:
        lines.append("Correct vs incorrect: " + "; ".join(parts))
    qk = report.get("qk", {})
    if "skipped" in qk:
        lines.append(f"QK heads: skipped ({qk['skipped']})")
    else:
        held, base = qk["held_out"], qk["logprob_baseline"]
        lo = min(ci[0] for ci in held["held_out_ci"])
        verdict = ("a selected head predicts correctness on held-out problems"
                   if any(ci[0] > 0.5 for ci in held["held_out_ci"])
                   else "no selected head's held-out interval excludes 0.5")
        lines.append(f"QK heads (answer query): best head L{qk['best_head'][0]}H"
                     f"{qk['best_head'][1]} AUC {qk['best_auc']:.2f} (family-wise p "
                     f"{qk['best_p_fwer']:.3g}); selected on half {held['selected']}, held-out "
                     f"AUC {', '.join(f'{a:.2f}' for a in held['held_out_auc'])} "
                     f"(lowest CI bound {lo:.2f}, {held['ci_level']:.4g} level) -> {verdict}")
        lines.append(f"QK validity (mean z of selected heads) held-out AUC "
                     f"{held['combined_auc']:.2f} {_ci(held['combined_ci'])} vs the model's mean "
                     f"log-prob {base['held_out_auc']:.2f} {_ci(base['held_out_ci'])} "
                     f"(log-prob AUC on all: {base['auc']:.2f}, p {base['p']:.3g})")
        pr = report.get("qk_premise")
        if pr:
            extra = ""
            if "held_out_auc" in pr:
                extra = (f"; response-mean alignment held-out AUC {pr['held_out_auc']:.2f} "
                         f"{_ci(pr['held_out_ci'])}")
            lines.append(f"qk_premise (top {pr['q']:.0%} tokens by prompt alignment on heads "
                         f"{pr['heads']}): anchors {_pct(pr['anchors']['observed'])} vs "
                         f"{_pct(pr['anchors']['chance'])} chance (ratio "
                         f"{pr['anchors']['ratio']:.2f} {_ci(pr['anchors']['ratio_ci'])}), "
                         f"preplan ratio {pr['preplan']['ratio']:.2f}{extra}")
    r = report["receivers"]
    if r.get("responses"):
        top = ", ".join(f"L{l}H{hh} ({k:.1f})" for (l, hh), k in
                        zip(r["top_heads"][:5], r["top_kurtosis"][:5]))
        lines.append(f"Receiver heads ({r['responses']} responses with >= 6 sentences): top "
                     f"{top}; {r['overlap_with_global_heads']} of the top "
                     f"{len(r['top_heads'])} are global heads")
    else:
        lines.append(f"Receiver heads: {r.get('note', 'none')}")
    s = report["seconds"]
    lines.append(f"Wall time: sampling {s['sample']:.0f} s, forwards {s['forward']:.0f} s, "
                 f"statistics {s['statistics']:.0f} s")
    return lines


# ------------------------------------------------------------------------------ figures

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_coupling(report, path):
    plt = _plt()
    c = report["coupling"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.6), dpi=110,
                                  gridspec_kw={"width_ratios": [1, 2.2]})
    names = [("fai_after_waad", "after WAAD peak"), ("fai_after_delta", "after Delta peak")]
    for i, (key, label) in enumerate(names):
        d = c[key]
        ax.bar(i - 0.18, d["observed"], 0.34, color="#225ea8",
               yerr=[[d["observed"] - d["observed_ci"][0]], [d["observed_ci"][1] - d["observed"]]],
               capsize=3, label="observed" if i == 0 else None)
        ax.bar(i + 0.18, d["chance"], 0.34, color="#bbbbbb",
               yerr=[[d["chance"] - d["chance_range"][0]], [d["chance_range"][1] - d["chance"]]],
               capsize=3, label="chance (95% of null)" if i == 0 else None)
    ax.set_xticks([0, 1], [n[1] for n in names])
    ax.set_ylabel("fraction of FAI peaks")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    layers = [r["layer"] for r in c["per_layer"]]
    for key, colour in (("waad", "#225ea8"), ("delta", "#b30000")):
        ratio = [r[key]["ratio"] for r in c["per_layer"]]
        lo = [r[key]["ratio_ci"][0] for r in c["per_layer"]]
        hi = [r[key]["ratio_ci"][1] for r in c["per_layer"]]
        ax2.plot(layers, ratio, "-o", ms=3, color=colour, label=f"after {key.upper()} peak")
        ax2.fill_between(layers, lo, hi, color=colour, alpha=0.15)
    for l in report["sampled_layers"]:
        ax2.axvline(l, color="#999", lw=0.6, ls=":")
    ax2.axhline(1, color="black", lw=0.8)
    ax2.set_xlabel("layer (dotted: sampled layers)")
    ax2.set_ylabel("ratio to chance (95% CI)")
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    _save(fig, path)


def _save(fig, path) -> None:
    """Lay out, write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _heatmap(ax, values, cmap, label, fig, vmin=None, vmax=None, center=None):
    import numpy as np

    data = np.array(values, dtype=float)
    if center is not None:
        dev = np.nanmax(np.abs(data - center)) or 1e-9
        vmin, vmax = center - dev, center + dev
    image = ax.imshow(data.T, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                      origin="lower", interpolation="nearest")
    ax.set_xlabel("layer")
    ax.set_ylabel("head")
    bar = fig.colorbar(image, ax=ax, pad=0.01)
    bar.set_label(label, fontsize=8)
    return data


def _mark(ax, heads, colour, marker, label):
    if heads:
        ax.scatter([h[0] for h in heads], [h[1] for h in heads], s=40, marker=marker,
                   facecolor="none", edgecolor=colour, lw=1.4, label=label)


def fig_heads(report, path):
    plt = _plt()
    h = report["heads"]
    fig, ax = plt.subplots(figsize=(11, 3.2), dpi=110)
    _heatmap(ax, h["span"], "viridis", "mean attention distance (tokens)", fig)
    _mark(ax, h["local_heads"], "white", "s", "local (trainer's split)")
    _mark(ax, h["global_heads"], "red", "o", "global (trainer's split)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2,
              frameon=True, facecolor="#8c8c8c", edgecolor="none")
    _save(fig, path)


def fig_qk(report, path):
    plt = _plt()
    qk = report["qk"]
    fig, ax = plt.subplots(figsize=(11, 3.2), dpi=110)
    _heatmap(ax, qk["auc"], "RdBu_r", "AUC vs correctness (all responses)", fig, center=0.5)
    _mark(ax, qk["held_out"]["selected"], "black", "s", "selected on half (held-out test)")
    _mark(ax, qk["significant_heads_fwer_0.05"], "#00a000", "o",
          "family-wise p < 0.05 (permutation)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2,
              frameon=False)
    _save(fig, path)


def fig_receivers(report, path):
    plt = _plt()
    r = report["receivers"]
    fig, ax = plt.subplots(figsize=(11, 3.2), dpi=110)
    _heatmap(ax, r["mean_kurtosis"], "magma", "vertical-score kurtosis (mean)", fig)
    _mark(ax, r["top_heads"], "cyan", "o", f"top {len(r['top_heads'])} receiver heads")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=1,
              frameon=False)
    _save(fig, path)


def fig_outcome(report, path):
    plt = _plt()
    o = report["outcome"]
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.0), dpi=110)
    for ax, (name, label) in zip(axes[:3], (("waad_mean", "mean WAAD (tokens)"),
                                            ("fai_mean", "mean FAI"),
                                            ("anchor_relative_position",
                                             "anchor position (0-1)"))):
        d = o[name]
        for i, key in enumerate(("correct", "incorrect")):
            m, ci = d[key]["mean"], d[key]["ci"]
            if not math.isfinite(m):
                continue
            ax.bar(i, m, 0.6, color="#1a9850" if key == "correct" else "#d73027",
                   yerr=[[m - ci[0]], [ci[1] - m]], capsize=3)
        ax.set_xticks([0, 1], ["correct", "incorrect"])
        ax.set_ylabel(label, fontsize=9)
    hist = o["anchor_position_histogram"]
    centres = [(a + b) / 2 for a, b in zip(hist["bins"][:-1], hist["bins"][1:])]
    axes[3].plot(centres, hist["correct"], "-o", ms=3, color="#1a9850", label="correct")
    axes[3].plot(centres, hist["incorrect"], "-o", ms=3, color="#d73027", label="incorrect")
    axes[3].set_xlabel("relative position in response")
    axes[3].set_ylabel("share of anchors", fontsize=9)
    axes[3].legend(fontsize=7, frameon=False)
    _save(fig, path)


# ------------------------------------------------------------------------------ HTML

def _colour(cmap, value, lo, hi):
    rgba = cmap(0.0 if hi <= lo else (value - lo) / (hi - lo))
    lum = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
    red, green, blue = (round(255 * c) for c in rgba[:3])
    return f"#{red:02x}{green:02x}{blue:02x}", ("#fff" if lum < 0.45 else "#000")


def _example_html(example) -> str:
    plt = _plt()
    out = []
    for key, cmap_name in (("waad", "YlGnBu"), ("fai", "OrRd")):
        cmap = plt.get_cmap(cmap_name)
        values = [v for v, ok in zip(example[key], example["fai_valid"]) if ok or key == "waad"]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        spans = []
        for i, text in enumerate(example["tokens"]):
            valid = key == "waad" or example["fai_valid"][i]
            bg, fg = _colour(cmap, example[key][i], lo, hi) if valid else ("#ddd", "#000")
            cls = "anchor" if example["anchor"][i] else ""
            cls += " preplan" if example["preplan"][i] else ""
            spans.append(f"<span class='{cls}' style='background:{bg};color:{fg}' "
                         f"title='{key} {example[key][i]:.4g}'>{html.escape(text)}</span>")
        out.append(f"<div class='lab'>{key.upper()}</div><div class='tok'>{''.join(spans)}</div>")
    return "".join(out)


def _table(rows, head) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def render_report(report: dict, out) -> Path:
    """Write the PNG figures and report.html into `out`; returns the HTML path."""
    out = Path(out)
    figures = [("coupling.png", fig_coupling,
                "Coupling of FAI peaks with preceding WAAD / Delta peaks"),
               ("heads.png", fig_heads, "Attention span of every head"),
               ("outcome.png", fig_outcome, "Signals of correct vs incorrect responses")]
    if "skipped" not in report.get("qk", {"skipped": 1}):
        figures.append(("qk_auc.png", fig_qk, "QK heads: AUC of the answer query's score"))
    if report["receivers"].get("responses"):
        figures.append(("receivers.png", fig_receivers, "Receiver heads"))
    for name, fn, _ in figures:
        fn(report, out / name)
    c = report["coupling"]
    coupling_rows = []
    for key, label in (("fai_after_waad", "FAI peak after WAAD peak"),
                       ("fai_after_delta", "FAI peak after Delta peak")):
        d = c[key]
        coupling_rows.append([label, _pct(d["observed"]), _ci(d["observed_ci"]),
                              _pct(d["chance"]), f"{d['ratio']:.2f}", _ci(d["ratio_ci"]),
                              d["p_text"]])
    for by, d in c["anchors_after_preplan_by"].items():
        coupling_rows.append([f"anchor after preplan token (preplan_by={by})",
                              _pct(d["observed"]), _ci(d["observed_ci"]), _pct(d["chance"]),
                              f"{d['ratio']:.2f}", _ci(d["ratio_ci"]), d["p_text"]])
    outcome_rows = []
    for name, d in report["outcome"].items():
        if name == "anchor_position_histogram":
            continue
        outcome_rows.append([name, f"{d['correct']['mean']:.4g} {_ci(d['correct']['ci'], '{:.4g}')}",
                             (f"{d['incorrect']['mean']:.4g} "
                              f"{_ci(d['incorrect']['ci'], '{:.4g}')}"),
                             f"{d['difference']:.4g} {_ci(d['difference_ci'], '{:.4g}')}"])
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>attnrl analyze</title>",
             STYLE,
             "<h2>Does this model have the preplan-and-anchor rhythm?</h2>",
             "<pre>" + html.escape("\n".join(summary_lines(report))) + "</pre>",
             "<h3>1. Coupling</h3>",
             _table(coupling_rows, ["", "observed", "95% CI", "chance", "ratio", "ratio CI",
                                    "p"])]
    for name, _, title in figures:
        if name == "coupling.png":
            parts.append(f"<p>{html.escape(title)}</p><img src='{name}' style='max-width:100%'>")
    parts.append("<h3>2. Heads</h3>")
    h = report["heads"]
    parts.append(f"<p>Local heads {h['local_heads']}; global heads {h['global_heads']}; "
                 f"overlap between disjoint halves: local {_pct(h['stability']['local_overlap'])}"
                 f", global {_pct(h['stability']['global_overlap'])}.</p>"
                 "<img src='heads.png' style='max-width:100%'>")
    parts.append("<h3>3. Signals and outcome</h3>")
    parts.append(_table(outcome_rows, ["per response", "correct", "incorrect",
                                       "difference (correct - incorrect)"]))
    parts.append("<img src='outcome.png' style='max-width:100%'>")
    parts.append("<h3>4. QK heads</h3>")
    qk = report.get("qk", {})
    if "skipped" in qk:
        parts.append(f"<p>Skipped: {html.escape(qk['skipped'])}</p>")
    else:
        held = qk["held_out"]
        rows = [[f"L{l}H{hh}", f"{a:.3f}", f"{b:.3f}", _ci(ci)] for (l, hh), a, b, ci in
                zip(held["selected"], held["select_auc"], held["held_out_auc"],
                    held["held_out_ci"])]
        rows.append(["validity (mean z of the heads)", "", f"{held['combined_auc']:.3f}",
                     _ci(held["combined_ci"])])
        base = qk["logprob_baseline"]
        rows.append(["model mean log-prob (baseline)", f"{base['auc']:.3f} (all)",
                     f"{base['held_out_auc']:.3f}", _ci(base["held_out_ci"])])
        parts.append(_table(rows, ["head", "AUC (selection half)", "AUC (held-out half)",
                                   f"CI ({held['ci_level']:.4g} for heads)"]))
        parts.append("<img src='qk_auc.png' style='max-width:100%'>")
        pr = report.get("qk_premise")
        if pr:
            parts.append(f"<p>qk_premise: top {pr['q']:.0%} tokens by prompt alignment on "
                         f"heads {pr['heads']} are anchors {_pct(pr['anchors']['observed'])} "
                         f"of the time vs {_pct(pr['anchors']['chance'])} by chance; preplan "
                         f"{_pct(pr['preplan']['observed'])} vs "
                         f"{_pct(pr['preplan']['chance'])}.</p>")
    parts.append("<h3>5. Receiver heads</h3>")
    r = report["receivers"]
    if r.get("responses"):
        parts.append(f"<p>Top heads (layer, head): {r['top_heads']}</p>"
                     "<img src='receivers.png' style='max-width:100%'>")
    else:
        parts.append(f"<p>{html.escape(r.get('note', 'none'))}</p>")
    parts.append("<h3>Examples (box: anchor token, underline: preplan token)</h3>")
    correct = [e for e in report["examples"] if e["correct"]]
    wrong = [e for e in report["examples"] if not e["correct"]]
    for i in range(max(len(correct), len(wrong))):
        cells = []
        for group, label in ((correct, "correct"), (wrong, "incorrect")):
            cells.append(f"<div><b>{label}</b>{_example_html(group[i])}</div>"
                         if i < len(group) else "<div></div>")
        parts.append(f"<div class='pair'>{''.join(cells)}</div>")
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("".join(parts), encoding="utf-8")
    return path
