"""The torch bake (`renderers.device_bake`, the path a GPU runs) against the numpy bake of `renderers.bake`,
run on the CPU: the same UV rasterisation bit for bit, and the same maps to one 8-bit step; plus the
analytic oracles of tests/test_bake.py (colour = position at texel centres, a sphere's normals restored on a
coarse polyhedron) on the torch path itself."""

import numpy as np
import pytest
import torch

from renderers.asset import AssetSettings, make_asset
from renderers.bake import FieldSampler, bake_maps, vertex_tangents
from renderers.device_bake import bake_maps_on_device, rasterize_uv_torch
from renderers.export import unit_vertex_normals
from renderers.uv_atlas import unwrap
from renderers.uv_bake import rasterize_uv
from tests.asset_helpers import (
    SphereField,
    faceted_icosphere_atlas,
    icosphere,
    position_colour,
    texel_normals_without_map,
    texel_points,
    viewer_normals,
)


def _bumpy_atlas(size: int, subdivisions: int = 3):
    """A bumpy icosphere (not on the sphere field: the Newton step matters) with its atlas, vertex normals and
    tangents: positions, normals [M, 3], tangents [M, 4], uvs [M, 2], faces [F, 3]."""
    vertices, faces = icosphere(subdivisions)
    vertices = vertices * (1 + 0.05 * np.sin(7 * vertices[:, :1]))
    atlas = unwrap(vertices, faces, size)
    positions = vertices[atlas.vertex_map]
    normals = unit_vertex_normals(vertices, faces)[atlas.vertex_map]
    return positions, normals, vertex_tangents(positions, normals, atlas.uvs, atlas.faces), atlas.uvs, atlas.faces


@pytest.mark.parametrize("max_candidates", [1_000, 1 << 22])
def test_torch_uv_rasterisation_equals_numpy_bit_for_bit(max_candidates):
    """Face ids (the later face on shared edges) and float64 barycentrics as `rasterize_uv`, whether the faces
    are tested in one group or in many small ones."""
    _, _, _, uvs, faces = _bumpy_atlas(160)
    ids, bary = rasterize_uv(uvs, faces, 160)
    ids_t, bary_t = rasterize_uv_torch(torch.as_tensor(uvs), torch.as_tensor(faces), 160, max_candidates)
    assert (ids >= 0).sum() > 0.4 * 160 * 160
    np.testing.assert_array_equal(ids_t.numpy(), ids)
    np.testing.assert_array_equal(bary_t.numpy(), bary)


@pytest.mark.parametrize("dtype, share", [(torch.float64, 1e-3), (torch.float32, 1e-2)])
def test_torch_bake_gives_the_numpy_maps_to_one_step(dtype, share):
    """Coverage identical; albedo and normal map within one 8-bit step of the numpy bake's (float64 field), on at
    most `share` of the texels (the rounding of values at a half step)."""
    size = 128
    positions, normals, tangents, uvs, faces = _bumpy_atlas(size)
    reference = FieldSampler(SphereField(), dtype=torch.float64)
    expected = bake_maps(positions, normals, tangents, uvs, faces, size, reference.color, reference.sdf)
    maps = bake_maps_on_device(positions, normals, tangents, uvs, faces, size, FieldSampler(SphereField(), dtype=dtype),
                               dtype=dtype)
    np.testing.assert_array_equal(maps.coverage, expected.coverage)
    for got, want in ((maps.albedo, expected.albedo), (maps.normal, expected.normal)):
        difference = np.abs(got.astype(np.int64) - want.astype(np.int64))
        assert difference.max() <= 1
        assert (difference > 0).any(axis=-1).mean() <= share


