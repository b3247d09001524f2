"""An analytic score-distillation teacher for CPU runs and tests: the exact denoiser of procedural targets.

`ShapeTeacher` reads each prompt as a procedural target ("a large red ball" -> a red sphere of radius
0.72, see `teachers.shapes`), renders that target with the project's own renderers from THE SAME
cameras as the student's render, and scores the student's render with the exact (Tweedie) denoiser of
a data distribution made of those target renders, through the same objective code as the real
teachers (`teachers.objectives.ScoreDistillation`: SDS / ASD / CSD, "dmd" / "sds" / "uniform"
weighting, CFG, timestep ranges and weights as schedules). With it, PRD can be checked on a CPU: the
student must learn the target shapes, and its Chamfer distance to them can be measured.

Teacher "latent" (no VAE): the render images named in `channels` (e.g. rgb 3 + normal 3 + disparity 1),
concatenated to `[N, C, H, W]`, area-pooled to `resolution` when one is set, mapped to [-1, 1] by
v -> 2 v - 1. The same map turns the target renders into y `[N, C, h, w]` (one per image: the target of
its prompt seen from its camera).

Noise schedule: DDPM (diffusers `DDPMScheduler`), by default SD's "scaled_linear" 0.00085 -> 0.012 over
1000 steps; abar_t its cumulative product, alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t).

Denoisers (x_t = alpha_t x0 + sigma_t n; every eps is eps = (x_t - alpha_t x0_hat) / sigma_t with the
exact posterior mean x0_hat = E[x0 | x_t]):
- conditional: the data distribution of an image is the Dirac at its target render y, so
  x0_hat = y for every x_t and eps_c = (x_t - alpha_t y) / sigma_t.
- unconditional, `unconditional="mixture"` (default): a uniform mixture of Diracs at the renders, from
  the image's own camera, of every distinct target of the call's prompts plus `unconditional_prompts`,
  and at the empty scene (background only: rgb = background, alpha 0, normal (0.5, 0.5, 1), depth 0,
  disparity 0). With components c_k (k = 1..K) and prior pi_k = 1 / K:
      w_k(x_t) = softmax_k(log pi_k - ||x_t - alpha_t c_k||^2 / (2 sigma_t^2)),  x0_hat = sum_k w_k c_k.
  It contains every conditional distribution (like a real model's unconditional one), so CFG pushes
  away from the other targets and the empty scene, and vanishes once the render is its target.
- unconditional, `unconditional="gaussian"`: an isotropic Gaussian N(e, s^2 I) around the empty scene
  e, s = `unconditional_std` (latent units):
      x0_hat = e + alpha_t s^2 / (alpha_t^2 s^2 + sigma_t^2) (x_t - alpha_t e).
  Cheaper (no extra renders), but CFG > 1 then over-shoots the target, as high CFG does with real models.
With `cfg_scale` 1 and objective "sds" / "asd" the unconditional prediction cancels exactly
(eps_cfg = eps_c); it is then not computed (no extra renders).

What the gradient is (x = the student's latent): e.g. "sds" + "dmd" with CFG 1 gives
grad = (x - y) / (mean |x - y| + dmd_eps), a pull of every pixel straight towards the target render;
"sds" + "sds" weighting gives alpha_t sigma_t (x - y); "asd" with plus_ratio > 0 adds
(alpha_t / sigma_t - alpha_t+ / sigma_t+) sigma_t / alpha_t (x - y) to the classifier term
(g - 1)(x0_u - y) / (w + dmd_eps) of plus_ratio 0 (all with "dmd", before clipping).

Target renders: targets are drawn by `renderers.mesh_renderer.MeshRenderer.render_meshes` from a mesh
extracted once per shape and scale by the project's marching cubes (`target_mesh_resolution`^3 grid,
cached), with per-vertex constant colour, no gradient (`target_renderer="mesh"`, default, ~70x faster
than NeuS on the CPU); or by the NeuS volume renderer on the exact SDF (`"volume"`); or as 3D Gaussians
on the target surface by the Gaussian renderer (`"gaussian"`, see `target_gaussians`); or by the same
kind of renderer as each student render (`"same"`). The two renderers disagree on "depth" (mesh: along
the camera axis; volume: along the ray) and "disparity" (mesh "clip_z": from clip-space z, about
depth - 0.2; volume: from the ray depth), so mesh-drawn targets that teach a render whose `renderer` is
"volume" are converted to the volume conventions (`volume_depth_conventions`); without that the volume
path would be taught a surface 0.2 nearer the camera. Background and the remaining conventions
(`normal_flip_x`, `disparity_depth`) are options and must match the student's renderers. Use a solid
background for the student's rgb (the target's background is the constant `background`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from renderers.backgrounds import NORMAL_BACKGROUND
from renderers.cameras import resized
from renderers.gaussians import Gaussians
from renderers.types import Cameras, RenderOutput
from teachers.base import Teacher, checked_image, render_image
from teachers.objectives import ScoreDistillation
from teachers.schedules import ScheduleLike
from teachers.shapes import ShapeField, ShapeTarget, parse_shape_prompt, target_gaussians, target_mesh

SPLAT_FIELDS = ("means", "quats", "scales", "opacities", "sh")
IMAGE_CHANNELS = {"rgb": 3, "normal": 3, "alpha": 1, "depth": 1, "disparity": 1}
UNCONDITIONALS = ("mixture", "gaussian")
TARGET_RENDERERS = ("mesh", "volume", "gaussian", "same")
# the target Gaussians (`target_renderer="gaussian"`): the untrained Gaussians of
# lightning_modules/student/gaussian_field.py on the target surface, drawn by a GaussianRenderer with eps2d / antialiased
TARGET_GAUSSIANS = dict(num_gaussians=4096, scale_factor=0.5, thickness=0.3, opacity=0.9, eps2d=0.3, antialiased=False)


# ---------------------------------------------------------------------------------------------- exact denoisers
def ddpm_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
) -> Tensor:
    """abar_t `[T]` (float32) of a diffusers DDPM noise schedule (default: Stable Diffusion's)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule
    )
    return scheduler.alphas_cumprod.float()


