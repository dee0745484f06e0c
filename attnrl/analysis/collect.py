"""Responses to analyse: sampled from a task with a rollout engine and scored with the
task's reward, or read from a JSONL of prompt / response pairs.

Responses JSONL (`--responses FILE`): one object per line with 'prompt' (the text the model
saw, chat template applied) and 'response'; the label is 'correct' (bool), else 'reward'
(>= 1.0 is correct), else 'answer' (a gold answer, scored by the math reward); 'group'
(optional, any JSON value) names the problem, default: the prompt text.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from attnrl.analysis.forward import Sample
from attnrl.errors import UserError
from attnrl.evaluation import CORRECT_THRESHOLD
from attnrl.signals.receiver import min_sentences

MIN_SENTENCES = min_sentences()   # receiver heads: proximity_ignore (4) + 10 vertical scores
#                                   (distinct sentences: repeats are dropped first)


def sentence_spans_of(tokenizer, response_ids: list[int]):
    """Sentence spans of a response (receiver heads) without repeated sentences (the first
    occurrence of each text is kept), or None with < MIN_SENTENCES left (too few vertical
    scores for a kurtosis that means anything). Returns (spans or None, repeats dropped)."""
    from attnrl.analysis.receivers import unique_spans
    from attnrl.signals.receiver import sentence_spans

    texts = [tokenizer.decode([t]) for t in response_ids]
    spans, dropped = unique_spans(texts, sentence_spans(texts))
    return (spans if len(spans) >= MIN_SENTENCES else None), dropped


def sample_task(model: str, task: str, num_problems: int, samples: int, temperature: float,
                top_p: float, max_tokens: int, seed: int, engine: str = "vllm",
                engine_kwargs: dict | None = None) -> tuple[list[Sample], list, dict]:
    """Sample and score. Returns (samples, prompt records, info)."""
    import time

    from attnrl.answers import answer_reward
    from attnrl.data import DEFAULT_INSTRUCTION, apply_chat_template, load_prompts
    from attnrl.models import load_tokenizer
    from attnrl.rollout import SamplingConfig, encode_prompts, make_engine

    tokenizer = load_tokenizer(model)
    records = load_prompts(task, size=num_problems, seed=seed)
    records = apply_chat_template([dataclasses.replace(r, metadata=dict(r.metadata))
                                   for r in records], tokenizer, instruction=DEFAULT_INSTRUCTION)
    prompt_ids = encode_prompts(tokenizer, [r.prompt for r in records])
    kwargs = dict(engine_kwargs or {})
    if engine == "vllm":
        kwargs.setdefault("max_model_len", max(map(len, prompt_ids)) + max_tokens)
        kwargs.setdefault("seed", seed)
    start = time.perf_counter()
    rollout = make_engine(engine, model, **kwargs)
    try:
        groups = rollout.generate(prompt_ids, SamplingConfig(
            n=samples, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed))
    finally:
        rollout.close()
        del rollout
        import gc

        gc.collect()
    seconds = time.perf_counter() - start
    out = []
    for p, (record, group) in enumerate(zip(records, groups)):
        texts = [c.text for c in group]
        rewards = answer_reward([record.prompt] * len(texts), texts,
                                answer=[record.answer] * len(texts),
                                metadata=[record.metadata] * len(texts))
        for completion, reward in zip(group, rewards):
            if not completion.token_ids:
                continue
            spans, repeats = sentence_spans_of(tokenizer, completion.token_ids)
            out.append(Sample(list(completion.prompt_ids), list(completion.token_ids), group=p,
                              correct=reward >= CORRECT_THRESHOLD, reward=float(reward),
                              spans=spans, text=completion.text, repeated_sentences=repeats))
    info = {"generate_seconds": seconds, "reward": "gym" if "entry" in records[0].metadata
            else "math"}
    return out, records, info


def read_responses(path, model: str, limit: int | None = None) -> tuple[list[Sample], list]:
    """Samples from a responses JSONL (module docstring). Bad lines -> UserError."""
    from attnrl.answers import math_reward
    from attnrl.data import jsonl_rows
    from attnrl.models import load_tokenizer
    from attnrl.rollout import encode_prompts

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--responses {str(path)!r} does not exist: give a JSONL file with "
                        "'prompt' and 'response' (and 'correct', 'reward' or 'answer') per line")
    tokenizer = load_tokenizer(model)
    rows, groups = [], {}
    for lineno, row in jsonl_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                or not isinstance(row.get("response"), str):
            raise UserError(f"{path}:{lineno}: needs string fields 'prompt' and 'response'")
        if "correct" in row:
            correct, reward = bool(row["correct"]), float(bool(row["correct"]))
        elif "reward" in row:
            reward = float(row["reward"])
            correct = reward >= CORRECT_THRESHOLD
        elif "answer" in row:
            reward = math_reward([""], [row["response"]], answer=[str(row["answer"])])[0]
            correct = reward >= CORRECT_THRESHOLD
        else:
            raise UserError(f"{path}:{lineno}: no label: add 'correct' (true/false), "
                            "'reward' or a gold 'answer'")
        key = json.dumps(row.get("group", row["prompt"]))
        group = groups.setdefault(key, len(groups))
        prompt_ids = encode_prompts(tokenizer, [row["prompt"]])[0]
        response_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        if not response_ids or not prompt_ids:
            raise UserError(f"{path}:{lineno}: empty prompt or response")
        spans, repeats = sentence_spans_of(tokenizer, response_ids)
        rows.append(Sample(prompt_ids, response_ids, group=group, correct=correct,
                           reward=reward, spans=spans, text=row["response"],
                           repeated_sentences=repeats))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise UserError(f"{path} holds no responses")
    return rows, []
