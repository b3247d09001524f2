"""Score-distillation objectives shared by every teacher: SDS, ASD and CSD, with "dmd", "sds" or
"uniform" weighting.

Every teacher turns its renders into a clean teacher latent `x` `[N, C, h, w]` (VAE latents, or the
pooled normal-depth maps) and hands it to `ScoreDistillation` together with a denoiser callable.
Notation: `abar_t = alphas_cumprod[t]`, `alpha_t = sqrt(abar_t)`, `sigma_t = sqrt(1 - abar_t)`,
one noise draw `n`, `x_t = alpha_t x + sigma_t n`, `g` the CFG scale,
`eps_cfg = eps_u(x_t) + g (eps_c(x_t) - eps_u(x_t))`.

Objectives (the pair of noise predictions whose difference drives the gradient):
- "sds":  first = eps_cfg, second = n.
- "asd":  first = eps_cfg, second = eps_c(x_{t+}, t+) with the SAME noise n at a later timestep
          t+ = t + floor(U[0,1] * clamp(ratio * (t - t_min), 0, T - 1 - t)), clamped to [1, T - 1]
          (ScaleDreamer's asynchronous score distillation as TriplaneTurbo computes it). With
          `plus_ratio = 0`, second = eps_c(x_t), i.e. a classifier-score term (g - 1)(eps_c - eps_u).
- "csd":  classifier score distillation, first - second = csd_scale * (eps_c - eps_u)
          (first = eps_u + csd_scale (eps_c - eps_u), second = eps_u); `g` is not used by the
          gradient itself (only by the "dmd" normaliser).

Weightings (how the difference becomes a gradient on x):
- "uniform": grad = first - second
- "sds":     grad = (1 - abar_t) (first - second)
- "dmd":     both x0 estimates are formed from the CLEAN latent with the coefficients of t,
             x0_first = (x - sigma_t first) / alpha_t, x0_second = (x - sigma_t second) / alpha_t,
             w = mean over (C, h, w) of |x - x0_cfg| per image (x0_cfg from eps_cfg), and
             grad = (x0_second - x0_first) / (w + dmd_eps).

Then non-finite entries of grad are zeroed, optionally clamped to +-grad_clip, and the per-image
loss is `0.5 * ||x - stopgrad(x - grad)||^2`, so `d loss / d x = grad` (computed in float32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from teachers.schedules import Schedule, ScheduleLike

OBJECTIVES = ("sds", "asd", "csd")
WEIGHTINGS = ("dmd", "sds", "uniform")

# eps(x_t [M, C, h, w], timesteps [M] int64, cond [M, ...]) -> epsilon [M, C, h, w]
Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]


def _generator_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else device


def randn(shape, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard normal draws on `device`, from `generator` (drawn on the generator's device)."""
    draw = torch.randn(shape, generator=generator, device=_generator_device(generator, device))
    return draw.to(device)


def rand(shape, generator: torch.Generator | None, device: torch.device) -> Tensor:
    draw = torch.rand(shape, generator=generator, device=_generator_device(generator, device))
    return draw.to(device)


def randint(low: int, high: int, shape, generator: torch.Generator | None, device: torch.device) -> Tensor:
    draw = torch.randint(low, high, shape, generator=generator, device=_generator_device(generator, device))
    return draw.to(device)


@dataclass
class ScoreDistillationOutput:
    """What one objective evaluation produced (everything but `loss` is detached).

    loss:      [N] per-image 0.5 * ||x - stopgrad(x - grad)||^2, float32, differentiable w.r.t. x
    grad:      [N, C, h, w] the score-distillation gradient d loss / d x
    timesteps: [N] int64 t;  timesteps_plus: [N] int64 t+ ("asd" only, else None)
    noise:     [N, C, h, w] the noise draw n
    """

    loss: Tensor
    grad: Tensor
    timesteps: Tensor
    timesteps_plus: Tensor | None
    noise: Tensor


