"""`attnrl signals` run in-process on a saved tiny model: files, values, marks, errors."""

import json
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image

from attnrl.cli import main
from attnrl.models import load_model, load_tokenizer
from attnrl.signals import compute_token_signals
from attnrl.signals.types import SignalConfig

QUESTION = "What is 3 + 4?"
RESPONSE = ("First 3 plus 4 equals 7. Then check: 7 minus 4 equals 3. So the sum is 7.\n"
            "The answer is 7. #### 7")
SIGNAL_ARGS = ["--layers", "1,2", "--h-lo", "2", "--h-hi", "8", "--window", "4", "--q", "0.3"]
CONFIG = SignalConfig(layers=[1, 2], h_lo=2, h_hi=8, window=4, q=0.3)


class _Spans(HTMLParser):
    """Token spans (with data-index) of each view div: {view: [(index, classes, text)]}."""

    def __init__(self):
        super().__init__()
        self.views, self.view, self.open = {}, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and attrs.get("id", "").startswith("view-"):
            self.view = attrs["id"][5:]
            self.views[self.view] = []
        elif tag == "span" and "data-index" in attrs and self.view:
            self.open = [int(attrs["data-index"]), set(attrs["class"].split()), "",
                         attrs.get("title", "")]

    def handle_data(self, data):
        if self.open is not None:
            self.open[2] += data

    def handle_endtag(self, tag):
        if tag == "span" and self.open is not None:
            self.views[self.view].append(tuple(self.open))
            self.open = None
        elif tag == "div":
            self.view = None


@pytest.fixture(scope="module")
def given_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("signals_given")
    rc = main(["signals", "--model", str(tiny_model_dir), "--prompt", QUESTION,
               "--response", RESPONSE, "--out", str(out), *SIGNAL_ARGS])
    assert rc == 0
    return out


def test_writes_png_json_html(given_run):
    for name in ("signals.png", "signals.json", "signals.html"):
        assert (given_run / name).stat().st_size > 500
    with Image.open(given_run / "signals.png") as image:
        image.verify()
    with Image.open(given_run / "signals.png") as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width >= 1000 and 400 <= height <= 4000


def test_json_values_equal_compute_token_signals(given_run, tiny_model_dir):
    result = json.loads((given_run / "signals.json").read_text())
    tokenizer = load_tokenizer(tiny_model_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                           tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    assert result["prompt_ids"] == prompt_ids
    tokens = result["tokens"]
    assert [t["id"] for t in tokens] == response_ids
    assert "".join(t["text"] for t in tokens) == RESPONSE
    assert [t["position"] for t in tokens] == list(range(len(prompt_ids), len(prompt_ids) +
                                                         len(response_ids)))
    ids = torch.tensor([prompt_ids + response_ids])
    response_mask = torch.zeros_like(ids, dtype=torch.bool)
    response_mask[0, len(prompt_ids):] = True
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        expect = compute_token_signals(model, ids, torch.ones_like(ids), response_mask,
                                       config=CONFIG)
    positions = [t["position"] for t in tokens]
    for key, field in [("waad", "waad"), ("fai", "fai"), ("delta", "delta")]:
        got = torch.tensor([t[key] for t in tokens], dtype=torch.float64)
        torch.testing.assert_close(got, getattr(expect, field)[0, positions].double(),
                                   rtol=1e-5, atol=1e-7)
    for key, field in [("fai_valid", "fai_valid"), ("preplan", "preplan_mask"),
                       ("anchor", "anchor_mask"), ("dominated", "dominated_mask"),
                       ("intro", "intro_mask")]:
        assert [t[key] for t in tokens] == getattr(expect, field)[0, positions].tolist()
    assert result["layers"] == [1, 2] == list(expect.layers)
    assert result["config"]["h_hi"] == 8 and result["config"]["window"] == 4
    n = len(tokens)
    assert sum(t["anchor"] for t in tokens) >= 1 and sum(t["preplan"] for t in tokens) >= 1
    assert sum(t["preplan"] for t in tokens) == int(torch.tensor(0.3 * n).ceil())


def test_html_marks_exactly_the_json_tokens(given_run):
    result = json.loads((given_run / "signals.json").read_text())
    tokens = result["tokens"]
    parser = _Spans()
    parser.feed((given_run / "signals.html").read_text(encoding="utf-8"))
    assert set(parser.views) == {"waad", "fai"}
    for spans in parser.views.values():
        assert [s[0] for s in spans] == [t["index"] for t in tokens]
        assert "".join(s[2] for s in spans) == RESPONSE
        assert {s[0] for s in spans if "anchor" in s[1]} == \
            {t["index"] for t in tokens if t["anchor"]}
        assert {s[0] for s in spans if "preplan" in s[1]} == \
            {t["index"] for t in tokens if t["preplan"]}
        for (index, _, _, title), token in zip(spans, tokens):
            assert f"WAAD {token['waad']:.4g}" in title


def test_generated_response_is_greedy_generate(tiny_model_dir, tmp_path):
    rc = main(["signals", "--model", str(tiny_model_dir), "--prompt", QUESTION,
               "--max-tokens", "12", "--out", str(tmp_path), *SIGNAL_ARGS])
    assert rc == 0
    result = json.loads((tmp_path / "signals.json").read_text())
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    ids = torch.tensor([result["prompt_ids"]])
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   do_sample=False, max_new_tokens=12,
                                   pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
    generated = generated.tolist()
    if tokenizer.eos_token_id in generated:
        generated = generated[:generated.index(tokenizer.eos_token_id) + 1]
    assert [t["id"] for t in result["tokens"]] == generated


@pytest.mark.parametrize("argv,message", [
    (["--model", "/no/such/model", "--prompt", "x", "--response", "y"], "not found"),
    (["--task", "chain_summ", "--response", "y"], "did you mean 'chain_sum'"),
    (["--prompt", "x", "--task", "chain_sum", "--response", "y"], "not both"),
    (["--response", "y"], "give --prompt TEXT, --task NAME"),
    (["--prompt", "x", "--response", "y", "--credit", "qk_tokens"], "needs the QK heads"),
    (["--prompt", "x", "--response", "y", "--credit", "copuled"], "did you mean 'coupled'"),
    (["--prompt", "x", "--response", "y", "--h-hi", "soon"], "--h-hi"),
    (["--prompt", "x", "--response", "y", "--layers", "1,9"], "out of range"),
    (["--prompt", "x", "--response", "y", "--layers", "a,b"], "--layers"),
])
def test_bad_input_exits_2_with_a_message(argv, message, tiny_model_dir, tmp_path, capsys):
    if "--model" not in argv:
        argv = ["--model", str(tiny_model_dir), *argv]
    rc = main(["signals", *argv, "--out", str(tmp_path / "out")])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "signals.png").exists()


