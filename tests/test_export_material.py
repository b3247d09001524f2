"""Exported meshes look right in any viewer: a matte PBR material (metallic 0, rough) and unit, outward
vertex normals in GLB, OBJ / MTL and PLY; the files are read back with pygltflib / as text."""

import numpy as np
import pygltflib
import pytest
import trimesh

from renderers.export import export_mesh, world_to_viewer

COMPONENT_TYPES = {5121: np.uint8, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}
WIDTHS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}


def _sphere():
    """A unit-diameter icosphere (162 vertices, world coordinates) with seeded random vertex colours."""
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    colours = np.random.default_rng(0).random((len(sphere.vertices), 3))
    return np.asarray(sphere.vertices), np.asarray(sphere.faces), colours


def _accessor(gltf: pygltflib.GLTF2, index: int) -> np.ndarray:
    """[count, width] data of a GLB accessor (tightly packed, as trimesh writes them)."""
    acc = gltf.accessors[index]
    view = gltf.bufferViews[acc.bufferView]
    dtype, width = np.dtype(COMPONENT_TYPES[acc.componentType]), WIDTHS[acc.type]
    assert view.byteStride in (None, dtype.itemsize * width)
    start = (view.byteOffset or 0) + (acc.byteOffset or 0)
    return np.frombuffer(gltf.binary_blob(), dtype, acc.count * width, start).reshape(acc.count, width)


def _primitives(path):
    gltf = pygltflib.GLTF2().load(str(path))
    primitives = [p for mesh in gltf.meshes for p in mesh.primitives]
    assert primitives
    return gltf, primitives


def _assert_matte(gltf, primitive):
    assert primitive.material is not None
    pbr = gltf.materials[primitive.material].pbrMetallicRoughness
    assert pbr is not None and pbr.metallicFactor == 0
    assert pbr.roughnessFactor is not None and pbr.roughnessFactor >= 0.9
    return pbr


def _assert_outward_unit_normals(normals, positions):
    assert normals.shape == positions.shape
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-4)
    outward = np.einsum("ij,ij->i", normals, positions - positions.mean(axis=0)) > 0
    assert outward.mean() > 0.99
    # a sphere: the vertex normal is close to the radial direction
    radial = positions / np.linalg.norm(positions, axis=1, keepdims=True)
    assert np.einsum("ij,ij->i", normals, radial).min() > 0.95


def test_glb_vertex_colours_get_matte_material_and_normals(tmp_path):
    v, f, c = _sphere()
    gltf, primitives = _primitives(export_mesh(tmp_path / "ball.glb", v, f, c))
    for primitive in primitives:
        _assert_matte(gltf, primitive)
        attributes = primitive.attributes
        assert attributes.NORMAL is not None and attributes.COLOR_0 is not None
        positions = _accessor(gltf, attributes.POSITION).astype(np.float64)
        normals = _accessor(gltf, attributes.NORMAL).astype(np.float64)
        assert gltf.accessors[attributes.NORMAL].count == gltf.accessors[attributes.POSITION].count
        _assert_outward_unit_normals(normals, positions)
        np.testing.assert_allclose(positions, world_to_viewer(v), atol=1e-6)
        # COLOR_0 is linear RGB in glTF: decoded to sRGB it gives back the input colours
        stored = _accessor(gltf, attributes.COLOR_0)[:, :3]
        linear = stored / (1.0 if stored.dtype == np.float32 else np.iinfo(stored.dtype).max)  # normalized ints
        srgb = np.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear ** (1 / 2.4) - 0.055)
        np.testing.assert_allclose(srgb, c, atol=1 / 255)


def test_glb_uv_texture_gets_matte_material_and_seamless_normals(tmp_path):
    v, f, c = _sphere()
    gltf, primitives = _primitives(export_mesh(tmp_path / "ball.glb", v, f, c, uv_texture=True, texture_size=64))
    for primitive in primitives:
        pbr = _assert_matte(gltf, primitive)
        assert pbr.baseColorTexture is not None
        attributes = primitive.attributes
        assert attributes.TEXCOORD_0 is not None and attributes.NORMAL is not None
        positions = _accessor(gltf, attributes.POSITION).astype(np.float64)
        normals = _accessor(gltf, attributes.NORMAL).astype(np.float64)
        assert len(positions) > len(v)  # the unwrap splits seam vertices...
        _assert_outward_unit_normals(normals, positions)
        # ... and their copies keep one normal (no shading seam along the UV charts)
        _, group = np.unique(np.round(positions, 5), axis=0, return_inverse=True)
        group = group.ravel()
        one_per_position = np.zeros((group.max() + 1, 3))
        one_per_position[group] = normals
        np.testing.assert_allclose(normals, one_per_position[group], atol=1e-6)


