"""Rollout throughput: vLLM (in-process) vs transformers generate on the same prompts.

    python benchmarks/rollout.py            # SmolLM2, 64 prompts x 128 tokens
    python benchmarks/rollout.py --quick    # 8 prompts x 32 tokens

Prints a table and writes benchmarks/results/rollout.json. Greedy decoding with EOS
ignored is not available in transformers' generate for all models, so both engines
sample at temperature 1 with a fixed seed; tokens/s counts generated tokens only.
"""

import argparse
import os
import platform
import time
from pathlib import Path

from _common import write_result

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def measure(kind, model, prompts, sampling, batch_size):
    from attnrl.rollout import make_engine

    start = time.perf_counter()
    kwargs = {"batch_size": batch_size} if kind == "hf" else {"max_model_len": 1024}
    engine = make_engine(kind, model, **kwargs)
    startup = time.perf_counter() - start
    engine.generate(prompts[:2], type(sampling)(n=1, max_tokens=4))  # warm-up
    start = time.perf_counter()
    groups = engine.generate(prompts, sampling, progress=True)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for g in groups for c in g)
    engine.close()
    return {"engine": kind, "startup_s": round(startup, 2), "generate_s": round(seconds, 2),
            "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="gsm_symbolic")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "rollout.json"))
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.max_tokens = 8, 32

    from attnrl.data import apply_chat_template, load_prompts
    from attnrl.models import load_tokenizer
    from attnrl.rollout import SamplingConfig

    records = apply_chat_template(load_prompts(args.task, size=args.prompts, seed=0),
                                  load_tokenizer(args.model))
    prompts = [r.prompt for r in records]
    sampling = SamplingConfig(n=1, temperature=1.0, max_tokens=args.max_tokens, seed=0)
    rows = [measure(kind, args.model, prompts, sampling, args.hf_batch_size)
            for kind in ("vllm", "hf")]
    speedup = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"\n{'engine':<8}{'startup s':>11}{'generate s':>12}{'tokens':>9}{'tok/s':>9}")
    for r in rows:
        print(f"{r['engine']:<8}{r['startup_s']:>11}{r['generate_s']:>12}{r['tokens']:>9}"
              f"{r['tokens_per_s']:>9}")
    print(f"vLLM / HF tokens/s: {speedup:.2f}x (target >= 1.5x)")
    result = {"model": args.model, "task": args.task, "prompts": args.prompts,
              "max_tokens": args.max_tokens, "threads": os.environ["OMP_NUM_THREADS"],
              "machine": platform.processor() or platform.machine(), "rows": rows,
              "vllm_over_hf": round(speedup, 3)}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
