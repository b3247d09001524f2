"""A stand-in Gaussian splatter for the representation tests: enough of a differentiable renderer to show that PRD
trains a Gaussian student through its renders, independent of `renderers.gaussian_renderer` (which has its own
tests against the analytic footprint and finite differences).

Each Gaussian is drawn as an isotropic screen-space blob (its mean scale projected at its depth), composited
without sorting: alpha = 1 - prod(1 - o w), colour and depth the w-weighted means. Not 3DGS; a test tool.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from renderers.types import Cameras, RenderOutput

GAUSSIAN_STUDENT = "lightning_modules.student.gaussian_field.TriplaneGaussianStudent"  # the student_class of the configs


class StandInSplatter(nn.Module):
    """`forward(field, cameras)` for a field with `gaussian_attributes()`; images rgb, alpha, depth, disparity,
    normal `[B, V, C, H, W]` on a white background, renderer "gaussian"."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, field, cameras: Cameras, text_embedding: Tensor | None = None) -> RenderOutput:
        g = field.gaussian_attributes()
        means, opacities = g["means"], g["opacities"]  # [B, N, 3], [B, N]
        rgb = (0.5 + 0.28209479177387814 * g["sh"][:, :, 0]).clamp_min(0)  # [B, N, 3]
        height, width = cameras.height, cameras.width
        w2c = torch.linalg.inv(cameras.c2w.to(means))  # [B, V, 4, 4]
        homogeneous = torch.cat([means, torch.ones_like(means[..., :1])], dim=-1)  # [B, N, 4]
        camera = torch.einsum("bvij,bnj->bvni", w2c, homogeneous)[..., :3]  # [B, V, N, 3]
        depth = (-camera[..., 2]).clamp_min(1e-3)  # the camera looks along -z
        focal = height / 2 / torch.tan(cameras.fovy.to(means) / 2)[:, :, None]  # [B, V, 1]
        u = width / 2 + focal * camera[..., 0] / depth  # [B, V, N] pixels, row 0 at the top
        v = height / 2 - focal * camera[..., 1] / depth
        radius = (focal * g["scales"].mean(-1)[:, None] / depth).clamp_min(0.5)  # [B, V, N]
        ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
        pixels = torch.stack([xs.flatten(), ys.flatten()], -1).to(means)  # [P, 2]
        d2 = (pixels[:, 0] - u[..., None]).square() + (pixels[:, 1] - v[..., None]).square()  # [B, V, N, P]
        weight = opacities[:, None, :, None] * torch.exp(-d2 / (2 * radius[..., None].square()))
        alpha = 1 - torch.prod(1 - weight.clamp(max=0.999), dim=2)  # [B, V, P]
        share = weight / weight.sum(2, keepdim=True).clamp_min(1e-8)
        color = torch.einsum("bvnp,bnc->bvcp", share, rgb)
        image_depth = (share * depth[..., None]).sum(2)
        normals = torch.einsum("bvij,bnj->bvni", w2c[..., :3, :3], g["normals"])  # camera space
        normal = torch.einsum("bvnp,bvnc->bvcp", share, normals) * 0.5 + 0.5
        a = alpha[:, :, None]
        images = {
            "rgb": color * a + (1 - a),
            "alpha": a,
            "depth": (image_depth * alpha)[:, :, None],
            "disparity": (alpha / image_depth.clamp_min(1e-3))[:, :, None],
            "normal": normal * a + torch.tensor([0.5, 0.5, 1.0]).to(means)[:, None] * (1 - a),
        }
        shaped = {k: x.unflatten(-1, (height, width)) for k, x in images.items()}
        return RenderOutput(shaped, cameras, "gaussian")
