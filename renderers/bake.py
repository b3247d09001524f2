"""Texture baking from a field onto a UV-unwrapped light mesh: albedo and a tangent-space normal map.

    maps = bake_maps(positions, normals, uvs, faces, size=1024, color_fn=..., sdf_fn=...)

Each texel centre inside a triangle of the atlas gets its 3D point on the light mesh (barycentric
interpolation). One Newton step along the SDF gradient, p - sdf(p) grad / |grad|^2, moves it onto the
field's own surface, where the colour field gives the albedo; the normalised SDF gradient is the
full-resolution surface normal, written in the tangent frame a glTF viewer builds from the mesh's NORMAL
and TANGENT attributes (bitangent = w cross(N, T), the three interpolated per texel and normalised), so
the light mesh is shaded with the full mesh's detail. Empty texels (gutters) get the value of the nearest
baked texel, so texture filtering and mipmaps never pull in black at chart seams.

Frames: everything here is in one frame (the caller's); the tangent-space normal map does not depend on
it. Images are [size, size, C] with row 0 at v = 1 (the top of the picture, as image files store it).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from renderers.uv_bake import rasterize_uv

ColorFn = Callable[[np.ndarray], np.ndarray]  # world points [K, 3] -> RGB [K, 3] in [0, 1]
SdfFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # points [K, 3] -> (sdf [K], gradient [K, 3])


@dataclass
class BakedMaps:
    """albedo: [T, T, 3] uint8 (sRGB, as the colour field's values); normal: [T, T, 3] uint8 tangent-space
    normals encoded (n + 1) / 2 (linear), or None without an SDF; coverage: [T, T] bool, texels baked before
    the gutters were filled. Row 0 is v = 1."""

    albedo: np.ndarray
    normal: np.ndarray | None
    coverage: np.ndarray


def _unit(x: np.ndarray, fallback=(0.0, 0.0, 1.0)) -> np.ndarray:
    length = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(length > 1e-12, x / np.maximum(length, 1e-12), np.asarray(fallback, x.dtype))


def vertex_tangents(positions: np.ndarray, normals: np.ndarray, uvs: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """glTF TANGENT [M, 4]: xyz unit, orthogonal to the unit vertex normal, along +u; w = +-1 such that
    w cross(N, T) points along +v (v up: the +Y of the normal map is up in the picture).

    positions, normals: [M, 3]; uvs: [M, 2]; faces: [F, 3]. Per-face dP/du and dP/dv, weighted by the
    face's UV area, summed at its corners; a vertex without UV extent gets any unit vector orthogonal to N.
    """
    p, t = positions[faces], uvs[faces]  # [F, 3, 3], [F, 3, 2]
    e1, e2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    d1, d2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]  # 2 x signed UV area
    sign = np.sign(det)[:, None]
    # dP/du * |det| and dP/dv * |det|
    du = (e1 * d2[:, 1:2] - e2 * d1[:, 1:2]) * sign
    dv = (e2 * d1[:, 0:1] - e1 * d2[:, 0:1]) * sign
    tangent = np.zeros_like(positions)
    bitangent = np.zeros_like(positions)
    for k in range(3):
        np.add.at(tangent, faces[:, k], du)
        np.add.at(bitangent, faces[:, k], dv)
    tangent -= normals * np.einsum("ij,ij->i", tangent, normals)[:, None]
    # fallback: the axis least aligned with the normal, made orthogonal to it
    axis = np.eye(3)[np.argmin(np.abs(normals), axis=1)]
    fallback = _unit(axis - normals * np.einsum("ij,ij->i", axis, normals)[:, None])
    length = np.linalg.norm(tangent, axis=1, keepdims=True)
    tangent = np.where(length > 1e-12, tangent / np.maximum(length, 1e-12), fallback)
    w = np.where(np.einsum("ij,ij->i", np.cross(normals, tangent), bitangent) < 0, -1.0, 1.0)
    return np.concatenate([tangent, w[:, None]], axis=1)


def tangent_frames(normals: np.ndarray, tangents: np.ndarray, faces: np.ndarray, face_ids: np.ndarray,
                   bary: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The viewer's per-fragment frame at K surface points: (T, B, N), each [K, 3] unit.

    normals [M, 3], tangents [M, 4] per vertex; face_ids [K], bary [K, 3]. B = w cross(N, T) per vertex,
    then all three interpolated and normalised (what three.js and the glTF sample viewer do).
    """
    bitangents = tangents[:, 3:] * np.cross(normals, tangents[:, :3])
    corners = faces[face_ids]  # [K, 3]

    def interpolate(values):
        return _unit(np.einsum("kc,kcd->kd", bary, values[corners]))

    return interpolate(tangents[:, :3]), interpolate(bitangents), interpolate(normals)


def to_tangent_space(vectors: np.ndarray, frame: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """[K, 3] unit vectors n -> their unit coordinates x with x_T T + x_B B + x_N N parallel to n (the
    frame need not be orthogonal: the inverse of the matrix [T B N], by cross products)."""
    t, b, n = frame
    det = np.einsum("ij,ij->i", t, np.cross(b, n))[:, None]
    det = np.where(np.abs(det) > 1e-12, det, 1.0)
    coords = np.stack([np.einsum("ij,ij->i", vectors, np.cross(b, n)), np.einsum("ij,ij->i", vectors, np.cross(n, t)),
                       np.einsum("ij,ij->i", vectors, np.cross(t, b))], axis=1) / det
    return _unit(coords)


def nearest_covered(coverage: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows, cols) [T, T] of the nearest covered texel of each texel ([T, T] bool), or None when every texel
    or none is covered (nothing to fill)."""
    from scipy.ndimage import distance_transform_edt

    if coverage.all() or not coverage.any():
        return None
    rows, cols = distance_transform_edt(~coverage, return_distances=False, return_indices=True)
    return rows, cols


def fill_gutters(image: np.ndarray, coverage: np.ndarray, nearest=None) -> np.ndarray:
    """[T, T, C] image whose uncovered texels take the value of the nearest covered texel ([T, T] bool);
    `nearest`: `nearest_covered(coverage)`, computed once for several images."""
    nearest = nearest_covered(coverage) if nearest is None else nearest
    return image if nearest is None else image[nearest]


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] -> uint8, rounded."""
    return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)


TEXEL_CHUNK = 32_768  # texels per task: FieldSampler's chunk, and small enough to stay in a 2-core CPU's caches


@contextmanager
def single_torch_thread_pool(workers: int):
    """A thread pool of `workers` threads that run with one torch thread each (restored on exit), or None for
    one worker: numpy and torch release the GIL on these arrays, so chunks on threads use the cores better than
    torch's own threads on small, memory-bound operations."""
    if workers <= 1:
        yield None
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


def bake_maps(
    positions: np.ndarray,
    normals: np.ndarray,
    tangents: np.ndarray | None,
    uvs: np.ndarray,
    faces: np.ndarray,
    size: int,
    color_fn: ColorFn,
    sdf_fn: SdfFn | None = None,
    workers: int | None = None,
) -> BakedMaps:
    """Bake albedo (and with `sdf_fn` a tangent-space normal map) into `size`^2 textures.

    positions, normals: [M, 3] per atlas vertex (normals unit, as written to the file); tangents: [M, 4]
    (`vertex_tangents`, needed with sdf_fn); uvs: [M, 2] in [0, 1], v up; faces: [F, 3].
    color_fn: points [K, 3] -> RGB [K, 3] in [0, 1]; sdf_fn: points [K, 3] -> (sdf [K], gradient [K, 3]).
    workers: threads over chunks of `TEXEL_CHUNK` texels, each texel baked from its chunk alone (default: torch's
    thread count; the maps do not depend on it, bit for bit); color_fn and sdf_fn are called from them.
    """
    if sdf_fn is not None and tangents is None:
        raise ValueError("a normal map needs the vertex tangents")
    workers = workers or torch.get_num_threads()
    with single_torch_thread_pool(workers) as pool:
        face_ids, bary = rasterize_uv(uvs, faces, size, pool, workers)  # row 0 = v = 0
        face_ids, bary = face_ids[::-1], bary[::-1]  # row 0 = v = 1
        coverage = face_ids >= 0
        # texels in face order: a chunk's points are then neighbours on the surface (the faces of a marching-cubes
        # mesh, decimated or not, come in scan order), so the field's plane lookups stay in cache
        order = np.argsort(face_ids[coverage], kind="stable")
        ids, weights = face_ids[coverage][order], bary[coverage][order]  # [K], [K, 3]

        def bake_texels(start: int) -> tuple[np.ndarray, np.ndarray | None]:
            """Albedo [k, 3] and encoded tangent-space normals [k, 3] (or None) of texels start : start + k."""
            chunk_ids, chunk_weights = ids[start:start + TEXEL_CHUNK], weights[start:start + TEXEL_CHUNK]
            points = np.einsum("kc,kcd->kd", chunk_weights, positions[faces[chunk_ids]])
            encoded = None
            if sdf_fn is not None:
                sdf, gradient = sdf_fn(points)
                squared = np.maximum(np.einsum("ij,ij->i", gradient, gradient), 1e-12)
                points = points - (sdf / squared)[:, None] * gradient  # one Newton step onto the field's surface
                field_normals = _unit(gradient, fallback=(0.0, 0.0, 0.0))
                frame = tangent_frames(normals, tangents, faces, chunk_ids, chunk_weights)
                flat = np.linalg.norm(field_normals, axis=1) < 0.5  # no gradient: keep the mesh normal
                field_normals[flat] = frame[2][flat]
                encoded = to_uint8((to_tangent_space(field_normals, frame) + 1.0) / 2.0)
            return to_uint8(np.asarray(color_fn(points), np.float64)), encoded

        def image(values: list, empty: tuple[float, float, float]) -> np.ndarray:
            """[T, T, 3] uint8: the texels' values, `empty` where no texel was baked (no coverage), the nearest
            texel's value in the gutters."""
            texels = np.empty((len(order), 3), np.uint8)
            if values:
                texels[order] = np.concatenate(values)
            out = np.empty((size, size, 3), np.uint8)
            out[...] = to_uint8(np.asarray(empty))
            out[coverage] = texels
            return fill_gutters(out, coverage, nearest)

        starts = range(0, len(ids), TEXEL_CHUNK)
        if pool is None:
            nearest, parts = nearest_covered(coverage), [bake_texels(start) for start in starts]
        else:
            nearest_task = pool.submit(nearest_covered, coverage)  # the gutter fill of both maps
            parts = list(pool.map(bake_texels, starts))
            nearest = nearest_task.result()
        albedo_values, normal_values = [colour for colour, _ in parts], [encoded for _, encoded in parts]
        albedo_task = None if pool is None else pool.submit(image, albedo_values, (0.0, 0.0, 0.0))
        normal_image = None if sdf_fn is None else image(normal_values, (0.5, 0.5, 1.0))
        albedo = image(albedo_values, (0.0, 0.0, 0.0)) if albedo_task is None else albedo_task.result()
    return BakedMaps(albedo, normal_image, coverage)


class FieldSampler:
    """`color_fn` / `sdf_fn` of one object of a `renderers.types.Field` (batch size 1), in chunks.

    field: anything with `color(points [1, K, 3]) -> [1, K, 3]` and `sdf(points [1, K, 3]) -> [1, K]`,
    differentiable w.r.t. the points (the SDF gradient comes from the field's `sdf_and_gradient`, else from
    autograd). device / dtype: where and how the points are evaluated; chunk: points per call (32k: the
    full-size triplane lookups of larger chunks overflow a 2-core CPU's caches). workers: on the CPU, chunks
    are evaluated by this many threads at once, each with one torch thread (default: torch's thread count),
    which uses the cores better than torch's own threads on these small, memory-bound operations
    (1.3-2x faster on 2 cores; the results do not depend on it).
    """

    def __init__(self, field, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 chunk: int = 32_768, workers: int | None = None):
        self.field, self.device, self.dtype, self.chunk = field, torch.device(device), dtype, chunk
        self.workers = workers

    def _chunks(self, points: np.ndarray):
        tensor = torch.as_tensor(np.asarray(points), dtype=self.dtype, device=self.device)
        return tensor.split(self.chunk)

    def _map(self, fn, points: np.ndarray) -> list:
        """`fn` over the chunks of `points`, in order: on the CPU by `workers` threads of one torch thread each."""
        chunks = self._chunks(points)
        workers = min(self.workers or torch.get_num_threads(), len(chunks)) if self.device.type == "cpu" else 1
        with single_torch_thread_pool(workers) as pool:
            return [fn(c) for c in chunks] if pool is None else list(pool.map(fn, chunks))

    def _rgb(self, chunk: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.field.color(chunk[None])[0].clamp(0, 1)

    def _sdf_and_gradient(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first_order = getattr(self.field, "sdf_and_gradient", None)
        if first_order is not None:
            sdf, grad = first_order(chunk[None])
            return sdf[0].detach(), grad[0].detach()
        with torch.enable_grad():
            chunk = chunk.detach().requires_grad_(True)
            sdf = self.field.sdf(chunk[None])[0]
            (grad,) = torch.autograd.grad(sdf.sum(), chunk)
        return sdf.detach(), grad

    def color(self, points: np.ndarray) -> np.ndarray:
        """[K, 3] points -> [K, 3] RGB clamped to [0, 1]."""
        rgb = self._map(lambda c: self._rgb(c).float().cpu(), points)
        return torch.cat(rgb).numpy().astype(np.float64)

    def sdf(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[K, 3] points -> (sdf [K], gradient [K, 3]): the field's own `sdf_and_gradient` (first derivative only)
        where it has one, else autograd through `field.sdf`."""

        def on_cpu(c):
            return tuple(value.float().cpu() for value in self._sdf_and_gradient(c))

        values, gradients = zip(*self._map(on_cpu, points), strict=True)
        return torch.cat(values).numpy().astype(np.float64), torch.cat(gradients).numpy().astype(np.float64)

    def color_tensor(self, points: torch.Tensor) -> torch.Tensor:
        """`color` on tensors that stay on the sampler's device: [K, 3] points -> [K, 3] RGB (the field's dtype)."""
        return torch.cat([self._rgb(c) for c in points.to(self.device, self.dtype).split(self.chunk)])

    def sdf_tensor(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`sdf` on tensors that stay on the sampler's device: [K, 3] points -> (sdf [K], gradient [K, 3])."""
        values, gradients = zip(*(self._sdf_and_gradient(c) for c in points.to(self.device, self.dtype).split(self.chunk)),
                                strict=True)
        return torch.cat(values), torch.cat(gradients)
