"""PromptDataModule: batches, rank sharding, deterministic order, exact resume (also under a Trainer)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.prompt_lines import PromptFileError
from datamodules.prompt_sources import BUNDLED_DIR
from datamodules.prompts import PromptDataModule, TrainLayout, epoch_permutation

PROMPTS = [f"prompt number {i}" for i in range(23)]


def make_dm(**kwargs) -> PromptDataModule:
    kwargs.setdefault("train_prompts", PROMPTS)
    kwargs.setdefault("batch_size", 3)
    dm = PromptDataModule(**kwargs)
    dm.setup("fit")
    return dm


def key(batch) -> tuple:
    """What identifies a batch: position, prompts, indices and seed."""
    return (
        batch["epoch"],
        batch["batch_idx"],
        tuple(batch["prompts"]),
        tuple(batch["indices"].tolist()),
        batch["seed"],
    )


def take(loader, count: int) -> list[tuple]:
    """The next `count` batches of a new pass, without pulling one more."""
    iterator = iter(loader)
    return [key(next(iterator)) for _ in range(count)]


def run_epochs(loader, epochs: int) -> list[tuple]:
    return [key(b) for _ in range(epochs) for b in loader]


# -- batches -----------------------------------------------------------------------------------


def test_training_batch_format_and_determinism():
    dm = make_dm(seed=5)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 8  # ceil(23 / 3)
    for b in batches:
        assert isinstance(b["prompts"], list) and len(b["prompts"]) == 3
        assert b["indices"].dtype == torch.long and b["indices"].shape == (3,)
        assert b["prompts"] == [PROMPTS[i] for i in b["indices"].tolist()]
        assert isinstance(b["seed"], int) and 0 <= b["seed"] < 2**63
    assert len({b["seed"] for b in batches}) == len(batches)
    # Same seed: same stream; next epoch: a new permutation; other seed: another stream.
    again = run_epochs(make_dm(seed=5).train_dataloader(), 2)
    assert again[:8] == [key(b) for b in batches]
    epoch0 = [i for k in again[:8] for i in k[3]]
    epoch1 = [i for k in again[8:] for i in k[3]]
    assert epoch0 != epoch1 and sorted(set(epoch0)) == sorted(set(epoch1)) == list(range(23))
    assert run_epochs(make_dm(seed=6).train_dataloader(), 1) != again[:8]
    unshuffled = run_epochs(make_dm(shuffle=False).train_dataloader(), 1)
    assert [i for k in unshuffled for i in k[3]] == list(range(23)) + [0]  # padded by wrapping


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_get_disjoint_shards_and_equal_batch_counts(drop_last):
    world, batch_size, n = 3, 2, 23
    loaders = [
        make_dm(
            batch_size=batch_size, world_size=world, rank=r, drop_last=drop_last, seed=1
        ).train_dataloader()
        for r in range(world)
    ]
    expected_batches = n // (world * batch_size) if drop_last else -(-n // (world * batch_size))
    assert [len(dl) for dl in loaders] == [expected_batches] * world
    for _epoch in range(2):
        per_rank = [[i for b in dl for i in b["indices"].tolist()] for dl in loaders]
        assert all(len(p) == expected_batches * batch_size for p in per_rank)
        flat = [i for p in per_rank for i in p]
        if drop_last:
            assert len(set(flat)) == len(flat)  # disjoint, 23 - 18 = 5 prompts dropped this epoch
        else:
            assert set(flat) == set(range(n))  # every prompt, 24 - 23 = 1 padded repeat
            assert len(flat) - len(set(flat)) == expected_batches * world * batch_size - n
        for a in range(world):
            for b in range(a + 1, world):
                if drop_last:
                    assert not set(per_rank[a]) & set(per_rank[b])


def test_global_order_does_not_depend_on_world_size():
    perm = epoch_permutation(23, seed=1, epoch=0)
    layout = TrainLayout(23, 2, 3, True, 1, True)
    got = [
        i for s in range(layout.batches_per_epoch) for r in range(3) for i in layout.batch_indices(perm, s, r)
    ]
    assert got == perm[:18].tolist()
    single = make_dm(batch_size=6, seed=1, drop_last=True).train_dataloader()
    assert [i for b in single for i in b["indices"].tolist()] == got


def test_rank_and_world_size_from_trainer_or_override():
    dm = make_dm()
    assert dm.world() == (1, 0)
    dm.trainer = SimpleNamespace(world_size=4, global_rank=2, num_training_batches=float("inf"))
    assert dm.world() == (4, 2)
    assert len(dm.train_dataloader()) == 2  # ceil(23 / 12)
    assert make_dm(world_size=2, rank=1).world() == (2, 1)
    with pytest.raises(ValueError, match="rank must be in"):
        PromptDataModule(world_size=2, rank=2)


def test_too_few_prompts_for_drop_last_is_clear_error():
    dm = make_dm(batch_size=8, world_size=4, rank=0, drop_last=True)
    with pytest.raises(PromptFileError, match="cannot fill one batch of 8 on 4 rank"):
        dm.train_dataloader()


# -- validation / test ----------------------------------------------------------------------------


def test_val_and_test_come_from_bundled_json_in_fixed_order():
    raw = json.loads((BUNDLED_DIR / "dreamfusion415.json").read_text())
    bundled = {split: [p.strip() for p in prompts] for split, prompts in raw.items()}  # prompts are stripped
    dm = PromptDataModule(batch_size=2, eval_batch_size=5)
    dm.setup("fit")
    dm.setup("test")
    val = [b for b in dm.val_dataloader()]
    assert [len(b["prompts"]) for b in val] == [5, 5, 5, 1]
    assert [p for b in val for p in b["prompts"]] == bundled["val"]
    assert [i for b in val for i in b["indices"].tolist()] == list(range(16))
    assert [p for b in dm.test_dataloader() for p in b["prompts"]] == bundled["test"]
    assert [p for b in dm.val_dataloader() for p in b["prompts"]] == bundled["val"]  # same every time


def test_eval_sharding_is_disjoint_and_ordered():
    per_rank = []
    for r in range(3):
        dm = PromptDataModule(eval_batch_size=4, world_size=3, rank=r)
        dm.setup("validate")
        per_rank.append([i for b in dm.val_dataloader() for i in b["indices"].tolist()])
    assert [len(p) for p in per_rank] == [6, 5, 5]
    assert [i for p in per_rank for i in p] == list(range(16))


def test_val_falls_back_to_the_train_json_file_split():
    dm = PromptDataModule(train_prompts="dreamfusion415#test", eval_batch_size=16)
    assert len(dm.prompt_source("train")) == 415 and len(dm.prompts("val")) == 16
    assert len(dm.val_dataloader()) == 1


def test_no_validation_for_text_source_or_empty_list(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a\nb\nc\n")
    assert PromptDataModule(train_prompts=str(path)).val_dataloader() == []
    assert PromptDataModule(val_prompts=[]).val_dataloader() == []
    dm = PromptDataModule(train_prompts=str(path), val_prompts=["v1", "v2"], test_prompts=str(path))
    assert [p for b in dm.val_dataloader() for p in b["prompts"]] == ["v1", "v2"]
    assert [p for b in dm.test_dataloader() for p in b["prompts"]] == ["a", "b", "c"]


# -- resume without a Trainer -----------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop_at", [3, 8, 11])  # mid-epoch 0, exact end of epoch 0, mid-epoch 1
def test_interrupted_then_resumed_iteration_equals_uninterrupted(num_workers, stop_at):
    reference = run_epochs(make_dm(seed=3).train_dataloader(), 3)  # 8 batches per epoch
    dm = make_dm(seed=3, num_workers=num_workers)
    loader = dm.train_dataloader()
    seen = take(loader, min(stop_at, 8))
    if stop_at > 8:
        seen += take(loader, stop_at - 8)
    state = dm.state_dict()
    # Workers prefetched ahead; the position is what was handed out.
    assert (state["epoch"], state["batches_consumed"]) == ((0, stop_at) if stop_at < 8 else (1, stop_at - 8))
    resumed = make_dm(seed=3, num_workers=num_workers)
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    seen += [key(b) for b in loader]  # the rest of the interrupted epoch
    while len(seen) < len(reference):
        seen += [key(b) for b in loader]
    assert seen == reference


def test_resume_with_other_world_size_skips_no_prompt(caplog):
    dm = make_dm(batch_size=4, seed=2, drop_last=True)
    done = [i for k in take(dm.train_dataloader(), 3) for i in k[3]]  # 12 prompts of epoch 0
    state = dm.state_dict()
    perm = epoch_permutation(23, seed=2, epoch=0).tolist()
    assert done == perm[:12]
    rest = []
    for rank in range(2):  # same global batch (2 x 2): exact continuation
        other = make_dm(batch_size=2, seed=2, drop_last=True, world_size=2, rank=rank)
        other.load_state_dict(state)
        rest.append([i for b in other.train_dataloader() for i in b["indices"].tolist()])
    assert sorted(rest[0] + rest[1]) == sorted(perm[12:20])
    with caplog.at_level(logging.WARNING, logger="datamodules.prompts"):
        other = make_dm(batch_size=5, seed=2, drop_last=True)  # global batch 5: rounds down
        other.load_state_dict(state)
        first = next(iter(other.train_dataloader()))
    assert first["indices"].tolist() == perm[10:15] and "resuming epoch 0 at prompt 10" in caplog.text


# -- resume under a real Trainer --------------------------------------------------------------------


class RecordingModule(pl.LightningModule):
    """Trains one scalar and records every batch it is given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(key(batch))
        return (self.weight - len(batch["prompts"])).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, max_steps, num_workers, limit, ckpt_path=None, every=None):
    model = RecordingModule()
    dm = PromptDataModule(train_prompts=PROMPTS[:10], batch_size=3, seed=7, num_workers=num_workers)
    callbacks = []
    if every:
        callbacks.append(
            ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=every, save_top_k=-1)
        )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        limit_train_batches=limit,
        logger=False,
        enable_checkpointing=bool(every),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.parametrize(
    "num_workers, k, limit",
    [(0, 5, None), (2, 6, None), (0, 4, None), (0, 3, 3)],
    ids=["mid-epoch", "workers", "epoch-end", "limit_train_batches"],
)
def test_trainer_checkpoint_and_resume_sees_same_prompts(tmp_path, num_workers, k, limit):
    total = 11  # 10 prompts / batch 3 -> 4 batches per epoch: crosses two epoch ends
    uninterrupted = fit(tmp_path, total, num_workers, limit, every=k)
    ckpt = tmp_path / f"step={k}.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    per_epoch = limit or 4
    expected = {"epoch": k // per_epoch, "batches_consumed": k % per_epoch}
    assert {n: saved["PromptDataModule"][n] for n in expected} == expected
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["epoch"] == expected["epoch"]
    resumed = fit(tmp_path / "resumed", total, num_workers, limit, ckpt_path=str(ckpt), every=k)
    assert len(uninterrupted) == total
    assert resumed == uninterrupted[k:]
    positions = [(e, b) for e, b, *_ in uninterrupted]
    assert positions == [(s // per_epoch, s % per_epoch) for s in range(total)]


def test_lightning_cli_builds_it_from_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "data.yaml"
    config.write_text(
        "data:\n"
        "  class_path: datamodules.prompts.PromptDataModule\n"
        "  init_args:\n"
        "    train_prompts: dreamfusion415\n"
        "    batch_size: 4\n"
        "    seed: 11\n"
        "    drop_last: true\n"
        "    val_prompts: [a red ball, a blue cube]\n"
    )
    cli = LightningCLI(
        RecordingModule,
        pl.LightningDataModule,
        subclass_mode_data=True,
        run=False,
        args=["--config", str(config), "--trainer.logger=false"],
    )
    dm = cli.datamodule
    assert isinstance(dm, PromptDataModule)
    assert (dm.batch_size, dm.seed, dm.drop_last, dm.val_prompts) == (
        4,
        11,
        True,
        ["a red ball", "a blue cube"],
    )
    assert dm.prompts("val") == ["a red ball", "a blue cube"]


def test_seed_defaults_to_the_global_seed_of_seed_everything(monkeypatch):
    prompts = ["a", "b", "c", "d"]
    assert PromptDataModule(train_prompts=prompts).seed == 0  # no global seed set
    pl.seed_everything(7, verbose=False)
    assert PromptDataModule(train_prompts=prompts).seed == 7
    assert PromptDataModule(train_prompts=prompts, seed=3).seed == 3  # an explicit seed wins

    def first_batch(**kwargs):
        dm = PromptDataModule(train_prompts=prompts, batch_size=2, **kwargs)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))

    assert first_batch()["seed"] == first_batch(seed=7)["seed"] != first_batch(seed=8)["seed"]
