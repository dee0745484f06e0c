"""Rendering of an analysis report (the dict of attnrl.analysis.cli.analyse, as saved in
report.json): PNG figures and one HTML page (with the summary of attnrl.analysis.summary).
Everything here reads only the report dict, so a saved report.json can be re-rendered."""

from __future__ import annotations

import html
import math
from pathlib import Path

from attnrl.analysis.summary import (
    ALPHA,
    check_format,
    excess_text,
    held_out_lines,
    receiver_line,
    summary_lines,
)
from attnrl.analysis.summary import ci as _ci
from attnrl.analysis.summary import pct as _pct

STYLE = ("<style>body{font-family:sans-serif;max-width:1200px;margin:1.2em auto;color:#222}"
         "table{border-collapse:collapse;font-size:13px;margin:.5em 0}"
         "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}"
         ".tok{font-family:monospace;font-size:13px;line-height:1.9;white-space:pre-wrap;"
         "border:1px solid #ccc;padding:.4em;margin-bottom:.3em}"
         ".anchor{outline:2px solid #000;outline-offset:-1px}"
         ".preplan{border-bottom:3px solid #1f3fbf}.lab{font-size:11px;color:#555}"
         ".pair{display:flex;gap:1em}.pair>div{flex:1;min-width:0}"
         "pre{background:#f6f6f6;padding:.6em;white-space:pre-wrap}</style></head><body>")


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
    bars = (("observed", "#225ea8", "observed"),
            ("cross", "#444444", "chance, other responses (verdict)"),
            ("uniform", "#bbbbbb", "chance, uniform (secondary)"),
            ("structured", "#888888", f"chance, shifts in {c.get('bins', '?')} bins (secondary)"))
    for i, (key, _) in enumerate(names):
        d = c[key]
        for j, (which, colour, label) in enumerate(bars):
            value, lo_hi = ((d["observed"], d["observed_ci"]) if which == "observed"
                            else (d[which]["chance"], d[which]["chance_range"]))
            ax.bar(i + (j - 1.5) * 0.2, value, 0.19, color=colour, capsize=3,
                   yerr=[[value - lo_hi[0]], [lo_hi[1] - value]], label=label if i == 0 else None)
    ax.set_xticks([0, 1], [n[1] for n in names])
    ax.set_ylabel("fraction of FAI peaks")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    layers = [r["layer"] for r in c["per_layer"]]
    for key, colour in (("waad", "#225ea8"), ("delta", "#b30000")):
        ratio = [r[key]["ratio"] for r in c["per_layer"]]
        lo = [r[key]["ratio_ci"][0] for r in c["per_layer"]]
        hi = [r[key]["ratio_ci"][1] for r in c["per_layer"]]
        ax2.plot(layers, ratio, "-o", ms=3, color=colour, label=f"after {key.upper()} peak")
        ax2.fill_between(layers, lo, hi, color=colour, alpha=0.15)
        above = [(r["layer"], r[key]["ratio"]) for r in c["per_layer"]
                 if r[key]["p_max_layers"] < ALPHA]
        if above:
            ax2.scatter(*zip(*above), s=40, facecolor="none", edgecolor=colour, lw=1.2,
                        label=f"{key.upper()}: family-wise p < {ALPHA} (max over layers)")
    for l in report["sampled_layers"]:
        ax2.axvline(l, color="#999", lw=0.6, ls=":")
    ax2.axhline(1, color="black", lw=0.8)
    ax2.set_xlabel("layer (dotted: sampled layers)")
    ax2.set_ylabel("ratio to the cross-response chance (95% CI)")
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
    panels = [(key, title) for key, title in
              (("within", "AUC within problems (primary)"), ("across", "AUC across problems"))
              if "skipped" not in qk[key]]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * len(panels)), dpi=110,
                             squeeze=False)
    for ax, (key, title) in zip(axes[:, 0], panels):
        _heatmap(ax, qk[key]["auc"], "RdBu_r", title, fig, center=0.5)
        if "selected" in qk["held_out"]:
            _mark(ax, qk["held_out"]["selected"], "black", "s", "selected on half (held out)")
        _mark(ax, qk[key]["significant_heads_fwer_0.05"], "#00a000", "o",
              "family-wise p < 0.05 (this panel's null)")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2,
                  frameon=False)
    _save(fig, path)


