"""The names config values are checked against, kept light (no heavy import): copies of
the registries of heavy modules (advantage estimators, reward functions), TRL's loss types
and reporters, and the LoRA fields a config may set.

tests/trainers/test_schema.py keeps ESTIMATORS equal to attnrl.advantages.ESTIMATORS,
REWARDS to rewards.REWARDS and LORA_KEYS within peft's LoraConfig; the credit strategies'
names are in attnrl/credit_names.py.
"""

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "psr", "nsr", "w_reinforce")
REWARDS = ("math", "gym", "answer", "format", "overlong")
BINARY_REWARDS = ("math", "gym", "answer", "format")
"""Rewards that score every completion exactly 0 or 1 (overlong is a penalty in [-1, 0])."""
NSR_ESTIMATORS = ("nsr", "psr", "w_reinforce")
"""Estimators of binary outcomes (1 correct, 0 incorrect; attnrl.advantages): trainer nsr
takes only these, and without correctness_threshold they need a 0/1 reward."""
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
REPORT_TO = ("none", "all", "wandb", "tensorboard", "mlflow", "comet_ml", "neptune",
             "clearml", "dagshub", "dvclive", "codecarbon", "azure_ml", "flyte", "trackio",
             "swanlab")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3",
                        "flex_attention")
"""transformers attention implementations a config may name (attn_implementation)."""
LORA_KEYS = {  # LoraConfig fields a config may set: kinds, range / choices
    "r": ("int", {"ge": 1}), "lora_alpha": ("float", {"gt": 0}),
    "lora_dropout": ("float", {"ge": 0, "lt": 1}), "target_modules": ("str|list|null", {}),
    "bias": ("str", {"choices": ("none", "all", "lora_only")}), "use_rslora": ("bool", {}),
    "use_dora": ("bool", {}), "modules_to_save": ("list|null", {}), "task_type": ("str", {}),
    "layers_to_transform": ("int|int_list|null", {}), "init_lora_weights": ("bool|str", {}),
    "fan_in_fan_out": ("bool", {}), "lora_bias": ("bool", {}), "rank_pattern": ("dict", {}), "alpha_pattern": ("dict", {}),
    "exclude_modules": ("str|list|null", {}),
}
LORA_ALIASES = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout",
                "modules": "target_modules", "target": "target_modules"}
"""Names people write for LoRA fields, refused with a hint to the field's name."""
