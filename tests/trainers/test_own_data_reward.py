"""A job on your own data with your own reward: task_size above the data is refused before
anything loads, the prompt-length cap drops and counts, a plug-in's source file is recorded
with its sha256 and a changed file refuses to resume, and a plug-in goes through NSR's
binary-reward rule (one tiny-model run)."""

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from attnrl.errors import UserError
from trainers import preflight, run_dir
from trainers.job import build_dataset, build_rewards, load_config
from trainers.schema import check_config, resolve

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
PLUGIN = '''
def half(prompts, completions, answer, **kwargs):
    """0.5 for every completion: not binary."""
    return [0.5 for _ in completions]


def scaled(completions, scale=1.0, **kwargs):
    return [scale for _ in completions]
'''


def write_data(path: Path, count: int, long_every: int = 0) -> Path:
    rows = [{"problem": f"What is {i} + {i}?" + (" Think it through, step by step." * 12
                                                    if long_every and i % long_every == 0
                                                    else ""), "solution": str(2 * i)}
            for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def job(tmp_path, **overrides) -> dict:
    if not (tmp_path / "plugin.py").exists():
        (tmp_path / "plugin.py").write_text(PLUGIN)
    data = write_data(tmp_path / "qa.jsonl", 5)
    config = {"task": str(data), "task_kwargs": None, "task_size": 5, "model": "smollm2",
              "question_field": "problem", "answer_field": "solution",
              "rewards": {f"{tmp_path}/plugin.py:half": 1.0}, "reward_options": None,
              "output_dir": str(tmp_path / "run"), "eval_size": 0, **overrides}
    return resolve(load_config(TINY, config))


def test_task_size_above_the_data_is_refused_before_anything_loads(tmp_path):
    preflight.check_job(job(tmp_path))  # 5 prompts, task_size 5: fine
    with pytest.raises(UserError, match=r"task_size 100: .*qa.jsonl holds 5 prompts; set "
                                        r"task_size to at most 5"):
        preflight.check_job(job(tmp_path, task_size=100))
    with pytest.raises(UserError, match=r"reward '.*plugin.py:scaled' has no option 'scal' "
                                        r"\(did you mean 'scale'\?\)"):
        preflight.check_job(job(tmp_path, rewards={f"{tmp_path}/plugin.py:scaled": 1.0},
                                reward_options={f"{tmp_path}/plugin.py:scaled": {"scal": 2}}))
    assert not (tmp_path / "run").exists()


def test_prompt_cap_drops_and_counts(tmp_path, tiny_tokenizer):
    data = write_data(tmp_path / "long.jsonl", 9, long_every=3)  # rows 0, 3, 6 are long
    config = resolve(check_config({"task": str(data), "task_size": 9, "question_field":
                                   "problem", "answer_field": "solution",
                                   "max_prompt_length": 60}))
    report = {}
    dataset = build_dataset(config, tiny_tokenizer, report)
    assert len(dataset) == 6 and report["dropped_long"] == 3 and report["prompts"] == 9
    assert report["longest_tokens"] > 60 and report["max_prompt_length"] == 60
    assert all("step by step" not in row["prompt"][-1]["content"] for row in dataset)
    assert dataset[0]["answer"] == "2"  # row 1: the field mapping's solution
    uncapped = {}
    assert len(build_dataset({**config, "max_prompt_length": None}, tiny_tokenizer,
                             uncapped)) == 9
    assert uncapped["dropped_long"] == 0
    with pytest.raises(UserError, match=r"max_prompt_length 5: all 9 prompts are longer \(the "
                                        r"shortest has \d+ tokens\)"):
        build_dataset({**config, "max_prompt_length": 5}, tiny_tokenizer)


def test_a_changed_plugin_file_is_a_different_run(tmp_path):
    resolved = job(tmp_path)
    resolved["reward_plugins"] = preflight.reward_plugins(resolved)
    spec = f"{tmp_path}/plugin.py:half"
    assert resolved["reward_plugins"][spec]["file"] == str(tmp_path / "plugin.py")
    run_dir.write_config(resolved, resolved["output_dir"], command="attnrl train (test)")
    out = Path(resolved["output_dir"])
    (out / "checkpoint-1").mkdir()
    (out / "checkpoint-1" / "config.yaml").write_text((out / "config.yaml").read_text())
    (out / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1}')
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["reward_plugins"] == resolved["reward_plugins"]
    again = job(tmp_path, resume="auto")
    again["reward_plugins"] = preflight.reward_plugins(again)
    assert run_dir.prepare(again) == str(out / "checkpoint-1")  # the same file: resumes
    (tmp_path / "plugin.py").write_text(PLUGIN + "\n# edited\n")
    changed = job(tmp_path, resume="auto")
    changed["reward_plugins"] = preflight.reward_plugins(changed)
    with pytest.raises(UserError, match=r"reward plug-in changed: .*plugin.py sha256 \w{12} -> "
                                        r"\w{12}.*another output_dir"):
        run_dir.prepare(changed)


def test_plugin_reward_goes_through_nsr_binary_rule(tmp_path, tiny_model_dir, monkeypatch):
    """trainer nsr, a data file with mapped fields and a plug-in giving 0.5: the first step
    stops with the binary rule naming the plug-in (as for a registered reward) and leaves no
    run behind; the rerun with correctness_threshold trains and records the plug-in's
    sha256 and the data counts."""
    from trainers.cli import run_job

    config = load_config(TINY, {
        "task": str(write_data(tmp_path / "qa.jsonl", 8)), "task_kwargs": None, "task_size": 8,
        "question_field": "problem", "answer_field": "solution", "max_prompt_length": 512,
        "model": str(tiny_model_dir), "trainer": "nsr", "advantage_estimator": "nsr",
        "rewards": {"plugin.py:half": 1.0}, "reward_options": None,
        "output_dir": str(tmp_path / "run"), "max_steps": 1, "eval_size": 0})
    (tmp_path / "plugin.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)  # a plug-in file is relative to the working directory
    with pytest.raises(UserError, match=r"needs binary rewards .* from plugin.py:half "
                                        r"\(weight 1\); set correctness_threshold"):
        run_job(config)
    assert not (tmp_path / "run" / "config.yaml").exists()  # the failed start is not a run
    run_job({**config, "correctness_threshold": 1.0})
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    spec = f"{tmp_path}/plugin.py:half"
    assert saved["rewards"] == {spec: 1.0}
    assert saved["reward_plugins"] == {spec: {
        "file": str(tmp_path / "plugin.py"),
        "sha256": hashlib.sha256((tmp_path / "plugin.py").read_bytes()).hexdigest()}}
    assert saved["recorded"]["data"] == {"prompts": 8, "dropped_long": 0,
                                         "max_prompt_length": 512,
                                         "longest_tokens": saved["recorded"]["data"]
                                         ["longest_tokens"], "used": 8}
    funcs, weights = build_rewards(saved)
    assert [f.__name__ for f in funcs] == ["plugin.py:half"] and weights == [1.0]
