"""Every `prd` subcommand against bad input, table-driven (README, "Command line": the error-handling promise).

Each case runs the `prd` entry point in-process and checks: the exit code; stderr ends with ONE line
`prd: error: <reason>` holding the expected words (argument-syntax errors of `prd fit` come after jsonargparse's
usage text, every other error is the only line `prd generate` / `prd eval` print); no traceback; nothing written
outside the case's output folder (also not in the working directory); and no model loaded (the student's base
loader and open_clip's model factory refuse to run, so every error comes before any work).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from lightning_modules.cli import main
from renderers.export import export_mesh
from tests.prd_helpers import PRD_WARNING_FILTERS, single_thread  # noqa: F401  (fixture)
from tests.teacher_helpers import put_in_hub_cache

pytestmark = [*PRD_WARNING_FILTERS, pytest.mark.usefixtures("single_thread")]

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml"
USAGE = "usage"  # the expected exit keeps jsonargparse's usage text before the one-line reason


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Bad and good inputs, shared by the cases (never written to by a case: checked after each)."""
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "empty.txt").write_text("")
    (folder / "blank.txt").write_text("  \n\t\n   \n")
    (folder / "bad_utf8.txt").write_bytes(b"\xff\xfe a red ball\n\xc3\x28 a cube\n")
    (folder / "prompts.txt").write_text("a red ball\na blue cube\n")
    (folder / "one.txt").write_text("a red ball\n")
    (folder / "a_file").write_text("not a folder")
    (folder / "random.ckpt").write_bytes(os.urandom(4096))
    torch.save({"state_dict": {"student.w": torch.zeros(1000)}, "hyper_parameters": {}}, folder / "whole.ckpt")
    data = (folder / "whole.ckpt").read_bytes()
    (folder / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (folder / "random.bin").write_bytes(os.urandom(4096))
    meshes = folder / "meshes"
    vertices = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float32)
    faces = torch.tensor([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    export_mesh(meshes / "0000_a_red_ball.glb", vertices, faces, torch.full((4, 3), 0.5))
    return folder


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any student / base model or CLIP model load fails the test with a traceback (not a `UserError`)."""
    import open_clip

    from lightning_modules.student import triplane_student

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(triplane_student, "_load_base", refuse)
    monkeypatch.setattr(open_clip, "create_model", refuse)


def _files(root: Path, skip: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and skip not in p.parents
    }


def _check(argv: list[str], code: int, words: list[str], root: Path, out: Path, capsys, monkeypatch) -> str:
    """Run `prd argv` in `root/cwd`; assert the exit code, the last stderr line, no traceback, no stray file."""
    cwd = root / "cwd"
    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)
    before = _files(root, out)
    capsys.readouterr()
    got = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code, (got, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    errors = [line for line in lines if line.startswith("prd: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-2000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert _files(root, out) == before, "a file was written outside the output folder"
    assert not any(cwd.iterdir()), "a file was written into the working directory"
    return err


# ------------------------------------------------------------------------------------------ prd fit


def _fit_config(base: Path, out: Path) -> Path:
    """The shipped demo config, writing under `out`, on the tiny base."""
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(out / "logs")
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(out / "checkpoints")
    config["trainer"]["enable_progress_bar"] = False
    config["model"]["init_args"]["base"] = str(base)
    path = out.parent / "demo_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


FIT_CASES = [
    # (case, extra arguments ({in}: the inputs folder), expected words of the one-line message)
    ("prompts file empty", ["--data.init_args.train_prompts", "{in}/empty.txt"], ["empty.txt", "holds no valid prompt"]),
    ("prompts file whitespace only", ["--data.init_args.train_prompts", "{in}/blank.txt"], ["blank.txt", "no valid prompt", "empty prompt: 3"]),
    ("prompts file non-UTF-8", ["--data.init_args.train_prompts", "{in}/bad_utf8.txt"], ["bad_utf8.txt", "invalid UTF-8"]),
    ("prompts file is a folder", ["--data.init_args.train_prompts", "{in}"], ["is a folder, not a file"]),
    ("prompts file missing", ["--data.init_args.train_prompts", "{in}/nope.txt"], ["nope.txt", "not found"]),
    ("ckpt_path missing", ["--ckpt_path", "{in}/nope.ckpt"], ["--ckpt_path", "nope.ckpt", "no such checkpoint file"]),
    ("ckpt_path random bytes", ["--ckpt_path", "{in}/random.ckpt"], ["random.ckpt", "not a readable checkpoint"]),
    ("ckpt_path truncated", ["--ckpt_path", "{in}/truncated.ckpt"], ["truncated.ckpt", "not a readable checkpoint"]),
    ("batch_size 0", ["--data.init_args.batch_size", "0"], ["batch_size must be at least 1, got 0"]),
    ("batch_size -1", ["--data.init_args.batch_size", "-1"], ["batch_size must be at least 1, got -1"]),
    ("cameras.num_views 0", ["--model.init_args.cameras.num_views", "0"], ["cameras.num_views", "got 0"]),
    ("default_root_dir is a file", ["--trainer.default_root_dir", "{in}/a_file"], ["default_root_dir", "is a file, not a folder"]),
    ("base model missing", ["--model.init_args.base", "{in}/no_base"], ["no_base", "does not exist"]),
    ("base hub id not cached (offline)", ["--model.init_args.base", "someone/uncached-sd"],
     ["'someone/uncached-sd'", "not in the local cache", "hf download someone/uncached-sd"]),
    ("accelerator not there", ["--trainer.accelerator", "tpu"], ["--trainer.accelerator"]),
    ("batch_size not a number", ["--data.init_args.batch_size", "abc"], [USAGE, "data.batch_size", "int", "abc"]),
    ("unknown option", ["--trainer.no_such_option", "1"], [USAGE, "unrecognized arguments", "no_such_option"]),
]


@pytest.mark.parametrize("case, extra, words", FIT_CASES, ids=[c[0] for c in FIT_CASES])
def test_prd_fit_bad_input(case, extra, words, inputs, tiny_sd_dir, tmp_path, capsys, monkeypatch, nothing_loads, empty_hub_cache):
    out = tmp_path / "out"
    out.mkdir()
    config = _fit_config(tiny_sd_dir, out)
    argv = ["fit", "--config", str(config), *[a.replace("{in}", str(inputs)) for a in extra]]
    err = _check(argv, 2, [w for w in words if w != USAGE], tmp_path, out, capsys, monkeypatch)
    assert (USAGE in words) == ("usage:" in err), err[-500:]


# ---------------------------------------------------------------- prd fit with real teachers: their weights

V1_CONFIG = DEMO_CONFIG.parent / "triplaneturbo_v1.yaml"


def _v1_config(base: Path, inputs: Path, out: Path, change: dict[str, str]) -> Path:
    """configs/triplaneturbo_v1.yaml on the CPU, every weight local (the tiny SD for every pipeline, stand-in files
    for the multi-view checkpoints), then `change` ("teacher.argument" or "model.argument" -> value) applied."""
    config = yaml.safe_load(V1_CONFIG.read_text())
    config["trainer"].update(accelerator="cpu", devices=1, strategy="auto", enable_progress_bar=False)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(out / "logs")
    for callback in config["trainer"]["callbacks"]:
        callback["init_args"]["dirpath"] = str(out / "checkpoints")
    model = config["model"]["init_args"]
    model.update(base=str(base), clip_score=None)
    teachers = model["teachers"]["init_args"]["teachers"]
    teachers["mvdream"]["init_args"].update(ckpt_path=str(inputs / "sd-v2.1-base-4view.pt"), vae=str(base), text_encoder=str(base))
    teachers["richdreamer_nd"]["init_args"].update(ckpt_path=str(inputs / "nd_mv_ema.pt"), text_encoder=str(base))
    teachers["stable_diffusion"]["init_args"].update(pretrained=str(base))
    for key, value in change.items():
        owner, argument = key.split(".")
        (model if owner == "model" else teachers[owner]["init_args"])[argument] = value.replace("{in}", str(inputs))
    config["data"]["init_args"]["train_prompts"] = str(inputs / "prompts.txt")
    path = out.parent / "v1.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def v1_inputs(inputs):
    (inputs / "sd-v2.1-base-4view.pt").write_bytes(b"stand-in")  # only looked for, never loaded here
    (inputs / "nd_mv_ema.pt").write_bytes(b"stand-in")
    return inputs


def test_prd_fit_teacher_weights_checked_before_any_work(
    v1_inputs, tiny_sd_dir, tmp_path, capsys, monkeypatch, nothing_loads, empty_hub_cache
):
    """The full recipe's teachers, offline: a checkpoint that is not on this machine is one line naming it and how
    to fetch it, before anything loads (every kind of missing teacher weight: tests/test_teachers.py)."""
    out = tmp_path / "out"
    out.mkdir()
    config = _v1_config(tiny_sd_dir, v1_inputs, out, {"richdreamer_nd.ckpt_path": "{in}/nd_mv_ema.ckpt"})
    _check(["fit", "--config", str(config)], 2, ["nd_mv_ema.ckpt", "not found", "wget"], tmp_path, out, capsys, monkeypatch)


def test_prd_fit_teacher_weights_in_the_hub_cache_pass_the_checks(
    v1_inputs, tiny_sd_dir, tmp_path, monkeypatch, nothing_loads, empty_hub_cache
):
    """The other side: with every weight local, or a hub id's file in the cache, the checks pass and `fit` goes on
    to load the student (refused here: the first model load)."""
    put_in_hub_cache(empty_hub_cache, "MVDream/MVDream", "sd-v2.1-base-4view.pt")
    out = tmp_path / "out"
    out.mkdir()
    config = _v1_config(tiny_sd_dir, v1_inputs, out, {"mvdream.ckpt_path": "{in}/not_here.pt"})
    monkeypatch.chdir(out)
    with pytest.raises(AssertionError, match="a model was loaded"):
        main(["fit", "--config", str(config)])


# ------------------------------------------------------------------------------------- prd generate

GENERATE_CASES = [
    # (case, arguments ({in}: inputs, {out}: the output folder), expected words)
    ("prompts file is a folder", ["--prompts-file", "{in}", "--out", "{out}"], ["is a folder, not a file"]),
    ("prompts file missing", ["--prompts-file", "{in}/nope.txt", "--out", "{out}"], ["nope.txt", "not found"]),
    ("prompts file empty", ["--prompts-file", "{in}/empty.txt", "--out", "{out}"], ["empty.txt", "holds no valid prompt"]),
    ("prompts file whitespace only", ["--prompts-file", "{in}/blank.txt", "--out", "{out}"], ["no valid prompt"]),
    ("prompts file non-UTF-8", ["--prompts-file", "{in}/bad_utf8.txt", "--out", "{out}"], ["invalid UTF-8"]),
    ("empty prompt", ["a cat", "  ", "--out", "{out}"], ["prompt 2 is empty"]),
    ("no prompt", ["--out", "{out}"], ["no prompt given"]),
    ("out is a file", ["a cat", "--out", "{in}/a_file"], ["--out", "is a file, not a folder"]),
    ("out under a file", ["a cat", "--out", "{in}/a_file/meshes"], ["--out", "a part of the path is a file"]),
    ("texture-size 0", ["a cat", "--uv-texture", "--texture-size", "0", "--out", "{out}"], ["--texture-size", "got 0"]),
    ("resolution 2", ["a cat", "--resolution", "2", "--out", "{out}"], ["--resolution", "got 2"]),
    ("batch-size 0", ["a cat", "--batch-size", "0", "--out", "{out}"], ["--batch-size", "got 0"]),
    ("seed -1", ["a cat", "--seed", "-1", "--out", "{out}"], ["--seed", "got -1"]),
    ("resolution not a number", ["a cat", "--resolution", "big", "--out", "{out}"], ["--resolution", "expected an integer"]),
    ("device gpu0", ["a cat", "--device", "gpu0", "--out", "{out}"], ["--device 'gpu0' is not a device"]),
    ("device cuda:7", ["a cat", "--device", "cuda:7", "--out", "{out}"], ["--device cuda:7", "CUDA"]),
    ("uv-texture with ply", ["a cat", "--uv-texture", "--format", "ply", "--out", "{out}"], ["--uv-texture needs"]),
    ("faces 0", ["a cat", "--faces", "0", "--out", "{out}"], ["--faces", "must be at least 4, got 0"]),
    ("asset texture-size 0", ["a cat", "--asset", "--texture-size", "0", "--out", "{out}"], ["--texture-size", "got 0"]),
    ("asset texture-size 9000", ["a cat", "--asset", "--texture-size", "9000", "--out", "{out}"],
     ["texture size must be an integer from 16 to 8192, got 9000"]),
    ("roughness 2", ["a cat", "--asset", "--roughness", "2", "--out", "{out}"], ["--roughness", "must be in [0, 1], got 2"]),
    ("roughness without asset", ["a cat", "--roughness", "0.5", "--out", "{out}"], ["--roughness sets the material of --asset"]),
    ("asset with ply", ["a cat", "--asset", "--format", "ply", "--out", "{out}"], ["--asset writes a PBR glb or obj"]),
    ("asset with uv-texture", ["a cat", "--asset", "--uv-texture", "--out", "{out}"], ["--asset writes a PBR glb or obj"]),
    ("asset with unlit", ["a cat", "--asset", "--material", "unlit", "--out", "{out}"], ["--asset writes a PBR glb or obj"]),
    ("format unknown", ["a cat", "--format", "stl", "--out", "{out}"], ["--format", "invalid choice"]),
    ("unknown option", ["a cat", "--frobnicate", "--out", "{out}"], ["unrecognized arguments: --frobnicate"]),
    ("weights missing", ["a cat", "--weights", "{in}/nope.pth", "--out", "{out}"], ["nope.pth", "not found"]),
    ("base missing", ["a cat", "--base", "{in}/no_base", "--weights", "{in}/whole.ckpt", "--out", "{out}"], ["no_base", "does not exist"]),
]


@pytest.mark.parametrize("case, args, words", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_prd_generate_bad_input(case, args, words, inputs, tmp_path, capsys, monkeypatch, nothing_loads):
    out = tmp_path / "out"
    argv = ["generate", *[a.replace("{in}", str(inputs)).replace("{out}", str(out)) for a in args]]
    err = _check(argv, 2, words, tmp_path, out, capsys, monkeypatch)
    assert len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------------------- prd eval

EVAL_CASES = [
    # (case, arguments after --meshes {in}/meshes --prompts {in}/prompts.txt --out {out}, expected words)
    ("out is a file", ["--out", "{in}/a_file"], ["--out", "is a file, not a folder"]),
    ("out under a file", ["--out", "{in}/a_file/eval"], ["--out", "a part of the path is a file"]),
    ("mesh-resolution 0", ["--mesh-resolution", "0"], ["--mesh-resolution", "got 0"]),
    ("bound 0", ["--bound", "0"], ["--bound", "got 0"]),
    ("bound -1", ["--bound", "-1"], ["--bound", "got -1"]),
    ("views 0", ["--views", "0"], ["--views", "got 0"]),
    ("fov 180", ["--fov", "180"], ["--fov", "got 180"]),
    ("resolution 4", ["--resolution", "4"], ["--resolution", "got 4"]),
    ("limit 0", ["--limit", "0"], ["--limit", "got 0"]),
    ("distance inside the box", ["--distance", "1"], ["--distance", "inside the box"]),
    ("device gpu0", ["--device", "gpu0"], ["--device 'gpu0' is not a device"]),
    ("meshes missing", ["--meshes", "{in}/no_meshes"], ["--meshes", "no such mesh folder"]),
    ("meshes is a file", ["--meshes", "{in}/a_file"], ["--meshes", "is a file"]),
    ("prompts is a folder", ["--prompts", "{in}"], ["is a folder, not a file"]),
    ("prompts missing", ["--prompts", "{in}/nope.txt"], ["nope.txt", "not found"]),
    ("prompts empty", ["--prompts", "{in}/empty.txt"], ["holds no valid prompt"]),
    ("prompts non-UTF-8", ["--prompts", "{in}/bad_utf8.txt"], ["invalid UTF-8"]),
    ("mesh-map missing", ["--mesh-map", "{in}/map.csv"], ["--mesh-map", "no such CSV file"]),
    ("clip-checkpoint missing", ["--clip-checkpoint", "{in}/nope.bin"], ["--clip-checkpoint", "no such CLIP weights file"]),
    ("clip-checkpoint is a folder", ["--clip-checkpoint", "{in}"], ["--clip-checkpoint", "is a folder"]),
    ("clip-checkpoint random bytes", ["--clip-checkpoint", "{in}/random.bin"], ["--clip-checkpoint", "random.bin", "is not a weights file"]),
    ("clip-checkpoint truncated", ["--clip-checkpoint", "{in}/truncated.ckpt"], ["--clip-checkpoint", "truncated or corrupt archive"]),
    ("a prompt without a mesh", ["--prompts", "{in}/prompts.txt"], ["1 of 2 prompts have no mesh", "--allow-missing"]),
    ("weights missing", ["--meshes", None, "--weights", "{in}/nope.pth"], ["nope.pth", "not found"]),
    ("neither meshes nor weights", ["--meshes", None], ["one of the arguments --weights --meshes is required"]),
]


@pytest.mark.parametrize("case, args, words", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_prd_eval_bad_input(case, args, words, inputs, tmp_path, capsys, monkeypatch, nothing_loads):
    out = tmp_path / "out"
    options = {"--meshes": "{in}/meshes", "--prompts": "{in}/one.txt", "--out": "{out}"}
    extra = []
    for key, value in zip(args[::2], args[1::2], strict=True):
        if key in options:
            options[key] = value
        else:
            extra += [key, value]
    argv = ["eval", "--no-progress", *extra]
    for key, value in options.items():
        if value is not None:
            argv += [key, value]
    argv = [a.replace("{in}", str(inputs)).replace("{out}", str(out)) for a in argv]
    err = _check(argv, 2, words, tmp_path, out, capsys, monkeypatch)
    assert len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------- prd


def test_bare_prd_exits_2_with_usage(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "prd generate" in err and err.strip().splitlines()[-1].startswith("prd: error: no command given")


def test_prompt_files_follow_one_policy_in_every_subcommand(tmp_path, caplog):
    """Bad lines are skipped with one warning naming them (generate, eval and fit read a file alike); the
    datamodule's strict=True rejects the first with its line number."""
    from datamodules.prompts import PromptDataModule, PromptFileError
    from lightning_modules.cli.evaluate import load_prompts
    from lightning_modules.cli.generate import read_prompts_file

    path = tmp_path / "mixed.txt"
    path.write_bytes(b"a red ball\n\n\xff\xfe broken\na blue cube\n")
    readers = {
        "generate": lambda: read_prompts_file(path),
        "eval": lambda: load_prompts(str(path), None)[0],
        "fit": lambda: PromptDataModule(train_prompts=str(path), cache_index=False).prompts("train"),
    }
    for name, read in readers.items():
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert read() == ["a red ball", "a blue cube"], name
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "skipped 2 bad prompt line(s)" in warnings[0], (name, warnings)
        assert f"{path}:2 (empty prompt)" in warnings[0] and f"{path}:3 (invalid UTF-8" in warnings[0], name
    with pytest.raises(PromptFileError, match=rf"^{path}:2: empty prompt"):
        PromptDataModule(train_prompts=str(path), strict=True, cache_index=False).prompts("train")
