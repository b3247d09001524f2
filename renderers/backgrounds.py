"""Backgrounds composited behind the renders. Each maps unit view directions `[B, V, H, W, 3]` (and, for the
learned one, a text embedding per object) to RGB `[B, V, H, W, 3]` in [0, 1].

The reference trains with a text-conditioned environment colour (a hash-grid encoding of the view
direction whose last linear layer is produced by a hypernetwork from the prompt's text embedding, then
`sigmoid * 1.002 - 0.001`) and evaluates on white. `TextConditionedBackground` keeps that structure with
a plain frequency encoding of the direction instead of a hash grid (no tiny-cuda-nn needed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

WHITE = (1.0, 1.0, 1.0)
# The "normal" image where there is no surface: the camera-facing normal (0, 0, 1) mapped to [0, 1].
NORMAL_BACKGROUND = (0.5, 0.5, 1.0)


class SolidBackground(nn.Module):
    """One constant colour everywhere (white by default)."""

    def __init__(self, color: Sequence[float] = WHITE) -> None:
        super().__init__()
        if len(color) != 3:
            raise ValueError(f"a background colour needs 3 values (RGB in [0, 1]), got {list(color)}")
        self.register_buffer("color", torch.tensor([float(c) for c in color]), persistent=False)

    def forward(self, directions: Tensor, text_embedding: Tensor | None = None) -> Tensor:
        """directions: [B, V, H, W, 3] -> [B, V, H, W, 3]."""
        return self.color.to(directions).expand(directions.shape)


class RandomColorBackground(nn.Module):
    """A uniformly random colour per object (or per view with `per_view=True`) in training; `eval_color`
    (white) in eval mode. Draws come from `generator` when given, else the global RNG."""

    def __init__(
        self,
        per_view: bool = False,
        eval_color: Sequence[float] = WHITE,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.per_view = per_view
        self.generator = generator
        self.register_buffer("eval_color", torch.tensor([float(c) for c in eval_color]), persistent=False)

    def forward(self, directions: Tensor, text_embedding: Tensor | None = None) -> Tensor:
        """directions: [B, V, H, W, 3] -> [B, V, H, W, 3]."""
        if not self.training:
            return self.eval_color.to(directions).expand(directions.shape)
        batch, views = directions.shape[:2]
        colors = torch.rand(batch, views if self.per_view else 1, 3, generator=self.generator)
        return colors.to(directions)[:, :, None, None, :].expand(directions.shape)


class DirectionEncoding(nn.Module):
    """[d, sin(2^k pi d), cos(2^k pi d)] for k < num_frequencies: `[..., 3] -> [..., 3 + 6 K]`."""

    def __init__(self, num_frequencies: int = 4) -> None:
        super().__init__()
        self.register_buffer("scales", (2.0 ** torch.arange(num_frequencies)) * math.pi, persistent=False)

    @property
    def out_features(self) -> int:
        return 3 + 6 * self.scales.numel()

    def forward(self, directions: Tensor) -> Tensor:
        scaled = directions[..., None, :] * self.scales.to(directions)[:, None]  # [..., K, 3]
        return torch.cat([directions, scaled.sin().flatten(-2), scaled.cos().flatten(-2)], dim=-1)


class TextConditionedBackground(nn.Module):
    """A learned environment colour per prompt: colour(d) = sigmoid(enc(d) @ W(text)) * 1.002 - 0.001.

    W(text) `[enc_dim, 3]` comes from a small hypernetwork (Linear -> ReLU -> Linear) applied to the text
    embedding: `[B, D]` (pooled) or `[B, T, D]` (token embeddings, mean-pooled here). `eval_color` (white)
    is returned in eval mode, as in the reference. Without a text embedding, a learned default one is used.

    Args:
        text_dim: D (1024 for SD 2.1's text encoder).
        hidden_dim: width of the hypernetwork.
        num_frequencies: frequencies of the direction encoding.
        eval_color: RGB used in eval mode, or None to keep the learned colour in eval mode too.
    """

    def __init__(
        self,
        text_dim: int = 1024,
        hidden_dim: int = 64,
        num_frequencies: int = 4,
        eval_color: Sequence[float] | None = WHITE,
    ) -> None:
        super().__init__()
        self.encoding = DirectionEncoding(num_frequencies)
        self.hypernetwork = nn.Sequential(
            nn.Linear(text_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, self.encoding.out_features * 3),
        )
        self.default_embedding = nn.Parameter(torch.zeros(text_dim))
        self.eval_color = None if eval_color is None else tuple(float(c) for c in eval_color)

    def forward(self, directions: Tensor, text_embedding: Tensor | None = None) -> Tensor:
        """directions: [B, V, H, W, 3]; text_embedding: [B, D] or [B, T, D] -> [B, V, H, W, 3]."""
        if not self.training and self.eval_color is not None:
            return torch.tensor(self.eval_color, dtype=directions.dtype, device=directions.device).expand(directions.shape)
        batch = directions.shape[0]
        if text_embedding is None:
            text_embedding = self.default_embedding.expand(batch, -1)
        if text_embedding.dim() == 3:
            text_embedding = text_embedding.mean(dim=1)
        if text_embedding.shape[0] != batch:
            raise ValueError(f"expected one text embedding per object ({batch}), got {text_embedding.shape[0]}")
        weights = self.hypernetwork(text_embedding.to(self.default_embedding.dtype))
        weights = weights.view(batch, self.encoding.out_features, 3).to(directions.dtype)
        encoded = self.encoding(directions)  # [B, V, H, W, E]
        color = torch.einsum("bvhwe,bec->bvhwc", encoded, weights)
        return torch.sigmoid(color) * 1.002 - 0.001


def as_background(background: nn.Module | Sequence[float] | None) -> nn.Module:
    """A background module from a module, an RGB triple, or None (white)."""
    if background is None:
        return SolidBackground(WHITE)
    if isinstance(background, nn.Module):
        return background
    if isinstance(background, Tensor):
        background = background.tolist()
    return SolidBackground(tuple(background))
