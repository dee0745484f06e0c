"""Trainer callbacks: a local JSONL of every logged metric, a one-line print per step, the
resolved config in every checkpoint and in W&B, the model card, and the reward-curve PNG
at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


class JsonlMetricsCallback(TrainerCallback):
    """Appends each `logs` dict (with the step) to OUTPUT_DIR/metrics.jsonl on rank 0. A
    resumed run first drops lines past the checkpoint's step, so the file stays one line
    per logged step; the end-of-training totals (train_runtime, train_loss, ...) share the
    last step's number and are marked "summary": true."""

    def __init__(self, path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= state.global_step
                and not json.loads(line).get("summary")]
        self.path.write_text("".join(line + "\n" for line in keep))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        row = {"step": state.global_step, **{k: _clean(v) for k, v in logs.items()}}
        if "train_runtime" in logs:
            row["summary"] = True
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")


class RecordConfigCallback(TrainerCallback):
    """The resolved config: sent to W&B as the run's config when training begins (so W&B
    holds the job keys too, not only the trainer's fields). (It is copied into every
    checkpoint, OUTPUT_DIR/checkpoint-N/config.yaml, by trainers/checkpoints.py before the
    checkpoint is renamed into place, so a checkpoint always says what made it.)"""

    def __init__(self, resolved: dict):
        self.resolved = resolved

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or "wandb" not in (args.report_to or []):
            return
        import wandb

        if wandb.run is not None:
            from trainers.run_dir import versions

            wandb.run.config.update({**{k: v for k, v in self.resolved.items()
                                        if k != "recorded"}, "versions": versions()},
                                    allow_val_change=True)


class StopCallback(TrainerCallback):
    """SIGINT / SIGTERM during training (trainers/stop.py SignalStop): at the end of the step
    in progress, the ranks agree (max over ranks) and all save a checkpoint and stop."""

    def __init__(self, stop):
        self.stop = stop

    def on_train_begin(self, args, state, control, **kwargs):
        self.stop.install()  # again: a library may have replaced the handlers meanwhile
        self.stop.training = True

    def on_step_end(self, args, state, control, **kwargs):
        from trainers.stop import agreed

        signum = agreed(self.stop.received or 0, args.device)
        if signum:
            self.stop.received = self.stop.received or signum
            self.stop.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.stop.training, self.stop.trained = False, True


def completions_per_step(resolved: dict, world_size: int = 1) -> int:
    """Completions in one optimizer step: per-device batch x accumulation x processes."""
    return resolved["per_device_train_batch_size"] * resolved["gradient_accumulation_steps"] \
        * world_size


def _steps_text(resolved: dict, world_size: int) -> str:
    per_step, n = completions_per_step(resolved, world_size), resolved["num_generations"]
    procs = f" x {world_size} processes" if world_size > 1 else ""
    return (f"{resolved['max_steps']} x {per_step} completions ({per_step // n} prompts x {n} "
            f"samples; micro-batch {resolved['per_device_train_batch_size']} x "
            f"{resolved['gradient_accumulation_steps']} accumulation{procs}), lr "
            f"{resolved['learning_rate']:g}, seed {resolved['seed']}")


def model_card(resolved: dict, command: str | None = None, world_size: int = 1) -> str:
    """README.md of a trained model: base model, task, trainer, credit strategy, the
    command, and how to rerun it."""
    task = resolved["task"] + (f" {json.dumps(resolved['task_kwargs'])}"
                               if resolved.get("task_kwargs") else "")
    rows = [("base model", resolved["model"]), ("task", task),
            ("training prompts", f"{resolved['task_size']} (task seed {resolved['task_seed']})"),
            ("trainer", (f"{resolved['trainer']} ({resolved['advantage_estimator']} "
                         f"advantages, loss {resolved['loss_type']})")),
            ("credit strategy", resolved["credit"]),
            ("rewards", json.dumps(resolved["rewards"])),
            ("LoRA", json.dumps(resolved["lora"]) if resolved["lora"] else "no (full weights)"),
            ("steps", _steps_text(resolved, world_size)),
            ("command", f"`{command}`" if command else "(run from Python)")]
    title = f"# {Path(str(resolved['output_dir'])).name}: {resolved['model']} trained with attnrl"
    lines = [title, "", "| | |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", ("The full resolved config (every key, package versions, the model's "
                   "content hash, every trainer field under `recorded`) is `config.yaml` "
                   "beside this card; rerun with `attnrl train --config config.yaml "
                   "--output_dir NEW_DIR`."), ""]
    return "\n".join(lines)


class StepPrinterCallback(TrainerCallback):
    """One line per logged step: reward, accuracy, mean gamma, step time split."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "reward" not in logs:
            return
        parts = [f"step {state.global_step}/{state.max_steps}",
                 f"reward {logs['reward']:.3f}"]
        for key, label in (("accuracy", "acc"), ("credit/gamma_mean", "gamma"),
                           ("completions/mean_length", "len"), ("step_time", "step s"),
                           ("time/generation", "gen s"), ("time/signals", "signals s")):
            if key in logs and logs[key] is not None:
                parts.append(f"{label} {logs[key]:.3g}")
        _write(" | ".join(parts))


class RewardProgressCallback(ProgressCallback):
    """The progress bar, with reward and step time as its postfix instead of printing
    every logs dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        bar = getattr(self, "training_bar", None)
        if state.is_world_process_zero and bar is not None and logs and "reward" in logs:
            bar.set_postfix(reward=f"{logs['reward']:.3f}",
                            step_s=f"{logs.get('step_time') or 0:.2f}")


def _write(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line)


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def smooth(values: list[float], window: int = 5) -> list[float]:
    """Trailing moving average: point i is the mean of values[max(0, i - window + 1)..i]."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1):i + 1]
        out.append(sum(part) / len(part))
    return out


def plot_reward_curve(metrics_path, png_path, title: str = "reward", heldout_dir=None,
                      window: int = 5) -> Path:
    """Per-step mean reward, its trailing `window`-step average, and (when `heldout_dir`
    holds them) the held-out greedy accuracy before / during / after training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    rows = [r for r in rows if r.get("reward") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    steps = [r["step"] for r in rows]
    rewards = [r["reward"] for r in rows]
    ax.plot(steps, rewards, marker="o", markersize=3, linewidth=0.8, alpha=0.45,
            label="training reward per step")
    ax.plot(steps, smooth(rewards, window), linewidth=2.2,
            label=f"training reward, {window}-step average")
    points = _heldout_points(heldout_dir) if heldout_dir is not None else []
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="s", markersize=7,
                color="black", linestyle=":", label="held-out greedy accuracy")
        for step, value, tag in points:
            if tag:
                ax.annotate(f"{tag} {100 * value:.0f}%", (step, value),
                            textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward / accuracy")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


def _heldout_points(folder) -> list[tuple[int, float, str]]:
    """(step, greedy accuracy, tag) from heldout/before.json, curve.jsonl, after.json."""
    folder = Path(folder)
    points = []
    before, after = folder / "before.json", folder / "after.json"
    if before.exists():
        points.append((0, json.loads(before.read_text())["models"][0]["greedy_accuracy"],
                       "before"))
    curve = folder / "curve.jsonl"
    if curve.exists():
        points += [(r["step"], r["greedy_accuracy"], "") for r in
                   map(json.loads, filter(str.strip, curve.read_text().splitlines()))]
    if after.exists():
        model = json.loads(after.read_text())["models"][0]
        points.append((model.get("step", 0), model["greedy_accuracy"], "after"))
    return sorted(points, key=lambda p: p[0])
