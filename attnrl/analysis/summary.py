"""The printed summary of an analysis report (the dict of attnrl.analysis.cli.analyse, as
saved in report.json): one line and one verdict per question. Reads only the report dict."""

from __future__ import annotations

import math

from attnrl.errors import UserError

ALPHA = 0.01          # [D] verdict threshold on p and on intervals excluding 1 / 0.5 / 0
FORMAT = 3            # report format this module reads (attnrl.analysis.report_data); 3:
#                       cross-response coupling null, exact QK held-out test, receivers
#                       against their positional profile


def check_format(report: dict) -> None:
    """UserError for a report.json of an earlier `attnrl analyze` (earlier nulls)."""
    if report.get("format") != FORMAT:
        raise UserError(f"this report (format {report.get('format', 1)}) was written with the "
                        f"earlier statistics; re-run `attnrl analyze` for format {FORMAT}")


def pct(x) -> str:
    return f"{100 * x:.0f}%" if x is not None and math.isfinite(x) else "n/a"


def ci(bounds, fmt="{:.2f}") -> str:
    return "[" + ", ".join(fmt.format(v) for v in bounds) + "]"


def _sign_verdict(bounds, p=None, zero=0.0, above="above chance", below="below chance",
                  neither="no difference measurable") -> str:
    if bounds[0] > zero and (p is None or p < ALPHA):
        return above
    return below if bounds[1] < zero else neither


def coupling_line(name: str, c: dict) -> str:
    """Observed vs the cross-response chance (verdict: its ratio interval and p); the
    uniform and position-bin nulls as secondary figures."""
    u, s = c["uniform"], c["structured"]
    verdict = _sign_verdict(c["ratio_ci"], c["p_value"], 1.0, "yes", "no (below chance)",
                            "no clear coupling")
    return (f"{name}: {pct(c['observed'])} vs chance {pct(c['chance'])} (other responses' "
            f"peaks, similar length); ratio {c['ratio']:.2f} {ci(c['ratio_ci'])}, "
            f"{c['p_text']} ({c['coupled_peaks']}/{c['target_peaks']} peaks) -> {verdict} "
            f"[secondary, no verdict: uniform {pct(u['chance'])} {u['p_text']}; shifts in "
            f"{c['bins']} position bins {pct(s['chance'])} {s['p_text']}]")


def layer_line(layers: list[dict]) -> str:
    """Per-layer coupling: the best layer and the layers above chance after the maximum
    over layers (max-T family-wise p < ALPHA)."""
    best = max(layers, key=lambda r: r["waad"]["ratio"])
    parts = []
    for key, label in (("waad", "WAAD"), ("delta", "Delta")):
        above = [r["layer"] for r in layers if r[key]["p_max_layers"] < ALPHA]
        parts.append(f"FAI after {label}: {len(above)}/{len(layers)} layers"
                     + (f" ({', '.join(map(str, above))})" if above else ""))
    return (f"Per layer (cross null, family-wise p < {ALPHA} over the maximum of "
            f"{len(layers)} layers): " + "; ".join(parts) + f"; best layer {best['layer']} "
            f"ratio {best['waad']['ratio']:.2f} {ci(best['waad']['ratio_ci'])} (family-wise "
            f"p {best['waad']['p_max_layers']:.3g})")


def excess_text(c: dict) -> str:
    """'excess 0.04 [0.01, 0.07] (74% vs 72% chance, p = 0.01)' of the cross null."""
    return (f"excess {c['excess']:.2f} {ci(c['excess_ci'])} ({pct(c['observed'])} vs "
            f"{pct(c['chance'])} chance, {c['p_text']})")


def _head(h) -> str:
    return f"L{h[0]}H{h[1]}"


def _head_test_line(title: str, t: dict, verdicts: tuple[str, str]) -> str:
    if "skipped" in t:
        return f"{title}: not measurable ({t['skipped']})"
    pairs = (f"; {t['mixed_problems']} problems with both outcomes, {t['pairs']} pairs"
             if "pairs" in t else "")
    verdict = verdicts[0] if t["best_p_fwer"] < ALPHA else verdicts[1]
    return (f"{title} [null: {t['null']}{pairs}]: best head {_head(t['best_head'])} AUC "
            f"{t['best_auc']:.2f} (family-wise p {t['best_p_fwer']:.3g}); "
            f"{len(t['significant_heads_fwer_0.05'])} heads family-wise p < 0.05 -> {verdict} "
            f"(verdict at family-wise p < {ALPHA})")


