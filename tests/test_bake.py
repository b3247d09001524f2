"""Baking from a field: albedo of colour = position at texel centres, and a normal map from a sphere's SDF
that gives a flat-shaded polyhedron the sphere's normals. Oracles: brute-force texel -> triangle search and
the glTF viewer's tangent-frame formula (three.js, the Khronos sample viewer)."""

import numpy as np
import torch

from renderers.bake import FieldSampler, bake_maps, vertex_tangents
from renderers.export import unit_vertex_normals
from renderers.uv_atlas import unwrap
from tests.asset_helpers import (
    RADIUS,
    SphereField,
    faceted_icosphere_atlas,
    icosphere,
    position_colour,
    texel_normals_without_map,
    texel_points,
    viewer_normals,
)


def _sphere_sdf(points):
    """SDF of the sphere of radius RADIUS and its exact gradient."""
    norm = np.linalg.norm(points, axis=1)
    return norm - RADIUS, points / norm[:, None]


def test_albedo_of_colour_equals_position_matches_the_field_at_texel_centres():
    vertices, faces = icosphere(2)
    size = 128
    atlas = unwrap(vertices, faces, size)
    assert len(atlas.faces) == len(faces) and (atlas.uvs >= 0).all() and (atlas.uvs <= 1).all()
    positions = vertices[atlas.vertex_map]
    np.testing.assert_allclose(positions[atlas.faces], vertices[faces])  # same triangles, same order
    normals = unit_vertex_normals(vertices, faces)[atlas.vertex_map]
    maps = bake_maps(positions, normals, None, atlas.uvs, atlas.faces, size, position_colour)
    rows, cols, points = texel_points(atlas.uvs, atlas.faces, positions, size)
    assert len(rows) > 0.4 * size * size  # most of the atlas is covered
    assert maps.coverage[rows, cols].all()
    # rounding to 8 bits is the only error: half a step
    np.testing.assert_allclose(maps.albedo[rows, cols] / 255.0, position_colour(points), atol=0.5 / 255 + 1e-9)
    # gutters are filled: no black texel anywhere, each takes a neighbouring chart colour
    assert (maps.albedo.reshape(-1, 3).max(axis=1) > 0).all()


