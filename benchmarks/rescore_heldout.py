"""Re-score committed held-out records under the canonical-form rule, without rerunning.

Runs recorded before held-out problems were compared by canonical form
(attnrl/data/equivalence.py) kept operand-swapped twins of training problems (`b + a` when
`a + b` was trained) and equivalent repeats. This script reads each run's per-problem
records (heldout/problems.jsonl: question, correctness before and after) and its config's
training pool, and reports the greedy gain on all recorded problems, on the
equivalence-free ones (canonical form outside the pool's, first of each form kept) and on
the dropped ones, with the paired normal interval over problems of attnrl.evaluation.

    python benchmarks/rescore_heldout.py benchmarks/results/presets/nsr \
        benchmarks/results/presets/w_reinforce benchmarks/results/main_job
    -> table on stdout, benchmarks/results/rescored_heldout.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def records_of(rows: list[dict], config: dict) -> list:
    """The recorded problems regenerated with their task metadata (the held-out draw's own
    items, matched by question text), so canonical_form sees what the draw saw."""
    from attnrl.data import PromptRecord, iter_prompts, is_file_task
    from attnrl.data.unseen import normalize_question

    task, kwargs = config.get("task", "chain_sum"), dict(config.get("task_kwargs") or {})
    wanted = {normalize_question(r["question"]) for r in rows}
    found = {}
    if not is_file_task(task):
        seed = int(config.get("eval_seed") or int(config.get("task_seed") or 0) + 10_000)
        for record in iter_prompts(task, 20_000, seed, **kwargs):
            found.setdefault(normalize_question(record.question), record)
            if wanted <= set(found):
                break
    return [found.get(normalize_question(r["question"])) or
            PromptRecord(question=r["question"], answer=r["gold"], source=task, index=0)
            for r in rows]


def rescore(folder: Path) -> dict:
    import yaml

    from attnrl.data.equivalence import canonical_form
    from attnrl.data.unseen import TrainingPool
    from attnrl.evaluation import paired_interval

    rows = [json.loads(x) for x in (folder / "problems.jsonl").read_text().splitlines() if x]
    config = yaml.safe_load((folder / "config.yaml").read_text())
    _, pool_forms = TrainingPool.from_config(config).keys()
    kept, dropped, forms = [], [], set()
    for row, record in zip(rows, records_of(rows, config)):
        form = canonical_form(record)
        (dropped if form in pool_forms or form in forms else kept).append(row)
        forms.add(form)

    def part(subset):
        if not subset:
            return {"problems": 0}
        after = [r["correct_after"] for r in subset]
        before = [r["correct_before"] for r in subset]
        diff = paired_interval(after, before)
        return {"problems": len(subset), "before": sum(before) / len(subset),
                "after": sum(after) / len(subset), "gain": diff["mean"],
                "low": diff["low"], "high": diff["high"]}

    return {"run": str(folder.relative_to(ROOT)), "all": part(rows),
            "equivalence_free": part(kept), "dropped": part(dropped)}


def line(name: str, part: dict) -> str:
    if not part["problems"]:
        return f"| {name} | 0 | - | - |"
    return (f"| {name} | {part['problems']} | {100 * part['before']:.1f} -> "
            f"{100 * part['after']:.1f} | {100 * part['gain']:+.1f} [{100 * part['low']:+.1f}, "
            f"{100 * part['high']:+.1f}] |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", default=ROOT / "benchmarks/results/rescored_heldout.json")
    args = parser.parse_args()
    results = [rescore(folder.resolve()) for folder in args.runs]
    print("| run: problems | n | greedy % before -> after | gain, points [95% CI over "
          "problems] |\n| --- | --- | --- | --- |")
    for result in results:
        for name in ("all", "equivalence_free", "dropped"):
            print(line(f"{result['run']}: {name.replace('_', '-')}", result[name]))
    write_result(args.out, {"rule": "canonical form (attnrl/data/equivalence.py) outside the "
                                    "run's training pool, first of each form kept",
                            "runs": results})


if __name__ == "__main__":
    main()
