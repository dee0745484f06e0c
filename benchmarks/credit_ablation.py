"""Credit ablation: the same GRPO job under several credit strategies x seeds, with a
held-out learning curve per run (same task, task seed + 10000); writes summary.json,
table.md and credit_ablation.png and prints the table of paired differences to `uniform`
with 95% intervals over seeds. The logic lives in trainers/ablation/ (also
`attnrl ablate`).

    .venv/bin/python benchmarks/credit_ablation.py --budget cpu     # SmolLM2, 2 CPU cores
    .venv/bin/python benchmarks/credit_ablation.py --quick          # tiny model, seconds
    .venv/bin/python benchmarks/credit_ablation.py --budget medium  # GPU node

Re-running the same command skips finished runs and resumes a half-finished one.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    from attnrl.errors import UserError
    from trainers import ablation

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ablation.add_arguments(parser)
    parser.add_argument("--quick", action="store_true",
                        help="= --budget tiny --strategies uniform,coupled with a tiny model "
                             "built in the output directory when --model is not given")
    args = parser.parse_args(argv)
    try:
        if args.quick:
            args.budget = "tiny"
            if args.strategies == ",".join(ablation.DEFAULT_STRATEGIES):
                args.strategies = "uniform,coupled"
            args.out = args.out or str(REPO / "benchmarks/results/credit_ablation_quick")
            if args.model is None:
                from attnrl.models import save_tiny_model

                model_dir = Path(args.out) / "tiny_model"
                if not (model_dir / "config.json").exists():
                    save_tiny_model(model_dir)
                args.model = str(model_dir)
        return ablation.run(args)
    except UserError as err:
        print(f"credit_ablation: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
