"""The CPU demo (`make demo` = `python -m lightning_modules.demo`): its base model and a shrunk end-to-end run.

The full demo (300 steps, every prompt's Chamfer distance down by >= 50 %) takes ~4 minutes and is run by
`make demo`, not here; these tests check the pipeline, its report and its exit codes.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from lightning_modules.demo.cpu_demo import build_parser, main
from lightning_modules.demo.tiny_models import (
    DEMO_BASE_MARKER,
    DEMO_UNET,
    SHIPPED_DEMO_UNET,
    SHIPPED_DEMO_UNET_SETTINGS,
    DemoBaseExistsError,
    build_demo_base,
    make_tiny_sd,
    toy_latent_images,
)
from tests.prd_helpers import PRD_WARNING_FILTERS, single_thread  # noqa: F401  (fixture)
from tests.test_prd_configs import demo_config_for_test

pytestmark = [*PRD_WARNING_FILTERS, pytest.mark.usefixtures("single_thread")]

PROMPTS = ["a red ball", "a blue cube"]


def _x0_error(directory, prompts, latent_size, timestep) -> float:
    """RMS error of the UNet's one-step x0 prediction at `timestep` against each prompt's toy latent image."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer")
    text = CLIPTextModel.from_pretrained(directory / "text_encoder")
    unet = UNet2DConditionModel.from_pretrained(directory / "unet")
    abar = DDPMScheduler.from_pretrained(directory / "scheduler").alphas_cumprod[timestep]
    data = toy_latent_images(len(prompts), latent_size)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        emb = text(ids)[0].repeat(8, 1, 1)
        x0 = data.repeat(8, 1, 1, 1)
        noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * torch.randn(x0.shape, generator=g)
        eps = unet(noisy, timestep, encoder_hidden_states=emb).sample
        pred = (noisy - (1 - abar).sqrt() * eps) / abar.sqrt()
    return float((pred - x0).square().mean().sqrt())


def test_demo_base_pretraining_makes_the_unet_a_denoiser_and_is_reused(tmp_path):
    torch.manual_seed(3)
    untrained = build_demo_base(tmp_path / "untrained", PROMPTS, latent_size=8, steps=0, log=None)
    drawn = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.rand(4))  # building leaves the global RNG as it was
    trained = build_demo_base(tmp_path / "trained", PROMPTS, latent_size=8, steps=60, batch_size=8, log=None)
    errors = {t: (_x0_error(untrained, PROMPTS, 8, t), _x0_error(trained, PROMPTS, 8, t)) for t in (999, 499)}
    assert errors[999][0] > 8  # an untrained UNet's x0 at t = 999 is its input noise amplified ~15x
    for t, (before, after) in errors.items():
        assert after < 0.6 * before, (t, before, after)

    unet_file = next((trained / "unet").glob("*.safetensors"))
    stamp = unet_file.stat().st_mtime_ns
    build_demo_base(trained, PROMPTS, latent_size=8, steps=60, batch_size=8, log=None)  # same settings: reused
    assert unet_file.stat().st_mtime_ns == stamp
    with pytest.raises(DemoBaseExistsError, match=r"other settings \(steps\).*--model.init_args.base"):
        build_demo_base(trained, PROMPTS, latent_size=8, steps=1, batch_size=8, log=None)  # other settings: refused
    assert json.loads((trained / DEMO_BASE_MARKER).read_text())["steps"] == 60
    assert unet_file.stat().st_mtime_ns == stamp  # the base its students were trained on is untouched
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a base")
    with pytest.raises(DemoBaseExistsError, match="is not a demo base"):
        build_demo_base(tmp_path / "other", PROMPTS, latent_size=8, steps=1, batch_size=8, log=None)
    assert not (tmp_path / "trained.partial").exists()


