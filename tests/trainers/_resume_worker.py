"""Runs a tiny training job; with STOP_AT=N the process dies (os._exit, no cleanup) right
after the checkpoint of step N is written, as a crash between steps would; with
KILL_IN_SAVE=N it is killed (SIGKILL) in the middle of the save of step N (model and
optimizer written, trainer_state.json not yet). CONFIG: the config file the overrides in
argv[1] apply to (default: configs/default.yaml)."""

import json
import os
import signal
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
    config = load_config(os.environ.get("CONFIG"), json.loads(sys.argv[1]))
    stop = int(os.environ.get("STOP_AT", "0"))
    kill = int(os.environ.get("KILL_IN_SAVE", "0"))
    if kill:
        from transformers import Trainer

        save_rng_state = Trainer._save_rng_state

        def killed_in_save(self, output_dir):
            if self.state.global_step == kill:
                os.kill(os.getpid(), signal.SIGKILL)
            save_rng_state(self, output_dir)

        Trainer._save_rng_state = killed_in_save
    run_job(config, callbacks=[DieAfterSave(stop)] if stop else None)
