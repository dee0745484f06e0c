"""`attnrl generate`: sample completions for a task and print them."""

import json
import time

from attnrl.errors import UserError
from attnrl.evaluation import add_run_arguments

DEFAULT_MODEL = "smollm2"  # attnrl.models.DEFAULT_MODEL, without importing torch here


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None,
                        help="local HF model directory or 'smollm2' (packaged); default: "
                        "the --config run's final/ model, else smollm2")
    add_run_arguments(parser, "sample its final model on its held-out problems with its "
                      "task, task_kwargs, prompt format, sampling settings and engine")
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("-n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--engine", choices=("vllm", "hf"), default=None,
                        help="(default: the --config run's, else vllm)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="(default: the --config run's, else 1.0)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="(default: the --config run's, else 1.0)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="(default: the --config run's max_completion_length, else 128)")
    parser.add_argument("--seed", type=int, default=None,
                        help="call seed: the task's prompts and, per sample, its own sampling "
                             "seed (a hash of seed, prompt index, sample index); default 0, "
                             "with --config the run's held-out seed")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (settings and every sample) on stdout")


DEFAULTS = {"engine": "vllm", "temperature": 1.0, "top_p": 1.0, "max_tokens": 128}


def fill_from_run(args) -> dict:
    """The run's settings (attnrl.evaluation.task_settings) under what the command line
    gives; returns them (task, task_kwargs, instruction, system_prompt, seed, pool)."""
    from pathlib import Path

    import yaml

    from attnrl.evaluation import task_settings

    settings = task_settings(args.config, args.task, args.task_kwargs, args.seed)
    run = {}
    if args.config:
        path = Path(args.config)
        run = yaml.safe_load(((path / "config.yaml") if path.is_dir() else path).read_text())
        final = Path(run.get("output_dir", "")) / "final"
        if args.model is None and (path.is_dir() and (path / "final").is_dir()):
            args.model = str(path / "final")
        elif args.model is None and final.is_dir():
            args.model = str(final)
        elif args.model is None:  # killed or still training: never the base model silently
            run_dir = path if path.is_dir() else final.parent
            steps = sorted(run_dir.glob("checkpoint-*"),
                           key=lambda c: int(c.name.split("-")[-1]) if
                           c.name.split("-")[-1].isdigit() else -1)
            hint = f"--model {steps[-1]} (its latest checkpoint)" if steps else \
                f"--model {run.get('model', DEFAULT_MODEL)} (its base model)"
            raise UserError(f"--config {args.config}: the run has no final/ model yet (killed, "
                            f"or still training); give {hint}")
    run_values = {"engine": settings["engine"], "temperature": run.get("temperature"),
                  "top_p": run.get("top_p"), "max_tokens": run.get("max_completion_length")}
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            value = run_values[key]
            setattr(args, key, default if value is None else value)
    if args.model is None:
        args.model = DEFAULT_MODEL
    return settings


def check_args(args) -> None:
    """Counts and sampling settings in range (before anything heavy is imported)."""
    for flag, value, low in (("--num-prompts", args.num_prompts, 1), ("-n", args.n, 1),
                             ("--max-tokens", args.max_tokens, 1), ("--seed", args.seed, 0)):
        if value is not None and value < low:
            raise UserError(f"{flag} {value} is out of range; {flag} takes an integer >= {low}")
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature} is out of range; it takes a number "
                        ">= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p} is out of range; it takes a number in (0, 1]")


def run(args) -> int:
    settings = fill_from_run(args)
    check_args(args)
    from attnrl import cli_checks, quiet

    cli_checks.check_model(args.model)  # before any engine starts
    cli_checks.check_task(settings["task"], task_kwargs=settings["task_kwargs"],
                          fields=settings["fields"])
    from attnrl.data import load_prompts
    from attnrl.evaluation import format_prompts
    from attnrl.rollout import SamplingConfig, make_engine

    task, kwargs = settings["task"], {**(settings["task_kwargs"] or {}), **settings["fields"]}
    if settings["pool"] is not None:  # a run's held-out problems, never its training ones
        from attnrl.data.unseen import draw_unseen

        base = draw_unseen(task, args.num_prompts, settings["seed"], kwargs, settings["pool"],
                           what="--num-prompts").records
    else:
        base = load_prompts(task, size=args.num_prompts, seed=settings["seed"], **kwargs)
    engine = make_engine(args.engine, args.model)
    records, _ = format_prompts(base, engine.tokenizer, settings["instruction"],
                                settings["system_prompt"])
    sampling = SamplingConfig(n=args.n, temperature=args.temperature, top_p=args.top_p,
                              max_tokens=args.max_tokens, seed=settings["seed"])
    start = time.perf_counter()
    groups = engine.generate([r.prompt for r in records], sampling,
                             progress=quiet.is_terminal())
    seconds = time.perf_counter() - start
    engine.close()
    n_tokens = sum(len(c.token_ids) for g in groups for c in g)
    speed = (f"model {args.model}: {n_tokens} tokens in {seconds:.1f} s "
             f"({n_tokens / max(seconds, 1e-9):.1f} tok/s, engine {args.engine})")
    if args.json:  # one document a script can parse; nothing else on stdout
        print(json.dumps({
            "model": str(args.model), "task": task, "task_kwargs": kwargs or None,
            "engine": args.engine, "temperature": args.temperature, "top_p": args.top_p,
            "max_tokens": args.max_tokens, "seed": settings["seed"], "tokens": n_tokens,
            "seconds": round(seconds, 3),
            "samples": [{"index": r.index, "question": r.question, "prompt": r.prompt,
                         "gold": r.answer, "sample": c.sample_index, "completion": c.text,
                         "tokens": len(c.token_ids)} for r, g in zip(records, groups)
                        for c in g]}))
        return 0
    for record, group in zip(records, groups):
        print(f"=== prompt {record.index}: {record.question.strip()}  (gold {record.answer})")
        for c in group:
            print(f"--- sample {c.sample_index}")
            print(c.text.strip())
    print(f"# {speed}")
    return 0
