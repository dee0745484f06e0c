"""`attnrl ablate --fidelity`: what a fidelity summary says about the ablation's strategies
(recommended only when the credit beats its permutation and its position profile)."""

import json

import numpy as np
import pytest

from attnrl.errors import UserError
from attnrl.fidelity.advice import fidelity_notes
from attnrl.fidelity.report import response_records, summarize
from attnrl.fidelity.values import CutResponse


def _summary_file(tmp_path):
    rng = np.random.default_rng(3)
    cuts, aligned, flat = [], [], []
    for p in range(20):
        for _ in range(2):
            bounds = [0, *np.cumsum(rng.integers(4, 12, size=3)).tolist()]
            decisive = int(rng.integers(0, 3))
            v = [0.125 if j <= decisive else 0.875 for j in range(3)]
            cuts.append(CutResponse(p, [1], list(range(bounds[-1])), True, bounds,
                                    successes=[round(x * 8) for x in v], trials=[8] * 3,
                                    half_successes=[round(x * 4) for x in v]))
            g = np.ones(bounds[-1])
            g[bounds[decisive]:bounds[decisive + 1]] = 1.5
            aligned.append(g)
            flat.append(np.ones(bounds[-1]) + 0.5 * (rng.random(bounds[-1]) < 0.4))
    rows = response_records(cuts, {"coupled": aligned, "random": flat}, 1.5, 50, 0)
    summary = summarize(rows, ["coupled", "random"], {"seed": 0, "task": "chain_sum",
                                                      "qk_heads": {}}, calibration_redraws=0)
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    return path


def test_notes_recommend_only_strategies_that_beat_both_nulls(tmp_path):
    path = _summary_file(tmp_path)
    lines = fidelity_notes(tmp_path, ["uniform", "coupled", "random", "entropy"], "chain_sum")
    assert lines[0].startswith(f"fidelity ({path}, task chain_sum)")
    text = "\n".join(lines)
    assert "coupled: beats its permutation and its position profile" in text
    assert "coupled" in text and text.count(": recommended") == 1
    assert "random: no evidence it beats its permutation" in text and "not recommended" in text
    assert "entropy: not measured by that fidelity run" in text
    assert "warning" not in text


def test_notes_warn_about_another_task_and_refuse_a_bad_file(tmp_path):
    _summary_file(tmp_path)
    lines = fidelity_notes(tmp_path / "summary.json", ["coupled"], "gsm8k")
    assert any(line.startswith("warning: the fidelity summary measured chain_sum")
               for line in lines)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="not a fidelity summary"):
        fidelity_notes(tmp_path / "bad.json", ["coupled"])
