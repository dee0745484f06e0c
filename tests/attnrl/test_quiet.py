"""Quiet by default: the known harmless library messages are dropped where they arise,
anything else still shows, and --verbose keeps everything (attnrl/quiet.py)."""

import logging
import warnings

from attnrl import quiet


def test_known_messages_are_dropped_and_others_kept(caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.configure(verbose=False)
        warnings.warn("TRL currently supports vLLM versions from 0.22.0 to 0.31.0.", UserWarning)
        warnings.warn("`torch.distributed.reduce_op` is deprecated", FutureWarning)
        warnings.warn("something new", UserWarning)
    assert [str(w.message) for w in caught] == ["something new"]
    with caplog.at_level(logging.INFO):
        logging.getLogger("DeepSpeed").propagate = True  # DeepSpeed's own logger does not
        try:
            logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU")
        finally:
            logging.getLogger("DeepSpeed").propagate = False
        logging.getLogger("vllm.engine.arg_utils").warning(
            "The global random seed is set to %d.", 0)
        logging.getLogger("vllm.platforms.cpu").warning("Triton is not installed.")
        logging.getLogger("vllm.v1.worker.cpu_worker").warning(
            "libtcmalloc is not found in LD_PRELOAD. For best performance, ...")
        logging.getLogger("torch._library.triton").warning("Triton not available, x")
    assert [r.getMessage() for r in caplog.records] == [
        "libtcmalloc is not found in LD_PRELOAD. For best performance, ..."]


def test_versions_line_is_one_line():
    line = quiet.versions_line({"python": "3.11.7", "trl": "1.16.0"})
    assert line == "python 3.11.7 | trl 1.16.0"
