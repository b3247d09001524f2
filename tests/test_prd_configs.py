"""The PRD configs through the `prd` CLI (LightningCLI): --print_config without loading any model, teacher
removal / replacement as a YAML edit (tiny fixture teachers, one training step each), and `prd fit` end to
end on the CPU with TensorBoard logs, checkpoints and resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from lightning_modules.cli import main
from tests.prd_helpers import PRD_WARNING_FILTERS, TINY_STUDENT, fit_with_cli, single_thread  # noqa: F401  (fixture)
from tests.teacher_helpers import MV_FIXTURE, ND_FIXTURE, teacher_dirs, unet_params, vae_factor  # noqa: F401  (fixture)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROMPTS = ["a red ball", "a blue cube", "a yellow donut", "a green cone"]

pytestmark = [*PRD_WARNING_FILTERS, pytest.mark.usefixtures("single_thread")]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any model load is an error: the student, the teachers, CLIP."""
    from lightning_modules import student
    from lightning_modules.evaluation import clip_score
    from teachers.base import Teacher

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(student.TriplaneStudent, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(Teacher, "load", refuse)
    monkeypatch.setattr(clip_score, "load_open_clip", refuse)


# Every shipped config: a moved class (class_path) or a renamed argument fails here, without loading a model.
SHIPPED_CONFIGS = sorted(path.stem for path in CONFIGS.glob("*.yaml"))


def test_the_shipped_configs_are_all_checked():
    assert {"triplaneturbo_v1", "triplaneturbo_v1_24gb", "demo_cpu"} <= set(SHIPPED_CONFIGS)


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_print_config_prints_the_full_config_without_loading_models(name, capsys, nothing_loads):
    assert main(["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--print_config"]) == 0  # jsonargparse's exit 0
    printed = yaml.safe_load(capsys.readouterr().out)
    source = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    model = printed["model"]["init_args"]
    assert printed["model"]["class_path"] == "lightning_modules.training.prd_module.PRDModule"
    # everything the file sets is there, plus every default (the full config)
    assert model["student_config"] == source["model"]["init_args"]["student_config"]
    teachers = model["teachers"]["init_args"]["teachers"]
    assert set(teachers) == set(source["model"]["init_args"]["teachers"]["init_args"]["teachers"])
    for teacher in teachers.values():
        assert {"weight", "cfg_scale", "t_min", "t_max", "objective"} <= set(teacher["init_args"])
    assert set(model["renderers"]) == {"mesh", "volume"}
    assert model["renderers"]["volume"]["init_args"]["num_proposal_samples"] > 0
    assert {"max_consecutive_skips", "gradient_clip_val", "lr_scheduler"} <= set(model)
    assert model["cameras"]["elevation_range"] == [0.0, 30.0]
    assert printed["trainer"]["max_steps"] == source["trainer"]["max_steps"]
    assert printed["data"]["init_args"]["batch_size"] == source["data"]["init_args"]["batch_size"]
    if name.startswith("triplaneturbo"):
        assert printed["trainer"]["plugins"] == [{"class_path": "lightning_modules.training.checkpoint_io.AtomicCheckpointIO"}]


def test_reference_config_holds_the_reference_hyper_parameters():
    config = yaml.safe_load((CONFIGS / "triplaneturbo_v1.yaml").read_text())
    model = config["model"]["init_args"]
    teachers = model["teachers"]["init_args"]["teachers"]
    assert set(teachers) == {"mvdream", "richdreamer_nd", "stable_diffusion"}
    assert teachers["mvdream"]["init_args"]["cfg_scale"] == [0, 20.0, 10.0, 20000]
    assert teachers["richdreamer_nd"]["init_args"]["plus_ratio"] == 0.1
    assert teachers["stable_diffusion"]["init_args"]["cfg_scale"] == 7.5
    assert all(t["init_args"]["t_min"] == [0, 0.5, 0.02, 20000] for t in teachers.values())
    assert model["optimizer"] == {
        "class_path": "pytorch_optimizer.Adan",
        "init_args": {"lr": 2.0e-4, "betas": [0.98, 0.92, 0.99], "eps": 1.0e-15, "weight_decay": 0.0},
    }
    assert model["render_resolution"] == {"mesh": 512, "volume": 128}
    assert model["renderers"]["mesh"]["init_args"]["resolution"] == 128
    assert model["regularizers"] == {"volume/eikonal": [0, 1.0, 0.0, 20000], "volume/sparsity": [0, 1.0, 0.0, 20000]}
    assert config["data"]["init_args"]["batch_size"] == 2 and model["cameras"]["num_views"] == 4
    assert config["trainer"]["max_steps"] == 15000 and config["trainer"]["devices"] == 8
    assert config["trainer"]["precision"] == "32-true"


# ------------------------------------------------------------------------------------ tiny variants


def tiny_reference_config(dirs: dict, root: Path) -> dict:
    """configs/triplaneturbo_v1.yaml with every model made tiny (fixture teachers), for the CPU."""
    config = yaml.safe_load((CONFIGS / "triplaneturbo_v1.yaml").read_text())
    config["trainer"].update(
        accelerator="cpu", devices=1, strategy="auto", max_steps=1, logger=False, callbacks=[], default_root_dir=str(root),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    model = config["model"]["init_args"]
    model.update(
        base=dirs["sd"], student_config=dict(TINY_STUDENT), render_resolution={"mesh": 24, "volume": 16}, clip_score=None,
        num_steps=2,  # 2 PRD steps per batch are enough to show the teachers at work (the loop is tested elsewhere)
    )  # fmt: skip
    model["cameras"]["num_views"] = 4  # the multi-view fixture UNets take 4 frames
    model["background"]["init_args"].update(text_dim=32, hidden_dim=8)
    model["renderers"]["mesh"]["init_args"].update(resolution=12, backend="torch")
    model["renderers"]["volume"]["init_args"].update(num_proposal_samples=12, num_importance_samples=6, global_downsample=2, patch_size=8)
    teachers = model["teachers"]["init_args"]["teachers"]
    common = {"prompt_cache_dir": dirs["cache"], "text_encoder_device": "cpu"}
    teachers["mvdream"]["init_args"].update(
        ckpt_path=str(MV_FIXTURE / "model.ckpt"), config_path=str(MV_FIXTURE / "config.yaml"), hub_id=None,
        vae=dirs["mv"], text_encoder=dirs["mv"], resolution=unet_params(MV_FIXTURE)["image_size"] * vae_factor(dirs["mv"]),
        **common,
    )  # fmt: skip
    teachers["richdreamer_nd"]["init_args"].update(
        ckpt_path=str(ND_FIXTURE / "model.ckpt"), config_path=str(ND_FIXTURE / "config.yaml"), text_encoder=dirs["nd"],
        resolution=unet_params(ND_FIXTURE)["image_size"], **common,
    )  # fmt: skip
    teachers["stable_diffusion"]["init_args"].update(pretrained=dirs["sd"], resolution=16, **common)
    config["data"]["init_args"].update(train_prompts=PROMPTS[:2], val_prompts=[], test_prompts=[])
    return config


def test_teachers_are_removed_or_replaced_by_editing_the_yaml(dirs, tmp_path):
    config = tiny_reference_config(dirs, tmp_path)
    cli = fit_with_cli(config, tmp_path / "all.yaml")
    assert cli.trainer.global_step == 1
    assert type(cli.trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"  # trainer.plugins
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer).__name__ == "Adan" and optimizer.defaults["eps"] == 1e-15
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in cli.model.trainable_parameters()}
    logged = set(cli.trainer.callback_metrics)
    for teacher in ("mvdream", "richdreamer_nd", "stable_diffusion"):
        assert {f"train/{teacher}/mesh", f"train/{teacher}/volume"} <= logged
        assert cli.model.teachers.teachers[teacher].is_loaded
    assert {"train/reg/volume/eikonal", "train/reg/volume/sparsity"} <= logged
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])

    removed = copy.deepcopy(config)
    # the plain mapping form (name -> teacher) works as well as the TeacherEnsemble form
    removed["model"]["init_args"]["teachers"] = removed["model"]["init_args"]["teachers"]["init_args"]["teachers"]
    del removed["model"]["init_args"]["teachers"]["stable_diffusion"]
    cli = fit_with_cli(removed, tmp_path / "removed.yaml")
    assert set(cli.model.teachers.teachers) == {"mvdream", "richdreamer_nd"}
    assert not any(k.startswith("train/stable_diffusion") for k in cli.trainer.callback_metrics)
    assert cli.trainer.global_step == 1

    swapped = copy.deepcopy(config)
    teachers = swapped["model"]["init_args"]["teachers"]["init_args"]["teachers"]
    teachers["richdreamer_nd"] = {"class_path": "tests.prd_helpers.ColorTeacher", "init_args": {"coverage": 0.3}}
    del teachers["mvdream"]
    swapped["model"]["init_args"]["optimizer"] = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}
    cli = fit_with_cli(swapped, tmp_path / "swapped.yaml")
    assert type(cli.trainer.optimizers[0]).__name__ == "AdamW"
    assert type(cli.model.teachers.teachers["richdreamer_nd"]).__name__ == "ColorTeacher"
    assert {"train/richdreamer_nd/mesh", "train/stable_diffusion/volume"} <= set(cli.trainer.callback_metrics)
    assert cli.trainer.global_step == 1


