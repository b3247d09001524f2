"""Helpers of the PRD training tests: tiny teachers and callbacks (importable by class_path), a tiny PRDModule,
small data, a tiny `prd fit` config, and comparisons of training checkpoints."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor

from renderers.types import RenderOutput
from teachers.base import Teacher
from tests.threads import single_thread  # noqa: F401  (fixture, imported from here by the PRD tests)

TINY_STUDENT = dict(ranks=2, output_dim=8, mlp_neurons=16, mlp_hidden_layers=1, latent_size=8)
PROMPTS = ["a red ball", "a blue cube", "a green cone", "a yellow donut"]
# Tiny renderers: 12^3 marching cubes rendered at 24 px, NeuS with 12 + 6 samples at 16 px (8 px patch).
TINY_MESH_RENDERER = dict(resolution=12, backend="torch")
TINY_VOLUME_RENDERER = dict(num_proposal_samples=12, num_importance_samples=6, global_downsample=2, patch_size=8)
TINY_RENDER_RESOLUTION = {"mesh": 24, "volume": 16}
TINY_REGULARIZERS = {"volume/eikonal": [0, 0.5, 0.0, 10], "sparsity": 0.1}

# Warnings the PRD tests expect: pytestmark = PRD_WARNING_FILTERS
PRD_WARNING_FILTERS = [
    pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization"),  # intended, see prd_module
    pytest.mark.filterwarnings("ignore:LightningCLI's args parameter"),  # pytest's own argv
]


class ColorTeacher(Teacher):
    """A tiny analytic teacher: pulls every rendered pixel towards `target` (rgb) and the silhouette towards
    `coverage` (alpha). Records the calls it gets; `nan_at_calls` / `inf_at_calls` make the loss of those
    calls (1-based, counted over the teacher's life) non-finite, `nan_grad_at_calls` gives a finite loss with
    a NaN gradient."""

    default_name = "color"

    def __init__(
        self,
        target: tuple[float, float, float] = (0.8, 0.2, 0.2),
        coverage: float = 0.4,
        nan_at_calls: list[int] | None = None,
        inf_at_calls: list[int] | None = None,
        nan_grad_at_calls: list[int] | None = None,
        weight: float | list[float] = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        self.target = tuple(float(c) for c in target)
        self.coverage = float(coverage)
        self.nan_at_calls = set(nan_at_calls or [])
        self.inf_at_calls = set(inf_at_calls or [])
        self.nan_grad_at_calls = set(nan_grad_at_calls or [])
        self.calls: list[dict] = []

    def load(self) -> None:
        self.frozen = {"none": torch.nn.Identity()}

    def compute_losses(self, renders: list[RenderOutput], prompts, step: int, generator) -> list[Tensor]:
        self.calls.append(
            {
                "step": step,
                "renderers": [r.renderer for r in renders],
                "shapes": [tuple(r["rgb"].shape) for r in renders],
                "c2w": renders[0].cameras.c2w.detach().clone(),
                "prompts": list(prompts),
            }
        )
        call = len(self.calls)
        target = torch.tensor(self.target).view(1, 1, 3, 1, 1)
        losses = []
        for render in renders:
            rgb, alpha = render["rgb"], render["alpha"]
            loss = (rgb - target.to(rgb)).square().mean() + (alpha - self.coverage).square().mean()
            if call in self.nan_at_calls:
                loss = loss * math.nan
            if call in self.inf_at_calls:
                loss = loss + math.inf
            if call in self.nan_grad_at_calls:
                loss = loss + (rgb.sum() * 0.0).sqrt()  # value 0, gradient 0 * inf = NaN
            losses.append(loss)
        return losses


def tiny_renderers() -> dict:
    from renderers import MeshRenderer, NeuSVolumeRenderer

    return {"mesh": MeshRenderer(**TINY_MESH_RENDERER), "volume": NeuSVolumeRenderer(**TINY_VOLUME_RENDERER)}


def tiny_module(base: Path | str, teachers=None, **overrides):
    """A PRDModule on a tiny SD directory with tiny renderers (24 px mesh, 16 px volume) and a ColorTeacher."""
    from lightning_modules.training.prd_module import PRDModule

    kwargs = dict(
        teachers=teachers if teachers is not None else {"color": ColorTeacher()},
        renderers=tiny_renderers(),
        base=str(base),
        student_config=dict(TINY_STUDENT),
        render_resolution=dict(TINY_RENDER_RESOLUTION),
        cameras=dict(num_views=2),
        regularizers=dict(TINY_REGULARIZERS),
        validation=dict(num_views=2, resolution=24, log_images=2, log_meshes=1, mesh_resolution=12),
    )
    kwargs.update(overrides)
    return PRDModule(**kwargs)


def tiny_data(batch_size: int = 2, prompts: list[str] | None = None, val: list[str] | None = None):
    from datamodules.prompts import PromptDataModule

    prompts = prompts or PROMPTS
    return PromptDataModule(train_prompts=prompts, val_prompts=val if val is not None else [], batch_size=batch_size)


def fast_trainer(root: Path, max_steps: int, **overrides):
    import lightning.pytorch as pl

    kwargs = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def trainable_copy(module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.trainable_named_parameters().items()}


# ------------------------------------------------------------------------------------- prd fit config


def tiny_cli_config(
    base: Path | str,
    root: Path | str,
    max_steps: int,
    prompts: list[str] | None = None,
    batch_size: int = 2,
    accumulate_grad_batches: int = 1,
    checkpoint_every: int = 1,
    callbacks: list[dict] | None = None,
    **trainer: Any,
) -> dict:
    """A `prd fit` config (LightningCLI) for the CPU with every model tiny: the tiny SD student, mesh + volume
    renderers, a learned background, the ColorTeacher, Adan. It writes `root/checkpoints/last.ckpt` every
    `checkpoint_every` optimizer steps and records the batches each rank takes in `root/batches_rank<r>.jsonl`
    (`BatchRecorder`). `callbacks` are added; `trainer` overrides trainer settings."""
    root = Path(root)
    all_callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(root / "checkpoints"), "every_n_train_steps": checkpoint_every, "save_top_k": 0, "save_last": True},
        },
        {"class_path": "tests.prd_helpers.BatchRecorder", "init_args": {"path": str(root / "batches_rank{rank}.jsonl")}},
        *(callbacks or []),
    ]
    trainer_config = dict(
        accelerator="cpu", devices=1, strategy="auto", precision="32-true", max_steps=max_steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=str(root), callbacks=all_callbacks,
    )  # fmt: skip
    trainer_config.update(trainer)
    model = {
        "base": str(base),
        "student_config": dict(TINY_STUDENT),
        "renderers": {
            "mesh": {"class_path": "renderers.MeshRenderer", "init_args": dict(TINY_MESH_RENDERER)},
            "volume": {"class_path": "renderers.NeuSVolumeRenderer", "init_args": dict(TINY_VOLUME_RENDERER)},
        },
        "render_resolution": dict(TINY_RENDER_RESOLUTION),
        "cameras": {"num_views": 2},
        "regularizers": dict(TINY_REGULARIZERS),
        "background": {"class_path": "renderers.TextConditionedBackground", "init_args": {"text_dim": 32, "hidden_dim": 8}},
        "teachers": {"color": {"class_path": "tests.prd_helpers.ColorTeacher"}},
        "accumulate_grad_batches": accumulate_grad_batches,
        "validation": {"num_views": 2, "resolution": 24, "log_images": 0, "log_meshes": 0, "mesh_resolution": 12},
    }
    data = {"train_prompts": list(prompts or PROMPTS), "val_prompts": [], "test_prompts": [], "batch_size": batch_size}
    return {
        "seed_everything": 0,
        "trainer": trainer_config,
        "model": {"class_path": "lightning_modules.training.prd_module.PRDModule", "init_args": model},
        "data": {"class_path": "datamodules.prompts.PromptDataModule", "init_args": data},
    }


def fit_with_cli(config: dict, path: Path, *args: str):
    """Write `config` to `path` and fit it through LightningCLI as `prd fit` does; returns the CLI (trainer, model)."""
    from lightning.pytorch.cli import LightningCLI

    write_config(config, path)
    cli = LightningCLI(
        args=["--config", str(path), *args], run=False, subclass_mode_model=True, subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
    )  # fmt: skip
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli


def write_config(config: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path


def subprocess_env(threads: int = 1) -> dict[str, str]:
    """Environment for `prd` subprocesses: offline, `threads` torch threads, the repository importable."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "PL_GLOBAL_SEED"):
        env.pop(key, None)  # a clean launch, whatever the test runner set
    return env


# ------------------------------------------------------------------------------------------ callbacks


class BatchRecorder(pl.Callback):
    """Appends every training batch this rank takes to a JSONL file (`{rank}` in `path` is the global rank):
    rank, process id, global step, epoch, batch index, seed, prompts and prompt indices. Appends across
    resumed runs (the process id tells the runs apart)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        record = {
            "rank": trainer.global_rank,
            "pid": os.getpid(),
            "global_step": trainer.global_step,
            "epoch": int(batch["epoch"]),
            "batch_idx": int(batch["batch_idx"]),
            "seed": int(batch["seed"]),
            "prompts": list(batch["prompts"]),
            "indices": [int(i) for i in batch["indices"]],
        }
        with open(self.path.format(rank=trainer.global_rank), "a") as file:
            file.write(json.dumps(record) + "\n")


class SaveCheckpointAtBatches(pl.Callback):
    """Writes `<dirpath>/batch=<n>.ckpt` after the n-th training batch since the start of training (counted
    over resumed runs too), for each n in `batches`: e.g. in the middle of an accumulation window."""

    def __init__(self, dirpath: str, batches: list[int]) -> None:
        self.dirpath = dirpath
        self.batches = set(batches)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done = trainer.fit_loop.epoch_loop.batch_progress.total.ready  # this batch included
        if done in self.batches:
            trainer.save_checkpoint(os.path.join(self.dirpath, f"batch={done}.ckpt"))


class WeightsDump(pl.Callback):
    """Every rank writes its trainable weights (`param/<name>`) and optimizer state (`optim/<index>/<key>`) to
    `<directory>/rank<r>_step<s>.safetensors` when training starts (s = the global step it starts at) and after
    every training batch (s = the global step after it)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _dump(self, trainer, pl_module) -> None:
        from safetensors.torch import save_file

        tensors = {f"param/{k}": p.detach().contiguous() for k, p in pl_module.trainable_named_parameters().items()}
        for index, state in trainer.optimizers[0].state_dict()["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"optim/{index}/{key}"] = value.detach().contiguous()
        os.makedirs(self.directory, exist_ok=True)
        save_file(tensors, os.path.join(self.directory, f"rank{trainer.global_rank}_step{trainer.global_step}.safetensors"))

    def on_train_start(self, trainer, pl_module) -> None:
        self._dump(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._dump(trainer, pl_module)


# --------------------------------------------------------------------------------------- comparisons


def read_batches(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()] if Path(path).exists() else []


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two nested checkpoint structures (dicts, lists, tensors, numbers) are not bit-for-bit equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(map(str, set(a) ^ set(b)))[:5]} differ"]
        return [d for key in a for d in differences(a[key], b[key], f"{where}/{key}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{where}[{i}]")]
    if torch.is_tensor(a) and torch.is_tensor(b):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [f"{where}: tensors differ (max |diff| {float((a.double() - b.double()).abs().max()) if a.shape == b.shape else 'shape'})"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def training_state(checkpoint: dict) -> dict:
    """What must be identical between two checkpoints of the same training moment: trainable weights,
    optimizer state, step counters, data position, PRD window state (not callback / timing bookkeeping)."""
    loops = checkpoint["loops"]["fit_loop"]
    return {
        "global_step": checkpoint["global_step"],
        "epoch": checkpoint["epoch"],
        "state_dict": checkpoint["state_dict"],
        "optimizer_states": checkpoint["optimizer_states"],
        "lr_schedulers": checkpoint["lr_schedulers"],
        "data": checkpoint["PromptDataModule"],
        "loader": loops["state_dict"].get("combined_loader"),
        "batches": loops["epoch_loop.batch_progress"]["total"],
        "prd": checkpoint["prd"],
    }


def xdist_group(name: str) -> list:
    """`[pytest.mark.xdist_group(name)]` when pytest-xdist is loaded (`make test` runs `--dist loadgroup`: the
    group's tests share one worker, so tests that start processes of their own do not run at the same time);
    `[]` under `-p no:xdist`, where `--strict-markers` does not know the marker."""
    try:
        return [pytest.mark.xdist_group(name)]
    except pytest.fail.Exception:
        return []
