"""Stable Diffusion (1.x / 2.x) as a score-distillation teacher on RGB renders.

Per call: for each object, `views_per_object` random views of the "rgb" render (the other renders
of the same call use the opposite views when `opposite_views` is set, as the reference does for its
second renderer), resized bilinearly to `resolution`, mapped to [-1, 1], encoded by the VAE
(posterior sample x `vae.config.scaling_factor`), then the objective with the SD UNet as denoiser.
Epsilon and v-prediction UNets are both handled (from the scheduler config).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from renderers.types import RenderOutput
from teachers.base import (
    ScoreDistillationTeacher,
    TeacherWeightsNotFoundError,
    check_pipeline,
    missing_pipeline_error,
    per_image,
    render_image,
)
from teachers.objectives import rand
from teachers.schedules import ScheduleLike

DEFAULT_SD = "stabilityai/stable-diffusion-2-1-base"


def missing_sd_error(pretrained: str, what: str) -> TeacherWeightsNotFoundError:
    return missing_pipeline_error(
        pretrained,
        f"Stable Diffusion {what}",
        DEFAULT_SD,
        ("unet", "vae", "scheduler", "text_encoder", "tokenizer"),
    )


def load_vae(pretrained: str, dtype: torch.dtype, subfolder: str = "vae"):
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(pretrained, subfolder=subfolder, torch_dtype=dtype)
    except OSError as err:
        raise missing_pipeline_error(pretrained, f"VAE ({subfolder}/)", DEFAULT_SD, (subfolder,)) from err


def encode_rgb(
    vae, images: Tensor, resolution: int, sample: bool, generator: torch.Generator | None
) -> Tensor:
    """RGB in [0, 1] `[N, 3, H, W]` -> VAE latents `[N, 4, resolution / f, resolution / f]` (float32)."""
    images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    posterior = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist
    latents = posterior.sample(generator=generator) if sample else posterior.mode()
    return latents.float() * vae.config.scaling_factor


class StableDiffusionTeacher(ScoreDistillationTeacher):
    """Stable Diffusion teacher (any diffusers SD 1.x / 2.x directory or hub id).

    Args:
        pretrained: diffusers SD directory or hub id (unet/, vae/, scheduler/, text_encoder/, tokenizer/).
        text_encoder: where the text encoder comes from (default: `pretrained`).
        resolution: renders are resized to this many pixels before the VAE (512 for SD 2.1-base).
        views_per_object: random views per object that the teacher sees (None: all views).
        opposite_views: for the 2nd, 3rd, ... render of a call, use the views opposite
            (V / 2 further) to those drawn for the first render instead of new random ones.
        sample_posterior: VAE posterior sample (reference) or its mean.
        gradient_checkpointing: recompute the VAE encoder in backward (saves memory).
        The objective arguments and `weight`, `name`, `dtype`, `offload`: see `ScoreDistillationTeacher`.
    """

    default_name = "stable_diffusion"

    def __init__(
        self,
        pretrained: str = DEFAULT_SD,
        text_encoder: str | None = None,
        negative_prompt: str = "",
        resolution: int = 512,
        views_per_object: int | None = 1,
        opposite_views: bool = True,
        sample_posterior: bool = True,
        gradient_checkpointing: bool = False,
        objective: str = "asd",
        weighting: str = "dmd",
        cfg_scale: ScheduleLike = 7.5,
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
            text_encoder=text_encoder or pretrained,
            negative_prompt=negative_prompt,
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
        if views_per_object is not None and views_per_object < 1:
            raise ValueError(f"views_per_object must be >= 1 or None (all views), got {views_per_object}")
        self.pretrained = str(pretrained)
        self.resolution = resolution
        self.views_per_object = views_per_object
        self.opposite_views = opposite_views
        self.sample_posterior = sample_posterior
        self.gradient_checkpointing = gradient_checkpointing
        self.last_views: list[Tensor] = []  # [B, k] view indices per render of the last call

    def check_weights(self) -> None:
        check_pipeline(self.pretrained, f"{self.name} Stable Diffusion", ("unet", "vae", "scheduler"), DEFAULT_SD)
        super().check_weights()

    def load(self) -> None:
        from diffusers import DDPMScheduler, UNet2DConditionModel

        try:
            unet = UNet2DConditionModel.from_pretrained(
                self.pretrained, subfolder="unet", torch_dtype=self.dtype
            )
        except OSError as err:
            raise missing_sd_error(self.pretrained, "UNet") from err
        vae = load_vae(self.pretrained, self.dtype)
        try:
            scheduler = DDPMScheduler.from_pretrained(self.pretrained, subfolder="scheduler")
        except OSError as err:
            raise missing_sd_error(self.pretrained, "scheduler config") from err
        self.use_models(unet, vae, scheduler)

    def use_models(self, unet, vae, scheduler) -> None:
        """Install the frozen UNet, VAE (its decoder is dropped) and the noise schedule of `scheduler`
        (`load()` calls it with the pretrained ones; benchmarks with random ones of the same sizes)."""
        if self.gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"{self.pretrained}: prediction_type {scheduler.config.prediction_type!r} is not supported "
                "(epsilon or v_prediction)"
            )
        self.prediction_type = scheduler.config.prediction_type
        self.alphas_cumprod = scheduler.alphas_cumprod.float()
        if getattr(vae, "decoder", None) is not None:
            del vae.decoder  # only the encoder is used
        self.frozen = {"unet": self._freeze(unet), "vae": self._freeze(vae)}
        self.frozen_sources = {
            "unet": ("sd-unet", self.pretrained, str(self.dtype)),
            "vae": ("vae-encoder", self.pretrained, str(self.dtype), self.gradient_checkpointing),
        }

    def select_views(
        self, batch: int, num_views: int, render_index: int, first: Tensor | None, generator, device
    ) -> Tensor:
        """`[B, k]` view indices per object for the render at `render_index` of this call."""
        k = num_views if self.views_per_object is None else min(self.views_per_object, num_views)
        if render_index > 0 and self.opposite_views and first is not None and first.shape[1] == k:
            return (first + render_index * (num_views // 2)) % num_views
        return rand((batch, num_views), generator, device).argsort(dim=1)[:, :k]

    def compute_losses(
        self,
        renders: list[RenderOutput],
        prompts: Sequence[str] | object,
        step: int,
        generator: torch.Generator | None,
    ) -> list[Tensor]:
        unet, vae = self.frozen["unet"], self.frozen["vae"]
        first_rgb = render_image(renders[0], "rgb", 3, type(self).__name__)
        device = first_rgb.device
        batch = first_rgb.shape[0]
        cond, uncond = self.text_embeddings(prompts, batch, device)

        latents, all_views, first_views = [], [], None
        for index, render in enumerate(renders):
            rgb = render_image(render, "rgb", 3, type(self).__name__)
            views = self.select_views(batch, rgb.shape[1], index, first_views, generator, device)
            first_views = views if index == 0 else first_views
            all_views.append(views)
            chosen = rgb[torch.arange(batch, device=device)[:, None], views]  # [B, k, 3, H, W]
            latents.append(
                encode_rgb(vae, chosen.flatten(0, 1), self.resolution, self.sample_posterior, generator)
            )
        self.last_views = all_views
        views_per_object = first_views.shape[1]
        x = torch.cat(latents)  # [R * B * k, 4, h, w]
        cond = per_image(cond, views_per_object, len(renders))
        uncond = per_image(uncond, views_per_object, len(renders))
        abar = self.alphas_cumprod.to(device)

        def denoise(x_t: Tensor, t: Tensor, context: Tensor) -> Tensor:
            out = unet(x_t.to(self.dtype), t, encoder_hidden_states=context.to(self.dtype)).sample.float()
            return self.as_epsilon(out, x_t, t, abar)

        output = self.objective(x, denoise, cond, uncond, self.alphas_cumprod, step, generator, group_size=1)
        self.record_stats(output)
        return self.reduce_losses(output.loss, len(renders), views_per_object)
