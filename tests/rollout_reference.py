"""Plain reference of the rollout engines' log-probs (the sampling distribution)."""

import torch


def nucleus_logprobs(logits, temperature, top_p):
    """Plain reference: log-probs of softmax(logits / T) restricted to the smallest set of
    most likely tokens whose probability reaches top_p, renormalized (-inf outside)."""
    out = torch.full_like(logits, float("-inf"))
    for row in range(logits.shape[0]):
        probs = torch.softmax(logits[row].double() / temperature, -1)
        kept, mass = [], 0.0
        for token in probs.argsort(descending=True).tolist():
            kept.append(token)
            mass += probs[token].item()
            if mass >= top_p:
                break
        out[row, kept] = torch.log(probs[kept] / probs[kept].sum()).float()
    return out
