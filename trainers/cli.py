"""`attnrl train`: run a training job from a YAML config (default: configs/default.yaml).

    attnrl train                                   # the embedded default job
    attnrl train --config configs/x.yaml --max_steps 20 --credit global_anchor
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from trainers.job import build_dataset, build_rewards, load_config, parse_overrides


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    parser.epilog = "Any other --key value pair overrides that key of the config."


def run(args) -> int:
    overrides = parse_overrides(args.overrides)
    config = load_config(args.config, overrides)
    run_job(config)
    return 0


def parse_known(parser, argv):
    args, rest = parser.parse_known_args(argv)
    args.overrides = rest
    return args


def run_job(config: dict, callbacks=None):
    """Build everything from a validated flat config and train (extra TrainerCallbacks may
    be given). Returns the trainer."""
    import dataclasses

    import numpy as np
    import torch
    from transformers.trainer_callback import ProgressCallback

    from attnrl.models import load_model, load_tokenizer, resolve_model
    from trainers.callbacks import (
        JsonlMetricsCallback,
        RewardProgressCallback,
        StepPrinterCallback,
        plot_reward_curve,
    )
    from trainers.heldout import (
        HeldoutCallback,
        HeldoutEvaluator,
        heldout_settings,
        vector_settings,
    )
    from trainers.heldout import summarize as heldout_summary
    from trainers.job import JOB_FIELDS, trainer_config_class
    from trainers.reasoning_vector import apply_reasoning_vector, evaluate_merged

    os.environ.setdefault("WANDB_MODE", "offline")
    trainer_name = config.get("trainer", "grpo")
    config_cls = trainer_config_class(trainer_name)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    trainer_kwargs = {k: v for k, v in config.items() if k in fields and k not in JOB_FIELDS}
    trainer_kwargs.setdefault("output_dir", "outputs/default")
    trainer_kwargs.setdefault("logging_steps", 1)
    if config.get("wandb_project"):
        os.environ.setdefault("WANDB_PROJECT", str(config["wandb_project"]))
    args = config_cls(**trainer_kwargs)
    seed = args.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    path = resolve_model(config.get("model", "smollm2"))
    tokenizer = load_tokenizer(path)
    dataset = build_dataset(config, tokenizer)
    reward_funcs, weights = build_rewards(config)
    args.reward_weights = weights
    dtype = torch.bfloat16 if config.get("dtype") == "bfloat16" else torch.float32
    model = load_model(path, dtype=dtype)
    model.train()
    peft_config = None
    if config.get("lora"):
        from peft import LoraConfig

        lora = dict(config["lora"])
        lora.setdefault("task_type", "CAUSAL_LM")
        lora.setdefault("target_modules", "all-linear")
        peft_config = LoraConfig(**lora)

    if trainer_name == "nsr":
        from trainers.nsr import NSRTrainer as Trainer
    else:
        from trainers.grpo import AttnGRPOTrainer as Trainer
    callbacks = [StepPrinterCallback(), *(callbacks or [])]
    heldout = heldout_settings(config)
    heldout_callback = None
    if heldout.enabled:
        heldout_callback = HeldoutCallback(HeldoutEvaluator(
            heldout, tokenizer, args.output_dir, args.rollout_engine))
        callbacks.append(heldout_callback)
    if args.metrics_jsonl:
        callbacks.append(JsonlMetricsCallback(Path(args.output_dir) / args.metrics_jsonl))
    trainer = Trainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                      processing_class=tokenizer, callbacks=callbacks, peft_config=peft_config)
    if heldout_callback is not None:
        heldout_callback.bind(trainer)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(RewardProgressCallback())
    resume = _resume_point(config.get("resume", "auto"), args.output_dir)
    if resume:
        print(f"resuming from {resume}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    final = Path(args.output_dir) / "final"
    trainer.save_model(str(final))
    if getattr(trainer, "engine", None) is not None:
        trainer.engine.close()
        trainer.engine = None
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(final)
        vector = vector_settings(config)
        if vector is not None:
            merged = apply_reasoning_vector(vector, final, str(path), args.output_dir)
            if heldout.enabled:
                evaluate_merged(merged, heldout, args.rollout_engine, args.output_dir)
        comparison = heldout_summary(args.output_dir, heldout) if heldout.enabled else None
        if args.metrics_jsonl and (Path(args.output_dir) / args.metrics_jsonl).exists():
            png = plot_reward_curve(Path(args.output_dir) / args.metrics_jsonl,
                                    Path(args.output_dir) / "reward_curve.png",
                                    title=f"{config.get('task')} / {args.credit} credit",
                                    heldout_dir=Path(args.output_dir) / "heldout")
            print(f"saved model to {final}, metrics to "
                  f"{Path(args.output_dir) / args.metrics_jsonl}, curve to {png}", flush=True)
        if comparison is not None:
            print(comparison["lines"][0], flush=True)  # the job's last line
    return trainer


def _resume_point(resume, output_dir):
    if resume in (None, False, "never", "no"):
        return None
    if resume not in ("auto", True):
        return str(resume)
    from transformers.trainer_utils import get_last_checkpoint

    if Path(output_dir).is_dir():
        return get_last_checkpoint(output_dir)
    return None
