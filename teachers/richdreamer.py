"""RichDreamer's normal-depth multi-view model (`nd_mv_ema.ckpt`) as a score-distillation teacher.

Per call: the "normal" (3) and "disparity" (1) renders of all V views, concatenated to 4 channels
and average-pooled to `resolution` x `resolution` (32), ARE the latent (no VAE). Value range:
`map_to_minus_one_one=False` feeds the [0, 1] maps as the TriplaneTurbo reference does;
`True` maps them to [-1, 1] first (v -> 2 v - 1), as RichDreamer itself does (the range the
model was trained on). Text from the SD 1.5 text encoder (768-d); cameras converted with
`camera_vectors(..., convention="richdreamer")` at the distance chosen by `camera_distance`:
"rel_x2" (reference: 2 x relative distance, relative = absolute x tan(fovy / 2)), "rel" or "abs".

`RichDreamerAlbedoTeacher` wraps RichDreamer's depth-conditioned albedo model
(`albedo_mv_ema.ckpt`, not used by the TriplaneTurbo reference): the "rgb" render (unshaded colour,
i.e. albedo) encoded by the SD VAE like MVDream, the disparity (mapped to [-1, 1], nearest-resized
to the latent size, no gradient) appended as a 5th UNet input channel, SD 2.1 text embeddings and
RichDreamer cameras. Its architecture comes from `teachers/configs/richdreamer_albedo_mv.yaml`; no
reference fixture pins its numbers, and its guidance defaults below follow MVDream's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from renderers.types import RenderOutput
from teachers.base import render_image
from teachers.mvdream import NEGATIVE_PROMPT, MultiViewTeacher, MVDreamTeacher
from teachers.schedules import ScheduleLike
from teachers.stable_diffusion import DEFAULT_SD

DEFAULT_SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CAMERA_DISTANCES = ("rel_x2", "rel", "abs")


def check_camera_distance(mode: str) -> str:
    """`mode` if it is one of the camera distances a RichDreamer teacher accepts, else a one-line error."""
    if mode not in CAMERA_DISTANCES:
        raise ValueError(f"camera_distance {mode!r} is not one of {', '.join(CAMERA_DISTANCES)}")
    return mode


class RichDreamerNormalDepthTeacher(MultiViewTeacher):
    """RichDreamer normal-depth (ND-MV) teacher on the "normal" + "disparity" renders.

    Args:
        ckpt_path: the released `nd_mv_ema.ckpt` (`{"state_dict": ...}`; only the UNet keys are used).
        config_path: its yaml (modelscope/normal-depth-diffusion
            `configs/inference/nd/txtcond_mvsd-4-objaverse_finetune_wovae.yaml`); default: the copy
            bundled in `teachers/configs/` for the released file name.
        text_encoder: SD directory or hub id of the SD 1.5 text encoder (768-d).
        resolution: the pooled normal-depth "latent" size (32).
        map_to_minus_one_one: feed 2 v - 1 instead of the [0, 1] maps (see the module docstring).
        camera_distance: "rel_x2" (reference), "rel" or "abs": the distance written into the camera vector.
        The objective arguments (reference: ASD with plus_ratio 0.1, dmd, CFG 20, t_min
        0.5 -> 0.02 over 20k steps, t_max 0.98) and `weight`, `name`, `dtype`, `offload`:
        see `ScoreDistillationTeacher`.
    """

    default_name = "richdreamer_nd"
    model_label = "RichDreamer normal-depth"
    hub_filename = "nd_mv_ema.ckpt"
    camera_convention = "richdreamer"

    def __init__(
        self,
        ckpt_path: str = "pretrained/nd_mv_ema.ckpt",
        config_path: str | None = None,
        hub_id: str | None = None,
        text_encoder: str = DEFAULT_SD15,
        negative_prompt: str = NEGATIVE_PROMPT,
        resolution: int = 32,
        map_to_minus_one_one: bool = False,
        camera_distance: str = "rel_x2",
        objective: str = "asd",
        weighting: str = "dmd",
        cfg_scale: ScheduleLike = 20.0,
        t_min: ScheduleLike = (0, 0.5, 0.02, 20000),
        t_max: ScheduleLike = 0.98,
        plus_ratio: float = 0.1,
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
        check_camera_distance(camera_distance)
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
        self.map_to_minus_one_one = map_to_minus_one_one
        self.camera_distance = camera_distance

    def latents(self, render: RenderOutput, generator: torch.Generator | None) -> Tensor:
        name = type(self).__name__
        normal = render_image(render, "normal", 3, name)
        disparity = render_image(render, "disparity", 1, name)
        maps = torch.cat([normal, disparity], dim=2).flatten(0, 1).float()  # [B * V, 4, H, W]
        maps = F.adaptive_avg_pool2d(maps, (self.resolution, self.resolution))
        return maps * 2 - 1 if self.map_to_minus_one_one else maps


class RichDreamerAlbedoTeacher(MVDreamTeacher):
    """RichDreamer depth-conditioned albedo (Albedo-MV) teacher on the "rgb" + "disparity" renders.

    Args:
        ckpt_path: the released `albedo_mv_ema.ckpt` (only the UNet keys are used).
        config_path: its yaml; default: the copy bundled in `teachers/configs/`.
        vae, text_encoder: SD 2.1-base directories / hub ids (VAE of the renders, 1024-d text).
        camera_distance: as for `RichDreamerNormalDepthTeacher`.
        Everything else as for `MVDreamTeacher` (same defaults).
    """

    default_name = "richdreamer_albedo"
    model_label = "RichDreamer albedo"
    hub_filename = "albedo_mv_ema.ckpt"
    camera_convention = "richdreamer"

    def __init__(
        self,
        ckpt_path: str = "pretrained/albedo_mv_ema.ckpt",
        config_path: str | None = None,
        hub_id: str | None = None,
        vae: str = DEFAULT_SD,
        text_encoder: str = DEFAULT_SD,
        negative_prompt: str = NEGATIVE_PROMPT,
        resolution: int = 256,
        camera_distance: str = "rel_x2",
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
        check_camera_distance(camera_distance)
        super().__init__(
            ckpt_path=ckpt_path,
            config_path=config_path,
            hub_id=hub_id,
            vae=vae,
            text_encoder=text_encoder,
            negative_prompt=negative_prompt,
            resolution=resolution,
            sample_posterior=sample_posterior,
            gradient_checkpointing=gradient_checkpointing,
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
            prompt_cache_dir=prompt_cache_dir,
            text_encoder_device=text_encoder_device,
            weight=weight,
            name=name,
            dtype=dtype,
            offload=offload,
        )
        self.camera_distance = camera_distance

    def concat_condition(self, render: RenderOutput, latent_size: tuple[int, int]) -> Tensor:
        """Disparity `[B * V, 1, h, w]` in [-1, 1], nearest-resized to the latent size (a condition: no gradient)."""
        disparity = render_image(render, "disparity", 1, type(self).__name__).detach().flatten(0, 1).float()
        return F.interpolate(disparity * 2 - 1, size=latent_size, mode="nearest")
