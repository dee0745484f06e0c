"""`attnrl train` under torchrun with freeze_head_split; each rank writes the micro-batch its
split was calibrated on and the split it holds afterwards.

    torchrun --nproc_per_node 2 tests/trainers/_head_split_worker.py REPORT_DIR --config X ...

REPORT_DIR/batch_rank{R}.safetensors  input_ids, attention_mask, response_mask of the first
                                      training loss forward of rank R
REPORT_DIR/split_rank{R}.json         {"local": L x H, "global": L x H, "layers": [...]}
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv: list[str]) -> None:
    import torch
    from safetensors.torch import save_file

    from trainers.cli import run_job
    from trainers.grpo import AttnGRPOTrainer
    from trainers.job import load_config, parse_overrides

    report_dir, rest = Path(argv[0]), argv[1:]
    config_path = rest[rest.index("--config") + 1]
    rest = rest[:rest.index("--config")] + rest[rest.index("--config") + 2:]
    first = {}
    original = AttnGRPOTrainer._get_per_token_logps_and_entropies

    def recording(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if self._loss_inputs is not None and self.model.training and not first:
            response = torch.zeros_like(attention_mask, dtype=torch.bool)
            response[:, -logits_to_keep:] = self._loss_inputs["completion_mask"].bool()
            first.update(input_ids=input_ids.detach().cpu().clone(),
                         attention_mask=attention_mask.detach().cpu().clone(),
                         response_mask=response.cpu())
        return original(self, model, input_ids, attention_mask, logits_to_keep, *args,
                        **kwargs)

    AttnGRPOTrainer._get_per_token_logps_and_entropies = recording
    trainer = run_job(load_config(config_path, parse_overrides(rest)))
    rank = trainer.accelerator.process_index
    report_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in first.items()},
              report_dir / f"batch_rank{rank}.safetensors")
    local, global_ = trainer.head_split.split
    (report_dir / f"split_rank{rank}.json").write_text(json.dumps(
        {"local": local.tolist(), "global": global_.tolist(),
         "layers": trainer.head_split.layers}))


if __name__ == "__main__":
    main(sys.argv[1:])
