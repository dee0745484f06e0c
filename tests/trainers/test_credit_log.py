"""The credit, visible during training (trainers/credit_log.py): at every logging step the
page OUTPUT_DIR/credit/step-N.html shows the completions with the highest and lowest
outcome advantage, each token with the advantage that reached TRL's loss."""

import pytest

from attnrl.signals.credit_page import render_credit_html
from tests.trainers.test_grpo import dataset, make_trainer  # noqa: F401  (a fixture)
from tests.trainers.test_rollout_lag import peaked_model
from trainers.credit_log import CreditLog
from trainers.grpo import AttnGRPOConfig, AttnGRPOTrainer


def test_pages_show_what_reached_the_loss(tmp_path, dataset, monkeypatch):  # noqa: F811
    written = []
    write = CreditLog.write

    def keep(self, output_dir, step, credit, report_to):
        if self.pending:
            written.append((step, [dict(s) for s in self.pending]))
        return write(self, output_dir, step, credit, report_to)

    monkeypatch.setattr(CreditLog, "write", keep)
    trainer = make_trainer(AttnGRPOTrainer, AttnGRPOConfig, tmp_path, dataset,
                           model=peaked_model(), credit="coupled", signal_h_lo=2,
                           signal_h_hi=6, signal_window=4, max_steps=2, bf16=False,
                           log_credit_completions=2)
    seen = []
    compute = AttnGRPOTrainer._compute_loss

    def record(self, model, inputs):
        outcome = inputs["advantages"].clone()
        loss = compute(self, model, inputs)
        seen.append((outcome, self.last_token_advantages.detach().clone(),
                     inputs["completion_mask"].bool().clone()))
        return loss

    monkeypatch.setattr(AttnGRPOTrainer, "_compute_loss", record)
    trainer.train()
    assert [step for step, _ in written] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "credit").glob("*.html")) == \
        ["step-000001.html", "step-000002.html"]
    for (step, samples), (outcome, token_adv, mask) in zip(written, seen):
        assert [s["outcome"] for s in samples] == pytest.approx(
            [outcome.max().item(), outcome.min().item()])
        rows = [token_adv[r][mask[r]].tolist() for r in range(len(outcome))]
        for sample in samples:  # exactly a row of what reached the loss
            assert any(sample["advantage"] == pytest.approx(row, abs=1e-6) for row in rows)
            expected = [g * sample["outcome"] for g in sample["gamma"]]
            assert sample["advantage"] == pytest.approx(expected, abs=1e-6)
            assert len(sample["tokens"]) == len(sample["advantage"]) == len(sample["preplan"])
        assert any(g != 1 for s in samples for g in s["gamma"]), "no credit: a vacuous page"
        page = (tmp_path / "credit" / f"step-{step:06d}.html").read_text()
        assert page.count("<span title='token ") == sum(len(s["tokens"]) for s in samples)


def test_page_colours_follow_the_sign_and_marks():
    sample = {"prompt": "p", "tokens": ["a", "b", "c"], "advantage": [2.0, -1.0, 0.0],
              "gamma": [2.0, 1.0, 1.0], "preplan": [True, False, False],
              "anchor": [False, True, False], "outcome": 1.0}
    import tempfile
    from pathlib import Path

    path = render_credit_html([sample], Path(tempfile.mkdtemp()) / "c.html", title="t")
    text = path.read_text()
    assert "background:#1a9641" in text      # +2, the page's largest: full green
    assert "background:#eb9893" in text      # -1: half red
    assert "background:#ffffff" in text      # 0: white
    assert text.count("border-bottom:3px solid #1f3fbf") == 2  # the preplan token (+ legend)
    assert "outline:2px solid #000;outline-offset" in text        # the anchor token
