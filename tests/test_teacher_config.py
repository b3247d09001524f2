"""Teachers combined by configuration: YAML (jsonargparse / LightningCLI, class_path), weights as
schedules, and the acceptance check: all three teacher types on tiny models, forward + backward
through render-shaped tensors on the CPU."""

import lightning.pytorch as pl
import pytest
import torch
from jsonargparse import ArgumentParser

from renderers.types import RenderOutput
from teachers.ensemble import TeacherEnsemble, total_loss
from teachers.mvdream import MVDreamTeacher
from teachers.richdreamer import RichDreamerNormalDepthTeacher
from teachers.stable_diffusion import StableDiffusionTeacher
from tests.teacher_helpers import (  # noqa: F401  (teacher_dirs: the `dirs` fixture)
    MV_FIXTURE,
    ND_FIXTURE,
    make_cameras,
    teacher_dirs,
    unet_params,
    vae_factor,
)

PROMPTS = ["a red chair", "a glass owl"]


def sd_yaml(dirs, name="sd", weight="1.0"):
    return f"""
    {name}:
      class_path: teachers.stable_diffusion.StableDiffusionTeacher
      init_args:
        pretrained: {dirs["sd"]}
        resolution: 16
        cfg_scale: 7.5
        weight: {weight}
        prompt_cache_dir: {dirs["cache"]}
        text_encoder_device: cpu"""


def mv_yaml(dirs, weight="1.0"):
    resolution = unet_params(MV_FIXTURE)["image_size"] * vae_factor(dirs["mv"])
    return f"""
    mvdream:
      class_path: teachers.mvdream.MVDreamTeacher
      init_args:
        ckpt_path: {MV_FIXTURE / "model.ckpt"}
        config_path: {MV_FIXTURE / "config.yaml"}
        hub_id: null
        vae: {dirs["mv"]}
        text_encoder: {dirs["mv"]}
        resolution: {resolution}
        cfg_scale: [0, 20.0, 10.0, 20000]
        weight: {weight}
        prompt_cache_dir: {dirs["cache"]}
        text_encoder_device: cpu"""


def nd_yaml(dirs, weight="1.0"):
    return f"""
    richdreamer:
      class_path: teachers.richdreamer.RichDreamerNormalDepthTeacher
      init_args:
        ckpt_path: {ND_FIXTURE / "model.ckpt"}
        config_path: {ND_FIXTURE / "config.yaml"}
        text_encoder: {dirs["nd"]}
        resolution: {unet_params(ND_FIXTURE)["image_size"]}
        objective: asd
        plus_ratio: 0.1
        map_to_minus_one_one: true
        weight: {weight}
        prompt_cache_dir: {dirs["cache"]}
        text_encoder_device: cpu"""


def parse_ensemble(yaml_text: str) -> TeacherEnsemble:
    parser = ArgumentParser()
    parser.add_argument("--teachers", type=TeacherEnsemble)
    config = parser.parse_string(yaml_text)
    return parser.instantiate(config).teachers


def ensemble_yaml(*entries: str) -> str:
    body = "".join(entries).replace("\n", "\n  ")  # entries sit under init_args.teachers
    return "teachers:\n  class_path: teachers.ensemble.TeacherEnsemble\n  init_args:\n    teachers:" + body


def test_yaml_lists_any_subset_and_editing_it_swaps_or_removes_teachers(dirs):
    ensemble = parse_ensemble(
        ensemble_yaml(sd_yaml(dirs, weight="[0, 1.0, 0.0, 100]"), nd_yaml(dirs, weight="0.5"))
    )
    assert list(ensemble.teachers) == ["sd", "richdreamer"]
    sd, nd = ensemble.teachers["sd"], ensemble.teachers["richdreamer"]
    assert isinstance(sd, StableDiffusionTeacher) and isinstance(nd, RichDreamerNormalDepthTeacher)
    assert sd.name == "sd" and sd.resolution == 16 and sd.objective.cfg_scale(0) == 7.5
    assert ensemble.weights(50) == pytest.approx({"sd": 0.5, "richdreamer": 0.5})
    assert nd.objective.objective == "asd" and nd.objective.plus_ratio == 0.1 and nd.map_to_minus_one_one
    assert nd.objective.cfg_scale(0) == 20.0 and nd.objective.t_min(20000) == pytest.approx(0.02)  # defaults

    removed = parse_ensemble(ensemble_yaml(nd_yaml(dirs)))
    assert list(removed.teachers) == ["richdreamer"]
    swapped = parse_ensemble(ensemble_yaml(sd_yaml(dirs), mv_yaml(dirs)))
    assert isinstance(swapped.teachers["mvdream"], MVDreamTeacher)
    assert swapped.teachers["mvdream"].objective.cfg_scale(10000) == pytest.approx(15.0)
    assert not any(t.is_loaded for t in (sd, nd))  # parsing never loads weights


