"""Analytic and tiny random fields implementing renderers.types.Field, for the renderer tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SphereField(nn.Module):
    """B spheres: sdf = scale * (|p - centre_b| - radius_b); colour = (p + 1) / 2; no deformation."""

    def __init__(self, radius=0.5, center=(0.0, 0.0, 0.0), scale: float = 1.0, dtype=torch.float32) -> None:
        super().__init__()
        radius = torch.as_tensor(radius, dtype=dtype).reshape(-1)
        center = torch.as_tensor(center, dtype=dtype).reshape(-1, 3)
        batch = max(len(radius), len(center))
        self.register_buffer("radius", radius.expand(batch).clone())
        self.register_buffer("center", center.expand(batch, 3).clone())
        self.scale = scale

    @property
    def batch_size(self) -> int:
        return self.radius.shape[0]

    def sdf(self, points: Tensor) -> Tensor:
        return self.scale * ((points - self.center[:, None]).norm(dim=-1) - self.radius[:, None])

    def deformation(self, points: Tensor) -> Tensor:
        return torch.zeros_like(points)

    def color(self, points: Tensor) -> Tensor:
        return (points + 1) / 2


class BoxField(nn.Module):
    """One axis-aligned box of half-size `half` (exact SDF), constant colour."""

    def __init__(self, half=(0.4, 0.3, 0.2), rgb=(0.9, 0.2, 0.1)) -> None:
        super().__init__()
        self.register_buffer("half_size", torch.tensor(half))
        self.register_buffer("rgb", torch.tensor(rgb))
        self.batch_size = 1

    def sdf(self, points: Tensor) -> Tensor:
        q = points.abs() - self.half_size.to(points)
        return q.clamp_min(0).norm(dim=-1) + q.amax(dim=-1).clamp_max(0)

    def deformation(self, points: Tensor) -> Tensor:
        return torch.zeros_like(points)

    def color(self, points: Tensor) -> Tensor:
        return self.rgb.to(points).expand(points.shape)


def _mlp(inputs: int, hidden: int, outputs: int, generator: torch.Generator, dtype) -> nn.Sequential:
    layers = nn.Sequential(nn.Linear(inputs, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, outputs, bias=False))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            with torch.no_grad():
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator, dtype=dtype) / math.sqrt(layer.in_features))
    return layers.to(dtype)


class TinyTriplaneField(nn.Module):
    """A tiny random triplane field in the reference's style (written for these tests).

    geometry_planes / texture_planes: [B, 3, C, R, R] (xy, xz, yz), bilinear lookup (align_corners=False,
    zeros outside); sdf = MLP(sum of geometry features) * sdf_scale + (|p| - radius); deformation = MLP(...);
    colour = sigmoid(MLP(concatenated texture features)) * 1.002 - 0.001.
    """

    def __init__(
        self,
        batch_size: int = 1,
        channels: int = 4,
        resolution: int = 16,
        hidden: int = 16,
        radius: float = 0.5,
        sdf_scale: float = 0.1,
        deformation_scale: float = 0.3,
        seed: int = 0,
        dtype=torch.float32,
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        shape = (batch_size, 3, channels, resolution, resolution)
        self.geometry_planes = nn.Parameter(torch.randn(shape, generator=g, dtype=dtype))
        self.texture_planes = nn.Parameter(torch.randn(shape, generator=g, dtype=dtype))
        self.sdf_mlp = _mlp(channels, hidden, 1, g, dtype)
        self.deformation_mlp = _mlp(channels, hidden, 3, g, dtype)
        self.color_mlp = _mlp(3 * channels, hidden, 3, g, dtype)
        self.radius, self.sdf_scale, self.deformation_scale = radius, sdf_scale, deformation_scale
        self.batch_size = batch_size

    @staticmethod
    def _sample(planes: Tensor, points: Tensor) -> Tensor:
        """planes [B, 3, C, R, R], points [B, N, 3] -> [B, 3, N, C]."""
        batch, _, channels, res, _ = planes.shape
        x, y, z = points.unbind(-1)
        coords = torch.stack([torch.stack([x, y], -1), torch.stack([x, z], -1), torch.stack([z, y], -1)], dim=1)  # [B, 3, N, 2]
        sampled = F.grid_sample(
            planes.reshape(batch * 3, channels, res, res),
            coords.reshape(batch * 3, 1, -1, 2).to(planes.dtype),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )  # [B*3, C, 1, N]
        return sampled.reshape(batch, 3, channels, -1).transpose(2, 3)

    def sdf(self, points: Tensor) -> Tensor:
        features = self._sample(self.geometry_planes, points).sum(1)
        return self.sdf_mlp(features)[..., 0] * self.sdf_scale + points.norm(dim=-1) - self.radius

    def deformation(self, points: Tensor) -> Tensor:
        return self.deformation_mlp(self._sample(self.geometry_planes, points).sum(1)) * self.deformation_scale

    def color(self, points: Tensor) -> Tensor:
        features = self._sample(self.texture_planes, points)  # [B, 3, N, C]
        features = features.permute(0, 2, 1, 3).flatten(2)  # [B, N, 3C]
        return torch.sigmoid(self.color_mlp(features)) * 1.002 - 0.001
