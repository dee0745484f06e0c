"""Bounded tiles for TRL's fused LM head where it runs its torch fallback (CPU).

The loss forward's per-token log-probs and entropies come from TRL's fused LM head
(`trl.trainer.utils.add_fused_lm_head`, installed by GRPOTrainer): the (tokens x vocabulary)
logits are never held whole; the head is projected in tiles of `TOKEN_CHUNK_SIZE` tokens
(4096) x 32768 vocabulary entries, forward and backward. With Triton (CUDA) each tile is
folded in place. Without it (CPU) each tile is folded by torch ops that allocate about eight
tile-sized float32 temporaries: with 4096-token tiles about 4 GiB at the step's peak,
whatever the completion length. Measured (SmolLM2-135M, 4 x (64 + 2048) tokens, gradient
checkpointing, CPU): step peak +6.6 GB with TRL's tiles, +4.0 GB with 512-token tiles, same
step time. `bound_fused_head_tiles` caps the tile's token count there so that one float32
tile holds at most TILE_BYTES. The numbers are the same up to float32 rounding (each token's
log-prob is computed alone; only the order of the weight-gradient sums over tiles changes):
tests/trainers/test_grpo_logprobs.py checks them against full logits.

TRL reads the tile size as a module constant at every call (forward and backward), so the
cap is process-wide: every TRL trainer in the process then uses it on such devices.
"""

from __future__ import annotations

import torch

TILE_BYTES = 64 << 20
"""Most bytes of one float32 (tokens x vocabulary chunk) tile on a device without Triton."""


def bound_fused_head_tiles(device: torch.device | str) -> int | None:
    """Cap TRL's fused-LM-head token tile on `device` when it has no Triton (the torch
    fallback); returns the tokens per tile now in force, or None where nothing applies."""
    try:
        import trl.kernels.chunked_logprob as chunked
        import trl.trainer.utils as trl_utils
    except ImportError:  # a TRL without the fused head: nothing to bound
        return None
    if not hasattr(chunked, "TOKEN_CHUNK_SIZE") or chunked._use_triton(torch.device(device)):
        return None
    vocab_chunk = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)
    rows = max(64, TILE_BYTES // (4 * vocab_chunk))
    chunked.TOKEN_CHUNK_SIZE = min(chunked.TOKEN_CHUNK_SIZE, rows)
    return chunked.TOKEN_CHUNK_SIZE
