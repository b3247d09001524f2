"""Runs killed with SIGKILL: checkpoint files are written atomically (a kill in the middle of a write leaves the
previous checkpoint intact, where a plain write leaves a corrupt file), Lightning's own writer is not atomic when
its temporary directory is on another file system, and a `prd fit` run killed again and again (right after a
checkpoint write begins, or at random moments) resumes with `--ckpt_path last` each time, from the saved step
with the batches the uninterrupted run took, and ends with the uninterrupted run's weights and optimizer state."""

from __future__ import annotations

import errno
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_modules.training.checkpoint_io import AtomicCheckpointIO, temporary_files
from tests.prd_helpers import (
    PRD_WARNING_FILTERS,
    differences,
    fit_with_cli,
    load_checkpoint,
    read_batches,
    single_thread,  # noqa: F401  (fixture)
    subprocess_env,
    tiny_cli_config,
    training_state,
    write_config,
    xdist_group,
)

pytestmark = [*PRD_WARNING_FILTERS, *xdist_group("prd_processes"), pytest.mark.usefixtures("single_thread")]

REPO = Path(__file__).resolve().parents[1]

# The child writes version 1 (small), then version 2 (BIG_MIB MiB, long enough to be killed in the middle).
BIG_MIB = 128
WRITER = """
import sys, time, torch
from lightning_modules.training.checkpoint_io import AtomicCheckpointIO
target, mode = sys.argv[1], sys.argv[2]
AtomicCheckpointIO().save_checkpoint({"version": 1, "weights": torch.arange(1000.0)}, target)
print("saved 1", flush=True)
big = {"version": 2, "weights": torch.ones(int(sys.argv[3]) * 2**18)}
if mode == "atomic":
    AtomicCheckpointIO().save_checkpoint(big, target)
else:
    torch.save(big, target)
print("saved 2", flush=True)
time.sleep(60)
"""


def _kill_during_write(target: Path, mode: str) -> None:
    """Start the writer child and SIGKILL it as soon as the second write has put bytes on disk."""
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target), mode, str(BIG_MIB)],
        env=subprocess_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "saved 1"
        original = target.stat()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if mode == "atomic":
                written = any(p.stat().st_size > 0 for p in temporary_files(target) if p.exists())
            else:
                now = target.stat()
                written = now.st_mtime_ns != original.st_mtime_ns and 0 < now.st_size
            if written:
                break
            time.sleep(0.001)
        else:
            raise AssertionError("the second write never started")
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("mode", ["atomic", "plain torch.save"])
def test_sigkill_in_the_middle_of_a_checkpoint_write(tmp_path, mode):
    target = tmp_path / "checkpoints" / "last.ckpt"
    _kill_during_write(target, mode)
    if mode == "atomic":
        left = temporary_files(target)
        assert len(left) == 1 and 0 < left[0].stat().st_size < BIG_MIB * 2**20  # killed mid-write, provably
        assert load_checkpoint(target)["version"] == 1  # the previous checkpoint is intact
        AtomicCheckpointIO().save_checkpoint({"version": 3}, target)  # the next save clears the debris
        assert temporary_files(target) == [] and load_checkpoint(target)["version"] == 3
        assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    else:  # the same kill against a plain write: the harness does hit the write, and the file is lost
        assert target.stat().st_size < BIG_MIB * 2**20
        with pytest.raises(Exception):  # noqa: B017  (a truncated zip: the error type is torch's business)
            load_checkpoint(target)


