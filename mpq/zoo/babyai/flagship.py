"""The flagship BabyAI policy: the physics of a real VLA at batch 1 (memory-bound mat-vecs).

RT-1-like data flow for one control step (B episodes, T steps, L instruction tokens, d=64,
W=1024 trunk width, H=4096 MLP width, M=256 memory):

    once per episode:  tokens (B, L) -> frozen sentence encoder -> words (B, L, d), instr (B, d)
    every step:        image (B, T, 56, 56, 3) uint8 -> Conv2d 8x8/8 patches -> 2 x FiLM(instr)
        -> cross-attention (patches -> words) + FFN -> 49 x 64 features
        -> fuse Linear(3136 -> W) -> 2 x residual MLP [LayerNorm, W -> H -> W]
        -> GRU memory (W -> M) -> Linear head -> logits (B, T, 7)

About 21M parameters, almost all in the fuse, trunk and memory matrices: at batch 1 a step
streams about 84 MB of float32 weights (more than a 32 MiB L3 holds) and about 12 MB at 4 bits
(which fits), the regime of OpenVLA/SmolVLA/pi0 steps on a robot's computer, where low-bit
weights pay. The instruction is encoded once per episode, as RT-1 does with its frozen sentence
encoder: the encoder (word embedding + GRU, float, 0.1M parameters) is not part of the step's
graph, so it is not quantized or timed; ``episode_context`` runs it.

The stem (patch conv, FiLM, cross-attention, FFN) and the sentence encoder are the tiny policy's
trained layers (transferred and frozen during training, as RT-1 starts from pretrained
EfficientNet and USE); fuse, trunk, memory and head are trained by ``train_flagship``.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from mpq.zoo.babyai.policy import (
    IMAGE_SIZE,
    MAX_TOKENS,
    N_ACTIONS,
    VOCAB,
    add_stem,
    stem,
    tokenize,
)

FLAGSHIP_CHECKPOINT_PATH = Path(str(resources.files("mpq.zoo.babyai") / "babyai_flagship.pt"))
ENCODER_PREFIX = "encoder."  # checkpoint keys of the frozen sentence encoder
# the tiny policy's trained layers the flagship starts from (and keeps frozen in training)
STEM_MODULES = (
    "patch_embed",
    "film1",
    "film2",
    "attn_norm",
    "cross_attn",
    "ffn_norm",
    "ffn_in",
    "ffn_out",
)
ENCODER_MODULES = ("word_embedding", "instruction_gru")


class SentenceEncoder(nn.Module):
    """Instruction tokens -> per-word features and a sentence vector (the tiny policy's layers)."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.word_embedding = nn.Embedding(len(VOCAB), d, padding_idx=0)
        self.instruction_gru = nn.GRU(d, d, batch_first=True)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        words, instr = self.instruction_gru(self.word_embedding(tokens))
        return words, instr[0]  # (B, L, d), (B, d)

    @torch.no_grad()
    def encode(self, missions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(words, instr) of instruction strings."""
        return self(tokenize(missions))


class MLPBlock(nn.Module):
    """``x + down(relu(up(norm(x))))``: a transformer's feed-forward half over one token."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class BabyAIFlagshipPolicy(nn.Module):
    """RGB image + encoded instruction + memory -> action logits and new memory."""

    def __init__(
        self,
        d: int = 64,
        width: int = 1024,
        hidden: int = 4096,
        blocks: int = 2,
        memory_dim: int = 256,
        heads: int = 4,
    ) -> None:
        super().__init__()
        self.d, self.memory_dim = d, memory_dim
        add_stem(self, d, heads)
        n_patches = (IMAGE_SIZE // 8) ** 2
        self.fuse = nn.Linear(n_patches * d, width)
        self.trunk = nn.ModuleList(MLPBlock(width, hidden) for _ in range(blocks))
        self.trunk_norm = nn.LayerNorm(width)
        self.memory_gru = nn.GRU(width, memory_dim, batch_first=True)
        self.action_head = nn.Linear(memory_dim, N_ACTIONS)
        # NOTE: a plain attribute, not a submodule: the encoder runs once per episode, outside
        # the step's graph, so layer discovery, quantization and export must not see it.
        object.__setattr__(self, "encoder", SentenceEncoder(d).eval())

    def initial_memory(self, batch: int) -> torch.Tensor:
        return torch.zeros(1, batch, self.memory_dim)

    def episode_context(self, missions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-episode inputs: (words (B, L, d), instr (B, d)) from the frozen encoder."""
        return self.encoder.encode(missions)  # type: ignore[operator]

    def perceive(
        self, image: torch.Tensor, words: torch.Tensor, instr: torch.Tensor
    ) -> torch.Tensor:
        """The stem: image (B, T, 56, 56, 3) uint8 -> patch features (B, T, 49 * d)."""
        b, t = image.shape[0], image.shape[1]
        return stem(self, image, words, instr).flatten(1).reshape(b, t, -1)

    def act(
        self, features: torch.Tensor, memory: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The trunk: features (B, T, 49 * d), memory (1, B, M) -> logits (B, T, 7), memory."""
        x = torch.relu(self.fuse(features))
        for block in self.trunk:
            x = block(x)
        out, memory = self.memory_gru(self.trunk_norm(x), memory)
        return self.action_head(out), memory

    def forward(
        self, image: torch.Tensor, words: torch.Tensor, instr: torch.Tensor, memory: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: image (B, T, 56, 56, 3) uint8; words (B, L, d), instr (B, d) from
        ``episode_context``; memory (1, B, M). Returns logits (B, T, 7) and the new memory."""
        return self.act(self.perceive(image, words, instr), memory)


def load_flagship_state(policy: BabyAIFlagshipPolicy, state: dict[str, torch.Tensor]) -> None:
    """Load a flagship checkpoint (policy keys, and the encoder's under ``encoder.``); float16
    tensors (the shipped file) become float32."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    enc = {
        k.removeprefix(ENCODER_PREFIX): v for k, v in state.items() if k.startswith(ENCODER_PREFIX)
    }
    policy.encoder.load_state_dict(enc)  # type: ignore[operator]
    policy.load_state_dict({k: v for k, v in state.items() if not k.startswith(ENCODER_PREFIX)})


def flagship_state(policy: BabyAIFlagshipPolicy, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint: policy and encoder tensors, floating ones as ``dtype``."""
    enc = {ENCODER_PREFIX + k: v for k, v in policy.encoder.state_dict().items()}  # type: ignore[operator]
    return {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in {**policy.state_dict(), **enc}.items()
    }


def build_flagship(checkpoint: str | Path | None = None) -> BabyAIFlagshipPolicy:
    """The flagship model builder (config ``model: babyai-flagship``).

    The shipped file stores float16 weights (half the bytes); the float32 reference is built
    from them, so every figure is relative to exactly these weights.

    Raises:
        FileNotFoundError: the checkpoint is missing (``python -m
            mpq.zoo.babyai.train_flagship`` writes it).
    """
    path = Path(checkpoint) if checkpoint is not None else FLAGSHIP_CHECKPOINT_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no checkpoint; python -m mpq.zoo.babyai.train_flagship writes it"
        )
    policy = BabyAIFlagshipPolicy()
    load_flagship_state(policy, torch.load(path, map_location="cpu", weights_only=True))
    return policy.eval()


@functools.lru_cache(maxsize=1)
def shipped_encoder() -> SentenceEncoder:
    """The shipped checkpoint's sentence encoder (calibration and latency inputs need it before
    any model is built)."""
    return build_flagship().encoder  # type: ignore[return-value]


def build_untrained_flagship() -> BabyAIFlagshipPolicy:
    """The flagship architecture with seeded random weights (tests)."""
    torch.manual_seed(0)
    return BabyAIFlagshipPolicy().eval()


__all__ = [
    "FLAGSHIP_CHECKPOINT_PATH",
    "MAX_TOKENS",
    "BabyAIFlagshipPolicy",
    "SentenceEncoder",
    "build_flagship",
    "build_untrained_flagship",
]
