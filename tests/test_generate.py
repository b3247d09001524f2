"""`prd generate` end to end on the tiny reference model (tests/fixtures/reference/triplaneturbo_ref_A)."""

import json
import subprocess
import sys

import numpy as np
import pygltflib
import pytest
import torch
import trimesh

from lightning_modules.cli import main
from lightning_modules.cli.generate import build_parser
from lightning_modules.evaluation.meshes import load_mesh
from lightning_modules.student import TriplaneStudent
from lightning_modules.student.generation import StageTimer, generate_meshes
from renderers.marching_cubes import extract_mesh

PROMPTS = ["a red car", "a blue chair"]


@pytest.fixture(scope="module")
def student(ref_weights):
    return TriplaneStudent.from_pretrained(None, weights=ref_weights)


def _run(argv, capsys):
    code = main(["generate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("fmt", ["glb", "obj", "ply"])
def test_cli_writes_meshes_that_load_back(tmp_path, capsys, ref_weights, student, fmt):
    out = tmp_path / fmt
    code, stdout, _ = _run([*PROMPTS, "--weights", str(ref_weights), "--out", str(out), "--resolution", "40",
                            "--format", fmt, "--seed", "7", "--no-progress"], capsys)
    assert code == 0
    for stage in ("text encoding", "denoising", "triplane decoding", "mesh extraction", "export", "total"):
        assert stage in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["prompt"] for m in manifest["meshes"]] == PROMPTS

    # The same computation through the library: the files hold exactly its vertices and colours.
    emb = student.encode_prompt(PROMPTS)
    noise = torch.cat([student.make_noise(1, seed=7 + i) for i in range(2)])
    field = student.sample(emb, noise=noise)
    meshes = extract_mesh(field, resolution=40)
    for i, (record, mesh) in enumerate(zip(manifest["meshes"], meshes, strict=True)):
        loaded = load_mesh(out / record["file"])  # world frame, sRGB colours
        assert len(loaded.vertices) == mesh.num_vertices == record["vertices"] > 0
        assert len(loaded.faces) == mesh.num_faces
        world = loaded.vertices
        np.testing.assert_allclose(world, mesh.vertices.detach().numpy(), atol=1e-5)
        points = torch.as_tensor(world, dtype=torch.float32)[None].expand(2, -1, -1)
        expected_rgb = field.color(points)[i].clamp(0, 1).detach().numpy()
        got = loaded.colors.astype(np.float64)
        assert np.abs(got - expected_rgb).max() <= 0.5 / 255 + 1e-6


def test_dense_grid_writes_the_same_meshes(tmp_path, capsys, ref_weights):
    outs = {}
    for flag in ([], ["--dense-grid"]):
        out = tmp_path / ("dense" if flag else "coarse")
        code, _, _ = _run([*PROMPTS, "--weights", str(ref_weights), "--out", str(out), "--resolution", "32",
                           "--no-progress", "--format", "ply", *flag], capsys)
        assert code == 0
        outs[bool(flag)] = [load_mesh(out / r["file"]) for r in json.loads((out / "manifest.json").read_text())["meshes"]]
    for coarse, dense in zip(outs[False], outs[True], strict=True):
        assert len(coarse.faces) > 0
        np.testing.assert_array_equal(coarse.faces, dense.faces)
        np.testing.assert_array_equal(coarse.vertices, dense.vertices)


def test_meshes_do_not_depend_on_batch_size(tmp_path, student):
    a = generate_meshes(student, PROMPTS, tmp_path / "a", seed=3, resolution=24, batch_size=1, progress=False)
    b = generate_meshes(student, PROMPTS, tmp_path / "b", seed=3, resolution=24, batch_size=2, progress=False)
    for ra, rb in zip(a, b, strict=True):
        ma = trimesh.load(tmp_path / "a" / ra["file"], process=False, force="mesh")
        mb = trimesh.load(tmp_path / "b" / rb["file"], process=False, force="mesh")
        np.testing.assert_allclose(ma.vertices, mb.vertices, atol=1e-5)


def test_timer_accumulates_every_stage(tmp_path, student):
    timer = StageTimer()
    generate_meshes(student, PROMPTS[:1], tmp_path, resolution=16, timer=timer, progress=False)
    assert set(timer.seconds) == {"text encoding", "denoising", "triplane decoding", "mesh extraction", "export"}
    assert timer.total == pytest.approx(sum(timer.seconds.values())) and timer.total > 0


def _one_line_error(code, err):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("prd: error: "), err
    return lines[0]


def test_empty_prompt_is_one_line_error(tmp_path, capsys, ref_weights):
    code, _, err = _run(["a cat", "  ", "--weights", str(ref_weights), "--out", str(tmp_path)], capsys)
    assert "prompt 2 is empty" in _one_line_error(code, err)
    code, _, err = _run(["--weights", str(ref_weights), "--out", str(tmp_path)], capsys)
    assert "no prompt given" in _one_line_error(code, err)


def test_missing_base_directory_is_one_line_error(tmp_path, capsys, ref_weights):
    code, _, err = _run(["a cat", "--base", str(tmp_path / "nope"), "--weights", str(ref_weights),
                         "--out", str(tmp_path / "o")], capsys)
    line = _one_line_error(code, err)
    assert str(tmp_path / "nope") in line


def test_wrong_and_corrupt_weights_are_one_line_errors(tmp_path, capsys, fixtures_dir):
    base = str(fixtures_dir / "triplaneturbo_ref_A" / "base")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint")
    code, _, err = _run(["a cat", "--base", base, "--weights", str(corrupt), "--out", str(tmp_path / "o")], capsys)
    assert "corrupt.pth" in _one_line_error(code, err)

    wrong = tmp_path / "wrong.pth"
    torch.save({"state_dict": {"geometry.something_else.weight": torch.zeros(2)}}, wrong)
    code, _, err = _run(["a cat", "--base", base, "--weights", str(wrong), "--out", str(tmp_path / "o")], capsys)
    line = _one_line_error(code, err)
    assert "wrong.pth" in line and "missing" in line.lower()

    code, _, err = _run(["a cat", "--base", base, "--weights", str(tmp_path / "absent.pth"),
                         "--out", str(tmp_path / "o")], capsys)
    assert "absent.pth" in _one_line_error(code, err)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Path errors must come before the model loads (seconds to minutes at full size)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the student was loaded")

    monkeypatch.setattr(TriplaneStudent, "from_pretrained", classmethod(refuse))


def test_out_that_is_a_file_is_one_line_error(tmp_path, capsys, no_model_loads):
    existing = tmp_path / "meshes.glb"
    existing.write_text("not a folder")
    code, _, err = _run(["a cat", "--out", str(existing)], capsys)
    line = _one_line_error(code, err)
    assert str(existing) in line and "is a file, not a folder" in line
    code, _, err = _run(["a cat", "--out", str(existing / "sub")], capsys)  # a file where a folder is expected
    assert "a part of the path is a file" in _one_line_error(code, err)
    assert existing.read_text() == "not a folder"


def test_out_that_cannot_be_written_is_one_line_error(tmp_path, capsys, no_model_loads, monkeypatch):
    from lightning_modules.cli import paths

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(paths.tempfile, "TemporaryFile", read_only)
    code, _, err = _run(["a cat", "--out", str(tmp_path / "o")], capsys)
    line = _one_line_error(code, err)
    assert str(tmp_path / "o") in line and "cannot write into the folder (Read-only file system)" in line


def test_out_that_cannot_be_created_is_one_line_error(tmp_path, capsys, no_model_loads, monkeypatch):
    """A folder that cannot be created (read-only parent, permissions): simulated, as root can write anywhere."""
    target = tmp_path / "locked" / "new"
    real_mkdir = type(target).mkdir

    def mkdir(self, *args, **kwargs):
        if self == target:
            raise PermissionError(13, "Permission denied")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(type(target), "mkdir", mkdir)
    code, _, err = _run(["a cat", "--out", str(target)], capsys)
    line = _one_line_error(code, err)
    assert str(target) in line and "cannot create the folder (Permission denied)" in line
    assert not target.exists()


def test_unreadable_prompts_file_is_one_line_error(tmp_path, capsys, no_model_loads):
    code, _, err = _run(["--prompts-file", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert f"prompt source '{tmp_path}' is a folder, not a file" in _one_line_error(code, err)


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lightning_modules.cli", "generate", "", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "prd: error: prompt 1 is empty: every prompt must contain text"


def test_merged_adapters_give_the_same_field(ref_weights):
    student = TriplaneStudent.from_pretrained(None, weights=ref_weights)
    emb = student.encode_prompt(PROMPTS[:1])
    noise = student.make_noise(1, seed=0)
    points = torch.rand(1, 500, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    before = student.sample(emb, noise=noise)
    weight = student.unet.down_blocks[0].resnets[0].conv1.base_layer.weight.detach().clone()
    assert student.merge_adapters() > 0
    assert not torch.equal(student.unet.down_blocks[0].resnets[0].conv1.base_layer.weight, weight)
    merged = student.sample(emb, noise=noise)
    with torch.no_grad():
        for fn in ("sdf", "deformation", "color"):
            a, b = getattr(before, fn)(points), getattr(merged, fn)(points)
            assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item()), fn
    student.merge_adapters(merge=False)
    torch.testing.assert_close(student.unet.down_blocks[0].resnets[0].conv1.base_layer.weight, weight)


def test_material_option(tmp_path, capsys, ref_weights, student):
    assert build_parser().parse_args(["a", "--out", "o"]).material == "pbr"
    records = generate_meshes(student, PROMPTS[:1], tmp_path, resolution=16, material="unlit", progress=False)
    gltf = pygltflib.GLTF2().load(str(tmp_path / records[0]["file"]))
    assert "KHR_materials_unlit" in gltf.extensionsUsed
    assert gltf.materials[0].pbrMetallicRoughness.metallicFactor == 0
    code, _, err = _run(["a red car", "--weights", str(ref_weights), "--out", str(tmp_path / "ply"),
                         "--format", "ply", "--material", "unlit"], capsys)
    assert "a vertex-colour PLY has no material" in _one_line_error(code, err)
