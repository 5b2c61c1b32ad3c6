"""The embedded VLA policies: BabyAI (minigrid) levels, RGB image + language instruction -> action.

Two policies: the tiny one (``build_policy``, 1.4M parameters, fits in cache: fast tests, the
low-compute example) and the flagship (``build_flagship``, 21M parameters, memory-bound at batch 1
like a real VLA: the main job). ``evaluate_episodes`` is the task of both, and
``calibration_batches``/``flagship_calibration_batches`` their calibration inputs and
``training_batches``/``flagship_training_batches`` their QAT data, each referenced from a search
config as ``module:function`` exactly like a user's own model, task and data.
"""

from __future__ import annotations

from mpq.zoo.babyai.flagship import (
    FLAGSHIP_CHECKPOINT_PATH,
    BabyAIFlagshipPolicy,
    build_flagship,
    build_untrained_flagship,
)
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
    flagship_calibration_batches,
    flagship_example_inputs,
    flagship_training_batches,
    record_states,
    training_batches,
)

__all__ = [
    "CHECKPOINT_PATH",
    "FLAGSHIP_CHECKPOINT_PATH",
    "BabyAIFlagshipPolicy",
    "build_flagship",
    "build_untrained_flagship",
    "flagship_calibration_batches",
    "flagship_example_inputs",
    "flagship_training_batches",
    "LEVELS",
    "VOCAB",
    "BabyAIVLAPolicy",
    "build_policy",
    "build_untrained_policy",
    "calibration_batches",
    "confirm_episodes",
    "evaluate_episodes",
    "example_inputs",
    "record_states",
    "tokenize",
    "training_batches",
]
