"""ZeRO-3 weight sync to the rollout engine in bounded memory: 2 real processes (torchrun,
gloo, DeepSpeed ZeRO-3 on CPU) train the tiny job one step, then sync into HF engines whose
tensors were all set to NaN. Nothing is simulated; the worker only observes (it wraps
`deepspeed.zero.GatheredParameters.__enter__` to read how many parameter bytes are gathered
at each gather, see tests/trainers/_zero3_sync_worker.py).

Before the bucketed sync (one gather of every parameter, then a clone of each) the peak
was every partitioned parameter at once: the bound below failed with peak == the
partitioned bytes of the whole model."""

import json
import platform
import sys
from pathlib import Path

import pytest

from tests.trainers.test_deepspeed import launch

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_zero3_sync_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2"]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_zero3_sync_is_exact_and_gathers_one_bucket_at_a_time(tiny_model_dir, tmp_path, lora):
    """LoRA: each adapted layer's base weight and adapters are gathered in one bucket and
    merged there; the engine must hold W + (alpha / r) B A exactly as a full merge gives."""
    out, report = tmp_path / "run", tmp_path / "report"
    extra = ["--lora", "{r: 8, lora_alpha: 16}"] if lora else []
    launch(TORCHRUN + [str(WORKER), str(report), "--config", "configs/tiny.yaml",
                       "--model", str(tiny_model_dir), "--output_dir", str(out),
                       "--max_steps", "1", "--deepspeed", "configs/deepspeed/zero3.json",
                       *extra], tmp_path / "log.txt")
    facts = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    for f in facts:
        assert f["zero_stage"] == 3 and f["global_step"] == 1
        # exact: every engine tensor (all NaN before) equals the fully gathered model
        assert f["names_equal"] and f["not_equal"] == [], f
        # bounded: never more gathered at once than the largest tensor (the default
        # bucket), while the partitioned parameters are several times that
        assert f["gathers"] > 1
        assert f["peak_gathered_bytes"] <= f["largest_partitioned_bytes"], f
        assert f["partitioned_bytes"] >= 3 * f["largest_partitioned_bytes"], f
        # CPU: each bucket's heap is handed back once it is released, before the next gather
        assert f["gathers"] == f["buckets"]
        assert f["events"] == ["gather", "release"] * f["buckets"], f["events"]
        if platform.libc_ver()[0] == "glibc":  # malloc_trim exists: it ran
            assert all(f["heap_released"]), f["heap_released"]
