"""`attnrl train`: run a training job from a YAML config (default: configs/default.yaml).

    attnrl train                                   # the embedded default job
    attnrl train --config configs/x.yaml --max_steps 20 --credit global_anchor
    attnrl train --config OUT/config.yaml --output_dir NEW   # rerun a recorded run
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import sys
from pathlib import Path

from trainers.job import build_dataset, build_rewards, load_config, parse_overrides

OPTIONS = ("config", "overwrite", "allow_config_change", "verbose")


def add_arguments(parser) -> None:
    parser.allow_abbrev = False  # every other --key is a config override, never a prefix
    parser.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run already in output_dir (checkpoints, metrics, "
                        "final/) and start over")
    parser.add_argument("--allow_config_change", "--allow-config-change", default=None,
                        metavar="KEY,...", help="keys that may differ from the recorded run "
                        "when it resumes (e.g. max_steps)")
    parser.add_argument("--verbose", action="store_true",
                        help="show every library warning and log line")
    from trainers.schema_declarations import ATTNRL_KEYS, JOB_KEYS, TRL_KEYS

    def names(keys):
        return ", ".join(k.name for k in keys)
    parser.epilog = (
        "Any other --key value pair overrides that key of the config; what each takes, its "
        "default and whether it may change on resume: docs/configuration.md. "
        f"Job keys: {names(JOB_KEYS)}. Credit, signal, estimator and engine keys: "
        f"{names(ATTNRL_KEYS)}. TRL's keys the shipped configs use: {names(TRL_KEYS)}; "
        "every other GRPOConfig field is taken too.")


def run(args) -> int:
    import difflib

    from attnrl.errors import UserError
    from trainers.schema import KEYS, parse_allow_list

    overrides = parse_overrides(args.overrides)
    for key in overrides:  # a misspelt option of this command, not a config key
        close = difflib.get_close_matches(key, OPTIONS, n=1, cutoff=0.75)
        if key not in KEYS and close:
            raise UserError(f"command line: unknown option --{key} (did you mean "
                            f"--{close[0]}?)")
    config = load_config(args.config, overrides)
    allow = parse_allow_list(args.allow_config_change)
    command = "attnrl " + shlex.join(getattr(args, "argv", None) or ["train", *sys.argv[1:]])
    run_job(config, overwrite=args.overwrite, allow_config_change=allow,
            verbose=args.verbose, command=command)
    return 0


def parse_known(parser, argv):
    args, rest = parser.parse_known_args(argv)
    args.overrides = rest
    return args


def run_job(config: dict, callbacks=None, overwrite: bool = False,
            allow_config_change=(), verbose: bool = False, command: str | None = None):
    """Build everything from a checked flat config and train (extra TrainerCallbacks may be
    given). Every check that needs no model runs first (trainers/preflight.py), then rank 0
    locks output_dir (trainers/run_dir.py: one run per directory; resume only the same run);
    the resolved config is recorded and an --overwrite'n run removed only once the trainer
    is built, so a failed start leaves the directory as it was. SIGINT / SIGTERM stop it
    with a checkpoint (trainers/stop.py): then it raises attnrl.errors.Interrupted (a
    KeyboardInterrupt) once the lock is released. Returns the trainer."""
    from attnrl.errors import Interrupted
    from trainers import machine, preflight, run_dir
    from trainers.heldout_keys import heldout_settings
    from trainers.schema import resolve
    from trainers.stop import SignalStop, stopped_line
    from trainers.stop import barrier as stop_barrier

    resolved = resolve(config)
    preflight.check_job(resolved)
    # the plug-in rewards' source files (sha256): part of the run, compared on resume
    resolved["reward_plugins"] = preflight.reward_plugins(resolved)
    heldout = heldout_settings(resolved)
    # held-out problems never in the training pool: drawn (or refused) before anything is
    # written or loaded
    heldout_draw = heldout.draw() if heldout.enabled else None
    # device keys and the engine settings by device, recorded; refused ones before the lock
    chosen, line = machine.choose(config)
    chosen.update(machine.engine_choices({**resolved, **chosen}))
    config, resolved = {**config, **chosen}, {**resolved, **chosen}
    machine.check_device_keys(resolved)
    lock = run_dir.RunLock(resolved["output_dir"])
    with SignalStop(release=lock.release) as stop:
        try:
            if run_dir._rank0():
                lock.acquire()
            before = run_dir.entries(resolved["output_dir"])
            resume = run_dir.prepare(resolved, overwrite=overwrite,
                                     allow=set(allow_config_change))
            if line and run_dir._rank0():
                print(line, flush=True)
            try:
                trainer = _run_job(config, resolved, heldout, heldout_draw, resume,
                                   callbacks=callbacks, overwrite=overwrite, verbose=verbose,
                                   command=command, stop=stop)
            except Exception:  # a start that never trained a step is not a run
                if resume is None and run_dir._rank0():
                    run_dir.undo_failed_start(resolved["output_dir"], before)
                raise
        finally:
            lock.release()
    if stop.stopped_at is None:
        return trainer
    text = stopped_line(stop.received, stop.stopped_at, resolved["output_dir"],
                        resolved["resume"], overwrite)
    if run_dir._rank0():
        print(text, flush=True)
    stop_barrier()
    raise Interrupted(stop.received, text, reported=True)


def _run_job(config, resolved, heldout, heldout_draw, resume, callbacks=None,
             overwrite=False, verbose=False, command=None, stop=None):
    from attnrl import quiet
    from trainers import run_dir
    from trainers.schema import ATTNRL_DEFAULT_TRL, JOB_KEY_NAMES

    quiet.configure(verbose)
    if run_dir._rank0():
        print(quiet.versions_line(run_dir.versions()), flush=True)
    wandb = _wandb_environment(resolved, verbose)

    import numpy as np
    import torch
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from attnrl.models import load_model, load_tokenizer, resolve_model
    from trainers.callbacks import (
        JsonlMetricsCallback,
        RecordConfigCallback,
        RewardProgressCallback,
        StepPrinterCallback,
        StopCallback,
        model_card,
        plot_reward_curve,
    )
    from trainers.heldout import HeldoutCallback, HeldoutEvaluator, vector_settings
    from trainers.heldout import summarize as heldout_summary
    from trainers.job import trainer_config_class
    from trainers.reasoning_vector import apply_reasoning_vector, evaluate_merged

    trainer_name = resolved["trainer"]
    config_cls = trainer_config_class(trainer_name)
    trainer_kwargs = {k: v for k, v in config.items() if k not in JOB_KEY_NAMES}
    for name in ATTNRL_DEFAULT_TRL:
        trainer_kwargs.setdefault(name, resolved[name])
    if not quiet.is_terminal() and not verbose:
        trainer_kwargs.setdefault("disable_tqdm", True)  # a log file: one line per step
    args = config_cls(**trainer_kwargs)
    seed = args.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if not quiet.is_terminal() and not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    path = resolve_model(resolved["model"])
    tokenizer = load_tokenizer(path)
    data = {}
    dataset = build_dataset(resolved, tokenizer, report=data)
    if data["dropped_long"] and run_dir._rank0():
        print(f"max_prompt_length {data['max_prompt_length']}: dropped {data['dropped_long']} "
              f"of {data['prompts']} prompts (the longest has {data['longest_tokens']} "
              f"tokens); training on {len(dataset)}", flush=True)
    reward_funcs, weights = build_rewards(resolved)
    args.reward_weights = weights
    dtype = torch.bfloat16 if resolved["dtype"] == "bfloat16" else torch.float32
    with _phase(f"loading the policy ({resolved['model']}, {resolved['dtype']})"):
        model = load_model(path, dtype=dtype,
                           attn_implementation=resolved["attn_implementation"])
    model.train()
    peft_config = None
    if resolved["lora"]:
        from peft import LoraConfig

        lora = dict(resolved["lora"])
        lora.setdefault("task_type", "CAUSAL_LM")
        lora.setdefault("target_modules", "all-linear")
        peft_config = LoraConfig(**lora)

    if trainer_name == "nsr":
        from trainers.nsr import NSRTrainer as Trainer
    else:
        from trainers.grpo import AttnGRPOTrainer as Trainer
    callbacks = [StepPrinterCallback(), RecordConfigCallback(resolved), *(callbacks or [])]
    if stop is not None:  # SIGINT / SIGTERM: a checkpoint at the end of the step
        callbacks.append(StopCallback(stop))
    heldout_callback = None
    if heldout.enabled:
        heldout_callback = HeldoutCallback(HeldoutEvaluator(
            heldout, tokenizer, args.output_dir, args.rollout_engine, draw=heldout_draw))
        callbacks.append(heldout_callback)
    if args.metrics_jsonl:
        callbacks.append(JsonlMetricsCallback(Path(args.output_dir) / args.metrics_jsonl))
    with _phase(f"building the {trainer_name} trainer ({args.rollout_engine} rollouts)"):
        try:
            trainer = Trainer(model=model, reward_funcs=reward_funcs, args=args,
                              train_dataset=dataset, processing_class=tokenizer,
                              callbacks=callbacks, peft_config=peft_config)
        except ValueError as err:
            if type(err).__name__ != "NoMatchingPeftModuleError":
                raise
            raise _no_lora_targets(model, resolved) from None
    trainer.run_card = model_card(resolved, command, world_size=trainer.accelerator.num_processes)
    if heldout_callback is not None:
        heldout_callback.bind(trainer)
    # every check has passed and the trainer is built: now the run is written
    import json

    run_dir.start(resolved, overwrite=overwrite, command=command,
                  trainer_fields=json.loads(json.dumps(args.to_dict(), default=str)),
                  model_hash=run_dir.model_sha256(path) if run_dir._rank0() else None,
                  data={**data, "used": len(dataset)})
    trainer.accelerator.wait_for_everyone()
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(RewardProgressCallback())
    trainer.pop_callback(PrinterCallback)  # logs dicts: StepPrinterCallback prints a line
    done = run_dir.checkpoint_step(resume) if resume else None
    if done is not None and 0 < args.max_steps <= done:
        # transformers would train one more step past max_steps when resuming at it
        print(f"the run is complete ({resume} is step {done} of {args.max_steps}); saving "
              f"final/ from it. To train further: --max_steps N --allow_config_change "
              "max_steps", flush=True)
        trainer._load_from_checkpoint(resume)
    else:
        if resume:
            print(f"resuming from {resume}", flush=True)
        trainer.train(resume_from_checkpoint=resume)
        if stop is not None and stop.stopped_at is not None:
            _close_engine(trainer)  # stopped by a signal: checkpoint-N is the run's state
            return trainer
    final = Path(args.output_dir) / "final"
    trainer.save_model(str(final))
    _close_engine(trainer)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(final)
        (final / "README.md").write_text(trainer.run_card)
        shutil.copyfile(Path(args.output_dir) / run_dir.CONFIG_NAME, final / run_dir.CONFIG_NAME)
        vector = vector_settings(resolved)
        if vector is not None:
            merged = apply_reasoning_vector(vector, final, str(path), args.output_dir)
            if heldout.enabled:
                evaluate_merged(merged, heldout, args.rollout_engine, args.output_dir)
        comparison = heldout_summary(args.output_dir, heldout) if heldout.enabled else None
        if args.metrics_jsonl and (Path(args.output_dir) / args.metrics_jsonl).exists():
            png = plot_reward_curve(Path(args.output_dir) / args.metrics_jsonl,
                                    Path(args.output_dir) / "reward_curve.png",
                                    title=f"{resolved['task']} / {args.credit} credit",
                                    heldout_dir=Path(args.output_dir) / "heldout")
            print(f"saved model to {final}, metrics to "
                  f"{Path(args.output_dir) / args.metrics_jsonl}, curve to {png}", flush=True)
        if wandb:
            runs = sorted(Path(os.environ["WANDB_DIR"], "wandb").glob("offline-run-*"))
            if runs and os.environ.get("WANDB_MODE") == "offline":
                print(f"W&B offline run: {runs[-1]} (upload: wandb sync {runs[-1]})",
                      flush=True)
        if comparison is not None:  # the job's last lines: before -> after, once
            print("\n".join(comparison["lines"]), flush=True)
    return trainer


def _no_lora_targets(model, resolved):
    """The UserError for lora.target_modules that match no module of the model (PEFT's
    error, after the model loaded), naming the linear layers it has."""
    import torch

    from attnrl.errors import UserError

    names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear)})
    return UserError(f"lora.target_modules {resolved['lora'].get('target_modules')!r} match no "
                     f"module of {resolved['model']}; its linear layers are named "
                     f"{', '.join(names)}: list some of them, or use 'all-linear'")


def _close_engine(trainer) -> None:
    """Close the trainer's rollout engine (vLLM's memory and threads) once."""
    if getattr(trainer, "engine", None) is not None:
        trainer.engine.close()
        trainer.engine = None


def _phase(label: str):
    """quiet.phase on rank 0 (one line per long phase), nothing on the other ranks."""
    import contextlib

    from attnrl import quiet
    from trainers import run_dir

    return quiet.phase(label) if run_dir._rank0() else contextlib.nullcontext()


def _wandb_environment(resolved: dict, verbose: bool) -> bool:
    """W&B settings before transformers is imported; True when the run reports to W&B.
    Reporting: offline unless WANDB_MODE says otherwise, files under OUTPUT_DIR/wandb, and
    in a log file (not a terminal) W&B's own colored lines replaced by one line at the end.
    Not reporting: WANDB_MODE is dropped (transformers prints a W&B notice when it is set)."""
    from attnrl import quiet

    reports = resolved.get("report_to")
    names = [reports] if isinstance(reports, str) or reports is None else list(reports)
    if not {"wandb", "all"} & set(names):
        os.environ.pop("WANDB_MODE", None)
        return False
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", str(resolved["output_dir"]))
    if os.environ["WANDB_MODE"] in ("online", "run"):
        check_wandb_online(resolved["output_dir"])
    if resolved["wandb_project"]:
        os.environ.setdefault("WANDB_PROJECT", str(resolved["wandb_project"]))
    if not quiet.is_terminal() and not verbose:
        os.environ.setdefault("WANDB_SILENT", "true")
    return True


def check_wandb_online(output_dir) -> None:
    """WANDB_MODE online: a UserError without an API key (WANDB_API_KEY or a netrc entry
    for the W&B host), before anything loads; a host that does not answer within 5 s makes
    the run log offline instead, with one line saying how to upload it later."""
    import netrc
    import socket
    from urllib.parse import urlparse

    from attnrl.errors import UserError

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host = url.hostname or "api.wandb.ai"
    key = os.environ.get("WANDB_API_KEY")
    if not key:
        try:
            found = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
        except (OSError, netrc.NetrcParseError):
            found = None
        key = found[2] if found else None
    if not key:
        raise UserError(f"report_to wandb with WANDB_MODE={os.environ['WANDB_MODE']} needs a "
                        f"W&B API key for {host}: run `wandb login` or set WANDB_API_KEY, or "
                        "unset WANDB_MODE (attnrl then logs offline; upload with wandb sync)")
    port = url.port or (443 if url.scheme != "http" else 80)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as err:
        os.environ["WANDB_MODE"] = "offline"
        print(f"W&B: {host}:{port} does not answer ({err.strerror or err}); logging offline to "
              f"{Path(output_dir) / 'wandb'} (upload later with wandb sync)", flush=True)
