"""pass@k of one or more checkpoints on a task (`attnrl eval`).

pass@k is the unbiased estimator of Chen et al. (2021) used in docs/methods.md section 3: with
n samples of a problem of which c are correct,
    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i),
averaged over problems; the product form never forms a binomial coefficient. A sample
is correct when its reward (rewards.answer_reward: the reasoning-gym scorer for gym
tasks, the math reward for JSONL/GSM8K files) reaches `correct_threshold` (1.0).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import time
from pathlib import Path

from attnrl import eval_engine
from attnrl.errors import UserError

CORRECT_THRESHOLD = 1.0
HELDOUT_SEED_OFFSET = 10_000  # --config: problems drawn with task_seed + this (held out)
LARGE_REQUEST_TOKENS = 100_000
CPU_TOKENS_PER_S = {"vllm": 350.0, "hf": 60.0}
"""SmolLM2-135M on 2 CPU cores (benchmarks/results/rollout.json): the rate behind the
estimate printed for large requests."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `c` correct out of `n` samples (1 <= k <= n)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise UserError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_curve(correct: list[list[bool]], ks) -> dict[int, float]:
    """Mean pass@k over problems; `correct[p]` is the per-sample correctness of problem p."""
    if not correct:
        raise UserError("pass@k needs at least one problem")
    result = {}
    for k in ks:
        values = [pass_at_k(len(row), int(sum(map(bool, row))), k) for row in correct]
        result[int(k)] = sum(values) / len(values)
    return result


def table_ks(n: int) -> list[int]:
    """k values shown in tables: powers of two below n, then n."""
    ks = [2 ** i for i in range(int(math.log2(n)) + 1) if 2 ** i < n]
    return ks + [n]


def model_labels(models: list[str]) -> list[str]:
    """Short distinct labels: the last path component, more components where they clash."""
    for depth in range(1, 8):
        labels = ["/".join(Path(str(m)).parts[-depth:]) or str(m) for m in models]
        if len(set(labels)) == len(labels):
            return labels
    return [str(m) for m in models]


def _check_settings(num_problems, n, temperature, top_p, max_tokens) -> None:
    if num_problems < 1 or n < 1 or max_tokens < 1:
        raise UserError(f"--num-problems, -n and --max-tokens must be >= 1; got "
                        f"{num_problems}, {n}, {max_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise UserError(f"need temperature >= 0 and 0 < top_p <= 1; got {temperature}, {top_p}")


def _generate_and_score(engine, records, prompt_ids, sampling, threshold, first=0):
    """Per problem: texts, rewards, 0/1 correctness, token counts; and the seconds taken.
    Problem p is problem `first + p` of the whole list (its sampling seeds)."""
    from attnrl.answers import answer_reward
    from attnrl.rollout.seeds import call_seeds

    start = time.perf_counter()
    groups = engine.generate(prompt_ids, sampling,
                             seeds=call_seeds(sampling.seed, len(prompt_ids), sampling.n, first))
    seconds = time.perf_counter() - start
    rows = []
    for record, group in zip(records, groups):
        texts = [c.text for c in group]
        scores = answer_reward([record.prompt] * len(texts), texts,
                               answer=[record.answer] * len(texts),
                               metadata=[record.metadata] * len(texts))
        rows.append({"texts": texts, "rewards": scores,
                     "correct": [int(s >= threshold) for s in scores],
                     "tokens": [len(c.token_ids) for c in group]})
    return rows, seconds


def format_prompts(base, tokenizer, instruction: str | None = None,
                   system_prompt: str | None = None):
    """(records, prompt token ids): copies of `base` PromptRecords formatted as a training
    job formats them (`instruction` None: the default one)."""
    from attnrl.data import DEFAULT_INSTRUCTION, apply_chat_template
    from attnrl.rollout import encode_prompts

    records = apply_chat_template([dataclasses.replace(r, metadata=dict(r.metadata))
                                   for r in base], tokenizer,
                                  instruction=DEFAULT_INSTRUCTION if instruction is None
                                  else instruction, system_prompt=system_prompt)
    return records, encode_prompts(tokenizer, [r.prompt for r in records])


def score_with_engine(rollout, records, prompt_ids, n: int, temperature: float = 0.6,
                      top_p: float = 0.95, max_tokens: int = 512, seed: int = 0,
                      greedy: bool = False,
                      correct_threshold: float = CORRECT_THRESHOLD) -> dict:
    """One model's evaluation entry from an open rollout engine: `n` samples per problem
    (pass@1..n; n = 0: none, then `greedy` must be set) and optionally one greedy
    completion per problem. Keys: 'pass_at_k' {str(k): value}, 'correct' [problem][sample]
    0/1, 'rewards', 'tokens', 'mean_reward', 'generate_seconds', 'greedy_accuracy',
    'greedy_correct' [problem] 0/1 (None without greedy), '_rows' / '_greedy_rows' (texts;
    callers drop them)."""
    rows = score_rows(rollout, records, prompt_ids, n, temperature, top_p, max_tokens, seed,
                      greedy, correct_threshold)
    return entry_from_rows(rows["rows"], rows["greedy_rows"], n, rows["seconds"])


def score_rows(rollout, records, prompt_ids, n: int, temperature: float, top_p: float,
               max_tokens: int, seed: int, greedy: bool,
               correct_threshold: float = CORRECT_THRESHOLD, first: int = 0) -> dict:
    """The generated and scored rows of `score_with_engine`, before any aggregate:
    {'rows', 'greedy_rows' (None without greedy), 'seconds'}. The problems may be a slice
    of a longer list starting at problem `first` (e.g. one rank's share): each sample keeps
    the seed it has in the whole list, so the rows do not depend on the split."""
    from attnrl.rollout import SamplingConfig

    if n < 0 or (n == 0 and not greedy):
        raise UserError(f"need n >= 1 samples per problem (or n = 0 with greedy); got {n}")
    rows, seconds = [], 0.0
    if n:
        rows, seconds = _generate_and_score(
            rollout, records, prompt_ids,
            SamplingConfig(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                           seed=seed), correct_threshold, first)
    greedy_rows = None
    if greedy:
        greedy_rows, greedy_seconds = _generate_and_score(
            rollout, records, prompt_ids,
            SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens, seed=seed),
            correct_threshold, first)
        seconds += greedy_seconds
    return {"rows": rows, "greedy_rows": greedy_rows, "seconds": seconds}