def qk_lines(qk: dict) -> list[str]:
    if "skipped" in qk:
        return [f"QK heads: skipped ({qk['skipped']})"]
    lines = [_head_test_line("QK heads within problems (primary)", qk["within"], (
                 "a head tells right from wrong answers to the same problem",
                 "no head does beyond chance")),
             _head_test_line("QK heads across problems", qk["across"], (
                 "a head follows correctness across problems (may be problem difficulty)",
                 "no head beyond chance"))]
    held = qk["held_out"]
    if "skipped" in held:
        return lines + [f"QK held-out test: not measurable ({held['skipped']})"]
    return lines + held_out_lines(held)


def _size_text(held: dict) -> str:
    return (f"{held['held_out_mixed_problems']} held-out problems with both outcomes, "
            f"{held['held_out_pairs']} pairs; a verdict needs >= {held['min_mixed_problems']}")


def held_out_lines(held: dict) -> list[str]:
    """Held-out heads and validity vs the baselines; 'not measurable at this size' below
    the held-out problems the exact test needs."""
    chosen = ", ".join(map(_head, held["selected"]))
    if not held["measurable"]:
        return [(f"QK held-out (heads chosen on half of the problems: {chosen}): not "
                f"measurable at this size ({_size_text(held)}: sample more problems or more "
                f"responses per problem)")]
    test = held["test"]
    predicts = [_head(h) for h, p, a in zip(held["selected"], test["p_fwer"],
                                            held["held_out_auc"]) if p < ALPHA and a > 0.5]
    verdict = (f"{', '.join(predicts)} predicts correctness within held-out problems"
               if predicts else "no selected head predicts correctness beyond chance")
    lines = [(f"QK held-out (chosen by within-problem AUC on half of the problems: {chosen}): "
             f"within-problem AUC {', '.join(f'{a:.2f}' for a in held['held_out_auc'])} on "
             f"{held['held_out_mixed_problems']} problems with both outcomes; one-sided "
             f"permutation p (family-wise over the {len(held['selected'])} heads) "
             f"{', '.join(f'{p:.3g}' for p in test['p_fwer'])} -> {verdict} (verdict at "
             f"p < {ALPHA})")]
    parts, gains, losses = [], [], []
    for name, label in (("logprob", "mean log-prob (T=1)"), ("length", "length")):
        b = held["baselines"].get(name)
        if b is None:
            continue
        d = b["combined_minus_reference_ci"]
        if b["flipped"]:
            parts.append(f"{label}: direction flipped between halves ({b['direction']} on the "
                         f"selection half, {b['held_out_auc']:.2f} held out), compared read "
                         f"the other way, {b['reference_auc']:.2f}: difference "
                         f"{b['combined_minus_reference']:+.2f} {ci(d)}")
        else:
            parts.append(f"{label}, {b['direction']}: {b['held_out_auc']:.2f} "
                         f"{ci(b['held_out_ci'])}, difference "
                         f"{b['combined_minus_reference']:+.2f} {ci(d)}")
        if d[0] > 0:
            gains.append(label)
        elif d[1] < 0:
            losses.append(label)
    verdict = ("gain over " + " and ".join(gains) if gains else "no clear gain over the "
               "baselines") + ("; worse than " + " and ".join(losses) if losses else "")
    lines.append(f"QK validity (mean z of the heads, held out, within problems) "
                 f"{held['combined_auc']:.2f} {ci(held['combined_ci'])} (one-sided p "
                 f"{test['combined_p']:.3g}) vs " + "; ".join(parts) + f" -> {verdict}")
    return lines


def premise_line(pr: dict) -> str:
    if "held_out_auc" not in pr:
        extra = f"; response-mean alignment: {pr.get('held_out_skipped', 'n/a')}"
    elif not pr["held_out_measurable"]:
        extra = (f"; response-mean alignment held out: not measurable at this size "
                 f"({pr['held_out_problems']} held-out problems with both outcomes, need >= "
                 f"{pr['held_out_min_problems']})")
    else:
        extra = (f"; response-mean alignment held-out within-problem AUC "
                 f"{pr['held_out_auc']:.2f} {ci(pr['held_out_ci'])}, one-sided p "
                 f"{pr['held_out_p']:.3g}")
    return (f"qk_premise (top {pr['q']:.0%} tokens by prompt alignment on heads "
            f"{', '.join(map(_head, pr['heads']))}): anchors {excess_text(pr['anchors'])}, "
            f"preplan {excess_text(pr['preplan'])}{extra}")


