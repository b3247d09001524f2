"""The representation is a YAML edit: the shipped Gaussian configs differ from the mesh ones only in the
representation's entries, both parse and train a tiny step on the CPU, and PRD trains a Gaussian student's SDF and
heads through its renders."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from tests.gaussian_helpers import GAUSSIAN_STUDENT, StandInSplatter
from tests.prd_helpers import (  # noqa: F401
    PRD_WARNING_FILTERS,
    TINY_STUDENT,
    ColorTeacher,
    fit_with_cli,
    single_thread,
    tiny_module,
    write_config,
)
from tests.teacher_helpers import teacher_dirs  # noqa: F401  (fixture `dirs`)
from tests.test_prd_configs import tiny_reference_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_GAUSSIANS = {"num_gaussians": 128, "surface_resolution": 12, "mlp_neurons": 8}

pytestmark = [*PRD_WARNING_FILTERS, pytest.mark.usefixtures("single_thread")]


def leaves(tree, prefix: str = "") -> dict[str, object]:
    """"a.b.c" -> value of every leaf of a nested YAML mapping (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {key: value for name, sub in tree.items() for key, value in leaves(sub, f"{prefix}.{name}" if prefix else name).items()}


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


SHAPE = "model.init_args.teachers.init_args.teachers.shape.init_args"
# The Gaussian CPU demo keeps the schedule the mesh demo had before it was shortened (see its header).
DEMO_SCHEDULE = {
    "trainer.max_steps", "trainer.val_check_interval", "model.init_args.optimizer.init_args.lr", f"{SHAPE}.target_mesh_resolution",
}  # fmt: skip
# ... and the splats' footprint (see its header): the renderer's antialiased mode, and the shape teacher drawing its
# targets as the student's splats (target_renderer: gaussian, with the target Gaussians' settings) instead of meshes
DEMO_FOOTPRINT_CHANGED = {f"{SHAPE}.target_renderer"}
DEMO_FOOTPRINT_ADDED = {"model.init_args.renderers.gaussian.init_args.antialiased",
                        *(f"{SHAPE}.target_gaussians.{k}" for k in ("num_gaussians", "scale_factor", "antialiased"))}  # fmt: skip


@pytest.mark.parametrize(
    "mesh, gaussians, output, schedule, footprint_changed, footprint_added",
    [("triplaneturbo_v1", "triplaneturbo_v1_gaussians", "triplaneturbo_v1", set(), set(), set()),
     ("demo_cpu", "demo_cpu_gaussians", "demo_cpu", DEMO_SCHEDULE, DEMO_FOOTPRINT_CHANGED, DEMO_FOOTPRINT_ADDED)],
)  # fmt: skip
def test_the_gaussian_configs_differ_from_the_mesh_ones_only_in_the_representation(
    mesh, gaussians, output, schedule, footprint_changed, footprint_added
):
    a, b = leaves(load(mesh)), leaves(load(gaussians))
    changed = {key for key in a.keys() & b.keys() if a[key] != b[key]} - schedule - footprint_changed
    model = "model.init_args"
    only_mesh = {key for key in a if key.startswith(f"{model}.renderers.mesh.")} | {f"{model}.render_resolution.mesh"}
    if schedule:
        only_mesh |= {key for key in a if key.startswith(f"{model}.lr_scheduler.")}
    assert a.keys() - b.keys() == only_mesh
    assert b.keys() - a.keys() == {
        f"{model}.student_config.student_class", *(f"{model}.student_config.representation.{k}" for k in load(gaussians)["model"]["init_args"]["student_config"]["representation"]),
        f"{model}.renderers.gaussian.class_path", f"{model}.renderers.gaussian.init_args.backend", f"{model}.render_resolution.gaussian",
        *footprint_added,
    }  # fmt: skip
    assert changed == {f"{model}.validation.renderers", "trainer.logger.init_args.name", "trainer.callbacks"}
    assert b[f"{model}.student_config.student_class"] == GAUSSIAN_STUDENT
    assert b[f"{model}.renderers.gaussian.class_path"] == "renderers.GaussianRenderer"
    assert b[f"{model}.validation.renderers"] == ["gaussian"]
    assert b[f"{model}.render_resolution.gaussian"] == a[f"{model}.render_resolution.mesh"]
    # the run writes elsewhere, nothing else of the trainer differs
    assert b["trainer.logger.init_args.name"] == f"{output}_gaussians"
    renamed = yaml.safe_dump(load(mesh)["trainer"]["callbacks"]).replace(f"outputs/{output}/", f"outputs/{output}_gaussians/")
    assert yaml.safe_load(renamed) == load(gaussians)["trainer"]["callbacks"]


def test_the_gaussian_demo_teacher_draws_its_targets_as_the_students_splats():
    """The target Gaussians of the demo's shape teacher are the untrained student's (count, size, thickness, opacity)
    drawn by a renderer with the student renderer's filter: the same footprint, so the teacher's optimum puts the
    centres on the target surface."""
    from lightning_modules.student.gaussian_field import GaussianSettings
    from teachers.shape_teacher import ShapeTeacher

    model = load("demo_cpu_gaussians")["model"]["init_args"]
    teacher = ShapeTeacher(**model["teachers"]["init_args"]["teachers"]["shape"]["init_args"])
    student = GaussianSettings.from_dict(model["student_config"]["representation"])
    renderer = model["renderers"]["gaussian"]["init_args"]
    assert teacher.target_renderer == "gaussian"
    assert teacher.target_gaussians == dict(
        num_gaussians=student.num_gaussians, scale_factor=student.scale_factor, thickness=student.thickness,
        opacity=student.init_opacity, eps2d=renderer.get("eps2d", 0.3), antialiased=renderer["antialiased"],
    )  # fmt: skip


def tiny_demo_config(name: str, base: str, root: Path) -> dict:
    """configs/<name>.yaml with a tiny student, tiny grids and one training step, writing into `root`."""
    config = load(name)
    config["trainer"].update(max_steps=1, limit_val_batches=0, logger=False, callbacks=[], enable_progress_bar=False,
                             enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(root))  # fmt: skip
    model = config["model"]["init_args"]
    representation = model["student_config"].get("representation")
    model["student_config"] = {**TINY_STUDENT, **{k: v for k, v in model["student_config"].items() if k == "student_class"}}
    if representation is not None:
        model["student_config"]["representation"] = dict(TINY_GAUSSIANS)
    (renderer,) = model["renderers"]
    model["render_resolution"] = {renderer: 16}
    model["cameras"]["num_views"] = 2
    if renderer == "mesh":
        model["renderers"]["mesh"]["init_args"]["resolution"] = 12
    for teacher in model["teachers"]["init_args"]["teachers"].values():
        teacher["init_args"].update(target_mesh_resolution=16, resolution=16)
    model["base"] = base
    config["data"]["init_args"].update(train_prompts=["a red ball", "a blue cube"], val_prompts=[], batch_size=2)
    return config


@pytest.mark.parametrize("name", ["demo_cpu", "demo_cpu_gaussians"])
def test_both_representation_demo_configs_train_a_tiny_step(name, tiny_sd_dir, tmp_path):
    config = tiny_demo_config(name, str(tiny_sd_dir), tmp_path)
    (renderer,) = config["model"]["init_args"]["renderers"]
    cli = LightningCLI(args=["--config", str(write_config(config, tmp_path / f"{name}.yaml"))], run=False,
                       subclass_mode_model=True, subclass_mode_data=True)  # as `prd fit`
    cli.model.configure_model()
    before = {k: p.detach().clone() for k, p in cli.model.trainable_named_parameters().items()}
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 1 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert f"train/shape/{renderer}" in cli.trainer.callback_metrics
    after = cli.model.trainable_named_parameters()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("student.sdf_network.") for k in moved)
    if renderer == "gaussian":
        assert any(k.startswith("student.gaussian_geometry_head.") for k in moved)


