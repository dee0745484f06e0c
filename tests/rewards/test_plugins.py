"""Reward plug-ins (rewards/plugins.py): a function of the user's named 'module:function' or
'path/to/file.py:function', checked before the model loads (importable, callable, a
signature that takes a reward's call and its options), called as TRL calls a reward, its
source file's sha256 recorded."""

import asyncio
import hashlib
import json
import textwrap

import pytest

from attnrl.errors import UserError
from rewards import combine_rewards, get_reward
from rewards.plugins import (
    absolute,
    check_plugin,
    fingerprint,
    is_plugin,
    plugin_reward,
    spec_problem,
)

SOURCE = textwrap.dedent('''
    def contains_answer(prompts, completions, answer, **kwargs):
        """1 when the gold answer appears in the completion."""
        return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]

    def trl_style(completions, **kwargs):
        """TRL's own example shape: completions and **kwargs only."""
        kwargs["seen"].append(sorted(kwargs))
        return [float(len(c)) for c in completions]

    def named_only(completions, answer, scale=1.0):
        return [scale * (c == a) for c, a in zip(completions, answer)]

    def reads_entry(completions, entry, **kwargs):
        return [float(e["x"]) if e else 0.0 for e in entry]

    async def slow(completions, **kwargs):
        return [0.5] * len(completions)

    def no_completions(x):
        return []

    def needs_gold(completions, gold):
        return []

    def positional(prompts, completions, /, **kwargs):
        return []

    def returns_text(completions, **kwargs):
        return ["1.0"] * len(completions)

    def returns_short(completions, **kwargs):
        return [1.0]

    class Scorer:
        pass

    THRESHOLD = 0.5
''')


@pytest.fixture()
def plugin_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(SOURCE)
    return path


@pytest.fixture()
def plugin_module(tmp_path, monkeypatch):
    package = tmp_path / "pkgdir" / "myplugins"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "scoring.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path / "pkgdir"))
    return package / "scoring.py"


def test_specs_are_told_apart_from_registered_names_without_importing():
    assert is_plugin("my_module:my_reward") and is_plugin("dir/f.py:fn")
    assert not is_plugin("answer")
    assert spec_problem("pkg.mod:fn") is None and spec_problem("a/b.py:fn") is None
    assert "is not written 'module:function'" in spec_problem("pkg.mod:")
    assert "is no module name" in spec_problem("my-mod:fn")


def test_a_file_plugin_by_path_relative_to_the_working_directory(plugin_file, monkeypatch):
    monkeypatch.chdir(plugin_file.parent)
    spec = absolute("my_rewards.py:contains_answer")
    assert spec == f"{plugin_file}:contains_answer"
    assert absolute("my_module:fn") == "my_module:fn" and absolute("answer") == "answer"
    reward = get_reward(spec)
    assert reward.__name__ == "my_rewards.py:contains_answer"
    assert reward(["p", "p"], ["it is 42", "no"], answer=["42", "42"], task=["t", "t"],
                  trainer_state=None) == [1.0, 0.0]
    digest = hashlib.sha256(plugin_file.read_bytes()).hexdigest()
    assert fingerprint(spec) == {"file": str(plugin_file), "sha256": digest}


def test_a_module_plugin_and_its_source_file(plugin_module):
    reward = plugin_reward("myplugins.scoring:contains_answer")
    assert reward.__name__ == "myplugins.scoring:contains_answer"
    assert reward(["p"], ["42"], answer=["42"]) == [1.0]
    assert fingerprint("myplugins.scoring:contains_answer") == {
        "file": str(plugin_module), "sha256": hashlib.sha256(plugin_module.read_bytes())
        .hexdigest()}


def test_called_as_trl_calls_a_reward(plugin_file):
    """Keywords only: **kwargs receives every column; a function without it only the ones
    it names (and its options); entry_json arrives decoded as entry."""
    seen = []
    reward = plugin_reward(f"{plugin_file}:trl_style")
    assert reward(prompts=["p"], completions=["abc"], answer=["1"], entry_json=[""],
                  trainer_state=None, seen=seen) == [3.0]
    assert seen == [sorted(["prompts", "answer", "entry", "trainer_state", "seen"])]
    named = plugin_reward(f"{plugin_file}:named_only", {"scale": 2.0})
    assert named(["p", "p"], ["1", "2"], answer=["1", "1"], task=["t", "t"],
                 completion_ids=[[1], [2]], log_metric=print) == [2.0, 0.0]
    entry = plugin_reward(f"{plugin_file}:reads_entry")
    assert entry(["p", "p"], ["a", "b"], entry_json=[json.dumps({"x": 3}), ""]) == [3.0, 0.0]
    slow = plugin_reward(f"{plugin_file}:slow")
    assert asyncio.run(slow(["p"], ["a"])) == [0.5]
    combined = combine_rewards({f"{plugin_file}:named_only": 1.0, "format": 0.5},
                               {f"{plugin_file}:named_only": {"scale": 3.0}})
    assert combined(["p"], ["1 #### 1"], answer=["1 #### 1"]) == [3.5]


