"""Pictures of one response's signals: a PNG (matplotlib) and a self-contained HTML page.

Both take the per-token records of `token_records`: one dict per response token with its
input position, text, WAAD, FAI, Delta and the preplan / anchor / dominated / intro flags.
Marks: preplan tokens are underlined (blue bar), anchor tokens are boxed (frame); the
strongest of each set (its peaks: the top PEAK_FRACTION of the response's eligible tokens by
the set's own ranking value) get a thick dark mark, the rest of the set a thin light one,
so the few strongest tokens stand out. Tokens whose FAI window is empty (near the end) are
grey in the FAI view. Titles and legends sit outside the plotted data.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import torch

WAAD_CMAP = "YlGnBu"
FAI_CMAP = "OrRd"
PREPLAN_COLOUR = "#1f3fbf"
ANCHOR_COLOUR = "#000000"
NO_VALUE_COLOUR = "#d9d9d9"
WEAK_PREPLAN_COLOUR = "#9fb4ee"
WEAK_ANCHOR_COLOUR = "#8c8c8c"
PEAK_FRACTION = 0.1
"""Top fraction of a response's eligible tokens drawn as peaks (thick marks)."""


def _peak_flags(values: list[float], eligible: list[bool], fraction: float) -> list[bool]:
    """The ceil(fraction * n_eligible) largest eligible values (ties: earlier token)."""
    idx = [i for i, ok in enumerate(eligible) if ok]
    count = math.ceil(len(idx) * fraction - 1e-9)
    top = set(sorted(idx, key=lambda i: (-values[i], i))[:count])
    return [i in top for i in range(len(values))]


def token_records(token_ids: list[int], token_texts: list[str], positions: list[int], signals,
                  row: int = 0, preplan_by: str = "delta",
                  peak_fraction: float = PEAK_FRACTION) -> list[dict]:
    """Per-token dicts for the response tokens at input `positions` of batch row `row`.

    signals: a TokenSignals. Values are plain floats / bools (JSON-ready); `index` is the
    token's index within the response, `position` its index in the input, `id` its token id.
    `preplan_peak` / `anchor_peak`: among the top `peak_fraction` of the response's tokens
    by the set's ranking value (Delta or WAAD as `preplan_by`; FAI among tokens with a
    future window) and in the set.
    """
    def at(tensor, cast):
        return [cast(v) for v in tensor[row, positions].tolist()]

    columns = {
        "waad": at(signals.waad, float), "fai": at(signals.fai, float),
        "delta": at(signals.delta, float), "fai_valid": at(signals.fai_valid, bool),
        "preplan": at(signals.preplan_mask, bool), "anchor": at(signals.anchor_mask, bool),
        "dominated": at(signals.dominated_mask, bool), "intro": at(signals.intro_mask, bool),
    }
    every = [True] * len(positions)
    preplan_peak = _peak_flags(columns[preplan_by], every, peak_fraction)
    anchor_peak = _peak_flags(columns["fai"], columns["fai_valid"], peak_fraction)
    columns["preplan_peak"] = [a and b for a, b in zip(preplan_peak, columns["preplan"])]
    columns["anchor_peak"] = [a and b for a, b in zip(anchor_peak, columns["anchor"])]
    return [dict(index=i, position=int(p), id=int(t_id), text=text,
                 **{k: v[i] for k, v in columns.items()})
            for i, (p, t_id, text) in enumerate(zip(positions, token_ids, token_texts))]


def display_text(text: str) -> str:
    """A token as shown: newline as a return arrow, tab as an arrow, empty as a middle dot."""
    shown = text.replace("\r", "").replace("\n", "\u21b5").replace("\t", "\u2192")
    return shown if shown else "\u00b7"


def _value_ranges(records: list[dict]) -> tuple[tuple[float, float], tuple[float, float]]:
    waad = [r["waad"] for r in records] or [0.0]
    fai = [r["fai"] for r in records if r["fai_valid"]] or [0.0]
    waad_range = (min(waad), max(max(waad), min(waad) + 1e-9))
    return waad_range, (0.0, max(max(fai), 1e-9))


# ------------------------------------------------------------------------------- PNG

