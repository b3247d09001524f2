"""`generate`: prompts -> objects in memory (meshes, colours, Gaussians) with timings, writing nothing;
`export_generation` writes them, and `generate_meshes` (`prd generate`, `prd serve`, `prd eval`) is the two in turn."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lightning_modules.cli import main
from lightning_modules.evaluation.meshes import load_mesh
from lightning_modules.student import TriplaneStudent
from lightning_modules.student.generation import StageTimer, export_generation, generate, generate_meshes
from tests.threads import single_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["a red car", "a blue chair", "a green lamp"]


@pytest.fixture(scope="module")
def student(ref_weights):
    return TriplaneStudent.from_pretrained(None, weights=ref_weights)


def test_generate_returns_the_objects_and_writes_nothing(student, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    output = generate(student, PROMPTS, seed=5, resolution=24, batch_size=2)
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert [(o.index, o.prompt, o.seed) for o in output.objects] == [(0, PROMPTS[0], 5), (1, PROMPTS[1], 6), (2, PROMPTS[2], 7)]
    assert set(output.timings) == {"text encoding", "denoising", "triplane decoding", "mesh extraction"}
    assert all(seconds > 0 for seconds in output.timings.values())
    for obj in output.objects:
        assert obj.mesh.num_vertices > 0 and obj.vertex_colors.shape == (obj.mesh.num_vertices, 3)
        assert obj.gaussians is None  # a mesh student has none
        assert torch.allclose(obj.field.color(obj.mesh.vertices[None])[0], obj.vertex_colors)
    # the object of prompt i does not depend on the batch it came in
    alone = generate(student, PROMPTS[2:], seed=7, resolution=24, batch_size=1, first_index=2).objects[0]
    assert alone.index == 2 and torch.allclose(alone.mesh.vertices, output.objects[2].mesh.vertices, atol=1e-6)
    # only export writes; its files are generate_meshes' files
    (tmp_path / "a").mkdir()
    records = export_generation(output, tmp_path / "a", file_format="glb")
    reference = generate_meshes(student, PROMPTS, tmp_path / "b", seed=5, resolution=24, batch_size=2, progress=False)
    assert records == reference
    for record in records:
        assert (tmp_path / "a" / record["file"]).read_bytes() == (tmp_path / "b" / record["file"]).read_bytes()
        mesh = load_mesh(tmp_path / "a" / record["file"])
        np.testing.assert_allclose(mesh.vertices, output.objects[record["index"]].mesh.vertices.numpy(), atol=1e-5)


def test_the_stage_table_shows_gaussians_only_when_they_were_made():
    timer = StageTimer()
    timer.seconds.update({"denoising": 1.0, "export": 0.5})
    assert "gaussians" not in timer.table(1) and "mesh extraction" in timer.table(1)
    timer.seconds["gaussians"] = 0.25
    assert "gaussians" in timer.table(1) and timer.total == pytest.approx(1.75)


def test_a_gaussian_student_generates_gaussians_and_prd_generate_writes_ply_and_glb(gaussian_student, tiny_sd_dir, tmp_path,
                                                                                   capsys):
    import renderers.gaussian_ply as ply
    student, weights = gaussian_student
    output = generate(student, PROMPTS[:2], seed=3, resolution=16, batch_size=2)
    assert "gaussians" in output.timings
    for obj in output.objects:
        assert obj.gaussians.batch_size == 1 and obj.gaussians.num_gaussians == 300 and obj.gaussians.sh_degree == 1
        with torch.no_grad():  # object i's Gaussians are those of its own field
            assert torch.allclose(obj.gaussians.means, obj.field.gaussian_attributes()["means"], atol=1e-6)

    out = tmp_path / "out"
    code = main(["generate", *PROMPTS[:2], "--base", str(tiny_sd_dir), "--weights", str(weights),
                 "--out", str(out), "--resolution", "16", "--seed", "3", "--no-progress", "--device", "cpu", "--no-merge"])
    assert code == 0 and "gaussians" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    for record, obj in zip(manifest["meshes"], output.objects, strict=True):
        assert record["file"].endswith(".glb") and (out / record["file"]).is_file()  # the mesh of the same SDF
        assert record["gaussians_file"] == record["file"][: -len(".glb")] + "_gaussians.ply"
        assert record["gaussians"] == 300 and record["sh_degree"] == 1
        back = ply.read_gaussian_ply(out / record["gaussians_file"])
        for name in ("means", "scales", "opacities", "sh"):
            assert torch.allclose(getattr(back, name), getattr(obj.gaussians, name), rtol=1e-5, atol=1e-6), name
        assert torch.allclose(back.quats, obj.gaussians.quats, atol=1e-6)
