"""NeuS volume renderer of the same field (the path through which the reference learns most geometry).

Reproduced from the reference (custom/triplaneturbo/models/renderers/generative_space_sdf_volume_renderer.py,
threestudio/models/renderers/neus_volume_renderer.py, threestudio/models/estimators.py,
threestudio/models/renderers/patch_renderer.py and configs/TriplaneTurbo_v1.yaml):
- fixed inverse standard deviation inv_s = exp(10 * 0.4605) = 100 (not trained);
- per ray, 128 proposal intervals uniform over [near 0.1, far 4.0] (stratified in training); their SDF
  (no gradient) gives NeuS opacities alpha = clip((sigmoid(s (sdf + h/2)) - sigmoid(s (sdf - h/2)) + 1e-5)
  / (sigmoid(s (sdf + h/2)) + 1e-5), 0, 1) with h = 1.732 * 2 * radius / 64, densities alpha / h and a
  transmittance CDF, from which 64 more interval edges are importance-sampled; proposal and importance
  edges together (sorted) delimit the 193 intervals that are rendered with gradients;
- NeuS alpha of each interval from the SDF and the analytic normal (cos annealing finished:
  iter_cos = -relu(-cos(dir, normal))), weights alpha * prod(1 - alpha) of the previous intervals;
- opacity = sum w, depth = sum w t, rgb = sum w c + background (1 - opacity), normal = normalise(sum w n);
- disparity = (far - (depth * opacity + (1 - opacity) far)) / (far - near), near / far = camera distance
  -/+ sqrt(3), clamped to [0, 1]; camera-space normals with x negated, (n + 1) / 2 * opacity +
  (1 - opacity) (0.5, 0.5, 1);
- in training, a low-resolution global pass (H // 3 x W // 3, e.g. 42^2 of 128^2) bilinearly upsampled,
  with a random full-resolution patch (40 x 40) pasted in (the same place for every view);
- regularisers: eikonal mean((|grad sdf| - 1)^2) over the samples of the global pass, sparsity
  mean(sqrt(opacity^2 + 0.01)) over the opacity image;
- `rgb_grad_shrink` scales the gradient of the sample colours (the reference schedules it 1 -> 0.01
  over 20k steps).
Deviations: the global pass casts its rays through the pixel centres of the low-resolution image (the
reference bilinearly resizes the full-resolution ray directions); samples are drawn with our own
stratification, not nerfacc's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from renderers.backgrounds import NORMAL_BACKGROUND, as_background
from renderers.cameras import pixel_rays, world_to_camera
from renderers.types import Cameras, Field, RenderOutput


def volume_disparity(depth: Tensor, opacity: Tensor, distance: Tensor) -> Tensor:
    """(far - (depth a + (1 - a) far)) / (far - near) clamped to [0, 1], a the opacity, near / far = camera
    distance -/+ sqrt(3) (the reference's normalisation); `distance` broadcasts against `depth`."""
    far, near = distance + math.sqrt(3.0), distance - math.sqrt(3.0)
    blended = depth * opacity + (1.0 - opacity) * far
    return ((far - blended) / (far - near)).clamp(0.0, 1.0)


def _exclusive_cumprod(x: Tensor) -> Tensor:
    """prod_{j < i} x_j along the last axis."""
    return torch.cumprod(torch.cat([torch.ones_like(x[..., :1]), x[..., :-1]], dim=-1), dim=-1)


def _sorted_uniform(shape: tuple[int, ...], count: int, stratified: bool, generator, device, dtype) -> Tensor:
    """`count` values in [0, 1] per ray, sorted: one per bin (jittered) or evenly spaced ends included."""
    if stratified:
        jitter = torch.rand(*shape, count, generator=generator).to(device=device, dtype=dtype)
        return (torch.arange(count, device=device, dtype=dtype) + jitter) / count
    return torch.linspace(0.0, 1.0, count, device=device, dtype=dtype).expand(*shape, count)


def _invert_cdf(edges: Tensor, cdf: Tensor, u: Tensor) -> Tensor:
    """Piecewise-linear inverse of `cdf [..., K]` over `edges [..., K]` at `u [..., n]`."""
    index = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True).clamp(1, cdf.shape[-1] - 1)
    c_lo, c_hi = cdf.gather(-1, index - 1), cdf.gather(-1, index)
    t_lo, t_hi = edges.gather(-1, index - 1), edges.gather(-1, index)
    span = c_hi - c_lo
    fraction = torch.where(span > 0, (u - c_lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(u))
    return t_lo + fraction.clamp(0, 1) * (t_hi - t_lo)


class NeuSVolumeRenderer(nn.Module):
    """NeuS SDF volume rendering of a field from every camera.

    Args:
        inv_s: fixed inverse standard deviation of the logistic density (reference 100).
        num_proposal_samples / num_importance_samples: 128 / 64 (reference).
        near, far: ray range (reference 0.1, 4.0).
        radius: scene radius for the proposal step h = 1.732 * 2 * radius / num_importance_samples.
        global_downsample, patch_size: training renders at H // global_downsample, upsampled, plus one
            random full-resolution patch (reference 3 and 40); patch_size 0 renders full resolution.
        stratified: jitter the samples in training (never in eval mode).
        rgb_grad_shrink: gradient factor of the sample colours (attribute, schedulable).
        background: module or RGB triple (default white), as for `MeshRenderer`.
        normal_flip_x, normal_background: as for `MeshRenderer`.
        ray_chunk: rays per object and per field call (bounds memory at evaluation).
        generator: optional CPU generator for the stratification and the patch position.
    """

    def __init__(
        self,
        inv_s: float = 100.0,
        num_proposal_samples: int = 128,
        num_importance_samples: int = 64,
        near: float = 0.1,
        far: float = 4.0,
        radius: float = 1.0,
        global_downsample: int = 3,
        patch_size: int = 40,
        stratified: bool = True,
        rgb_grad_shrink: float = 1.0,
        background: nn.Module | Sequence[float] | None = None,
        normal_flip_x: bool = True,
        normal_background: Sequence[float] = NORMAL_BACKGROUND,
        ray_chunk: int = 4096,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not 0 < near < far:
            raise ValueError(f"need 0 < near < far, got near={near}, far={far}")
        if num_proposal_samples < 1 or num_importance_samples < 1:
            raise ValueError("num_proposal_samples and num_importance_samples must be >= 1")
        self.inv_s = float(inv_s)
        self.num_proposal_samples = int(num_proposal_samples)
        self.num_importance_samples = int(num_importance_samples)
        self.near, self.far = float(near), float(far)
        self.step_size = 1.732 * 2 * radius / self.num_importance_samples
        self.global_downsample = int(global_downsample)
        self.patch_size = int(patch_size)
        self.stratified = stratified
        self.rgb_grad_shrink = float(rgb_grad_shrink)
        self.background = as_background(background)
        self.normal_flip_x = normal_flip_x
        self.normal_background = tuple(float(c) for c in normal_background)
        self.ray_chunk = int(ray_chunk)
        self.generator = generator
        self.last_patch: tuple[int, int, int] | None = None  # (top, left, size) of the last training patch

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_intervals(self, field: Field, origins: Tensor, directions: Tensor) -> Tensor:
        """Interval edges `[B, M, Np + Ni + 2]` along rays `origins, directions [B, M, 3]` (no gradient)."""
        shape, device, dtype = origins.shape[:2], origins.device, origins.dtype
        randomize = self.stratified and self.training
        u = _sorted_uniform(shape, self.num_proposal_samples + 1, randomize, self.generator, device, dtype)
        edges = self.near + u * (self.far - self.near)  # [B, M, Np + 1]
        mids = (edges[..., 1:] + edges[..., :-1]) / 2
        points = origins[..., None, :] + directions[..., None, :] * mids[..., None]
        sdf = field.sdf(points.reshape(shape[0], -1, 3)).reshape(mids.shape)
        half = self.step_size * 0.5
        prev_cdf = torch.sigmoid((sdf + half) * self.inv_s)
        next_cdf = torch.sigmoid((sdf - half) * self.inv_s)
        alpha = ((prev_cdf - next_cdf + 1e-5) / (prev_cdf + 1e-5)).clip(0.0, 1.0)
        density = alpha / self.step_size
        optical = torch.cumsum(density * (edges[..., 1:] - edges[..., :-1]), dim=-1)
        transmittance = torch.exp(-torch.cat([torch.zeros_like(optical[..., :1]), optical[..., :-1]], dim=-1))
        cdf = 1.0 - torch.cat([transmittance, torch.zeros_like(transmittance[..., :1])], dim=-1)  # [B, M, Np + 1]
        u_fine = _sorted_uniform(shape, self.num_importance_samples + 1, randomize, self.generator, device, dtype)
        fine = _invert_cdf(edges, cdf, u_fine)
        return torch.sort(torch.cat([edges, fine], dim=-1), dim=-1).values

    # ------------------------------------------------------------------ rendering
    def render_rays(self, field: Field, origins: Tensor, directions: Tensor, edges: Tensor | None = None) -> dict[str, Tensor]:
        """Render rays `origins, directions [B, M, 3]` (unit directions) of the B objects of `field`.

        edges: interval edges `[B, M, S + 1]` (default: `sample_intervals`), treated as constants.
        Returns "rgb_fg" [B, M, 3], "opacity" [B, M, 1], "depth" [B, M, 1], "normal" [B, M, 3] (world,
        unit), "eikonal" (scalar mean over the samples) and "edges".
        """
        chunks, used_edges = [], []
        for start in range(0, origins.shape[1], self.ray_chunk):
            stop = start + self.ray_chunk
            chunk_o, chunk_d = origins[:, start:stop], directions[:, start:stop]
            chunk_edges = self.sample_intervals(field, chunk_o, chunk_d) if edges is None else edges[:, start:stop].detach()
            chunks.append(self._render_chunk(field, chunk_o, chunk_d, chunk_edges))
            used_edges.append(chunk_edges)
        out = {key: torch.cat([c[key] for c in chunks], dim=1) for key in ("rgb_fg", "opacity", "depth", "normal")}
        total = sum(c["eikonal_sum"] for c in chunks)
        count = sum(c["num_samples"] for c in chunks)
        out["eikonal"] = total / max(count, 1)
        out["edges"] = torch.cat(used_edges, dim=1)
        return out

    def _render_chunk(self, field: Field, origins: Tensor, directions: Tensor, edges: Tensor) -> dict:
        batch, rays = origins.shape[:2]
        mids = (edges[..., 1:] + edges[..., :-1]) / 2  # [B, m, S]
        dists = edges[..., 1:] - edges[..., :-1]
        samples = mids.shape[-1]
        points = (origins[..., None, :] + directions[..., None, :] * mids[..., None]).reshape(batch, -1, 3)
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            points = points.detach().requires_grad_(True)
            sdf = field.sdf(points)  # [B, m S]
            (gradient,) = torch.autograd.grad(sdf.sum(), points, create_graph=keep_graph)
        if not keep_graph:
            sdf, gradient = sdf.detach(), gradient.detach()
        sdf = sdf.reshape(batch, rays, samples)
        gradient = gradient.reshape(batch, rays, samples, 3)
        normal = F.normalize(gradient, dim=-1)

        cos = (directions[..., None, :] * normal).sum(-1)
        iter_cos = -F.relu(-cos)
        prev_cdf = torch.sigmoid((sdf - iter_cos * dists * 0.5) * self.inv_s)
        next_cdf = torch.sigmoid((sdf + iter_cos * dists * 0.5) * self.inv_s)
        alpha = ((prev_cdf - next_cdf + 1e-5) / (prev_cdf + 1e-5)).clip(0.0, 1.0)
        weights = alpha * _exclusive_cumprod(1.0 - alpha)  # [B, m, S]
        color = self._sample_colors(field, points.detach().view(batch, rays, samples, 3), weights, keep_graph)
        eikonal = (gradient.norm(dim=-1) - 1.0) ** 2
        return {
            "rgb_fg": (weights[..., None] * color).sum(-2),
            "opacity": weights.sum(-1, keepdim=True),
            "depth": (weights * mids).sum(-1, keepdim=True),
            "normal": F.normalize((weights[..., None] * normal).sum(-2), dim=-1),
            "eikonal_sum": eikonal.sum(),
            "num_samples": eikonal.numel(),
        }

    def _sample_colors(self, field: Field, points: Tensor, weights: Tensor, keep_graph: bool) -> Tensor:
        """Colours `[B, m, S, 3]` at the samples. Without autograd, only samples with weight > 1e-6 are
        evaluated (the others count as black; their contribution is below 1e-6 each)."""
        if keep_graph:
            color = field.color(points.flatten(1, 2)).view(points.shape)
            if self.rgb_grad_shrink != 1.0:
                color = self.rgb_grad_shrink * color + (1.0 - self.rgb_grad_shrink) * color.detach()
            return color
        selected = weights > 1e-6
        counts = selected.flatten(1).sum(1)
        color = torch.zeros_like(points)
        longest = int(counts.max()) if counts.numel() else 0
        if longest == 0:
            return color
        padded = torch.zeros(points.shape[0], longest, 3, dtype=points.dtype, device=points.device)
        slots = torch.cumsum(selected.flatten(1).long(), dim=1) - 1  # position of each selected sample
        b_index, flat_index = torch.nonzero(selected.flatten(1), as_tuple=True)
        padded[b_index, slots[b_index, flat_index]] = points.flatten(1, 2)[b_index, flat_index]
        values = field.color(padded)
        color.flatten(1, 2)[b_index, flat_index] = values[b_index, slots[b_index, flat_index]].to(color.dtype)
        return color

    def _render_images(
        self,
        field: Field,
        cameras: Cameras,
        text_embedding: Tensor | None,
        height: int,
        width: int,
        crop: tuple[int, int, int, int] | None = None,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Images `[B, V, C, h, w]` at `height x width` (optionally only the crop (top, left, h, w))."""
        origins, directions = pixel_rays(cameras, height, width)  # [B, V, H, W, 3]
        if crop is not None:
            top, left, crop_h, crop_w = crop
            origins = origins[:, :, top : top + crop_h, left : left + crop_w]
            directions = directions[:, :, top : top + crop_h, left : left + crop_w]
        batch, views, h, w, _ = directions.shape
        dtype = self._field_dtype(field, directions.dtype)
        origins, directions = origins.to(dtype), directions.to(dtype)
        out = self.render_rays(field, origins.reshape(batch, -1, 3), directions.reshape(batch, -1, 3))

        def image(x: Tensor) -> Tensor:  # [B, V h w, C] -> [B, V, h, w, C]
            return x.reshape(batch, views, h, w, -1)

        opacity, depth = image(out["opacity"]), image(out["depth"])
        background = self.background(directions, text_embedding).to(dtype)
        rgb = image(out["rgb_fg"]) + background * (1.0 - opacity)
        rotation = world_to_camera(cameras.c2w)[..., :3, :3].to(dtype)
        normal_cam = torch.einsum("bvij,bvhwj->bvhwi", rotation, image(out["normal"]))
        if self.normal_flip_x:
            normal_cam = normal_cam * torch.tensor([-1.0, 1.0, 1.0], dtype=dtype, device=normal_cam.device)
        normal_bg = torch.tensor(self.normal_background, dtype=dtype, device=normal_cam.device)
        normal = (normal_cam + 1.0) / 2.0 * opacity + (1.0 - opacity) * normal_bg
        disparity = volume_disparity(depth, opacity, cameras.distance.to(dtype)[:, :, None, None, None])
        images = {"rgb": rgb, "alpha": opacity, "normal": normal, "depth": depth, "disparity": disparity}
        return {k: v.permute(0, 1, 4, 2, 3) for k, v in images.items()}, out["eikonal"]

    @staticmethod
    def _field_dtype(field: Field, default: torch.dtype) -> torch.dtype:
        if isinstance(field, nn.Module):
            for tensor in [*field.parameters(), *field.buffers()]:
                if tensor.is_floating_point():
                    return tensor.dtype
        dtype = getattr(field, "dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else default

    def forward(self, field: Field, cameras: Cameras, text_embedding: Tensor | None = None) -> RenderOutput:
        """Render the B objects of `field` from `cameras` ([B, V]); images `[B, V, C, H, W]`.

        In training mode with patch_size > 0: low-resolution global pass + random full-resolution patch.
        Regularisers: "eikonal" and "sparsity" (scalars).
        """
        height, width = cameras.height, cameras.width
        patch = min(self.patch_size, height, width)
        if self.training and patch > 0 and self.global_downsample > 1:
            low_h, low_w = max(1, height // self.global_downsample), max(1, width // self.global_downsample)
            images, eikonal = self._render_images(field, cameras, text_embedding, low_h, low_w)
            images = {
                k: F.interpolate(v.flatten(0, 1), size=(height, width), mode="bilinear", align_corners=False).unflatten(0, v.shape[:2])
                for k, v in images.items()
            }
            top = int(torch.randint(0, max(1, height - patch), (1,), generator=self.generator))
            left = int(torch.randint(0, max(1, width - patch), (1,), generator=self.generator))
            self.last_patch = (top, left, patch)
            patch_images, _ = self._render_images(field, cameras, text_embedding, height, width, (top, left, patch, patch))
            for key, value in patch_images.items():
                full = images[key].clone()
                full[..., top : top + patch, left : left + patch] = value
                images[key] = full
        else:
            images, eikonal = self._render_images(field, cameras, text_embedding, height, width)
        sparsity = torch.sqrt(images["alpha"] ** 2 + 0.01).mean()
        return RenderOutput(images=images, cameras=cameras, renderer="volume", regularizers={"eikonal": eikonal, "sparsity": sparsity})
