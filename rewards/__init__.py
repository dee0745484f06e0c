"""Verifiable reward functions: reward(prompts, completions, **columns) -> list[float]."""
