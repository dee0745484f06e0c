"""Test environment: offline, single-threaded math, tiny models built here."""

import os

# Before torch / transformers / vLLM are imported by any test module.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(1)

# Property tests are derandomized: the same examples on every run and every machine, so a
# CI result is reproducible (a failure found once is found again). No example database.
settings.register_profile("attnrl", derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("attnrl")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama (GQA 4/2 heads, head_dim 32) + locally trained tokenizer."""
    from attnrl.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama",
                           num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from attnrl.models import build_tiny_tokenizer

    return build_tiny_tokenizer()
