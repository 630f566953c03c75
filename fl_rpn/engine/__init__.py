"""Training loop, checkpointing, distributed helpers and inference."""

from .trainer import train

__all__ = ["train"]