@pytest.mark.parametrize("function, message", [
    ("no_completions", ("takes neither completions nor \\*\\*kwargs; a reward is def f\\("
                        "prompts, completions, \\*\\*kwargs\\) -> list\\[float\\]")),
    ("needs_gold", "needs 'gold', which is neither a column a reward is given"),
    ("positional", "prompts, completions positional-only; TRL calls a reward with keyword"),
    ("THRESHOLD", "THRESHOLD is float 0.5, not a function"),
    ("Scorer", "Scorer is a class, not a function"),
    ("contains_answr", ("has no 'contains_answr' \\(did you mean 'contains_answer'\\?\\); "
                        "its functions: ")),
])
def test_refused_before_the_model_loads(plugin_file, function, message):
    with pytest.raises(UserError, match=message) as err:
        check_plugin(f"{plugin_file}:{function}")
    assert "\n" not in str(err.value)


def test_options_are_named_parameters_like_the_builtins(plugin_file):
    with pytest.raises(UserError, match=r"has no option 'scael' \(did you mean 'scale'\?\); "
                                        r"options \(its named parameters\): scale"):
        check_plugin(f"{plugin_file}:named_only", {"scael": 2})
    with pytest.raises(UserError, match="has no option 'scale'; options .*: none"):
        check_plugin(f"{plugin_file}:trl_style", {"scale": 2})  # **kwargs: still refused
    with pytest.raises(UserError, match="reward 'format' has no option 'scale'"):
        get_reward("format", scale=2)


def test_missing_module_file_and_failing_import(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"reward 'no_such_module_x:f': no module named "
                                        r"'no_such_module_x' .*path/to/file.py:f"):
        check_plugin("no_such_module_x:f")
    with pytest.raises(UserError, match=r"no file .*nofile.py \(a plug-in file is relative to "
                                        r"the working directory\)"):
        check_plugin(absolute("nofile.py:f"))
    (tmp_path / "broken.py").write_text("def f(completions\n")
    with pytest.raises(UserError, match=r"importing .*broken.py failed \(SyntaxError"):
        check_plugin(absolute("broken.py:f"))
    (tmp_path / "needs_dep.py").write_text("import no_such_dependency_y\n")
    with pytest.raises(UserError, match=r"importing needs_dep failed \(ModuleNotFoundError: No "
                                        r"module named 'no_such_dependency_y'\)"):
        check_plugin("needs_dep:f")   # found in the working directory, its import failed


def test_what_a_plugin_returns_is_checked(plugin_file):
    with pytest.raises(UserError, match=r"returned '1.0' \(str\); each value must be a number"):
        plugin_reward(f"{plugin_file}:returns_text")(["p"], ["a"])
    with pytest.raises(UserError, match="returned 1 values for 2 completions"):
        plugin_reward(f"{plugin_file}:returns_short")(["p", "p"], ["a", "b"])


def test_a_changed_file_is_a_new_module_and_a_new_hash(plugin_file):
    spec = f"{plugin_file}:contains_answer"
    before = fingerprint(spec)["sha256"]
    plugin_file.write_text(SOURCE.replace("1.0 if a in c else 0.0", "0.25"))
    assert fingerprint(spec)["sha256"] != before
    assert plugin_reward(spec)(["p"], ["42"], answer=["42"]) == [0.25]


def test_the_recipe_example_is_a_working_plugin(tmp_path, monkeypatch):
    """docs/recipes.md's ten-line example, checked and called as the trainer calls it."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "recipes.md").read_text()
    source = re.search(r"```python\n(.*?)```", text, re.DOTALL)[1]
    assert len([line for line in source.splitlines() if line.strip()]) <= 10
    (tmp_path / "my_rewards.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    reward = plugin_reward(absolute("my_rewards.py:short_and_right"), {"max_words": 5})
    completions = [[{"role": "assistant", "content": "so #### 7"}], "#### 8",
                   "far too many words here then #### 7"]
    assert reward(["p"] * 3, completions, answer=["7", "7", "7"], task=["t"] * 3,
                  entry_json=[""] * 3, trainer_state=None) == [1.0, 0.0, 0.0]