def _layout_rows(records: list[dict], columns: int) -> list[tuple[int, float, int, str]]:
    """(record index, x in characters, row, shown text) with wrapping at `columns` chars and a
    line break after a newline token."""
    placed, x, row = [], 0.0, 0
    for i, record in enumerate(records):
        shown = display_text(record["text"])[:columns]
        if x + len(shown) > columns and x > 0:
            x, row = 0.0, row + 1
        placed.append((i, x, row, shown))
        x += len(shown) + 0.45
        if "\n" in record["text"]:
            x, row = 0.0, row + 1
    return placed


def _flag(record: dict, name: str) -> bool:
    return bool(record.get(name, False))


def render_png(records: list[dict], path, title: str = "", dpi: int = 110,
               subtitle: str = "") -> Path:
    """Write a PNG: a header (title, then `subtitle`, e.g. the gold answer and whether the
    response is correct), WAAD and FAI along the response (peaks of the preplan / anchor
    sets large, the rest of the sets small), then the response text twice, coloured by WAAD
    and by FAI, with thick marks on peaks and thin ones on the rest of each set. Titles and
    legends are placed outside the plotted data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    font, width_in = 9.0, 14.0
    char_w = 0.602 * font / 72                       # DejaVu Sans Mono advance, inches
    row_h = 1.75 * font / 72
    left, right = 0.7, 2.2                           # right: legends and colour bars
    text_w = width_in - left - right
    columns = max(20, int(text_w / char_w))
    placed = _layout_rows(records, columns)
    n_rows = (placed[-1][2] + 1) if placed else 1
    text_h = max(n_rows * row_h + 0.1, 0.65)        # at least the colour bar's height
    header = 0.3 + (0.22 if subtitle else 0.0)
    plot_h, gap, top, bottom = 1.7, 0.55, 0.15 + header, 0.2
    axis_label = 0.45                                # room for the x label under the FAI plot
    height = top + 2 * plot_h + 0.08 + axis_label + 2 * gap + 2 * text_h + bottom
    fig = plt.figure(figsize=(width_in, height), dpi=dpi)
    fig.text(left / width_in, 1 - 0.12 / height, title, fontsize=11, ha="left", va="top")
    if subtitle:
        fig.text(left / width_in, 1 - 0.40 / height, subtitle, fontsize=9.5, ha="left",
                 va="top")

    def axes(y_top, h, x0=left, w=text_w):
        return fig.add_axes([x0 / width_in, 1 - (y_top + h) / height, w / width_in, h / height])

    def outside_legend(ax):
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
                  borderaxespad=0.0)

    (w_lo, w_hi), (f_lo, f_hi) = _value_ranges(records)
    index = [r["index"] for r in records]
    y = top
    ax_w = axes(y, plot_h)
    ax_w.plot(index, [r["waad"] for r in records], color="#225ea8", lw=1.1, label="WAAD")
    rest = [r for r in records if r["preplan"] and not _flag(r, "preplan_peak")]
    peaks = [r for r in records if _flag(r, "preplan_peak")]
    ax_w.scatter([r["index"] for r in rest], [r["waad"] for r in rest], marker="^", s=8,
                 color=WEAK_PREPLAN_COLOUR, zorder=3, label="preplan token")
    ax_w.scatter([r["index"] for r in peaks], [r["waad"] for r in peaks], marker="^", s=40,
                 color=PREPLAN_COLOUR, zorder=4,
                 label=f"preplan peak (top {PEAK_FRACTION:.0%})")
    ax_w.set_ylabel("WAAD (tokens)")
    outside_legend(ax_w)
    ax_w.tick_params(labelbottom=False)
    ax_w.grid(alpha=0.3)
    y += plot_h + 0.08
    ax_f = axes(y, plot_h)
    ax_f.sharex(ax_w)
    ax_f.plot(index, [r["fai"] if r["fai_valid"] else math.nan for r in records],
              color="#b30000", lw=1.1, label="FAI")
    rest = [r for r in records if r["anchor"] and not _flag(r, "anchor_peak")]
    peaks = [r for r in records if _flag(r, "anchor_peak")]
    ax_f.scatter([r["index"] for r in rest], [r["fai"] for r in rest], marker="s", s=8,
                 facecolor="none", edgecolor=WEAK_ANCHOR_COLOUR, lw=0.7, zorder=3,
                 label="anchor token")
    ax_f.scatter([r["index"] for r in peaks], [r["fai"] for r in peaks], marker="s", s=36,
                 facecolor="none", edgecolor=ANCHOR_COLOUR, lw=1.5, zorder=4,
                 label=f"anchor peak (top {PEAK_FRACTION:.0%})")
    ax_f.set_ylabel("FAI (attention)")
    ax_f.set_xlabel("response token index")
    outside_legend(ax_f)
    ax_f.grid(alpha=0.3)
    y += plot_h + axis_label + gap

    views = [("waad", "tokens coloured by WAAD", WAAD_CMAP, Normalize(w_lo, w_hi)),
             ("fai", "tokens coloured by FAI (grey: no future window)", FAI_CMAP,
              Normalize(f_lo, f_hi))]
    for key, label, cmap_name, norm in views:
        ax = axes(y, text_h)
        cmap = plt.get_cmap(cmap_name)
        ax.set_xlim(0, text_w / char_w)
        ax.set_ylim(text_h / row_h - 0.05, -0.05)         # one unit = one text row
        ax.axis("off")
        ax.set_title(f"{label}   (underline: preplan, box: anchor; thick = peak, top "
                     f"{PEAK_FRACTION:.0%}; thin = rest of the set)", fontsize=9.5, loc="left")
        for i, x, row, shown in placed:
            record = records[i]
            valid = record["fai_valid"] or key == "waad"
            colour = cmap(norm(record[key])) if valid else NO_VALUE_COLOUR
            peak = _flag(record, "anchor_peak")
            edge = (ANCHOR_COLOUR if peak else WEAK_ANCHOR_COLOUR) if record["anchor"] \
                else "none"
            ax.add_patch(Rectangle((x - 0.12, row + 0.06), len(shown) + 0.24, 0.78,
                                   facecolor=colour, edgecolor=edge,
                                   lw=(1.8 if peak else 0.6) if record["anchor"] else 0))
            if record["preplan"]:
                strong = _flag(record, "preplan_peak")
                ax.plot([x - 0.12, x + len(shown) + 0.12], [row + 0.95, row + 0.95],
                        color=PREPLAN_COLOUR if strong else WEAK_PREPLAN_COLOUR,
                        lw=2.6 if strong else 0.9, solid_capstyle="butt")
            lum = sum(c * w for c, w in zip(colour[:3] if valid else (0.85,) * 3,
                                            (0.299, 0.587, 0.114)))
            ax.text(x, row + 0.46, shown, fontsize=font, family="DejaVu Sans Mono",
                    va="center", ha="left", color="white" if lum < 0.45 else "black",
                    fontweight="bold" if peak or _flag(record, "preplan_peak") else "normal")
        bar = axes(y + 0.05, text_h - 0.05, x0=left + text_w + 0.25, w=0.15)
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=bar)
        bar.set_ylabel(key.upper(), fontsize=8)
        bar.tick_params(labelsize=7)
        y += text_h + gap
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ HTML

def _hex(rgba) -> str:
    red, green, blue = (round(255 * c) for c in rgba[:3])
    return f"#{red:02x}{green:02x}{blue:02x}"


def _tooltip(record: dict) -> str:
    flags = [name for name in ("preplan", "anchor", "dominated", "intro") if record[name]]
    fai = f"{record['fai']:.4g}" if record["fai_valid"] else "n/a (no future window)"
    return (f"token {record['index']} (position {record['position']}) {record['text']!r}\n"
            f"WAAD {record['waad']:.4g} | FAI {fai} | Delta {record['delta']:.4g}"
            + (f"\n{', '.join(flags)}" if flags else ""))


def render_html(records: list[dict], path, title: str = "", meta: dict | None = None,
                image: str | None = None, subtitle: str = "") -> Path:
    """Write an HTML page: the response twice as coloured token spans (by WAAD, by FAI),
    class 'preplan' (underlined) / 'anchor' (boxed), plus 'preplan-peak' / 'anchor-peak'
    (thick marks) on the sets' peaks, a tooltip with the values on each token, `subtitle`
    (e.g. gold answer and correctness), a legend, a table of `meta`, and `image` (a PNG
    file name) if given."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    (w_lo, w_hi), (f_lo, f_hi) = _value_ranges(records)
    views = [("waad", "WAAD: windowed average attention distance (local heads)", WAAD_CMAP,
              Normalize(w_lo, w_hi)),
             ("fai", "FAI: future attention influence (global heads)", FAI_CMAP,
              Normalize(f_lo, f_hi))]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title or 'attnrl signals')}</title><style>",
        "body{font-family:sans-serif;max-width:1100px;margin:1.5em auto;color:#222}",
        (".text{font-family:'DejaVu Sans Mono',monospace;font-size:14px;line-height:2.1;"
         "white-space:pre-wrap;border:1px solid #ccc;padding:.6em}"),
        ".tok{padding:1px 0;border-radius:2px}",
        f".tok.preplan{{border-bottom:1px solid {WEAK_PREPLAN_COLOUR}}}",
        f".tok.anchor{{outline:1px solid {WEAK_ANCHOR_COLOUR};outline-offset:-1px}}",
        f".tok.preplan-peak{{border-bottom:3px solid {PREPLAN_COLOUR};font-weight:bold}}",
        f".tok.anchor-peak{{outline:2px solid {ANCHOR_COLOUR};font-weight:bold}}",
        f".key-preplan{{border-bottom:3px solid {PREPLAN_COLOUR}}}",
        f".key-anchor{{outline:2px solid {ANCHOR_COLOUR};outline-offset:-1px}}",
        f".key-weak-preplan{{border-bottom:1px solid {WEAK_PREPLAN_COLOUR}}}",
        f".key-weak-anchor{{outline:1px solid {WEAK_ANCHOR_COLOUR};outline-offset:-1px}}",
        ".legend span.box{display:inline-block;padding:0 .4em;margin-right:1.2em}",
        (".scale{display:inline-block;width:220px;height:12px;vertical-align:middle;"
         "border:1px solid #999;margin:0 .4em}"),
        ("table{border-collapse:collapse;font-size:13px}td{padding:2px 8px;"
         "border-bottom:1px solid #eee;vertical-align:top}"),
        "</style></head><body>",
        f"<h2>{html.escape(title or 'attnrl signals')}</h2>",
        f"<p><b>{html.escape(subtitle)}</b></p>" if subtitle else "",
        "<p class='legend'>",
        f"<span class='box key-preplan'>preplan peak (top {PEAK_FRACTION:.0%})</span>",
        "<span class='box key-weak-preplan'>other preplan token</span>",
        f"<span class='box key-anchor'>anchor peak (top {PEAK_FRACTION:.0%})</span>",
        "<span class='box key-weak-anchor'>other anchor token</span>",
        f"<span class='box' style='background:{NO_VALUE_COLOUR}'>no FAI window</span>",
        "Hover a token for its values.</p>",
    ]
    for key, label, cmap_name, norm in views:
        cmap = plt.get_cmap(cmap_name)
        stops = ",".join(_hex(cmap(k / 8)) for k in range(9))
        parts.append(f"<h3>{html.escape(label)}</h3><p>{norm.vmin:.3g}"
                     f"<span class='scale' style='background:linear-gradient(to right,{stops})'>"
                     f"</span>{norm.vmax:.3g}</p><div class='text' id='view-{key}'>")
        for record in records:
            valid = record["fai_valid"] or key == "waad"
            rgba = cmap(norm(record[key])) if valid else None
            colour = _hex(rgba) if valid else NO_VALUE_COLOUR
            lum = sum(c * w for c, w in zip(rgba[:3], (0.299, 0.587, 0.114))) if valid else 0.85
            classes = " ".join(["tok"] + [n for n in ("preplan", "anchor") if record[n]]
                               + [n.replace("_", "-") for n in ("preplan_peak", "anchor_peak")
                                  if _flag(record, n)])
            parts.append(
                f"<span class='{classes}' data-index='{record['index']}' "
                f"data-position='{record['position']}' title='{html.escape(_tooltip(record))}' "
                f"style='background:{colour};color:{'#fff' if lum < 0.45 else '#000'}'>"
                f"{html.escape(record['text'])}</span>")
        parts.append("</div>")
    if image:
        parts.append(f"<h3>Along the response</h3><img src='{html.escape(image)}' "
                     "style='max-width:100%' alt='WAAD and FAI along the response'>")
    if meta:
        parts.append("<h3>Settings</h3><table>")
        for name, value in meta.items():
            parts.append(f"<tr><td>{html.escape(str(name))}</td>"
                         f"<td>{html.escape(str(value))}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("".join(parts), encoding="utf-8")
    return path


def summarise(records: list[dict]) -> dict:
    """Counts and ranges, for the command's printout."""
    values = torch.tensor([[r["waad"], r["fai"]] for r in records] or [[0.0, 0.0]])
    return {"tokens": len(records), "preplan": sum(r["preplan"] for r in records),
            "anchor": sum(r["anchor"] for r in records),
            "waad_max": float(values[:, 0].max()), "fai_max": float(values[:, 1].max())}
