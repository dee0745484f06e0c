"""Fallback rollout engine: transformers `generate`."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from attnrl.rollout.base import Completion, RolloutEngine, SamplingConfig, encode_prompts


class HFEngine(RolloutEngine):
    """transformers `generate` on the policy itself (or a copy). `batch_size` prompts per
    call of generate, each with `n` samples."""

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32, **kwargs) -> "HFEngine":
        from attnrl.models import load_model, load_tokenizer

        return cls(load_model(name_or_path, dtype=dtype), load_tokenizer(name_or_path), **kwargs)

    @torch.no_grad()
    def generate(self, prompts, sampling: SamplingConfig,
                 progress: bool = False) -> list[list[Completion]]:
        ids = encode_prompts(self.tokenizer, prompts)
        pad_id = self.tokenizer.pad_token_id
        eos_id = self.tokenizer.eos_token_id
        device = next(self.model.parameters()).device
        greedy = sampling.temperature == 0
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        results: list[list[Completion]] = []
        bar = tqdm(total=len(ids), desc="generate (hf)", unit="prompt", disable=not progress)
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start:start + self.batch_size]
            width = max(map(len, chunk))
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, seq in enumerate(chunk):  # left padding
                input_ids[row, width - len(seq):] = torch.tensor(seq)
                attention_mask[row, width - len(seq):] = 1
            out = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                do_sample=not greedy, temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p, top_k=None,
                max_new_tokens=sampling.max_tokens, num_return_sequences=sampling.n,
                pad_token_id=pad_id, eos_token_id=eos_id, output_logits=True,
                return_dict_in_generate=True)
            new_tokens = out.sequences[:, width:].cpu()
            # raw logits (before temperature / top-p) -> log-probs of the sampled tokens
            logits = torch.stack(out.logits, dim=1).float().cpu()
            logprobs = torch.log_softmax(logits, dim=-1).gather(
                -1, new_tokens.unsqueeze(-1)).squeeze(-1)
            for row in range(new_tokens.shape[0]):
                p = start + row // sampling.n
                tokens = new_tokens[row].tolist()
                length, reason = len(tokens), "length"
                if eos_id in tokens:
                    length, reason = tokens.index(eos_id) + 1, "stop"
                if row % sampling.n == 0:
                    results.append([])
                results[-1].append(Completion(
                    prompt_index=p, sample_index=row % sampling.n, prompt_ids=ids[p],
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