def fig_receivers(report, path):
    plt = _plt()
    r = report["receivers"]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(11, 6.4), dpi=110)
    _heatmap(ax, r["mean_kurtosis"], "magma", "vertical-score kurtosis (mean)", fig)
    _mark(ax, r["top_heads"], "cyan", "o", f"top {len(r['top_heads'])} by kurtosis")
    _heatmap(ax2, r["excess_kurtosis"], "RdBu_r", "kurtosis - positional kurtosis", fig,
             center=0.0)
    _mark(ax2, r["claim"].get("heads", []), "black", "s", "beyond the positional profile")
    for a in (ax, ax2):
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=1,
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


def _coupling_html(report) -> str:
    c = report["coupling"]
    rows = []
    named = [("FAI peak after WAAD peak", c["fai_after_waad"]),
             ("FAI peak after Delta peak", c["fai_after_delta"])]
    named += [(f"anchor after preplan token (preplan_by={by})", d)
              for by, d in c["anchors_after_preplan_by"].items()]
    for label, d in named:
        u, st = d["uniform"], d["structured"]
        rows.append([label, f"{_pct(d['observed'])} {_ci(d['observed_ci'])}",
                     f"{_pct(d['chance'])}, {d['p_text']}",
                     f"{d['ratio']:.2f} {_ci(d['ratio_ci'])}",
                     f"{d['excess']:.2f} {_ci(d['excess_ci'])}",
                     f"{_pct(u['chance'])}, {u['p_text']}", f"{_pct(st['chance'])}, {st['p_text']}"])
    head = ["", "observed (95% CI)", "cross-response null: chance, p (verdict)", "ratio",
            "excess (obs - chance) / (1 - chance)", "uniform null (secondary)",
            f"shifts in {c['bins']} position bins (secondary)"]
    return ("<h3>1. Coupling</h3>" + _table(rows, head)
            + f"<p>Verdict null: each response's FAI peaks paired with the source peaks of "
              f"another response of similar length (pools of about {c.get('pool', '?')} "
              "responses sorted by length): every run and position trend of both signals "
              "stays, only the pairing within a response is broken. Secondary, without "
              "verdict: peaks at random positions (uniform) and the peak pattern rotated "
              "within position bins; both call shared position trends coupling. Per layer: "
              f"family-wise p over the maximum of the layers (max-T, the same pairings), "
              f"circled below p &lt; {ALPHA}.</p>"
              "<img src='coupling.png' style='max-width:100%'>")


def _qk_html(report) -> str:
    qk = report.get("qk", {})
    if "skipped" in qk:
        return f"<h3>4. QK heads</h3><p>Skipped: {html.escape(qk['skipped'])}</p>"
    parts = ["<h3>4. QK heads</h3>"]
    held = qk["held_out"]
    if "skipped" in held:
        parts.append(f"<p>Held-out test: {html.escape(held['skipped'])}</p>")
    else:
        parts.append("<pre>" + html.escape("\n".join(held_out_lines(held))) + "</pre>")
        names = list(held["baselines"])
        rows = []
        for i, ((l, hh), a, b, bounds, across, p) in enumerate(zip(
                held["selected"], held["select_auc"], held["held_out_auc"],
                held["held_out_ci"], held["held_out_auc_across"], held["test"]["p_fwer"])):
            diffs = [f"{held['baselines'][n]['heads_minus_reference'][i]:+.3f} "
                     f"{_ci(held['baselines'][n]['heads_minus_reference_ci'][i])}"
                     for n in names]
            rows.append([f"L{l}H{hh}", f"{a:.3f}", f"{b:.3f} {_ci(bounds)}", f"{p:.3g}",
                         f"{across:.3f}", *diffs])
        diffs = [f"{held['baselines'][n]['combined_minus_reference']:+.3f} "
                 f"{_ci(held['baselines'][n]['combined_minus_reference_ci'])}" for n in names]
        rows.append(["validity (mean z of the heads)", "",
                     f"{held['combined_auc']:.3f} {_ci(held['combined_ci'])}",
                     f"{held['test']['combined_p']:.3g}",
                     f"{held['combined_auc_across']:.3f}", *diffs])
        for n in names:
            b = held["baselines"][n]
            flip = ", flipped held out" if b["flipped"] else ""
            rows.append([f"baseline: {n} ({b['direction']} on the selection half{flip})", "",
                         f"{b['held_out_auc']:.3f} {_ci(b['held_out_ci'])}", "", "",
                         *[""] * len(names)])
        parts.append(_table(rows, ["head", "within AUC (selection half)",
                                   "within AUC held out (bootstrap CI, descriptive)",
                                   "one-sided permutation p (family-wise)",
                                   "across AUC held out",
                                   *[f"minus {n} in its better held-out direction (paired CI)"
                                     for n in names]]))
        parts.append(f"<p>Held out: {held['held_out_mixed_problems']} problems with both "
                     f"outcomes, {held['held_out_pairs']} pairs (a verdict needs >= "
                     f"{held['min_mixed_problems']}); head intervals at the "
                     f"{held['ci_level']:.4g} level (Bonferroni), the rest at 0.95. The "
                     "verdict is the permutation test (labels permuted within held-out "
                     "problems, exact at any size); the percentile intervals undercover at few "
                     "problems.</p>")
    parts.append("<img src='qk_auc.png' style='max-width:100%'>")
    pr = report.get("qk_premise")
    if pr:
        parts.append(f"<p>qk_premise: top {pr['q']:.0%} tokens by prompt alignment on heads "
                     f"{pr['heads']}: anchors {html.escape(excess_text(pr['anchors']))}; "
                     f"preplan {html.escape(excess_text(pr['preplan']))}.</p>")
    return "".join(parts)


