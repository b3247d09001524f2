"""UV atlas of a (decimated) mesh with xatlas, with options chosen for speed.

    atlas = unwrap(vertices, faces, texture_size=1024)   # atlas.vertex_map, atlas.faces, atlas.uvs

xatlas splits vertices along chart seams: atlas vertex i is input vertex `vertex_map[i]`. The time goes
into chart computation (packing is cheap in comparison), so the chart options are the speed knobs:
`max_iterations=0` (no chart-growing refinement) cuts its time about 2.5x on a 20k-face mesh for a few
percent of atlas utilisation; `blockAlign` packing is faster than the default placement search at the
same utilisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class UVAtlas:
    """vertex_map: [M] int64, input vertex of each atlas vertex; faces: [F, 3] int64 into the atlas
    vertices (same order as the input faces); uvs: [M, 2] float64 in [0, 1] (u right, v up)."""

    vertex_map: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray


def unwrap(vertices, faces, texture_size: int = 1024, padding: int = 2) -> UVAtlas:
    """Charts and a packed atlas for a `texture_size`^2 texture with `padding` texels between charts.

    vertices: [N, 3] float; faces: [F, 3] int.
    """
    import xatlas

    chart_options = xatlas.ChartOptions()
    chart_options.max_iterations = 0
    pack_options = xatlas.PackOptions()
    pack_options.resolution = int(texture_size)
    pack_options.padding = int(padding)
    pack_options.blockAlign = True
    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(vertices, np.float32), np.ascontiguousarray(faces, np.uint32))
    atlas.generate(chart_options, pack_options)
    vertex_map, atlas_faces, uvs = atlas[0]
    return UVAtlas(vertex_map.astype(np.int64), atlas_faces.astype(np.int64), uvs.astype(np.float64))
