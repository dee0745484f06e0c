"""The `reasoning_vector` job key: after training, rank 0 writes
    target + alpha * (trained - sft)
with the streaming merge (attnrl.merge.merge_checkpoints; sft defaults to the starting
model) and evaluates the result on the job's held-out problems (attnrl.evaluation, a fresh
engine), beside the trained model's numbers."""

from __future__ import annotations

from pathlib import Path

from trainers.heldout import EVAL_TOP_P, HeldoutSettings, VectorSettings, write_json


def apply_reasoning_vector(vector: VectorSettings, trained_dir, start_model: str,
                           output_dir) -> Path:
    """Merge and return the output directory (replaced if it exists)."""
    from attnrl.merge import merge_checkpoints
    from attnrl.models import resolve_model

    out = Path(vector.out) if vector.out else Path(output_dir) / "reasoning_vector"
    sft = resolve_model(vector.sft if vector.sft else start_model)
    target = resolve_model(vector.target)
    summary = merge_checkpoints(rl=str(trained_dir), sft=str(sft), target=str(target),
                                out=str(out), alpha=vector.alpha, force=True, progress=False)
    print(f"reasoning vector: {target} + {vector.alpha:g} x ({trained_dir} - {sft}) -> {out} "
          f"({len(summary.combined)} tensors combined, {summary.seconds:.1f} s)", flush=True)
    return out


def evaluate_merged(merged_dir, settings: HeldoutSettings, engine: str, output_dir) -> dict:
    """attnrl.evaluation of the merged model on the job's held-out problems, written to
    OUTPUT_DIR/heldout/merged.json."""
    from attnrl.evaluation import evaluate

    result = evaluate([str(merged_dir)], settings.task, num_problems=settings.size,
                      n=settings.samples, temperature=settings.temperature, top_p=EVAL_TOP_P,
                      max_tokens=settings.max_tokens,
                      engine="hf" if engine == "hf" else "vllm", seed=settings.seed,
                      greedy=True, task_kwargs=settings.task_kwargs,
                      instruction=settings.instruction, system_prompt=settings.system_prompt,
                      pool=settings.pool)
    folder = Path(output_dir) / "heldout"
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "merged.json", result)
    return result
