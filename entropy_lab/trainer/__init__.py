"""The bundled GRPO trainer: rollout -> rewards -> advantages -> objective -> traced optimizer step.

- ``loop``: ``Trainer`` - set-up, the training loop, evaluation, checkpoints.
- ``retrace``: trace one more update from a saved checkpoint, leaving the run untouched.
- ``learnability``: warnings for settings and runs that cannot learn.
"""

from entropy_lab.trainer.loop import Callback, Trainer, autocast_dtype, pick_device

__all__ = ["Callback", "Trainer", "autocast_dtype", "pick_device"]
