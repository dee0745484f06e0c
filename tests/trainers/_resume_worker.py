"""Runs a tiny training job; with STOP_AT=N the process dies (os._exit, no cleanup) right
after the checkpoint of step N is written, as a crash between steps would."""

import json
import os
import sys

from transformers import TrainerCallback

from trainers.cli import run_job
from trainers.job import load_config


class DieAfterSave(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os._exit(17)


if __name__ == "__main__":
    config = load_config(None, json.loads(sys.argv[1]))
    stop = int(os.environ.get("STOP_AT", "0"))
    run_job(config, callbacks=[DieAfterSave(stop)] if stop else None)