def entry_from_rows(rows: list[dict], greedy_rows: list[dict] | None, n: int,
                    seconds: float) -> dict:
    """`score_with_engine`'s entry from the rows of every problem (in problem order)."""
    correct = [row["correct"] for row in rows]
    greedy_correct = None if greedy_rows is None else [r["correct"][0] for r in greedy_rows]
    return {"pass_at_k": ({str(k): v for k, v in
                           pass_at_k_curve(correct, range(1, n + 1)).items()} if n else {}),
            "correct": correct, "rewards": [row["rewards"] for row in rows],
            "tokens": [row["tokens"] for row in rows],
            "mean_reward": (sum(map(sum, (r["rewards"] for r in rows))) / (len(rows) * n)
                            if n else None),
            "generate_seconds": seconds,
            "greedy_accuracy": None if greedy_correct is None else
            sum(greedy_correct) / len(greedy_correct),
            "greedy_correct": greedy_correct, "_rows": rows, "_greedy_rows": greedy_rows}


def sample_texts(records, entry: dict) -> list[dict]:
    """Per problem: question, gold answer, sampled texts and the greedy text of an entry
    from score_with_engine (before its '_rows' are dropped)."""
    rows, greedy_rows = entry["_rows"], entry["_greedy_rows"]
    return [{"index": rec.index, "question": rec.question, "gold": rec.answer,
             "texts": rows[i]["texts"] if rows else [],
             "greedy": None if greedy_rows is None else greedy_rows[i]["texts"][0]}
            for i, rec in enumerate(records)]


