"""The frozen local / global head split of a run (`freeze_head_split: true`).

Calibrated once, on the first *training* loss forward (evaluation forwards never set it):
every process sums its heads' spans over its response tokens and counts those tokens
(attnrl.signals.aggregate.head_span_totals); both sums are added over processes, so every
rank selects the same heads, the split of the union of their micro-batches. A forward in
which no process has a response token leaves the split uncalibrated until the next one.

The split is saved as `head_split.json` in each checkpoint and restored on resume (a
checkpoint without it: calibrated afresh). Layout: {"layers": [...], "local": L x H bools,
"global": L x H bools}.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from attnrl.errors import UserError
from attnrl.signals.aggregate import head_span_totals, select_heads
from attnrl.signals.types import HeadStats

STATE_FILE = "head_split.json"


class FrozenHeadSplit:
    """The run's head split: None until calibrated (or restored)."""

    def __init__(self, quantile: float):
        self.quantile = quantile
        self.layers: list[int] | None = None
        self.split: tuple[torch.Tensor, torch.Tensor] | None = None

    def calibrate(self, stats: HeadStats, response_mask: torch.Tensor,
                  reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> bool:
        """Set the split from this forward's statistics, summed over processes with
        `reduce_sum` (a collective: every process must call it; None: one process).
        stats (B, L, H, N); response_mask (B, N). False when no process had a response
        token (the split stays unset)."""
        span_total, tokens = head_span_totals(stats, response_mask)
        packed = torch.cat([span_total.reshape(-1), tokens.reshape(1)])
        if reduce_sum is not None:
            packed = reduce_sum(packed)
        packed = packed.cpu()
        if packed[-1] <= 0:
            return False
        pooled = (packed[:-1] / packed[-1]).view(span_total.shape)
        self.split = select_heads(pooled, self.quantile)
        self.layers = list(stats.layers)
        return True

    # ---- checkpoints
    def save(self, directory) -> None:
        if self.split is None:
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        local, global_ = self.split
        (directory / STATE_FILE).write_text(json.dumps(
            {"layers": self.layers, "local": local.tolist(), "global": global_.tolist()}))

    def load(self, directory, layers: list[int] | None = None) -> bool:
        """Restore the split saved in a checkpoint directory; False if it has none.
        `layers`: the run's sampled layers; a split saved for other layers is an error."""
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            return False
        state = json.loads(path.read_text())
        if layers is not None and list(state["layers"]) != list(layers):
            raise UserError(f"{path} holds a head split of layers {state['layers']}, but this "
                            f"run samples layers {list(layers)}: resume with the same "
                            "signal_layers, or delete the file to calibrate afresh")
        self.layers = list(state["layers"])
        self.split = (torch.tensor(state["local"], dtype=torch.bool),
                      torch.tensor(state["global"], dtype=torch.bool))
        return True
