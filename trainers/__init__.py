"""DeepSpeed-backed GRPO and NSR trainers (the only package that imports trl)."""
