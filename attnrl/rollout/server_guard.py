"""Access control for the rollout server (launch/vllm_server.sh), as ASGI middleware that
vLLM's OpenAI-compatible server loads with `--middleware attnrl.rollout.server_guard.ServerGuard`.

Why: the weight-sync endpoints need `VLLM_SERVER_DEV_MODE=1`, which also opens
`/collective_rpc` (any worker method), sleep / pause / weight-transfer routes and reloads
from any path the server can read. vLLM's own `--api-key` guards only the `/v1`-style
routes, not these. The guard, configured from the environment at start-up:

- `ATTNRL_ROLLOUT_API_KEY` (secret, required: the guard refuses to start without it, on
  loopback too, where any local user could otherwise reload the weights): every request
  on every route (http and websocket, `/health` included) must carry
  `Authorization: Bearer KEY`; else HTTP 401.
- `ATTNRL_ROLLOUT_WEIGHTS_DIR` (required): the one directory weights may be loaded from.
  `/collective_rpc` is accepted only as `{"method": "reload_weights", "kwargs":
  {"weights_path": P}}` with P (symlinks resolved) inside that directory; anything else is
  HTTP 403. The other development / RL routes (sleep, pause, weight-transfer engines, ...)
  and runtime LoRA loading are HTTP 403; `/reset_prefix_cache` stays open (with the key).
- `GET /attnrl/rollout_guard` answers {"weights_dir": DIR, "dev_mode": bool,
  "logprobs_mode": MODE} so a trainer can check it talks to a guarded server, learn where
  to write its weights and which log-probs it returns. MODE is the server's effective
  setting: from the config vLLM built (app.state.vllm_config), else the arguments vLLM
  parsed (app.state.args), else the process's argv read with vLLM's parser (last wins).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys

KEY_ENV = "ATTNRL_ROLLOUT_API_KEY"
WEIGHTS_DIR_ENV = "ATTNRL_ROLLOUT_WEIGHTS_DIR"
INFO_PATH = "/attnrl/rollout_guard"
RPC_PATH = "/collective_rpc"
OPEN_DEV_PATHS = frozenset({"/reset_prefix_cache"})
"""Development routes the trainer needs besides /collective_rpc."""
ALWAYS_REFUSED = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
_MAX_RPC_BODY = 1 << 16


def development_paths() -> frozenset[str]:
    """Paths of the routes vLLM adds with VLLM_SERVER_DEV_MODE=1 (dev and RL routers)."""
    from fastapi import FastAPI
    from vllm.entrypoints.rl.factories import register_rl_api_routers
    from vllm.entrypoints.serve import register_vllm_dev_api_routers

    probe = FastAPI()
    register_vllm_dev_api_routers(probe)
    register_rl_api_routers(probe)
    return frozenset(getattr(route, "path", "") for route in probe.routes)


def server_logprobs_mode(argv: list[str]) -> str:
    """The `--logprobs-mode` of a server started with `argv` (program name first), as
    vLLM's parser reads it: the last one given, else vLLM's default (raw_logprobs)."""
    from attnrl.rollout.server_args import parse_server_args

    return str(parse_server_args(argv[1:]).logprobs_mode)


def effective_logprobs_mode(app, argv: list[str]) -> str:
    """The log-probs mode the running server uses: its engine config, else the arguments
    vLLM parsed at start-up, else `argv` read with vLLM's parser."""
    state = getattr(app, "state", None)
    config = getattr(state, "vllm_config", None)
    if config is not None:
        return str(config.model_config.logprobs_mode)
    args = getattr(state, "args", None)
    if args is not None:
        return str(args.logprobs_mode)
    return server_logprobs_mode(argv)


def inside(path: str, directory: str) -> bool:
    """Whether `path` (symlinks resolved) is `directory` or lies under it."""
    real = os.path.realpath(path)
    return os.path.commonpath([real, directory]) == directory


class ServerGuard:
    """ASGI middleware: API key on every route, weight reloads only from the fixed
    directory, other development routes refused. Configured from the environment."""

    def __init__(self, app):
        self.app = app
        key = os.environ.get(KEY_ENV, "")
        if not key:
            raise RuntimeError(f"{KEY_ENV} is not set: the rollout server needs a secret (on "
                               "loopback too); set it here and in the trainer's environment")
        self.key_digest = hashlib.sha256(key.encode()).digest()
        weights_dir = os.environ.get(WEIGHTS_DIR_ENV, "")
        if not weights_dir or not os.path.isdir(weights_dir):
            raise RuntimeError(f"{WEIGHTS_DIR_ENV} must name an existing directory (the one "
                               f"weights may be loaded from), got {weights_dir!r}")
        self.weights_dir = os.path.realpath(weights_dir)
        self.refused = (development_paths() - OPEN_DEV_PATHS - {RPC_PATH}) | ALWAYS_REFUSED

    def authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    digest = hashlib.sha256(token.strip().encode()).digest()
                    return hmac.compare_digest(digest, self.key_digest)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if not self.authorized(scope):
            return await _answer(scope, send, 401, "missing or wrong API key: send "
                                 f"'Authorization: Bearer KEY' (trainer: set {KEY_ENV})")
        if path in self.refused:
            return await _answer(scope, send, 403, f"{path} is disabled on this rollout server")
        if path == INFO_PATH:
            return await _answer(scope, send, 200, None, {
                "weights_dir": self.weights_dir,
                "dev_mode": os.environ.get("VLLM_SERVER_DEV_MODE", "0") == "1",
                "logprobs_mode": effective_logprobs_mode(scope.get("app"), sys.argv)})
        if path == RPC_PATH and scope["type"] == "http":
            body = await _read_body(receive)
            if body is None:
                return await _answer(scope, send, 413, "request body too large")
            why = self.rpc_refusal(body)
            if why:
                return await _answer(scope, send, 403, why)
            return await self.app(scope, _replay(body, receive), send)
        return await self.app(scope, receive, send)

    def rpc_refusal(self, body: bytes) -> str | None:
        """Why a /collective_rpc body is refused; None when it is an allowed reload."""
        try:
            request = json.loads(body or b"null")
        except ValueError:
            return "body is not JSON"
        if not isinstance(request, dict) or request.get("method") != "reload_weights":
            return "only reload_weights may be called through /collective_rpc"
        kwargs = request.get("kwargs") or {}
        if request.get("args") or not isinstance(kwargs, dict) or set(kwargs) != {"weights_path"}:
            return "reload_weights takes exactly one keyword argument, weights_path"
        weights_path = kwargs["weights_path"]
        if not isinstance(weights_path, str) or not inside(weights_path, self.weights_dir):
            return (f"weights_path {weights_path!r} is outside the weights directory this "
                    f"server was started with ({self.weights_dir})")
        return None


async def _read_body(receive) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_RPC_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(scope, send, status: int, error: str | None, content=None):
    if scope["type"] == "websocket":  # refuse the handshake
        return await send({"type": "websocket.close", "code": 1008})
    payload = json.dumps(content if error is None else {"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
