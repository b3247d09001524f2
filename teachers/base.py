"""The teacher interface: frozen diffusion models that turn renders into score-distillation losses.

A teacher is called with the renders of one PRD step and returns named scalar losses whose
gradient with respect to the rendered images is its score-distillation gradient:

    losses = teacher(render, prompts, step)             # {"mvdream": loss}
    losses = teacher([mesh_render, volume_render], prompts, step)
    # {"mvdream/mesh": loss, "mvdream/volume": loss}

- `render`: `renderers.types.RenderOutput` (images `[B, V, C, H, W]`, `Cameras`), or a list of
  them (the renders of the same B prompts by several renderers; they share one teacher batch).
- `prompts`: B strings, or precomputed `PromptEmbeddings` (or a dict encoder key -> embeddings).
- `step`: the global training step (for the schedules of CFG, timestep range and weight).

The frozen diffusion models are held OUTSIDE the registered module tree (a plain dict), so a
parent LightningModule's `state_dict`, `parameters()` (optimizer, DDP gradient buckets), `.to()`,
`.half()` and `.train()` never see them. They run in `dtype` (float32 / float16 / bfloat16; the
loss is always float32 and flows back to the images in their own dtype), are moved to the
render's device at each call and, with `offload=True`, back to the CPU after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn

from renderers.errors import UserError
from renderers.types import RenderOutput
from teachers.schedules import Schedule, ScheduleLike

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

RenderInput = Union[RenderOutput, Sequence[RenderOutput]]


class TeacherWeightsNotFoundError(UserError, FileNotFoundError):
    """Teacher weights are missing; the message (one line) names the file, the hub id and how to fetch it."""


def _looks_local(name: str) -> bool:
    """Whether `name` (which does not exist) was meant as a local path rather than a hub id."""
    path = Path(name).expanduser()
    return name.startswith(("/", ".", "~")) or (path.parent != Path(".") and path.parent.is_dir())


def _shown(files: Sequence[str], limit: int = 3) -> str:
    return ", ".join(files[:limit]) + (f" and {len(files) - limit} more" if len(files) > limit else "")


def missing_pipeline_error(
    pretrained: str, what: str, example_hub_id: str, subfolders: Sequence[str] = (), missing: Sequence[str] = ()
) -> TeacherWeightsNotFoundError:
    """One-line error for a diffusers pipeline directory / hub id that could not be loaded (`missing`: the files
    found lacking, named in the message)."""
    path = Path(pretrained).expanduser()
    include = " ".join(f"'{folder}/*'" for folder in subfolders)
    include = f" --include {include}" if include else ""
    if path.is_dir():
        lacks = f"it lacks {_shown(missing)}" if missing else f"it needs {', '.join(f'{s}/' for s in subfolders)}"
        return TeacherWeightsNotFoundError(
            f"{what} not found in the directory {pretrained!r} ({lacks} in the diffusers layout): fetch them with "
            f"`hf download {example_hub_id}{include} --local-dir {pretrained}`"
        )
    if _looks_local(pretrained):
        return TeacherWeightsNotFoundError(
            f"{what} not found: {pretrained!r} does not exist; fetch a pipeline there with "
            f"`hf download {example_hub_id}{include} --local-dir {pretrained}` (hub id {example_hub_id!r})"
        )
    lacks = f" (lacking {_shown(missing)})" if missing else ""
    return TeacherWeightsNotFoundError(
        f"{what} not found: {pretrained!r} is not a local directory and hub id {pretrained!r} is not in the local "
        f"cache{lacks}; fetch it with `hf download {pretrained}{include} --local-dir pretrained/{path.name}` and pass "
        "that directory"
    )


def hub_offline() -> bool:
    """Whether the Hugging Face hub may not be reached (`HF_HUB_OFFLINE=1`): then a hub id must be in the cache."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_hub_file(repo_id: str, filename: str) -> Path | None:
    """`filename` of the hub repo `repo_id` in the local Hugging Face cache, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


# What `from_pretrained` reads from each folder of a diffusers pipeline: every file of the first tuple, and one of
# the second (the weights, whole or sharded).
_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
PIPELINE_FILES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "unet": (("config.json",), _WEIGHTS),
    "vae": (("config.json",), _WEIGHTS),
    "scheduler": (("scheduler_config.json",), ()),
    "text_encoder": (("config.json",), ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                                        "pytorch_model.bin.index.json")),
    "tokenizer": (("vocab.json", "merges.txt"), ()),
}


def missing_pipeline_files(pretrained: str, subfolders: Sequence[str]) -> list[str] | None:
    """The files of `subfolders` (keys of `PIPELINE_FILES`) that the diffusers pipeline `pretrained` lacks on this
    machine, without loading anything or reaching the network: read in the local directory, or, for a hub id, in
    the Hugging Face cache. None: a hub id that is not cached while the hub may be reached (the loader downloads
    it); a path that does not exist lacks everything."""
    path = Path(pretrained).expanduser()
    if not path.exists() and not _looks_local(pretrained) and not hub_offline():
        return None
    missing = []
    for folder in subfolders:
        required, one_of = PIPELINE_FILES[folder]

        def present(name: str, folder: str = folder) -> bool:
            if path.is_dir():
                return (path / folder / name).is_file()
            return not _looks_local(pretrained) and cached_hub_file(pretrained, f"{folder}/{name}") is not None

        missing += [f"{folder}/{name}" for name in required if not present(name)]
        if one_of and not any(present(name) for name in one_of):
            missing.append(f"{folder}/{one_of[0]}")
    return missing


def check_pipeline(pretrained: str, what: str, subfolders: Sequence[str], example_hub_id: str) -> None:
    """One-line `TeacherWeightsNotFoundError` when the pipeline `pretrained` lacks files of `subfolders` on this
    machine (see `missing_pipeline_files`); for checks before any work."""
    missing = missing_pipeline_files(pretrained, subfolders)
    if missing:
        raise missing_pipeline_error(pretrained, what, example_hub_id, subfolders, missing)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16") from None


class Teacher(nn.Module):
    """Base class of every score-distillation teacher.

    Args:
        weight: the teacher's loss weight, a schedule over training steps (0 switches it off).
        name: the key of its losses (default: the class's `default_name`).
        dtype: "float32", "float16" or "bfloat16" for the frozen models.
        offload: keep the frozen models on the CPU between calls (moved to the render's
            device for each call, then back).
    Subclasses implement `load()` (fill `self.frozen`) and `compute_losses()`.
    """

    default_name = "teacher"

    def __init__(
        self,
        weight: ScheduleLike = 1.0,
        name: str | None = None,
        dtype: str = "float32",
        offload: bool = False,
    ) -> None:
        super().__init__()
        self.weight = Schedule.parse(weight)
        self.name = name or self.default_name
        self.dtype = resolve_dtype(dtype)
        self.offload = offload
        # Not registered as submodules on purpose (see the module docstring).
        self.frozen: dict[str, nn.Module] = {}
        # frozen name -> what identifies its weights (source, dtype, options), set by `load()` for models other
        # teachers may load too: `TeacherEnsemble(share_weights=True)` keeps one copy of identical ones.
        self.frozen_sources: dict[str, tuple] = {}
        self.last_output = None  # the last ScoreDistillationOutput, loss detached (see `record_stats`)
        self.bytes_moved = 0  # bytes of frozen weights copied between devices so far (offloading; benchmarks)
        self.last_stats: dict[str, float] = {}

    # ------------------------------------------------------------------ frozen models
    @property
    def is_loaded(self) -> bool:
        return bool(self.frozen)

    def load(self) -> None:
        """Load the frozen models into `self.frozen` (on the CPU)."""
        raise NotImplementedError

    def check_weights(self) -> None:
        """One-line `TeacherWeightsNotFoundError` when weights `load()` needs are not on this machine: local files
        that do not exist, or (with `HF_HUB_OFFLINE=1`) hub ids that are not in the cache. Loads nothing and never
        reaches the network; `prd fit` calls it before any work. (None needed: nothing to check.)"""

    def _freeze(self, module: nn.Module) -> nn.Module:
        """`module` in eval mode, frozen, in the teacher's dtype."""
        if any(p.is_floating_point() and p.dtype != self.dtype for p in module.parameters()):
            module = module.to(self.dtype)
        return module.eval().requires_grad_(False)

    def frozen_parameters(self) -> Iterator[nn.Parameter]:
        for module in self.frozen.values():
            yield from module.parameters()

    @contextlib.contextmanager
    def on_device(self, device: torch.device, inputs: Sequence[Tensor] = ()) -> Iterator[None]:
        """Run the frozen models on `device`; with `offload`, send them back to the CPU afterwards.

        The backward pass of a teacher's loss still runs through some frozen weights (the VAE encoder
        of the render path), and `Module.to` swaps parameter storage in place, so offloading must wait
        for the backward: when `inputs` (the images the losses were computed from) require grad, the
        move happens in a hook that fires once their gradients are complete; otherwise at once.
        """
        self._move_frozen(device)
        try:
            yield
        finally:
            if self.offload:
                pending = [t for t in inputs if t.requires_grad] if torch.is_grad_enabled() else []
                if pending:
                    torch.autograd.graph.register_multi_grad_hook(
                        pending, lambda _grads: self._move_frozen("cpu"), mode="all"
                    )
                else:
                    self._move_frozen("cpu")

    def _move_frozen(self, device: torch.device | str) -> None:
        device = torch.device(device)
        for module in self.frozen.values():
            self.bytes_moved += sum(
                t.numel() * t.element_size()
                for t in [*module.parameters(), *module.buffers()]
                if t.device.type != device.type or (device.index is not None and t.device != device)
            )
            module.to(device)

    # ------------------------------------------------------------------ call
    def forward(
        self,
        renders: RenderInput,
        prompts: Sequence[str] | object,
        step: int,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Score-distillation losses for `renders` (one or several `RenderOutput`s of the same prompts).

        Returns `{name: loss}` for one render, `{f"{name}/{renderer}": loss}` for several
        (unweighted; `TeacherEnsemble` applies `weight`).
        """
        render_list = [renders] if isinstance(renders, RenderOutput) else list(renders)
        if not render_list:
            raise ValueError("a teacher needs at least one render")
        batch = render_list[0].cameras.batch_size
        for render in render_list:
            if render.cameras.batch_size != batch:
                raise ValueError("all renders passed to a teacher in one call must have the same batch size")
        if not self.is_loaded:
            self.load()
        device = next(iter(render_list[0].images.values())).device
        inputs = [image for render in render_list for image in render.images.values()]
        with self.on_device(device, inputs):
            per_render = self.compute_losses(render_list, prompts, step, generator)
        if isinstance(renders, RenderOutput):
            return {self.name: per_render[0]}
        return dict(zip(render_keys(self.name, render_list), per_render, strict=True))

    def compute_losses(
        self,
        renders: list[RenderOutput],
        prompts: Sequence[str] | object,
        step: int,
        generator: torch.Generator | None,
    ) -> list[Tensor]:
        """One scalar loss per render."""
        raise NotImplementedError

    def reduce_losses(self, per_image: Tensor, num_renders: int, views_per_object: int) -> list[Tensor]:
        """Per-render losses from per-image ones: summed over objects, averaged over views."""
        return list((per_image.view(num_renders, -1).sum(dim=1) / views_per_object).unbind(0))

    def record_stats(self, output) -> None:
        # The last ScoreDistillationOutput, fully detached (holding the graph would keep the
        # render activations alive until the next call).
        self.last_output = dataclasses.replace(output, loss=output.loss.detach())
        self.last_stats = {
            "grad_norm": float(output.grad.norm()),
            "t_mean": float(output.timesteps.float().mean()),
        }


def render_keys(name: str, renders: Sequence[RenderOutput]) -> list[str]:
    """`name/renderer` per render, `name/renderer_i` when a renderer name repeats."""
    names = [render.renderer for render in renders]
    keys = []
    for index, renderer in enumerate(names):
        keys.append(f"{name}/{renderer}" if names.count(renderer) == 1 else f"{name}/{renderer}_{index}")
    return keys


def select_embeddings(prompts: object, encoder_key: str) -> object:
    """From a dict encoder key -> PromptEmbeddings, pick this encoder's; pass anything else through."""
    if isinstance(prompts, Mapping):
        if encoder_key not in prompts:
            raise ValueError(
                f"no precomputed embeddings for text encoder {encoder_key!r} (have: {', '.join(prompts)})"
            )
        return prompts[encoder_key]
    return prompts


class ScoreDistillationTeacher(Teacher):
    """A teacher with a text encoder (prompt cache) and a `ScoreDistillation` objective.

    Args (besides `Teacher`'s):
        text_encoder: Stable Diffusion directory or hub id whose `text_encoder/` + `tokenizer/`
            condition this teacher.
        negative_prompt: the unconditional prompt of classifier-free guidance.
        prompt_cache_dir: root of the text-embedding disk cache (see `teachers.prompt_cache`).
        text_encoder_device: where missing prompts are encoded (default CUDA if available).
        objective, weighting, cfg_scale, t_min, t_max, plus_ratio, plus_random, dmd_eps,
        csd_scale, grad_clip: see `teachers.objectives.ScoreDistillation`.
    """

    def __init__(
        self,
        text_encoder: str,
        negative_prompt: str = "",
        prompt_cache_dir: str | None = None,
        text_encoder_device: str | None = None,
        objective: str = "asd",
        weighting: str = "dmd",
        cfg_scale: ScheduleLike = 7.5,
        t_min: ScheduleLike = 0.02,
        t_max: ScheduleLike = 0.98,
        plus_ratio: float = 0.0,
        plus_random: bool = True,
        dmd_eps: float = 0.1,
        csd_scale: float = 1.0,
        grad_clip: ScheduleLike | None = None,
        weight: ScheduleLike = 1.0,
        name: str | None = None,
        dtype: str = "float32",
        offload: bool = False,
    ) -> None:
        from teachers.objectives import ScoreDistillation

        super().__init__(weight=weight, name=name, dtype=dtype, offload=offload)
        self.text_encoder = str(text_encoder)
        self.negative_prompt = negative_prompt
        self.prompt_cache_dir = prompt_cache_dir
        self.text_encoder_device = text_encoder_device
        self.objective = ScoreDistillation(
            objective=objective,
            weighting=weighting,
            cfg_scale=cfg_scale,
            t_min=t_min,
            t_max=t_max,
            plus_ratio=plus_ratio,
            plus_random=plus_random,
            dmd_eps=dmd_eps,
            csd_scale=csd_scale,
            grad_clip=grad_clip,
        )
        self.alphas_cumprod: Tensor | None = None  # [T] float32, set by load()
        self.prediction_type = "epsilon"  # of the frozen UNet, set by load(): "epsilon" or "v_prediction"

    def check_weights(self) -> None:
        super().check_weights()
        check_pipeline(self.text_encoder, f"{self.name} text encoder", ("text_encoder", "tokenizer"),
                       "stabilityai/stable-diffusion-2-1-base")

    @property
    def prompt_processor(self):
        from teachers.prompt_cache import shared_prompt_processor

        return shared_prompt_processor(
            self.text_encoder, cache_dir=self.prompt_cache_dir, device=self.text_encoder_device
        )

    def prepare_prompts(self, prompts: Sequence[str]) -> int:
        """Fill the prompt cache (rank 0 writes under DDP); returns how many prompts were encoded."""
        return self.prompt_processor.prepare(list(prompts) + [self.negative_prompt])

    def text_embeddings(self, prompts: Sequence[str] | object, batch_size: int, device: torch.device):
        """(cond, uncond) `[B, L, D]` float32 on `device` from prompts or precomputed embeddings."""
        from teachers.prompt_cache import PromptEmbeddings

        prompts = select_embeddings(prompts, self.prompt_processor.key)
        if isinstance(prompts, PromptEmbeddings):
            if prompts.encoder_key != self.prompt_processor.key:
                raise ValueError(
                    f"{self.name}: embeddings come from text encoder {prompts.encoder_key!r}, "
                    f"this teacher uses {self.prompt_processor.key!r}"
                )
            embeddings = prompts
        elif isinstance(prompts, Sequence) and not isinstance(prompts, str):
            embeddings = self.prompt_processor(list(prompts), self.negative_prompt)
        else:
            raise TypeError(
                f"{self.name}: prompts must be a list of strings or PromptEmbeddings, got {type(prompts)}"
            )
        if embeddings.cond.shape[0] != batch_size:
            raise ValueError(
                f"{self.name}: {embeddings.cond.shape[0]} prompts for a render batch of {batch_size}"
            )
        embeddings = embeddings.to(device, torch.float32)
        return embeddings.cond, embeddings.uncond

    def as_epsilon(self, prediction: Tensor, x_t: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
        """The frozen UNet's output `[N, C, h, w]` as epsilon: a v-prediction becomes
        eps = alpha_t v + sigma_t x_t; an epsilon prediction passes through."""
        if self.prediction_type != "v_prediction":
            return prediction
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        return abar.sqrt() * prediction + (1 - abar).sqrt() * x_t


def render_image(render: RenderOutput, name: str, channels: int, teacher: str) -> Tensor:
    """`render.images[name]` checked to be `[B, V, channels, H, W]`."""
    return checked_image(render.images, name, channels, teacher, render.renderer)


def checked_image(images: Mapping[str, Tensor], name: str, channels: int, teacher: str, renderer: str) -> Tensor:
    """`images[name]` checked to be `[B, V, channels, H, W]` (`renderer` names the render in the error)."""
    if name not in images:
        raise ValueError(
            f"{teacher} needs render images {name!r} [B, V, {channels}, H, W]; "
            f"the {renderer} render has: {', '.join(images) or 'none'}"
        )
    image = images[name]
    if image.ndim != 5 or image.shape[2] != channels:
        raise ValueError(
            f"{teacher}: render image {name!r} must be [B, V, {channels}, H, W], got {list(image.shape)}"
        )
    return image


def per_image(embeddings: Tensor, views_per_object: int, num_renders: int) -> Tensor:
    """Text embeddings `[B, L, D]` repeated for a teacher batch `[R * B * k, L, D]`: index
    `render * B * k + object * k + view` (every render of a call shares one teacher batch)."""
    return embeddings.repeat_interleave(views_per_object, dim=0).repeat(num_renders, 1, 1)
