"""Game-ready assets end to end: decimate, unwrap, bake and write; the PBR GLB and the OBJ / MTL keep both
maps, the tangents and the material (read back with pygltflib and PIL)."""

import io

import numpy as np
import pygltflib
import pytest
import trimesh
from PIL import Image

from renderers.asset import AssetSettings, AssetSettingsError, make_asset, write_asset
from renderers.bake import FieldSampler
from renderers.export import viewer_to_world
from tests.asset_helpers import SphereField, icosphere


def _png_bytes(gltf, texture_index) -> bytes:
    image = gltf.images[gltf.textures[texture_index].source]
    view = gltf.bufferViews[image.bufferView]
    return gltf.binary_blob()[view.byteOffset or 0 : (view.byteOffset or 0) + view.byteLength]


def _image(gltf, texture_index):
    return np.asarray(Image.open(io.BytesIO(_png_bytes(gltf, texture_index))).convert("RGB"))


def _zlib_level(png: bytes) -> int:
    """FLEVEL of the zlib stream of a PNG's first IDAT chunk: 0 fastest (zlib level 0-1), 2 default (6)."""
    return png[png.index(b"IDAT") + 5] >> 6


def _accessor(gltf, index):
    acc = gltf.accessors[index]
    view = gltf.bufferViews[acc.bufferView]
    width = {"VEC2": 2, "VEC3": 3, "VEC4": 4}[acc.type]
    assert acc.componentType == pygltflib.FLOAT
    start = (view.byteOffset or 0) + (acc.byteOffset or 0)
    return np.frombuffer(gltf.binary_blob(), "<f4", acc.count * width, start).reshape(acc.count, width)


def test_glb_round_trip_keeps_both_maps_tangents_and_the_material(tmp_path):
    vertices, faces = icosphere(4)
    sampler = FieldSampler(SphereField())
    settings = AssetSettings(faces=500, texture_size=64, roughness=0.6)
    asset = make_asset(vertices, faces, sampler, settings)
    assert asset.stats["faces"] <= 500 and asset.stats["full_faces"] == len(faces)
    assert asset.stats["distance_to_full_mesh"]["chamfer_relative"] < 0.005
    path = write_asset(tmp_path / "ball.glb", asset)
    assert set(asset.seconds) == set(asset.cpu_seconds) == {"decimate", "distance", "unwrap", "bake", "write"}

    gltf = pygltflib.GLTF2().load(str(path))
    (primitive,) = gltf.meshes[0].primitives
    material = gltf.materials[primitive.material]
    pbr = material.pbrMetallicRoughness
    assert pbr.metallicFactor == 0 and pbr.roughnessFactor == pytest.approx(0.6)
    np.testing.assert_array_equal(_image(gltf, pbr.baseColorTexture.index), asset.maps.albedo)
    np.testing.assert_array_equal(_image(gltf, material.normalTexture.index), asset.maps.normal)
    # both maps encoded at zlib level 1 (export.PNG_COMPRESS_LEVEL), through trimesh's GLB writer
    assert _zlib_level(_png_bytes(gltf, pbr.baseColorTexture.index)) == 0
    assert _zlib_level(_png_bytes(gltf, material.normalTexture.index)) == 0
    attributes = primitive.attributes
    positions = _accessor(gltf, attributes.POSITION)
    np.testing.assert_allclose(viewer_to_world(positions.astype(np.float64)), asset.vertices, atol=1e-6)
    tangents = _accessor(gltf, attributes.TANGENT)
    normals = _accessor(gltf, attributes.NORMAL)
    assert len(tangents) == len(normals) == len(positions)
    np.testing.assert_allclose(np.linalg.norm(tangents[:, :3], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.einsum("ij,ij->i", tangents[:, :3], normals), 0.0, atol=1e-5)
    assert set(np.unique(tangents[:, 3])) <= {-1.0, 1.0}
    uv = _accessor(gltf, attributes.TEXCOORD_0)
    np.testing.assert_allclose(uv[:, 0], asset.uvs[:, 0], atol=1e-6)
    np.testing.assert_allclose(uv[:, 1], 1.0 - asset.uvs[:, 1], atol=1e-6)  # glTF: v down


def test_obj_gets_the_same_maps(tmp_path):
    vertices, faces = icosphere(3)
    sampler = FieldSampler(SphereField())
    asset = make_asset(vertices, faces, sampler, AssetSettings(faces=300, texture_size=32))
    path = write_asset(tmp_path / "ball.obj", asset)
    mtl = path.with_suffix(".mtl").read_text().splitlines()
    assert "map_Kd ball.png" in mtl and "norm ball_normal.png" in mtl and "Pm 0" in mtl and "Pr 1" in mtl
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "ball.png").convert("RGB")), asset.maps.albedo)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "ball_normal.png").convert("RGB")),
                                  asset.maps.normal)
    assert _zlib_level((tmp_path / "ball.png").read_bytes()) == _zlib_level((tmp_path / "ball_normal.png").read_bytes()) == 0
    loaded = trimesh.load(path, process=False)
    assert len(loaded.faces) == len(asset.faces)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(faces=0), "faces must be an integer of at least 4, got 0"),
     (dict(texture_size=0), "texture size must be an integer from 16 to 8192, got 0"),
     (dict(roughness=1.5), "roughness must be between 0 and 1, got 1.5")],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(AssetSettingsError, match=message):
        AssetSettings(**kwargs)


def test_the_same_input_gives_the_same_asset():
    vertices, faces = icosphere(3)
    sampler = FieldSampler(SphereField())
    settings = AssetSettings(faces=200, texture_size=32)
    a = make_asset(vertices, faces, sampler, settings)
    b = make_asset(vertices, faces, sampler, settings)
    np.testing.assert_array_equal(a.faces, b.faces)
    np.testing.assert_array_equal(a.maps.albedo, b.maps.albedo)
    np.testing.assert_array_equal(a.maps.normal, b.maps.normal)