def test_glb_unlit_option(tmp_path):
    v, f, c = _sphere()
    for uv_texture in (False, True):
        path = export_mesh(tmp_path / f"unlit{uv_texture}.glb", v, f, c, material="unlit", uv_texture=uv_texture,
                           texture_size=32)
        gltf, primitives = _primitives(path)
        assert "KHR_materials_unlit" in gltf.extensionsUsed
        for primitive in primitives:
            _assert_matte(gltf, primitive)  # the fallback for viewers without the extension
            assert "KHR_materials_unlit" in gltf.materials[primitive.material].extensions
            assert primitive.attributes.NORMAL is not None
    with pytest.raises(ValueError, match="unknown material 'shiny'"):
        export_mesh(tmp_path / "x.glb", v, f, c, material="shiny")


def _obj_lines(path, faces):
    """The OBJ's lines, after checking its vertex normals (unit, outward, one per corner of every face)."""
    lines = path.read_text().splitlines()
    positions = np.array([line.split()[1:4] for line in lines if line.startswith("v ")], np.float64)
    normals = np.array([line.split()[1:] for line in lines if line.startswith("vn ")], np.float64)
    _assert_outward_unit_normals(normals, positions)
    corners = [corner.split("/") for line in lines if line.startswith("f ") for corner in line.split()[1:]]
    assert len(corners) == 3 * len(faces) and all(len(x) == 3 and x[2] for x in corners)  # v/vt/vn or v//vn
    return lines


def test_obj_vertex_colours_get_normals_and_no_material(tmp_path):
    """No MTL: with one, three.js's OBJLoader (given the MTL) and trimesh ignore the vertex colours."""
    v, f, c = _sphere()
    path = export_mesh(tmp_path / "ball.obj", v, f, c)
    lines = _obj_lines(path, f)
    rgb = np.array([line.split()[4:7] for line in lines if line.startswith("v ")], np.float64)
    np.testing.assert_allclose(rgb, c, atol=1 / 255)
    assert not any(line.startswith(("mtllib", "usemtl")) for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ball.obj"]
    with pytest.raises(ValueError, match="needs GLB"):
        export_mesh(tmp_path / "unlit.obj", v, f, c, material="unlit")


@pytest.mark.parametrize("material", ["pbr", "unlit"])
def test_textured_obj_gets_its_own_matte_mtl_and_normals(tmp_path, material):
    v, f, c = _sphere()
    path = export_mesh(tmp_path / "ball.obj", v, f, c, uv_texture=True, texture_size=32, material=material)
    lines = _obj_lines(path, f)
    assert "mtllib ball.mtl" in lines and "usemtl material" in lines  # one MTL per mesh, not material.mtl
    mtl = {line.split()[0]: line.split()[1:] for line in (tmp_path / "ball.mtl").read_text().splitlines()}
    assert mtl["newmtl"] == ["material"] and mtl["map_Kd"] == ["ball.png"] and (tmp_path / "ball.png").is_file()
    assert [float(x) for x in mtl["Kd"]] == [1, 1, 1] and [float(x) for x in mtl["Ks"]] == [0, 0, 0]
    assert [float(x) for x in mtl["Ka"]] == [0, 0, 0]  # Blender's legacy importer reads Ka as metallic
    assert float(mtl["Pm"][0]) == 0 and float(mtl["Pr"][0]) >= 0.9
    assert mtl["illum"] == (["0"] if material == "unlit" else ["1"])


def test_ply_has_unit_outward_vertex_normals(tmp_path):
    v, f, c = _sphere()
    path = export_mesh(tmp_path / "ball.ply", v, f, c)
    header = path.read_bytes().split(b"end_header")[0].decode()
    assert all(f"property float {n}" in header for n in ("nx", "ny", "nz"))
    with pytest.raises(ValueError, match="needs GLB"):
        export_mesh(tmp_path / "unlit.ply", v, f, c, material="unlit")
    with open(path, "rb") as file:
        loaded = trimesh.exchange.ply.load_ply(file)
    _assert_outward_unit_normals(np.asarray(loaded["vertex_normals"], np.float64), np.asarray(loaded["vertices"]))
