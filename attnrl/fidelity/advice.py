"""What a fidelity summary says about a list of strategies, for other commands (`attnrl
ablate --fidelity`): a strategy that does not beat its own permutation on a task is not
recommended for it. Reads summary.json only (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

from attnrl.errors import UserError


def read_summary(path) -> tuple[dict, Path]:
    """(summary dict, its path) from a fidelity summary.json or the directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"--fidelity {str(path)!r} is not a readable fidelity summary.json; "
                        "give the --out of an `attnrl fidelity` run") from None
    if not isinstance(summary, dict) or "strategies" not in summary:
        raise UserError(f"--fidelity {str(path)!r} is not a fidelity summary (no "
                        "'strategies'); give the --out of an `attnrl fidelity` run")
    return summary, path


def fidelity_notes(path, strategies: list[str], task: str | None = None) -> list[str]:
    """One line per strategy: what the fidelity summary at `path` measured for it, and
    whether it is recommended on that task; a first line naming the summary's task (and a
    warning when it is not `task`)."""
    summary, path = read_summary(path)
    measured_task = summary.get("settings", {}).get("task")
    lines = [(f"fidelity ({path}, task {measured_task}): a strategy is recommended for the "
              "task when its credit beats its own permutation and its position profile there")]
    if task is not None and measured_task != task:
        lines.append(f"warning: the fidelity summary measured {measured_task}, this ablation "
                     f"trains {task}: its verdicts are about another task")
    table, recommended = summary["strategies"], set(summary.get("recommended", []))
    for name in strategies:
        entry = table.get(name)
        if name == "uniform":
            lines.append("uniform: the baseline (S = 1 by definition)")
        elif entry is None:
            lines.append(f"{name}: not measured by that fidelity run")
        elif not entry.get("measured"):
            lines.append(f"{name}: not measured ({entry.get('reason', 'no gamma')})")
        else:
            diff = entry["S_vs_perm"]
            advice = "recommended" if name in recommended else "not recommended"
            lines.append(f"{name}: {entry.get('verdict', '')} (S - permuted "
                         f"{diff['mean']:+.3f}, Holm p "
                         f"{diff.get('p_holm', float('nan')):.3g}): {advice}")
    return lines