# ------------------------------------------------------------------------------------------ prd fit


def _scalars(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], set[str], set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images, tensors = {}, set(), set()
    for event_file in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(event_file), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
        images |= set(accumulator.Tags()["images"])
        tensors |= set(accumulator.Tags()["tensors"])
    return scalars, images, tensors


def demo_config_for_test(base: str, root: Path) -> dict:
    """configs/demo_cpu.yaml, smaller (fewer steps, smaller grids), writing into `root`."""
    config = yaml.safe_load((CONFIGS / "demo_cpu.yaml").read_text())
    config["trainer"].update(max_steps=3, val_check_interval=2, log_every_n_steps=1, enable_progress_bar=False)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(root / "logs")
    config["trainer"]["callbacks"][0]["init_args"].update(dirpath=str(root / "checkpoints"), every_n_train_steps=1)
    model = config["model"]["init_args"]
    model.update(base=base, student_config=dict(TINY_STUDENT), render_resolution={"mesh": 24, "volume": 16})
    model["cameras"]["num_views"] = 2
    model["renderers"]["mesh"]["init_args"]["resolution"] = 12
    model["renderers"]["volume"]["init_args"].update(num_proposal_samples=12, num_importance_samples=6, patch_size=8)
    for teacher in model["teachers"]["init_args"]["teachers"].values():
        if "target_mesh_resolution" in teacher.get("init_args", {}):
            teacher["init_args"].update(target_mesh_resolution=16, resolution=16)
    model["validation"].update(num_views=2, resolution=24, log_images=1, log_meshes=1, mesh_resolution=12)
    config["data"]["init_args"].update(train_prompts=PROMPTS, val_prompts=PROMPTS[:1], batch_size=2, eval_batch_size=1)
    return config


