"""Rasterisation of a UV layout into texel -> (face, barycentric) maps, for texture baking."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np


def rasterize_uv(uvs: np.ndarray, faces: np.ndarray, size: int, pool: ThreadPoolExecutor | None = None,
                 groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Find the triangle covering each texel centre of a `size` x `size` texture.

    uvs: [N, 2] in [0, 1] (u right, v up); faces: [F, 3] indices into uvs.
    Returns face_ids [size, size] int64 (-1 where no triangle covers the texel) and barycentric
    weights [size, size, 3]. Row 0 is v = 0 (flip rows to get an image with v up).
    Vectorised over the triangles' bounding boxes, so the cost is about the atlas area in texels. With a
    thread `pool`, `groups` groups of faces are rasterised on its threads (numpy releases the GIL) and written in face
    order, so a texel on an edge shared by two faces goes to the same face as without it (the later one).
    """
    tri = uvs[faces].astype(np.float64) * size - 0.5  # [F, 3, 2] in texel-centre coordinates
    bounds = np.linspace(0, len(faces), max(1, groups) + 1).astype(np.int64)
    ranges = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    if pool is not None and len(ranges) > 1:
        covered = pool.map(lambda r: _covered_texels(tri, size, *r), ranges)
    else:
        covered = (_covered_texels(tri, size, *r) for r in ranges)
    face_ids = np.full((size, size), -1, np.int64)
    bary = np.zeros((size, size, 3), np.float64)
    for py, px, face, weights in covered:  # in face order
        face_ids[py, px] = face
        bary[py, px] = weights
    return face_ids, bary


def _covered_texels(tri: np.ndarray, size: int, first: int, last: int):
    """The texel centres inside faces first : last of `tri` ([F, 3, 2], texel-centre coordinates): rows [K],
    columns [K], faces [K] and barycentric weights [K, 3], in face order."""
    tri = tri[first:last]
    lo = np.clip(np.floor(tri.min(axis=1)).astype(np.int64), 0, size - 1)
    hi = np.clip(np.ceil(tri.max(axis=1)).astype(np.int64), 0, size - 1)
    extent = hi - lo + 1  # [F, 2]
    counts = extent[:, 0] * extent[:, 1]
    face_of = np.repeat(np.arange(len(tri)), counts)
    local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    px = lo[face_of, 0] + local % extent[face_of, 0]
    py = lo[face_of, 1] + local // extent[face_of, 0]

    # per face, the barycentrics as affine functions of the texel centre: w1, w2 = K @ (x, y, 1)
    a, v0, v1 = tri[:, 0], tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    denom = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
    valid_face = np.abs(denom) > 1e-12
    inv = 1.0 / np.where(valid_face, denom, 1.0)
    coefficients = np.stack([v1[:, 1] * inv, -v1[:, 0] * inv, (v1[:, 0] * a[:, 1] - v1[:, 1] * a[:, 0]) * inv,
                             -v0[:, 1] * inv, v0[:, 0] * inv, (v0[:, 1] * a[:, 0] - v0[:, 0] * a[:, 1]) * inv], axis=1)
    k = coefficients[face_of]  # [M, 6], one gather per candidate texel
    x, y = px.astype(np.float64), py.astype(np.float64)
    w1 = k[:, 0] * x + k[:, 1] * y + k[:, 2]
    w2 = k[:, 3] * x + k[:, 4] * y + k[:, 5]
    w0 = 1.0 - w1 - w2
    eps = -1e-9
    inside = valid_face[face_of] & (w0 >= eps) & (w1 >= eps) & (w2 >= eps)
    weights = np.stack([w0[inside], w1[inside], w2[inside]], axis=1)
    return py[inside], px[inside], face_of[inside] + first, weights
