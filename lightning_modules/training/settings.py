"""Plain settings of `PRDModule` (typed for LightningCLI / jsonargparse) and the student-config parser.

    cameras:                       # training cameras, drawn anew for every PRD step
      num_views: 4
      elevation_range: [0, 30]
    validation:                    # what validation generates, renders and logs
      num_views: 4
      resolution: 256
    student_config:                # flat form (or a reference pipeline config.json dict / path)
      ranks: 16                    # or {self_attn: 16, cross_attn: 16, locon: 16}
      output_dim: 64
      mlp_neurons: 64
      mlp_hidden_layers: 2
      latent_size: 32
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from lightning_modules.student.adapters import AdapterRanks
from lightning_modules.student.config import StudentConfig, StudentWeightsError
from renderers.errors import UserError


class TrainingSettingsError(UserError, ValueError):
    """A `PRDModule` setting out of its range or naming something that is not there (one-line message)."""


@dataclass
class CameraSampling:
    """Training cameras (see `renderers.cameras.sample_training_cameras`); reference values by default.

    Per object and PRD step: one elevation, one field of view and one relative distance for its
    `num_views` views, azimuths evenly spaced with one random offset; distance = relative / tan(fovy / 2).
    """

    num_views: int = 4
    elevation_range: tuple[float, float] = (0.0, 30.0)
    azimuth_range: tuple[float, float] = (-180.0, 180.0)
    fovy_range: tuple[float, float] = (60.0, 60.0)
    relative_distance_range: tuple[float, float] = (0.8, 1.0)

    def __post_init__(self) -> None:
        if self.num_views < 1:
            raise TrainingSettingsError(f"cameras.num_views must be >= 1, got {self.num_views}")
        for name in ("elevation_range", "azimuth_range", "fovy_range", "relative_distance_range"):
            low, high = getattr(self, name)
            if low > high:
                raise TrainingSettingsError(f"cameras.{name} must be [low, high] with low <= high, got [{low}, {high}]")

    def sampler_kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "num_views"}


@dataclass
class ValidationSettings:
    """What validation does for every validation prompt.

    The student generates from noise seeded with `seed + prompt index` (independent of the batch), the
    `renderers` (default: all) draw `num_views` evaluation views at `resolution` px (distance,
    elevation and fovy of the reference protocol), and the module logs:
    - `log_images` objects per validation run as render grids (rgb and normal rows, one column per
      view) to TensorBoard (0: none);
    - `log_meshes` objects per run as coloured meshes (TensorBoard mesh plugin), extracted on a
      `mesh_resolution`^3 grid (0: none);
    - the teacher losses on training-style cameras (seeded by the batch) when `teacher_losses`;
    - CLIP score / Recall@1 of the `clip_renderer` renders (default: the first renderer) when the
      module has a `clip_score` metric.
    """

    num_views: int = 4
    resolution: int = 256
    elevation: float = 15.0
    distance: float = 3.0
    fovy: float = 40.0
    renderers: list[str] | None = None
    log_images: int = 4
    log_meshes: int = 2
    mesh_resolution: int = 128
    teacher_losses: bool = True
    clip_renderer: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_views < 1 or self.resolution < 1:
            raise TrainingSettingsError(
                f"validation.num_views and validation.resolution must be >= 1, got {self.num_views} and {self.resolution}"
            )
        if self.log_images < 0 or self.log_meshes < 0:
            raise TrainingSettingsError(
                f"validation.log_images and validation.log_meshes must be >= 0, got {self.log_images} and {self.log_meshes}"
            )
        if self.mesh_resolution < 2:
            raise TrainingSettingsError(f"validation.mesh_resolution must be >= 2, got {self.mesh_resolution}")


def as_dataclass(cls, value):
    """`value` as an instance of the settings dataclass `cls` (None: defaults; a dict: its fields)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return replace(value)
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise TrainingSettingsError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**value)
    raise TypeError(f"expected {cls.__name__} or a dict, got {type(value).__name__}")


# ---------------------------------------------------------------------------------- student config

_FLAT_KEYS = {
    "ranks",
    "output_dim",
    "mlp_neurons",
    "mlp_hidden_layers",
    "latent_size",
    "latent_height",
    "latent_width",
    "latent_channels",
    "num_inference_steps",
    "n_feature_dims",
    "deformable_grid",
    "isosurface_resolution",
    "student_class",
    "representation",
}


def _ranks(value: Any) -> AdapterRanks:
    if isinstance(value, AdapterRanks):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return AdapterRanks(value, value, value)
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"self_attn", "cross_attn", "locon"})
        if unknown:
            raise StudentWeightsError(
                f"student_config.ranks: unknown key(s) {', '.join(unknown)}; use self_attn, cross_attn, locon"
            )
        return AdapterRanks(**{k: int(v) for k, v in value.items()})
    raise StudentWeightsError(
        f"student_config.ranks must be an int or {{self_attn, cross_attn, locon}}, got {value!r}"
    )


