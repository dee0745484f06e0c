"""The `attnrl` command line: bad input is one line on stderr and exit code 2."""

import subprocess
import sys

import pytest


def attnrl(*args):
    return subprocess.run([sys.executable, "-m", "attnrl.cli", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/no/such/model"], "model '/no/such/model' not found"),
    (["generate", "--model", "smollm2", "--task", "chain_summ", "--engine", "hf"],
     "did you mean 'chain_sum'"),
])
def test_generate_bad_input_exit_2(args, message):
    result = attnrl(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("attnrl ")]
    assert len(lines) == 1 and message in lines[0]


def test_generate_bad_jsonl_exit_2(tmp_path, tiny_model_dir):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "no question here"}\n')
    result = attnrl("generate", "--model", str(tiny_model_dir), "--task", str(bad),
                    "--engine", "hf")
    assert result.returncode == 2
    assert "p.jsonl:1: line has no 'question' field" in result.stderr


def test_generate_prints_samples_with_hf_engine(tiny_model_dir):
    result = attnrl("generate", "--model", str(tiny_model_dir), "--task", "chain_sum",
                    "--num-prompts", "2", "-n", "2", "--max-tokens", "8", "--engine", "hf")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- prompt") == 4
    assert "tok/s" in result.stdout
