"""`python -m trainers.ablation RUN_DIR`: the child process of one ablation run
(trainers/ablation/runs.py `worker`). A SIGINT/SIGTERM stop (the job saved a checkpoint and
printed how it stopped) exits with 128 + the signal's number, without a traceback."""

import sys
from pathlib import Path

from attnrl.errors import Interrupted
from trainers.ablation.runs import worker

try:
    worker(Path(sys.argv[1]))
except Interrupted as stop:
    if not stop.reported and stop.message:
        print(stop.message, file=sys.stderr, flush=True)
    sys.exit(stop.code)
