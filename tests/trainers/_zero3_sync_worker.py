"""`attnrl train` under ZeRO-3, then one more engine sync into a poisoned HF engine, observed.

    torchrun --nproc_per_node 2 tests/trainers/_zero3_sync_worker.py REPORT_DIR --config X ...

Before the sync every engine tensor is set to NaN (a tensor the sync skips stays NaN). The
observation: every `deepspeed.zero.GatheredParameters` entered during the sync records the
bytes of non-persistent ZeRO-3 parameters gathered at that moment (trainers.weight_sync.
gathered_bytes; the real DeepSpeed context runs, only wrapped). The reference is the full
model gathered at once after the sync (LoRA: merged, trainers.lora_merge.merged_lora_state_dict). REPORT_DIR/rank{R}.json holds the facts.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv: list[str]) -> None:
    import deepspeed
    import torch

    from trainers import weight_sync
    from trainers.cli import run_job
    from trainers.job import load_config, parse_overrides
    from trainers.weight_sync import full_bytes, gathered_bytes

    report_dir, rest = Path(argv[0]), argv[1:]
    config_path = rest[rest.index("--config") + 1]
    rest = rest[:rest.index("--config")] + rest[rest.index("--config") + 2:]
    trainer = run_job(load_config(config_path, parse_overrides(rest)))
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.engine is None:  # the job closed it: a fresh one (loads the initial weights)
        trainer.sync_engine_weights()
    engine_model = trainer.engine.model
    with torch.no_grad():
        for tensor in engine_model.state_dict().values():
            tensor.fill_(float("nan"))

    peaks, events, trimmed = [], [], []
    context = deepspeed.zero.GatheredParameters
    enter, release = context.__enter__, weight_sync.release_cpu_heap

    def observed_enter(self):
        result = enter(self)
        peaks.append(gathered_bytes(model))
        events.append("gather")
        return result

    def observed_release():  # the CPU heap hand-back between buckets, observed
        trimmed.append(release())
        events.append("release")
        return trimmed[-1]

    context.__enter__, weight_sync.release_cpu_heap = observed_enter, observed_release
    try:
        trainer.sync_engine_weights()  # a collective under ZeRO-3: every rank gathers
    finally:
        context.__enter__, weight_sync.release_cpu_heap = enter, release

    with context(list(model.parameters())), torch.no_grad():
        if hasattr(model, "peft_config"):  # LoRA: the merged weights, all at once
            from trainers.lora_merge import merged_lora_state_dict

            reference = merged_lora_state_dict(model)
        else:
            reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    engine_state = engine_model.state_dict()
    params = list(model.parameters())
    sizes = [full_bytes(p) for p in params if not getattr(p, "ds_persist", False)]
    rank = trainer.accelerator.process_index
    facts = {
        "rank": rank, "global_step": trainer.state.global_step,
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
        "names_equal": sorted(engine_state) == sorted(reference),
        "not_equal": [k for k in reference if not torch.equal(engine_state[k], reference[k])],
        "gathers": len(peaks), "peak_gathered_bytes": max(peaks, default=0),
        "events": events, "heap_released": trimmed,
        "buckets": trainer.last_sync_stats.buckets,
        "partitioned_bytes": sum(sizes), "largest_partitioned_bytes": max(sizes),
        "model_bytes": sum(full_bytes(p) for p in params),
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"rank{rank}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    main(sys.argv[1:])
