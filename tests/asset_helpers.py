"""Shared pieces of the textured-asset tests (tests/test_asset.py, tests/test_bake.py): an icosphere and the
analytic sphere field it approximates."""

from __future__ import annotations

import numpy as np
import trimesh

RADIUS = 0.5


def icosphere(subdivisions: int, radius: float = RADIUS) -> tuple[np.ndarray, np.ndarray]:
    """Vertices `[V, 3]` float64 and faces `[F, 3]` int64 of trimesh's icosphere."""
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return np.asarray(sphere.vertices, np.float64), np.asarray(sphere.faces, np.int64)


class SphereField:
    """A `renderers.types.Field` of one object: the sphere of radius RADIUS, colour = position."""

    batch_size = 1

    def sdf(self, points):
        return points.norm(dim=-1) - RADIUS

    def color(self, points):
        return (points + 1) / 2
