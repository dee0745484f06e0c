"""AttnGRPOConfig: TRL's GRPOConfig plus attnrl's fields (credit, signals, QK-score credit,
outcome estimator, rollout engine), with what building it checks and sets up: the config
refuses, before any model loads, sampling and loss settings attnrl's credit cannot train
with (trainers/schema_rules.py; a reward aggregation other than the weighted sum), and
under DeepSpeed prepares the process (a one-process group without a launcher, no CPU
shared-memory op build) and starts DeepSpeed's communication.

The trainer that reads it: trainers/grpo.py. Every field is also declared, with its range,
in trainers/schema_declarations.py (tests/trainers/test_schema.py keeps the two equal).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trl import GRPOConfig

from attnrl.advantages import estimator_options
from attnrl.credit import CREDIT_RUN_KEYS, SIGNAL_RUN_KEYS, CreditConfig, credit_config_from_run


@dataclass
class AttnGRPOConfig(GRPOConfig):
    """TRL's GRPOConfig plus attention credit, estimator and rollout-engine settings."""

    # ---- credit (docs/methods.md section 1.5)
    credit: str = field(default="uniform", metadata={"help": (
        "Credit strategy: uniform | local_chunk | global_anchor | coupled | random | entropy "
        "| bottom_q | qk_tokens | qk_consistency | qk_premise | sign_flip (join with '+' to "
        "compose; sign_flip, the ablation's positive control, does not compose).")})
    gamma_amp: float = field(default=1.5, metadata={"help": "Amplification of marked tokens."})
    credit_apply_to: str = field(default="both", metadata={
        "help": "Shape advantages of this sign: both | positive | negative."})
    credit_seed: int = field(default=0, metadata={"help": "Seed of the `random` strategy."})
    credit_flip_fraction: float = field(default=0.25, metadata={"help": (
        "`sign_flip` (positive control): fraction of responses whose advantage sign is "
        "flipped; expected advantage (1 - 2 f) A [D].")})
    # ---- signals (docs/methods.md sections 1.1-1.4)
    signal_layers: list[int] | None = field(default=None, metadata={
        "help": "Sampled layers; None = five evenly spaced in the middle third."})
    signal_head_quantile: float = field(default=0.3, metadata={
        "help": "Fraction of heads (by span) taken as local / global."})
    signal_window: int = field(default=10, metadata={"help": "WAAD distance clip W (tokens)."})
    signal_h_lo: int = field(default=10, metadata={"help": "FAI nearest future query (tokens)."})
    signal_h_hi: int | None = field(default=100, metadata={
        "help": "FAI farthest future query (tokens); None = to the end."})
    signal_q: float = field(default=0.4, metadata={
        "help": "Top fraction of response tokens marked preplan / anchor (and for controls)."})
    preplan_by: str = field(default="delta", metadata={"help": "Rank preplan tokens by delta | waad."})
    coupled_k: int = field(default=3, metadata={"help": "Coupled: look-back for intro tokens."})
    coupled_alpha: float = field(default=0.5, metadata={
        "help": "Coupled: share of a dominated anchor's bonus moved to its intro token."})
    tau_waad: float | None = field(default=None, metadata={
        "help": "Coupled: WAAD threshold; None = per-response median."})
    tau_delta: float | None = field(default=None, metadata={
        "help": "Coupled: Delta threshold; None = per-response median."})
    freeze_head_split: bool = field(default=False, metadata={
        "help": "Calibrate the local/global head split on the first training batch (the "
                "union over processes) and keep it; saved in checkpoints "
                "(trainers/head_split.py)."})
    # ---- QK-score credit (docs/methods.md section 2; trainers/qk_heads.py)
    qk_top_k: int = field(default=4, metadata={"help": "QK: heads kept by AUC."})
    qk_reselect_every: int = field(default=10, metadata={
        "help": "QK: re-select the heads every N optimizer steps."})
    qk_ema: float = field(default=0.9, metadata={"help": "QK: EMA decay of the per-head AUC."})
    qk_damp: float = field(default=0.5, metadata={
        "help": "qk_consistency: largest damping, factor in [1 - qk_damp, 1]."})
    qk_layers: list[int] | None = field(default=None, metadata={
        "help": "QK: candidate layers (all their heads); None = the signal layers."})
    qk_reduce: str = field(default="mean", metadata={
        "help": "QK: reduce the answer query's scores over its keys: mean | max."})
    # ---- outcome advantages
    advantage_estimator: str = field(default="grpo", metadata={
        "help": "grpo | dr_grpo | rloo | psr | nsr | w_reinforce (attnrl.advantages)."})
    advantage_eps: float = field(default=1e-4, metadata={
        "help": "grpo: std epsilon (1e-4 as TRL's GRPOTrainer; docs/methods.md section 6 "
                "writes 1e-6)."})
    w_reinforce_lambda: float = field(default=0.1, metadata={
        "help": "w_reinforce: weight of positive samples."})
    correctness_threshold: float | None = field(default=None, metadata={
        "help": "psr/nsr/w_reinforce: reward >= threshold counts as correct (else rewards "
                "must be exactly 0/1)."})
    # ---- rollout engine
    rollout_engine: str = field(default="vllm", metadata={
        "help": "vllm (in-process) | vllm_server (launch/vllm_server.sh) | hf."})
    rollout_server_url: str | None = field(default=None, metadata={
        "help": "vllm_server: base URL of the server, e.g. http://127.0.0.1:8000."})
    rollout_server_timeout: float = field(default=600.0, metadata={
        "help": "vllm_server: seconds to wait for the server to answer /health."})
    rollout_server_weights_dir: str | None = field(default=None, metadata={
        "help": "vllm_server: the directory the server accepts weights from (its "
                "--weights-dir), as the trainer sees it; None = the server's. The secret: "
                "env ATTNRL_ROLLOUT_API_KEY."})
    rollout_lag: int = field(default=0, metadata={
        "help": "vllm_server: 1 = generate the next batch while training on this one (the "
                "weights one optimizer step older generate it; TRL's token-level importance "
                "ratio corrects the lag: trainers/rollout_lag.py); 0 = no overlap."})
    rollout_kv_cache_gib: float = field(default=0.5, metadata={
        "help": "vLLM KV cache size (CPU, or GPU when gpu_memory_utilization is None)."})
    rollout_gpu_memory_utilization: float | None = field(default=None, metadata={
        "help": "vLLM GPU memory fraction on CUDA nodes (colocated with training)."})
    rollout_max_model_len: int | None = field(default=None, metadata={
        "help": "vLLM max sequence length; None = max(2048, max_completion_length + 1024), "
                "at most the model's context (max_position_embeddings)."})
    rollout_enforce_eager: bool | None = field(default=None, metadata={
        "help": "vLLM without CUDA graphs; None = by device (attnrl/rollout/engine_settings.py: "
                "true on CPU, false on GPUs)."})
    rollout_enable_chunked_prefill: bool | None = field(default=None, metadata={
        "help": "vLLM chunked prefill; None = by device (false on CPU, true on GPUs)."})
    # ---- TRL's field, attnrl's default (trainers/schema_engine.py: default_is_mode)
    vllm_importance_sampling_mode: str | None = field(default=None, metadata={
        "help": "TRL's importance-sampling mode; None = token_truncate for completions longer "
                "than 1024 tokens (or loss_type vespo), else sequence_mask."})
    log_credit_completions: int = field(default=2, metadata={
        "help": "Completions shown with their per-token advantages at every logging step "
                "(OUTPUT_DIR/credit/step-N.html; W&B table credit/completions): the highest "
                "and lowest outcome advantage first; 0 = off (trainers/credit_log.py)."})
    metrics_jsonl: str | None = field(default="metrics.jsonl", metadata={
        "help": "Local JSONL of every logged metric, relative to output_dir (None: off)."})

    def __post_init__(self):
        from attnrl.errors import UserError
        from trainers.rollout_lag import lag_problem
        from trainers.schema import liger_problem, top_p_problem
        from trainers.schema_engine import default_is_mode, engine_key_problems

        check_reward_aggregation(self.multi_objective_aggregation)
        for problem in (top_p_problem(self.top_p, self.vllm_importance_sampling_correction),
                        liger_problem(self.use_liger_kernel), *engine_key_problems(self),
                        lag_problem(self.rollout_lag, self.rollout_engine,
                                    self.vllm_importance_sampling_correction,
                                    self.vllm_importance_sampling_mode)):
            if problem:  # before any model loads (run_job builds the config first)
                raise UserError(problem)
        if self.vllm_importance_sampling_mode is None:
            self.vllm_importance_sampling_mode = default_is_mode(
                self.max_completion_length, self.loss_type, self.rollout_lag)
        if self.deepspeed:
            set_single_process_env()
            skip_cpu_shm_comm_op()
        super().__post_init__()
        if self.deepspeed:  # ZeRO-3 shards models as they load: DeepSpeed's comm must be up
            import deepspeed  # (accelerate started it on GPUs; use_cpu: only torch.distributed)

            deepspeed.init_distributed()

    def credit_config(self) -> CreditConfig:
        """Its credit and signal keys as attnrl's CreditConfig (attnrl.credit)."""
        keys = {**SIGNAL_RUN_KEYS, **CREDIT_RUN_KEYS}
        return credit_config_from_run({key: getattr(self, key) for key in keys})

    def estimator_kwargs(self) -> dict:
        wanted = {"eps": self.advantage_eps, "scale_std": self.scale_rewards,
                  "lambda_": self.w_reinforce_lambda,
                  "correctness_threshold": self.correctness_threshold}
        accepted = estimator_options(self.advantage_estimator)
        return {k: v for k, v in wanted.items() if k in accepted}


