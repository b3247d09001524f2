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
    # the run's checkpoint names the base it was trained on, and `prd generate --weights` reads its student
    # (the demo's, not the full-size defaults) and finds that base without --base
    assert full["prd"]["student_config"]["base_model_name_or_path"] == str(Path(demo_base).resolve())
    gen = tmp_path / "full" / "generated"
    assert main(["generate", "a large red ball", "--weights", str(tmp_path / "full" / "checkpoints" / "last.ckpt"),
                 "--out", str(gen), "--resolution", "16", "--no-progress"]) == 0
    assert len(list(gen.glob("*.glb"))) == 1


def _capture_fit(monkeypatch) -> list:
    """Replace Trainer.fit by a recorder of (model, ckpt_path): what `prd fit` would train, without training."""
    import lightning.pytorch as pl

    calls = []
    monkeypatch.setattr(pl.Trainer, "fit", lambda self, model, datamodule=None, ckpt_path=None, **kw: calls.append((model, ckpt_path)))
    return calls


def test_resumed_fit_refuses_structural_changes_and_takes_the_rest_from_the_checkpoint(
    tiny_sd_dir, tmp_path, monkeypatch, capsys, caplog
):
    calls = _capture_fit(monkeypatch)
    config = _demo_config(tiny_sd_dir, tmp_path / "run")
    assert main(["fit", "--config", str(config)]) == 0
    hparams = dict(calls[0][0].hparams)
    assert hparams["student_config"]["output_dim"] == 16 and hparams["gradient_clip_val"] == 1.0
    # a checkpoint with the run's hyper-parameters, where `--ckpt_path last` finds it (fit is a recorder: no
    # weights load, so the checkpoint needs no more)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "hyper_parameters": hparams, "global_step": 1}, last)

    for ckpt_path in ("last", str(last)):  # the checkpoint named either way
        calls.clear()
        capsys.readouterr()
        code = main(["fit", "--config", str(config), "--ckpt_path", ckpt_path,
                     "--model.init_args.student_config.output_dim", "8"])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and not calls, ckpt_path
        assert err[-1].startswith("prd: error: --ckpt_path") and "model.student_config.output_dim: 16 in the checkpoint, 8 now" in err[-1]
        if ckpt_path == "last":
            continue  # the rest does not depend on how the checkpoint was named: the file as in the issue

        caplog.clear()
        with caplog.at_level("INFO"):
            code = main(["fit", "--config", str(config), "--ckpt_path", ckpt_path, "--model.init_args.gradient_clip_val",
                         "0.25", "--model.init_args.optimizer.init_args.lr", "0.5"])  # fmt: skip
        assert code == 0 and len(calls) == 1, ckpt_path
        model, passed = calls[0]
        config_lr = hparams["optimizer"]["init_args"]["lr"]  # the shipped config's, kept by the checkpoint
        assert config_lr != 0.5
        assert model.gradient_clip_val == 1.0 and model.hparams["optimizer"]["init_args"]["lr"] == config_lr
        assert passed == ckpt_path
        notices = [m for m in caplog.messages if m.startswith("resume: ")]
        assert notices == [
            "resume: model.gradient_clip_val = 1.0 from the checkpoint (this run's config: 0.25)",
            f"resume: model.optimizer.init_args.lr = {config_lr} from the checkpoint (this run's config: 0.5)",
        ], (ckpt_path, notices)


def test_checkpoints_written_before_the_fix_are_mended_when_loaded():
    """The loop state of a `last.ckpt` written when training stopped at an epoch end (the state the issue's
    resume started from); a mid-epoch stop cannot be told from a limit_train_batches epoch end without the
    trainer, so it is left alone when loading (saving mends it, with the trainer's batches per epoch)."""
    from lightning_modules.training.checkpoints import mend_loop_state

    def checkpoint(batches_done: int, last: bool) -> dict:
        done = {"ready": 1, "started": 1, "processed": 1, "completed": 1}
        current = dict.fromkeys(done, batches_done)
        return {"epoch": 1, "loops": {"fit_loop": {
            "epoch_progress": {"total": dict(done), "current": dict(done)},
            "epoch_loop.batch_progress": {"total": dict.fromkeys(done, 2), "current": current, "is_last_batch": last},
        }}}  # fmt: skip

    ended = checkpoint(2, True)
    assert mend_loop_state(ended) == "epoch end"
    batches = ended["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert batches["current"] == dict.fromkeys(("ready", "started", "processed", "completed"), 0)
    assert not batches["is_last_batch"] and batches["total"]["ready"] == 2 and mend_loop_state(ended) is None

    stopped = checkpoint(1, False)
    assert mend_loop_state(stopped) is None  # loading: ambiguous
    assert mend_loop_state(stopped, batches_per_epoch=2) == "mid-epoch"  # saving: the trainer knows
    epochs = stopped["loops"]["fit_loop"]["epoch_progress"]["current"]
    assert (epochs["started"], epochs["processed"], epochs["completed"], stopped["epoch"]) == (1, 0, 0, 0)
