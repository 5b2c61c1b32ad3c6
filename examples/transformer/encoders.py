"""Two more transformers a user has: a BERT text classifier and a ViT image classifier
(``transformers``, built from small configs, no download), searched with keyword inputs:

    mpq search examples/transformer/bert.yaml --resume
    mpq search examples/transformer/vit.yaml --resume

Each is trained on first use (well under a minute on 2 cores) on a synthetic task and then
loaded from its checkpoint (``bert.pt``, ``vit.pt``) with ``weights_only=True``, as a user's
would be: BERT finds which of four keyword tokens a sequence of random tokens holds; ViT sees
the CNN example's four shapes. The search's task is accuracy on held-out inputs (another seed),
with its Wilson interval and per-input outcomes. Both take keyword inputs (``input_ids`` and
``token_type_ids``; ``pixel_values``) and return a ``SequenceClassifierOutput`` /
``ImageClassifierOutput``: the configs name ``output: logits``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from examples.classifier.model import scored
from examples.cnn.model import images

VOCAB, TOKENS, LABELS, IMAGE = 1000, 32, 4, 32
HERE = Path(__file__).resolve().parent
Batch = tuple[dict[str, torch.Tensor], torch.Tensor]  # keyword inputs, labels


def _bert() -> nn.Module:
    import transformers

    config = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=128,
        num_attention_heads=4,
        intermediate_size=256,
        vocab_size=VOCAB,
        max_position_embeddings=TOKENS,
        num_labels=LABELS,
    )
    return transformers.BertForSequenceClassification(config)


def _vit() -> nn.Module:
    import transformers

    config = transformers.ViTConfig(
        num_hidden_layers=2,
        hidden_size=128,
        num_attention_heads=4,
        intermediate_size=256,
        image_size=IMAGE,
        patch_size=4,
        num_labels=LABELS,
    )
    return transformers.ViTForImageClassification(config)


def sentences(n: int, seed: int) -> Batch:
    """Random tokens (ids 5..VOCAB-1) with one keyword (id 1..4) at a random place; the label is
    which keyword."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, TOKENS), generator=g)
    labels = torch.randint(0, LABELS, (n,), generator=g)
    where = torch.randint(1, TOKENS, (n,), generator=g)
    ids[torch.arange(n), where] = labels + 1
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids)}, labels


def pictures(n: int, seed: int) -> Batch:
    x, y = images(n, seed)
    return {"pixel_values": x}, y


def _fit(model: nn.Module, data: Batch, steps: int = 300, batch: int = 64) -> nn.Module:
    """Cross-entropy with Adam on random batches, reproducibly; the model in eval."""
    inputs, labels = data
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(steps):
        idx = torch.randint(
            0, len(labels), (batch,), generator=torch.Generator().manual_seed(step)
        )
        logits = model(**{k: v[idx] for k, v in inputs.items()}).logits
        loss = nn.functional.cross_entropy(logits, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _trained(
    make: Callable[[], nn.Module], data: Callable[[int, int], Batch], name: str
) -> nn.Module:
    """Load ``name``'s checkpoint (weights_only=True), training it once if missing."""
    path = HERE / name
    if not path.exists():
        torch.manual_seed(0)
        torch.save(_fit(make(), data(4000, 0)).state_dict(), path)
    model = make()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def build_bert() -> nn.Module:
    return _trained(_bert, sentences, "bert.pt")


def build_vit() -> nn.Module:
    return _trained(_vit, pictures, "vit.pt")


@torch.inference_mode()
def _accuracy(model: nn.Module, data: Batch) -> dict[str, float]:
    inputs, labels = data
    return scored(model(**inputs).argmax(-1) == labels)  # output: logits


def bert_task(model: nn.Module, budget: int) -> dict[str, float]:
    """Accuracy on ``budget`` held-out sequences (seed 1, never trained on)."""
    return _accuracy(model, sentences(budget, seed=1))


def vit_task(model: nn.Module, budget: int) -> dict[str, float]:
    """Accuracy on ``budget`` held-out images (seed 1, never trained on)."""
    return _accuracy(model, pictures(budget, seed=1))


def _batches(inputs: dict[str, torch.Tensor], size: int = 64) -> list[dict[str, torch.Tensor]]:
    n = len(next(iter(inputs.values())))
    return [{k: v[i : i + size] for k, v in inputs.items()} for i in range(0, n, size)]


def bert_calibration() -> list[dict[str, torch.Tensor]]:
    """Calibration inputs from a third seed (neither training nor evaluation data)."""
    return _batches(sentences(256, seed=2)[0])


def vit_calibration() -> list[dict[str, torch.Tensor]]:
    return _batches(pictures(256, seed=2)[0])


def bert_example_inputs() -> dict[str, torch.Tensor]:
    return sentences(1, seed=3)[0]


def vit_example_inputs() -> dict[str, torch.Tensor]:
    return pictures(1, seed=3)[0]
