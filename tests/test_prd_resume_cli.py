"""Exact resume on the path users run: the shipped `configs/demo_cpu.yaml` through `prd fit` (the `prd` entry point,
LightningCLI, the config file, `--ckpt_path last`), only its output folders and `max_steps` changed, on a tiny demo
base. N steps in one run and a run stopped after k steps then resumed with `--ckpt_path last` must end with
identical (`torch.equal`) trainable weights, optimizer state, counters and data position: stopped at an epoch end
and mid-epoch. The demo config writes `last.ckpt` only every 50 steps and when training ends, so these
checkpoints are the ones Lightning writes in `on_train_end` (see `checkpoints.mend_loop_state`), not the per-step
ones of tests/test_prd_resume.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lightning_modules.cli import main
from lightning_modules.demo.tiny_models import build_demo_base
from tests.prd_helpers import PRD_WARNING_FILTERS, differences, load_checkpoint, read_batches, training_state
from tests.threads import single_thread  # noqa: F401  (fixture)

pytestmark = [*PRD_WARNING_FILTERS, pytest.mark.usefixtures("single_thread")]

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml"
STEPS = 3  # the demo's 4 prompts in batches of 2: 2 batches per epoch


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory):
    prompts = yaml.safe_load(DEMO_CONFIG.read_text())["data"]["init_args"]["train_prompts"]
    return build_demo_base(tmp_path_factory.mktemp("demo_base"), prompts, steps=2, log=None)


def _demo_config(base: Path, root: Path, callbacks: list[dict] = ()) -> Path:
    """The shipped demo config with its outputs under `root` and the tiny base; nothing else changed (a
    `BatchRecorder` and `callbacks` are added)."""
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(root / "logs")
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(root / "checkpoints")
    config["trainer"]["callbacks"] += [
        {"class_path": "tests.prd_helpers.BatchRecorder", "init_args": {"path": str(root / "batches.jsonl")}},
        *callbacks,
    ]
    config["trainer"]["enable_progress_bar"] = False
    config["model"]["init_args"]["base"] = str(base)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "demo_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _prd_fit(config: Path, steps: int, *args: str) -> dict:
    assert main(["fit", "--config", str(config), "--trainer.max_steps", str(steps), *args]) == 0
    return load_checkpoint(config.parent / "checkpoints" / "last.ckpt")


def _schedule(root: Path) -> list[tuple]:
    return [(r["epoch"], r["batch_idx"], r["seed"], tuple(r["prompts"])) for r in read_batches(root / "batches.jsonl")]


def _same_training_moment(a: dict, b: dict) -> list[str]:
    """Weights, optimizer state, data position and PRD counters (not Lightning's loop bookkeeping, which differs
    between a checkpoint written after a batch and one written when training ended)."""
    keys = ("global_step", "state_dict", "optimizer_states", "lr_schedulers", "PromptDataModule", "prd")
    return differences({k: a[k] for k in keys}, {k: b[k] for k in keys})


def test_demo_config_resumed_with_ckpt_path_last_equals_the_uninterrupted_run(demo_base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory either
    at_2 = {"class_path": "tests.prd_helpers.SaveCheckpointAtBatches", "init_args": {"dirpath": str(tmp_path / "full"), "batches": [2]}}
    full = _prd_fit(_demo_config(demo_base, tmp_path / "full", [at_2]), STEPS)
    assert full["global_step"] == STEPS and full["epoch"] == 1
    assert [(e, b) for e, b, *_ in _schedule(tmp_path / "full")] == [(0, 0), (0, 1), (1, 0)]

    # 1 step (stops mid-epoch 0), resumed to 2 (ends at the end of epoch 0), resumed to 3: `last.ckpt` is the
    # one ModelCheckpoint writes when training ends, once mid-epoch and once at an epoch end
    config = _demo_config(demo_base, tmp_path / "split")
    first = _prd_fit(config, 1)
    assert first["global_step"] == 1
    assert any(not torch.equal(first["state_dict"][k], v) for k, v in full["state_dict"].items())
    second = _prd_fit(config, 2, "--ckpt_path", "last")  # resumed mid-epoch
    problems = _same_training_moment(second, load_checkpoint(tmp_path / "full" / "batch=2.ckpt"))
    assert not problems, problems[:5]
    assert second["epoch"] == 1 and second["PromptDataModule"]["epoch"] == 1  # the epoch count did not run ahead
    last = _prd_fit(config, STEPS, "--ckpt_path", "last")  # resumed at an epoch end
    for key, value in full["state_dict"].items():
        assert torch.equal(last["state_dict"][key], value), key
    problems = differences(training_state(last), training_state(full))
    assert not problems, problems[:5]
    assert _schedule(tmp_path / "split") == _schedule(tmp_path / "full")  # the same batches, prompts and seeds
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "split"]