def _receiver_html(report) -> str:
    r = report["receivers"]
    if not r.get("measurable"):
        return f"<h3>5. Receiver heads</h3><p>{html.escape(receiver_line(r))}</p>"
    return (f"<h3>5. Receiver heads</h3><p>{html.escape(receiver_line(r))}</p>"
            "<p>Each head's kurtosis is compared with the kurtosis of its positional profile "
            "(the attention each response position receives, averaged over the other "
            "responses): a first-token sink or a recency profile is in both, a sentence read "
            "back for what it says only in the first.</p>"
            "<img src='receivers.png' style='max-width:100%'>")


def render_report(report: dict, out) -> Path:
    """Write the PNG figures and report.html into `out`; returns the HTML path."""
    check_format(report)
    out = Path(out)
    figures = [("coupling.png", fig_coupling), ("heads.png", fig_heads),
               ("outcome.png", fig_outcome)]
    if "skipped" not in report.get("qk", {"skipped": 1}):
        figures.append(("qk_auc.png", fig_qk))
    if report["receivers"].get("measurable"):
        figures.append(("receivers.png", fig_receivers))
    for name, fn in figures:
        fn(report, out / name)
    outcome_rows = []
    for name, d in report["outcome"].items():
        if name == "anchor_position_histogram":
            continue
        outcome_rows.append([name, f"{d['correct']['mean']:.4g} {_ci(d['correct']['ci'], '{:.4g}')}",
                             (f"{d['incorrect']['mean']:.4g} "
                              f"{_ci(d['incorrect']['ci'], '{:.4g}')}"),
                             f"{d['difference']:.4g} {_ci(d['difference_ci'], '{:.4g}')}"])
    h = report["heads"]
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>attnrl analyze</title>",
             STYLE,
             "<h2>Does this model have the preplan-and-anchor rhythm?</h2>",
             "<pre>" + html.escape("\n".join(summary_lines(report))) + "</pre>",
             _coupling_html(report),
             "<h3>2. Heads</h3>",
             (f"<p>Local heads {h['local_heads']}; global heads {h['global_heads']}; "
              f"overlap between disjoint halves: local "
              f"{_pct(h['stability']['local_overlap'])}, global "
              f"{_pct(h['stability']['global_overlap'])}.</p>"
              "<img src='heads.png' style='max-width:100%'>"),
             "<h3>3. Signals and outcome</h3>",
             _table(outcome_rows, ["per response", "correct", "incorrect",
                                   "difference (correct - incorrect)"]),
             "<img src='outcome.png' style='max-width:100%'>",
             _qk_html(report), _receiver_html(report),
             "<h3>Examples (box: anchor token, underline: preplan token)</h3>"]
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
