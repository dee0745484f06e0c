"""attnrl: reinforcement-learning fine-tuning of LLMs with attention-guided credit assignment."""

__version__ = "0.1.0"

from attnrl.errors import UserError  # noqa: F401
