"""Marching-cubes topology in PyTorch: which grid edges the surface crosses and the triangles over them, from a
boolean inside / outside volume, vectorised (case table, one gather, edge welding by a running count of the crossed edges), on the
volume's device: CPU and CUDA take the same code path.

The case table is PyMCubes' own: it is read once from PyMCubes run on each of the 256 configurations of a
single cube (Lorensen's table, no ambiguity resolution), so this extractor and PyMCubes give the same
vertices, the same triangles and the same triangle order (`tests/test_marching_cubes_torch.py`).
"""

from __future__ import annotations

from functools import lru_cache
from itertools import product

import numpy as np
import torch
from torch import Tensor

# Cube corner k sits at offset CORNERS[k] = (dx, dy, dz), k = 4 dx + 2 dy + dz.
CORNERS = np.array(list(product((0, 1), repeat=3)), dtype=np.int64)  # [8, 3]
# The 12 cube edges: the lower corner's offset and the axis the edge runs along.
EDGE_STARTS = np.array([c for axis in range(3) for c in CORNERS if c[axis] == 0], dtype=np.int64)  # [12, 3]
EDGE_AXES = np.repeat(np.arange(3), 4)  # [12]
MAX_TRIANGLES = 5  # per cube, in Lorensen's table


@lru_cache(maxsize=1)
def case_table() -> np.ndarray:
    """`[256, 5, 3]` int64: the cube edges (0-11) of each triangle of each corner configuration, -1 padded.
    Configuration bit k is set when corner k is inside."""
    import mcubes

    edge_id = {(tuple(start), int(axis)): index for index, (start, axis) in enumerate(zip(EDGE_STARTS, EDGE_AXES, strict=True))}
    table = -np.ones((256, MAX_TRIANGLES, 3), dtype=np.int64)
    for case in range(1, 255):
        volume = -np.ones((2, 2, 2))
        for k, corner in enumerate(CORNERS):
            if case >> k & 1:
                volume[tuple(corner)] = 1.0
        verts, faces = mcubes.marching_cubes(volume, 0.0)
        lower = np.floor(np.asarray(verts) + 1e-9).astype(np.int64)
        axes = np.argmax(np.asarray(verts) - lower > 0.25, axis=1)
        edges = np.array([edge_id[(tuple(s), int(a))] for s, a in zip(lower, axes, strict=True)], dtype=np.int64)
        table[case, : len(faces)] = edges[np.asarray(faces, dtype=np.int64)]
    return table


def sign_topology(inside: Tensor) -> tuple[Tensor, Tensor]:
    """Marching-cubes topology of `inside [R, R, R]` (bool, any device), padded by one outside layer.

    Returns (edge_ends `[E, 2]`, faces `[F, 3]`), int64 on `inside`'s device: edge_ends are flat indices into
    the padded `(R + 2)^3` grid, sorted by (lower end, axis); faces index the E edges (= mesh vertices),
    counter-clockwise seen from outside, in PyMCubes' order (cubes x-major, then the case table's order).
    """
    device = inside.device
    res = inside.shape[0]
    padded = res + 2
    volume = torch.zeros((padded,) * 3, dtype=torch.bool, device=device)
    volume[1:-1, 1:-1, 1:-1] = inside
    cells = padded - 1
    case = torch.zeros((cells,) * 3, dtype=torch.uint8, device=device)
    for k, (dx, dy, dz) in enumerate(CORNERS.tolist()):
        case |= volume[dx : dx + cells, dy : dy + cells, dz : dz + cells].to(torch.uint8) << k
    case = case.reshape(-1)
    active = torch.nonzero((case != 0) & (case != 255)).squeeze(1)  # ascending: x-major, as PyMCubes visits cubes
    empty = torch.zeros((0, 2), dtype=torch.int64, device=device), torch.zeros((0, 3), dtype=torch.int64, device=device)
    if active.numel() == 0:
        return empty
    strides = (padded * padded, padded, 1)
    table = torch.as_tensor(case_table(), device=device)
    # edge e of the cube whose lower corner is padded-grid cell c has the key 3 (c + offset_e) + axis_e
    edge_keys = torch.as_tensor((EDGE_STARTS @ np.array(strides)) * 3 + EDGE_AXES, device=device)  # [12]
    triangles = table[case[active].long()]  # [A, 5, 3]
    present = triangles[..., 0] >= 0
    corner = (active // (cells * cells)) * strides[0] + (active // cells % cells) * strides[1] + active % cells  # [A]
    keys = (corner * 3)[:, None, None] + edge_keys[triangles.clamp_min(0)]  # [A, 5, 3]
    keys = keys[present]  # [T, 3]
    # Welding without a sort: the crossed edges, numbered in key order, are the mesh vertices (the table gives
    # every crossed edge of a cube a vertex; an edge that wraps around a row joins two padding cells, both
    # outside, so it is never crossed).
    flat = volume.reshape(-1)
    crossed = torch.zeros((flat.numel(), 3), dtype=torch.bool, device=device)
    for axis, stride in enumerate(strides):
        crossed[:-stride, axis] = flat[:-stride] != flat[stride:]
    crossed = crossed.reshape(-1)
    vertex_count = torch.cumsum(crossed, 0, dtype=torch.int32)  # [P^3 * 3]: crossed edges up to each key
    faces = vertex_count[keys].long() - 1  # [T, 3]
    edge_key = torch.nonzero(crossed).squeeze(1)
    start, axis = edge_key // 3, edge_key % 3
    step = torch.tensor(strides, dtype=torch.int64, device=device)[axis]
    return torch.stack([start, start + step], dim=1), faces.contiguous()
