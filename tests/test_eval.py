"""`prd eval`: mesh matching and loading, the full run on the CPU with a tiny CLIP, resume, errors."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from lightning_modules.cli import evaluate as eval_cli
from lightning_modules.cli import main as prd_main
from lightning_modules.evaluation import run as eval_run
from lightning_modules.evaluation.meshes import MeshData, load_mesh, match_meshes, normalize_mesh, slugify
from lightning_modules.evaluation.protocol import RenderProtocol
from renderers.errors import UserError
from renderers.export import export_mesh
from tests.tiny_clip import make_tiny_clip

PROMPTS = [
    "a red cube",
    "a green box, low poly",
    "a blue brick",
    "a yellow tower",
    "a purple slab",
    "an orange pillar",
    "a white cube",
    "a cyan wedge",
]
COLOURS = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0.5, 0, 0.5), (1, 0.5, 0), (0.9, 0.9, 0.9), (0, 1, 1)]
SIZES = [(0.5, 0.5, 0.5), (0.6, 0.4, 0.3), (0.8, 0.3, 0.2), (0.2, 0.2, 0.8), (0.8, 0.8, 0.1), (0.15, 0.15, 0.6),
         (0.3, 0.3, 0.3), (0.5, 0.2, 0.4)]


def box(half=(0.5, 0.5, 0.5), colour=(1.0, 0.0, 0.0)):
    """A closed box [-h, h] in world coordinates, outward-facing triangles, one colour."""
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], np.float32) * np.array(half, np.float32)
    faces = np.array(
        [[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1], [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4],
         [1, 5, 7], [1, 7, 3]],
        np.int64,
    )
    return corners, faces, np.tile(np.array(colour, np.float32), (8, 1))


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip_eval"))


@pytest.fixture(scope="module")
def mesh_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("meshes")
    for i, (prompt, colour, half) in enumerate(zip(PROMPTS, COLOURS, SIZES, strict=True)):
        fmt = ("glb", "obj", "ply")[i % 3]
        export_mesh(folder / f"{i:04d}_{slugify(prompt)}.{fmt}", *box(half, colour))
    return folder


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


# -- matching -----------------------------------------------------------------------------------


def test_slugify():
    assert slugify("A beagle in a detective's outfit!") == "a_beagle_in_a_detective_s_outfit"
    assert slugify("  --x--  ") == "x"


def test_match_by_file_name_index_prefix_and_folder_layout(tmp_path, mesh_dir):
    found = match_meshes(mesh_dir, PROMPTS)
    assert [p.name.split("_", 1)[0] for p in found] == [f"{i:04d}" for i in range(8)]
    # reference layout: <prompt with underscores>/model.obj
    ref = tmp_path / "ref"
    for prompt in PROMPTS[:2]:
        export_mesh(ref / prompt.replace(" ", "_") / "model.obj", *box())
    found = match_meshes(ref, PROMPTS[:2] + ["a ghost"])
    assert found[0].parent.name == "a_red_cube" and found[1].parent.name == "a_green_box,_low_poly"
    assert found[2] is None


def test_match_truncated_names_and_ambiguity(tmp_path):
    long_prompt = "a very long prompt about a castle on a hill with many towers and flags"
    export_mesh(tmp_path / f"{slugify(long_prompt)[:40]}.ply", *box())
    assert match_meshes(tmp_path, [long_prompt])[0] is not None
    export_mesh(tmp_path / f"0001_{slugify(long_prompt)}.ply", *box())
    with pytest.raises(UserError, match="several meshes match"):
        match_meshes(tmp_path, [long_prompt])
    with pytest.raises(UserError, match="same file-name slug"):
        match_meshes(tmp_path, ["a cat!", "a cat?"])


def test_folder_with_subfolders_takes_its_top_level_and_says_so(tmp_path, caplog):
    """`prd eval --meshes outputs/demo`: the trained meshes at the top level, other copies in untrained/."""
    for prompt in PROMPTS[:2]:
        export_mesh(tmp_path / f"{slugify(prompt)}.glb", *box())
        export_mesh(tmp_path / "untrained" / f"{slugify(prompt)}.glb", *box())
    with caplog.at_level("WARNING"):
        found = match_meshes(tmp_path, PROMPTS[:2])
    assert [p.parent for p in found] == [tmp_path, tmp_path]
    assert "top level only" in caplog.text and "untrained/" in caplog.text
    # (without meshes at the top level the subfolders are searched: test_match_by_file_name_index_prefix_...)


def test_match_by_manifest_and_csv(tmp_path):
    for name in ("one.glb", "two.glb"):
        export_mesh(tmp_path / name, *box())
    (tmp_path / "manifest.json").write_text(json.dumps({"first prompt": "one.glb", "second prompt": "two.glb"}))
    assert [p.name for p in match_meshes(tmp_path, ["second prompt", "first prompt"])] == ["two.glb", "one.glb"]
    (tmp_path / "manifest.json").write_text(json.dumps([{"prompt": "first prompt", "file": "two.glb"}]))
    assert match_meshes(tmp_path, ["first prompt", "other"])[0].name == "two.glb"
    # `prd generate`'s manifest layout
    manifest = {"meshes": [{"index": 0, "prompt": "other", "seed": 0, "file": "one.glb"}], "format": "glb"}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert [p and p.name for p in match_meshes(tmp_path, ["first prompt", "other"])] == [None, "one.glb"]
    table = tmp_path / "map.csv"
    with table.open("w", newline="") as fh:
        csv.writer(fh).writerows([["prompt", "file"], ["x, with comma", "one.glb"]])
    assert match_meshes(tmp_path, ["x, with comma"], mesh_map=table)[0].name == "one.glb"
    (tmp_path / "manifest.json").write_text(json.dumps({"first prompt": "gone.glb"}))
    with pytest.raises(UserError, match="does not exist"):
        match_meshes(tmp_path, ["first prompt"])


# -- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["glb", "obj", "ply"])
def test_load_mesh_round_trip_to_world_frame(tmp_path, fmt):
    v, f, c = box((0.2, 0.4, 0.6), (0.2, 0.6, 1.0))
    path = export_mesh(tmp_path / f"m.{fmt}", v, f, c)
    mesh = load_mesh(path)
    # same vertex set, in world coordinates again (export wrote viewer axes)
    assert np.allclose(np.sort(mesh.vertices, axis=0), np.sort(v, axis=0), atol=1e-6)
    assert np.allclose(mesh.colors, np.array([0.2, 0.6, 1.0]), atol=1 / 255)
    assert mesh.faces.shape[1] == 3 and mesh.faces.max() < len(mesh.vertices)


def test_load_mesh_face_colours_and_errors(tmp_path):
    import trimesh

    v, f, _ = box()
    mesh = trimesh.Trimesh(v, f, face_colors=np.tile([255, 0, 0, 255], (12, 1)), process=False)
    mesh.visual.face_colors[:6] = [0, 0, 255, 255]
    mesh.export(tmp_path / "faces.ply")
    loaded = load_mesh(tmp_path / "faces.ply", mesh_frame="world")
    assert len(loaded.vertices) == 36 and {tuple(c) for c in loaded.colors.round(3)} == {(1, 0, 0), (0, 0, 1)}
    (tmp_path / "bad.obj").write_text("this is not a mesh\n")
    with pytest.raises(UserError):
        load_mesh(tmp_path / "bad.obj")


def test_normalize_mesh_box():
    v, f, c = box((0.1, 0.2, 0.4))
    mesh = MeshData(v + np.array([1.0, 2.0, 3.0], np.float32), f, c)
    out = normalize_mesh(mesh, "box", 0.9)
    assert np.allclose(out.vertices.max(axis=0), [0.225, 0.45, 0.9], atol=1e-6)
    assert np.allclose(out.vertices.min(axis=0), [-0.225, -0.45, -0.9], atol=1e-6)
    assert normalize_mesh(mesh, "none") is mesh


# -- the command --------------------------------------------------------------------------------


def _run(argv):
    return prd_main(["eval", *argv])


def _base_args(mesh_dir, prompts_file, tiny_clip_dir, out):
    return [
        "--meshes", str(mesh_dir), "--prompts", str(prompts_file), "--out", str(out),
        "--clip-model", f"local-dir:{tiny_clip_dir}", "--resolution", "32", "--no-progress", "--device", "cpu",
    ]


def test_eval_on_existing_meshes_writes_every_output(mesh_dir, prompts_file, tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(_base_args(mesh_dir, prompts_file, tiny_clip_dir, out)) == 0
    assert "CLIP score" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["num_prompts"] == 8 and results["num_unique_prompts"] == 8
    assert 0.0 <= results["clip_score"] <= 2.5 and 0.0 <= results["recall_at_1"] <= 1.0
    with (out / "per_prompt.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["prompt"] for r in rows] == PROMPTS
    # the overall numbers are the means of the per-prompt ones (same number of views everywhere)
    assert np.mean([float(r["clip_score"]) for r in rows]) == pytest.approx(results["clip_score"], rel=1e-5)
    assert np.mean([float(r["recall_at_1"]) for r in rows]) == pytest.approx(results["recall_at_1"], abs=1e-6)
    views = [float(rows[0][f"clip_score_az{a:03d}"]) for a in (0, 90, 180, 270)]
    assert np.mean(views) == pytest.approx(float(rows[0]["clip_score"]), rel=1e-5)
    for name in ("contact_sheet.png", "score_histogram.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG"
    report = (out / "report.md").read_text()
    assert "contact_sheet.png" in report and "score_histogram.png" in report
    renders = sorted((out / "renders").glob("*/*.png"))
    assert len(renders) == 8 * 4
    with Image.open(renders[0]) as im:
        assert im.size == (32, 32)


def test_interrupted_run_resumes_where_it_stopped(mesh_dir, prompts_file, tiny_clip_dir, tmp_path, monkeypatch):
    def args(out):
        return _base_args(mesh_dir, prompts_file, tiny_clip_dir, tmp_path / out) + ["--limit", "5"]

    real_render = eval_run.render_views
    calls = []

    def failing_render(*a, **k):
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        calls.append(1)
        return real_render(*a, **k)

    monkeypatch.setattr(eval_run, "render_views", failing_render)
    with pytest.raises(RuntimeError, match="injected failure"):
        _run(args("resumed"))
    progress = [json.loads(line) for line in (tmp_path / "resumed" / "progress.jsonl").read_text().splitlines()]
    assert [r["index"] for r in progress] == [0, 1]
    assert not (tmp_path / "resumed" / "results.json").exists()

    counted = []
    monkeypatch.setattr(eval_run, "render_views", lambda *a, **k: counted.append(1) or real_render(*a, **k))
    assert _run(args("resumed")) == 0
    assert len(counted) == 3  # only the prompts that were not finished
    # renders on disk are reused too: drop the last prompt's progress (a torn line), rerun: no rendering
    lines = (tmp_path / "resumed" / "progress.jsonl").read_text().splitlines()
    (tmp_path / "resumed" / "progress.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    counted.clear()
    assert _run(args("resumed")) == 0 and counted == []

    monkeypatch.setattr(eval_run, "render_views", real_render)
    assert _run(args("straight")) == 0
    resumed = json.loads((tmp_path / "resumed" / "results.json").read_text())
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert resumed["num_prompts"] == straight["num_prompts"] == 5
    assert resumed["clip_score"] == pytest.approx(straight["clip_score"], rel=1e-6)
    assert resumed["recall_at_1"] == straight["recall_at_1"]


def test_changed_settings_in_the_same_folder_is_a_one_line_error(mesh_dir, prompts_file, tiny_clip_dir, tmp_path, capsys):
    args = _base_args(mesh_dir, prompts_file, tiny_clip_dir, tmp_path / "o") + ["--limit", "2"]
    assert _run(args) == 0
    capsys.readouterr()
    assert _run(args + ["--elevation", "30"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "--overwrite" in err[0]
    assert _run(args + ["--elevation", "30", "--overwrite"]) == 0


def test_missing_clip_weights_is_a_one_line_error(mesh_dir, prompts_file, tmp_path, capsys):
    code = _run([
        "--meshes", str(mesh_dir), "--prompts", str(prompts_file), "--out", str(tmp_path / "o"),
        "--clip-cache-dir", str(tmp_path / "empty_cache"), "--no-progress",
    ])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "timm/vit_base_patch32_clip_224.openai" in err[0] and "--clip-checkpoint" in err[0]


def test_missing_meshes_and_bad_arguments(mesh_dir, prompts_file, tiny_clip_dir, tmp_path, capsys):
    extra = tmp_path / "more.txt"
    extra.write_text("\n".join(PROMPTS[:2] + ["a prompt without mesh"]) + "\n")
    args = _base_args(mesh_dir, extra, tiny_clip_dir, tmp_path / "o")
    assert _run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 of 3 prompts have no mesh" in err[0]
    assert _run(args + ["--allow-missing"]) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["num_prompts"] == 2 and results["missing"] == ["a prompt without mesh"]
    capsys.readouterr()
    assert _run(["--prompts", "x", "--out", "y"]) == 2  # neither --weights nor --meshes
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert _run(["--meshes", str(mesh_dir), "--prompts", "no_such_set", "--out", str(tmp_path / "z")]) == 2
    assert "not found" in capsys.readouterr().err


def test_allow_missing_also_skips_unreadable_meshes_and_reports_each(mesh_dir, tiny_clip_dir, tmp_path, capsys):
    meshes = tmp_path / "meshes"
    meshes.mkdir()
    for path in sorted(mesh_dir.iterdir())[:3]:
        (meshes / path.name).write_bytes(path.read_bytes())
    broken = sorted(meshes.iterdir())[1]
    broken.write_bytes(b"o not a mesh\nf 1 2\n")  # an OBJ without a single triangle
    prompts = tmp_path / "three.txt"
    prompts.write_text("\n".join(PROMPTS[:3]) + "\n")
    args = _base_args(meshes, prompts, tiny_clip_dir, tmp_path / "o")
    assert _run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and broken.name in err[0] and "--allow-missing" in err[0]
    assert _run(args + ["--allow-missing"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"prd eval: skipped prompt 1 {PROMPTS[1]!r}: ") and broken.name in err[0]
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["num_prompts"] == 2 and [u["prompt"] for u in results["unreadable"]] == [PROMPTS[1]]
    report = (tmp_path / "o" / "report.md").read_text()
    assert "## Not evaluated (1)" in report and f"| 1 | {PROMPTS[1]} | " in report and broken.name in report


def test_out_that_is_a_file_is_a_one_line_error(mesh_dir, prompts_file, tiny_clip_dir, tmp_path, capsys):
    existing = tmp_path / "results.json"
    existing.write_text("{}")
    for out in (existing, existing / "sub"):
        assert _run(_base_args(mesh_dir, prompts_file, tiny_clip_dir, out)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--out" in err[0] and "not a folder" in err[0]


def test_bundled_prompt_set_and_split(mesh_dir, tiny_clip_dir, tmp_path):
    prompts, name = eval_cli.load_prompts("dreamfusion415", "val")
    assert len(prompts) == 16 and name == "dreamfusion415.json#val"
    with pytest.raises(UserError, match="no 'nope' prompt list"):
        eval_cli.load_prompts("dreamfusion415", "nope")


def test_generate_mode_generates_missing_meshes_resumably(prompts_file, tiny_clip_dir, tmp_path, monkeypatch):
    """The weights mode calls the student's generate_meshes in batches and resumes between batches."""

    made = []

    def fake_generate_meshes(student, prompts, out_dir, seed=0, file_format="glb", resolution=160, batch_size=4,
                             progress=True):
        """Like lightning_modules.student.generation.generate_meshes: records with the file name in out_dir."""
        records = []
        for k, prompt in enumerate(prompts):
            i = PROMPTS.index(prompt)
            assert seed + k == 100 + i  # prompt i always uses seed + i, however the run was cut
            if len(made) == 5:
                raise RuntimeError("injected failure")
            made.append(prompt)
            path = export_mesh(out_dir / f"{k:04d}_{slugify(prompt)}.{file_format}", *box(SIZES[i], COLOURS[i]))
            records.append({"index": k, "prompt": prompt, "seed": seed + k, "file": path.name})
        return records

    class FakeStudent:
        @classmethod
        def from_pretrained(cls, base, weights, device=None):
            return cls()

    monkeypatch.setattr("lightning_modules.student.generation.generate_meshes", fake_generate_meshes)
    monkeypatch.setattr("lightning_modules.student.TriplaneStudent", FakeStudent)
    (tmp_path / "w.safetensors").write_bytes(b"")  # checked to exist before anything loads; never read here
    args = [
        "--weights", str(tmp_path / "w.safetensors"), "--prompts", str(prompts_file), "--out", str(tmp_path / "g"),
        "--clip-model", f"local-dir:{tiny_clip_dir}", "--resolution", "32", "--no-progress", "--device", "cpu",
        "--batch-size", "3", "--mesh-format", "ply", "--seed", "100",
    ]
    with pytest.raises(RuntimeError, match="injected failure"):
        _run(args)
    assert len(eval_run.read_jsonl(tmp_path / "g" / "generated.jsonl")) == 3  # one finished batch
    made.clear()
    assert _run(args) == 0
    assert made == PROMPTS[3:]
    names = sorted(p.name for p in (tmp_path / "g" / "meshes").glob("*.ply"))
    assert names == [f"{i:04d}_{slugify(p)}.ply" for i, p in enumerate(PROMPTS)]
    assert json.loads((tmp_path / "g" / "results.json").read_text())["num_prompts"] == 8


