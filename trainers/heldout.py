"""Held-out evaluation of a training job: the starting and the trained model (and a
reasoning-vector merge) on the same held-out problems, plus an optional greedy learning
curve during training.

The job keys of this feature are parsed in trainers/heldout_keys.py (declared in
trainers/schema_declarations.py); the evaluation itself is attnrl.evaluation's, run on the
trainer's own rollout engines (synced to the current weights) so no second engine starts:
each rank scores its share of the problems and rank 0 gathers them
(trainers/heldout_split.py), with the numbers one rank would get. Files, under
OUTPUT_DIR/heldout/:
    before.json, after.json   attnrl.evaluation result dicts (one model each), with the
                              draw's counts ('heldout') and every problem's greedy answer
    problems.jsonl            per problem: question, gold, greedy answer and correctness
                              before and after
    curve.jsonl               {"step", "greedy_accuracy"} per learning-curve point
    merged.json               the reasoning-vector merge's evaluation (if configured)
    summary.json              the before/after line, the paired interval, the settings

Held-out problems are never in the training pool (attnrl.data.unseen: compared by question
text, deduplicated); the draw happens before any model loads. The summary interval is a
normal interval on paired per-problem differences (greedy correctness after - before on each
held-out problem; mean +- 1.96 SE, attnrl.evaluation.paired_interval): it covers problem
sampling for this one run; training seeds spread more (see the ablation).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from transformers import TrainerCallback

from attnrl import quiet
from attnrl.atomic import write_json, write_text
from attnrl.errors import UserError
from trainers.heldout_keys import (  # noqa: F401  (re-exported)
    EVAL_TOP_P,
    HELDOUT_SEED_OFFSET,
    HeldoutSettings,
    VectorSettings,
    heldout_settings,
    validate,
    vector_settings,
)

# ---------------------------------------------------------------- evaluation on the engine

class HeldoutEvaluator:
    """Evaluates the trainer's current policy on the held-out problems through the
    trainer's rollout engine: every rank syncs its engine (ZeRO-3 gathers), scores its own
    share of the problems and hands it to rank 0 in one gather (trainers/heldout_split.py)."""

    def __init__(self, settings: HeldoutSettings, tokenizer, out_dir, engine_name: str,
                 draw=None):
        from attnrl.evaluation import format_prompts

        self.settings = settings
        self.dir = Path(out_dir) / "heldout"
        self.engine_name = engine_name
        self.draw = settings.draw() if draw is None else draw
        self.records, self.prompt_ids = format_prompts(
            self.draw.records, tokenizer, settings.instruction, settings.system_prompt)

    def header(self, samples: int) -> dict:
        from attnrl.evaluation import result_header

        s = self.settings
        return result_header(s.task, len(self.records), samples, s.temperature, EVAL_TOP_P,
                             s.max_tokens, self.engine_name, s.seed, 1.0,
                             reward="gym" if "entry" in self.records[0].metadata else "math")

    def run(self, trainer, label: str, samples: int) -> dict:
        """An evaluation result dict of the current weights ('models' holds one entry) on
        rank 0; the other ranks get the header only. Every rank must call it."""
        from attnrl.evaluation import sample_texts
        from trainers.heldout_split import gather_shares, merge_shares, score_share

        trainer.sync_engine_weights()
        result = self.header(samples)
        parts = gather_shares(score_share(trainer.engine, self.records, self.prompt_ids,
                                          samples, self.settings, EVAL_TOP_P))
        if parts is None:
            return result
        entry = merge_shares(parts, samples)
        texts = sample_texts(self.records, entry)
        entry.pop("_rows")
        entry.pop("_greedy_rows")
        result["models"].append({"model": label, "label": label, **entry,
                                 "step": trainer.state.global_step})
        result["heldout"] = self.draw.summary()
        result["samples"] = texts[:8]  # a few examples to read
        result["problems"] = [{"index": t["index"], "question": t["question"],
                               "gold": t["gold"], "greedy": t["greedy"]} for t in texts]
        return result


def _rank_zero_says(flag: bool) -> bool:
    """Rank 0's value of `flag` on every rank (a collective when a process group is up; one
    process: `flag`)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    box = [bool(flag)]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


