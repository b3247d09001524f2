"""Mesh export: GLB (default), OBJ and PLY with vertex colours, optionally a UV texture via xatlas.

World frame of this project (see renderers/types.py): +z up, and the object's front faces +x (a
camera at azimuth 0 sees the front, as in threestudio / MVDream view-dependent prompting). Common
viewers (glTF's convention, Blender's and MeshLab's defaults for OBJ / PLY) expect +y up with the
front facing +z, so export applies the rotation (x, y, z) -> (y, z, x): a proper rotation (a cyclic
permutation, determinant +1) that keeps the triangle winding.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import trimesh

EXPORT_FORMATS = ("glb", "obj", "ply")


def world_to_viewer(vertices: np.ndarray) -> np.ndarray:
    """[N, 3] world coordinates (+z up, front +x) -> viewer coordinates (+y up, front +z)."""
    return np.ascontiguousarray(vertices[:, [1, 2, 0]])


def viewer_to_world(vertices: np.ndarray) -> np.ndarray:
    """Inverse of `world_to_viewer`."""
    return np.ascontiguousarray(vertices[:, [2, 0, 1]])


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def colors_to_uint8(colors) -> np.ndarray:
    """[N, 3] floats in [0, 1] -> [N, 4] uint8 RGBA (opaque)."""
    rgb = np.clip(np.rint(_numpy(colors).astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], axis=1)


def build_trimesh(vertices, faces, colors) -> trimesh.Trimesh:
    """A trimesh in viewer coordinates with per-vertex colours.

    vertices: [N, 3] float, world coordinates; faces: [F, 3] int; colors: [N, 3] floats in [0, 1].
    """
    vertices, faces = _numpy(vertices).astype(np.float64), _numpy(faces).astype(np.int64)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"expected vertices [N, 3] and faces [F, 3], got {vertices.shape} and {faces.shape}")
    if len(_numpy(colors)) != len(vertices):
        raise ValueError(f"expected one colour per vertex ({len(vertices)}), got {len(_numpy(colors))}")
    return trimesh.Trimesh(
        vertices=world_to_viewer(vertices),
        faces=faces,
        vertex_colors=colors_to_uint8(colors),
        process=False,
    )


def _bake_uv_texture(
    mesh: trimesh.Trimesh,
    color_fn: Callable[[np.ndarray], np.ndarray] | None,
    texture_size: int,
) -> trimesh.Trimesh:
    """Unwrap with xatlas and bake colours into a texture image.

    color_fn maps world points [M, 3] to colours [M, 3] in [0, 1] (e.g. the field's colour MLP); without
    it the vertex colours are interpolated.
    """
    import xatlas
    from PIL import Image

    from renderers.uv_bake import rasterize_uv

    vmapping, indices, uvs = xatlas.parametrize(mesh.vertices.astype(np.float32), mesh.faces.astype(np.uint32))
    positions = mesh.vertices[vmapping]
    vertex_rgb = mesh.visual.vertex_colors[vmapping, :3].astype(np.float64) / 255.0
    face_ids, bary = rasterize_uv(uvs, indices, texture_size)  # [T, T], [T, T, 3]
    covered = face_ids >= 0
    corners = indices[face_ids[covered]]  # [M, 3]
    weights = bary[covered][..., None]  # [M, 3, 1]
    if color_fn is None:
        texel_rgb = (vertex_rgb[corners] * weights).sum(axis=1)
    else:
        texel_world = viewer_to_world((positions[corners] * weights).sum(axis=1))
        texel_rgb = np.asarray(color_fn(texel_world), dtype=np.float64)
    image = np.zeros((texture_size, texture_size, 3), np.float64)
    image[covered] = texel_rgb
    image = _dilate(image, covered, iterations=4)
    texture = Image.fromarray(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)[::-1])
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=texture, metallicFactor=0.0, roughnessFactor=1.0)
    visual = trimesh.visual.TextureVisuals(uv=uvs, material=material)
    return trimesh.Trimesh(vertices=positions, faces=indices.astype(np.int64), visual=visual, process=False)


def _dilate(image: np.ndarray, mask: np.ndarray, iterations: int) -> np.ndarray:
    """Grow the baked texels into empty neighbours so texture filtering does not bleed black seams."""
    image, mask = image.copy(), mask.copy()
    for _ in range(iterations):
        acc = np.zeros_like(image)
        count = np.zeros(mask.shape, np.float64)
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            acc += np.roll(image * mask[..., None], (dy, dx), axis=(0, 1))
            count += np.roll(mask, (dy, dx), axis=(0, 1))
        grow = (~mask) & (count > 0)
        image[grow] = acc[grow] / count[grow, None]
        mask = mask | grow
    return image


def export_mesh(
    path: str | Path,
    vertices,
    faces,
    colors,
    file_format: str | None = None,
    uv_texture: bool = False,
    texture_size: int = 1024,
    color_fn: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Path:
    """Write a coloured mesh.

    vertices: [N, 3] world coordinates (+z up, front +x); faces: [F, 3]; colors: [N, 3] in [0, 1].
    file_format: "glb", "obj" or "ply" (default: from the suffix of `path`, else "glb").
    uv_texture: unwrap with xatlas and bake a `texture_size`^2 texture (GLB and OBJ only), sampled
    from `color_fn(world_points [M, 3]) -> [M, 3]` when given, else from the vertex colours.
    """
    path = Path(path)
    file_format = (file_format or path.suffix.lstrip(".") or "glb").lower()
    if file_format not in EXPORT_FORMATS:
        raise ValueError(f"unknown mesh format {file_format!r}: use one of {', '.join(EXPORT_FORMATS)}")
    if uv_texture and file_format == "ply":
        raise ValueError("a UV texture needs GLB or OBJ: PLY stores vertex colours only")
    if path.suffix.lstrip(".").lower() != file_format:
        path = path.with_suffix(f".{file_format}")
    mesh = build_trimesh(vertices, faces, colors)
    if uv_texture:
        mesh = _bake_uv_texture(mesh, color_fn, texture_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    mesh.export(path, file_type=file_format)
    return path