def test_make_demo_uses_the_shipped_unet_which_the_pretraining_reproduces(tmp_path):
    """`make demo` loads the shipped pretrained UNet instead of spending ~80 s pretraining it: its settings are
    the demo's, and pretraining anew with them lands where the shipped weights are: bit for bit on the machine
    that made the file; on another CPU (other SIMD kernels, so other float32 rounding over 600 AdamW steps) within
    a few per cent of how far the pretraining moves the weights from their initialisation (measured on an
    AVX-512 machine against the AVX2 one that made the file: 0.6 % overall, 3.1 % for the worst tensor)."""
    from safetensors.torch import load_file

    shipped_settings = json.loads(SHIPPED_DEMO_UNET_SETTINGS.read_text())
    config = yaml.safe_load(open("configs/demo_cpu.yaml"))
    student = config["model"]["init_args"]["student_config"]
    steps = student["num_inference_steps"]
    demo_settings = dict(
        prompts=list(dict.fromkeys(config["data"]["init_args"]["train_prompts"])),
        latent_size=student["latent_size"],
        steps=build_parser().parse_args([]).base_pretrain_steps,
        timesteps=[999 - k * (1000 // steps) for k in range(steps)],
    )
    assert {key: shipped_settings[key] for key in demo_settings} == demo_settings

    build = dict(prompts=demo_settings["prompts"], latent_size=demo_settings["latent_size"], steps=demo_settings["steps"],
                 timesteps=tuple(demo_settings["timesteps"]), log=None)  # fmt: skip
    loaded = build_demo_base(tmp_path / "loaded", **build)
    assert json.loads((loaded / DEMO_BASE_MARKER).read_text()) == shipped_settings
    pretrained = build_demo_base(tmp_path / "pretrained", pretrain=True, **build)
    for file in sorted(p.relative_to(loaded) for p in loaded.rglob("*") if p.is_file()):
        if file.suffix != ".safetensors" or file.parent.name != "unet":
            assert (loaded / file).read_bytes() == (pretrained / file).read_bytes(), file
    ours = load_file(next((pretrained / "unet").glob("*.safetensors")))
    theirs = load_file(SHIPPED_DEMO_UNET)
    make_tiny_sd(tmp_path / "init", seed=shipped_settings["seed"], unet=DEMO_UNET)
    init = load_file(next((tmp_path / "init" / "unet").glob("*.safetensors")))
    assert ours.keys() == theirs.keys() == init.keys()

    def distance(a: dict, b: dict, keys) -> float:
        return float(torch.cat([(a[k].double() - b[k].double()).flatten() for k in keys]).norm())

    keys = sorted(theirs)
    assert distance(ours, theirs, keys) <= 0.05 * distance(theirs, init, keys)
    for key in keys:
        moved = distance(theirs, init, [key])
        assert distance(ours, theirs, [key]) <= 0.25 * moved + 1e-12, key


@pytest.fixture
def demo_config(tmp_path):
    config = demo_config_for_test(str(tmp_path / "base"), tmp_path / "run")
    config["trainer"].update(max_steps=2, val_check_interval=2)
    config["data"]["init_args"].update(train_prompts=PROMPTS, val_prompts=PROMPTS[:1])
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


DEMO_ARGS = ["--mesh-resolution", "20", "--num-points", "400", "--turntable-frames", "2", "--base-pretrain-steps", "5"]


def test_demo_trains_exports_measures_and_reports(demo_config, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--config", str(demo_config), "--out", str(out), *DEMO_ARGS, "--min-reduction", "-100"]) == 0
    printed = capsys.readouterr().out
    assert "OK: every prompt's Chamfer distance fell" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and report["passed"] is True
    assert [p["prompt"] for p in report["prompts"]] == PROMPTS
    for entry in report["prompts"]:
        assert 0 < entry["chamfer_before"] < 2 and 0 < entry["chamfer_after"] < 2
        assert entry["reduction"] == pytest.approx(1 - entry["chamfer_after"] / entry["chamfer_before"])
        assert entry["prompt"] in printed and f"{entry['chamfer_after']:.4f}" in printed
        assert (out / entry["file"]).stat().st_size > 0 and entry["file"].endswith(".glb")
        assert (out / entry["turntable"]).stat().st_size > 0
        assert (out / "untrained" / entry["file"]).stat().st_size > 0
    # the untrained student is saved before the first optimizer step: its weights differ from the trained ones
    from safetensors.torch import load_file

    before = load_file(out / "student_untrained" / "model.safetensors")
    after = load_file(out / "student" / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)

    # an unreachable requirement fails with exit code 1 and names the prompts
    assert main(["--config", str(demo_config), "--out", str(out), *DEMO_ARGS, "--min-reduction", "1.0"]) == 1
    printed = capsys.readouterr().out
    assert "FAILED: the Chamfer distance fell by less than 100% for: a red ball, a blue cube" in printed
    assert json.loads((out / "report.json").read_text())["passed"] is False


def test_demo_rejects_bad_input_with_one_line(demo_config, tmp_path, capsys):
    from lightning_modules.cli import main as prd

    assert prd(["demo", "--config", str(tmp_path / "missing.yaml")]) == 2  # `prd demo` = this module
    assert capsys.readouterr().err.strip().startswith("demo: error: config")
    config = yaml.safe_load(demo_config.read_text())
    config["data"]["init_args"]["train_prompts"] = ["a corgi wearing a party hat"]
    demo_config.write_text(yaml.safe_dump(config))
    assert main(["--config", str(demo_config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("demo: error: the demo measures shape prompts only:") and "\n" not in err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--mesh-resolution", "0"], "--mesh-resolution must be >= 8, got 0"),
        (["--num-points", "0"], "--num-points must be >= 1, got 0"),
        (["--base-pretrain-steps", "-1"], "--base-pretrain-steps must be >= 0, got -1"),
        (["--turntable-frames", "-1"], "--turntable-frames must be >= 1, got -1"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--out", "FILE"], "is a file, not a folder"),
    ],
)
def test_demo_checks_its_options_before_any_work(args, words, demo_config, tmp_path, capsys):
    """Out-of-range options and an --out that is a file end in one line, exit 2, before a base is built."""
    (tmp_path / "FILE").write_text("keep me")
    args = [str(tmp_path / "FILE") if a == "FILE" else a for a in args]
    assert main(["--config", str(demo_config), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("demo: error: ") and words in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "base").exists()  # nothing was built
    assert (tmp_path / "FILE").read_text() == "keep me"


@pytest.mark.parametrize(
    ("args", "words", "usage"),
    [
        (["--trainer.default_root_dir", "FILE"], "--trainer.default_root_dir", False),
        (["--trainer.logger.init_args.save_dir", "FILE/logs"], "a part of the path", False),
        (["--model.init_args.init_weights", "MISSING"], "not found", False),
        (["--data.init_args.train_prompts", "MISSING"], "not found", False),
        (["--trainer.no_such_option", "1"], "unrecognized arguments", True),
    ],
)
def test_demo_runs_the_checks_of_prd_fit_before_any_work(args, words, usage, demo_config, tmp_path, capsys):
    """`prd demo` takes `prd fit`'s command line and up-front checks (PRDCLI.check_inputs), all but the base it
    builds itself: a bad training input is one line and exit 2 before the base is built or anything trains."""
    (tmp_path / "FILE").write_text("keep me")
    args = [a.replace("FILE", str(tmp_path / "FILE")).replace("MISSING", str(tmp_path / "missing.txt")) for a in args]
    assert main(["--config", str(demo_config), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and words in last, err[-1500:]
    assert last.startswith("prd: error: " if usage else "demo: error: ") and (("usage:" in err) == usage), err[-1500:]
    assert not (tmp_path / "base").exists() and not (tmp_path / "run").exists()  # nothing built, nothing trained
    assert (tmp_path / "FILE").read_text() == "keep me"