def test_render_protocol_defaults_are_the_reference_protocol():
    p = RenderProtocol()
    assert (p.num_views, p.elevation, p.distance, p.fovy, p.resolution) == (4, 15.0, 3.0, 40.0, 512)
    assert p.azimuths == [0.0, 90.0, 180.0, 270.0]
    assert eval_cli.build_parser().parse_args(["--meshes", "m", "--prompts", "p", "--out", "o"]).views == 4


def test_help_exits_zero(capsys):
    assert eval_cli.main(["--help"]) == 0
    assert "--meshes" in capsys.readouterr().out


def test_consecutive_batches():
    assert eval_run._consecutive_batches([0, 1, 2, 3, 4, 7, 8, 10], 2) == [[0, 1], [2, 3], [4], [7, 8], [10]]
    assert eval_run._consecutive_batches([], 3) == []


def test_generate_mode_with_the_tiny_reference_student(fixtures_dir, tiny_clip_dir, tmp_path):
    """Weights mode end to end with the real student and `prd generate`'s generate_meshes (the resume and
    seed bookkeeping are checked with a stand-in above)."""
    weights = fixtures_dir / "triplaneturbo_ref_A" / "triplane_turbo.pth"
    prompts = tmp_path / "two.txt"
    prompts.write_text("a red car\na blue chair\n")
    assert _run([
        "--weights", str(weights), "--prompts", str(prompts), "--out", str(tmp_path / "g"), "--seed", "3",
        "--clip-model", f"local-dir:{tiny_clip_dir}", "--resolution", "32", "--mesh-resolution", "24",
        "--no-progress", "--device", "cpu",
    ]) == 0
    results = json.loads((tmp_path / "g" / "results.json").read_text())
    assert results["num_prompts"] == 2 and 0.0 <= results["clip_score"] <= 2.5
    meshes = sorted(p.name for p in (tmp_path / "g" / "meshes").iterdir())
    assert meshes == ["0000_a_red_car.glb", "0001_a_blue_chair.glb"]  # no leftover partial folder
    assert len(load_mesh(tmp_path / "g" / "meshes" / meshes[0]).faces) > 0
