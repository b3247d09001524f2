"""`PRDModule`: Progressive Rendering Distillation of a `TriplaneStudent` with frozen teachers (no 3D data).

    model:
      class_path: lightning_modules.training.prd_module.PRDModule
      init_args:
        base: stabilityai/stable-diffusion-2-1-base     # the student's Stable Diffusion
        renderers: {mesh: {class_path: renderers.MeshRenderer}, volume: {class_path: renderers.NeuSVolumeRenderer}}
        teachers: {class_path: teachers.ensemble.TeacherEnsemble, init_args: {teachers: {...}}}

One training batch (the reference loop, manual optimisation):

    latent = noise [B, 6, 4, h, w]                                   (seeded by batch["seed"])
    for t in 999, 749, 499, 249:
        x0 = student.predict_x0(add_noise(latent, fresh noise, t), t, text)
        field = student.decode(x0);  cameras = new random cameras
        renders = every renderer (field, cameras);  loss = teachers(renders) + regularisers
        backward(loss / steps / accumulate_grad_batches) at once;  latent = x0.detach()
    every accumulate_grad_batches batches: optional clipping, ONE optimizer step, zero_grad

Every random draw of a batch (noise, cameras, volume-renderer jitter and patch, teacher timesteps and
noise) comes from one CPU generator seeded with `batch["seed"]`, so a batch is reproducible on any
device and a resumed run repeats the uninterrupted one.

A NaN / inf loss term, latent or gradient marks the accumulation window: at its end the optimizer step
is skipped, the gradients of the WHOLE window are dropped (a NaN poisons the sum, so a single batch
cannot be taken out), `train/nonfinite_skips` is incremented and a warning logged; training goes on
(and stops with an error after `max_consecutive_skips` skipped windows in a row). Under DDP the
decision is shared by all ranks, so they stay in step.

Checkpoints hold only what trains (adapters, the new VAE conv_out, the MLPs, a learned background),
the optimizer state, the data position (saved by the DataModule), the accumulation window and the
skip counter; never the frozen base or the teachers. `load_state_dict` checks the trainable keys strictly.
Checkpoint files are written atomically (`checkpoint_io.AtomicCheckpointIO`, installed in `on_fit_start` when
the trainer has Lightning's default writer): a job killed mid-write leaves the previous checkpoint intact.

This file is the loop; the plumbing sits beside it, as mixins of `PRDModule`: `optimization.py` (optimizer,
accumulation window, DDP no_sync, non-finite skipping), `checkpoints.py` (trainable state dict, checkpoint
hooks, `export_student_weights`) and `validation.py` (validation / test generation and logging).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_modules.evaluation.clip_score import CLIPScore3D
from lightning_modules.training.checkpoint_io import use_atomic_checkpoints
from lightning_modules.training.checkpoints import TrainableStateMixin
from lightning_modules.training.optimization import OptimizerStepMixin
from lightning_modules.training.settings import (
    BackwardClock,
    CameraSampling,
    PRDBatchResult,
    StepTimer,
    TrainingSettingsError,
    ValidationSettings,
    as_dataclass,
    resolve_student_config,
)
from lightning_modules.training.validation import ValidationMixin
from renderers.cameras import resized, sample_training_cameras
from renderers.errors import UserError
from renderers.types import Cameras, RenderOutput
from teachers.base import Teacher
from teachers.ensemble import TeacherEnsemble
from teachers.schedules import Schedule, ScheduleLike

log = logging.getLogger(__name__)
# Lightning 2.6 warns that checkpoints of manual-optimisation modules hold the state AFTER the optimizer step;
# that is what PRD wants (the state, global step and data position of the same moment).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")

DEFAULT_BASE = "stabilityai/stable-diffusion-2-1-base"


_AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def _autocast_dtype(name: str | None) -> torch.dtype | None:
    if name is None or str(name).lower() in ("none", "null", "false", "32", "float32"):
        return None
    if str(name).lower() not in _AUTOCAST_DTYPES:
        raise TrainingSettingsError(f"student_autocast must be bfloat16, float16 or null, got {name!r}")
    return _AUTOCAST_DTYPES[str(name).lower()]


def _sdpa_backends(name: str | None) -> list | None:
    """`torch.nn.attention.SDPBackend`s for a comma list of kernel names (None / "auto": PyTorch's choice)."""
    if name is None or str(name).lower() == "auto":
        return None
    from torch.nn.attention import SDPBackend

    chosen = [part.strip().lower() for part in str(name).split(",") if part.strip()]
    unknown = [part for part in chosen if part not in _SDPA_BACKENDS]
    if unknown or not chosen:
        raise TrainingSettingsError(f"attention_backend {name!r}: use auto or a comma list of {', '.join(_SDPA_BACKENDS)}")
    members = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return [members[part] for part in chosen]


def _with_attention_kernels(method):
    """Run a `PRDModule` method under the module's configured SDPA kernels (`_attention_kernels`)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._attention_kernels():
            return method(self, *args, **kwargs)

    return run


def recorded_base(base: str) -> str:
    """How a student records its base: the absolute path of a local folder, else the hub id as given."""
    path = Path(base).expanduser()
    return str(path.resolve()) if path.exists() else str(base)


# Init args that are objects (built by jsonargparse): kept out of hyper_parameters outside LightningCLI,
# where they would be pickled into every checkpoint.
_OBJECT_ARGS = ("teachers", "renderers", "background", "optimizer", "lr_scheduler", "clip_score")


class PRDModule(ValidationMixin, OptimizerStepMixin, TrainableStateMixin, pl.LightningModule):
    """Progressive Rendering Distillation: trains the student's adapters, conv_out and MLPs from prompts only.

    Args:
        teachers: a `TeacherEnsemble`, or name -> `Teacher` (any subset; each with its weight schedule).
        renderers: name -> renderer (`renderers.MeshRenderer`, `renderers.NeuSVolumeRenderer`, ...), each
            applied at every PRD step; every teacher loss is applied to every render. The names key the
            losses ("mvdream/mesh") and the settings below.
        base: the student's Stable Diffusion: a diffusers directory or hub id.
        student_config: the student's sizes (see `settings.resolve_student_config`); None: the
            config.json beside `init_weights`, else the full-size defaults.
        init_weights: start from trained student weights instead of fresh adapters (fine-tuning): the
            released TriplaneTurbo checkpoint (`ZhiyuanthePony/TriplaneTurbo`, or a local
            `triplane_turbo_sd_v1.pth`) or an own export (`save_pretrained` directory / model.safetensors).
            Ignored in effect when resuming with `--ckpt_path` (the checkpoint's weights win).
        gradient_checkpointing: recompute the student's UNet / VAE-decoder activations in backward.
        student_autocast: "bfloat16" (or "float16"): the student's UNet and VAE-decoder forwards under
            `torch.autocast` of that dtype, weights, optimizer and everything after the decoder in float32.
            None: plain float32 (reference).
        attention_backend: the `scaled_dot_product_attention` kernels every attention of a PRD batch may use
            ("flash", "efficient", "cudnn", "math"; None: PyTorch's choice). All attention (student, joint
            6-plane, VAE, teachers, cross-view) goes through SDPA.
        share_text_encoder: teachers whose text encoder is the student's base (SD 2.1 for MVDream and SD) encode
            prompts with the student's frozen text encoder instead of loading a second copy (identical maths).
        background: a background module shared by every renderer (e.g. the learned
            `renderers.TextConditionedBackground`; its parameters train); None: each renderer's own.
        render_resolution: render size in pixels (square), one for all renderers or name -> size
            (reference: mesh 512, volume 128).
        cameras: training camera sampling (`CameraSampling`).
        num_steps: PRD / sampling steps (None: the student's, 4: timesteps 999, 749, 499, 249).
        regularizers: regulariser name -> weight schedule, applied to every render that returns it
            ("eikonal", "sparsity"), or "renderer/name" for one renderer.
        renderer_schedules: "renderer.attribute" -> schedule, set on the renderer before every step
            (e.g. "mesh.sdf_grad_shrink", "volume.rgb_grad_shrink").
        optimizer: optimizer factory over the trainable parameters (class_path + init_args in YAML);
            None: Adan (pytorch-optimizer) with the reference's lr 2e-4, betas (0.98, 0.92, 0.99), eps 1e-15.
        lr_scheduler: optional LR scheduler factory, stepped after every optimizer step.
        accumulate_grad_batches: batches per optimizer step (each batch's loss is divided by it).
        gradient_clip_val: clip the global gradient norm to this value (None: no clipping).
        max_consecutive_skips: raise after this many skipped (non-finite) optimizer steps in a row.
        prepare_prompt_cache: at the start of fit, rank 0 encodes the train and val prompts of libraries of
            up to this many prompts into the teachers' caches while the other ranks wait at a barrier;
            prompts of larger libraries are encoded when first needed by the rank that needs them
            (atomic per-prompt files). 0 switches the preparation off.
        validation: what validation generates and logs (`ValidationSettings`).
        clip_score: an optional `CLIPScore3D` logged at the end of each validation run.
        init_seed: draw the student's new weights (adapters, conv_out, MLPs) from this seed instead of the
            global RNG, so that the model PRD starts from does not change with `seed_everything` (which then
            varies the training draws only: noise, cameras, prompt order). None: the global RNG.
    """

    def __init__(
        self,
        teachers: Union[TeacherEnsemble, dict[str, Teacher]],
        renderers: dict[str, nn.Module],
        base: str = DEFAULT_BASE,
        student_config: Union[dict, str, None] = None,
        init_weights: str | None = None,
        gradient_checkpointing: bool = False,
        student_autocast: str | None = None,
        attention_backend: str | None = None,
        share_text_encoder: bool = True,
        background: nn.Module | None = None,
        render_resolution: Union[int, dict[str, int]] = 128,
        cameras: CameraSampling | None = None,
        num_steps: int | None = None,
        regularizers: dict[str, ScheduleLike] | None = None,
        renderer_schedules: dict[str, ScheduleLike] | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        max_consecutive_skips: int = 100,
        prepare_prompt_cache: int = 100_000,
        validation: ValidationSettings | None = None,
        clip_score: CLIPScore3D | None = None,
        init_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self._save_hyperparameters()

        if accumulate_grad_batches < 1:
            raise TrainingSettingsError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise TrainingSettingsError(f"gradient_clip_val must be > 0 or null, got {gradient_clip_val}")
        if num_steps is not None and num_steps < 1:
            raise TrainingSettingsError(f"num_steps must be >= 1 or null, got {num_steps}")
        if not renderers:
            raise TrainingSettingsError("PRDModule needs at least one renderer (e.g. renderers.MeshRenderer)")

        self.base = str(base)
        self.student_config = resolve_student_config(student_config)  # parsed now: config errors surface early
        self.init_weights = init_weights
        self.gradient_checkpointing = gradient_checkpointing
        self.student_autocast = _autocast_dtype(student_autocast)
        self.attention_backends = _sdpa_backends(attention_backend)
        self.share_text_encoder = share_text_encoder
        self.num_steps = num_steps
        self.cameras = as_dataclass(CameraSampling, cameras)
        self.validation = as_dataclass(ValidationSettings, validation)
        self.accumulate_grad_batches = int(accumulate_grad_batches)
        self.gradient_clip_val = gradient_clip_val
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.prepare_prompt_cache = int(prepare_prompt_cache)
        self.init_seed = init_seed
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler

        # Registered before the renderers, so its parameters are named "background.*".
        self.background = background
        self.renderers = nn.ModuleDict(dict(renderers))
        if background is not None:
            for name, renderer in self.renderers.items():
                if not hasattr(renderer, "background"):
                    raise TrainingSettingsError(f"renderer {name!r} ({type(renderer).__name__}) has no background to replace")
                renderer.background = background
        for module in [*self.renderers.modules(), *([background] if background is not None else [])]:
            fallback = getattr(module, "default_embedding", None)
            if isinstance(fallback, nn.Parameter):
                # PRD always renders with the prompts' text embeddings: a background's no-text fallback never gets
                # a gradient (plain DDP stops on such parameters), so it stays frozen and out of the checkpoints.
                fallback.requires_grad_(False)
        self.render_resolution = self._per_renderer(render_resolution, "render_resolution")
        self.teachers = teachers if isinstance(teachers, TeacherEnsemble) else TeacherEnsemble(teachers)
        self.regularizer_weights = {key: Schedule.parse(value) for key, value in (regularizers or {}).items()}
        for key in self.regularizer_weights:
            if "/" in key and key.split("/", 1)[0] not in self.renderers:
                raise TrainingSettingsError(f"regularizer {key!r} names renderer {key.split('/', 1)[0]!r}, not one of {', '.join(self.renderers)}")
        self.renderer_schedules = self._parse_renderer_schedules(renderer_schedules or {})
        for name in self.validation.renderers or ():
            if name not in self.renderers:
                raise TrainingSettingsError(f"validation.renderers: {name!r} is not one of {', '.join(self.renderers)}")
        if self.validation.clip_renderer is not None and self.validation.clip_renderer not in self.renderers:
            raise TrainingSettingsError(f"validation.clip_renderer {self.validation.clip_renderer!r} is not one of {', '.join(self.renderers)}")
        self.clip_score = clip_score

        self.student = None  # built in configure_model (nothing heavy at construction / --print_config)
        self.nonfinite_skips = 0
        self.consecutive_skips = 0
        self._window_batches = 0  # batches backpropagated since the last optimizer step
        self._window_nonfinite: list[str] = []
        self._pending_grads: dict[str, Tensor] | None = None
        self._checked_regularizers = False
        self._val_images_logged = 0
        self._val_meshes_logged = 0

    # ---------------------------------------------------------------------------------------- set-up

    def _save_hyperparameters(self) -> None:
        """Under LightningCLI the whole (plain) config is saved; elsewhere only the plain arguments."""
        try:
            from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

            given = _given_hyperparameters.get()
        except ImportError:  # another Lightning version: keep the safe path
            given = None
        if given is not None:
            self.save_hyperparameters()
            return
        frame = inspect.currentframe().f_back  # PRDModule.__init__
        names = [name for name in inspect.signature(PRDModule.__init__).parameters if name != "self"]
        plain = {name: frame.f_locals[name] for name in names if name not in _OBJECT_ARGS}
        for name, cls in (("cameras", CameraSampling), ("validation", ValidationSettings)):
            settings = as_dataclass(cls, plain[name])
            plain[name] = {f: getattr(settings, f) for f in settings.__dataclass_fields__}
        self.save_hyperparameters(plain)

    def _per_renderer(self, value: int | Mapping[str, int], what: str) -> dict[str, int]:
        if isinstance(value, Mapping):
            missing = [name for name in self.renderers if name not in value]
            unknown = [name for name in value if name not in self.renderers]
            if missing or unknown:
                raise TrainingSettingsError(
                    f"{what} must give a size for every renderer ({', '.join(self.renderers)}); "
                    f"missing: {missing or 'none'}, unknown: {unknown or 'none'}"
                )
            sizes = {name: int(value[name]) for name in self.renderers}
        else:
            sizes = {name: int(value) for name in self.renderers}
        for name, size in sizes.items():
            if size < 1:
                raise TrainingSettingsError(f"{what}[{name}] must be >= 1, got {size}")
        return sizes

    def _parse_renderer_schedules(self, schedules: Mapping[str, ScheduleLike]) -> dict[tuple[str, str], Schedule]:
        parsed = {}
        for key, value in schedules.items():
            name, _, attribute = key.partition(".")
            if name not in self.renderers or not attribute:
                raise TrainingSettingsError(f"renderer_schedules key {key!r} must be 'renderer.attribute' with a renderer in {', '.join(self.renderers)}")
            if not hasattr(self.renderers[name], attribute):
                raise TrainingSettingsError(f"renderer_schedules: renderer {name!r} ({type(self.renderers[name]).__name__}) has no attribute {attribute!r}")
            parsed[(name, attribute)] = Schedule.parse(value)
        return parsed

    def configure_model(self) -> None:
        """Build the student (loads the base model and, with `init_weights`, the trained weights)."""
        if self.student is not None:
            return
        from lightning_modules.student import TriplaneStudent

        with torch.random.fork_rng(enabled=self.init_seed is not None):
            if self.init_seed is not None:
                torch.manual_seed(self.init_seed)
            student = TriplaneStudent.from_pretrained(self.base, weights=self.init_weights, config=self.student_config)
        # The student records the base it is trained on (config.json of its exports, the checkpoints'
        # student_config), so that `prd generate --weights ...` finds it without --base.
        student.config = replace(student.config, base_model_name_or_path=recorded_base(self.base))
        self.student = student.train()  # from_pretrained returns it in eval mode; Lightning keeps modes as found
        self.apply_memory_settings()
        self._check_background_width()

    def apply_memory_settings(self) -> None:
        """Apply gradient checkpointing, autocast and text-encoder sharing to the built student (configure_model
        calls it; call it again after replacing `self.student`)."""
        student = self.student
        if self.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        student.set_autocast(self.student_autocast)
        if not self.share_text_encoder or student.text_encoder is None or student.tokenizer is None:
            return
        for teacher in self.teachers.teachers.values():
            if getattr(teacher, "text_encoder", None) is None or not hasattr(teacher, "prompt_processor"):
                continue
            processor = teacher.prompt_processor
            if recorded_base(teacher.text_encoder) == recorded_base(self.base) and processor.dtype == student.dtype:
                processor.use_encoder(student.text_encoder, student.tokenizer)

    def check_inputs(self, check_base: bool = True) -> None:
        """One-line errors for weights that are not on this machine, before anything loads (`prd fit` calls it up
        front): a local base model (unless `check_base=False`: `prd demo` builds its own) or `init_weights` that is
        not there, the teachers' weights (local files, and with `HF_HUB_OFFLINE=1` hub ids not in the cache; online,
        hub ids are fetched when they load)."""
        from lightning_modules.student.weights import check_local_paths

        check_local_paths(self.base if check_base else None, self.init_weights)
        self.teachers.check_weights()

    def _check_background_width(self) -> None:
        embedding = getattr(self.background, "default_embedding", None)
        width = getattr(self.student.text_encoder, "config", None)
        width = getattr(width, "hidden_size", None)
        if isinstance(embedding, Tensor) and width is not None and embedding.shape[-1] != width:
            raise UserError(
                f"background text_dim {embedding.shape[-1]} does not match the student's text embedding width "
                f"{width}: set model.init_args.background.init_args.text_dim: {width}"
            )

    def _require_student(self):
        if self.student is None:
            self.configure_model()
        return self.student

    # ------------------------------------------------------------------------------------ PRD batch

    def apply_schedules(self, step: int) -> None:
        """Set the scheduled renderer attributes (gradient shrink, ...) for global step `step`."""
        for (name, attribute), schedule in self.renderer_schedules.items():
            setattr(self.renderers[name], attribute, schedule(step))

    def _attach_generator(self, generator: torch.Generator) -> None:
        """Route the renderers' and backgrounds' own random draws through the batch's generator."""
        for module in [*self.renderers.modules(), *([self.background] if self.background is not None else [])]:
            if hasattr(module, "generator") and not isinstance(module, Teacher):
                module.generator = generator

    def sample_cameras(self, batch_size: int, generator: torch.Generator, device: torch.device) -> Cameras:
        """Training cameras `[B, V]` (their image size is set per renderer)."""
        return sample_training_cameras(
            batch_size, self.cameras.num_views, generator=generator, device=device, **self.cameras.sampler_kwargs()
        )

    def render_all(
        self, field, cameras: Cameras, text_embedding: Tensor | None, names: Iterable[str] | None = None, size: int | None = None
    ) -> dict[str, RenderOutput]:
        """name -> render of `field` by each renderer (at its `render_resolution`, or `size`)."""
        renders = {}
        for name in names or self.renderers:
            pixels = size or self.render_resolution[name]
            render = self.renderers[name](field, resized(cameras, pixels, pixels), text_embedding)
            render.renderer = name  # teachers key their losses by it: "mvdream/<name>"
            renders[name] = render
        return renders

    def regularizer_terms(self, renders: Mapping[str, RenderOutput], step: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(weighted terms "reg/<renderer>/<name>", raw values "<renderer>/<name>") of the configured regularisers."""
        if not self._checked_regularizers:
            available = {f"{r}/{n}" for r, render in renders.items() for n in render.regularizers}
            for key in self.regularizer_weights:
                if not any(a == key or a.split("/", 1)[1] == key for a in available):
                    raise TrainingSettingsError(
                        f"regularizer {key!r} is returned by no renderer (they return: {', '.join(sorted(available)) or 'none'})"
                    )
            self._checked_regularizers = True
        weighted, raw = {}, {}
        for renderer_name, render in renders.items():
            for reg_name, value in render.regularizers.items():
                key = f"{renderer_name}/{reg_name}"
                raw[key] = value
                schedule = self.regularizer_weights.get(key, self.regularizer_weights.get(reg_name))
                if schedule is not None and schedule(step) != 0:
                    weighted[f"reg/{key}"] = schedule(step) * value
        return weighted, raw

    def _zero_loss(self) -> Tensor:
        """0 connected to every trainable parameter (a backward that still meets every DDP hook)."""
        return sum((p.sum() for p in self.trainable_parameters()), torch.zeros((), device=self.student.device)) * 0.0

    def _attention_kernels(self):
        """The configured SDPA kernels (`attention_backend`) as a context, or a context that changes nothing."""
        if self.attention_backends is None:
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(self.attention_backends)

    @_with_attention_kernels
    def run_prd_batch(
        self,
        batch: Mapping[str, Any],
        step: int,
        backward: Callable[[Tensor, bool], None] | None = None,
        loss_scale: float = 1.0,
        sync_last: bool = True,
        split_backward: bool = False,
    ) -> PRDBatchResult:
        """One PRD batch: all denoising steps from pure noise, each rendered, judged and backpropagated at once,
        under the configured attention kernels.

        batch: {"prompts": B strings, "seed": int} (a `PromptDataModule` training batch).
        step: the global (optimizer) step that schedules are evaluated at.
        backward: `backward(loss, sync)` (None: forward only); `sync` is True for the last backward of the
            batch when `sync_last` (the one that may all-reduce gradients under DDP).
        loss_scale: multiplies every backpropagated loss (1 / accumulate_grad_batches in training).
        split_backward: also time the backward pass by part ("backward/teacher", "backward/render",
            "backward/student"), from gradient hooks at the renders and at the triplanes (benchmarks; it
            synchronises CUDA inside the backward pass).
        """
        student = self._require_student()
        prompts = list(batch["prompts"])
        batch_size = len(prompts)
        device = student.device
        generator = torch.Generator().manual_seed(int(batch["seed"]))
        self._attach_generator(generator)
        timer = StepTimer(device)
        timesteps = student.sampling_timesteps(self.num_steps).tolist()
        step_weight = 1.0 / len(timesteps)
        terms: dict[str, float] = defaultdict(float)
        raw_regs: dict[str, float] = defaultdict(float)
        nonfinite: list[str] = []
        total = 0.0

        with timer("student"):
            text = student.encode_prompt(prompts)  # [B, 77, D], no gradient
            latent = student.make_noise(batch_size, generator=generator)  # [B, 6, C, h, w]
        for k, t in enumerate(timesteps):
            sync = sync_last and k == len(timesteps) - 1
            with timer("student"):
                noise = student.make_noise(batch_size, generator=generator)
                x0 = student.predict_x0(student.add_noise(latent, noise, t), t, text)
                finite_latent = bool(torch.isfinite(x0).all())
                field = student.decode(x0) if finite_latent else None
            if not finite_latent:
                # Nothing sensible to render; the window is dropped anyway. Keep the backward calls (DDP).
                nonfinite.append("latent")
                if backward is not None:
                    with timer("backward"):
                        backward(self._zero_loss(), sync)
                latent = x0.detach()
                continue
            cameras = self.sample_cameras(batch_size, generator, device)
            with timer("render"):
                renders = self.render_all(field, cameras, text)
            with timer("teacher"):
                losses = dict(self.teachers(list(renders.values()), prompts, step, generator))
            weighted_regs, raw = self.regularizer_terms(renders, step)
            losses.update(weighted_regs)
            for key, value in raw.items():
                raw_regs[key] += float(value.detach()) * step_weight
            loss = torch.stack(list(losses.values())).sum() if losses else self._zero_loss()
            for key, value in losses.items():
                value = float(value.detach())
                terms[key] += value * step_weight
                if not math.isfinite(value) and key not in nonfinite:
                    nonfinite.append(key)
            total += float(loss.detach()) * step_weight
            if backward is not None:
                clock = BackwardClock(device) if split_backward else None
                if clock is not None:
                    clock.watch(field.planes, "student")
                    for render in renders.values():
                        for image in render.images.values():
                            clock.watch(image, "render")
                with timer("backward"):
                    backward(loss * (step_weight * loss_scale), sync)
                if clock is not None:
                    for part, seconds in clock.split(timer.last("backward")).items():
                        timer.seconds[f"backward/{part}"] += seconds
            latent = x0.detach()
            del field, renders, losses, loss
        return PRDBatchResult(dict(terms), dict(raw_regs), total, nonfinite, dict(timer.seconds))

    # ----------------------------------------------------------------------------------- training

    def on_fit_start(self) -> None:
        # A job killed while writing a checkpoint must leave the previous one intact (see checkpoint_io).
        use_atomic_checkpoints(self.trainer)
        self._prepare_teacher_prompts()
        precision = str(getattr(self.trainer, "precision", "32"))
        if precision.startswith("16"):
            raise UserError(
                f"trainer.precision {precision!r} is not supported by PRD training (its loss scaling fights the "
                "non-finite step skipping): use 32-true (reference) or bf16-mixed"
            )

    def _prepare_teacher_prompts(self) -> None:
        """Fill the teachers' prompt caches from the data's train / val prompts (rank 0, behind a barrier)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        prepare = getattr(self.teachers, "prepare_prompts", None)
        if self.prepare_prompt_cache <= 0 or prepare is None or not hasattr(datamodule, "prompt_source"):
            return
        prompts: dict[str, None] = {}
        for split in ("train", "val"):
            source = datamodule.prompt_source(split)
            if source is None:
                continue
            if len(source) > self.prepare_prompt_cache:
                rank_zero_info(
                    f"{split} prompts: {len(source)} > prepare_prompt_cache={self.prepare_prompt_cache}; "
                    "their text embeddings are encoded when first needed"
                )
                continue
            prompts.update(dict.fromkeys(source.get(i) for i in range(len(source))))
        if prompts:
            prepare(list(prompts))

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        optimizer = self.optimizers()
        step = self.global_step
        self.apply_schedules(step)
        last_in_window = self._window_batches + 1 >= self.accumulate_grad_batches
        result = self.run_prd_batch(
            batch, step, backward=self._backward, loss_scale=1.0 / self.accumulate_grad_batches, sync_last=last_in_window
        )
        self._window_batches += 1
        self._window_nonfinite += [name for name in result.nonfinite if name not in self._window_nonfinite]
        stats: dict[str, float] = {}
        if last_in_window:
            timer = StepTimer(self.student.device)
            with timer("optimizer"):
                stats = self._optimizer_step(optimizer, step)
            result.seconds.update(timer.seconds)
        self._log_training(result, len(batch["prompts"]), optimizer, stats)

    def _log_training(self, result: PRDBatchResult, batch_size: int, optimizer, stats: dict[str, float]) -> None:
        metrics = {f"train/{key}": value for key, value in result.terms.items()}
        metrics.update({f"train/reg_raw/{key}": value for key, value in result.raw_regularizers.items()})
        metrics["train/loss"] = result.total
        metrics["train/nonfinite_skips"] = float(self.nonfinite_skips)
        metrics["train/lr"] = float(optimizer.optimizer.param_groups[0]["lr"])
        if "grad_norm" in stats and math.isfinite(stats["grad_norm"]):
            metrics["train/grad_norm"] = stats["grad_norm"]
        metrics.update({f"time/{part}": seconds for part, seconds in result.seconds.items()})
        for name, teacher in self.teachers.teachers.items():  # the last PRD step's call of each teacher
            metrics.update({f"train/stats/{name}/{key}": value for key, value in teacher.last_stats.items()})
        if self.student.device.type == "cuda":
            metrics["memory/peak_allocated_gb"] = torch.cuda.max_memory_allocated(self.student.device) / 2**30
        # NaN values are logged as they are (the counter says what happened), never averaged away.
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train/loss_bar", result.total, prog_bar=True, logger=False, batch_size=batch_size)

    # --------------------------------------------------------------------------------------- export

    def save_student(self, directory: str | os.PathLike) -> Path:
        """Write the student's trainable weights + config.json (loadable by `prd generate --weights DIR`)."""
        return self._require_student().save_pretrained(directory)
