"""A stand-in for the vLLM server engine in tests of `rollout_lag` (trainers/rollout_lag.py):
the transformers engine on its own copy of the policy, generating each submitted batch in a
thread of its own after a delay, as the server does over HTTP. It is a fake only where a
server would make the test slow (starting one takes a minute per process); the real server
runs the same trainer code in tests/attnrl/rollout/test_server.py.

`events` records, in order, ("submit", version, seeds), ("collect", version) and ("push",)
(a push while a batch generates raises, as the server engine's does)."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from attnrl.rollout.hf import HFEngine


class DelayedServerEngine(HFEngine):
    def __init__(self, model, tokenizer, delay: float = 0.0, batch_size: int = 8):
        super().__init__(model, tokenizer, batch_size=batch_size)
        self.delay = delay
        self.events = []
        self.generated = []   # (weight version, seeds) of every generate call
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fake-server")
        self._lock = threading.Lock()

    def generate(self, prompts, sampling, progress=False, seeds=None):
        self.generated.append((self.weight_version, seeds))
        return super().generate(prompts, sampling, progress=progress, seeds=seeds)

    def submit(self, prompts, sampling, seeds=None):
        self.events.append(("submit", self.weight_version, seeds))
        super().submit(prompts, sampling, seeds=seeds)

    def _start(self, prompts, sampling, seeds):
        def later():
            time.sleep(self.delay)
            return self.generate(prompts, sampling, seeds=seeds)
        return self._pool.submit(later)

    def collect(self):
        groups, waited = super().collect()
        self.events.append(("collect", groups[0][0].extra["weight_version"]))
        return groups, waited

    def update_weights_stream(self, names, chunks):
        self.check_idle()
        self.events.append(("push",))
        super().update_weights_stream(names, chunks)

    def close(self):
        super().close()
        self._pool.shutdown(wait=True)
