"""`prd demo --representation gaussians`: the CPU demo trains the Gaussian student (configs/demo_cpu_gaussians.yaml)
and measures the Chamfer distance of the exported Gaussians' centres; shrunk here to 2 steps (the full run's
figures are in the README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lightning_modules.demo.cpu_demo import REPRESENTATIONS, build_parser, main
from tests.prd_helpers import PRD_WARNING_FILTERS, TINY_STUDENT, single_thread  # noqa: F401  (fixture)

pytestmark = [*PRD_WARNING_FILTERS, pytest.mark.usefixtures("single_thread")]

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROMPTS = ["a red ball", "a blue cube"]


def test_the_representation_option_picks_the_config_and_the_output_folder():
    assert REPRESENTATIONS == {
        "mesh": ("configs/demo_cpu.yaml", "outputs/demo"),
        "gaussians": ("configs/demo_cpu_gaussians.yaml", "outputs/demo_gaussians"),
    }
    assert all((CONFIGS.parent / config).is_file() for config, _ in REPRESENTATIONS.values())
    assert build_parser().parse_known_args([])[0].representation == "mesh"  # `make demo` is unchanged
    with pytest.raises(SystemExit):
        build_parser().parse_known_args(["--representation", "voxels"])


def shrunk_gaussian_demo_config(base: Path, root: Path) -> dict:
    """configs/demo_cpu_gaussians.yaml with 2 steps, a tiny student, 128 Gaussians and 16 px renders."""
    config = yaml.safe_load((CONFIGS / "demo_cpu_gaussians.yaml").read_text())
    config["trainer"].update(max_steps=2, val_check_interval=2, log_every_n_steps=1, enable_progress_bar=False)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(root / "logs")
    config["trainer"]["callbacks"][0]["init_args"].update(dirpath=str(root / "checkpoints"))
    model = config["model"]["init_args"]
    student = model["student_config"]
    model["student_config"] = dict(TINY_STUDENT, student_class=student["student_class"],
                                   representation={"num_gaussians": 128, "surface_resolution": 12, "mlp_neurons": 8})  # fmt: skip
    model.update(base=str(base), render_resolution={"gaussian": 16})
    model["cameras"]["num_views"] = 2
    model["teachers"]["init_args"]["teachers"]["shape"]["init_args"].update(target_mesh_resolution=16, resolution=16)
    model["validation"].update(num_views=2, resolution=16, log_images=1, log_meshes=1, mesh_resolution=12)
    config["data"]["init_args"].update(train_prompts=PROMPTS, val_prompts=PROMPTS[:1], batch_size=2, eval_batch_size=1)
    return config


def test_the_gaussian_demo_trains_exports_ply_and_glb_and_measures_the_centres(tmp_path, capsys):
    path = tmp_path / "demo_gaussians.yaml"
    path.write_text(yaml.safe_dump(shrunk_gaussian_demo_config(tmp_path / "base", tmp_path / "run")))
    out = tmp_path / "out"
    args = ["--mesh-resolution", "20", "--turntable-frames", "2", "--base-pretrain-steps", "5", "--min-reduction", "-100"]
    assert main(["--representation", "gaussians", "--config", str(path), "--out", str(out), *args]) == 0
    printed = capsys.readouterr().out
    assert "Chamfer distance of each exported object's Gaussian centres" in printed and "OK: every prompt" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["measured"] == "gaussian centres" and report["steps"] == 2
    for entry in report["prompts"]:
        assert 0 < entry["chamfer_before"] < 2 and 0 < entry["chamfer_after"] < 2
        for folder in (out, out / "untrained"):
            assert (folder / entry["file"]).stat().st_size > 0 and entry["file"].endswith(".glb")  # the SDF's mesh
            assert (folder / entry["gaussians_file"]).stat().st_size > 128 * 14 * 4  # 128 Gaussians, 14 floats each
