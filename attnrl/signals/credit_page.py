"""The per-token credit of completions as HTML: each token coloured by the advantage that
reaches the loss, A_t = gamma_t * A_i (green > 0, red < 0, white 0, one scale per page),
preplan tokens underlined and anchor tokens boxed, with A_t, gamma_t and the marks in a
tooltip. Used by the trainer (OUTPUT_DIR/credit/step-N.html every logging step, and W&B's
completions table) and by `attnrl signals --credit STRATEGY`.

A sample is a dict: "prompt" (text), "tokens" (the completion's token texts), "advantage"
and "gamma" (one float per token), "preplan" / "anchor" (one bool per token, or None when
the strategy computed no signals), "outcome" (A_i) and optionally "step" and "reward".
"""

from __future__ import annotations

import html
from pathlib import Path

POSITIVE = (26, 150, 65)     # green: the token's log-prob is pushed up
NEGATIVE = (215, 48, 39)     # red: pushed down


def credit_sample(tokenizer, prompt_ids, completion_ids, advantage, gamma, outcome,
                  preplan=None, anchor=None, **extra) -> dict:
    """A sample from token ids and per-token lists (already restricted to the completion's
    real tokens)."""
    return {"prompt": tokenizer.decode(list(prompt_ids), skip_special_tokens=True),
            "tokens": [tokenizer.decode([int(t)]) for t in completion_ids],
            "advantage": [float(a) for a in advantage], "gamma": [float(g) for g in gamma],
            "preplan": None if preplan is None else [bool(x) for x in preplan],
            "anchor": None if anchor is None else [bool(x) for x in anchor],
            "outcome": float(outcome), **extra}


def scale_of(samples: list[dict]) -> float:
    """The largest |A_t| over the samples (1 when all are 0): full colour at that value."""
    largest = max((abs(a) for s in samples for a in s["advantage"]), default=0.0)
    return largest if largest > 0 else 1.0


def _colour(value: float, scale: float) -> str:
    weight = min(1.0, abs(value) / scale)
    red, green, blue = POSITIVE if value > 0 else NEGATIVE
    mix = [round(255 + (c - 255) * weight) for c in (red, green, blue)]
    return "#{:02x}{:02x}{:02x}".format(*mix)


def token_spans(sample: dict, scale: float) -> str:
    """The completion as coloured <span>s (inline styles: also valid inside W&B's Html)."""
    parts = []
    for i, text in enumerate(sample["tokens"]):
        value, gamma = sample["advantage"][i], sample["gamma"][i]
        marks = [name for name in ("preplan", "anchor") if sample.get(name) and sample[name][i]]
        style = f"background:{_colour(value, scale)};padding:1px 0"
        if "preplan" in marks:
            style += ";border-bottom:3px solid #1f3fbf"
        if "anchor" in marks:
            style += ";outline:2px solid #000;outline-offset:-1px"
        tip = f"token {i} {text!r}\nA_t {value:+.4g} | gamma {gamma:.3g}" + \
            (f"\n{', '.join(marks)}" if marks else "")
        shown = text.replace("\n", "\u21b5\n") if text else "\u00b7"
        parts.append(f"<span title='{html.escape(tip)}' style='{style}'>"
                     f"{html.escape(shown)}</span>")
    return ("<div style=\"font-family:monospace;white-space:pre-wrap;line-height:2\">"
            + "".join(parts) + "</div>")


def render_credit_html(samples: list[dict], path, title: str, meta: dict | None = None) -> Path:
    """Write the page (one section per sample) to `path`, whole or not at all."""
    from attnrl.atomic import write_text

    scale = scale_of(samples)
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             f"<title>{html.escape(title)}</title></head>",
             "<body style='font-family:sans-serif;max-width:1100px;margin:1.5em auto'>",
             f"<h2>{html.escape(title)}</h2>",
             ("<p>Colour: the advantage each token's log-prob gets, A_t = gamma_t A_i "
              f"(full green +{scale:.3g}, full red -{scale:.3g}); "
              "<span style='border-bottom:3px solid #1f3fbf'>preplan</span> underlined, "
              "<span style='outline:2px solid #000'>anchor</span> boxed. Hover a token for "
              "its values.</p>")]
    for number, sample in enumerate(samples):
        head = f"completion {number + 1}: outcome advantage A_i {sample['outcome']:+.3f}"
        if sample.get("reward") is not None:
            head += f", reward {sample['reward']:.3f}"
        if sample.get("step") is not None:
            head += f" (step {sample['step']})"
        amplified = sum(g > 1 for g in sample["gamma"])
        damped = sum(g < 1 for g in sample["gamma"])
        parts += [f"<h3>{html.escape(head)}</h3>",
                  (f"<p>{len(sample['tokens'])} tokens: {amplified} amplified (gamma > 1), "
                   f"{damped} damped (gamma < 1)</p>"),
                  (f"<details><summary>prompt</summary><pre>{html.escape(sample['prompt'])}"
                   "</pre></details>"), token_spans(sample, scale)]
    if meta:
        parts.append("<h3>Settings</h3><table>")
        parts += [f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                  for k, v in meta.items()]
        parts.append("</table>")
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "".join(parts))
    return path
