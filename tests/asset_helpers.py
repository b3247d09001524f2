"""Shared pieces of the textured-asset tests (test_asset.py, test_bake.py, test_device_bake.py): an icosphere,
the analytic sphere field it approximates, and the bake oracles (brute-force texel -> triangle search, the glTF
viewer's tangent-frame shading)."""

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


def position_colour(points):
    """colour = position, mapped from [-1, 1] to [0, 1]."""
    return (np.asarray(points) + 1.0) / 2.0


def texel_points(uvs, faces, positions, size):
    """Independent oracle: the 3D point of every texel centre covered by a triangle, found by brute force
    over the triangles. Returns rows, cols (image rows, row 0 at v = 1) and points [K, 3]."""
    v, u = np.meshgrid((np.arange(size) + 0.5) / size, (np.arange(size) + 0.5) / size, indexing="ij")
    centres = np.stack([u.ravel(), v.ravel()], axis=1)  # row index r -> v = (r + 0.5) / size
    rows, cols, points = [], [], []
    for face in faces:
        a, b, c = uvs[face]
        m = np.array([b - a, c - a]).T
        if abs(np.linalg.det(m)) < 1e-12:
            continue
        w = np.linalg.solve(m, (centres - a).T).T  # [S, 2]
        inside = (w >= 1e-6).all(axis=1) & (w.sum(axis=1) <= 1 - 1e-6)
        idx = np.nonzero(inside)[0]
        bary = np.stack([1 - w[idx].sum(axis=1), w[idx, 0], w[idx, 1]], axis=1)
        rows.append(size - 1 - idx // size)
        cols.append(idx % size)
        points.append(bary @ positions[face])
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(points)


def viewer_normals(normals, tangents, faces, rows, cols, points, normal_map, uvs):
    """What a glTF viewer shades with: per texel, T, B = w cross(N, T) per vertex, N interpolated and
    normalised, then n = x T + y B + z N from the decoded map."""
    size = normal_map.shape[0]
    decoded = normal_map[rows, cols] / 255.0 * 2.0 - 1.0
    bitangents = tangents[:, 3:] * np.cross(normals, tangents[:, :3])
    out = np.zeros_like(points)
    uv_centres = np.stack([(cols + 0.5) / size, (size - 1 - rows + 0.5) / size], axis=1)
    for face in faces:
        a, b, c = uvs[face]
        m = np.array([b - a, c - a]).T
        if abs(np.linalg.det(m)) < 1e-12:
            continue
        w = np.linalg.solve(m, (uv_centres - a).T).T
        inside = (w >= 1e-6).all(axis=1) & (w.sum(axis=1) <= 1 - 1e-6)
        bary = np.stack([1 - w[inside].sum(axis=1), w[inside, 0], w[inside, 1]], axis=1)

        def unit(x):
            return x / np.linalg.norm(x, axis=1, keepdims=True)

        t, bt, n = unit(bary @ tangents[face, :3]), unit(bary @ bitangents[face]), unit(bary @ normals[face])
        d = decoded[inside]
        out[inside] = unit(d[:, :1] * t + d[:, 1:2] * bt + d[:, 2:] * n)
    return out


def texel_normals_without_map(normals, tangents, atlas, rows, cols, size):
    """What the viewer shades with under a flat map (0, 0, 1): the interpolated vertex normal."""
    flat = np.zeros((size, size, 3), np.uint8)
    flat[...] = (128, 128, 255)
    return viewer_normals(normals, tangents, atlas.faces, rows, cols, np.zeros((len(rows), 3)), flat, atlas.uvs)


def faceted_icosphere_atlas(size: int):
    """A flat-shaded icosphere (80 faces, each with its own 3 vertices) unwrapped for a `size`^2 texture: the atlas,
    per atlas vertex positions, unit normals [M, 3] and glTF tangents [M, 4]."""
    from renderers.bake import vertex_tangents
    from renderers.export import unit_vertex_normals
    from renderers.uv_atlas import unwrap

    vertices, faces = icosphere(1)
    vertices, faces = vertices[faces].reshape(-1, 3), np.arange(3 * len(faces)).reshape(-1, 3)
    atlas = unwrap(vertices, faces, size)
    positions = vertices[atlas.vertex_map]
    normals = unit_vertex_normals(vertices, faces)[atlas.vertex_map]
    return atlas, positions, normals, vertex_tangents(positions, normals, atlas.uvs, atlas.faces)
