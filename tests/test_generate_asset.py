"""`prd generate --asset` / `generate_meshes(asset=...)` and `--faces` on the tiny reference model: the files
hold a decimated mesh with baked maps from the student's own field. (Bad options: tests/test_cli_errors.py.)"""

import io
import json

import numpy as np
import pygltflib
import pytest
import torch
from PIL import Image

from lightning_modules.cli import main
from lightning_modules.evaluation.meshes import load_mesh
from lightning_modules.student import TriplaneStudent
from lightning_modules.student.generation import generate_meshes
from renderers.asset import AssetSettings
from renderers.errors import UserError

PROMPT = "a red car"


@pytest.fixture(scope="module")
def student(ref_weights):
    return TriplaneStudent.from_pretrained(None, weights=ref_weights)


def _run(argv, capsys):
    code = main(["generate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _texture(gltf, index):
    image = gltf.images[gltf.textures[index].source]
    view = gltf.bufferViews[image.bufferView]
    start = view.byteOffset or 0
    return np.asarray(Image.open(io.BytesIO(gltf.binary_blob()[start : start + view.byteLength])).convert("RGB"))


def test_cli_asset_writes_a_decimated_pbr_glb_with_both_maps(tmp_path, capsys, ref_weights):
    out = tmp_path / "assets"
    code, _, _ = _run([PROMPT, "--weights", str(ref_weights), "--out", str(out), "--resolution", "96", "--asset",
                       "--faces", "300", "--texture-size", "64", "--roughness", "0.5", "--no-progress"], capsys)
    assert code == 0
    (record,) = json.loads((out / "manifest.json").read_text())["meshes"]
    assert record["faces"] <= 300 < record["asset"]["full_faces"]
    distance = record["asset"]["distance_to_full_mesh"]
    assert 0 < distance["chamfer_relative"] < 0.02 and distance["hausdorff"] >= distance["chamfer"]
    assert set(record["asset"]["seconds"]) == {"decimate", "distance", "unwrap", "bake", "write"}
    gltf = pygltflib.GLTF2().load(str(out / record["file"]))
    (primitive,) = gltf.meshes[0].primitives
    material = gltf.materials[primitive.material]
    assert material.pbrMetallicRoughness.metallicFactor == 0
    assert material.pbrMetallicRoughness.roughnessFactor == pytest.approx(0.5)
    albedo = _texture(gltf, material.pbrMetallicRoughness.baseColorTexture.index)
    normal = _texture(gltf, material.normalTexture.index)
    assert albedo.shape == normal.shape == (64, 64, 3)
    assert primitive.attributes.TANGENT is not None
    assert gltf.accessors[primitive.indices].count == 3 * record["faces"]


def test_api_asset_bakes_the_students_colour_field(tmp_path, student):
    (record,) = generate_meshes(student, [PROMPT], tmp_path, resolution=96, progress=False,
                                asset=AssetSettings(faces=400, texture_size=128))
    mesh = load_mesh(tmp_path / record["file"])  # world frame; colours sampled from the texture at the vertices
    points = torch.as_tensor(mesh.vertices, dtype=torch.float32)[None]
    emb = student.encode_prompt([PROMPT])
    field = student.sample(emb, noise=student.make_noise(1, seed=0))
    # the texture was baked at the field's surface near each texel: compare on the light mesh's vertices
    sdf, gradient = field.sdf_and_gradient(points)  # the bake's Newton step onto the field's surface
    on_surface = points - (sdf / (gradient**2).sum(-1))[..., None] * gradient
    expected = field.color(on_surface)[0].clamp(0, 1).detach().numpy()
    error = np.abs(mesh.colors.astype(np.float64) - expected)
    # vertices sit on chart borders, where texels blend neighbours: a loose bound on the mean, none per vertex
    assert error.mean() < 0.03, error.mean()


def test_faces_alone_decimates_the_vertex_colour_export(tmp_path, student):
    (record,) = generate_meshes(student, [PROMPT], tmp_path, resolution=96, faces=200, progress=False)
    assert record["faces"] <= 200 < record["full_faces"]
    assert record["distance_to_full_mesh"]["chamfer_relative"] < 0.02
    mesh = load_mesh(tmp_path / record["file"])
    assert len(mesh.faces) == record["faces"]
    field = student.sample(student.encode_prompt([PROMPT]), noise=student.make_noise(1, seed=0))
    expected = field.color(torch.as_tensor(mesh.vertices, dtype=torch.float32)[None])[0].clamp(0, 1)
    assert np.abs(mesh.colors - expected.detach().numpy()).max() <= 0.5 / 255 + 1e-6


def test_api_refuses_faces_beside_an_asset_and_an_asset_in_ply(tmp_path, student):
    with pytest.raises(UserError, match="AssetSettings"):
        generate_meshes(student, [PROMPT], tmp_path / "a", faces=100, asset=True, progress=False)
    with pytest.raises(UserError, match="an asset needs glb or obj, not ply"):
        generate_meshes(student, [PROMPT], tmp_path / "b", file_format="ply", asset=True, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