def test_list_form_names_teachers_by_their_names(dirs):
    ensemble = parse_ensemble(
        "teachers:\n  class_path: teachers.ensemble.TeacherEnsemble\n  init_args:\n    teachers:\n"
        f"      - class_path: teachers.stable_diffusion.StableDiffusionTeacher\n        init_args: {{pretrained: {dirs['sd']}}}\n"
        f"      - class_path: teachers.stable_diffusion.StableDiffusionTeacher\n        init_args: {{pretrained: {dirs['sd']}}}\n"
    )
    assert list(ensemble.teachers) == ["stable_diffusion", "stable_diffusion_2"]


class ToyDistillation(pl.LightningModule):
    def __init__(self, teachers: TeacherEnsemble, lr: float = 1e-3):
        super().__init__()
        self.student = torch.nn.Linear(2, 2)
        self.teachers = teachers


def test_lightning_cli_config_and_checkpoint_without_teacher_weights(dirs, tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n  class_path: tests.test_teacher_config.ToyDistillation\n  init_args:\n"
        + "\n".join("    " + line for line in ensemble_yaml(sd_yaml(dirs), nd_yaml(dirs)).splitlines())
        + "\n"
    )
    cli = LightningCLI(
        pl.LightningModule,
        subclass_mode_model=True,
        run=False,
        args=["--config", str(config)],
        trainer_defaults={"logger": False, "enable_checkpointing": False},
        save_config_kwargs={"overwrite": True},
    )
    module = cli.model
    assert set(module.teachers.teachers) == {"sd", "richdreamer"}
    module.teachers(_render(), PROMPTS, 0)  # loads every teacher's weights
    assert all(t.is_loaded for t in module.teachers.teachers.values())
    assert set(module.state_dict()) == {"student.weight", "student.bias"}
    torch.save(module.state_dict(), tmp_path / "ckpt.pt")
    assert (tmp_path / "ckpt.pt").stat().st_size < 10_000


def _render(seed=0, renderer="mesh", size=12):
    """Render-shaped images derived from ONE leaf tensor, so a gradient reaching it is the proof."""
    g = torch.Generator().manual_seed(seed)
    scene = torch.rand(2, 4, 7, size, size, generator=g).requires_grad_(True)
    images = {
        "rgb": scene[:, :, :3].sigmoid(),
        "normal": scene[:, :, 3:6],
        "disparity": scene[:, :, 6:].clamp(0, 1),
    }
    render = RenderOutput(images, make_cameras(2, 4, size, size, seed), renderer)
    render.scene = scene
    return render


def test_all_three_teachers_forward_and_backward_through_a_render(dirs):
    ensemble = parse_ensemble(
        ensemble_yaml(sd_yaml(dirs), mv_yaml(dirs, weight="[0, 0.0, 1.0, 100]"), nd_yaml(dirs))
    )
    render = _render()
    losses = ensemble(render, PROMPTS, step=0, generator=torch.Generator().manual_seed(0))
    assert set(losses) == {"sd", "richdreamer"}  # MVDream's weight is 0 at step 0: not even loaded
    assert not ensemble.teachers["mvdream"].is_loaded

    mesh, volume = _render(1, "mesh"), _render(2, "volume", size=10)
    losses = ensemble([mesh, volume], PROMPTS, step=100, generator=torch.Generator().manual_seed(1))
    assert set(losses) == {f"{t}/{r}" for t in ("sd", "mvdream", "richdreamer") for r in ("mesh", "volume")}
    assert ensemble.last_weights == {"sd": 1.0, "mvdream": 1.0, "richdreamer": 1.0}
    for loss in losses.values():
        assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    total = total_loss(losses)
    torch.testing.assert_close(total, total_loss(losses, "mesh") + total_loss(losses, "volume"))
    total.backward()
    for render in (mesh, volume):
        grad = render.scene.grad
        assert torch.isfinite(grad).all()
        assert grad[:, :, :3].abs().sum() > 0  # rgb: SD + MVDream
        assert grad[:, :, 3:].abs().sum() > 0  # normal + disparity: RichDreamer
        assert (grad[:, :, :3].flatten(2).abs().sum(-1) > 0).all()  # MVDream reaches every view
