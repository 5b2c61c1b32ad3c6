"""The embedded VLA policy: BabyAI (minigrid) levels, RGB image + language instruction -> action.

``build_policy`` is the model builder, ``evaluate_episodes`` the task and ``calibration_batches``
the calibration inputs, each referenced from a search config as ``module:function`` exactly like
a user's own model, task and data.
"""

from __future__ import annotations

from mpq.zoo.babyai.policy import (
    CHECKPOINT_PATH,
    LEVELS,
    VOCAB,
    BabyAIVLAPolicy,
    build_policy,
    build_untrained_policy,
    tokenize,
)
from mpq.zoo.babyai.task import (
    calibration_batches,
    confirm_episodes,
    evaluate_episodes,
    example_inputs,
)

__all__ = [
    "CHECKPOINT_PATH",
    "LEVELS",
    "VOCAB",
    "BabyAIVLAPolicy",
    "build_policy",
    "build_untrained_policy",
    "calibration_batches",
    "confirm_episodes",
    "evaluate_episodes",
    "example_inputs",
    "tokenize",
]