def epsilon_from_x0(x_t: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps = (x_t - alpha x0) / sigma; alpha, sigma broadcast against x_t (e.g. `[M, 1, 1, 1]`)."""
    return (x_t - alpha * x0) / sigma


def dirac_mixture_x0(
    x_t: Tensor, components: Tensor, alpha: Tensor, sigma: Tensor, log_prior: Tensor | None = None
) -> Tensor:
    """Exact posterior mean E[x0 | x_t] `[M, C, h, w]` when x0 is a mixture of Diracs.

    x_t: [M, C, h, w]; components: [M, K, C, h, w] (the K Diracs of each row); alpha, sigma: [M, 1, 1, 1];
    log_prior: [K] or [M, K] log mixture weights (default uniform). The posterior weights are
    softmax_k(log_prior_k - ||x_t - alpha c_k||^2 / (2 sigma^2)), computed in float64.
    """
    diff = (x_t[:, None] - alpha[:, None] * components).double()
    logits = -diff.square().flatten(2).sum(-1) / (2 * sigma.double().flatten()[:, None] ** 2)  # [M, K]
    if log_prior is not None:
        logits = logits + log_prior.to(logits)
    weights = torch.softmax(logits, dim=1).to(components.dtype)
    return torch.einsum("mk,mk...->m...", weights, components)


def gaussian_x0(x_t: Tensor, mean: Tensor, std: float, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Exact posterior mean E[x0 | x_t] when x0 ~ N(mean, std^2 I):
    mean + alpha std^2 / (alpha^2 std^2 + sigma^2) (x_t - alpha mean)."""
    variance = float(std) ** 2
    gain = alpha * variance / (alpha.square() * variance + sigma.square())
    return mean + gain * (x_t - alpha * mean)


def volume_depth_conventions(depth: Tensor, alpha: Tensor, cameras: Cameras) -> dict[str, Tensor]:
    """A mesh render's "depth" and "disparity" `[B, V, 1, H, W]` in the NeuS volume renderer's conventions.

    The mesh renderer's depth is the distance along the camera axis (and its default "clip_z"
    disparity is computed from the clip-space z, about depth - 0.2); the volume renderer's depth is the
    distance along the pixel's ray, t = depth / cos(angle between the ray and the camera axis), and its
    disparity (far - (t a + (1 - a) far)) / (far - near) with a the opacity and near / far = camera
    distance -/+ sqrt(3). `depth`: the mesh render's axial depth (0 on the background); `alpha`: its coverage.
    """
    from renderers.cameras import pixel_ray_directions
    from renderers.volume_renderer import volume_disparity

    height, width = depth.shape[-2:]
    directions = pixel_ray_directions(cameras, height, width).to(depth)  # [B, V, H, W, 3] world, unit
    forward = -cameras.c2w[..., :3, 2].to(depth)  # the camera looks along its -z axis
    cosine = (directions * forward[:, :, None, None, :]).sum(-1)[:, :, None]  # [B, V, 1, H, W]
    ray_depth = depth / cosine
    distance = cameras.distance.to(depth)[:, :, None, None, None]
    return {"depth": ray_depth, "disparity": volume_disparity(ray_depth, alpha, distance)}


# ---------------------------------------------------------------------------------------------- teacher
class ShapeTeacher(Teacher):
    """Analytic teacher: exact denoisers of procedural target renders (see the module docstring).

    Args:
        channels: render images forming the teacher latent, in order ("rgb", "normal", "alpha",
            "depth", "disparity").
        resolution: area-pool the latent to resolution x resolution (None: the render's size).
        unconditional: "mixture" (Diracs at all targets of the call + the empty scene) or "gaussian".
        unconditional_prompts: extra prompts whose targets always join the mixture (e.g. the whole
            prompt list, so that eps_u does not depend on which prompts share a batch).
        unconditional_std: the standard deviation of the "gaussian" unconditional (latent units).
        background: RGB of the targets' background (match the student renderer's).
        target_renderer: "mesh" (cached marching-cubes mesh, rasterised; depth / disparity converted to
            the volume conventions for volume renders), "volume" (NeuS on the exact SDF), "gaussian" (3D
            Gaussians on the target surface, `target_gaussians`) or "same" (the renderer kind of each
            student render).
        target_gaussians: the target Gaussians of "gaussian" (keys of `TARGET_GAUSSIANS`, the defaults):
            `num_gaussians` points drawn by area on the target mesh (fixed seed), flat discs tangent to the
            exact surface with standard deviations scale_factor sqrt(area / num_gaussians) x (1, 1,
            thickness), one `opacity`; drawn with the renderer's `eps2d` and `antialiased`. Set them as the
            student's Gaussians (its `representation` and renderer): a render of the target surface then
            has the footprint of the student's splats, whose silhouettes reach beyond their centres.
        target_mesh_resolution: marching-cubes grid of the cached target meshes.
        normal_flip_x, disparity_depth, antialias: image conventions of the target renders (as
            `MeshRenderer`'s; keep the student renderer's).
        rasterizer: rasteriser backend of the target renders ("auto", "torch", "nvdiffrast").
        strict, default_shape, default_color: prompt parsing (`teachers.shapes.parse_shape_prompt`).
        shared_timestep: one timestep per object for all its views (multi-view teachers) or one per
            image (SD).
        num_train_timesteps, beta_start, beta_end, beta_schedule: the DDPM noise schedule.
        objective, weighting, cfg_scale, t_min, t_max, plus_ratio, plus_random, dmd_eps, csd_scale,
            grad_clip: see `teachers.objectives.ScoreDistillation`.
        weight, name: see `teachers.base.Teacher`.
    """

    default_name = "shape"

    def __init__(
        self,
        channels: Sequence[str] = ("rgb", "normal", "disparity"),
        resolution: int | None = None,
        unconditional: str = "mixture",
        unconditional_prompts: Sequence[str] = (),
        unconditional_std: float = 0.5,
        background: Sequence[float] = (1.0, 1.0, 1.0),
        target_renderer: str = "mesh",
        target_mesh_resolution: int = 48,
        target_gaussians: Mapping[str, float | bool] | None = None,
        normal_flip_x: bool = True,
        disparity_depth: str = "clip_z",
        antialias: bool = True,
        rasterizer: str = "auto",
        strict: bool = True,
        default_shape: str = "sphere",
        default_color: str = "grey",
        shared_timestep: bool = True,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        objective: str = "sds",
        weighting: str = "dmd",
        cfg_scale: ScheduleLike = 1.0,
        t_min: ScheduleLike = 0.02,
        t_max: ScheduleLike = 0.98,
        plus_ratio: float = 0.0,
        plus_random: bool = True,
        dmd_eps: float = 0.1,
        csd_scale: float = 1.0,
        grad_clip: ScheduleLike | None = None,
        weight: ScheduleLike = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name, dtype="float32", offload=False)
        channels = [channels] if isinstance(channels, str) else list(channels)
        unknown = [c for c in channels if c not in IMAGE_CHANNELS]
        if not channels or unknown:
            raise ValueError(
                f"ShapeTeacher channels {channels} must be a non-empty list of {', '.join(IMAGE_CHANNELS)}"
            )
        if len(set(channels)) != len(channels):
            raise ValueError(f"ShapeTeacher channels {channels} name an image twice")
        if unconditional not in UNCONDITIONALS:
            raise ValueError(f"unconditional {unconditional!r} is not one of {', '.join(UNCONDITIONALS)}")
        if target_renderer not in TARGET_RENDERERS:
            raise ValueError(f"target_renderer {target_renderer!r} is not one of {', '.join(TARGET_RENDERERS)}")
        if resolution is not None and resolution < 1:
            raise ValueError(f"resolution must be >= 1 or None, got {resolution}")
        if disparity_depth not in ("clip_z", "view_z"):
            raise ValueError(f"disparity_depth {disparity_depth!r} is not one of clip_z, view_z")
        if rasterizer not in ("auto", "torch", "nvdiffrast"):
            raise ValueError(f"rasterizer {rasterizer!r} is not one of auto, torch, nvdiffrast")
        if target_mesh_resolution < 8:
            raise ValueError(f"target_mesh_resolution must be >= 8, got {target_mesh_resolution}")
        unknown_gaussian = sorted(set(target_gaussians or {}) - set(TARGET_GAUSSIANS))
        if unknown_gaussian:
            raise ValueError(f"target_gaussians: unknown key(s) {', '.join(unknown_gaussian)}; known: {', '.join(TARGET_GAUSSIANS)}")
        if unconditional_std <= 0:
            raise ValueError(f"unconditional_std must be > 0, got {unconditional_std}")
        if len(background) != 3:
            raise ValueError(f"background needs 3 values (RGB in [0, 1]), got {list(background)}")
        self.channels = channels
        self.resolution = resolution
        self.unconditional = unconditional
        self.unconditional_std = float(unconditional_std)
        self.background = tuple(float(c) for c in background)
        self.target_renderer = target_renderer
        self.target_mesh_resolution = int(target_mesh_resolution)
        self.target_gaussians = {**TARGET_GAUSSIANS, **(target_gaussians or {})}
        self.normal_flip_x = normal_flip_x
        self.disparity_depth = disparity_depth
        self.antialias = antialias
        self.rasterizer = rasterizer
        self.strict = strict
        self.default_shape = default_shape
        self.default_color = default_color
        self.shared_timestep = shared_timestep
        self.schedule_config = dict(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule
        )
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
        self._targets: dict[str, ShapeTarget] = {}
        self.unconditional_targets = [self.target(prompt) for prompt in unconditional_prompts]
        self.alphas_cumprod: Tensor | None = None  # [T] float32, set by load()
        self.last_targets: Tensor | None = None  # [N, C, h, w] target latents of the last call

    # ------------------------------------------------------------------ targets
    def target(self, prompt: str) -> ShapeTarget:
        """The procedural target of `prompt` (parsed once, cached)."""
        if prompt not in self._targets:
            self._targets[prompt] = parse_shape_prompt(
                prompt, strict=self.strict, default_shape=self.default_shape, default_color=self.default_color
            )
        return self._targets[prompt]

    def prepare_prompts(self, prompts: Sequence[str]) -> int:
        """Parse every prompt (a bad one fails here, at set-up) and extract the target meshes once."""
        targets = {self.target(prompt) for prompt in prompts} | set(self.unconditional_targets)
        for target in targets:
            target_mesh(target, self.target_mesh_resolution)
        return len(targets)

    def load(self) -> None:
        """The target renderers (held outside the module tree, like a real teacher's frozen models) and
        the noise schedule."""
        from renderers.gaussian_renderer import GaussianRenderer
        from renderers.mesh_renderer import MeshRenderer
        from renderers.volume_renderer import NeuSVolumeRenderer

        mesh = MeshRenderer(
            resolution=self.target_mesh_resolution,
            backend=self.rasterizer,
            use_deformation=False,
            background=self.background,
            normal_flip_x=self.normal_flip_x,
            disparity_depth=self.disparity_depth,
            antialias=self.antialias,
        )
        volume = NeuSVolumeRenderer(background=self.background, normal_flip_x=self.normal_flip_x)
        gaussian = GaussianRenderer(
            background=self.background,
            normal_flip_x=self.normal_flip_x,
            eps2d=self.target_gaussians["eps2d"],
            antialiased=bool(self.target_gaussians["antialiased"]),
        )
        self.frozen = {"mesh": self._freeze(mesh), "volume": self._freeze(volume), "gaussian": self._freeze(gaussian)}
        self.alphas_cumprod = ddpm_alphas_cumprod(**self.schedule_config)

    def _target_kind(self, render: RenderOutput) -> tuple[str, str]:
        """(renderer drawing the targets, renderer whose depth / disparity conventions they follow)."""
        student = "volume" if render.renderer == "volume" else "mesh"
        if self.target_renderer == "same":
            return ("gaussian" if render.renderer == "gaussian" else student), student
        return self.target_renderer, student

    @torch.no_grad()
    def render_targets(
        self, targets: Sequence[ShapeTarget], cameras: Cameras, renderer: str = "mesh", conventions: str = "mesh"
    ) -> RenderOutput:
        """Render `targets[b]` from `cameras[b]` (`[B, V]`, at cameras.height x width) with the project's
        mesh renderer (cached target meshes), volume renderer (exact SDF) or Gaussian renderer (Gaussians on
        the target mesh, `target_gaussians`). Images `[B, V, C, H, W]`.

        conventions: "volume" makes the "depth" / "disparity" of mesh-rendered targets follow the NeuS
        volume renderer's (see `volume_depth_conventions`), so that they can teach a volume render.
        """
        if not self.is_loaded:
            self.load()
        if len(targets) != cameras.batch_size:
            raise ValueError(f"{len(targets)} targets for cameras of batch size {cameras.batch_size}")
        device = cameras.c2w.device
        if renderer == "volume":
            field = ShapeField(list(targets), device=device)
            return self.frozen["volume"].to(device)(field, cameras)
        if renderer == "gaussian":
            settings = {k: v for k, v in self.target_gaussians.items() if k not in ("eps2d", "antialiased")}
            splats = [target_gaussians(target, self.target_mesh_resolution, **settings) for target in targets]
            batch = {name: torch.stack([getattr(g, name)[0] for g in splats]).to(device) for name in SPLAT_FIELDS}
            return self.frozen["gaussian"].to(device)(Gaussians(**batch), cameras)
        meshes, colors = [], []
        for target in targets:
            mesh = target_mesh(target, self.target_mesh_resolution)
            meshes.append((mesh.vertices.to(device), mesh.faces.to(device)))
            colors.append(target.color_tensor(device).expand(mesh.num_vertices, 3))
        render = self.frozen["mesh"].to(device).render_meshes(meshes, colors, cameras)
        if conventions == "volume":
            render.images.update(volume_depth_conventions(render.images["depth"], render.images["alpha"], cameras))
        return render

    def empty_latent(self, device: torch.device) -> Tensor:
        """The latent `[C, 1, 1]` of the empty scene (background only), in [-1, 1]."""
        values = {
            "rgb": self.background,
            "normal": NORMAL_BACKGROUND,
            "alpha": (0.0,),
            "depth": (0.0,),
            "disparity": (0.0,),
        }
        flat = [v for name in self.channels for v in values[name]]
        return (torch.tensor(flat, device=device) * 2 - 1)[:, None, None]

    # ------------------------------------------------------------------ latents
    def latents(self, images: Mapping[str, Tensor], renderer: str = "render") -> Tensor:
        """Teacher latent `[B * V, C, h, w]` in [-1, 1] from images name -> `[B, V, c, H, W]`."""
        stack = [
            checked_image(images, name, IMAGE_CHANNELS[name], "ShapeTeacher", renderer) for name in self.channels
        ]
        maps = torch.cat(stack, dim=2).flatten(0, 1).float()
        if self.resolution is not None and tuple(maps.shape[-2:]) != (self.resolution, self.resolution):
            maps = F.adaptive_avg_pool2d(maps, (self.resolution, self.resolution))
        return maps * 2 - 1

    def _render_size(self, render: RenderOutput) -> tuple[int, int]:
        first = render_image(render, self.channels[0], IMAGE_CHANNELS[self.channels[0]], type(self).__name__)
        return first.shape[-2], first.shape[-1]

    def _target_latents(
        self,
        render: RenderOutput,
        targets: list[ShapeTarget],
        components: list[ShapeTarget] | None,
        kind: tuple[str, str],
    ) -> tuple[Tensor, Tensor | None]:
        """Target latents y `[B * V, C, h, w]` (object b's target from its cameras) and, when `components`
        are given, the latents `[K, B * V, C, h, w]` of every component seen from every camera of `render`."""
        height, width = self._render_size(render)
        cameras = resized(render.cameras, height, width)
        batch, views = cameras.batch_size, cameras.num_views
        if components is None:
            return self.latents(self.render_targets(targets, cameras, *kind).images, "target"), None
        count = len(components)
        tiled = Cameras(
            c2w=cameras.c2w.repeat(count, 1, 1, 1),
            fovy=cameras.fovy.repeat(count, 1),
            elevation=cameras.elevation.repeat(count, 1),
            azimuth=cameras.azimuth.repeat(count, 1),
            distance=cameras.distance.repeat(count, 1),
            height=height,
            width=width,
        )
        drawn = [target for target in components for _ in range(batch)]
        latent = self.latents(self.render_targets(drawn, tiled, *kind).images, "target")
        latent = latent.view(count, batch * views, *latent.shape[1:])
        own = torch.tensor([components.index(t) for t in targets], device=latent.device)  # [B]
        image = torch.arange(batch * views, device=latent.device)
        return latent[own[image // views], image], latent

    # ------------------------------------------------------------------ call
    def _prompt_strings(self, prompts: Sequence[str] | object, batch: int) -> list[str]:
        if isinstance(prompts, Mapping) and "text" in prompts:
            prompts = prompts["text"]
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(
                f"{self.name}: ShapeTeacher needs the prompt strings (a list of str, or a dict with key 'text'), "
                f"got {type(prompts).__name__}"
            )
        if len(prompts) != batch:
            raise ValueError(f"{self.name}: {len(prompts)} prompts for a render batch of {batch}")
        return list(prompts)

    def needs_unconditional(self, step: int) -> bool:
        """False when the unconditional prediction cancels exactly (CFG 1 with "sds" / "asd")."""
        return self.objective.objective == "csd" or self.objective.cfg_scale(step) != 1.0

    def compute_losses(
        self,
        renders: list[RenderOutput],
        prompts: Sequence[str] | object,
        step: int,
        generator: torch.Generator | None,
    ) -> list[Tensor]:
        batch = renders[0].cameras.batch_size
        views = renders[0].cameras.num_views
        for render in renders:
            if render.cameras.num_views != views:
                raise ValueError("all renders passed to a teacher in one call must have the same number of views")
        targets = [self.target(prompt) for prompt in self._prompt_strings(prompts, batch)]
        mixture = self.needs_unconditional(step) and self.unconditional == "mixture"
        # mixture components: every distinct target of the call and of `unconditional_prompts`
        components = list(dict.fromkeys(targets + self.unconditional_targets)) if mixture else None

        sizes = {self._render_size(render) for render in renders}
        if self.resolution is None and len(sizes) > 1:
            raise ValueError(
                f"{self.name}: renders of different sizes {sorted(sizes)} in one call; set the teacher's `resolution` "
                "so that they are pooled to one size"
            )
        latents, target_latents, component_latents, done = [], [], [], {}
        for render in renders:
            latents.append(self.latents(render.images, render.renderer))
            kind = self._target_kind(render)
            key = (id(render.cameras), self._render_size(render), kind)
            if key not in done:
                done[key] = self._target_latents(render, targets, components, kind)
            target_latents.append(done[key][0])
            component_latents.append(done[key][1])
        x = torch.cat(latents)  # [N, C, h, w], N = R * B * V
        num_images = x.shape[0]
        y = torch.cat(target_latents).to(x.device)  # [N, C, h, w]
        comps = torch.cat(component_latents, dim=1).to(x.device) if mixture else None  # [K, N, C, h, w]
        empty = self.empty_latent(x.device).expand_as(y)
        abar = self.alphas_cumprod.to(x.device)

        def denoise(x_in: Tensor, t: Tensor, code: Tensor) -> Tensor:
            """code < N: conditional for image `code`; code >= N: unconditional for image `code - N`."""
            image = code % num_images
            alpha = abar[t].sqrt().view(-1, 1, 1, 1)
            sigma = (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
            x0 = y[image].clone()
            rows = code >= num_images
            if rows.any() and self.needs_unconditional(step):
                index = image[rows]
                if self.unconditional == "gaussian":
                    x0[rows] = gaussian_x0(x_in[rows], empty[index], self.unconditional_std, alpha[rows], sigma[rows])
                else:
                    diracs = torch.cat([comps[:, index].transpose(0, 1), empty[index][:, None]], dim=1)  # [n, K + 1, ...]
                    x0[rows] = dirac_mixture_x0(x_in[rows], diracs, alpha[rows], sigma[rows])
            return epsilon_from_x0(x_in, x0, alpha, sigma)

        codes = torch.arange(num_images, device=x.device)
        group = views if self.shared_timestep else 1
        output = self.objective(x, denoise, codes, codes + num_images, self.alphas_cumprod, step, generator, group_size=group)
        self.record_stats(output)
        self.last_targets = y.detach()
        self.last_stats["target_mse"] = float((x.detach() - y).square().mean())
        return self.reduce_losses(output.loss, len(renders), views)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, resolution={self.resolution}, unconditional={self.unconditional!r}, "
            f"target_renderer={self.target_renderer!r}, objective={self.objective}"
        )


__all__ = [
    "ShapeTeacher",
    "ddpm_alphas_cumprod",
    "dirac_mixture_x0",
    "epsilon_from_x0",
    "gaussian_x0",
    "volume_depth_conventions",
]
