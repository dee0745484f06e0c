"""`attnrl generate`: sample completions for a task and print them."""

import json
import time

from attnrl.errors import UserError

DEFAULT_MODEL = "smollm2"  # attnrl.models.DEFAULT_MODEL, without importing torch here


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="local HF model directory or 'smollm2' (packaged)")
    parser.add_argument("--task", default="chain_sum",
                        help="reasoning-gym task name or a GSM8K-style .jsonl file")
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("-n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0,
                        help="call seed: the task's prompts and, per sample, its own sampling "
                             "seed (a hash of seed, prompt index, sample index)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per sample")


def check_args(args) -> None:
    """Counts and sampling settings in range (before anything heavy is imported)."""
    for flag, value, low in (("--num-prompts", args.num_prompts, 1), ("-n", args.n, 1),
                             ("--max-tokens", args.max_tokens, 1), ("--seed", args.seed, 0)):
        if value < low:
            raise UserError(f"{flag} {value} is out of range; {flag} takes an integer >= {low}")
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature} is out of range; it takes a number "
                        ">= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p} is out of range; it takes a number in (0, 1]")


def run(args) -> int:
    check_args(args)
    from attnrl.data import apply_chat_template, load_prompts
    from attnrl.models import resolve_model
    from attnrl.rollout import SamplingConfig, make_engine

    resolve_model(args.model)  # fail fast on a bad path, before any engine starts
    records = load_prompts(args.task, size=args.num_prompts, seed=args.seed)
    engine = make_engine(args.engine, args.model)
    apply_chat_template(records, engine.tokenizer)
    sampling = SamplingConfig(n=args.n, temperature=args.temperature, top_p=args.top_p,
                              max_tokens=args.max_tokens, seed=args.seed)
    start = time.perf_counter()
    groups = engine.generate([r.prompt for r in records], sampling, progress=True)
    seconds = time.perf_counter() - start
    n_tokens = sum(len(c.token_ids) for g in groups for c in g)
    for record, group in zip(records, groups):
        for c in group:
            if args.json:
                print(json.dumps({"prompt": record.question, "gold": record.answer,
                                  "sample": c.sample_index, "completion": c.text,
                                  "tokens": len(c.token_ids)}))
            else:
                print(f"--- prompt {record.index} sample {c.sample_index} (gold {record.answer})")
                print(c.text.strip())
    print(f"# {n_tokens} tokens in {seconds:.1f} s ({n_tokens / max(seconds, 1e-9):.1f} tok/s, "
          f"engine {args.engine})")
    engine.close()
    return 0
