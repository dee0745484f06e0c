"""Attention-guided GRPO on TRL's GRPOTrainer.

What this adds to TRL (everything else — loss types, DeepSpeed via accelerate, PEFT,
W&B, checkpoints — is TRL's and keeps TRL's field names):

1. Generation through an attnrl rollout engine (in-process vLLM, or transformers), with the
   policy's weights pushed to it whenever the optimizer has stepped (ZeRO-3: gathered
   bucket by bucket, trainers/weight_sync.py).
   Every completion row has its own seed (attnrl.rollout.seeds); the engines' log-probs
   are TRL's (temperature-scaled), so TRL's truncated importance-sampling correction
   (`vllm_importance_sampling_correction`, on by default) runs on them as on TRL's vLLM.
2. Advantages from attnrl's estimator registry (`advantage_estimator`).
3. Per-token credit: inside the loss forward TRL already runs, attention statistics are
   captured for the sampled layers (no second model, no extra forward), turned into
   gamma_t by the credit strategy, and the advantages reaching TRL's loss become
   A_{i,t} = gamma_t * A_i.
4. QK-score credit (`qk_tokens`, `qk_consistency`, `qk_premise`): the answer query's QK-scores come from
   the same forward (trainers/qk_heads.py: head selection from rollouts, checkpointed).
5. Resumable data order: the prompt order of epoch e is a function of (seed, e)
   (`EpochSeededRepeatSampler`), so a run resumed in a later epoch sees the prompts an
   uninterrupted run would; TRL's sampler continues one generator across epochs, which a
   resumed process cannot restore.
6. Whole checkpoints: TRL's save is written to OUTPUT_DIR/tmp-checkpoint-N by every rank and
   renamed to checkpoint-N once all have finished (trainers/checkpoints.py).

Its config, AttnGRPOConfig (TRL's GRPOConfig plus attnrl's fields), is in
trainers/grpo_config.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch
from trl import GRPOTrainer
from trl.trainer.utils import RepeatSampler

from attnrl.advantages import compute_advantages
from attnrl.credit import (
    compute_gamma,
    credit_metrics,
    make_generator,
    required_inputs,
    shape_advantages,
    step_seed,
)
from attnrl.rollout import SamplingConfig, make_engine
from attnrl.rollout.seeds import first_rows, training_seeds
from trainers.grpo_config import AttnGRPOConfig  # also imported from here (trainers.grpo)
from trainers.head_split import FrozenHeadSplit
from trainers.qk_heads import QKCredit, needs_qk
from trainers.rollout_lag import RolloutLagMixin

logger = logging.getLogger(__name__)


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's RepeatSampler (same indices, same repeats) whose shuffle restarts from
    hash(seed, epoch) at every epoch; epoch 0 is TRL's own order (generator seeded with
    `seed`). The trainer calls `set_epoch` before each epoch, also when resuming."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(self.seed if self.epoch == 0 else
                                       (self.seed * 1_000_003 + self.epoch) % (1 << 63))
        return super().__iter__()


class AttnGRPOTrainer(RolloutLagMixin, GRPOTrainer):
    """GRPOTrainer with attnrl rollouts, estimators and attention-guided credit; with
    `rollout_lag` 1, generation one step ahead of training (trainers/rollout_lag.py).

    Extra argument: `rollout_engine`, an attnrl RolloutEngine to use instead of creating
    one from the config (e.g. shared between runs in tests).
    """

    def __init__(self, *args, rollout_engine=None, **kwargs):
        super().__init__(*args, **kwargs)
        from trainers.fused_head import bound_fused_head_tiles

        bound_fused_head_tiles(self.accelerator.device)  # CPU: LM-head tiles of <= 64 MiB
        config: AttnGRPOConfig = self.args
        self.credit_config = config.credit_config()
        self.credit_inputs = required_inputs(self.credit_config)
        check_softcapping_kept(self.model)
        if "signals" in self.credit_inputs or needs_qk(self.credit_inputs):
            # an attention the capture / the QK scores cannot compute: now
            from attnrl.signals.capture import check_capture_supported

            check_capture_supported(self.model)
        self.credit_generator = make_generator(self.credit_config)
        self._credit_step = None
        self.engine = rollout_engine
        self._engine_step = None          # global_step whose weights the engine holds
        self._loss_inputs = None          # inputs dict of the loss call in progress
        self.head_split = FrozenHeadSplit(config.signal_head_quantile) \
            if config.freeze_head_split and "signals" in self.credit_inputs else None
        self.last_token_advantages = None  # (B, T) what reached the loss, for inspection
        self.qk_credit = QKCredit(self.model, config, self.credit_config, self.eos_token_ids) \
            if needs_qk(self.credit_inputs) else None
        self._generation_calls = {}  # phase -> (global_step, generation calls in that step)
        from trainers.credit_log import CreditLog

        self.credit_log = CreditLog(config.log_credit_completions, config.logging_steps) \
            if config.log_credit_completions and self.accelerator.is_main_process else None
        self._check_is_correction()

    def _get_train_sampler(self, dataset=None):
        sampler = super()._get_train_sampler(dataset)
        if type(sampler) is RepeatSampler:  # same state, per-epoch seeding
            sampler.__class__ = EpochSeededRepeatSampler
        return sampler

    def _issue_warnings_after_load(self, load_result) -> None:
        """transformers warns "missing keys ['lm_head.weight']" on every resume of a model
        with tied embeddings (the tied copy is not saved; loading its twin fills it). Drop
        the missing keys that share their tensor with a loaded parameter; warn on the rest."""
        groups: dict[int, list[str]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
        missing = set(load_result.missing_keys)
        tied = {name for names in groups.values() if any(n not in missing for n in names)
                for name in names}
        super()._issue_warnings_after_load(load_result._replace(
            missing_keys=[k for k in load_result.missing_keys if k not in tied]))

    # ------------------------------------------------------------------ TRL's IS correction
    def _check_is_correction(self) -> None:
        config: AttnGRPOConfig = self.args
        if self.loss_type == "vespo" and config.vllm_importance_sampling_correction and \
                config.vllm_importance_sampling_mode not in ("token_truncate", "token_mask"):
            raise ValueError("VESPO loss requires `vllm_importance_sampling_mode` to be either "
                             "'token_truncate' or 'token_mask'. Got: "
                             f"{config.vllm_importance_sampling_mode}.")

    @contextlib.contextmanager
    def _trl_vllm_path(self, on: bool):
        """TRL runs its importance-sampling correction (ratio, metrics, loss weight) only when
        `use_vllm`; attnrl's engines return the same log-probs TRL's vLLM does, so inside
        this context TRL takes that path (its own vLLM objects are never touched: generation
        is `_generate_single_turn` below; `vllm_mode` is set to one TRL does not
        special-case)."""
        saved = self.use_vllm, self.vllm_mode
        self.use_vllm = bool(on and self.args.vllm_importance_sampling_correction
                             and self.rollout_func is None)
        self.vllm_mode = "attnrl"
        try:
            yield
        finally:
            self.use_vllm, self.vllm_mode = saved

    # ------------------------------------------------------------------ generation
    def _make_engine(self):
        config: AttnGRPOConfig = self.args
        path = self.model.config._name_or_path
        if config.rollout_engine == "vllm_server":
            return make_engine("vllm_server", path, url=config.rollout_server_url,
                               timeout=config.rollout_server_timeout,
                               weights_dir=config.rollout_server_weights_dir,
                               push_weights=self.accelerator.is_main_process)
        if config.rollout_engine == "vllm":
            context = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
            max_len = config.rollout_max_model_len or \
                min(max(2048, config.max_completion_length + 1024), context)
            dtype = torch.bfloat16 if config.bf16 else torch.float32
            return make_engine("vllm", path, dtype=dtype, max_model_len=max_len,
                               kv_cache_gib=config.rollout_kv_cache_gib,
                               gpu_memory_utilization=config.rollout_gpu_memory_utilization,
                               seed=config.seed, colocate=self.accelerator.num_processes > 1,
                               tensor_parallel_size=config.vllm_tensor_parallel_size,
                               enforce_eager=config.rollout_enforce_eager,
                               enable_chunked_prefill=config.rollout_enable_chunked_prefill,
                               enable_sleep_mode=config.vllm_enable_sleep_mode)
        # the policy copy in the dtype the policy trains in, on this rank's device
        dtype = next(self.accelerator.unwrap_model(self.model).parameters()).dtype
        return make_engine("hf", path, batch_size=config.per_device_train_batch_size,
                           dtype=torch.bfloat16 if config.bf16 else dtype,
                           device=self.accelerator.device)

    def weight_stream(self, bucket_bytes: int | None = None):
        """The policy's full weights with HF names (LoRA merged), bucket by bucket
        (trainers/weight_sync.py). Under ZeRO-3 each bucket is gathered when its chunk is
        requested and released before the next: every rank must run `chunks()` through."""
        from trainers.weight_sync import WeightStream

        zero3 = getattr(self, "is_deepspeed_enabled", False) and \
            self.accelerator.state.deepspeed_plugin.zero_stage == 3
        return WeightStream(self.accelerator.unwrap_model(self.model), zero3, bucket_bytes)

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """Full policy weights with HF names in one dict (for inspection: under ZeRO-3 this
        holds a copy of the whole model; the engine sync streams instead). Without ZeRO-3
        the tensors are the live parameters (detached, not copied)."""
        stream = self.weight_stream()
        state = {}
        for chunk in stream.chunks():
            state.update({k: v.clone() if stream.zero3 else v for k, v in chunk.items()})
        return state

    last_sync_stats = None
    """trainers.weight_sync.SyncStats of the latest engine sync (buckets, peak bytes)."""

    def sync_engine_weights(self) -> None:
        """Push the current weights (version = global_step) to the engine. A batch generated
        ahead (rollout_lag 1) finishes first, on every rank, before any rank pushes."""
        if self.engine is None:
            with _zero3_init_disabled():  # the engine holds full weights, not ZeRO-3 shards
                self.engine = self._make_engine()
        if self.rollout_lag:
            self.engine.drain()
            if self.accelerator.num_processes > 1:
                self.accelerator.wait_for_everyone()
        stream = self.weight_stream()
        self.engine.update_weights_stream(stream.names, stream.chunks())
        self.last_sync_stats = stream.stats
        self._engine_step = self.state.global_step
        self.engine.weight_version = self.state.global_step

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                              has_tool_images=False):
        start = time.perf_counter()
        config: AttnGRPOConfig = self.args
        n = num_generations if _is_grouped(prompt_ids, num_generations) else 1
        sampling = SamplingConfig(n=n, temperature=config.temperature,
                                  top_p=config.top_p, max_tokens=config.max_completion_length,
                                  seed=None)
        if self.rollout_lag and self.model.training:
            groups = self._lagged_groups(prompt_ids, n, sampling)
        else:
            if self.engine is None or self._engine_step != self.state.global_step:
                self.sync_engine_weights()
            seeds = self._row_seeds(len(prompt_ids), n)
            groups = self.engine.generate(prompt_ids[::n], sampling, seeds=seeds)
        if config.vllm_enable_sleep_mode:  # its memory to the optimizer step until next time
            self.engine.sleep()
        completion_ids = [c.token_ids for g in groups for c in g]
        logprobs = [c.logprobs for g in groups for c in g]
        self._metrics["train" if self.model.training else "eval"]["time/generation"].append(
            time.perf_counter() - start)
        return completion_ids, logprobs

    def _row_seeds(self, num_rows: int, n: int, step: int | None = None):
        """One seed per completion row, (run seed, phase, step, call in step, global row),
        in groups of n; None when unseeded. `step` given (a batch generated ahead for that
        step): its first call. A collective (the rows of lower ranks are gathered)."""
        phase = "train" if self.model.training else "eval"
        if step is None:
            step = self.state.global_step
            last_step, last_call = self._generation_calls.get(phase, (None, -1))
            call = last_call + 1 if last_step == step else 0
            self._generation_calls[phase] = (step, call)
        else:
            call = 0
        rows = training_seeds(self.args.seed, phase, step, call, self._first_row(num_rows),
                              num_rows)
        return None if rows is None else [rows[i:i + n] for i in range(0, len(rows), n)]

    def _first_row(self, num_rows: int) -> int:
        """Global index of this rank's first completion row: the rows of the lower ranks,
        gathered (a collective: every rank generates at the same time), so ranks holding
        different counts never share a row index, hence a seed."""
        if self.accelerator.num_processes == 1:
            return 0
        counts = self.accelerator.gather(torch.tensor([num_rows], device=self.accelerator.device))
        return first_rows(counts.tolist())[self.accelerator.process_index]

    # ------------------------------------------------------------------ advantages
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions,
                                                      completion_ids_list)
        self._last_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        with self._trl_vllm_path(True):
            output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        config: AttnGRPOConfig = self.args
        rewards_per_func = self._last_rewards_per_func
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        group_ids = torch.arange(len(rewards), device=rewards.device) // num_generations
        advantages = compute_advantages(config.advantage_estimator, rewards, group_ids,
                                        **config.estimator_kwargs())
        local = len(output["prompt_ids"])
        rank = self.accelerator.process_index
        output["advantages"] = advantages[rank * local:(rank + 1) * local].to(
            output["completion_ids"].device)
        correct = rewards >= (config.correctness_threshold
                              if config.correctness_threshold is not None else 1.0)
        if self.qk_credit is not None:  # the label of the QK head selection
            output["qk_correct"] = correct[rank * local:(rank + 1) * local].to(
                output["completion_ids"].device)
        self._metrics[mode]["accuracy"].append(correct.float().mean().item())
        self._metrics[mode]["advantages/mean"].append(advantages.mean().item())
        self._metrics[mode]["advantages/std"].append(advantages.std().item()
                                                     if advantages.numel() > 1 else 0.0)
        self._metrics[mode]["advantages/abs_mean"].append(advantages.abs().mean().item())
        return output

    # ------------------------------------------------------------------ credit in the loss
    def _compute_loss(self, model, inputs):
        start = time.perf_counter()
        self._loss_inputs = inputs
        self._signal_seconds = 0.0
        try:  # TRL's IS weight applies to batches that carry it (every generated batch)
            with self._trl_vllm_path("importance_sampling_ratio" in inputs):
                loss = super()._compute_loss(model, inputs)
        finally:
            self._loss_inputs = None
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["time/signals"].append(self._signal_seconds)
        self._metrics[mode]["time/update_forward_backward"].append(
            time.perf_counter() - start - self._signal_seconds)
        return loss

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask,
                                           logits_to_keep, batch_size=None,
                                           compute_entropy=False, **kwargs):
        inputs = self._loss_inputs
        if inputs is None or inputs["advantages"].dim() != 1:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, **kwargs)
        # The loss forward: capture attention statistics while TRL computes log-probs,
        # then replace the (B,) advantages of `inputs` by per-token ones before TRL reads them.
        response_mask = torch.zeros_like(attention_mask, dtype=torch.bool)
        response_mask[:, -logits_to_keep:] = inputs["completion_mask"].bool()
        # every completion masked (e.g. all truncated with mask_truncated_completions): TRL's
        # loss is 0; train on with gamma = 1 and no signals
        empty = local_empty = not bool(response_mask.any())
        if self.accelerator.num_processes > 1 and (self.qk_credit is not None or (
                self.head_split is not None and self.head_split.split is None)):
            # the QK selection and the head-split calibration are collectives: every rank
            # takes part or none does (a rank without response tokens would hang the others)
            flag = torch.tensor([float(empty)], device=self.accelerator.device)
            empty = bool(self.accelerator.reduce(flag, "sum").item() > 0)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["credit/gamma_one_fallback"].append(float(empty))
        if empty:  # logged: this micro-batch trains with gamma = 1 (no credit)
            logger.warning(
                "step %d, rank %d: micro-batch trained with gamma = 1 (no credit): %s",
                self.state.global_step, self.accelerator.process_index,
                "it has no response tokens" if local_empty else
                "another rank's micro-batch has no response tokens (a collective needs all)")
        capture = None
        if "signals" in self.credit_inputs and not empty:
            from attnrl.signals.capture import SignalCapture

            capture = SignalCapture(self.accelerator.unwrap_model(model),
                                    self.credit_config.signals, attention_mask=attention_mask,
                                    response_mask=response_mask,
                                    head_split=self._head_split_now())
        qk_capture = None if self.qk_credit is None or empty else self.qk_credit.capture(
            self.accelerator.unwrap_model(model), input_ids, attention_mask, response_mask)
        with capture if capture is not None else contextlib.nullcontext(), \
                qk_capture if qk_capture is not None else contextlib.nullcontext():
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy or "entropy" in self.credit_inputs, **kwargs)
        start = time.perf_counter()
        signals = None
        if capture is not None:
            if self.head_split is not None and self.head_split.split is None \
                    and self.model.training:  # every rank calls: a collective
                self.head_split.calibrate(capture.head_stats(), response_mask,
                                          lambda x: self.accelerator.reduce(x, "sum"))
                capture.head_split = self.head_split.split
            signals = capture.token_signals()
        entropy_full = None
        if entropies is not None:
            entropy_full = torch.zeros(response_mask.shape, dtype=torch.float32,
                                       device=entropies.device)
            entropy_full[:, -logits_to_keep:] = entropies.detach().float()
        if self._credit_step != self.state.global_step:  # reseed per step: resumable
            self.credit_generator.manual_seed(step_seed(
                self.credit_config.seed, self.state.global_step, self.accelerator.process_index))
            self._credit_step = self.state.global_step
        qk_extras = {} if qk_capture is None else self._qk_extras(qk_capture, response_mask,
                                                                  inputs)
        gamma = torch.ones(response_mask.shape, device=response_mask.device) if empty else \
            compute_gamma(self.credit_config, signals, response_mask, entropy=entropy_full,
                          generator=self.credit_generator, **qk_extras)
        outcome = inputs["advantages"]
        token_adv = shape_advantages(self.credit_config, outcome, gamma,
                                     response_mask)[:, -logits_to_keep:]
        inputs["advantages"] = token_adv.to(inputs["completion_ids"].device)
        self.last_token_advantages = inputs["advantages"]
        if self.credit_log is not None and self.model.training and \
                self.credit_log.due(self.state.global_step):  # the page of this logged step
            self.credit_log.capture(self.state.global_step, self.processing_class, inputs,
                                    outcome, inputs["advantages"], gamma, signals,
                                    logits_to_keep)
        self._log_credit(gamma, response_mask, signals)
        if signals is not None:  # which path computed the statistics (capture.PATHS)
            for key, value in capture.path_metrics().items():
                self._metrics["train" if self.model.training else "eval"][key].append(value)
        self._signal_seconds += time.perf_counter() - start
        return logps, entropies, aux

    def _qk_extras(self, qk_capture, response_mask, inputs) -> dict:
        """QK credit inputs of this loss forward; labels: rollout correctness (else A > 0)."""
        labels = inputs.get("qk_correct")
        labels = inputs["advantages"] > 0 if labels is None else labels
        extras, metrics = self.qk_credit.credit_inputs(
            qk_capture, response_mask, labels, inputs["advantages"], self.state.global_step,
            training=self.model.training, gather=self.accelerator.gather)
        mode = "train" if self.model.training else "eval"
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        return extras

    def _head_split_now(self):
        """The frozen split for the capture: None until calibrated (or when not frozen)."""
        return None if self.head_split is None else self.head_split.split

    def log(self, logs, *args, **kwargs):
        super().log(logs, *args, **kwargs)
        if self.credit_log is not None and self.model.training:
            self.credit_log.write(self.args.output_dir, self.state.global_step, self.args.credit,
                                  self.args.report_to)

    run_card: str | None = None
    """README.md written where TRL writes its model card (set by `attnrl train`)."""

    def create_model_card(self, *args, **kwargs):
        if self.run_card is None:
            return super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, "README.md"), "w") as handle:
                handle.write(self.run_card)
        return None

    _staging: str | None = None
    """Set while a checkpoint is saved: the tmp- directory it is written into."""

    def _get_output_dir(self, trial) -> str:
        """Where checkpoint-N is written: OUTPUT_DIR/tmp-checkpoint-N while a save is in
        progress (trainers/checkpoints.py), output_dir otherwise."""
        return self._staging if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """TRL's save, written to a tmp- directory and renamed to checkpoint-N once every
        rank has finished (a checkpoint is whole or absent)."""
        from trainers.checkpoints import staged_save

        with staged_save(self, trial):
            if self.args.should_save:
                from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

                directory = os.path.join(self._get_output_dir(trial=trial),
                                         f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
                if self.qk_credit is not None:
                    self.qk_credit.save(directory)
                if self.head_split is not None:
                    self.head_split.save(directory)
            super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.qk_credit is not None and checkpoint is not None:
            self.qk_credit.load(checkpoint)
        if self.head_split is not None and checkpoint is not None:
            config = self.accelerator.unwrap_model(self.model).config
            config = config.get_text_config() if hasattr(config, "get_text_config") else config
            self.head_split.load(checkpoint, self.credit_config.signals.resolve_layers(
                config.num_hidden_layers))

    def _log_credit(self, gamma, response_mask, signals) -> None:
        mode = "train" if self.model.training else "eval"
        for key, value in credit_metrics(gamma, response_mask).items():
            self._metrics[mode][f"credit/{key}"].append(value)
        if signals is not None:
            mask = response_mask
            for name in ("waad", "fai"):
                values = getattr(signals, name)[mask].float()
                if values.numel():
                    self._metrics[mode][f"signals/{name}_mean"].append(values.mean().item())
                    self._metrics[mode][f"signals/{name}_max"].append(values.max().item())


def check_softcapping_kept(model) -> None:
    """UserError when `model` softcaps its attention logits but runs an implementation that
    ignores it (sdpa): the policy trained would not be the one vLLM samples from."""
    from attnrl.attention_config import attention_softcap
    from attnrl.errors import UserError
    from attnrl.models import SOFTCAPPING

    config = getattr(model, "config", None)
    if config is None or not attention_softcap(config):
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    implementation = getattr(text, "_attn_implementation", None)
    if implementation not in SOFTCAPPING:
        raise UserError(f"{type(model).__name__} softcaps its attention logits but was loaded "
                        f"with attn_implementation {implementation!r}, which ignores it: load "
                        "it with attnrl.models.load_model (eager) or one of "
                        f"{', '.join(SOFTCAPPING)}")


def _is_grouped(prompt_ids: list[list[int]], n: int) -> bool:
    """True when rows come in consecutive blocks of n identical prompts (TRL's sampler)."""
    if n <= 1 or len(prompt_ids) % n:
        return False
    return all(prompt_ids[i] == prompt_ids[i - i % n] for i in range(len(prompt_ids)))


@contextlib.contextmanager
def _zero3_init_disabled():
    """Models loaded inside are plain (transformers otherwise builds them partitioned under
    deepspeed.zero.Init while a ZeRO-3 config is active)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    active = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = active
