"""Fallback rollout engine: transformers `generate`, sampling with one seeded
torch.Generator per completion row (the process's global RNG is never touched)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from attnrl.rollout.base import (
    Completion,
    RolloutEngine,
    SamplingConfig,
    check_stream_names,
    encode_prompts,
    sample_seeds,
)
from attnrl.rollout.seeds import SampleSeeds


def processed_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(B, V) float32 log-probs of the sampling distribution: logits / temperature,
    restricted to the top-p nucleus (the smallest set of most likely tokens whose mass
    reaches top_p; at least one token) and renormalized; -inf outside. Temperature 0:
    the raw log-probs (greedy decoding takes their argmax)."""
    logits = logits.float()
    if temperature == 0:
        return torch.log_softmax(logits, dim=-1)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - top_p
        drop[:, -1] = False  # the most likely token always stays
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.log_softmax(logits, dim=-1)


class _RowSampler(LogitsProcessor):
    """Draws each row's next token from its processed distribution with the row's own
    generator and records its log-prob; returns scores that make transformers' greedy step
    pick exactly that token."""

    def __init__(self, generators: list[torch.Generator] | None, temperature: float,
                 top_p: float):
        self.generators = generators
        self.temperature = temperature
        self.top_p = top_p
        self.logprobs: list[torch.Tensor] = []  # per step: (B,) log-prob of the drawn token

    def __call__(self, input_ids, scores):
        logprobs = processed_logprobs(scores, self.temperature, self.top_p)
        if self.generators is None:  # greedy
            tokens = logprobs.argmax(dim=-1)
        else:
            probs = logprobs.exp()  # generators live on the model's device
            tokens = torch.stack([torch.multinomial(probs[row], 1, generator=gen)[0]
                                  for row, gen in enumerate(self.generators)])
        self.logprobs.append(logprobs.gather(-1, tokens[:, None])[:, 0].cpu())
        chosen = torch.full_like(scores, float("-inf"))
        chosen.scatter_(-1, tokens[:, None], 0.0)
        return chosen


class HFEngine(RolloutEngine):
    """transformers `generate` on the policy itself (or a copy). `batch_size` prompts per
    call of generate, each with `n` samples; sample j of prompt p is drawn with a
    torch.Generator seeded by its own seed (attnrl.rollout.seeds)."""

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32, device="cpu",
                        **kwargs) -> HFEngine:
        """A copy of the model in `dtype` on `device` (a trainer passes its own)."""
        from attnrl.models import load_model, load_tokenizer

        return cls(load_model(name_or_path, dtype=dtype, device=device),
                   load_tokenizer(name_or_path), **kwargs)

    @torch.no_grad()
    def generate(self, prompts, sampling: SamplingConfig, progress: bool = False,
                 seeds: SampleSeeds | None = None) -> list[list[Completion]]:
        ids = encode_prompts(self.tokenizer, prompts)
        seeds = sample_seeds(sampling, len(ids), seeds)
        pad_id = self.tokenizer.pad_token_id
        eos_id = self.tokenizer.eos_token_id
        device = next(self.model.parameters()).device
        greedy = sampling.temperature == 0
        n = sampling.n
        results: list[list[Completion]] = []
        bar = tqdm(total=len(ids), desc="generate (hf)", unit="prompt", disable=not progress)
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start:start + self.batch_size]
            width = max(map(len, chunk))
            input_ids = torch.full((len(chunk) * n, width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row in range(len(chunk) * n):  # left padding; sample j of prompt p at p*n+j
                seq = chunk[row // n]
                input_ids[row, width - len(seq):] = torch.tensor(seq)
                attention_mask[row, width - len(seq):] = 1
            generators = None
            if not greedy:
                generators = []
                for p in range(start, start + len(chunk)):
                    for j in range(n):
                        gen = torch.Generator(device=device)
                        if seeds is None:
                            gen.seed()  # fresh, from the OS
                        else:
                            gen.manual_seed(seeds[p][j])
                        generators.append(gen)
            sampler = _RowSampler(generators, sampling.temperature, sampling.top_p)
            out = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                do_sample=False, temperature=None, top_p=None, top_k=None,
                logits_processor=LogitsProcessorList([sampler]),
                max_new_tokens=sampling.max_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
                return_dict_in_generate=True)
            new_tokens = out.sequences[:, width:].cpu()
            logprobs = torch.stack(sampler.logprobs, dim=1)
            for row in range(new_tokens.shape[0]):
                p = start + row // n
                tokens = new_tokens[row].tolist()
                length, reason = len(tokens), "length"
                if eos_id in tokens:
                    length, reason = tokens.index(eos_id) + 1, "stop"
                if row % n == 0:
                    results.append([])
                results[-1].append(Completion(
                    prompt_index=p, sample_index=row % n, prompt_ids=ids[p],
                    token_ids=tokens[:length], logprobs=logprobs[row, :length].tolist(),
                    text=self.tokenizer.decode(tokens[:length], skip_special_tokens=True),
                    finish_reason=reason))
            bar.update(len(chunk))
        bar.close()
        return results

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy `state_dict` (HF names) into the model. Every tensor of the model must be
        given, except the second name of a tied pair; a missing or unknown name is a
        ValueError naming it, raised before anything is copied."""
        check_state_dict_names(self.model, state_dict)
        self.model.load_state_dict(state_dict, strict=False)  # names checked above (ties)

    def update_weights_stream(self, names, chunks) -> None:
        """Copy each chunk into the model as it arrives (no copy of the chunk is kept); the
        names are checked as in `update_weights`, before the first chunk is requested."""
        check_state_dict_names(self.model, dict.fromkeys(names))
        own, seen = self.model.state_dict(), set()  # views of the live tensors
        with torch.no_grad():
            for chunk in chunks:
                for name, tensor in chunk.items():
                    own[name].copy_(tensor)  # what load_state_dict does per tensor
                    seen.add(name)
        check_stream_names(names, seen)


def check_state_dict_names(model, state_dict) -> None:
    """ValueError naming the tensors of `state_dict` the model lacks, and those of the model
    `state_dict` lacks (a name tied to a given one, e.g. lm_head.weight sharing the
    embedding, may be left out)."""
    own = model.state_dict()
    unknown = sorted(set(state_dict) - set(own))
    given = {own[name].data_ptr() for name in state_dict if name in own}
    missing = sorted(name for name in set(own) - set(state_dict)
                     if own[name].data_ptr() not in given)
    if unknown or missing:
        parts = []
        for what, names in (("names the model does not have", unknown),
                            ("model tensors not given", missing)):
            if names:
                shown = ", ".join(names[:8]) + (f" (+{len(names) - 8} more)"
                                                if len(names) > 8 else "")
                parts.append(f"{what}: {shown}")
        raise ValueError(f"weight sync to the transformers engine "
                         f"({type(model).__name__}) does not match its tensors; "
                         + "; ".join(parts))
