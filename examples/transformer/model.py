"""A transformer a user has: a small GPT-2 (``transformers``), searched with keyword inputs.

Run from the repository root (``pip install transformers`` first):

    mpq search examples/transformer/search.yaml --resume

The model is built from a small config with a fixed seed (no download). The task is what a user
without labels can state: agreement of the quantized model's next-token choice (top-1) with the
float model's, over fixed token sequences (the float model agrees with itself: 1.0). Inputs are
keyword mappings, ``{"input_ids": ..., "attention_mask": ...}``: GPT-2 exports to ONNX only with
its attention mask. The config names the output that matters (``output: logits``): the model
then returns its logits, as a tensor, to the task, the proxy and the exported graph.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

VOCAB, POSITIONS, STEPS = 512, 32, 16


def build_model() -> nn.Module:
    import transformers

    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=POSITIONS,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def _sequences(n: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (n, STEPS), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@cache
def _float_choices(n: int) -> torch.Tensor:
    with torch.inference_mode():
        return build_model()(**_sequences(n, seed=1)).logits.argmax(-1)


def agreement_task(model: nn.Module, budget: int) -> dict[str, float]:
    """Share of the next-token choices (``budget`` sequences x 16 positions) equal to the
    float model's."""
    with torch.inference_mode():
        choices = model(**_sequences(budget, seed=1)).argmax(-1)  # output: logits
    return {"success": float((choices == _float_choices(budget)).float().mean())}


def calibration() -> list[dict[str, torch.Tensor]]:
    """Sequences other than the task's (another seed), in batches of 8."""
    batch = _sequences(32, seed=2)
    return [{k: v[i : i + 8] for k, v in batch.items()} for i in range(0, 32, 8)]


def example_inputs() -> dict[str, torch.Tensor]:
    """One sequence at batch 1, as keywords."""
    return {k: v[:1] for k, v in _sequences(1, seed=3).items()}
