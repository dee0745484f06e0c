"""`attnrl fidelity` end to end on a saved tiny model with the real vLLM and transformers
engines (records, summary, picture, table); bad input exits 2 with one line before torch,
vLLM or any model is imported."""

import json
import subprocess
import sys

import pytest

from attnrl.cli import main


def qa_file(path, count=24):
    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b)}
            for a in range(1, 9) for b in range(1, 4)][:count]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_fidelity_writes_records_summary_and_picture(engine, tiny_model_dir, tmp_path, capsys):
    task = qa_file(tmp_path / "qa.jsonl")
    out = tmp_path / "out"
    rc = main(["fidelity", "--model", str(tiny_model_dir), "--task", str(task), "-n", "4",
               "--samples", "2", "--max-chunks", "3", "--continuations", "4",
               "--max-tokens", "16", "--engine", engine, "--permutations", "20",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| strategy |" in printed and "mc_ceiling" in printed
    assert "forward 4/4 problems" in printed                      # the progress lines
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["problem"] for r in rows} == {0, 1, 2, 3}
    for row in rows:
        k = len(row["bounds"]) - 1
        assert 1 <= k <= 3 and row["bounds"][-1] == row["tokens"]
        assert len(row["values"]) == k + 1 and len(row["D"]) == k
        assert row["values"][-1] == float(row["correct"])
        assert all(t == 4 for t in row["trials"])
        assert row["strategies"]["uniform"]["gamma"] == [1.0] * row["tokens"]
        assert len(row["strategies"]["coupled"]["w"]) == k
        if not row["set_aside"]:
            assert row["strategies"]["uniform"]["S"] == pytest.approx(1.0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["responses"] == 8
    assert summary["kept"] + summary["set_aside_all_D_zero"] == 8
    assert summary["settings"]["continuations"] == 4 and summary["settings"]["engine"] == engine
    assert "sign_flip" not in summary["strategies"]
    assert (out / "fidelity.png").stat().st_size > 1000
    # the records hold everything the statistics need: a rebuild gives the same summary
    assert main(["fidelity", "--summary-only", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text()) == summary


@pytest.mark.parametrize("argv,message", [
    (["--strategies", "coupled,anchorz"], "unknown credit strategy 'anchorz'"),
    (["--strategies", "sign_flip"], "flips whole responses"),
    (["--max-chunks", "1"], "--max-chunks must be >= 2"),
    (["--continuations", "1"], "--continuations must be >= 2"),
    (["--temperature", "0"], "need temperature > 0"),
    (["--task", "no_such_task"], "no_such_task"),
])
def test_bad_input_exits_2_with_one_line_before_any_model(argv, message, tiny_model_dir,
                                                          tmp_path):
    code = ("import sys\nfrom attnrl.cli import main\n"
            f"rc = main({['fidelity', '--model', str(tiny_model_dir), *argv, '--out', str(tmp_path / 'o')]!r})\n"
            "heavy = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules]\n"
            "print('HEAVY', heavy)\nsys.exit(rc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "HEAVY []" in done.stdout
    assert not (tmp_path / "o").exists()


def test_summary_only_needs_a_finished_run(tmp_path, capsys):
    rc = main(["fidelity", "--summary-only", "--out", str(tmp_path)])
    assert rc == 2 and "holds no records.jsonl" in capsys.readouterr().err


def test_a_task_without_answers_is_refused(tiny_model_dir, tmp_path, capsys):
    task = tmp_path / "questions.jsonl"
    task.write_text(json.dumps({"question": "What is 2 + 2?"}) + "\n")
    rc = main(["fidelity", "--model", str(tiny_model_dir), "--task", str(task),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "answer" in err and len(err.strip().splitlines()) == 1, err


def test_a_softcapping_model_is_refused_for_attention_strategies(tmp_path, capsys):
    """Decided from config.json alone: its weight and tokenizer files are empty (nothing
    loads before the refusal)."""
    model = tmp_path / "gemma2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "gemma2", "num_hidden_layers": 4, "attn_logit_softcapping": 50.0}))
    (model / "model.safetensors").write_bytes(b"")
    (model / "tokenizer_config.json").write_text("{}")
    rc = main(["fidelity", "--model", str(model), "--strategies", "coupled,random",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "softcapped" in err and "--strategies random" in err, err


def test_the_runs_credit_keys_build_the_trainers_credit_config(tmp_path):
    """--config RUN: the credit fidelity measures is the one the run trains with (the
    trainer's AttnGRPOConfig.credit_config() of the same keys)."""
    from attnrl.fidelity.cli import CREDIT_KEYS
    from attnrl.fidelity.pipeline import credit_config
    from trainers.grpo import AttnGRPOConfig

    values = {"gamma_amp": 1.3, "credit_seed": 7, "signal_layers": [1, 2],
              "signal_head_quantile": 0.25, "signal_window": 6, "signal_h_lo": 3,
              "signal_h_hi": 40, "signal_q": 0.3, "preplan_by": "waad", "coupled_k": 2,
              "coupled_alpha": 0.4, "tau_waad": 1.5, "tau_delta": None, "qk_damp": 0.3}
    assert set(values) == set(CREDIT_KEYS)
    trainer = AttnGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                             **values).credit_config()
    ours = credit_config({CREDIT_KEYS[k]: v for k, v in values.items()})
    trainer.strategy = ours.strategy
    assert ours == trainer


def test_a_run_is_named_by_its_directory_or_its_config_yaml(tmp_path):
    """--config RUN and --config RUN/config.yaml both measure the run's final/ model; a
    config file elsewhere (configs/default.yaml) names no run."""
    from attnrl.fidelity.cli import _read_run

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("task: chain_sum\n")
    assert _read_run(str(run)) == ({"task": "chain_sum"}, run)
    assert _read_run(str(run / "config.yaml")) == ({"task": "chain_sum"}, run)
    (tmp_path / "plain.yaml").write_text("task: chain_sum\n")
    assert _read_run(str(tmp_path / "plain.yaml")) == ({"task": "chain_sum"}, None)
