"""`prd serve`: the request checks, the generation behind the page, the HTTP API (FastAPI's TestClient, no
network) and path traversal, on the tiny reference student (tests/fixtures/reference/triplaneturbo_ref_A)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh

from lightning_modules.cli import main
from lightning_modules.evaluation.meshes import load_mesh
from lightning_modules.serve import model as serve_model
from lightning_modules.serve.app import create_app, page_handler, page_outputs
from lightning_modules.serve.model import PathOutsideError, ServeModel, path_inside
from lightning_modules.serve.requests import RequestError, check_request
from lightning_modules.student import TriplaneStudent
from lightning_modules.student.generation import generate_meshes
from renderers.errors import UserError

RESOLUTION = 24  # the tiny student's meshes at a 24^3 grid: ~0.1 s each


@pytest.fixture(scope="module")
def student(fixtures_dir):
    return TriplaneStudent.from_pretrained(None, weights=fixtures_dir / "triplaneturbo_ref_A" / "triplane_turbo.pth")


@pytest.fixture
def model(student, tmp_path):
    return ServeModel(student, tmp_path / "served", turntable_frames=2, turntable_size=32)


@pytest.fixture(scope="module")
def client(student, tmp_path_factory):
    from fastapi.testclient import TestClient

    served = ServeModel(student, tmp_path_factory.mktemp("api") / "served", turntable_frames=2, turntable_size=32)
    return TestClient(create_app(served))


def _files_under(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------------ the page


@pytest.mark.parametrize("fmt", ["glb", "obj", "ply"])
def test_page_shows_the_mesh_generate_meshes_makes(model, student, tmp_path, fmt):
    glb, turntable, download, timings = page_outputs(model, "a red car", 3, RESOLUTION, fmt)
    reference = generate_meshes(student, ["a red car"], tmp_path / "ref", seed=3, resolution=RESOLUTION, progress=False)[0]
    expected = trimesh.load(tmp_path / "ref" / reference["file"], process=False, force="mesh")
    colors = load_mesh(tmp_path / "ref" / reference["file"]).colors  # [N, 3] in [0, 1]
    for path in (glb, download):  # the 3D view's GLB and the file in the chosen format hold the same mesh
        mesh = trimesh.load(path, process=False, force="mesh")
        np.testing.assert_allclose(mesh.vertices, expected.vertices, atol=1e-5)
        np.testing.assert_array_equal(mesh.faces, expected.faces)
        np.testing.assert_allclose(load_mesh(path).colors, colors, atol=0.5 / 255 + 1e-6)  # one uint8 rounding
    assert download.endswith(f".{fmt}") and glb.endswith(".glb") and turntable.endswith("_turntable.png")
    for stage in ("text encoding", "denoising", "triplane decoding", "mesh extraction", "export", "turntable", "total"):
        assert f"| {stage} |" in timings
    root = model.out_dir.resolve()
    assert all(Path(p).resolve().is_relative_to(root) for p in (glb, turntable, download))


def test_page_shows_a_failed_request_as_one_line_and_keeps_serving(model, monkeypatch):
    import gradio as gr

    handler = page_handler(model)
    with pytest.raises(gr.Error, match="the prompt is empty"):
        handler("   \n\t ", 0, RESOLUTION, "glb")
    with pytest.raises(gr.Error, match=r"resolution must be in \[16, 256\], got 4"):
        handler("a chair", 0, 4, "glb")

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore lines")

    with monkeypatch.context() as patch:
        patch.setattr(serve_model, "sample_fields", out_of_memory)
        with pytest.raises(gr.Error, match=r"generation failed \(RuntimeError\): the server keeps serving") as err:
            handler("a chair", 0, RESOLUTION, "glb")
        assert "\n" not in err.value.message
    glb, *_ = handler("a chair", 0, RESOLUTION, "glb")  # the next request is served
    assert trimesh.load(glb, force="mesh").vertices.shape[0] > 0
    assert [p.name for p in model.out_dir.iterdir()] == [Path(glb).parent.name]  # the failed one left nothing


def test_page_builds_with_its_queue(model):
    from lightning_modules.serve.app import build_page

    page = build_page(model, concurrency=2, max_queue=5)
    assert page._queue.max_size == 5
    assert [fn.concurrency_limit for fn in page.fns.values() if fn.api_name == "generate"] == [2]


# --------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "prompt, seed, resolution, fmt, message",
    [
        ("", 0, 64, "glb", "the prompt is empty"),
        (" \t\n ", 0, 64, "glb", "the prompt is empty"),
        ("\x00\x07\x1b", 0, 64, "glb", "the prompt is empty"),
        (b"a \xff\xfe chair", 0, 64, "glb", "not valid UTF-8"),
        ("a \udcff chair", 0, 64, "glb", "not valid UTF-8"),
        (None, 0, 64, "glb", "must be text"),
        ("x" * 20_001, 0, 64, "glb", "the limit is 20000"),
        ("a chair", 0, 15, "glb", r"resolution must be in \[16, 256\], got 15"),
        ("a chair", 0, 257, "glb", r"resolution must be in \[16, 256\], got 257"),
        ("a chair", 0, "high", "glb", "resolution must be an integer"),
        ("a chair", 0, 32.5, "glb", "resolution must be an integer"),
        ("a chair", 0, True, "glb", "resolution must be an integer"),
        ("a chair", -1, 64, "glb", "seed must be in"),
        ("a chair", 0, 64, "stl", "unknown format 'stl': use one of glb, obj, ply, asset"),
        ("a chair", 0, 64, "../../x", "unknown format"),
        ("a chair", 0, 64, None, "unknown format"),
    ],
)
def test_bad_request_is_one_line_error(student, prompt, seed, resolution, fmt, message):
    with pytest.raises(RequestError, match=message) as err:
        check_request(prompt, seed, resolution, fmt, student.tokenizer)
    assert "\n" not in str(err.value) and isinstance(err.value, UserError)


@pytest.mark.parametrize("fmt, uv, message", [("ply", True, "a UV texture needs format glb or obj"),
                                               ("glb", "yes", "uv_texture must be true or false"),
                                               ("obj", 1, "uv_texture must be true or false")])
def test_bad_uv_texture_request_is_one_line_error(fmt, uv, message):
    with pytest.raises(RequestError, match=message):
        check_request("a chair", 0, 64, fmt, uv_texture=uv)


def test_uv_texture_glb_is_textured_and_obj_comes_zipped(model):
    import zipfile

    glb = model.generate_from("a red car", 0, RESOLUTION, "glb", uv_texture=True)
    textured = trimesh.load(glb.mesh_file, process=False, force="mesh")
    assert textured.visual.kind == "texture" and textured.visual.material.baseColorTexture.size == (512, 512)
    obj = model.generate_from("a red car", 0, RESOLUTION, "obj", uv_texture=True)
    assert obj.mesh_file.suffix == ".zip"
    with zipfile.ZipFile(obj.mesh_file) as archive:
        assert sorted(archive.namelist()) == sorted(f"{obj.glb_file.stem}.{s}" for s in ("obj", "mtl", "png"))


def test_usable_requests_are_cleaned_with_notices(student):
    request, notices = check_request("  a\x00red\tcar\x7f ", "7", 32.0, " .OBJ", student.tokenizer)
    assert (request.prompt, request.seed, request.resolution, request.file_format) == ("a red car", 7, 32, "obj")
    assert len(notices) == 1 and "2 control character(s)" in notices[0]
    assert check_request("a red car", tokenizer=student.tokenizer)[1] == []


def test_a_10000_character_prompt_is_cut_to_77_tokens_with_a_notice(student):
    long_prompt = ("a very detailed wooden chair " * 400)[:10_000]
    request, notices = check_request(long_prompt, tokenizer=student.tokenizer)
    tokens = student.tokenizer(request.prompt).input_ids  # with start / end tokens
    assert 70 <= len(tokens) <= 77 and long_prompt.startswith(request.prompt[:20])
    assert len(notices) == 1 and "the text encoder reads 77" in notices[0]


# ----------------------------------------------------------------------------------- path traversal


@pytest.mark.parametrize("names", [("..",), ("..", "..", "x"), ("../../x",), ("/etc/passwd",), ("a/b",), ("x\x00",),
                                   ("",), (".",), ("a" * 32, "..", "x.glb"), ("a" * 32, "x.glb/.."), ("~",)])
def test_paths_outside_the_output_folder_are_refused(tmp_path, names):
    with pytest.raises(PathOutsideError):
        path_inside(tmp_path, *names)


def test_traversal_prompts_write_inside_the_output_folder(model, tmp_path):
    before = _files_under(tmp_path)
    for prompt in ("../../x", "/etc/passwd", "..\\..\\evil", "a/../../b\x00.glb", "~/.bashrc"):
        result = model.generate_from(prompt, 0, 16, "ply")
        for path in (result.mesh_file, result.glb_file, result.turntable_file):
            assert path.resolve().is_relative_to(model.out_dir.resolve()) and path.is_file()
    assert [p for p in _files_under(tmp_path) if p.parts[0] != "served"] == [p for p in before if p.parts[0] != "served"]
    assert all("." not in p.stem for p in model.out_dir.rglob("*.*"))


# ------------------------------------------------------------------------------------------ HTTP API


def test_api_returns_a_glb_with_vertex_colours_and_timings(client, tmp_path):
    reply = client.post("/generate", json={"prompt": "a red car", "seed": 1, "resolution": RESOLUTION})
    assert reply.status_code == 200 and reply.headers["content-type"] == "model/gltf-binary"
    (tmp_path / "reply.glb").write_bytes(reply.content)
    mesh = load_mesh(tmp_path / "reply.glb")
    assert len(mesh.vertices) > 0 and mesh.colors.shape == mesh.vertices.shape and mesh.colors.std(0).max() > 0
    timings = json.loads(reply.headers["x-prd-timings"])
    assert timings["total"] == pytest.approx(sum(v for k, v in timings.items() if k != "total"))
    assert json.loads(reply.headers["x-prd-notices"]) == []


def test_api_json_reply_links_files_that_download(client):
    reply = client.post("/generate?response=json", json={"prompt": "a\x01 chair", "format": "obj", "resolution": 16})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["format"] == "obj" and body["url"].endswith(".obj") and "control character" in body["notices"][0]
    for key in ("url", "glb_url", "turntable_url"):
        assert client.get(body[key]).status_code == 200
    obj = client.get(body["url"]).content.decode()
    assert obj.count("\nf ") == body["faces"]


@pytest.mark.parametrize(
    "content, status, message",
    [
        (b'{"prompt": "a \xff chair"}', 400, "not valid UTF-8"),
        (b"{prompt: chair}", 422, "not JSON"),
        (b'["a chair"]', 422, "must be a JSON object"),
        (b'{"seed": 1}', 422, 'no "prompt"'),
        (b'{"prompt": "a chair", "steps": 9}', 422, "unknown field(s) 'steps'"),
        (b'{"prompt": "   "}', 422, "the prompt is empty"),
        (b'{"prompt": "a chair", "resolution": 100000}', 422, "resolution must be in"),
        (b'{"prompt": "a chair", "format": "fbx"}', 422, "unknown format 'fbx'"),
        (b'{"prompt": "a chair", "seed": "x"}', 422, "seed must be an integer"),
        (b'{"prompt": "a chair", "format": "ply", "uv_texture": true}', 422, "a UV texture needs format glb or obj"),
    ],
)
def test_api_bad_input_is_4xx_with_one_line(client, content, status, message):
    reply = client.post("/generate", content=content, headers={"content-type": "application/json"})
    error = reply.json()["error"]
    assert reply.status_code in (400, 422) and message in error and "\n" not in error


def test_api_file_route_refuses_traversal(client, tmp_path):
    for url in ("/files/..%2F..%2Fetc/passwd", "/files/%2e%2e/%2e%2e", "/files/" + "a" * 32 + "/..%2F..%2Fx",
                "/files/" + "0" * 32 + "/missing.glb", "/files/x/%00.glb"):
        reply = client.get(url)  # refused by path_inside ({"error": ...}) or matching no route at all
        assert reply.status_code == 404 and "root:" not in reply.text, url


def test_api_keeps_serving_after_a_failure(client, monkeypatch):
    def no_surface(*args, **kwargs):
        raise UserError("the field has no surface: try another seed")

    with monkeypatch.context() as patch:
        patch.setattr(serve_model, "export_object", no_surface)
        reply = client.post("/generate", json={"prompt": "a chair"})
        assert reply.status_code == 422 and reply.json()["error"] == "the field has no surface: try another seed"
        patch.setattr(serve_model, "sample_fields", lambda *a, **k: 1 / 0)
        reply = client.post("/generate", json={"prompt": "a chair"})
        assert reply.status_code == 500 and "ZeroDivisionError" in reply.json()["error"]
    assert client.post("/generate", json={"prompt": "a chair", "resolution": 16}).status_code == 200


def test_page_is_mounted_beside_the_api(client):
    reply = client.get("/")
    assert reply.status_code == 200 and "gradio" in reply.text.lower()


# ------------------------------------------------------------------------------------- command line


def _one_line(code, err):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("prd: error: "), err
    return lines[0]


def test_serve_without_weights_or_demo_and_no_train_says_run_make_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["serve", "--no-train"])
    assert "run `make demo` first" in _one_line(code, capsys.readouterr().err)


def test_serve_without_weights_or_demo_trains_the_demo_student_with_a_notice(tmp_path, monkeypatch, capsys):
    from lightning_modules.serve import command

    monkeypatch.chdir(tmp_path)
    commands = []

    def fake_demo(argv, check):  # what `python -m lightning_modules.demo` leaves behind
        commands.append(argv)
        (tmp_path / command.DEMO_STUDENT).mkdir(parents=True)
        (tmp_path / command.DEMO_BASE).mkdir(parents=True)
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(command.subprocess, "run", fake_demo)
    assert command.resolve_weights(None, None, train=True) == (str(command.DEMO_BASE), str(command.DEMO_STUDENT))
    assert commands == [[sys.executable, "-m", "lightning_modules.demo"]]
    out = capsys.readouterr().out
    assert "training it now as `make demo` does (about 3-4 minutes" in out and "the demo's student is trained" in out
    assert command.resolve_weights(None, None, train=True) == (str(command.DEMO_BASE), str(command.DEMO_STUDENT))
    assert len(commands) == 1  # trained once, then served


def test_a_failed_demo_training_is_one_line(tmp_path, monkeypatch):
    from lightning_modules.serve import command

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(command.subprocess, "run", lambda argv, check: subprocess.CompletedProcess(argv, 1))
    with pytest.raises(command.NoWeightsError, match=r"training the CPU demo's student failed \(exit code 1"):
        command.resolve_weights(None, None, train=True)


@pytest.mark.parametrize("argv, message", [(["--port", "0"], "--port"), (["--concurrency", "0"], "--concurrency"),
                                           (["--device", "gpu0"], "gpu0"), (["--bogus"], "unrecognized"),
                                           (["--max-batch", "0"], "--max-batch"), (["--batch-wait", "-1"], "--batch-wait"),
                                           (["--asset-faces", "2"], "--asset-faces"), (["--keep-requests", "0"], "--keep-requests"),
                                           (["--keep-hours", "0"], "--keep-hours"), (["--dtype", "float64"], "--dtype"),
                                           (["--compile-mode", "default"], "add --compile")])
def test_serve_argument_errors_are_one_line(tmp_path, capsys, argv, message):
    code = main(["serve", "--weights", str(tmp_path), "--out", str(tmp_path / "o"), *argv])
    assert message in _one_line(code, capsys.readouterr().err)


def test_serve_defaults_to_the_demo_student_when_make_demo_wrote_it(tmp_path, monkeypatch):
    from lightning_modules.serve.command import DEMO_BASE, DEMO_STUDENT, resolve_weights

    monkeypatch.chdir(tmp_path)
    (tmp_path / DEMO_STUDENT).mkdir(parents=True)
    (tmp_path / DEMO_BASE).mkdir(parents=True)
    assert resolve_weights(None, None) == (str(DEMO_BASE), str(DEMO_STUDENT))
    assert resolve_weights("my_base", "my.pth") == ("my_base", "my.pth")  # given weights win


def test_serve_with_missing_weights_is_one_line(tmp_path, capsys):
    code = main(["serve", "--weights", str(tmp_path / "absent.pth"), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert "absent.pth" in _one_line(code, capsys.readouterr().err)


def test_the_fallback_sphere_comes_with_a_notice(model, monkeypatch):
    real = serve_model.export_object
    monkeypatch.setattr(serve_model, "export_object", lambda *a, **k: dict(real(*a, **k), empty_surface_fallback=True))
    result = model.generate_from("a chair", 0, 16, "glb")
    assert len(result.notices) == 1 and "fallback unit sphere; try another seed" in result.notices[0]


def test_old_request_folders_are_pruned_to_the_newest_and_the_young(model, tmp_path):
    import os
    import time

    model.keep_requests, model.keep_seconds = 3, None
    ids = [model.generate_from(f"a chair {i}", i, 16, "glb").request_id for i in range(5)]
    (model.out_dir / "notes.txt").write_text("not a request: never pruned")
    assert sorted(p.name for p in model.out_dir.iterdir()) == sorted([*ids[2:], "notes.txt"])
    model.keep_requests, model.keep_seconds = 100, 3600.0
    old = time.time() - 7200
    os.utime(model.out_dir / ids[2], (old, old))  # two hours old
    assert model.prune() == [ids[2]]
    assert sorted(p.name for p in model.out_dir.iterdir()) == sorted([*ids[3:], "notes.txt"])


def test_serve_runs_the_networks_in_the_dtype_asked_for(fixtures_dir, tmp_path, monkeypatch, capsys):
    """`prd serve --dtype bfloat16` serves the student with its networks in bfloat16 (the field in float32), as
    `prd generate --dtype` runs them: a request gives a mesh."""
    import torch
    import uvicorn

    from lightning_modules.serve import app as serve_app

    served = {}
    real_create_app = serve_app.create_app
    monkeypatch.setattr(serve_app, "create_app", lambda model, *a, **k: served.setdefault("model", model)
                        and real_create_app(model, *a, **k))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(kwargs))
    weights = fixtures_dir / "triplaneturbo_ref_A" / "triplane_turbo.pth"
    code = main(["serve", "--weights", str(weights), "--out", str(tmp_path / "o"), "--device", "cpu",
                 "--dtype", "bfloat16", "--port", "7999"])
    assert code == 0 and served["port"] == 7999
    assert "(bfloat16)" in capsys.readouterr().out
    student = served["model"].student
    assert student.unet.dtype == torch.bfloat16 and student.field_dtype == torch.float32
    result = served["model"].generate_from("a chair", 0, 16, "glb")
    assert result.faces > 0 and len(load_mesh(result.glb_file).faces) == result.faces
