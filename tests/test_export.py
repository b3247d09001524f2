from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import trimesh

from lightning_modules.evaluation.meshes import load_mesh
from renderers.export import export_mesh, viewer_to_world, world_to_viewer
from renderers.uv_bake import rasterize_uv


def _marked_mesh():
    """A box whose +z (top) vertices are red and +x (front) vertices are green, in world coords."""
    box = trimesh.creation.box(extents=(1.0, 0.6, 0.4))
    box = box.subdivide()
    v = np.asarray(box.vertices)
    colors = np.full((len(v), 3), 0.5)
    colors[v[:, 2] > 0.19] = (1.0, 0.0, 0.0)
    colors[v[:, 0] > 0.49] = (0.0, 1.0, 0.0)
    return v, np.asarray(box.faces), colors


@pytest.mark.parametrize("fmt", ["glb", "obj", "ply"])
def test_roundtrip_vertices_colors_and_orientation(tmp_path, fmt):
    v, f, c = _marked_mesh()
    path = export_mesh(tmp_path / "m", v, f, c, file_format=fmt)
    assert path.suffix == f".{fmt}" and path.exists()
    # the project's reader (GLB: linear COLOR_0 back to sRGB); mesh_frame="world" keeps the file's axes
    loaded = load_mesh(path, mesh_frame="world")
    assert len(loaded.vertices) == len(v) and len(loaded.faces) == len(f)
    rgb = np.rint(loaded.colors * 255).astype(np.uint8)
    np.testing.assert_array_equal(rgb, np.rint(c * 255).astype(np.uint8))
    lv = loaded.vertices.astype(np.float64)
    # Viewer convention: +y up (the red top), front faces +z (the green side).
    red = (rgb[:, 0] == 255) & (rgb[:, 1] == 0)
    green = rgb[:, 1] == 255
    assert lv[red, 1].min() > 0.19 and lv[green, 2].min() > 0.49
    # the long world x axis (extent 1.0) is the viewer depth axis z
    np.testing.assert_allclose(np.ptp(lv, axis=0), [0.6, 0.4, 1.0], atol=1e-6)
    np.testing.assert_allclose(viewer_to_world(lv), v, atol=1e-6)
    # winding is preserved: outward normals, positive volume
    mesh = trimesh.Trimesh(lv, loaded.faces, process=False)
    assert mesh.is_watertight and mesh.volume > 0


def test_rotation_is_proper():
    m = world_to_viewer(np.eye(3))
    assert np.isclose(np.linalg.det(m), 1.0)


def test_bad_format_and_shapes(tmp_path):
    v, f, c = _marked_mesh()
    with pytest.raises(ValueError, match="unknown mesh format 'stl'"):
        export_mesh(tmp_path / "m.stl", v, f, c)
    with pytest.raises(ValueError, match="one colour per vertex"):
        export_mesh(tmp_path / "m.glb", v, f, c[:-1])
    with pytest.raises(ValueError, match="PLY stores vertex colours only"):
        export_mesh(tmp_path / "m.ply", v, f, c, uv_texture=True)


def test_rasterize_uv_covers_triangles_exactly():
    uvs = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    faces = np.array([[0, 1, 2], [1, 3, 2]])
    ids, bary = rasterize_uv(uvs, faces, 16)
    assert (ids >= 0).all()  # the two triangles tile the square
    np.testing.assert_allclose(bary.sum(-1), 1.0)
    ys, xs = np.mgrid[0:16, 0:16]
    assert ((ids == 0) == (xs + ys < 15)).sum() >= 16 * 16 - 16  # diagonal texels may go either way
    # barycentric interpolation of the uv corners reproduces the texel centres
    uv_rec = (uvs[faces[ids]] * bary[..., None]).sum(-2)
    np.testing.assert_allclose(uv_rec, np.stack([(xs + 0.5) / 16, (ys + 0.5) / 16], -1), atol=1e-9)
    # two face groups on two threads: the same maps, a texel on the shared diagonal to the later face as before
    with ThreadPoolExecutor(2) as pool:
        ids_2, bary_2 = rasterize_uv(uvs, faces, 16, pool, groups=2)
    np.testing.assert_array_equal(ids_2, ids)
    np.testing.assert_array_equal(bary_2, bary)
    assert (ids[xs + ys == 15] == 1).all()


def test_uv_texture_export_bakes_color_fn(tmp_path):
    v, f, c = _marked_mesh()
    path = export_mesh(tmp_path / "t.glb", v, f, c, uv_texture=True, texture_size=128,
                       color_fn=lambda p: np.where(p[:, :1] > 0, [[0.0, 0.0, 1.0]], [[1.0, 1.0, 0.0]]))
    loaded = trimesh.load(path, process=False, force="mesh")
    assert isinstance(loaded.visual, trimesh.visual.TextureVisuals)
    image = np.asarray(loaded.visual.material.baseColorTexture.convert("RGB"))[::-1]  # row 0 = v 0
    uv = loaded.visual.uv[loaded.faces].mean(axis=1)  # triangle centroids: inside their chart
    texel = image[np.clip((uv[:, 1] * 128).astype(int), 0, 127), np.clip((uv[:, 0] * 128).astype(int), 0, 127)]
    centroid = viewer_to_world(np.asarray(loaded.vertices)[loaded.faces].mean(axis=1))
    front, back = centroid[:, 0] > 0.05, centroid[:, 0] < -0.05
    assert front.any() and back.any()
    np.testing.assert_array_equal(texel[front], np.tile([0, 0, 255], (front.sum(), 1)))
    np.testing.assert_array_equal(texel[back], np.tile([255, 255, 0], (back.sum(), 1)))
