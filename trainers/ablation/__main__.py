"""`python -m trainers.ablation RUN_DIR`: the child process of one ablation run
(trainers/ablation/runs.py `worker`)."""

import sys
from pathlib import Path

from trainers.ablation.runs import worker

worker(Path(sys.argv[1]))