def test_torch_bake_of_colour_equals_position_matches_the_field_at_texel_centres():
    vertices, faces = icosphere(2)
    size = 96
    atlas = unwrap(vertices, faces, size)
    positions = vertices[atlas.vertex_map]
    normals = unit_vertex_normals(vertices, faces)[atlas.vertex_map]
    sampler = FieldSampler(SphereField(), dtype=torch.float64)
    maps = bake_maps_on_device(positions, normals, None, atlas.uvs, atlas.faces, size, sampler, normal_map=False,
                               dtype=torch.float64)
    assert maps.normal is None
    rows, cols, points = texel_points(atlas.uvs, atlas.faces, positions, size)
    assert maps.coverage[rows, cols].all()
    np.testing.assert_allclose(maps.albedo[rows, cols] / 255.0, position_colour(points), atol=0.5 / 255 + 1e-9)
    assert (maps.albedo.reshape(-1, 3).max(axis=1) > 0).all()  # gutters filled


def test_torch_normal_map_restores_the_sphere_normals_on_a_coarse_polyhedron():
    size = 128
    atlas, positions, normals, tangents = faceted_icosphere_atlas(size)  # flat-shaded facets
    maps = bake_maps_on_device(positions, normals, tangents, atlas.uvs, atlas.faces, size, FieldSampler(SphereField()))
    rows, cols, points = texel_points(atlas.uvs, atlas.faces, positions, size)
    shaded = viewer_normals(normals, tangents, atlas.faces, rows, cols, points, maps.normal, atlas.uvs)
    truth = points / np.linalg.norm(points, axis=1, keepdims=True)
    error = np.degrees(np.arccos(np.clip(np.einsum("ij,ij->i", shaded, truth), -1, 1)))
    plain = texel_normals_without_map(normals, tangents, atlas, rows, cols, size)
    unmapped = np.degrees(np.arccos(np.clip(np.einsum("ij,ij->i", plain, truth), -1, 1)))
    assert error.max() < 1.5 and unmapped.max() > 15


def test_make_asset_bakes_on_the_device_on_request(monkeypatch):
    """`make_asset(..., bake_on_device=True)` takes the torch path (on the CPU here) and gives the asset of the
    numpy bake: same mesh and atlas, maps within one step."""
    import renderers.asset as asset_module

    vertices, faces = icosphere(3)
    sampler = FieldSampler(SphereField())
    settings = AssetSettings(faces=300, texture_size=64)
    numpy_asset = make_asset(vertices, faces, sampler, settings)
    calls = []
    original = asset_module.bake_maps_on_device

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(asset_module, "bake_maps_on_device", counting)
    torch_asset = make_asset(vertices, faces, sampler, settings, bake_on_device=True)
    assert calls == [1]
    np.testing.assert_array_equal(torch_asset.faces, numpy_asset.faces)
    np.testing.assert_array_equal(torch_asset.uvs, numpy_asset.uvs)
    np.testing.assert_array_equal(torch_asset.maps.coverage, numpy_asset.maps.coverage)
    for got, want in zip((torch_asset.maps.albedo, torch_asset.maps.normal),
                         (numpy_asset.maps.albedo, numpy_asset.maps.normal), strict=True):
        assert np.abs(got.astype(np.int64) - want.astype(np.int64)).max() <= 1


def test_torch_bake_in_steps_equals_one_step(monkeypatch):
    """Texels baked a few hundred at a time (as a large texture is, to bound memory) give the maps of one step."""
    import renderers.device_bake as device_bake

    size = 96
    positions, normals, tangents, uvs, faces = _bumpy_atlas(size)
    sampler = FieldSampler(SphereField())
    whole = bake_maps_on_device(positions, normals, tangents, uvs, faces, size, sampler)
    monkeypatch.setattr(device_bake, "TEXELS_PER_STEP", 700)
    steps = bake_maps_on_device(positions, normals, tangents, uvs, faces, size, sampler)
    assert whole.coverage.sum() > 5 * 700
    np.testing.assert_array_equal(steps.albedo, whole.albedo)
    np.testing.assert_array_equal(steps.normal, whole.normal)