def test_index_past_the_end_of_a_jsonl_task(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "two.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n" +
                    json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    rc = main(["signals", "--model", str(tiny_model_dir), "--task", str(data), "--index", "5",
               "--response", "4", "--out", str(tmp_path / "out")])
    assert rc == 2 and "past the end" in capsys.readouterr().err
    rc = main(["signals", "--model", str(tiny_model_dir), "--task", str(data), "--index", "1",
               "--response", "2 plus 2 is 4. #### 4", "--out", str(tmp_path / "ok"),
               *SIGNAL_ARGS])
    assert rc == 0
    assert json.loads((tmp_path / "ok" / "signals.json").read_text())["question"] == "2+2?"


@pytest.mark.slow
def test_smollm2_task_generated(tmp_path):
    rc = main(["signals", "--model", "smollm2", "--task", "chain_sum", "--index", "0",
               "--max-tokens", "48", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "signals.json").read_text())
    assert result["layers"] == SignalConfig().resolve_layers(30)
    assert 1 <= len(result["tokens"]) <= 48
    assert any(t["anchor"] for t in result["tokens"])


def test_peaks_are_the_strongest_tokens_of_each_set(given_run):
    """Thick marks only on the top 10% of a response's tokens (by Delta for preplan, by FAI
    among tokens with a window for anchors), each inside its top-q set; HTML classes agree."""
    import math

    tokens = json.loads((given_run / "signals.json").read_text())["tokens"]
    n = len(tokens)
    by_delta = sorted(range(n), key=lambda i: (-tokens[i]["delta"], i))[:math.ceil(0.1 * n)]
    assert {i for i in range(n) if tokens[i]["preplan_peak"]} == set(by_delta)
    valid = [i for i in range(n) if tokens[i]["fai_valid"]]
    by_fai = sorted(valid, key=lambda i: (-tokens[i]["fai"], i))[:math.ceil(0.1 * len(valid))]
    assert {i for i in range(n) if tokens[i]["anchor_peak"]} == set(by_fai)
    for t in tokens:
        assert t["preplan"] or not t["preplan_peak"]
        assert t["anchor"] or not t["anchor_peak"]
    assert sum(t["preplan_peak"] for t in tokens) < sum(t["preplan"] for t in tokens)
    parser = _Spans()
    parser.feed((given_run / "signals.html").read_text(encoding="utf-8"))
    for spans in parser.views.values():
        assert {s[0] for s in spans if "preplan-peak" in s[1]} == set(by_delta)
        assert {s[0] for s in spans if "anchor-peak" in s[1]} == set(by_fai)


def test_gold_answer_and_correctness_are_shown(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    for response, correct in (("2 plus 2 is 4. #### 4", True), ("It is 5. #### 5", False)):
        out = tmp_path / str(correct)
        rc = main(["signals", "--model", str(tiny_model_dir), "--task", str(data), "--index",
                   "0", "--response", response, "--out", str(out), *SIGNAL_ARGS])
        assert rc == 0
        result = json.loads((out / "signals.json").read_text())
        assert result["gold"] == "4" and result["correct"] is correct
        verdict = "CORRECT" if correct else "INCORRECT"
        assert f"gold answer: 4 | response: {verdict}" in capsys.readouterr().out
        assert f"response: {verdict}" in (out / "signals.html").read_text(encoding="utf-8")
    result = json.loads((tmp_path / "True" / "signals.json").read_text())
    rc = main(["signals", "--model", str(tiny_model_dir), "--prompt", QUESTION, "--response",
               RESPONSE, "--out", str(tmp_path / "nogold"), *SIGNAL_ARGS])
    assert rc == 0
    result = json.loads((tmp_path / "nogold" / "signals.json").read_text())
    assert result["gold"] is None and result["correct"] is None


@pytest.mark.parametrize("strategy, advantage", [("coupled", None), ("entropy", "-2")])
def test_credit_is_the_strategys_gamma_times_the_outcome(strategy, advantage, tiny_model_dir,
                                                         tmp_path):
    """--credit: gamma of the strategy from the response's own signals (and, for entropy, the
    entropy of the distribution each token was drawn from), A_t = gamma_t A_i with A_i = +1
    for an ungraded response unless --advantage; credit.html shows every token."""
    from attnrl.credit import CreditConfig, compute_gamma

    extra = [] if advantage is None else ["--advantage", advantage]
    rc = main(["signals", "--model", str(tiny_model_dir), "--prompt", QUESTION, "--response",
               RESPONSE, "--out", str(tmp_path), "--credit", strategy, *SIGNAL_ARGS, *extra])
    assert rc == 0
    result = json.loads((tmp_path / "signals.json").read_text())
    tokens, credit = result["tokens"], result["credit"]
    outcome = 1.0 if advantage is None else float(advantage)
    assert credit["strategy"] == strategy and credit["outcome_advantage"] == outcome
    ids = torch.tensor([result["prompt_ids"] + [t["id"] for t in tokens]])
    response_mask = torch.zeros_like(ids, dtype=torch.bool)
    response_mask[0, len(result["prompt_ids"]):] = True
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        signals = compute_token_signals(model, ids, torch.ones_like(ids), response_mask,
                                        config=CONFIG)
        logits = model(input_ids=ids).logits.float()
    entropy = torch.zeros(ids.shape)
    probs = torch.softmax(logits, -1)
    entropy[0, 1:] = -(probs * torch.log_softmax(logits, -1)).sum(-1)[0, :-1]
    gamma = compute_gamma(CreditConfig(strategy=strategy, signals=CONFIG), signals,
                          response_mask, entropy=entropy)[0, response_mask[0]]
    torch.testing.assert_close(torch.tensor(credit["gamma"]), gamma, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(credit["advantage"]), gamma * outcome, atol=1e-6,
                               rtol=0)
    assert (gamma != 1).any(), "no token credited: the check would be vacuous"
    page = (tmp_path / "credit.html").read_text()
    assert page.count("<span title='token ") == len(tokens)


def test_config_run_gives_model_task_signals_and_credit(tiny_model_dir, tmp_path):
    """--config RUN without final/: the run's base model, its task (held-out seed), its
    signal settings and its credit strategy; a flag still overrides."""
    import yaml

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "task": "chain_sum", "task_seed": 3,
        "task_kwargs": {"min_terms": 2, "max_terms": 2}, "output_dir": str(run),
        "signal_layers": [1, 2], "signal_h_lo": 2, "signal_h_hi": None, "signal_window": 4,
        "signal_q": 0.3, "credit": "global_anchor", "coupled_k": 2}))
    rc = main(["signals", "--config", str(run), "--response", RESPONSE, "--q", "0.25",
               "--out", str(tmp_path / "out")])
    assert rc == 0
    result = json.loads((tmp_path / "out" / "signals.json").read_text())
    assert result["model"] == str(tiny_model_dir)
    assert result["config"]["layers"] == [1, 2] and result["config"]["h_hi"] is None
    assert result["config"]["window"] == 4 and result["config"]["q"] == 0.25
    assert result["config"]["k"] == 2  # the run's coupled_k, kept
    assert result["credit"]["strategy"] == "global_anchor"
    assert "arithmetic problem" in result["question"]  # the run's task, chain_sum
    assert (tmp_path / "out" / "credit.html").exists()
