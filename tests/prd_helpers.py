"""Helpers of the PRD training tests: tiny teachers (importable by class_path), a tiny PRDModule, small data."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from renderers.types import RenderOutput
from teachers.base import Teacher

TINY_STUDENT = dict(ranks=2, output_dim=8, mlp_neurons=16, mlp_hidden_layers=1, latent_size=8)
PROMPTS = ["a red ball", "a blue cube", "a green cone", "a yellow donut"]


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


def tiny_renderers(mesh_grid: int = 12, samples: tuple[int, int] = (12, 6)) -> dict:
    from renderers import MeshRenderer, NeuSVolumeRenderer

    return {
        "mesh": MeshRenderer(resolution=mesh_grid, backend="torch"),
        "volume": NeuSVolumeRenderer(
            num_proposal_samples=samples[0], num_importance_samples=samples[1], global_downsample=2, patch_size=8
        ),
    }


def tiny_module(base: Path | str, teachers=None, **overrides):
    """A PRDModule on a tiny SD directory with tiny renderers (24 px mesh, 16 px volume) and a ColorTeacher."""
    from lightning_modules.prd_module import PRDModule

    kwargs = dict(
        teachers=teachers if teachers is not None else {"color": ColorTeacher()},
        renderers=tiny_renderers(),
        base=str(base),
        student_config=dict(TINY_STUDENT),
        render_resolution={"mesh": 24, "volume": 16},
        cameras=dict(num_views=2),
        regularizers={"volume/eikonal": [0, 0.5, 0.0, 10], "sparsity": 0.1},
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
