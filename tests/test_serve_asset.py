"""`prd serve`'s "asset" format: the textured PBR GLB of `prd generate --asset` (decimated, unwrapped, albedo and
normal maps baked from the field), through the HTTP API and in the page's format choice. Tiny reference
student, FastAPI's TestClient, no network."""

import json
import struct

import pytest
import trimesh

from lightning_modules.serve.app import build_page, create_app
from lightning_modules.serve.model import ServeModel
from lightning_modules.student import TriplaneStudent

TEXTURE, FACES = 64, 200  # the reference student at seed 2, 48^3: 496 faces


@pytest.fixture(scope="module")
def model(ref_weights, tmp_path_factory):
    student = TriplaneStudent.from_pretrained(None, weights=ref_weights)
    return ServeModel(student, tmp_path_factory.mktemp("asset") / "served", turntable_frames=2, turntable_size=32,
                      texture_size=TEXTURE, asset_faces=FACES)


@pytest.fixture(scope="module")
def client(model):
    from fastapi.testclient import TestClient

    return TestClient(create_app(model, page=False))


def glb_json(data: bytes) -> dict:
    """The JSON chunk of a binary glTF (header: magic, version, length; then chunk length, type, data)."""
    magic, _, _ = struct.unpack_from("<4sII", data, 0)
    length, kind = struct.unpack_from("<I4s", data, 12)
    assert magic == b"glTF" and kind == b"JSON"
    return json.loads(data[20 : 20 + length])


def test_api_asset_is_a_pbr_glb_with_albedo_and_normal_maps(client, tmp_path):
    reply = client.post("/generate", json={"prompt": "a red car", "seed": 1, "resolution": 32, "format": "asset"})
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "model/gltf-binary"
    gltf = glb_json(reply.content)
    (material,) = gltf["materials"]
    assert "baseColorTexture" in material["pbrMetallicRoughness"] and "normalTexture" in material
    assert material["pbrMetallicRoughness"]["metallicFactor"] == 0
    assert {"NORMAL", "TANGENT", "TEXCOORD_0"} <= set(gltf["meshes"][0]["primitives"][0]["attributes"])
    (tmp_path / "asset.glb").write_bytes(reply.content)
    mesh = trimesh.load(tmp_path / "asset.glb", process=False, force="mesh")
    assert mesh.visual.material.baseColorTexture.size == (TEXTURE, TEXTURE)
    assert mesh.visual.material.normalTexture.size == (TEXTURE, TEXTURE)


def test_api_asset_json_reply_is_decimated_to_the_face_budget(client):
    request = {"prompt": "a red car", "seed": 2, "resolution": 48}
    glb = client.post("/generate?response=json", json=request).json()
    asset = client.post("/generate?response=json", json={**request, "format": "asset"})
    body = asset.json()
    assert asset.status_code == 200 and body["format"] == "asset" and body["url"].endswith(".glb")
    assert glb["faces"] > FACES >= body["faces"] >= 0.9 * FACES  # the same mesh, decimated to the budget
    assert body["turntable_url"] and client.get(body["turntable_url"]).status_code == 200


def test_api_asset_with_uv_texture_is_refused(client):
    reply = client.post("/generate", json={"prompt": "a chair", "format": "asset", "uv_texture": True})
    assert reply.status_code == 422 and "bakes its own albedo and normal maps" in reply.json()["error"]


def test_page_offers_the_asset_format(model):
    page = build_page(model)
    (radio,) = [block for block in page.blocks.values() if getattr(block, "elem_id", None) == "format"]
    assert [value for _, value in radio.choices] == ["glb", "obj", "ply", "asset"]
    assert "textured PBR" in dict((v, k) for k, v in radio.choices)["asset"]
