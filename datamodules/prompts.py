"""`PromptDataModule`: prompt-only data for PRD training (no images, no 3D data).

Training batches are dicts::

    {"prompts": list[str] (batch_size), "indices": LongTensor [batch_size] (global prompt indices),
     "seed": int, "epoch": int, "batch_idx": int}

`seed` is derived from (seed, epoch, batch_idx, rank) so that the training module can sample its
cameras and noise per step reproducibly. Validation / test batches hold "prompts", "indices" and
"seed" in the file's order.

Order, sharding and resume (see README "Prompt data"):

- Epoch e uses the permutation ``perm_e`` of all N prompts drawn from ``SeedSequence([seed, e])``
  (the identity when ``shuffle=False``). It does not depend on the number of ranks or the batch
  size. Global batch s of an epoch is ``perm_e[s*W*B : (s+1)*W*B]`` (W ranks, B = batch_size) and
  rank r takes its r-th slice of B prompts, so ranks see disjoint prompts and the same number of
  batches. The tail is either dropped (``drop_last=True``: N // (W*B) batches; the dropped prompts
  change every epoch) or padded by wrapping around to the start of ``perm_e``
  (``drop_last=False``: ceil(N / (W*B)) batches, a few prompts seen twice that epoch).
- The position (epoch, batches consumed by the training loop) is saved by
  ``PromptDataModule.state_dict()`` and by the train DataLoader's own ``state_dict()`` (Lightning
  2.6 stores both in the checkpoint) and restored before the first batch, so a resumed run
  continues with exactly the next batch. Batches are counted when the DataLoader hands them to
  the loop in the main process; DataLoader workers only read prompt text, so their prefetching
  never moves the position.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from datamodules.prompt_sources import (
    PromptFileError,
    PromptFormat,
    PromptSource,
    PromptSourceNotFoundError,
    detect_format,
    json_splits,
    load_prompt_source,
    resolve_path,
)
from renderers.errors import UserError

log = logging.getLogger(__name__)


class PromptDataSettingsError(UserError, ValueError):
    """A `PromptDataModule` argument out of its range (one-line message)."""


_TRAIN, _VAL, _TEST = 0, 1, 2  # domain tags of the derived seeds
_SEED_MASK = (1 << 64) - 1


def batch_seed(seed: int, *key: int) -> int:
    """A 63-bit seed derived from `seed` and a key (e.g. stage, epoch, batch index, rank)."""
    words = np.random.SeedSequence([int(seed) & _SEED_MASK, *map(int, key)]).generate_state(
        2, dtype=np.uint32
    )
    return int((int(words[0]) << 32 | int(words[1])) & ((1 << 63) - 1))


def epoch_permutation(num_prompts: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """`[N]` int64: the order of all prompts in `epoch` (identity when not shuffling)."""
    if not shuffle:
        return np.arange(num_prompts, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & _SEED_MASK, int(epoch)]))
    return rng.permutation(num_prompts).astype(np.int64, copy=False)


class TrainLayout(NamedTuple):
    """How one epoch of training prompts is cut into per-rank batches."""

    num_prompts: int
    batch_size: int
    world_size: int
    drop_last: bool
    seed: int
    shuffle: bool

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_prompts // self.global_batch
        return math.ceil(self.num_prompts / self.global_batch)

    def batch_indices(self, perm: np.ndarray, batch_idx: int, rank: int) -> np.ndarray:
        """`[B]` global prompt indices of rank `rank`'s batch `batch_idx` (wrapping past the end)."""
        start = batch_idx * self.global_batch + rank * self.batch_size
        return perm[np.arange(start, start + self.batch_size) % self.num_prompts]


