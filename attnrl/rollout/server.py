"""Rollout engine backed by a separate vLLM server process (launch/vllm_server.sh).

The server runs on its own GPUs (or CPU cores) and is reached over HTTP:

- generation: vLLM's OpenAI-compatible `POST /v1/completions`, one request per sample
  (n = 1, its own seed: attnrl.rollout.seeds; sent concurrently), prompt given as token
  ids, `logprobs: 0` (the sampled token's log-prob under the sampling distribution: the
  server runs with `--logprobs-mode processed_logprobs`, launch/vllm_server.sh) and vLLM's
  `return_token_ids` extension (the sampled token ids, so no re-tokenization of text ever
  happens);
- weight sync: the new weights are written as one safetensors file into a fresh
  sub-directory of the one directory the server accepts weights from (fixed when the
  server starts: launch/vllm_server.sh --weights-dir), then the server reloads them in
  place with `POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path":
  SUBDIR}}` and drops stale KV blocks with `POST /reset_prefix_cache`. Both endpoints
  exist only when the server runs with `VLLM_SERVER_DEV_MODE=1` behind attnrl's guard
  (attnrl.rollout.server_guard; launch/vllm_server.sh sets up both).
- access: with a secret set (`ATTNRL_ROLLOUT_API_KEY` in both environments, or `api_key`),
  every request carries `Authorization: Bearer KEY`.

With several trainer ranks, only the rank given `push_weights=True` writes and pushes;
every rank then waits at a torch.distributed barrier, so no rank samples from old weights.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from attnrl.errors import UserError
from attnrl.rollout.base import (
    Completion,
    RolloutEngine,
    SamplingConfig,
    check_stream_names,
    encode_prompts,
    sample_seeds,
)
from attnrl.rollout.seeds import SampleSeeds
from attnrl.rollout.server_guard import INFO_PATH, KEY_ENV


class ServerError(RuntimeError):
    """The server answered a request with an error; `status` is the HTTP code."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _request(url: str, payload: dict | None = None, timeout: float | None = None,
             method: str | None = None, api_key: str | None = None):
    """JSON in, JSON out (None for an empty body). Raises ServerError on HTTP errors and
    urllib.error.URLError when nothing answers."""
    data = None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"),
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:2000]
        raise ServerError(f"{req.get_method()} {url} -> HTTP {err.code}: {detail}",
                          status=err.code) from None
    return json.loads(body) if body.strip() else None


def _refused_key(url: str) -> UserError:
    return UserError(f"the vLLM server at {url} refused the API key (HTTP 401): set "
                     f"{KEY_ENV} to the secret the server was started with")


def wait_for_server(url: str, timeout: float, poll_s: float = 1.0,
                    api_key: str | None = None) -> float:
    """Poll `GET {url}/health` until it answers 200; seconds waited. UserError after
    `timeout` seconds naming the URL, the timeout and the last failure, or at once when
    the server refuses the API key."""
    start = time.monotonic()
    last = "no answer"
    while True:
        try:
            _request(f"{url}/health", timeout=max(poll_s, 1.0), api_key=api_key)
            return time.monotonic() - start
        except ServerError as err:
            if err.status == 401:
                raise _refused_key(url) from None
            last = str(err)
        except (urllib.error.URLError, OSError, ValueError) as err:
            last = str(getattr(err, "reason", err))
        if time.monotonic() - start >= timeout:
            raise UserError(
                f"no vLLM server answered at {url} within {timeout:g} s (GET {url}/health: "
                f"{last}); start one with `launch/vllm_server.sh --model MODEL --port PORT`, "
                "check rollout_server_url, or raise rollout_server_timeout")
        time.sleep(poll_s)


