"""The credit, visible during training: at every logging step, a few of the step's
completions with the per-token advantages that reached the loss (attnrl/signals/
credit_page.py), written to OUTPUT_DIR/credit/step-N.html and, when the run reports to
W&B, as the table `credit/completions` (one row per completion, its tokens coloured).

`log_credit_completions` (default 2) completions per logged step: the first loss
micro-batch of the step on the main process gives them, the ones with the highest and
lowest outcome advantage first (both colours on the page); 0 turns it off.
"""

from __future__ import annotations

from pathlib import Path


class CreditLog:
    def __init__(self, count: int, logging_steps: int):
        self.count, self.every = int(count), max(1, int(logging_steps))
        self.pending: list[dict] = []
        self.captured_step: int | None = None

    def due(self, global_step: int) -> bool:
        """Whether the loss forward running now (it will make step global_step + 1) is one
        whose step gets logged, and nothing was captured for it yet."""
        step = global_step + 1
        return self.count > 0 and step % self.every == 0 and self.captured_step != step

    def capture(self, global_step, tokenizer, inputs, outcome, token_advantages, gamma,
                signals, logits_to_keep: int) -> None:
        """Keep `count` completions of this micro-batch. outcome: (B,) A_i; token_advantages:
        (B, C) over the completion; gamma and the signal masks over the whole input."""
        from attnrl.signals.credit_page import credit_sample

        self.captured_step = global_step + 1
        mask = inputs["completion_mask"].bool()
        rows = [r for r in range(mask.shape[0]) if mask[r].any()]
        rows.sort(key=lambda r: float(outcome[r]))
        order = []
        while rows and len(order) < self.count:  # highest, lowest, next highest, ...
            order.append(rows.pop())
            if rows and len(order) < self.count:
                order.append(rows.pop(0))
        self.pending = []
        tail = slice(gamma.shape[1] - logits_to_keep, None)
        for row in order:
            keep = mask[row].cpu()

            def response(tensor, row=row, keep=keep):  # at the completion's real tokens
                return tensor[row, tail].detach().cpu()[keep].tolist()
            prompt = inputs["prompt_ids"][row].cpu()[inputs["prompt_mask"][row].cpu().bool()]
            self.pending.append(credit_sample(
                tokenizer, prompt.tolist(), inputs["completion_ids"][row].cpu()[keep].tolist(),
                token_advantages[row].detach().cpu()[keep].tolist(), response(gamma),
                float(outcome[row]),
                preplan=None if signals is None else response(signals.preplan_mask),
                anchor=None if signals is None else response(signals.anchor_mask),
                step=self.captured_step))

    def write(self, output_dir, step: int, credit: str, report_to) -> Path | None:
        """The page of the captured completions (and the W&B table); None when none."""
        if not self.pending:
            return None
        from attnrl.signals.credit_page import render_credit_html, scale_of, token_spans

        samples, self.pending = self.pending, []
        path = render_credit_html(samples, Path(output_dir) / "credit" / f"step-{step:06d}.html",
                                  title=f"credit '{credit}' at step {step}")
        reporters = [report_to] if isinstance(report_to, str) else list(report_to or [])
        if "wandb" in reporters or "all" in reporters:
            import wandb

            if wandb.run is not None:
                scale = scale_of(samples)
                table = wandb.Table(columns=["step", "outcome_advantage", "prompt", "tokens"])
                for s in samples:
                    table.add_data(step, s["outcome"], s["prompt"],
                                   wandb.Html(token_spans(s, scale)))
                wandb.run.log({"credit/completions": table, "train/global_step": step})
        return path
