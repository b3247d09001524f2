"""Any subset of teachers, each with its own weight schedule, combined by configuration.

    teachers:
      class_path: teachers.ensemble.TeacherEnsemble
      init_args:
        teachers:
          mvdream:
            class_path: teachers.mvdream.MVDreamTeacher
            init_args: {ckpt_path: pretrained/sd-v2.1-base-4view.pt, config_path: pretrained/sd-v2-base.yaml}
          sd:
            class_path: teachers.stable_diffusion.StableDiffusionTeacher
            init_args: {weight: [0, 1.0, 0.0, 10000]}

Removing a teacher is deleting its entry; swapping one is changing its `class_path`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Union

import torch
from torch import Tensor, nn

from teachers.base import RenderInput, Teacher


class TeacherEnsemble(nn.Module):
    """Calls every teacher whose weight is non-zero at this step and returns its weighted losses.

    Args:
        teachers: name -> teacher, or a list (named by each teacher's `name`). The names are the
            loss keys: `{name}` for one render, `{name}/{renderer}` for several.
        share_weights: teachers that load the same frozen model (same source, dtype and options, e.g. the SD 2.1
            VAE encoder of MVDream and of the SD teacher) use one copy of it (identical maths, less memory).
    """

    def __init__(self, teachers: Union[dict[str, Teacher], list[Teacher]], share_weights: bool = True) -> None:
        super().__init__()
        if isinstance(teachers, dict):
            named = dict(teachers)
        else:
            named = {}
            for teacher in teachers:
                name, suffix = teacher.name, 1
                while name in named:
                    suffix += 1
                    name = f"{teacher.name}_{suffix}"
                named[name] = teacher
        if not named:
            raise ValueError("TeacherEnsemble needs at least one teacher")
        for name, teacher in named.items():
            if not isinstance(teacher, Teacher):
                raise TypeError(
                    f"teacher {name!r} is a {type(teacher).__name__}, not a teachers.base.Teacher"
                )
            teacher.name = name
        # Registering the teachers is harmless: they hold no parameters or buffers.
        self.teachers = nn.ModuleDict(named)
        self.share_weights = share_weights
        self._shared: dict[tuple, nn.Module] = {}  # frozen source -> the one loaded copy
        self.last_weights: dict[str, float] = {}

    def load(self, teacher: Teacher) -> None:
        """Load `teacher`'s frozen models if needed; with `share_weights`, swap in the copies that an earlier
        teacher loaded from the same source (the teacher's own copy is dropped)."""
        if not teacher.is_loaded:
            teacher.load()
        if not self.share_weights:
            return
        for name, source in teacher.frozen_sources.items():
            if name not in teacher.frozen:
                continue
            shared = self._shared.setdefault(source, teacher.frozen[name])
            teacher.frozen[name] = shared

    def weights(self, step: int) -> dict[str, float]:
        return {name: teacher.weight(step) for name, teacher in self.teachers.items()}

    def check_weights(self) -> None:
        """Every teacher's `check_weights` (one-line error for weights not on this machine; loads nothing)."""
        for teacher in self.teachers.values():
            teacher.check_weights()

    def prepare_prompts(self, prompts: Iterable[str]) -> None:
        """Fill every teacher's prompt cache (call once in `setup`; rank 0 writes under DDP)."""
        prompts = list(prompts)
        for teacher in self.teachers.values():
            if hasattr(teacher, "prepare_prompts"):
                teacher.prepare_prompts(prompts)

    def forward(
        self,
        renders: RenderInput,
        prompts: Sequence[str] | object,
        step: int,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Weighted losses of all active teachers (sum them for the total teacher loss)."""
        self.last_weights = self.weights(step)
        losses: dict[str, Tensor] = {}
        for name, teacher in self.teachers.items():
            weight = self.last_weights[name]
            if weight == 0:
                continue
            self.load(teacher)
            for key, loss in teacher(renders, prompts, step, generator).items():
                losses[key] = weight * loss
        return losses


def total_loss(losses: dict[str, Tensor], renderer: str | None = None) -> Tensor:
    """Sum of `losses` (optionally only the keys of one renderer, `.../renderer`)."""

    def matches(key: str) -> bool:
        if renderer is None:
            return True
        suffix = key.split("/", 1)[1] if "/" in key else ""
        return suffix == renderer or suffix.startswith(renderer + "_")

    chosen = [loss for key, loss in losses.items() if matches(key)]
    if not chosen:
        raise ValueError(f"no losses{' for renderer ' + repr(renderer) if renderer else ''}")
    return torch.stack(chosen).sum()
