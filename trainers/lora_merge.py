"""The weights a PEFT LoRA policy stands for, merged out of place: what the rollout engine
loads at every weight sync (trainers/weight_sync.py streams them bucket by bucket)."""

from __future__ import annotations

import torch


def tied_elsewhere(model, param) -> bool:
    """Whether `param` is registered under more than one name in `model` (tied weights)."""
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is param]
    return len(names) > 1


def merged_lora_state_dict(model, only: set[str] | None = None) -> dict[str, torch.Tensor]:
    """HF-named full weights of a PEFT LoRA model, equal to what PEFT's merge gives:
    W + (alpha / r) * B @ A for each adapted layer, and with `lora_bias` also
    b + (alpha / r) * b_B. Computed out of place (merging into the frozen base and back
    would leave rounding error in it at every sync); the sum is taken in the promoted
    dtype and rounded once to the base dtype, as PEFT's in-place add does. `only`: the
    PEFT state-dict names to produce (a gathered ZeRO-3 bucket, trainers/weight_sync.py);
    None: all."""
    import re

    from peft.tuners.lora import LoraLayer

    from attnrl.errors import UserError

    deltas = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or module.merged:
            continue
        if only is not None and f"{name}.base_layer.weight" not in only:
            continue
        active = [a for a in module.active_adapters if a in module.lora_A]
        if any(module.use_dora.get(a) for a in active):
            raise UserError("DoRA adapters cannot be synced to the rollout engine as merged "
                            "weights; use plain LoRA (lora: {use_dora: false})")
        if not active:
            continue
        if tied_elsewhere(model, module.get_base_layer().weight):
            raise UserError(f"LoRA on {name}, whose weight is tied to another layer's (tied "
                            "embeddings): the engines load one of the pair, so the delta would "
                            "be lost or applied to both; leave lm_head out of "
                            "lora.target_modules")
        deltas[f"{name}.base_layer.weight"] = [module.get_delta_weight(a) for a in active]
        biased = [a for a in active if module.lora_bias.get(a)]
        if biased:
            if getattr(module.get_base_layer(), "bias", None) is None:
                raise UserError(f"LoRA with lora_bias on {name}, whose layer has no bias: "
                                "PEFT cannot merge it either; set lora: {lora_bias: false}")
            deltas[f"{name}.base_layer.bias"] = [
                module.lora_B[a].bias * module.scaling[a] for a in biased]
    state = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name or ".original_module." in name or (only is not None
                                                              and name not in only):
            continue
        value = tensor.detach()
        if name in deltas:
            for delta in deltas[name]:  # adapter by adapter, as PEFT merges them
                value = (value.to(torch.promote_types(value.dtype, delta.dtype))
                         + delta.detach()).to(tensor.dtype)
        else:
            value = value.clone()
        name = re.sub(r"\.modules_to_save\.[^.]+", "", name)
        state[name.replace("base_model.model.", "", 1).replace(".base_layer", "")] = value
    return state