def test_normal_map_from_a_sphere_sdf_restores_the_sphere_normals_on_a_coarse_polyhedron():
    size = 128
    atlas, positions, normals, tangents = faceted_icosphere_atlas(size)  # flat-shaded facets
    np.testing.assert_allclose(np.linalg.norm(tangents[:, :3], axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(np.einsum("ij,ij->i", tangents[:, :3], normals), 0.0, atol=1e-9)
    assert set(np.unique(tangents[:, 3])) <= {-1.0, 1.0}
    maps = bake_maps(positions, normals, tangents, atlas.uvs, atlas.faces, size, position_colour, _sphere_sdf)
    rows, cols, points = texel_points(atlas.uvs, atlas.faces, positions, size)
    shaded = viewer_normals(normals, tangents, atlas.faces, rows, cols, points, maps.normal, atlas.uvs)
    truth = points / np.linalg.norm(points, axis=1, keepdims=True)
    error = np.degrees(np.arccos(np.clip(np.einsum("ij,ij->i", shaded, truth), -1, 1)))
    assert error.max() < 1.5  # 8-bit quantisation: about half a degree
    # without the map the facets' normals are off by up to ~20 degrees
    corners = texel_normals_without_map(normals, tangents, atlas, rows, cols, size)
    plain = np.degrees(np.arccos(np.clip(np.einsum("ij,ij->i", corners, truth), -1, 1)))
    assert plain.max() > 15 and plain.mean() > 10 * error.mean()
    # the albedo was sampled on the sphere (the Newton step), not on the facets
    on_sphere = truth * RADIUS
    np.testing.assert_allclose(maps.albedo[rows, cols] / 255.0, position_colour(on_sphere), atol=0.5 / 255 + 1e-3)


def test_field_sampler_gives_autograd_gradients():
    sampler = FieldSampler(SphereField(), chunk=7)
    points = np.random.default_rng(0).normal(size=(20, 3))
    sdf, gradient = sampler.sdf(points)
    expected_sdf, expected_gradient = _sphere_sdf(points)
    np.testing.assert_allclose(sdf, expected_sdf, atol=1e-6)
    np.testing.assert_allclose(gradient, expected_gradient, atol=1e-6)
    np.testing.assert_allclose(sampler.color(points), np.clip(position_colour(points), 0, 1), atol=1e-6)


def test_field_sampler_threads_give_the_chunks_in_order():
    """Chunks evaluated by 2 threads come back in order: the same values as one thread, bit for bit."""
    threads = torch.get_num_threads()
    points = np.random.default_rng(0).normal(size=(1000, 3)) * 0.6
    one, two = FieldSampler(SphereField(), chunk=64, workers=1), FieldSampler(SphereField(), chunk=64, workers=2)
    np.testing.assert_array_equal(one.color(points), two.color(points))
    for a, b in zip(one.sdf(points), two.sdf(points), strict=True):
        np.testing.assert_array_equal(a, b)
    assert torch.get_num_threads() == threads  # restored after the threaded evaluation


def test_bake_on_threads_equals_one_thread_bit_for_bit(monkeypatch):
    """Texel chunks baked on 2 threads (and the UV layout rasterised in 2 face groups) give the maps of one
    thread, bit for bit; small chunks so that both threads get several."""
    import renderers.bake as bake

    monkeypatch.setattr(bake, "TEXEL_CHUNK", 1000)
    vertices, faces = icosphere(2)
    vertices = vertices * (1 + 0.05 * np.sin(7 * vertices[:, :1]))  # not a sphere: the Newton step matters
    size = 96
    atlas = unwrap(vertices, faces, size)
    positions = vertices[atlas.vertex_map]
    normals = unit_vertex_normals(vertices, faces)[atlas.vertex_map]
    tangents = vertex_tangents(positions, normals, atlas.uvs, atlas.faces)
    args = (positions, normals, tangents, atlas.uvs, atlas.faces, size, position_colour, _sphere_sdf)
    one, two = bake_maps(*args, workers=1), bake_maps(*args, workers=2)
    assert one.coverage.sum() > 3 * 1000
    np.testing.assert_array_equal(one.coverage, two.coverage)
    np.testing.assert_array_equal(one.albedo, two.albedo)
    np.testing.assert_array_equal(one.normal, two.normal)


def test_unwrap_in_slabs_keeps_the_faces_and_packs_the_charts_without_overlap():
    """A mesh charted in slabs (here 5 of 64 faces): the same triangles in the same order, every slab's charts in
    one atlas, no texel claimed by two triangles, and the albedo bake is as exact as with one slab."""
    from renderers.uv_atlas import _slabs
    from renderers.uv_bake import _covered_texels

    vertices, faces = icosphere(2)
    size = 128
    slabs = _slabs(vertices, faces, 64)
    assert len(slabs) == 5 and sorted(np.concatenate(slabs)) == list(range(len(faces)))
    atlas = unwrap(vertices, faces, size, part_faces=64)
    positions = vertices[atlas.vertex_map]
    np.testing.assert_allclose(positions[atlas.faces], vertices[faces])  # same triangles, same order
    assert (atlas.uvs >= 0).all() and (atlas.uvs <= 1).all()
    rows, cols, face_of, _ = _covered_texels(atlas.uvs[atlas.faces] * size - 0.5, size, 0, len(faces))
    texels = rows * size + cols
    assert len(np.unique(texels)) > 0.99 * len(texels)  # only texel centres on a shared edge count twice
    assert len(np.unique(face_of)) > 0.95 * len(faces)
    normals = unit_vertex_normals(vertices, faces)[atlas.vertex_map]
    maps = bake_maps(positions, normals, None, atlas.uvs, atlas.faces, size, position_colour)
    rows, cols, points = texel_points(atlas.uvs, atlas.faces, positions, size)
    np.testing.assert_allclose(maps.albedo[rows, cols] / 255.0, position_colour(points), atol=0.5 / 255 + 1e-9)


def test_no_chart_exceeds_its_share_of_the_surface():
    """On a smooth sphere xatlas grows few large charts (8, the largest 27 % of the surface, without the cap), which
    costs the most time; no chart exceeds the area of MAX_CHART_FACES mean faces, and the albedo bake stays exact."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from renderers.uv_atlas import MAX_CHART_FACES

    vertices, faces = icosphere(4)
    size = 256
    atlas = unwrap(vertices, faces, size)
    # charts: faces joined through the atlas vertices they share (seams split vertices between charts)
    incidence = coo_matrix((np.ones(atlas.faces.size), (np.repeat(np.arange(len(faces)), 3), atlas.faces.ravel())),
                           shape=(len(faces), len(atlas.uvs))).tocsr()
    count, chart = connected_components(incidence @ incidence.T, directed=False)
    triangles = vertices[faces]
    areas = 0.5 * np.linalg.norm(np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0]), axis=1)
    share = MAX_CHART_FACES / len(faces)  # 3.9 % of the 5,120 faces' area
    assert count >= 1 / share
    assert np.bincount(chart, weights=areas).max() <= share * areas.sum() * (1 + 1e-4)
    positions = vertices[atlas.vertex_map]
    normals = unit_vertex_normals(vertices, faces)[atlas.vertex_map]
    maps = bake_maps(positions, normals, None, atlas.uvs, atlas.faces, size, position_colour)
    rows, cols, points = texel_points(atlas.uvs, atlas.faces, positions, size)
    np.testing.assert_allclose(maps.albedo[rows, cols] / 255.0, position_colour(points), atol=0.5 / 255 + 1e-9)