class HeldoutCallback(TrainerCallback):
    """Before training (unless before.json exists from an earlier attempt), every
    `eval_every` steps (greedy only) and after training: evaluate and write the files."""

    def __init__(self, evaluator: HeldoutEvaluator):
        self.evaluator = evaluator
        self.trainer = None

    def bind(self, trainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        ev, s = self.evaluator, self.evaluator.settings
        ev.dir.mkdir(parents=True, exist_ok=True)
        curve = ev.dir / "curve.jsonl"
        if state.is_world_process_zero and curve.exists():  # a resumed run drops later points
            keep = [line for line in curve.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= state.global_step]
            curve.write_text("".join(line + "\n" for line in keep))
        # rank 0's view decides for every rank: a slower rank must not see the before.json
        # that rank 0 has just written and skip an evaluation whose sync is collective
        if s.before and state.global_step == 0 and \
                _rank_zero_says(not (ev.dir / "before.json").exists()):
            self._evaluate("before", s.samples)

    def on_step_end(self, args, state, control, **kwargs):
        s = self.evaluator.settings
        if s.every and state.global_step % s.every == 0 and state.global_step < state.max_steps:
            self._evaluate("curve", 0)

    def on_train_end(self, args, state, control, **kwargs):
        if self.evaluator.settings.after:
            self._evaluate("after", self.evaluator.settings.samples)

    def _evaluate(self, kind: str, samples: int) -> None:
        start = time.perf_counter()
        trainer = self.trainer
        label = "start" if kind == "before" else f"step-{trainer.state.global_step}"
        if trainer.is_world_process_zero() and quiet.is_terminal():  # a log gets the result
            _print(f"held-out {kind}: evaluating {self.evaluator.settings.size} problems ...")
        result = self.evaluator.run(trainer, label, samples)
        if not trainer.is_world_process_zero():
            return
        model = result["models"][0]
        seconds = time.perf_counter() - start
        if kind == "curve":
            with open(self.evaluator.dir / "curve.jsonl", "a") as handle:
                handle.write(json.dumps({"step": trainer.state.global_step,
                                         "greedy_accuracy": model["greedy_accuracy"],
                                         "seconds": seconds}) + "\n")
        else:
            write_json(self.evaluator.dir / f"{kind}.json", result)
        _print(f"held-out {kind} (step {trainer.state.global_step}): greedy "
               f"{100 * model['greedy_accuracy']:.1f}%"
               + (f", pass@1 {100 * model['pass_at_k']['1']:.1f}%" if samples else "")
               + f" on {len(model['greedy_correct'])} problems ({seconds:.0f} s)")


def _print(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line)


# ---------------------------------------------------------------- summary

def compare(before: dict, after: dict) -> dict:
    """Greedy accuracy and pass@1 before / after on the same problems, with paired
    normal 95% intervals over problems (attnrl.evaluation.paired_interval)."""
    from attnrl.evaluation import paired_interval

    b, a = before["models"][0], after["models"][0]
    if len(b["greedy_correct"]) != len(a["greedy_correct"]):
        raise UserError("before and after evaluations cover different problem counts")
    out = {"greedy_before": b["greedy_accuracy"], "greedy_after": a["greedy_accuracy"],
           "greedy_diff": paired_interval(a["greedy_correct"], b["greedy_correct"])}
    if a["correct"] and b["correct"]:
        per_problem = [[sum(row) / len(row) for row in m["correct"]] for m in (b, a)]
        out.update(pass1_before=b["pass_at_k"]["1"], pass1_after=a["pass_at_k"]["1"],
                   pass1_diff=paired_interval(per_problem[1], per_problem[0]))
    return out


def accuracy_line(comparison: dict, what: str = "held-out accuracy") -> str:
    """'held-out accuracy 23.4% -> 61.0% on 107 unseen problems (+37.6 points, greedy; one
    training run: 95% CI +29.1 to +46.1 over problems)'. The interval covers the sampling of
    problems for one training run, not the spread between training seeds (a recipe over seeds:
    benchmarks/main_job_seeds.py)."""
    d = comparison["greedy_diff"]
    return (f"{what} {100 * comparison['greedy_before']:.1f}% -> "
            f"{100 * comparison['greedy_after']:.1f}% on {d['items']} unseen problems "
            f"({100 * d['mean']:+.1f} points, greedy; one training run: 95% CI "
            f"{100 * d['low']:+.1f} to {100 * d['high']:+.1f} over problems)")


def problem_rows(before: dict, after: dict) -> list[dict]:
    """Per held-out problem: question, gold answer, greedy answer and correctness before and
    after (from before.json / after.json), so anyone can recheck the summary line."""
    if "problems" not in before or "problems" not in after:
        return []
    rows = []
    for b, a, cb, ca in zip(before["problems"], after["problems"],
                            before["models"][0]["greedy_correct"],
                            after["models"][0]["greedy_correct"]):
        if b["question"] != a["question"]:
            raise UserError("before.json and after.json hold different held-out problems; "
                            "evaluate both on the same run settings")
        rows.append({"index": b["index"], "question": b["question"], "gold": b["gold"],
                     "greedy_before": b["greedy"], "correct_before": cb,
                     "greedy_after": a["greedy"], "correct_after": ca})
    return rows


def summarize(out_dir, settings: HeldoutSettings) -> dict | None:
    """summary.json from before.json / after.json / merged.json (when present), with its
    report lines under "lines" (the caller prints them). None when there is no before and
    after pair."""
    folder = Path(out_dir) / "heldout"
    files = {k: folder / f"{k}.json" for k in ("before", "after", "merged")}
    data = {k: json.loads(p.read_text()) for k, p in files.items() if p.exists()}
    if "before" not in data or "after" not in data:
        return None
    summary = {"settings": asdict(settings),
               "heldout": data["after"].get("heldout"),
               "interval": "normal 95% interval on paired per-problem differences: it covers "
                           "the sampling of held-out problems for this one training run, not "
                           "the spread between training seeds",
               "trained": compare(data["before"], data["after"])}
    rows = problem_rows(data["before"], data["after"])
    if rows:
        write_text(folder / "problems.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    lines = [accuracy_line(summary["trained"])]
    t = summary["trained"]
    if "pass1_diff" in t:
        lines.append(f"  pass@1 at T={settings.temperature}: {100 * t['pass1_before']:.1f}% -> "
                     f"{100 * t['pass1_after']:.1f}% ({100 * t['pass1_diff']['mean']:+.1f} "
                     f"points, 95% CI {100 * t['pass1_diff']['low']:+.1f} to "
                     f"{100 * t['pass1_diff']['high']:+.1f})")
    if "merged" in data:
        summary["merged"] = compare(data["before"], data["merged"])
        summary["merged_vs_trained"] = compare(data["after"], data["merged"])
        lines.append(accuracy_line(summary["merged"], "reasoning-vector merge: held-out "
                                                       "accuracy start"))
        lines.append(accuracy_line(summary["merged_vs_trained"], "  merge vs trained:"))
    summary["lines"] = lines
    write_json(folder / "summary.json", summary)
    return summary


def read_curve(out_dir) -> list[dict]:
    path = Path(out_dir) / "heldout" / "curve.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
