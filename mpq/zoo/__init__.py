"""Models and tasks that ship with mpq, so the main job needs no network and no training.

``MODEL_ALIASES``: short names a config or the CLI may use for them; the CLI and the search
resolve a name here before anything builds the model.
"""

MODEL_ALIASES: dict[str, str] = {
    "babyai": "mpq.zoo.babyai:build_policy",
    "babyai-untrained": "mpq.zoo.babyai:build_untrained_policy",
    "babyai-flagship": "mpq.zoo.babyai:build_flagship",
    "babyai-flagship-untrained": "mpq.zoo.babyai:build_untrained_flagship",
}


def resolve_model(spec: str) -> str:
    """``module:function`` of a model: an alias resolved, anything else as given."""
    return MODEL_ALIASES.get(spec, spec)