REWARD_AGGREGATION = "sum_then_normalize"
"""The one value of TRL's `multi_objective_aggregation` attnrl implements: the estimators of
attnrl.advantages see the weighted sum of the reward functions."""


def check_reward_aggregation(value) -> None:
    """UserError for a `multi_objective_aggregation` other than the weighted sum."""
    if value != REWARD_AGGREGATION:
        from attnrl.errors import UserError

        raise UserError(
            f"multi_objective_aggregation {value!r} is not supported: attnrl's advantage "
            f"estimators take the weighted sum of the rewards ({REWARD_AGGREGATION!r}); "
            f"remove the key or set it to {REWARD_AGGREGATION!r}")


_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def set_single_process_env() -> None:
    """Without a launcher (torchrun, deepspeed, mpirun), set the env:// variables of a
    one-process group, which DeepSpeed needs even then. MASTER_PORT: a free local port."""
    if any(name in os.environ for name in _LAUNCHER_VARS):
        return
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))


def skip_cpu_shm_comm_op() -> None:
    """On DeepSpeed's CPU accelerator, keep its comm backend from JIT-compiling the
    shared-memory all-reduce op (minutes on first use). Only DeepSpeed inference's
    all-reduce uses that op; training collectives go through torch.distributed (gloo)
    either way. No effect on GPU accelerators."""
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        return
    if get_accelerator().device_name() != "cpu":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

