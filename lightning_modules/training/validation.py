"""Validation and test of `PRDModule` (a mixin): the student generates every validation prompt from seeded noise,
the renderers draw the evaluation views, and the module logs teacher losses, render grids, coloured meshes and
the CLIP score (see `settings.ValidationSettings`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from lightning_modules.student.generation import slugify
from lightning_modules.training.artifacts import mesh_colors, render_grid, tensorboard_mesh
from renderers.cameras import evaluation_cameras
from renderers.types import RenderOutput


class ValidationMixin:
    """`PRDModule`'s validation / test steps and what they log (uses its student, renderers, teachers,
    `validation` settings and `clip_score`)."""

    def on_validation_epoch_start(self) -> None:
        self._val_images_logged = self._val_meshes_logged = 0

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_clip_score("val")

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self._log_clip_score("test")

    def generate(self, prompts: list[str], indices: Iterable[int]):
        """The student's few-step sample for `prompts`, object i from noise seeded `validation.seed + indices[i]`."""
        student = self._require_student()
        text = student.encode_prompt(prompts)
        noise = torch.cat([student.make_noise(1, seed=self.validation.seed + int(i)) for i in indices])
        return student.sample(text, noise=noise, num_steps=self.num_steps), text

    def _evaluate(self, batch: Mapping[str, Any], stage: str) -> None:
        # Lightning evaluates under inference_mode, where the volume renderer cannot take SDF gradients
        # for its normals; plain no_grad is enough here.
        with torch.inference_mode(False), torch.no_grad():
            self._evaluate_batch(batch, stage)

    def _evaluate_batch(self, batch: Mapping[str, Any], stage: str) -> None:
        settings = self.validation
        prompts = list(batch["prompts"])
        indices = [int(i) for i in batch["indices"]]
        batch_size = len(prompts)
        device = self.student.device
        field, text = self.generate(prompts, indices)

        if settings.teacher_losses:
            generator = torch.Generator().manual_seed(int(batch["seed"]))
            self._attach_generator(generator)
            renders = self.render_all(field, self.sample_cameras(batch_size, generator, device), text)
            losses = self.teachers(list(renders.values()), prompts, self.global_step, generator)
            if losses:
                self.log_dict({f"{stage}/{k}": float(v) for k, v in losses.items()}, batch_size=batch_size, sync_dist=True)
                self.log(f"{stage}/teacher_loss", float(sum(float(v) for v in losses.values())), batch_size=batch_size, sync_dist=True)

        cameras = evaluation_cameras(
            settings.num_views,
            batch_size=batch_size,
            elevation=settings.elevation,
            distance=settings.distance,
            fovy=settings.fovy,
            height=settings.resolution,
            width=settings.resolution,
            device=device,
        )
        names = settings.renderers or list(self.renderers)
        views = self.render_all(field, cameras, text, names=names, size=settings.resolution)
        if self.clip_score is not None:
            clip_name = settings.clip_renderer or names[0]
            rendered = views[clip_name] if clip_name in views else self.render_all(field, cameras, text, [clip_name], settings.resolution)[clip_name]
            self.clip_score.update(rendered["rgb"].float().clamp(0, 1), prompts)
        self._log_artifacts(stage, field, views, prompts, indices)

    def _experiment(self):
        """The TensorBoard SummaryWriter on rank 0 (None otherwise: images and meshes are skipped)."""
        if self.global_rank != 0 or self.logger is None:
            return None
        experiment = getattr(self.logger, "experiment", None)
        return experiment if hasattr(experiment, "add_image") else None

    def _log_artifacts(self, stage: str, field, views: Mapping[str, RenderOutput], prompts: list[str], indices: list[int]) -> None:
        writer = self._experiment()
        if writer is None:
            return
        settings = self.validation
        step = self.global_step
        for b, (prompt, index) in enumerate(zip(prompts, indices, strict=True)):
            if self._val_images_logged >= settings.log_images:
                break
            tag = f"{index:04d}_{slugify(prompt, 40)}"
            for name, render in views.items():
                grid = render_grid({key: image[b] for key, image in render.images.items()})
                writer.add_image(f"{stage}_render_{name}/{tag}", grid, step)
            writer.add_text(f"{stage}_prompts/{tag}", prompt, step)
            self._val_images_logged += 1
        wanted = min(len(prompts), settings.log_meshes - self._val_meshes_logged)
        if wanted > 0 and hasattr(writer, "add_mesh"):
            from renderers.marching_cubes import extract_mesh

            meshes = extract_mesh(field, resolution=settings.mesh_resolution)
            colors = mesh_colors(field, meshes)
            for b in range(wanted):
                if meshes[b].num_faces == 0:
                    continue
                tag = f"{indices[b]:04d}_{slugify(prompts[b], 40)}"
                writer.add_mesh(f"{stage}_meshes/{tag}", global_step=step, **tensorboard_mesh(meshes[b], colors[b]))
                self._val_meshes_logged += 1

    def _log_clip_score(self, stage: str) -> None:
        if self.clip_score is None or not self.clip_score.update_count:
            return
        values = self.clip_score.compute()
        self.log(f"{stage}/clip_score", values["clip_score"])
        self.log(f"{stage}/clip_recall_at_1", values["recall_at_1"])
        self.clip_score.reset()
