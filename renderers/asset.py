"""Game-ready asset from a full marching-cubes mesh and its field: decimate, unwrap, bake, write.

    asset = make_asset(vertices, faces, FieldSampler(field), AssetSettings(faces=20_000, texture_size=1024))
    write_asset("chair.glb", asset)            # PBR GLB: albedo + normal map, tangents, metallic 0
    asset.stats, asset.seconds                 # sizes, Chamfer / Hausdorff to the full mesh; per-stage times

1. `decimation.decimate` to the face budget (quadric), and the sampled Chamfer / Hausdorff distance of
   the light mesh to the full one;
2. `uv_atlas.unwrap` of the light mesh (xatlas, speed options);
3. the bake from the field: albedo from its colour, the normal map from its SDF gradient (the
   full-resolution surface), gutters filled; `bake.bake_maps` (threaded numpy) when the sampler's device is
   the CPU, `device_bake.bake_maps_on_device` (torch, on the field's device) otherwise;
4. `export.write_textured_mesh`: GLB or OBJ / MTL with both maps.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from renderers.bake import BakedMaps, FieldSampler, bake_maps, vertex_tangents
from renderers.decimation import decimate, surface_distance
from renderers.device_bake import bake_maps_on_device
from renderers.errors import UserError
from renderers.export import unit_vertex_normals, write_textured_mesh
from renderers.uv_atlas import unwrap

ASSET_STAGES = ("decimate", "distance", "unwrap", "bake", "write")
MAX_TEXTURE_SIZE = 8192


class AssetSettingsError(UserError, ValueError):
    """A face budget, texture size or roughness that cannot make an asset (one-line message)."""


@dataclass(frozen=True)
class AssetSettings:
    """faces: face budget of the light mesh; texture_size: texels per side of both maps; roughness: the
    material's (metallic is 0); normal_map: bake one from the SDF; measure_distance: Chamfer / Hausdorff
    to the full mesh in the stats (0.4 - 0.5 s for a full-size 160^3 mesh on 2 cores)."""

    faces: int = 20_000
    texture_size: int = 1024
    roughness: float = 1.0
    normal_map: bool = True
    measure_distance: bool = True

    def __post_init__(self):
        if isinstance(self.faces, bool) or not isinstance(self.faces, int) or self.faces < 4:
            raise AssetSettingsError(f"faces must be an integer of at least 4, got {self.faces!r}")
        if (isinstance(self.texture_size, bool) or not isinstance(self.texture_size, int)
                or not 16 <= self.texture_size <= MAX_TEXTURE_SIZE):
            raise AssetSettingsError(f"texture size must be an integer from 16 to {MAX_TEXTURE_SIZE}, "
                                     f"got {self.texture_size!r}")
        if not 0.0 <= float(self.roughness) <= 1.0:
            raise AssetSettingsError(f"roughness must be between 0 and 1, got {self.roughness!r}")


@dataclass
class TexturedAsset:
    """The light mesh with its atlas and maps, in world coordinates (+z up, front +x).

    vertices, normals: [M, 3] per atlas vertex (seam vertices split; normals unit, from the unsplit mesh so
    seams do not show); tangents: [M, 4] (glTF TANGENT); faces: [F, 3]; uvs: [M, 2] in [0, 1], v up;
    maps: the baked albedo / normal images; stats: sizes and distances; seconds: wall-clock time per stage;
    cpu_seconds: process CPU time per stage (all threads).
    """

    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    normals: np.ndarray
    tangents: np.ndarray
    maps: BakedMaps
    roughness: float
    stats: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    cpu_seconds: dict = field(default_factory=dict)


@contextmanager
def _timed(seconds: dict, cpu_seconds: dict, stage: str):
    start, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start
        cpu_seconds[stage] = cpu_seconds.get(stage, 0.0) + time.process_time() - cpu


def make_asset(vertices, faces, sampler: FieldSampler, settings: AssetSettings | None = None,
               bake_on_device: bool | None = None) -> TexturedAsset:
    """Decimate, unwrap and bake the full mesh (vertices [N, 3] world, faces [F, 3]) from the field of
    `sampler`. bake_on_device: bake with torch on `sampler.device` (default: when that is not the CPU; there the
    threaded numpy bake takes about as long in smaller steps; the maps agree to one 8-bit step on the tests)."""
    settings = settings or AssetSettings()
    if bake_on_device is None:
        bake_on_device = sampler.device.type != "cpu"
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    full_v, full_f = np.asarray(vertices, np.float64), np.asarray(faces, np.int64)
    with _timed(seconds, cpu, "decimate"):
        small_v, small_f = decimate(full_v, full_f, settings.faces)
    stats = dict(full_vertices=len(full_v), full_faces=len(full_f), vertices=len(small_v), faces=len(small_f),
                 texture_size=settings.texture_size)
    if settings.measure_distance:
        with _timed(seconds, cpu, "distance"):
            stats["distance_to_full_mesh"] = surface_distance(small_v, small_f, full_v, full_f).as_dict()
    with _timed(seconds, cpu, "unwrap"):
        atlas = unwrap(small_v, small_f, settings.texture_size)
    with _timed(seconds, cpu, "bake"):
        positions = small_v[atlas.vertex_map]
        normals = unit_vertex_normals(small_v, small_f)[atlas.vertex_map]
        tangents = vertex_tangents(positions, normals, atlas.uvs, atlas.faces)
        if bake_on_device:
            maps = bake_maps_on_device(positions, normals, tangents, atlas.uvs, atlas.faces, settings.texture_size,
                                       sampler, settings.normal_map)
            if sampler.device.type == "cuda":
                torch.cuda.synchronize(sampler.device)
        else:
            maps = bake_maps(positions, normals, tangents, atlas.uvs, atlas.faces, settings.texture_size,
                             sampler.color, sampler.sdf if settings.normal_map else None)
    stats["atlas_vertices"] = len(positions)
    stats["atlas_coverage"] = float(maps.coverage.mean())
    return TexturedAsset(positions, atlas.faces, atlas.uvs, normals, tangents, maps, float(settings.roughness),
                         stats, seconds, cpu)


def write_asset(path: str | Path, asset: TexturedAsset, file_format: str | None = None) -> Path:
    """Write the asset as PBR GLB (default) or OBJ / MTL with both maps; adds the "write" time."""
    with _timed(asset.seconds, asset.cpu_seconds, "write"):
        return write_textured_mesh(
            path, asset.vertices, asset.faces, asset.uvs, asset.normals, asset.tangents, asset.maps.albedo,
            asset.maps.normal, asset.roughness, file_format,
        )
