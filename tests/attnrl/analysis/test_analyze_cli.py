"""`attnrl analyze` end to end on a saved tiny model: sampled with the transformers engine
and scored, or read from a responses JSONL; report.json / report.html / PNGs written, the
summary printed; bad input exits 2 with one line."""

import json

import pytest

from attnrl.cli import main

SENTENCES = ("First add 3 and 4. That gives 7. Then check it. Seven minus four is three. "
             "So the sum holds. The answer is 7. #### 7")


def responses_file(path, count=24):
    rows = []
    for i in range(count):
        a, b = i % 7 + 1, i % 5 + 2
        correct = i % 3 != 0
        answer = a + b if correct else a + b + 1
        text = (f"First add {a} and {b}. That gives {answer}. Then check it. It holds. "
                f"Add {a} again. Take it away. We are back. Now add {b}. Look once more. "
                f"Still {answer}. Count on fingers. Same again. Write it down. "
                f"So we are done. The answer is {answer}. #### {answer}") if i % 2 else \
            f"{a} plus {b} is {answer}. #### {answer}"
        rows.append({"prompt": f"Question: what is {a} + {b}?\nAnswer:", "response": text,
                     "answer": str(a + b), "group": i // 2})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_analyze_responses_file_writes_every_section(tiny_model_dir, tmp_path, capsys):
    data = responses_file(tmp_path / "responses.jsonl")
    out = tmp_path / "out"
    rc = main(["analyze", "--model", str(tiny_model_dir), "--responses", str(data),
               "--permutations", "300", "--bootstrap", "60", "--layers", "1,2",
               "--h-lo", "2", "--qk-top-k", "2", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == 3
    assert report["responses"] == 24 and report["correct"] == 16 and report["problems"] == 12
    assert report["sampled_layers"] == [1, 2]
    c = report["coupling"]
    for key in ("fai_after_waad", "fai_after_delta"):
        assert 0 <= c[key]["observed"] <= 1 and 0 < c[key]["p_value"] <= 1
        assert c[key]["target_peaks"] > 0 and c["bins"] == 4 and c["pool"] == 8
        assert c[key]["p_value"] == c[key]["cross"]["p_value"]          # the verdict null
        assert c[key]["verdict_null"] == "cross"
    for d in c["anchors_after_preplan_by"].values():
        assert d["excess"] <= 1 and len(d["excess_ci"]) == 2 and "ratio" in d
    assert set(c["anchors_after_preplan_by"]) == {"delta", "waad"}
    assert [r["layer"] for r in c["per_layer"]] == [0, 1, 2, 3]
    assert all(0 < r["waad"]["p_max_layers"] <= 1 for r in c["per_layer"])
    heads = report["heads"]
    assert len(heads["span"]) == 4 and len(heads["span"][0]) == 4
    assert 0 <= heads["stability"]["local_overlap"] <= 1
    qk = report["qk"]
    assert len(qk["within"]["auc"]) == 4 and len(qk["across"]["auc"]) == 4
    assert qk["within"]["mixed_problems"] == 8 and len(qk["held_out"]["selected"]) == 2
    assert not qk["held_out"]["measurable"]               # 4 held-out problems with both
    assert set(qk["held_out"]["baselines"]) == {"logprob", "length"}
    assert set(qk["baselines"]) == {"logprob", "length"}
    assert report["qk_premise"]["anchors"]["target_peaks"] > 0
    r = report["receivers"]
    assert r["measurable"] and r["responses"] == 12 and len(r["top_heads"]) == 16
    assert r["claim"]["measurable"] and len(r["excess_kurtosis"]) == 4
    assert {e["correct"] for e in report["examples"]} == {True, False}
    for name in ("report.html", "coupling.png", "heads.png", "outcome.png", "qk_auc.png",
                 "receivers.png"):
        assert (out / name).stat().st_size > 1000, name
    html = (out / "report.html").read_text()
    assert "<img src='qk_auc.png'" in html and "FAI peaks follow WAAD peaks" in html
    printed = capsys.readouterr().out
    assert "FAI peaks follow WAAD peaks" in printed and "QK heads within problems" in printed
    assert "excess" in printed and "not measurable at this size" in printed
    assert "positional profile" in printed


def test_analyze_samples_a_task_with_the_hf_engine(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["analyze", "--model", str(tiny_model_dir), "--task", "chain_sum", "-n", "3",
               "--samples", "2", "--engine", "hf", "--max-tokens", "24", "--temperature", "1",
               "--permutations", "200", "--bootstrap", "50", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["problems"] == 3 and report["responses"] == 6 and report["reward"] == "gym"
    assert (out / "report.html").is_file()
    printed = capsys.readouterr().out
    assert "FAI peaks follow" in printed
    # 24-token responses: far below 14 sentences
    assert not report["receivers"]["measurable"]
    assert "Receiver heads: not measurable at this length" in printed
    # the sampled responses are kept and read back by --responses
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["group"] for r in rows} == {0, 1, 2}
    again = tmp_path / "again"
    rc = main(["analyze", "--model", str(tiny_model_dir), "--responses",
               str(out / "samples.jsonl"), "--permutations", "200", "--bootstrap", "50",
               "--out", str(again)])
    assert rc == 0
    report2 = json.loads((again / "report.json").read_text())
    assert report2["responses"] == 6 and report2["problems"] == 3
    assert report2["correct"] == report["correct"]


@pytest.mark.parametrize("argv,message", [
    (["--task", "chain_sum", "--responses", "x.jsonl"], "exactly one of"),
    ([], "exactly one of"),
    (["--responses", "/no/such.jsonl"], "does not exist"),
    (["--task", "chain_sum", "--samples", "0"], "--samples must be >= 1"),
    (["--task", "chain_sum", "--peak-fraction", "1.5"], "--peak-fraction"),
    (["--task", "chain_sum", "--pair-pool", "1"], "--pair-pool must be >= 2"),
    (["--task", "chain_summ"], "did you mean 'chain_sum'"),
    (["--task", "chain_sum", "--layers", "1,9"], "out of range"),
])
def test_bad_input_exits_2_with_one_line(argv, message, tiny_model_dir, tmp_path, capsys):
    rc = main(["analyze", "--model", str(tiny_model_dir), *argv, "--engine", "hf",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "report.json").exists()


def test_bad_responses_line_exits_2(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "x", "response": "y"}) + "\n")
    rc = main(["analyze", "--model", str(tiny_model_dir), "--responses", str(data),
               "--out", str(tmp_path / "out")])
    assert rc == 2 and "no label" in capsys.readouterr().err


def test_analysis_imports_neither_trainers_nor_trl():
    """Layering: the analyze command and everything it imports stay in the framework-free
    core (no trainers/, no TRL)."""
    import subprocess
    import sys

    code = ("import sys, attnrl.cli, attnrl.analysis.cli as c, attnrl.analysis.collect, "
            "attnrl.analysis.forward, attnrl.analysis.report, attnrl.analysis.report_data, "
            "attnrl.rollout.hf, rewards\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('trl', 'trainers')]\n"
            "print(bad)\nassert 'analyze' in attnrl.cli.SUBCOMMANDS and not bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
