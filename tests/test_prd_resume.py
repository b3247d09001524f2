"""Exact resume through the real `prd fit` path (LightningCLI, PRDModule, PromptDataModule, ModelCheckpoint,
`--ckpt_path`), on tiny models on the CPU: N optimizer steps in one run and N/2 + resume + N/2 give bit-for-bit
the same trainable weights, optimizer state, counters and data position, and the resumed run takes exactly
the prompts and seeds the uninterrupted run took. Also with accumulate_grad_batches=2, resuming from a
checkpoint written in the middle of an accumulation window (at an epoch end)."""

from __future__ import annotations

import pytest

from lightning_modules.cli import main
from tests.prd_helpers import (
    PRD_WARNING_FILTERS,
    differences,
    load_checkpoint,
    read_batches,
    single_thread,  # noqa: F401  (fixture)
    tiny_cli_config,
    training_state,
    write_config,
)

pytestmark = [
    *PRD_WARNING_FILTERS,
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:The dirpath has changed"),  # resuming into another folder, on purpose
]

# 6 prompts in batches of 2: 3 batches per epoch, so the runs cross epoch ends and stop mid-epoch.
PROMPTS = ["a red ball", "a blue cube", "a green cone", "a yellow donut", "a white capsule", "a black torus"]
STEPS = 4  # optimizer steps of the full run


def _fit(config: dict, root, *args: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    path = write_config(config, root / "config.yaml")
    assert main(["fit", "--config", str(path), *args]) == 0


def _schedule(records: list[dict]) -> list[tuple]:
    return [(r["global_step"], r["epoch"], r["batch_idx"], r["seed"], tuple(r["prompts"]), tuple(r["indices"])) for r in records]


def _assert_same(a: dict, b: dict) -> None:
    problems = differences(training_state(a), training_state(b))
    assert not problems, problems[:10]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_half_run_plus_resume_equals_the_uninterrupted_run(tiny_sd_dir, tmp_path, accumulate):
    batches = STEPS * accumulate
    mid_window = 3  # accumulate 2: batch 3 is the first half of window 2, and the last batch of epoch 0
    extra = (
        [{"class_path": "tests.prd_helpers.SaveCheckpointAtBatches", "init_args": {"dirpath": str(tmp_path / "full" / "mid"), "batches": [mid_window]}}]
        if accumulate > 1
        else []
    )

    # the uninterrupted run
    full = tmp_path / "full"
    _fit(tiny_cli_config(tiny_sd_dir, full, STEPS, PROMPTS, accumulate_grad_batches=accumulate, callbacks=extra), full)
    reference = load_checkpoint(full / "checkpoints" / "last.ckpt")
    seen = read_batches(full / "batches_rank0.jsonl")
    assert reference["global_step"] == STEPS and len(seen) == batches
    assert [(r["epoch"], r["batch_idx"]) for r in seen][:4] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert reference["prd"]["window_batches"] == 0 and "window_grads" not in reference["prd"]

    # N/2 steps, then `--ckpt_path last` for the rest (same config, same checkpoint folder)
    split = tmp_path / "split"
    config = tiny_cli_config(tiny_sd_dir, split, STEPS // 2, PROMPTS, accumulate_grad_batches=accumulate)
    _fit(config, split)
    half = load_checkpoint(split / "checkpoints" / "last.ckpt")
    assert half["global_step"] == STEPS // 2
    assert differences(half["state_dict"], reference["state_dict"])  # the halfway weights are not the final ones
    _fit(config, split, "--ckpt_path", "last", "--trainer.max_steps", str(STEPS))
    _assert_same(load_checkpoint(split / "checkpoints" / "last.ckpt"), reference)
    # the resumed run took exactly the batches (prompts, seeds, epochs) the uninterrupted run took
    assert _schedule(read_batches(split / "batches_rank0.jsonl")) == _schedule(seen)

    if accumulate == 1:
        return
    # a checkpoint written in the middle of an accumulation window (with its gradients), at an epoch end
    mid = load_checkpoint(full / "mid" / f"batch={mid_window}.ckpt")
    assert mid["prd"]["window_batches"] == 1 and mid["prd"]["window_grads"]
    assert mid["global_step"] == 1 and mid["PromptDataModule"]["epoch"] == 1 and mid["PromptDataModule"]["batches_consumed"] == 0
    resumed = tmp_path / "from_mid"
    config = tiny_cli_config(tiny_sd_dir, resumed, STEPS, PROMPTS, accumulate_grad_batches=accumulate)
    _fit(config, resumed, "--ckpt_path", str(full / "mid" / f"batch={mid_window}.ckpt"))
    _assert_same(load_checkpoint(resumed / "checkpoints" / "last.ckpt"), reference)
    assert _schedule(read_batches(resumed / "batches_rank0.jsonl")) == _schedule(seen[mid_window:])
