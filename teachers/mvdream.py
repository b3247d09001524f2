"""MVDream (sd-v2.1-base-4view) as a score-distillation teacher on 4-view RGB renders.

Per call: all V views of every object, resized bilinearly to `resolution` (256), mapped to
[-1, 1] and encoded by the SD 2.1 VAE (posterior sample x scaling factor: 32 x 32 latents);
camera-conditioned through `teachers.multiview_unet.camera_vectors(..., convention="mvdream")`
(the c2w with unit translation, row-major); text from the SD 2.1 text encoder; one timestep per
object shared by its views. The released checkpoint and its yaml are loaded directly by
`teachers.multiview_unet.MultiViewUNet.from_original_checkpoint`, which also provides the noise
schedule (alphas_cumprod) and prediction type of that yaml.

`MultiViewTeacher` holds what MVDream and RichDreamer's normal-depth teacher share.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from renderers.types import Cameras, RenderOutput
from teachers.base import (
    ScoreDistillationTeacher,
    TeacherWeightsNotFoundError,
    cached_hub_file,
    check_pipeline,
    hub_offline,
    per_image,
    render_image,
)
from teachers.camera_vectors import camera_vectors, richdreamer_condition_distance
from teachers.schedules import ScheduleLike
from teachers.stable_diffusion import DEFAULT_SD, encode_rgb, load_vae

NEGATIVE_PROMPT = (
    "ugly, bad anatomy, blurry, pixelated obscure, unnatural colors, poor lighting, dull, and unclear, "
    "cropped, lowres, low quality, artifacts, duplicate, morbid, mutilated, poorly drawn face, deformed, "
    "dehydrated, bad proportions"
)


def resolve_checkpoint(
    ckpt_path: str, hub_id: str | None, filename: str, model: str, release: tuple[str, str], download: bool = True
) -> Path | None:
    """A local checkpoint file, else the hub copy (`hub_id`/`filename`: fetched, or with `download=False` only
    looked up in the cache, and None when the loader may still fetch it), else a one-line error.

    release: (where the file is published, the command that fetches it).
    """
    path = Path(ckpt_path).expanduser()
    if path.is_file():
        return path
    if hub_id:
        if not download:
            cached = cached_hub_file(hub_id, filename)
            if cached is not None:
                return cached
            if not hub_offline():
                return None
        else:
            try:
                from huggingface_hub import hf_hub_download

                return Path(hf_hub_download(hub_id, filename))
            except Exception:  # offline, not cached, no such repo: the error below says what to do
                pass
    source, fetch = release
    hub = f" and hub id {hub_id!r} is not in the local cache (HF_HUB_OFFLINE is set)" if hub_id and not download else ""
    raise TeacherWeightsNotFoundError(
        f"{model} checkpoint {str(path)!r} not found{hub}; it is released as {filename!r} on {source}: "
        f"fetch it with `{fetch}` and set ckpt_path to the file"
    )


class MultiViewTeacher(ScoreDistillationTeacher):
    """Shared machinery of the camera-conditioned multi-view teachers (MVDream, RichDreamer ND).

    Subclasses define `latents(render, generator) -> [B * V, 4, h, w]`, the checkpoint names and the
    camera convention of the model (`teachers.camera_vectors`; "richdreamer" also reads `camera_distance`).
    """

    model_label = "multi-view"
    hub_filename = ""
    camera_convention = "mvdream"
    camera_distance = "rel_x2"  # "richdreamer" convention: the radius written into the camera vector

    def __init__(
        self,
        ckpt_path: str,
        config_path: str | None,
        hub_id: str | None,
        text_encoder: str,
        negative_prompt: str,
        resolution: int,
        **kwargs,
    ) -> None:
        super().__init__(text_encoder=text_encoder, negative_prompt=negative_prompt, **kwargs)
        self.ckpt_path = str(ckpt_path)
        self.config_path = config_path
        self.hub_id = hub_id
        self.resolution = resolution

    def release_info(self) -> tuple[str, str]:
        """(where the checkpoint is published, how to fetch it), from the multi-view UNet's release table."""
        from teachers.multiview_unet import RELEASED_CHECKPOINTS

        for release in RELEASED_CHECKPOINTS.values():
            if release.filename == self.hub_filename:
                return release.source, release.fetch
        return "its authors' release page", f"download {self.hub_filename}"

    def load_multiview_unet(self, checkpoint: Path):
        """The multi-view UNet on the CPU in `dtype` (its yaml: `config_path`, else the bundled one)."""
        from teachers.multiview_unet import MultiViewUNet

        return MultiViewUNet.from_original_checkpoint(
            checkpoint, self.config_path, dtype=self.dtype, device="cpu"
        )

    def check_weights(self) -> None:
        resolve_checkpoint(
            self.ckpt_path, self.hub_id, self.hub_filename, self.model_label, self.release_info(), download=False
        )
        if self.config_path is not None and not Path(self.config_path).expanduser().is_file():
            raise TeacherWeightsNotFoundError(
                f"{self.model_label} config_path {self.config_path!r} not found: pass the yaml of the checkpoint, or "
                "leave config_path unset for the bundled one"
            )
        super().check_weights()

    def load(self) -> None:
        checkpoint = resolve_checkpoint(
            self.ckpt_path, self.hub_id, self.hub_filename, self.model_label, self.release_info()
        )
        self.use_unet(self.load_multiview_unet(checkpoint), source=str(checkpoint))
        self.load_extra()

    def use_unet(self, unet, source: str = "the multi-view UNet") -> None:
        """Install the frozen `MultiViewUNet` and its noise schedule (`load()` calls it with the released weights;
        benchmarks with random ones of the same sizes, `MultiViewUNet.from_original_config`)."""
        self.prediction_type = unet.schedule.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"{source}: prediction type {self.prediction_type!r} is not supported (eps or v)"
            )
        self.alphas_cumprod = unet.alphas_cumprod.float()
        self.frozen = {"unet": self._freeze(unet)}
        self.frozen_sources = {}

    def load_extra(self) -> None:
        """Load models besides the UNet (the VAE for MVDream)."""

    def latents(self, render: RenderOutput, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def camera_condition(self, cameras: Cameras) -> Tensor:
        """Camera vectors `[B * V, 16]` in the model's `camera_convention`: MVDream's (c2w with unit
        translation, row-major) or RichDreamer's (Rz(-90 deg) world rotation, translation scaled to the
        `camera_distance` radius: "rel_x2" = 2 x distance x tan(fovy / 2), "rel" or "abs")."""
        distance = cameras.distance
        if self.camera_convention == "richdreamer":
            distance = richdreamer_condition_distance(distance, cameras.fovy, self.camera_distance)
        return camera_vectors(
            cameras.elevation.flatten(),
            cameras.azimuth.flatten(),
            distance.flatten(),
            convention=self.camera_convention,
        )

    def concat_condition(self, render: RenderOutput, latent_size: tuple[int, int]) -> Tensor | None:
        """Extra UNet input channels `[B * V, C', h, w]` appended to x (RichDreamer albedo: disparity)."""
        return None

    def compute_losses(
        self,
        renders: list[RenderOutput],
        prompts: Sequence[str] | object,
        step: int,
        generator: torch.Generator | None,
    ) -> list[Tensor]:
        unet = self.frozen["unet"]
        batch, num_views = renders[0].cameras.batch_size, renders[0].cameras.num_views
        for render in renders:
            if render.cameras.num_views != num_views:
                raise ValueError(f"{self.name}: all renders of one call need the same number of views")
        x = torch.cat([self.latents(render, generator) for render in renders])  # [R * B * V, 4, h, w]
        device = x.device
        concats = [self.concat_condition(render, tuple(x.shape[-2:])) for render in renders]
        concat = torch.cat(concats).to(device) if concats[0] is not None else None
        abar = self.alphas_cumprod.to(device)
        camera = torch.cat([self.camera_condition(render.cameras.to(device)) for render in renders]).float()
        cond, uncond = self.text_embeddings(prompts, batch, device)
        cond = per_image(cond, num_views, len(renders))
        uncond = per_image(uncond, num_views, len(renders))

        def denoise(x_t: Tensor, t: Tensor, context: Tensor) -> Tensor:
            blocks = x_t.shape[0] // camera.shape[0]  # CFG blocks [cond, uncond(, cond at t+)]
            out = unet(
                x_t.to(self.dtype),
                t,
                context.to(self.dtype),
                camera.repeat(blocks, 1).to(self.dtype),
                num_frames=num_views,
                **({"concat": concat.repeat(blocks, 1, 1, 1)} if concat is not None else {}),
            ).float()
            return self.as_epsilon(out, x_t, t, abar)

        output = self.objective(
            x, denoise, cond, uncond, self.alphas_cumprod, step, generator, group_size=num_views
        )
        self.record_stats(output)
        return self.reduce_losses(output.loss, len(renders), num_views)


class MVDreamTeacher(MultiViewTeacher):
    """MVDream sd-v2.1-base-4view teacher on the "rgb" render (all views of each object).

    Args:
        ckpt_path: the released `sd-v2.1-base-4view.pt` (raw state dict; only the UNet keys are
            used), looked up in the hub cache (`hub_id`) when the path does not exist.
        config_path: its yaml (bytedance/MVDream `mvdream/configs/sd-v2-base.yaml`); default: the
            copy bundled in `teachers/configs/` for the released file name.
        vae: SD directory or hub id whose `vae/` encodes the renders (SD 2.1-base's VAE is the one
            MVDream was trained with).
        text_encoder: SD directory or hub id of the SD 2.1 text encoder (1024-d).
        resolution: renders are resized to this many pixels before the VAE (256).
        sample_posterior, gradient_checkpointing: as for `StableDiffusionTeacher`.
        The objective arguments (reference: ASD, dmd, CFG 20 -> 10 over 20k steps, t_min
        0.5 -> 0.02 over 20k steps, t_max 0.98, no second timestep) and `weight`, `name`,
        `dtype`, `offload`: see `ScoreDistillationTeacher`.
    """

    default_name = "mvdream"
    model_label = "MVDream"
    hub_filename = "sd-v2.1-base-4view.pt"
    camera_convention = "mvdream"

    def __init__(
        self,
        ckpt_path: str = "pretrained/sd-v2.1-base-4view.pt",
        config_path: str | None = None,
        hub_id: str | None = "MVDream/MVDream",
        vae: str = DEFAULT_SD,
        text_encoder: str = DEFAULT_SD,
        negative_prompt: str = NEGATIVE_PROMPT,
        resolution: int = 256,
        sample_posterior: bool = True,
        gradient_checkpointing: bool = False,
        objective: str = "asd",
        weighting: str = "dmd",
        cfg_scale: ScheduleLike = (0, 20.0, 10.0, 20000),
        t_min: ScheduleLike = (0, 0.5, 0.02, 20000),
        t_max: ScheduleLike = 0.98,
        plus_ratio: float = 0.0,
        plus_random: bool = True,
        dmd_eps: float = 0.1,
        csd_scale: float = 1.0,
        grad_clip: ScheduleLike | None = None,
        prompt_cache_dir: str | None = None,
        text_encoder_device: str | None = None,
        weight: ScheduleLike = 1.0,
        name: str | None = None,
        dtype: str = "float32",
        offload: bool = False,
    ) -> None:
        super().__init__(
            ckpt_path=ckpt_path,
            config_path=config_path,
            hub_id=hub_id,
            text_encoder=text_encoder,
            negative_prompt=negative_prompt,
            resolution=resolution,
            prompt_cache_dir=prompt_cache_dir,
            text_encoder_device=text_encoder_device,
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
            weight=weight,
            name=name,
            dtype=dtype,
            offload=offload,
        )
        self.vae = str(vae)
        self.sample_posterior = sample_posterior
        self.gradient_checkpointing = gradient_checkpointing

    def check_weights(self) -> None:
        super().check_weights()
        check_pipeline(self.vae, f"{self.name} VAE", ("vae",), DEFAULT_SD)

    def load_extra(self) -> None:
        self.use_vae(load_vae(self.vae, self.dtype))

    def use_vae(self, vae) -> None:
        """Install the frozen VAE that encodes the renders (its decoder is dropped)."""
        if self.gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        if getattr(vae, "decoder", None) is not None:
            del vae.decoder  # only the encoder is used
        self.frozen["vae"] = self._freeze(vae)
        self.frozen_sources["vae"] = ("vae-encoder", self.vae, str(self.dtype), self.gradient_checkpointing)

    def latents(self, render: RenderOutput, generator: torch.Generator | None) -> Tensor:
        rgb = render_image(render, "rgb", 3, type(self).__name__)
        return encode_rgb(
            self.frozen["vae"], rgb.flatten(0, 1), self.resolution, self.sample_posterior, generator
        )