def evaluate(models: list[str], task: str, num_problems: int = 32, n: int = 8,
             temperature: float = 0.6, top_p: float = 0.95, max_tokens: int = 512,
             engine: str = "vllm", seed: int = 0, greedy: bool = False,
             correct_threshold: float = CORRECT_THRESHOLD, engine_kwargs: dict | None = None,
             keep_texts: bool = False, task_kwargs: dict | None = None,
             instruction: str | None = None, system_prompt: str | None = None,
             notice: str | None = None, pool=None) -> dict:
    """Sample `n` completions per problem from each model, score them, and return
    {settings..., 'ks', 'models': [{'model', 'label', 'pass_at_k' {str(k): value},
    'correct' [problem][sample] 0/1, 'rewards', 'tokens', 'greedy_accuracy', ...}]}.
    Engines run one at a time; each is closed before the next model loads.
    `task_kwargs` go to the task generator; `instruction` (None: the default one) and
    `system_prompt` format the prompts as a training job does. `notice` is printed to
    stderr once the inputs are checked, before the first engine starts. `pool` (an
    attnrl.data.unseen.TrainingPool): evaluate held-out problems, the first `num_problems`
    distinct ones whose questions are not in that training pool ('heldout' in the result
    says what was dropped); None: the task's first `num_problems` problems as generated."""
    from attnrl.data import load_prompts
    from attnrl.models import load_tokenizer, resolve_model
    from attnrl.rollout import ENGINES, make_engine

    _check_settings(num_problems, n, temperature, top_p, max_tokens)
    if engine not in ENGINES:
        raise UserError(f"unknown rollout engine {engine!r}; choose from {', '.join(ENGINES)}")
    if not models:
        raise UserError("give at least one --model")
    for model in models:  # fail on a bad path before any engine starts
        resolve_model(model)
    probe = load_prompts(task, size=1, seed=seed, **(task_kwargs or {}))
    draw = None
    if pool is not None:  # refuses (UserError) before any engine when too few are unseen
        from attnrl.data.unseen import draw_unseen

        draw = draw_unseen(task, num_problems, seed, task_kwargs, pool, what="--num-problems")
    base = draw.records if draw is not None else \
        load_prompts(task, size=num_problems, seed=seed, **(task_kwargs or {}))
    if notice:
        import sys

        print(notice, file=sys.stderr, flush=True)
    result = result_header(task, num_problems, n, temperature, top_p, max_tokens, engine,
                           seed, correct_threshold,
                           reward="gym" if "entry" in probe[0].metadata else "math")
    for model, label in zip(models, model_labels(models)):
        tokenizer = load_tokenizer(model)
        records, prompt_ids = format_prompts(base, tokenizer, instruction, system_prompt)
        result["num_problems"] = len(records)
        kwargs = dict(engine_kwargs or {})
        if engine == "vllm":
            kwargs.setdefault("max_model_len", max(map(len, prompt_ids)) + max_tokens)
            kwargs.setdefault("seed", seed)
        rollout = make_engine(engine, model, **kwargs)
        try:
            entry = score_with_engine(rollout, records, prompt_ids, n, temperature, top_p,
                                      max_tokens, seed, greedy, correct_threshold)
        finally:
            rollout.close()
            del rollout
            gc.collect()
        if keep_texts:
            entry["samples"] = sample_texts(records, entry)
        entry.pop("_rows")
        entry.pop("_greedy_rows")
        result["models"].append({"model": str(model), "label": label, **entry})
    if draw is not None:
        result["heldout"] = draw.summary()
    return result


def result_header(task, num_problems, n, temperature, top_p, max_tokens, engine, seed,
                  correct_threshold, reward) -> dict:
    """The settings part of an evaluation result (see `evaluate`); 'models' starts empty."""
    return {"task": task, "num_problems": num_problems, "n": n,
            "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens,
            "engine": engine, "seed": seed, "correct_threshold": correct_threshold,
            "reward": reward, "ks": list(range(1, n + 1)),
            "table_ks": table_ks(n) if n else [], "models": []}


def paired_interval(after: list[float], before: list[float], z: float = 1.959964) -> dict:
    """Mean paired difference after - before over items (problems) with a normal 95%
    interval: mean(d) +- z * sd(d) / sqrt(m), sd with ddof 1 (m >= 2 items). Returns
    {'mean', 'low', 'high', 'se', 'items', 'method'}."""
    if len(after) != len(before) or len(after) < 2:
        raise UserError(f"a paired interval needs >= 2 paired items; got {len(after)} and "
                        f"{len(before)}")
    diffs = [float(a) - float(b) for a, b in zip(after, before)]
    m = len(diffs)
    mean = sum(diffs) / m
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (m - 1))
    se = sd / math.sqrt(m)
    return {"mean": mean, "low": mean - z * se, "high": mean + z * se, "se": se, "items": m,
            "method": "normal interval on paired per-problem differences (mean +- 1.96 SE)"}