def test_the_full_gaussian_config_trains_a_tiny_step_with_every_teacher(dirs, tmp_path):
    """configs/triplaneturbo_v1_gaussians.yaml with tiny models (its mesh twin: test_prd_configs.py)."""
    config = tiny_reference_config(dirs, tmp_path)  # the mesh config made tiny; now the same edit as the shipped file
    model = config["model"]["init_args"]
    shipped = load("triplaneturbo_v1_gaussians")["model"]["init_args"]
    model["student_config"].update(student_class=GAUSSIAN_STUDENT, representation=dict(TINY_GAUSSIANS))
    model["renderers"]["gaussian"] = copy.deepcopy(shipped["renderers"]["gaussian"])
    del model["renderers"]["mesh"]
    model["render_resolution"] = {"gaussian": 24, "volume": 16}
    model["validation"]["renderers"] = ["gaussian"]
    cli = fit_with_cli(config, tmp_path / "gaussians.yaml")
    assert cli.trainer.global_step == 1 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    for teacher in ("mvdream", "richdreamer_nd", "stable_diffusion"):
        assert {f"train/{teacher}/gaussian", f"train/{teacher}/volume"} <= set(cli.trainer.callback_metrics)


def test_prd_trains_the_sdf_and_the_heads_through_the_splats(tiny_sd_dir):
    """One PRD batch through a stand-in splatting renderer (tests/gaussian_helpers.py, SH degree 0): the teacher's
    loss on the splats reaches the SDF (through the centres), the colour MLP, the geometry head and the decoder."""
    student_config = {**TINY_STUDENT, "student_class": GAUSSIAN_STUDENT, "representation": dict(TINY_GAUSSIANS)}
    module = tiny_module(
        tiny_sd_dir, renderers={"gaussian": StandInSplatter()}, student_config=student_config, regularizers={},
        render_resolution=16, teachers={"color": ColorTeacher(coverage=0.3)}, num_steps=2,
        validation=dict(num_views=2, resolution=16, renderers=["gaussian"], log_images=0, log_meshes=0),
    )  # fmt: skip
    module.configure_model()
    with torch.no_grad():
        for p in module.student.gaussian_geometry_head.parameters():
            p.normal_(0, 0.1)  # as after some training (its zero-initialised last layer would stop the first)
    result = module.run_prd_batch({"prompts": ["a red ball", "a blue cube"], "seed": 0}, step=0,
                                  backward=lambda loss, sync: loss.backward())  # fmt: skip
    assert set(result.terms) == {"color/gaussian"} and result.nonfinite == []
    grads = {name: p.grad for name, p in module.trainable_named_parameters().items()}
    for prefix in ("sdf_network", "feature_network", "gaussian_geometry_head", "vae.decoder.conv_out"):
        reached = [g for name, g in grads.items() if name.startswith(f"student.{prefix}.") and g is not None]
        assert reached and any(float(g.abs().sum()) > 0 for g in reached), prefix