def test_prd_fit_end_to_end_with_logs_checkpoints_and_resume(tiny_sd_dir, tmp_path):
    config = demo_config_for_test(str(tiny_sd_dir), tmp_path)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    checkpoints = tmp_path / "checkpoints"

    assert main(["fit", "--config", str(path)]) == 0
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 3
    assert all(k.startswith("student.") for k in last["state_dict"])
    scalars, images, tensors = _scalars(tmp_path / "logs")
    assert [step for step, _ in scalars["train/loss"]] == [0, 1, 2]  # logged every optimizer step
    teacher_keys = {k for k in scalars if k.startswith("train/shape/")}
    assert teacher_keys == {"train/shape/mesh", "train/shape/volume"}
    assert {"time/student", "time/render", "time/teacher", "time/backward", "train/lr", "train/nonfinite_skips"} <= set(scalars)
    assert {"train/stats/shape/grad_norm", "train/stats/shape/t_mean", "train/stats/shape/target_mse"} <= set(scalars)
    assert {"val/shape/mesh", "val/teacher_loss"} <= set(scalars)  # validation at batch 2
    assert any(tag.startswith("val_render_mesh/") for tag in images)
    assert any(tag.startswith("val_meshes/") and tag.endswith("_VERTEX") for tag in tensors)

    # the checkpoint carries the CLI config: the module rebuilds from it alone
    from lightning_modules.training.prd_module import PRDModule

    restored = PRDModule.load_from_checkpoint(checkpoints / "last.ckpt", map_location="cpu")
    assert type(restored.teachers.teachers["shape"]).__name__ == "ShapeTeacher"
    assert all(torch.equal(p, last["state_dict"][k]) for k, p in restored.trainable_named_parameters().items())

    # resume from last.ckpt ("last"), then from an explicit file: the run continues where it stopped
    assert main(["fit", "--config", str(path), "--ckpt_path", "last", "--trainer.max_steps", "4"]) == 0
    resumed = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 4
    assert resumed["PromptDataModule"] == {"epoch": 2, "batches_consumed": 0, "layout": resumed["PromptDataModule"]["layout"]}
    assert any(not torch.equal(resumed["state_dict"][k], last["state_dict"][k]) for k in last["state_dict"])
    explicit = checkpoints / "resume_from.ckpt"
    explicit.write_bytes((checkpoints / "last.ckpt").read_bytes())
    assert main(["fit", "--config", str(path), "--ckpt_path", str(explicit), "--trainer.max_steps", "5"]) == 0
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 5


def test_checkpoint_of_another_student_is_a_one_line_error(tiny_sd_dir, tmp_path, capsys):
    config = demo_config_for_test(str(tiny_sd_dir), tmp_path)
    config["trainer"].update(max_steps=1, limit_val_batches=0)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) == 0
    # the same run with wider MLPs cannot take these weights: one line, exit code 2
    config["model"]["init_args"]["student_config"]["mlp_neurons"] = 24
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    code = main(["fit", "--config", str(path), "--ckpt_path", "last", "--trainer.max_steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    # refused before the model loads, naming the setting (checkpoints.hparam_differences)
    assert err[-1].startswith("prd: error: --ckpt_path last") and "student_config.mlp_neurons: 16 in the checkpoint, 24 now" in err[-1]