class VLLMServerEngine(RolloutEngine):
    """Generation from, and weight sync to, a running vLLM server.

    Args:
        model: local HF directory (or 'smollm2') of the policy: its tokenizer encodes text
            prompts; the server must serve the same architecture.
        url: server base URL, e.g. 'http://10.0.0.5:8000' (a trailing '/v1' is dropped).
        timeout: seconds to wait for the server to come up.
        weights_dir: the directory the server accepts weights from, as this process sees
            it (shared file system, or /dev/shm on one node); each push writes a fresh
            sub-directory there and removes it once the server has loaded it. None: the
            server's own (it tells it). A directory other than the server's is an error.
        push_weights: False on trainer ranks that only generate (one rank pushes).
        request_timeout: seconds one generation request may take (None: no limit).
        api_key: the server's secret; None: the environment variable ATTNRL_ROLLOUT_API_KEY
            (unset: no key sent).
    """

    def __init__(self, model, url: str | None, timeout: float = 300.0,
                 weights_dir: str | os.PathLike | None = None, push_weights: bool = True,
                 request_timeout: float | None = None, api_key: str | None = None):
        from attnrl.models import load_tokenizer, resolve_model

        if not url:
            raise UserError("rollout_engine 'vllm_server' needs the server's address: set "
                            "rollout_server_url (e.g. http://127.0.0.1:8000) and start the "
                            "server with launch/vllm_server.sh")
        url = str(url).rstrip("/")
        self.url = url.removesuffix("/v1")
        self.api_key = api_key if api_key is not None else os.environ.get(KEY_ENV) or None
        self.tokenizer = load_tokenizer(str(resolve_model(model)))
        self.push_weights = push_weights
        self.request_timeout = request_timeout
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None
        self._version = 0
        self.waited_s = wait_for_server(self.url, timeout, api_key=self.api_key)
        models = self._call("/v1/models", timeout=30)["data"]
        self.served_model = models[0]["id"]
        self.max_model_len = models[0].get("max_model_len")
        self._check_server(push_weights)

    def _call(self, path: str, payload: dict | None = None, timeout: float | None = None):
        try:
            return _request(f"{self.url}{path}", payload, timeout=timeout,
                            api_key=self.api_key)
        except ServerError as err:
            if err.status == 401:
                raise _refused_key(self.url) from None
            raise

    def _check_server(self, push_weights: bool) -> None:
        """The server runs behind attnrl's guard, returns log-probs of the sampling
        distribution, and (when this rank pushes weights) has the development endpoints on
        and accepts weights from `weights_dir` (taken from the server when None)."""
        try:
            info = self._call(INFO_PATH, timeout=30)
        except ServerError as err:
            if err.status == 404:
                raise UserError(
                    f"the vLLM server at {self.url} does not run behind attnrl's guard: "
                    "start it with launch/vllm_server.sh") from None
            raise
        mode = info.get("logprobs_mode")
        if mode != "processed_logprobs":
            raise UserError(
                f"the vLLM server at {self.url} runs with --logprobs-mode {mode}: its log-probs "
                "are not those of the sampling distribution the trainer corrects for; restart "
                "it with --logprobs-mode processed_logprobs (launch/vllm_server.sh sets it)")
        if not push_weights:
            return
        if not info.get("dev_mode"):
            raise UserError(f"the vLLM server at {self.url} has no weight-sync endpoints: "
                            "start it with VLLM_SERVER_DEV_MODE=1 (launch/vllm_server.sh does)")
        server_dir = info["weights_dir"]
        if self.weights_dir is None:
            self.weights_dir = Path(server_dir)
        elif os.path.realpath(self.weights_dir) != server_dir:
            raise UserError(
                f"rollout_server_weights_dir {str(self.weights_dir)!r} is not the directory "
                f"the server at {self.url} accepts weights from ({server_dir!r}, its "
                "--weights-dir): set rollout_server_weights_dir to it, or leave it unset")

    # ------------------------------------------------------------------ generation
    def generate(self, prompts, sampling: SamplingConfig, progress: bool = False,
                 seeds: SampleSeeds | None = None) -> list[list[Completion]]:
        from concurrent.futures import ThreadPoolExecutor

        ids = encode_prompts(self.tokenizer, prompts)
        if not ids:
            return []
        seeds = sample_seeds(sampling, len(ids), seeds)
        longest = max(map(len, ids)) + sampling.max_tokens
        if self.max_model_len and longest > self.max_model_len:
            raise UserError(f"prompt + completion need {longest} tokens but the server at "
                            f"{self.url} allows {self.max_model_len}: restart it with a larger "
                            "--max-model-len or lower max_completion_length")
        greedy = sampling.temperature == 0
        payload = {"model": self.served_model, "n": 1,
                   "max_tokens": sampling.max_tokens,
                   "temperature": 0.0 if greedy else sampling.temperature,
                   "top_p": 1.0 if greedy else sampling.top_p,
                   # explicit, so that a model's generation_config.json defaults (e.g. a
                   # top_k) never reshape the sampling distribution on the server
                   "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                   "presence_penalty": 0.0, "frequency_penalty": 0.0,
                   "logprobs": 0, "return_token_ids": True, "skip_special_tokens": True}

        def one(key):  # one sample: its own request, its own seed
            p, j = key
            request = {**payload, "prompt": ids[p]}
            if seeds is not None and not greedy:
                request["seed"] = seeds[p][j]
            choices = self._call("/v1/completions", request,
                                 timeout=self.request_timeout)["choices"]
            if len(choices) != 1:
                raise ServerError(f"asked {self.url} for 1 completion, got {len(choices)}")
            return choices[0]

        keys = [(p, j) for p in range(len(ids)) for j in range(sampling.n)]
        with ThreadPoolExecutor(max_workers=min(64, len(keys))) as pool:
            choices = list(pool.map(one, keys))
        results = []
        for p, prompt_ids in enumerate(ids):
            group = []
            for j in range(sampling.n):
                choice = choices[p * sampling.n + j]
                tokens = [int(t) for t in choice["token_ids"]]
                logprobs = [float(x) for x in choice["logprobs"]["token_logprobs"]]
                group.append(Completion(
                    prompt_index=p, sample_index=j, prompt_ids=prompt_ids, token_ids=tokens,
                    logprobs=logprobs, text=choice["text"],
                    finish_reason="stop" if choice["finish_reason"] == "stop" else "length"))
            results.append(group)
        return results

    _thread = None

    def _start(self, prompts, sampling, seeds):
        """The batch's requests sent from this engine's own thread: `submit` returns at once
        and the server generates while the trainer trains."""
        from concurrent.futures import ThreadPoolExecutor

        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")
        return self._thread.submit(self.generate, prompts, sampling, seeds=seeds)

    # ------------------------------------------------------------------ weight sync
    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Push (on the pushing rank), then barrier across trainer ranks."""
        self.check_idle()
        if self.push_weights:
            self._push(state_dict)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()

    def update_weights_stream(self, names, chunks) -> None:
        """Like `update_weights`, one chunk at a time: the pushing rank writes each chunk
        (copied to CPU) as its own safetensors shard of the new weights directory, and the
        server reloads the directory once all are written; the other ranks run the chunks
        through (under ZeRO-3 each is a collective)."""
        self.check_idle()
        if not self.push_weights:
            for _ in chunks:
                pass
        else:
            self._push_shards(names, chunks)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()

    def _push_shards(self, names, chunks) -> None:
        from safetensors.torch import save_file

        self._version += 1
        target = self.weights_dir / f"v{self._version:06d}-{os.getpid()}"
        target.mkdir(parents=True, exist_ok=True)
        seen = set()
        try:
            for index, chunk in enumerate(chunks):
                tensors = {}
                for name, tensor in chunk.items():
                    # its own storage: safetensors refuses shared (tied) ones
                    tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
                    seen.add(name)
                if tensors:  # vLLM's loader reads every *.safetensors of the directory
                    save_file(tensors, str(target / f"model-{index:05d}.safetensors"))
            check_stream_names(names, seen)
            self._call("/collective_rpc",
                       {"method": "reload_weights", "kwargs": {"weights_path": str(target)}},
                       timeout=self.request_timeout)
            self._reset_prefix_cache()
        finally:
            shutil.rmtree(target, ignore_errors=True)

    def _push(self, state_dict: dict[str, torch.Tensor]) -> None:
        """The whole state dict as one shard."""
        self._push_shards(list(state_dict), [state_dict])

    def _reset_prefix_cache(self, attempts: int = 20) -> None:
        for _ in range(attempts):  # refused while blocks are held by running requests
            answer = self._call("/reset_prefix_cache", {}, timeout=60)
            if answer is None or answer.get("success", True):
                return
            time.sleep(0.5)
        raise ServerError(f"{self.url} kept refusing to reset its prefix cache after a "
                          "weight update (requests still running?)")

    def close(self) -> None:
        """A batch in flight is waited for and dropped, and the request thread stopped
        (pushed sub-directories are removed after each push)."""
        super().close()
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