def receiver_line(r: dict) -> str:
    """Top heads by kurtosis (with the kurtosis their positional profile gives) and the
    claim: heads beyond their positional profile, or none."""
    repeats = (f"; {r['repeated_sentences_dropped']} repeated sentences dropped in "
               f"{r['responses_with_repeats']} responses" if r.get("repeated_sentences_dropped")
               else "")
    if not r.get("measurable"):
        return f"Receiver heads: {r.get('note', 'not measurable at this length')}{repeats}"
    top = ", ".join(f"{_head(h)} ({k:.1f}; position alone {k0:.1f})" for h, k, k0 in zip(
        r["top_heads"][:5], r["top_kurtosis"][:5], r["top_positional_kurtosis"][:5]))
    c = r["claim"]
    if not c["measurable"]:
        claim = (f"beyond the positional profile: not measurable ({c['responses']} responses "
                 f"scored, need >= {c['min_responses']}) -> no receiver claim")
    elif c["heads"]:
        claim = (f"{len(c['heads'])} heads beyond their positional profile (simultaneous lower "
                 f"bound of the kurtosis excess > {c['margin']:g}): "
                 f"{', '.join(map(_head, c['heads'][:5]))} -> receiver heads exist")
    else:
        claim = (f"none beyond its positional profile (best {_head(c['best_head'])}: excess "
                 f"{c['best_excess']:.2f}, simultaneous lower bound {c['best_lower']:.2f} <= "
                 f"{c['margin']:g}) -> no receiver claim (the kurtosis is position: sinks, "
                 f"recency)")
    return (f"Receiver heads ({r['responses']} responses with >= {r['min_sentence_scores']} "
            f"vertical scores{repeats}): top by kurtosis {top}; {claim}; "
            f"{r['overlap_with_global_heads']} of the top {len(r['top_heads'])} are global "
            f"heads")


def outcome_line(report: dict) -> str:
    if report["correct"] in (0, report["responses"]):
        return (f"Correct vs incorrect: not measurable ({report['correct']} of "
                f"{report['responses']} responses correct)")
    parts = []
    for name, label in (("waad_mean", "WAAD"), ("fai_mean", "FAI"),
                        ("anchor_relative_position", "anchor position"),
                        ("length_tokens", "length")):
        d = report["outcome"][name]
        excl = d["difference_ci"][0] > 0 or d["difference_ci"][1] < 0
        parts.append(f"{label} {d['correct']['mean']:.3g} vs {d['incorrect']['mean']:.3g} "
                     f"(diff CI {ci(d['difference_ci'], '{:.3g}')}{', differs' if excl else ''})")
    return "Correct vs incorrect: " + "; ".join(parts)


def summary_lines(report: dict) -> list[str]:
    """The short printed summary: one verdict per question."""
    check_format(report)
    src = report["task"] or report["responses_file"]
    lines = [(f"== attnrl analyze: {report['model']} on {src}: {report['problems']} problems, "
              f"{report['responses']} responses ({report['correct']} correct, "
              f"{pct(report['accuracy'])}), mean {report['mean_response_tokens']:.0f} tokens")]
    c = report["coupling"]
    tag = f"top {c['p'] * 100:.0f}%, within {c['k']} tokens"
    lines.append(coupling_line(f"FAI peaks follow WAAD peaks ({tag})", c["fai_after_waad"]))
    lines.append(coupling_line(f"FAI peaks follow Delta peaks ({tag})", c["fai_after_delta"]))
    by = c["anchors_after_preplan_by"]
    verdicts = {key: _sign_verdict(d["excess_ci"], d["p_value"]) for key, d in by.items()}
    lines.append(f"Anchors (top {report['signal_config']['q']:.0%} FAI) after preplan tokens "
                 f"(excess over chance, 1 = every anchor): preplan_by=waad "
                 f"{excess_text(by['waad'])} -> {verdicts['waad']}; preplan_by=delta "
                 f"{excess_text(by['delta'])} -> {verdicts['delta']}")
    lines.append(layer_line(c["per_layer"]))
    h = report["heads"]
    lines.append(f"Head split (layers {h['sampled_layers']}): local span "
                 f"{h['local_span_range'][0]:.1f}-{h['local_span_range'][1]:.1f} tokens, global "
                 f"{h['global_span_range'][0]:.1f}-{h['global_span_range'][1]:.1f}; same heads "
                 f"in two disjoint halves: local {pct(h['stability']['local_overlap'])}, "
                 f"global {pct(h['stability']['global_overlap'])}")
    lines.append(outcome_line(report))
    lines += qk_lines(report["qk"])
    if report.get("qk_premise"):
        lines.append(premise_line(report["qk_premise"]))
    lines.append(receiver_line(report["receivers"]))
    s = report["seconds"]
    lines.append(f"Wall time: sampling {s['sample']:.0f} s, forwards {s['forward']:.0f} s, "
                 f"statistics {s['statistics']:.0f} s")
    return lines
