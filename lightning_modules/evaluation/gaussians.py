"""Gaussian splat files for evaluation: 3D Gaussian Splatting PLYs are scored like meshes, under the same
protocol (views, elevation, distance, FoV, resolution, white background), so the mesh and the Gaussian
output of one model sit in one table.

A `.ply` whose vertex element has the 3DGS properties (`renderers.gaussian_ply.is_gaussian_ply`) is read
as Gaussians in the protocol's `mesh_frame` axes; "box" normalisation centres the bounding box of the
centres of the visible Gaussians (opacity >= 1/255) and scales its longest side to 2 * bound (centres and
scales alike), as a mesh's vertices are; the renders are `renderers.GaussianRenderer`'s rgb on white.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from lightning_modules.evaluation.meshes import box_fit
from renderers.gaussian_ply import GaussianPlyError, is_gaussian_ply, read_gaussian_ply
from renderers.gaussians import Gaussians

VISIBLE_OPACITY = 1.0 / 255.0


def is_gaussian_file(path: str | Path) -> bool:
    """True for a 3D Gaussian Splatting PLY file (not a mesh PLY)."""
    return Path(path).suffix.lower() == ".ply" and is_gaussian_ply(path)


def load_gaussians(path: str | Path, mesh_frame: str = "viewer") -> Gaussians:
    """One object of Gaussians in the world frame; a one-line `UserError` for a bad file."""
    gaussians = read_gaussian_ply(path, frame=mesh_frame)
    if not (gaussians.opacities >= VISIBLE_OPACITY).any():
        raise GaussianPlyError(f"Gaussian PLY file {path} has no visible Gaussian (every opacity < 1/255)")
    return gaussians


def normalize_gaussians(gaussians: Gaussians, mode: str = "box", bound: float = 0.9) -> Gaussians:
    """"box": the visible centres' bounding box centred, its longest side scaled to 2 * bound; "none": as is."""
    if mode == "none":
        return gaussians
    visible = gaussians.means[0][gaussians.opacities[0] >= VISIBLE_OPACITY]  # [M, 3]
    centre, scale = box_fit(visible.amin(dim=0), visible.amax(dim=0), mode, bound)
    return gaussians.transformed(scale=scale, offset=-centre * scale)


def render_gaussian_views(gaussians: Gaussians, cameras, backend: str = "auto") -> Tensor:
    """RGB on white `[V, 3, H, W]` of one object from `cameras` ([1, V]). backend: the mesh rasteriser's
    name ("auto", "torch", "nvdiffrast"); "nvdiffrast" (a GPU rasteriser) means gsplat when it is there."""
    from renderers.gaussian_renderer import GaussianRenderer

    renderer = GaussianRenderer(backend="torch" if backend == "torch" else "auto", background=(1.0, 1.0, 1.0))
    with torch.no_grad():
        out = renderer(gaussians.to(cameras.c2w.device), cameras)
    return out["rgb"][0].clamp(0, 1)
