"""Training: the loop (trainer.py), checkpoints (checkpoint.py), data, tasks and runs.

``kiln.train.load(CKPT)`` rebuilds a checkpoint's model from the config it holds.
"""


def load(path, map_location="cpu"):
    """The model saved in the kiln checkpoint ``path``, rebuilt without flags, in eval mode."""
    from kiln.train.run import load as _load

    return _load(path, map_location=map_location)
