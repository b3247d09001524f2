"""The evaluation's rendering protocol: how every mesh (or Gaussian splat) is seen before CLIP scores it.

Defaults are the TriplaneTurbo reference's: the mesh normalised into [-0.9, 0.9]^3 (bounding box), rendered
unlit with its colours on a white background from 4 azimuths (0, 90, 180, 270 deg; azimuth 0 looks at the
front) at elevation 15 deg, distance 3, FoV 40 deg, 512 x 512, by the project's rasteriser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_modules.evaluation.meshes import MeshData
from renderers.gaussians import Gaussians


@dataclass(frozen=True)
class RenderProtocol:
    """How meshes are rendered for evaluation (defaults: the reference protocol)."""

    num_views: int = 4
    elevation: float = 15.0
    distance: float = 3.0
    fovy: float = 40.0
    resolution: int = 512
    azimuth_start: float = 0.0
    normalize: str = "box"  # "box": bounding box centred and scaled into [-bound, bound]^3; "none"
    bound: float = 0.9
    mesh_frame: str = "viewer"  # files in viewer axes (+y up, front +z) or "world" (+z up, front +x)

    @property
    def azimuths(self) -> list[float]:
        return [self.azimuth_start + k * 360.0 / self.num_views for k in range(self.num_views)]


def evaluation_cameras_for(protocol: RenderProtocol, device: torch.device | str = "cpu"):
    """The protocol's cameras, `[1, V]`."""
    from renderers.cameras import evaluation_cameras

    return evaluation_cameras(
        protocol.num_views,
        elevation=protocol.elevation,
        distance=protocol.distance,
        fovy=protocol.fovy,
        azimuth_start=protocol.azimuth_start,
        height=protocol.resolution,
        width=protocol.resolution,
        device=device,
    )


def render_views(
    mesh: MeshData | Gaussians, protocol: RenderProtocol, device: torch.device | str = "cpu", backend: str = "auto"
) -> Tensor:
    """Render `mesh` (world coordinates), or one object of Gaussians, under `protocol`: unlit RGB on white,
    `[V, 3, H, W]` in [0, 1].

    The one place that calls the project's rasterisers (backend: "auto", "torch" or "nvdiffrast").
    """
    from renderers.mesh_renderer import render_mesh

    cameras = evaluation_cameras_for(protocol, device)
    if isinstance(mesh, Gaussians):
        from lightning_modules.evaluation.gaussians import render_gaussian_views

        return render_gaussian_views(mesh, cameras, backend)
    with torch.no_grad():
        if mesh.textures:
            return render_textured(mesh, cameras, backend)[0].clamp(0, 1)
        out = render_mesh(
            torch.from_numpy(mesh.vertices).to(device),
            torch.from_numpy(mesh.faces).to(device),
            torch.from_numpy(mesh.colors).to(device),
            cameras,
            background=(1.0, 1.0, 1.0),
            backend=backend,
        )
    return out["rgb"][0].clamp(0, 1)


def render_textured(mesh: MeshData, cameras, backend: str = "auto") -> Tensor:
    """A textured mesh seen by `cameras` ([1, V]): `[1, V, 3, H, W]`, on white, anti-aliased.

    Shading on the project's rasteriser primitives, as `renderers.mesh_renderer.render_mesh` does for
    vertex colours: UVs are interpolated per pixel and the texture is sampled bilinearly (texel centres
    at (i + 0.5) / size, repeating outside [0, 1], as nvdiffrast's texture lookup); parts without a
    texture keep their vertex colours.
    """
    import torch.nn.functional as F

    from renderers.cameras import mvp_matrix
    from renderers.rasterizers import get_rasterizer

    device = cameras.c2w.device
    height, width = cameras.height, cameras.width
    rasterizer = get_rasterizer(backend, device)
    vertices = torch.from_numpy(mesh.vertices).to(device)
    faces = torch.from_numpy(mesh.faces).to(device)
    clip = torch.einsum("vij,nj->vni", mvp_matrix(cameras)[0], F.pad(vertices, (0, 1), value=1.0))  # [V, Nv, 4]
    fragments = rasterizer.rasterize(clip, faces, height, width)
    index = torch.from_numpy(mesh.texture_index).to(device)
    uses = torch.stack([index == k for k in range(len(mesh.textures))], dim=-1).float()  # [Nv, K]
    attributes = torch.cat([torch.from_numpy(mesh.colors).to(device), torch.from_numpy(mesh.uv).to(device), uses], -1)
    values = rasterizer.interpolate(attributes, fragments)  # [V, H, W, 5 + K]
    color, uv, weight = values[..., :3], values[..., 3:5].remainder(1.0), values[..., 5:]
    grid = torch.stack([uv[..., 0] * 2 - 1, 1 - uv[..., 1] * 2], dim=-1)  # image row 0 is v = 1
    views = grid.shape[0]
    for k, texture in enumerate(mesh.textures):
        image = torch.from_numpy(texture).to(device).permute(2, 0, 1)[None]  # [1, 3, Ht, Wt]
        sampled = F.grid_sample(image, grid.reshape(1, views * height, width, 2), mode="bilinear",
                                padding_mode="border", align_corners=False)
        sampled = sampled[0].permute(1, 2, 0).reshape(views, height, width, 3)
        color = color + weight[..., k : k + 1] * (sampled - color)
    mask = fragments.mask.to(color.dtype)
    rgb = rasterizer.antialias(torch.lerp(torch.ones_like(color), color, mask), fragments)
    return rgb.permute(0, 3, 1, 2)[None]
