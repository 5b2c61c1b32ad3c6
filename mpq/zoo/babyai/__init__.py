"""The embedded VLA policy: BabyAI (minigrid) levels, RGB image + language instruction -> action.

``build_policy`` is the model builder and ``evaluate_episodes`` the task, both referenced from a
search config as ``module:function`` exactly like a user's own model and task.
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

__all__ = [
    "CHECKPOINT_PATH",
    "LEVELS",
    "VOCAB",
    "BabyAIVLAPolicy",
    "build_policy",
    "build_untrained_policy",
    "tokenize",
]
