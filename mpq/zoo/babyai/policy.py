"""A small vision-language-action policy for BabyAI that exercises every layer kind of the space.

Data flow for one control step (B episodes, T steps, L instruction tokens, d=64):

    tokens (B, L) -> Embedding -> GRU --------------------------> words (B, L, d), instr (B, d)
    image (B, T, 56, 56, 3) uint8 -> Conv2d 8x8/8 patches -> (B*T, d, 7, 7)
        -> 2 x [Conv2d 3x3, FiLM(instr)] -> 49 patch tokens (B*T, 49, d)
        -> MultiheadAttention(patches -> words) + Linear FFN  (a transformer block)
        -> flatten -> Linear -> GRU memory over T -> Linear head -> logits (B, T, 7)

The instruction is left-padded to ``MAX_TOKENS`` so the instruction GRU's last state follows the
last real word; at a robot's batch 1, T=1 and ``memory`` carries the GRU state between steps.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import nn

LEVELS: tuple[str, ...] = (
    "BabyAI-GoToLocal-v0",
    "BabyAI-PickupLoc-v0",
    "BabyAI-PutNextLocal-v0",
    "BabyAI-GoToSeqS5R2-v0",
)
VOCAB: tuple[str, ...] = (
    "<pad>",
    "<unk>",
    "a",
    "ball",
    "behind",
    "blue",
    "box",
    "door",
    "front",
    "go",
    "green",
    "grey",
    "in",
    "key",
    "left",
    "next",
    "of",
    "on",
    "open",
    "pick",
    "purple",
    "put",
    "red",
    "right",
    "the",
    "to",
    "up",
    "yellow",
    "you",
    "your",
    "and",
    "then",
    "after",
)
MAX_TOKENS = 24  # GoToSeq's two-part instructions run to ~20 words
IMAGE_SIZE = 56  # RGBImgPartialObsWrapper(tile_size=8) on the 7x7 egocentric view
N_ACTIONS = 7  # left, right, forward, pickup, drop, toggle, done
CHECKPOINT_PATH = Path(str(resources.files("mpq.zoo.babyai") / "babyai_vla.pt"))
_WORD_INDEX = {w: i for i, w in enumerate(VOCAB)}


def tokenize(missions: list[str]) -> torch.Tensor:
    """Word ids, left-padded with 0 to ``MAX_TOKENS``; unknown words map to ``<unk>``.

    Returns:
        Long tensor of shape (len(missions), MAX_TOKENS).
    """
    out = torch.zeros(len(missions), MAX_TOKENS, dtype=torch.long)
    for row, mission in enumerate(missions):
        ids = [_WORD_INDEX.get(w, 1) for w in mission.lower().split()][-MAX_TOKENS:]
        if ids:
            out[row, MAX_TOKENS - len(ids) :] = torch.tensor(ids)
    return out


class FiLMConv(nn.Module):
    """``relu(conv(x) * (1 + gamma) + beta) + x`` with ``gamma, beta = Linear(instruction)``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(d, d, kernel_size=3, padding=1)
        self.film = nn.Linear(d, 2 * d)

    def forward(self, x: torch.Tensor, instr: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(instr).chunk(2, dim=-1)  # (N, d) each
        h = self.conv(x) * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        return torch.relu(h) + x


def add_stem(policy: nn.Module, d: int, heads: int) -> None:
    """Register on ``policy`` the modules ``stem`` runs (both shipped policies' image stem)."""
    policy.patch_embed = nn.Conv2d(3, d, kernel_size=8, stride=8)
    policy.film1 = FiLMConv(d)
    policy.film2 = FiLMConv(d)
    policy.attn_norm = nn.LayerNorm(d)
    policy.cross_attn = nn.MultiheadAttention(d, heads, batch_first=True)
    policy.ffn_norm = nn.LayerNorm(d)
    policy.ffn_in = nn.Linear(d, 2 * d)
    policy.ffn_out = nn.Linear(2 * d, d)


def stem(
    policy: nn.Module, image: torch.Tensor, words: torch.Tensor, instr: torch.Tensor
) -> torch.Tensor:
    """The image stem both shipped policies share: image (B, T, 56, 56, 3) uint8, words
    (B, L, d), instr (B, d) -> patch tokens (B*T, 49, d) -- patch conv, two FiLM convs, cross-
    attention from patches to words, FFN (``policy``'s modules of those names)."""
    b, t = image.shape[0], image.shape[1]
    instr = instr.repeat_interleave(t, dim=0)  # (B*T, d)
    x = image.reshape(b * t, IMAGE_SIZE, IMAGE_SIZE, 3).permute(0, 3, 1, 2).float() / 255.0
    x = torch.relu(policy.patch_embed(x))  # (B*T, d, 7, 7)
    x = policy.film2(policy.film1(x, instr), instr)
    patches = x.flatten(2).transpose(1, 2)  # (B*T, 49, d)
    keys = words.repeat_interleave(t, dim=0)  # (B*T, L, d)
    q = policy.attn_norm(patches)
    attended, _ = policy.cross_attn(q, keys, keys, need_weights=False)
    patches = patches + attended
    return patches + policy.ffn_out(torch.relu(policy.ffn_in(policy.ffn_norm(patches))))


class BabyAIVLAPolicy(nn.Module):
    """RGB image + instruction tokens + memory -> action logits and new memory."""

    def __init__(self, d: int = 64, memory_dim: int = 256, heads: int = 4) -> None:
        super().__init__()
        self.d, self.memory_dim = d, memory_dim
        self.word_embedding = nn.Embedding(len(VOCAB), d, padding_idx=0)
        self.instruction_gru = nn.GRU(d, d, batch_first=True)
        add_stem(self, d, heads)
        n_patches = (IMAGE_SIZE // 8) ** 2
        self.fuse = nn.Linear(n_patches * d, memory_dim)
        self.memory_gru = nn.GRU(memory_dim, memory_dim, batch_first=True)
        self.action_head = nn.Linear(memory_dim, N_ACTIONS)

    def initial_memory(self, batch: int) -> torch.Tensor:
        return torch.zeros(1, batch, self.memory_dim)

    def forward(
        self, image: torch.Tensor, tokens: torch.Tensor, memory: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: image (B, T, 56, 56, 3) uint8; tokens (B, L) long; memory (1, B, M).

        Returns: logits (B, T, 7) and the new memory (1, B, M).
        """
        b, t = image.shape[0], image.shape[1]
        words, instr_h = self.instruction_gru(self.word_embedding(tokens))  # (B, L, d), (1, B, d)
        patches = stem(self, image, words, instr_h[0])  # (B*T, 49, d)
        fused = torch.relu(self.fuse(patches.flatten(1))).reshape(b, t, self.memory_dim)
        out, memory = self.memory_gru(fused, memory)  # (B, T, M), (1, B, M)
        return self.action_head(out), memory


def build_policy(checkpoint: str | Path | None = None) -> BabyAIVLAPolicy:
    """The model builder the search config names as ``mpq.zoo.babyai:build_policy``.

    Args:
        checkpoint: a ``state_dict`` file; default the checkpoint shipped with mpq. Loaded with
            ``weights_only=True``, so a file holding pickled code is refused.

    Raises:
        FileNotFoundError: the checkpoint is missing (train one with ``python -m
            mpq.zoo.babyai.train``).
    """
    path = Path(checkpoint) if checkpoint is not None else CHECKPOINT_PATH
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint; python -m mpq.zoo.babyai.train writes it")
    policy = BabyAIVLAPolicy()
    policy.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return policy.eval()


def build_untrained_policy() -> BabyAIVLAPolicy:
    """The same architecture with seeded random weights (tests, discovery)."""
    torch.manual_seed(0)
    return BabyAIVLAPolicy().eval()