class ScoreDistillation:
    """One configured objective; call it with a clean latent and a denoiser.

    Args:
        objective: "sds", "asd" or "csd".
        weighting: "dmd", "sds" ((1 - abar_t)) or "uniform".
        cfg_scale: classifier-free guidance scale (schedule over training steps).
        t_min, t_max: timestep range as fractions of the training timesteps (schedules);
            t ~ U{int(T t_min), ..., int(T t_max) - 1}.
        plus_ratio: "asd" only: how far the second timestep may move, relative to t - t_min.
        plus_random: "asd" only: multiply the offset by U[0, 1] (else use it as is).
        dmd_eps: the constant added to the "dmd" normaliser.
        csd_scale: "csd" only: the weight of the classifier score (eps_c - eps_u).
        grad_clip: optional clamp of grad to [-grad_clip, grad_clip] (schedule).
    """

    def __init__(
        self,
        objective: str = "asd",
        weighting: str = "dmd",
        cfg_scale: ScheduleLike | Schedule = 7.5,
        t_min: ScheduleLike | Schedule = 0.02,
        t_max: ScheduleLike | Schedule = 0.98,
        plus_ratio: float = 0.0,
        plus_random: bool = True,
        dmd_eps: float = 0.1,
        csd_scale: float = 1.0,
        grad_clip: ScheduleLike | Schedule | None = None,
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
        if plus_ratio < 0:
            raise ValueError(f"plus_ratio must be >= 0, got {plus_ratio}")
        self.objective = objective
        self.weighting = weighting
        self.cfg_scale = Schedule.parse(cfg_scale)
        self.t_min = Schedule.parse(t_min)
        self.t_max = Schedule.parse(t_max)
        self.plus_ratio = float(plus_ratio)
        self.plus_random = bool(plus_random)
        self.dmd_eps = float(dmd_eps)
        self.csd_scale = float(csd_scale)
        self.grad_clip = Schedule.parse(grad_clip) if grad_clip is not None else None

    def __repr__(self) -> str:
        return (
            f"ScoreDistillation(objective={self.objective!r}, weighting={self.weighting!r}, "
            f"cfg_scale={self.cfg_scale}, t_min={self.t_min}, t_max={self.t_max}, plus_ratio={self.plus_ratio})"
        )

    @property
    def uses_second_timestep(self) -> bool:
        return self.objective == "asd" and self.plus_ratio > 0

    def timestep_range(self, step: int, num_train_timesteps: int) -> tuple[int, int]:
        """(min_step, max_step) at this training step: t is drawn from [min_step, max_step)."""
        min_step = int(num_train_timesteps * self.t_min(step))
        max_step = int(num_train_timesteps * self.t_max(step))
        min_step = max(0, min(min_step, num_train_timesteps - 1))
        max_step = max(min_step + 1, min(max_step, num_train_timesteps))
        return min_step, max_step

    def sample_timesteps(
        self,
        num_groups: int,
        group_size: int,
        step: int,
        num_train_timesteps: int,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> tuple[Tensor, Tensor | None]:
        """One t (and t+) per group of `group_size` consecutive images, repeated over the group.

        Returns t [num_groups * group_size] and t+ (same shape, "asd" with plus_ratio > 0) or None.
        """
        min_step, max_step = self.timestep_range(step, num_train_timesteps)
        t = randint(min_step, max_step, (num_groups,), generator, device)
        t_plus = None
        if self.uses_second_timestep:
            offset = self.plus_ratio * (t - min_step).float()
            offset = torch.minimum(offset.clamp(min=0), (num_train_timesteps - 1 - t).float())
            if self.plus_random:
                offset = offset * rand((num_groups,), generator, device)
            t_plus = (t + offset.long()).clamp(1, num_train_timesteps - 1)
            t_plus = t_plus.repeat_interleave(group_size)
        return t.repeat_interleave(group_size), t_plus

    def __call__(
        self,
        x: Tensor,
        denoise: Denoiser,
        cond: Tensor,
        uncond: Tensor,
        alphas_cumprod: Tensor,
        step: int,
        generator: torch.Generator | None = None,
        group_size: int = 1,
    ) -> ScoreDistillationOutput:
        """Evaluate the objective on the clean latent `x` [N, C, h, w].

        `cond` / `uncond` [N, ...] are the conditional / unconditional conditioning per image. The
        denoiser is called once on the CFG batch `[cond @ t, uncond @ t(, cond @ t+)]` (whole
        blocks of N concatenated along dim 0, so groups of views stay consecutive); anything else
        it needs per image (cameras) it must tile over those blocks itself (`M // N` of them).
        `group_size`: consecutive images sharing one timestep (the views of one object).
        """
        num_images = x.shape[0]
        if num_images % group_size != 0:
            raise ValueError(f"{num_images} images cannot be split into groups of {group_size} views")
        if cond.shape[0] != num_images or uncond.shape[0] != num_images:
            raise ValueError(
                f"conditioning has {cond.shape[0]} (cond) / {uncond.shape[0]} (uncond) rows for {num_images} images"
            )
        device = x.device
        abar = alphas_cumprod.to(device=device, dtype=torch.float32)
        num_train_timesteps = abar.shape[0]
        t, t_plus = self.sample_timesteps(
            num_images // group_size, group_size, step, num_train_timesteps, generator, device
        )
        noise = randn(x.shape, generator, device)

        with torch.no_grad():
            latent = x.detach().float()
            alpha_t = abar[t].sqrt().view(-1, 1, 1, 1)
            sigma_t = (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
            x_t = alpha_t * latent + sigma_t * noise
            inputs, timesteps, conds = [x_t, x_t], [t, t], [cond, uncond]
            if t_plus is not None:
                alpha_p = abar[t_plus].sqrt().view(-1, 1, 1, 1)
                sigma_p = (1 - abar[t_plus]).sqrt().view(-1, 1, 1, 1)
                inputs.append(alpha_p * latent + sigma_p * noise)
                timesteps.append(t_plus)
                conds.append(cond)
            eps = denoise(torch.cat(inputs), torch.cat(timesteps), torch.cat(conds)).float()
            eps_chunks = eps.chunk(len(inputs))
            eps_c, eps_u = eps_chunks[0], eps_chunks[1]
            eps_cfg = eps_u + self.cfg_scale(step) * (eps_c - eps_u)

            if self.objective == "sds":
                first, second = eps_cfg, noise
            elif self.objective == "asd":
                first, second = eps_cfg, (eps_chunks[2] if t_plus is not None else eps_c)
            else:  # csd
                first, second = eps_u + self.csd_scale * (eps_c - eps_u), eps_u

            if self.weighting == "uniform":
                grad = first - second
            elif self.weighting == "sds":
                grad = (1 - abar[t]).view(-1, 1, 1, 1) * (first - second)
            else:  # dmd
                x0_first = (latent - sigma_t * first) / alpha_t
                x0_second = (latent - sigma_t * second) / alpha_t
                x0_cfg = (latent - sigma_t * eps_cfg) / alpha_t
                w = (latent - x0_cfg).abs().mean(dim=(1, 2, 3), keepdim=True)
                grad = (x0_second - x0_first) / (w + self.dmd_eps)

            grad = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))
            if self.grad_clip is not None:
                clip = self.grad_clip(step)
                grad = grad.clamp(-clip, clip)
            target = latent - grad

        loss = 0.5 * (x.float() - target).square().flatten(1).sum(dim=1)
        return ScoreDistillationOutput(loss=loss, grad=grad, timesteps=t, timesteps_plus=t_plus, noise=noise)
