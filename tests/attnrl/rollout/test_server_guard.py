"""The rollout server's guard (attnrl.rollout.server_guard) and the reading of the
server's arguments (attnrl.rollout.server_args) with vLLM's own parser, without a server:
a real Starlette app behind the real guard, requests through Starlette's test client."""

import pytest

from attnrl.errors import UserError
from attnrl.rollout.server_args import check_server_args, parse_server_args
from attnrl.rollout.server_guard import INFO_PATH, KEY_ENV, WEIGHTS_DIR_ENV, server_logprobs_mode

GUARD = "attnrl.rollout.server_guard.ServerGuard"


def base_args(model):
    return ["--model", str(model), "--host", "127.0.0.1", "--port", "8000",
            "--logprobs-mode", "processed_logprobs", "--middleware", GUARD]


def test_last_value_wins_as_in_vllm(tiny_model_dir):
    argv = base_args(tiny_model_dir) + ["--logprobs-mode", "raw_logprobs", "--host",
                                        "0.0.0.0", "--port=9001"]
    assert server_logprobs_mode(["api_server.py", *argv]) == "raw_logprobs"
    parsed = parse_server_args(argv)
    assert (parsed.host, parsed.port, parsed.logprobs_mode) == ("0.0.0.0", 9001,
                                                                "raw_logprobs")
    with pytest.raises(UserError, match="--logprobs-mode raw_logprobs.*processed_logprobs"):
        check_server_args(argv, model=tiny_model_dir)
    assert server_logprobs_mode(["api_server.py"]) == "raw_logprobs"  # vLLM's default


def test_check_server_args_refuses_bypasses(tiny_model_dir, tmp_path):
    ok = check_server_args(base_args(tiny_model_dir) + ["--max-num-seqs", "4"],
                           model=tiny_model_dir)
    assert (ok.host, ok.port) == ("127.0.0.1", 8000)
    argv = [a for a in base_args(tiny_model_dir) if a != GUARD and a != "--middleware"]
    with pytest.raises(UserError, match="ServerGuard"):
        check_server_args(argv, model=tiny_model_dir)
    with pytest.raises(UserError, match="--model"):
        check_server_args(base_args(tiny_model_dir) + ["--model", str(tmp_path)],
                          model=tiny_model_dir)
    with pytest.raises(UserError, match="--uds"):
        check_server_args(base_args(tiny_model_dir) + ["--uds", str(tmp_path / "s")],
                          model=tiny_model_dir)
    with pytest.raises(UserError, match="vLLM's parser"):
        check_server_args(base_args(tiny_model_dir) + ["--no-such-flag"],
                          model=tiny_model_dir)


def guarded_app(monkeypatch, tmp_path, args, key="k-1"):
    from fastapi import FastAPI

    from attnrl.rollout.server_guard import ServerGuard

    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    if key is None:
        monkeypatch.delenv(KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(KEY_ENV, key)
    app = FastAPI()
    app.state.args = args
    app.add_middleware(ServerGuard)
    return app


def test_guard_needs_a_key_and_reports_the_servers_effective_settings(
        monkeypatch, tmp_path, tiny_model_dir):
    from starlette.testclient import TestClient

    with pytest.raises(RuntimeError, match=KEY_ENV), \
            TestClient(guarded_app(monkeypatch, tmp_path, None, key=None)) as client:
        client.get("/health")
    # the settings the server parsed (app.state.args, vLLM's parser), not this argv
    args = parse_server_args(base_args(tiny_model_dir) + ["--logprobs-mode", "raw_logprobs"])
    monkeypatch.setattr("sys.argv", ["api_server.py", *base_args(tiny_model_dir)])
    with TestClient(guarded_app(monkeypatch, tmp_path, args)) as client:
        assert client.get(INFO_PATH).status_code == 401
        info = client.get(INFO_PATH, headers={"Authorization": "Bearer k-1"}).json()
    assert info["logprobs_mode"] == "raw_logprobs"
    assert info["weights_dir"] == str(tmp_path.resolve())
