"""The bundled GRPO trainer: rollout -> rewards -> advantages -> objective -> traced optimizer step.

- ``loop``: ``Trainer`` - set-up, the training loop, evaluation, checkpoints.
- ``update``: the optimizer updates of one step (one path for PPO mini-batches and a batch used once).
- ``resume``: the trainer state besides the weights, and continuing a run from a checkpoint.
- ``guards``: the one-line errors of a non-finite value or a failed write.
- ``retrace``: trace one more update from a saved checkpoint, leaving the run untouched.
- ``learnability``: warnings for settings and runs that cannot learn.
- ``loggers``: ``report_to`` - TensorBoard, W&B or none, a registry of experiment loggers.
"""

from entropy_lab.runtime import autocast_dtype, pick_device
from entropy_lab.trainer.loop import Callback, Trainer

__all__ = ["Callback", "Trainer", "autocast_dtype", "pick_device"]
