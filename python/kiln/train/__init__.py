"""Training: the loop (trainer.py), checkpoints (checkpoint.py), data, tasks and runs.

``kiln.train.load(CKPT)`` rebuilds a checkpoint's model from the config it holds.
"""


def load(path, map_location="cpu"):
    """The model saved in the kiln checkpoint ``path``, rebuilt without flags, in eval mode."""
    from kiln.train.run import load as _load

    return _load(path, map_location=map_location)


def _register_kiln_generators() -> None:
    # kiln's dropout draws from its own counter-based generator (seed, offset): every checkpoint
    # saves it beside torch's, so a resumed run drops the same units as an uninterrupted one.
    from kiln.ops import random as kiln_random
    from kiln.train import checkpoint

    checkpoint.register_rng_state("kiln_dropout", kiln_random.get_rng_state, kiln_random.set_rng_state)


_register_kiln_generators()