def format_table(result: dict) -> str:
    """pass@k rows (and greedy accuracy), one column per model, values in percent."""
    labels = [m["label"] for m in result["models"]]
    rows = [(f"pass@{k}", [100 * m["pass_at_k"][str(k)] for m in result["models"]])
            for k in result["table_ks"]]
    if any(m["greedy_accuracy"] is not None for m in result["models"]):
        rows.append(("greedy", [float("nan") if m["greedy_accuracy"] is None
                                else 100 * m["greedy_accuracy"] for m in result["models"]]))
    width = max(10, *(len(label) for label in labels))
    head = f"{'metric':<10}" + "".join(f"  {label:>{width}}" for label in labels)
    kwargs = result.get("task_kwargs")
    task = result["task"] + (" " + json.dumps(kwargs) if kwargs else "")
    title = (f"# {task}: {result['num_problems']} problems x {result['n']} samples, "
             f"T={result['temperature']}, top-p={result['top_p']}, "
             f"max {result['max_tokens']} tokens, reward {result['reward']} (%)")
    lines = [title, head, "-" * len(head)]
    for name, values in rows:
        lines.append(f"{name:<10}" + "".join(f"  {v:>{width}.1f}" for v in values))
    return "\n".join(lines)


def plot_pass_at_k(result: dict, path) -> Path:
    """pass@k curves (percent) against k on a log2 axis, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ks = result["ks"]
    for m in result["models"]:
        values = [100 * m["pass_at_k"][str(k)] for k in ks]
        marks = [ks.index(k) for k in result["table_ks"]]
        ax.plot(ks, values, "-o", markevery=marks, markersize=4, linewidth=1.8,
                label=m["label"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(result["table_ks"], [str(k) for k in result["table_ks"]])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlim(0.9, max(ks) * 1.1)
    top = max([100 * v for m in result["models"] for v in m["pass_at_k"].values()] + [1.0])
    ax.set_ylim(-1.5, min(102, max(10.0, top * 1.1 + 2)))  # lines at 0 stay visible
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("pass@k (%)")
    ax.set_title(f"{Path(result['task']).name}: {result['num_problems']} problems, "
                 f"n={result['n']}, T={result['temperature']}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def add_run_arguments(parser, what: str) -> None:
    """--config RUN, --task, --task_kwargs (`eval` and `generate`; read by task_settings)."""
    parser.add_argument("--config", default=None,
                        help=f"a training run (its output_dir or config.yaml): {what}; any "
                        "flag overrides")
    parser.add_argument("--task", default=None,
                        help="reasoning-gym task name or a data file (.jsonl, .json, .csv, "
                        ".parquet, a saved dataset; default: the --config run's, else "
                        "chain_sum)")
    parser.add_argument("--task_kwargs", "--task-kwargs", default=None, metavar="YAML",
                        help="task generator arguments, e.g. '{min_terms: 2, max_terms: 2}'")


def add_arguments(parser) -> None:
    parser.add_argument("--model", action="append", required=True,
                        help="checkpoint: local HF directory or 'smollm2'; repeat to compare")
    add_run_arguments(parser, "evaluate its task with its task_kwargs, instruction and "
                      "system prompt, on its held-out problems (seed eval_seed, default "
                      f"task_seed + {HELDOUT_SEED_OFFSET}; none of their questions is in the "
                      "run's training pool) with its held-out settings")
    run_or = "default: the --config run's held-out setting, else"
    parser.add_argument("--num-problems", type=int, default=None,
                        help=f"problems ({run_or} 32)")
    parser.add_argument("-n", type=int, default=None,
                        help=f"samples per problem ({run_or} 8)")
    parser.add_argument("--temperature", type=float, default=None, help=f"({run_or} 0.6)")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-tokens", type=int, default=None, help=f"({run_or} 512)")
    parser.add_argument("--engine", choices=("vllm", "hf"), default=None,
                        help=f"({run_or} vllm)")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"call seed: the task's prompts and, per sample, its own sampling "
                        f"seed (a hash of seed, prompt index, sample index); default 0, with "
                        f"--config the run's task_seed + {HELDOUT_SEED_OFFSET}")
    parser.add_argument("--greedy", action="store_true",
                        help="also report greedy (temperature 0) accuracy (always with "
                        "--config)")
    parser.add_argument("--correct-threshold", type=float, default=CORRECT_THRESHOLD,
                        help="reward at or above which a sample counts as correct")
    parser.add_argument("--out", default="eval_out",
                        help="output directory for passk.json, passk.png, samples.jsonl")
    eval_engine.add_engine_arguments(parser)


def read_run_config(config_path: str) -> tuple[dict, Path]:
    """(config dict, its config.yaml path) of --config: a training config YAML or an
    output_dir holding config.yaml. Bad path or YAML: UserError naming it."""
    import yaml

    path = Path(config_path)
    if path.is_dir():
        path = path / "config.yaml"
    if not path.is_file():
        raise UserError(f"--config {config_path!r} not found; give a training config YAML "
                        "or an output_dir holding config.yaml")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: not valid YAML ({' '.join(str(err).split())})") \
            from None
    if not isinstance(config, dict):
        raise UserError(f"--config {path}: a config must be a mapping of keys to values")
    return config, path


def task_settings(config_path: str | None, task: str | None, task_kwargs: str | None,
                  seed: int | None) -> dict:
    """What to evaluate. From a training config (a YAML or a run's output_dir): its held-out
    evaluation: eval_task (gsm8k -> gsm8k:test) or the task with its task_kwargs,
    instruction and system prompt; seed eval_seed or task_seed + HELDOUT_SEED_OFFSET;
    'pool', its training pool (whose questions are never evaluated); and the evaluation's
    size, samples, temperature, length and engine where the config has them (None
    otherwise: the command's defaults); 'fields', the config's question_field /
    answer_field for a data file. --task (which drops the config's task_kwargs unless
    --task_kwargs is given), --task_kwargs and --seed override."""
    import yaml

    settings = {"task": "chain_sum", "task_kwargs": None, "instruction": None,
                "system_prompt": None, "seed": 0, "pool": None, **dict.fromkeys(RUN_EVAL_KEYS)}
    config = {}
    if config_path:
        config = read_run_config(config_path)[0]
        settings.update(run_eval_settings(config))
        from attnrl.data.unseen import TrainingPool

        settings["pool"] = TrainingPool.from_config(config)
        settings["seed"] = settings["pool"].seed + HELDOUT_SEED_OFFSET \
            if config.get("eval_seed") is None else int(config["eval_seed"])
    if task is not None:
        if task != settings["task"] and task_kwargs is None:
            settings["task_kwargs"] = None  # they belong to the config's task
        settings["task"] = task
    if task_kwargs is not None:
        try:
            parsed = yaml.safe_load(task_kwargs)
        except yaml.YAMLError:
            parsed = None
        if not isinstance(parsed, dict):
            raise UserError(f"--task_kwargs {task_kwargs!r} is not a YAML mapping; write e.g. "
                            "'{min_terms: 2, max_terms: 2}'")
        settings["task_kwargs"] = parsed
    if seed is not None:
        settings["seed"] = seed
    from attnrl.data import file_options  # the run's field mapping, for its data files

    settings["fields"] = file_options(config, settings["task"]) if config_path else {}
    return settings


RUN_EVAL_KEYS = ("num_problems", "n", "temperature", "max_tokens", "engine")


def run_eval_settings(config: dict) -> dict:
    """The held-out evaluation a training config describes, in this command's terms (the
    rules of trainers/heldout_keys.py; a recorded OUTPUT_DIR/config.yaml holds every key)."""
    task = str(config.get("task", "chain_sum"))
    eval_task = config.get("eval_task")
    if eval_task is None:
        eval_task = "gsm8k:test" if task in ("gsm8k", "gsm8k:train") else task
    out = {k: config.get(k) for k in ("instruction", "system_prompt")}
    out["task"] = str(eval_task)
    out["task_kwargs"] = config.get("task_kwargs") if out["task"] == task else None
    engine = config.get("rollout_engine")
    out.update({"num_problems": config.get("eval_size") or None,
                "n": config.get("eval_samples"), "temperature": config.get("eval_temperature"),
                "max_tokens": config.get("eval_max_tokens") or
                config.get("max_completion_length"),
                "engine": None if engine is None else ("hf" if engine == "hf" else "vllm")})
    return out


def request_note(models: int, num_problems: int, n: int, max_tokens: int, greedy: bool,
                 engine: str) -> str | None:
    """A one-line estimate when the request may generate more than LARGE_REQUEST_TOKENS."""
    tokens = models * num_problems * (n + int(greedy)) * max_tokens
    if tokens <= LARGE_REQUEST_TOKENS:
        return None
    minutes = tokens / CPU_TOKENS_PER_S.get(engine, CPU_TOKENS_PER_S["vllm"]) / 60
    return (f"attnrl eval: note: up to {tokens:,} generated tokens ({models} model(s) x "
            f"{num_problems} problems x {n + int(greedy)} samples x {max_tokens} tokens); at "
            f"~{CPU_TOKENS_PER_S.get(engine, 350):.0f} tok/s (SmolLM2-135M, {engine}, 2 CPU "
            f"cores) up to ~{minutes:.0f} min; lower -n, --num-problems or --max-tokens for a "
            "quick look")


def which_problems_note(task: str, num_problems: int, seed: int) -> str:
    """The one line `attnrl eval` prints without --config: which problems it scores, and
    that they may be a run's training problems."""
    from attnrl.data import is_file_task

    if is_file_task(task):
        what = f"the first {num_problems} lines of {task}"
    else:
        what = (f"the first {num_problems} problems {task} generates from seed {seed} (the "
                f"problems a run with task_seed {seed} trains on)")
    return (f"attnrl eval: note: scoring {what}; to score a run's held-out problems (none in "
            "its training pool) give --config RUN")


COMMAND_DEFAULTS = {"num_problems": 32, "n": 8, "temperature": 0.6, "max_tokens": 512,
                    "engine": "vllm"}
"""`attnrl eval`'s defaults where neither the command line nor --config says."""


def run(args) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a directory")
    settings = task_settings(args.config, args.task, args.task_kwargs, args.seed)
    for key in RUN_EVAL_KEYS:  # the command line, else the run's, else the command's default
        if getattr(args, key) is None:
            setattr(args, key, COMMAND_DEFAULTS[key] if settings[key] is None
                    else settings[key])
    if args.config and not args.greedy:
        args.greedy = True  # a run's held-out evaluation reports greedy accuracy
    _check_settings(args.num_problems, args.n, args.temperature, args.top_p, args.max_tokens)
    built_with = eval_engine.engine_kwargs(  # the engine's flags, else the run's settings
        args, read_run_config(args.config)[0] if args.config else None, args.engine)
    from attnrl import cli_checks

    for model in args.model:  # before torch and any engine
        cli_checks.check_model(model)
    cli_checks.check_task(settings["task"], need_answers=True,
                          task_kwargs=settings["task_kwargs"], fields=settings["fields"])
    note = request_note(len(args.model), args.num_problems, args.n, args.max_tokens,
                        args.greedy, args.engine)
    if not args.config:   # say which problems: a bare task's seed may be a run's training seed
        which = which_problems_note(settings["task"], args.num_problems, settings["seed"])
        note = which if note is None else f"{which}\n{note}"
    result = evaluate(args.model, settings["task"], num_problems=args.num_problems, n=args.n,
                      temperature=args.temperature, top_p=args.top_p,
                      max_tokens=args.max_tokens, engine=args.engine, seed=settings["seed"],
                      greedy=args.greedy, correct_threshold=args.correct_threshold,
                      keep_texts=True, engine_kwargs=built_with,
                      task_kwargs={**(settings["task_kwargs"] or {}), **settings["fields"]}
                      or None, instruction=settings["instruction"],
                      system_prompt=settings["system_prompt"], notice=note,
                      pool=settings["pool"])
    result["task_kwargs"] = settings["task_kwargs"]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w") as handle:
        for m in result["models"]:
            handle.writelines(json.dumps({"model": m["model"], **sample}) + "\n"
                              for sample in m.pop("samples"))
    (out / "passk.json").write_text(json.dumps(result, indent=1))
    plot_pass_at_k(result, out / "passk.png")
    print(format_table(result))
    print(f"# wrote {out / 'passk.json'}, {out / 'passk.png'}, {out / 'samples.jsonl'}")
    return 0