def resolve_student_config(spec: dict | str | os.PathLike | StudentConfig | None) -> StudentConfig | Path | None:
    """The student's hyper-parameters from a config value.

    None: the `config.json` beside `init_weights`, else the full-size defaults (decided by the student).
    A path: a reference pipeline `config.json`. A dict: either the reference pipeline-config fields
    (`space_generator_config`, `mlp_network_config`, ...) or the flat form with keys
    ranks (int or {self_attn, cross_attn, locon}), output_dim, mlp_neurons, mlp_hidden_layers,
    latent_size (both sides) / latent_height / latent_width, latent_channels, num_inference_steps,
    n_feature_dims, deformable_grid, isosurface_resolution, student_class (the import path of a
    `TriplaneStudent` subclass that brings another representation) and representation (that subclass's
    settings, a mapping).
    """
    if spec is None or isinstance(spec, StudentConfig):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise StudentWeightsError(f"student_config file {str(spec)!r} does not exist; pass a config.json or a dict")
        return path
    if not isinstance(spec, dict):
        raise StudentWeightsError(f"student_config must be a dict, a config.json path or null, got {type(spec).__name__}")
    if not set(spec) <= _FLAT_KEYS:
        flat_unknown = sorted(set(spec) - _FLAT_KEYS)
        try:
            return StudentConfig.from_dict(dict(spec), source="student_config")
        except StudentWeightsError:
            raise StudentWeightsError(
                f"student_config: unknown key(s) {', '.join(flat_unknown)}; use the flat keys "
                f"{', '.join(sorted(_FLAT_KEYS))} or the reference pipeline-config fields"
            ) from None
    values = dict(spec)
    kwargs: dict[str, Any] = {}
    if "ranks" in values:
        kwargs["ranks"] = _ranks(values.pop("ranks"))
    size = values.pop("latent_size", None)
    if size is not None:
        kwargs["latent_height"] = kwargs["latent_width"] = int(size)
    for key, value in values.items():
        if key in ("student_class", "representation"):
            kwargs[key] = value
        else:
            kwargs[key] = bool(value) if key == "deformable_grid" else int(value)
    return StudentConfig(**kwargs)


# ------------------------------------------------------------------------------------------ timing


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepTimer:
    """Wall-clock seconds per named part of a step; CUDA work is synchronised at part boundaries."""

    device: torch.device | None = None
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)  # part -> (start, end) of its last use

    @contextmanager
    def __call__(self, part: str):
        _synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize(self.device)
            end = time.perf_counter()
            self.seconds[part] += end - start
            self.spans[part] = (start, end)

    def last(self, part: str) -> tuple[float, float]:
        return self.spans[part]


class BackwardClock:
    """Splits one backward pass into teacher / render / student time with gradient hooks.

    `watch(tensor, part)`: the first gradient reaching any tensor watched as `part` marks where that part's
    backward begins: "render" on the rendered images (the teachers' backward ends there), "student" on the
    triplanes (the renderers' backward ends there). Approximate where the parts overlap (e.g. regulariser
    gradients reach the renderer without passing the images).
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.first: dict[str, float] = {}

    def watch(self, tensor: torch.Tensor, part: str) -> None:
        if tensor.requires_grad:
            tensor.register_hook(lambda grad, part=part: self._mark(part))

    def _mark(self, part: str) -> None:
        if part not in self.first:
            _synchronize(self.device)
            self.first[part] = time.perf_counter()

    def split(self, span: tuple[float, float]) -> dict[str, float]:
        """Seconds per part of the backward pass that ran over `span` = (start, end)."""
        start, end = span
        render = self.first.get("render", start)
        student = self.first.get("student", render)
        return {"teacher": render - start, "render": max(0.0, student - render), "student": end - student}


@dataclass
class PRDBatchResult:
    """What one PRD batch (all its denoising steps) produced.

    terms: loss name -> value averaged over the PRD steps ("mvdream/mesh", "reg/volume/eikonal", ...),
        as they entered the total (teacher weights and regulariser weights applied).
    raw_regularizers: "renderer/name" -> unweighted regulariser value averaged over the steps.
    total: the summed loss, averaged over the steps (before the accumulation scale).
    nonfinite: names of the terms (or "latent") that were NaN / inf at some step.
    seconds: wall-clock seconds per part: student (text, UNet, decoder forward), render, teacher, backward.
    """

    terms: dict[str, float]
    raw_regularizers: dict[str, float]
    total: float
    nonfinite: list[str]
    seconds: dict[str, float]