class TrainPosition:
    """Where training is in the prompt stream: epoch and batches the training loop consumed.

    Shared by the DataModule, the train DataLoader and its sampler (all in the main process).
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.consumed = 0
        self.started = False  # an epoch has begun since construction / loading
        self.layout: TrainLayout | None = None
        self._pending: dict | None = None
        # Returns the number of batches Lightning runs per epoch (limit_train_batches), if known.
        self.epoch_limit: Callable[[], float | None] = lambda: None

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:  # loaded but not yet iterated: hand it on unchanged
            return dict(self._pending)
        epoch, consumed = self.epoch, self.consumed
        limit = self.epoch_limit()
        full = self.layout.batches_per_epoch if self.layout else None
        # An epoch that Lightning ended (all batches, or limit_train_batches) resumes at the next.
        ends = [n for n in (limit, full) if n is not None and n != float("inf")]
        if self.started and ends and consumed >= min(ends):
            epoch, consumed = epoch + 1, 0
        state = {"epoch": int(epoch), "batches_consumed": int(consumed)}
        if self.layout is not None:
            state["layout"] = self.layout._asdict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "epoch" not in state or "batches_consumed" not in state:
            raise ValueError(
                f"not a PromptDataModule position (keys: {sorted(state)}); expected 'epoch' and 'batches_consumed'"
            )
        self._pending = dict(state)

    def begin_epoch(self, layout: TrainLayout) -> tuple[int, int]:
        """(epoch, first batch) of a new pass over the loader, given the current layout."""
        if self._pending is not None:
            epoch, start = self._from_state(self._pending, layout)
            self._pending = None
        elif self.started:
            epoch, start = self.epoch + 1, 0
        else:
            epoch, start = self.epoch, 0
        per_epoch = layout.batches_per_epoch
        epoch, start = epoch + start // per_epoch, start % per_epoch
        self.epoch, self.consumed, self.started, self.layout = epoch, start, True, layout
        return epoch, start

    @staticmethod
    def _from_state(state: dict, layout: TrainLayout) -> tuple[int, int]:
        epoch, start = int(state["epoch"]), int(state["batches_consumed"])
        saved = state.get("layout")
        if saved is None or start == 0:
            return epoch, start
        saved = TrainLayout(**saved)
        if (saved.num_prompts, saved.seed, saved.shuffle) != (
            layout.num_prompts,
            layout.seed,
            layout.shuffle,
        ):
            log.warning(
                "prompt library or order changed since the checkpoint (prompts %d -> %d, seed %d -> %d, "
                "shuffle %s -> %s): epoch %d continues with the new order after about %d prompts",
                saved.num_prompts, layout.num_prompts, saved.seed, layout.seed, saved.shuffle, layout.shuffle,
                epoch, start * saved.global_batch,
            )  # fmt: skip
        if saved.global_batch != layout.global_batch:
            # perm_e does not depend on ranks or batch size: continue after the prompts already done,
            # rounding down (a few prompts may be seen twice, none is skipped).
            done = start * saved.global_batch
            new_start = done // layout.global_batch
            log.warning(
                "world_size x batch_size changed since the checkpoint (%d x %d -> %d x %d): resuming "
                "epoch %d at prompt %d of its order instead of %d",
                saved.world_size, saved.batch_size, layout.world_size, layout.batch_size,
                epoch, new_start * layout.global_batch, done,
            )  # fmt: skip
            start = new_start
        return epoch, start


class BatchKey(NamedTuple):
    """What a sampler sends to the dataset (and DataLoader workers) for one batch."""

    indices: np.ndarray  # [B] int64 global prompt indices
    seed: int
    epoch: int
    batch_idx: int


class PromptBatchDataset(Dataset):
    """Reads the prompts of one batch; `dataset[key]` takes a :class:`BatchKey`.

    "indices" stay a numpy array here (cheap to send from a worker); the loader makes it a tensor.
    """

    def __init__(self, source: PromptSource, with_position: bool):
        self.source = source
        self.with_position = with_position

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: BatchKey) -> dict[str, Any]:
        batch = {
            "prompts": [self.source.get(int(i)) for i in key.indices],
            "indices": np.asarray(key.indices, dtype=np.int64),
            "seed": key.seed,
        }
        if self.with_position:
            batch["epoch"], batch["batch_idx"] = key.epoch, key.batch_idx
        return batch


class TrainBatchSampler(DistributedSampler):
    """Yields one :class:`BatchKey` per training batch of this rank, from a given position.

    It subclasses DistributedSampler only so that Lightning sees a rank-aware sampler and does not
    replace it (``use_distributed_sampler``); ``set_epoch`` is ignored because the epoch comes
    from the saved position.
    """

    def __init__(self, dataset: PromptBatchDataset, layout: TrainLayout, rank: int):
        super().__init__(dataset, num_replicas=layout.world_size, rank=rank, shuffle=False, drop_last=False)
        self.layout = layout
        self.epoch_to_run, self.first_batch = 0, 0

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.layout.batches_per_epoch

    def __iter__(self) -> Iterator[BatchKey]:
        layout, epoch = self.layout, self.epoch_to_run
        perm = epoch_permutation(layout.num_prompts, layout.seed, epoch, layout.shuffle)
        for b in range(self.first_batch, layout.batches_per_epoch):
            seed = batch_seed(layout.seed, _TRAIN, epoch, b, self.rank)
            yield BatchKey(layout.batch_indices(perm, b, self.rank), seed, epoch, b)


class EvalBatchSampler(DistributedSampler):
    """Fixed-order batches of this rank's contiguous block of prompts (no duplicates, no padding).

    With N prompts on W ranks, rank r gets block r of ``numpy.array_split(range(N), W)``; ranks may
    differ by one batch and a rank with no prompts gets no batches.
    """

    def __init__(
        self, dataset: PromptBatchDataset, batch_size: int, world_size: int, rank: int, seed: int, tag: int
    ):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
        self.indices = np.array_split(np.arange(len(dataset), dtype=np.int64), world_size)[rank]
        self.batch_size, self.seed_value, self.tag = batch_size, seed, tag

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[BatchKey]:
        for b in range(len(self)):
            chunk = self.indices[b * self.batch_size : (b + 1) * self.batch_size]
            yield BatchKey(chunk, batch_seed(self.seed_value, self.tag, int(chunk[0])), 0, b)


def _keep(batch: dict) -> dict:
    return batch


class EvalDataLoader(DataLoader):
    """Fixed-order prompt batches (validation / test); "indices" become a LongTensor here."""

    def __init__(self, dataset: PromptBatchDataset, sampler: DistributedSampler, num_workers: int = 0):
        # Not persistent: workers are forked per pass, so an abandoned iterator (e.g. after
        # limit_train_batches) is shut down at once instead of lingering into later forks.
        super().__init__(
            dataset,
            batch_size=None,
            sampler=sampler,
            num_workers=num_workers,
            collate_fn=_keep,
            persistent_workers=False,
        )

    def __iter__(self) -> Iterator[dict]:
        return self._tensors(super().__iter__())

    @staticmethod
    def _tensors(batches: Iterator[dict]) -> Iterator[dict]:
        for batch in batches:
            batch["indices"] = torch.from_numpy(batch["indices"])
            yield batch


class PromptDataLoader(EvalDataLoader):
    """The training DataLoader: resumable, and counting the batches it hands to the loop.

    ``state_dict`` / ``load_state_dict`` make it a stateful loader for Lightning's fit loop.
    """

    def __init__(
        self,
        dataset: PromptBatchDataset,
        sampler: TrainBatchSampler,
        position: TrainPosition,
        num_workers: int = 0,
    ):
        super().__init__(dataset, sampler, num_workers=num_workers)
        self.position = position

    def __iter__(self) -> Iterator[dict]:
        epoch, start = self.position.begin_epoch(self.sampler.layout)
        self.sampler.epoch_to_run, self.sampler.first_batch = epoch, start
        return self._counted(super().__iter__(), epoch, start)

    def _counted(self, batches: Iterator[dict], epoch: int, start: int) -> Iterator[dict]:
        for consumed, batch in enumerate(batches, start=start + 1):
            # Counted as the loop takes it: the checkpoint written after this step resumes after it.
            self.position.epoch, self.position.consumed = epoch, consumed
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position.load_state_dict(state)


class PromptDataModule(pl.LightningDataModule):
    """Prompt-only data for PRD: prompt libraries in, batches of prompt strings out.

    Args:
        train_prompts: training prompts: a file (``.json`` DreamFusion layout / bare list,
            ``.jsonl``, text), ``"file.json#split"``, a bundled set's name (``"dreamfusion415"``)
            or an inline list.
        val_prompts: validation prompts, same forms. ``None``: the ``val`` list of a split JSON
            training source, otherwise no validation. ``[]``: no validation.
        test_prompts: test (and predict) prompts; ``None``: the ``test`` list of a split JSON
            training source, otherwise none.
        batch_size: prompts per training batch on each rank.
        eval_batch_size: prompts per validation / test batch (``None``: batch_size).
        num_workers: DataLoader worker processes (they only read prompt text).
        seed: seeds the per-epoch permutations and the per-batch seeds (the student's noise, cameras and
            teacher draws). None: the global seed of `seed_everything` (Lightning's PL_GLOBAL_SEED), else 0.
        shuffle: shuffle training prompts every epoch (otherwise file order).
        drop_last: drop the epoch's tail that does not fill a batch on every rank (otherwise pad
            it by wrapping to the start of the epoch's order).
        strict: raise on the first bad prompt line instead of skipping it with a warning.
        max_prompt_chars: prompts longer than this (after stripping) are bad lines.
        json_field: the prompt's key in JSON / JSONL objects.
        prompt_format: ``"auto"`` (by extension), ``"json"``, ``"jsonl"`` or ``"text"``.
        cache_index: cache text / JSONL offset indices in ``<file>.prompt-index.npz``.
        world_size: ranks to shard over (``None``: from the Trainer / torch.distributed).
        rank: this process's rank (``None``: from the Trainer / torch.distributed).
    """

    def __init__(
        self,
        train_prompts: str | list[str] = "dreamfusion415",
        val_prompts: str | list[str] | None = None,
        test_prompts: str | list[str] | None = None,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        strict: bool = False,
        max_prompt_chars: int = 1000,
        json_field: str = "prompt",
        prompt_format: PromptFormat = "auto",
        cache_index: bool = True,
        world_size: int | None = None,
        rank: int | None = None,
    ):
        super().__init__()
        bad = PromptDataSettingsError
        for name, value in (("batch_size", batch_size), ("max_prompt_chars", max_prompt_chars)):
            if value < 1:
                raise bad(f"data: {name} must be at least 1, got {value}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise bad(f"data: eval_batch_size must be at least 1 or null, got {eval_batch_size}")
        if num_workers < 0:
            raise bad(f"data: num_workers must be >= 0, got {num_workers}")
        if world_size is not None and world_size < 1:
            raise bad(f"data: world_size must be at least 1 or null, got {world_size}")
        if world_size is not None and not 0 <= (rank or 0) < world_size:
            raise bad(f"data: rank must be in [0, world_size={world_size}), got {rank}")
        if rank is not None and world_size is None:
            raise bad("data: rank was given without world_size: give both or neither")
        self.save_hyperparameters(logger=False)
        self.train_prompts, self.val_prompts, self.test_prompts = train_prompts, val_prompts, test_prompts
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        self.seed, self.shuffle, self.drop_last = int(seed), shuffle, drop_last
        self.strict, self.max_prompt_chars = strict, max_prompt_chars
        self.json_field, self.prompt_format, self.cache_index = json_field, prompt_format, cache_index
        self._world_override = (world_size, rank or 0) if world_size is not None else None
        self.position = TrainPosition()
        self.position.epoch_limit = self._lightning_epoch_limit
        self._sources: dict[str, PromptSource | None] = {}
        # Ranks of a small validation / test set may get no batch at all.
        self.allow_zero_length_dataloader_with_multiple_devices = True

    # -- sources --------------------------------------------------------------------------------

    def _spec(self, split: str) -> str | list[str] | None:
        """The source of a split, falling back to the train source's JSON split."""
        spec = {"train": self.train_prompts, "val": self.val_prompts, "test": self.test_prompts}[split]
        if spec is not None or split == "train" or not isinstance(self.train_prompts, str):
            return spec
        path, _ = resolve_path(self.train_prompts)
        if detect_format(path, self.prompt_format) == "json":
            splits = json_splits(path, non_empty=True)
            if splits is not None and split in splits:
                return f"{path}#{split}"
        return None

    def prompt_source(self, split: str) -> PromptSource | None:
        """The prompt library of 'train', 'val' or 'test' (``None`` when that split has none)."""
        if split not in self._sources:
            spec = self._spec(split)
            if spec is None:
                self._sources[split] = None
            else:
                self._sources[split] = load_prompt_source(
                    spec,
                    split,
                    fmt=self.prompt_format,
                    json_field=self.json_field,
                    max_chars=self.max_prompt_chars,
                    strict=self.strict,
                    cache_index=self.cache_index,
                )
        return self._sources[split]

    def prompts(self, split: str) -> list[str]:
        """All prompts of a (small) split, e.g. the validation prompts; not for huge libraries."""
        source = self.prompt_source(split)
        return [] if source is None else [source.get(i) for i in range(len(source))]

    def prepare_data(self) -> None:
        # Runs on one process per node before `setup`: builds (and caches) the file indices once.
        if self.cache_index:
            for split in ("train", "val", "test"):
                self.prompt_source(split)

    def setup(self, stage: str) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in splits.get(stage, ()):
            self.prompt_source(split)

    # -- ranks ----------------------------------------------------------------------------------

    def world(self) -> tuple[int, int]:
        """(world_size, rank): explicit overrides, else the Trainer, else torch.distributed."""
        if self._world_override is not None:
            return self._world_override
        if self.trainer is not None:
            return int(self.trainer.world_size), int(self.trainer.global_rank)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def _lightning_epoch_limit(self) -> float | None:
        trainer = self.trainer
        return None if trainer is None else getattr(trainer, "num_training_batches", None)

    # -- loaders --------------------------------------------------------------------------------

    def train_layout(self, world_size: int | None = None) -> TrainLayout:
        """How the training prompts fill the global batches (`world_size`: None, the current world)."""
        source = self.prompt_source("train")
        if source is None or len(source) == 0:
            raise PromptFileError("data: train_prompts holds no prompt: give a prompt file or a list of prompts")
        world_size = self.world()[0] if world_size is None else world_size
        layout = TrainLayout(
            len(source), self.batch_size, world_size, self.drop_last, self.seed, self.shuffle
        )
        if layout.batches_per_epoch == 0:
            raise PromptFileError(
                f"{source.name}: {len(source)} valid prompt(s) cannot fill one batch of {self.batch_size} on "
                f"{world_size} rank(s) with drop_last=True; add prompts, lower batch_size or set drop_last=False"
            )
        return layout

    def check_sources(self, stage: str = "fit", world_size: int | None = None) -> None:
        """Open the prompt libraries `stage` reads and check they fill a batch: a missing, empty or unreadable
        library is a one-line `PromptFileError` before any model loads (`prd fit` calls it up front)."""
        for split in {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}.get(stage, ()):
            self.prompt_source(split)
        if stage == "fit":
            self.train_layout(world_size)

    def train_dataloader(self) -> PromptDataLoader:
        layout = self.train_layout()
        _, rank = self.world()
        dataset = PromptBatchDataset(self.prompt_source("train"), with_position=True)
        sampler = TrainBatchSampler(dataset, layout, rank)
        return PromptDataLoader(dataset, sampler, self.position, num_workers=self.num_workers)

    def _eval_loader(self, split: str, tag: int) -> EvalDataLoader | list:
        source = self.prompt_source(split)
        if source is None or len(source) == 0:
            return []
        world_size, rank = self.world()
        dataset = PromptBatchDataset(source, with_position=False)
        sampler = EvalBatchSampler(dataset, self.eval_batch_size, world_size, rank, self.seed, tag)
        return EvalDataLoader(dataset, sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> EvalDataLoader | list:
        return self._eval_loader("val", _VAL)

    def test_dataloader(self) -> EvalDataLoader | list:
        return self._eval_loader("test", _TEST)

    def predict_dataloader(self) -> EvalDataLoader | list:
        return self._eval_loader("test", _TEST)

    # -- checkpointed position ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """{"epoch", "batches_consumed", "layout"}: the training loop's position in the prompt stream."""
        return self.position.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.position.load_state_dict(state_dict)


__all__ = [
    "BatchKey",
    "PromptBatchDataset",
    "PromptDataLoader",
    "PromptDataModule",
    "PromptDataSettingsError",
    "PromptFileError",
    "PromptSourceNotFoundError",
    "TrainBatchSampler",
    "EvalBatchSampler",
    "EvalDataLoader",
    "TrainLayout",
    "TrainPosition",
    "batch_seed",
    "epoch_permutation",
]