def test_lightning_default_writer_is_not_atomic_across_file_systems(tmp_path, monkeypatch):
    """Why AtomicCheckpointIO exists: Lightning 2.6 stages a checkpoint in the SYSTEM temp directory and moves it
    into place; when that directory is on another file system (node-local /tmp, checkpoints on a shared file
    system) the move is a copy into last.ckpt, and a job that dies during the copy leaves a corrupt last.ckpt."""
    system_tmp = tmp_path / "node_local_tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    staged = []
    mkstemp = tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = mkstemp(*args, **kwargs)
        staged.append(Path(name).parent)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    target = tmp_path / "shared_fs" / "last.ckpt"
    TorchCheckpointIO().save_checkpoint({"version": 1}, target)
    assert staged == [system_tmp]  # not the checkpoint folder

    def cross_device_rename(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def dies_during_copy(src, dst, *args, **kwargs):
        with open(src, "rb") as source, open(dst, "wb") as destination:
            destination.write(source.read(200))
        raise KeyboardInterrupt("job killed during the copy")

    monkeypatch.setattr(os, "rename", cross_device_rename)
    monkeypatch.setattr(shutil, "copyfile", dies_during_copy)
    with pytest.raises(KeyboardInterrupt):
        TorchCheckpointIO().save_checkpoint({"version": 2, "weights": torch.ones(10_000)}, target)
    with pytest.raises(Exception):  # noqa: B017
        load_checkpoint(target)  # the previous good checkpoint is gone
    monkeypatch.undo()

    # AtomicCheckpointIO stages beside the target and renames within that folder; a write that dies leaves
    # the previous checkpoint as it was
    AtomicCheckpointIO().save_checkpoint({"version": 1}, target)
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (f.write(b"partial"), (_ for _ in ()).throw(KeyboardInterrupt()))[1])
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"version": 2}, target)
    monkeypatch.undo()
    assert load_checkpoint(target)["version"] == 1 and temporary_files(target) == []


# ------------------------------------------------------------------------------------------- prd fit

PROMPTS = ["a red ball", "a blue cube", "a green cone", "a yellow donut", "a white capsule", "a black torus"]
STEPS = 6


def _kill_and_resume_script():
    spec = importlib.util.spec_from_file_location("kill_and_resume", REPO / "scripts" / "kill_and_resume.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_prd_fit_killed_repeatedly_resumes_to_the_uninterrupted_result(tiny_sd_dir, tmp_path):
    script = _kill_and_resume_script()

    reference = tmp_path / "reference"
    reference.mkdir()
    cli = fit_with_cli(tiny_cli_config(tiny_sd_dir, reference, STEPS, PROMPTS), reference / "config.yaml")
    assert not cli.config["trainer"]["plugins"]  # no writer in this config, yet:
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO  # installed by PRDModule for any config
    expected = load_checkpoint(reference / "checkpoints" / "last.ckpt")
    schedule = {r["global_step"]: r for r in read_batches(reference / "batches_rank0.jsonl")}

    killed = tmp_path / "killed"
    killed.mkdir()
    path = write_config(tiny_cli_config(tiny_sd_dir, killed, STEPS, PROMPTS), killed / "config.yaml")
    command = [sys.executable, "-m", "lightning_modules.cli", "fit", "--config", str(path)]
    events, code = script.kill_and_resume(
        command, killed / "checkpoints", kills=3, seed=0, max_delay=0.3, env=subprocess_env(), log=killed / "log.txt", timeout=120
    )
    assert code == 0, (killed / "log.txt").read_text()[-3000:]
    assert len(events) == 3
    for event in events:  # every kill left a checkpoint that loads (checked by the script) and lost no saved step
        if event.step_before is not None:
            assert event.step_after >= event.step_before
        else:  # killed before or while writing the run's first checkpoint: nothing, or a complete one
            assert event.step_after is None or event.step_after >= 1
    assert events[-1].step_after is None or events[-1].step_after < STEPS  # the kills really interrupted training
    print("kills:", events)

    # every run started at the step its checkpoint saved, with the batch the uninterrupted run took there
    records = read_batches(killed / "batches_rank0.jsonl")
    runs = [records[i]["global_step"] for i in range(len(records)) if i == 0 or records[i]["pid"] != records[i - 1]["pid"]]
    # every run took batches (it was killed only after writing to the checkpoint folder) and started where its
    # checkpoint stood
    assert runs == [0] + [event.step_after or 0 for event in events]
    for record in records:
        reference_record = schedule[record["global_step"]]
        assert (record["epoch"], record["batch_idx"], record["seed"], record["prompts"]) == (
            reference_record["epoch"], reference_record["batch_idx"], reference_record["seed"], reference_record["prompts"],
        )  # fmt: skip

    final = load_checkpoint(killed / "checkpoints" / "last.ckpt")
    problems = differences(training_state(final), training_state(expected))
    assert not problems, problems[:10]
    # debris of killed writes cleared, and every run kept writing last.ckpt (no last-v1.ckpt beside it)
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["last.ckpt"]
