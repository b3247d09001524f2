"""Validation artefacts of `PRDModule`: render grids and coloured meshes for TensorBoard."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from renderers.export import world_to_viewer
from renderers.marching_cubes import TriangleMesh
from renderers.types import Field


def render_grid(images: dict[str, Tensor], rows: tuple[str, ...] = ("rgb", "normal")) -> Tensor:
    """One object's views as a grid `[3, R * H, V * W]` in [0, 1]: one row per image kind, one column per view.

    images: name -> `[V, C, H, W]` (1-channel images are repeated to RGB).
    """
    strips = []
    for name in rows:
        if name not in images:
            continue
        views = images[name].detach().float().clamp(0, 1)
        if views.shape[1] == 1:
            views = views.expand(-1, 3, -1, -1)
        strips.append(torch.cat(list(views), dim=-1))  # [3, H, V * W]
    if not strips:
        raise ValueError(f"none of the images {rows} was rendered (have: {', '.join(images)})")
    return torch.cat(strips, dim=-2).cpu()


def mesh_colors(field: Field, meshes: list[TriangleMesh]) -> list[Tensor]:
    """Per-vertex colours `[Nv, 3]` of each object's mesh, from one batched `field.color` call."""
    counts = [mesh.num_vertices for mesh in meshes]
    longest = max(counts, default=0)
    if longest == 0:
        return [torch.zeros(0, 3) for _ in meshes]
    points = torch.stack([F.pad(mesh.vertices.float(), (0, 0, 0, longest - n)) for mesh, n in zip(meshes, counts, strict=True)])
    colors = field.color(points.to(field.planes.device if hasattr(field, "planes") else points.device))
    return [colors[b, :n].detach().float().cpu() for b, n in enumerate(counts)]


def tensorboard_mesh(mesh: TriangleMesh, colors: Tensor) -> dict[str, Tensor]:
    """`SummaryWriter.add_mesh` arguments for one mesh, in viewer orientation (+y up)."""
    vertices = torch.from_numpy(world_to_viewer(mesh.vertices.detach().float().cpu().numpy()))
    rgb = (colors.clamp(0, 1) * 255).round().to(torch.uint8)
    return {
        "vertices": vertices[None],
        "colors": rgb[None],
        "faces": mesh.faces.detach().cpu().int()[None],
    }
