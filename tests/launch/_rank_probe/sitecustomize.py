"""Observation probe for tests/launch/test_multinode_ranks.py (test-only; loaded through
PYTHONPATH only when ATTNRL_RANK_PROBE names a report directory and the process is a rank
started by a launcher). It changes no behaviour: once `trainers.grpo` / `trainers.heldout`
are imported it wraps a few of their functions to record, per rank, what they computed:

- the per-completion seeds (`training_seeds`) and the credit generator's next draws right
  before `compute_gamma` (what the `random` control draws from);
- the launcher's RANK / LOCAL_RANK, accelerate's view, attnrl's placement
  (`distributed_layout`) and the rollout engine's device;
- the frozen head split, and a digest of every final parameter after `train()`;
- which rank wrote which held-out file.

REPORT/rank{R}.json is written when `train()` returns.
"""

import importlib.abc
import importlib.util
import json
import os
import sys

REPORT = os.environ.get("ATTNRL_RANK_PROBE")
FACTS = {"seeds": [], "credit_draws": [], "heldout_writes": [], "heldout_runs": 0}


def _rank() -> str:
    return os.environ.get("RANK", "?")


def _patch_grpo(module) -> None:
    import torch

    seeds, gamma = module.training_seeds, module.compute_gamma

    def training_seeds(*args, **kwargs):
        rows = seeds(*args, **kwargs)
        FACTS["seeds"].append({"args": [str(a) for a in args[:4]],
                               "rows": None if rows is None else [int(r) for r in rows]})
        return rows

    def compute_gamma(config, *args, generator=None, **kwargs):
        if generator is not None:
            probe = torch.Generator().manual_seed(0)
            probe.set_state(generator.get_state())
            FACTS["credit_draws"].append(torch.rand(8, generator=probe).tolist())
        return gamma(config, *args, generator=generator, **kwargs)

    module.training_seeds, module.compute_gamma = training_seeds, compute_gamma
    trainer_class = module.AttnGRPOTrainer
    train = trainer_class.train

    def observed_train(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        _report(self)
        return result

    trainer_class.train = observed_train


def _patch_heldout(module) -> None:
    write_json, run = module.write_json, module.HeldoutEvaluator.run

    def observed_write_json(path, data):
        FACTS["heldout_writes"].append(os.path.basename(str(path)))
        return write_json(path, data)

    def observed_run(self, *args, **kwargs):
        FACTS["heldout_runs"] += 1
        return run(self, *args, **kwargs)

    module.write_json, module.HeldoutEvaluator.run = observed_write_json, observed_run


def _report(trainer) -> None:
    import hashlib

    from attnrl.rollout.colocate import distributed_layout

    acc = trainer.accelerator
    model = acc.unwrap_model(trainer.model)
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode() + param.detach().float().cpu().numpy().tobytes())
    engine = trainer.engine
    engine_model = getattr(engine, "model", None)
    split = None if trainer.head_split is None else trainer.head_split.split
    FACTS.update(
        env_rank=int(os.environ["RANK"]), env_local_rank=int(os.environ["LOCAL_RANK"]),
        process_index=acc.process_index, local_process_index=acc.local_process_index,
        layout=list(distributed_layout()), device=_device(acc.device),
        engine_device=None if engine_model is None else
        _device(next(engine_model.parameters()).device),
        head_split=None if split is None else repr(split),
        final_digest=digest.hexdigest(), global_step=trainer.state.global_step)
    os.makedirs(REPORT, exist_ok=True)
    with open(os.path.join(REPORT, f"rank{_rank()}.json"), "w") as handle:
        json.dump(FACTS, handle)


def _device(device) -> list:
    """[type, index] with index 0 for an unindexed device ('cpu' is 'cpu:0')."""
    import torch

    device = torch.device(device)
    return [device.type, device.index or 0]


PATCHES = {"trainers.grpo": _patch_grpo, "trainers.heldout": _patch_heldout}


class _Finder(importlib.abc.MetaPathFinder):
    """Runs the patch of a watched module right after the module itself has run."""

    def find_spec(self, name, path=None, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        loader, patch = spec.loader, PATCHES[name]

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                patch(module)

        spec.loader = Loader()
        return spec


if REPORT and "RANK" in os.environ and "LOCAL_RANK" in os.environ:
    sys.meta_path.insert(0, _Finder())

