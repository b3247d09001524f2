"""The bake of `renderers.bake` in PyTorch, on the device that holds the field (a GPU where there is one).

    maps = bake_maps_on_device(positions, normals, tangents, uvs, faces, 1024, sampler)   # sampler: FieldSampler

The same maps as `bake.bake_maps` (same texel -> triangle rule, Newton step, tangent frames, 8-bit encoding
and gutter fill), computed as tensors on `sampler.device`: the UV layout is rasterised there, every texel's
point, field query, frame and encoding stay there, and only the two uint8 images come back. The one CPU step
is the gutter fill's nearest-texel search (scipy's exact distance transform of the [T, T] coverage mask).
On 2 CPU cores it takes about what the threaded numpy bake of `bake.py` takes (within 10 % at 1024^2, 0.04 s
more at 512^2, `benchmarks/bench_asset.py --bake-on-device`), which stays the CPU's default; this path is for
CUDA and runs anywhere (its tests run it on the CPU against the numpy bake and the analytic oracles).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from renderers.bake import BakedMaps, FieldSampler, nearest_covered

MAX_CANDIDATES = 1 << 22  # (texel, triangle) pairs tested at once when rasterising the UV layout
# texels baked at once: a 1024^2 atlas in one step, a few hundred MB of temporaries at most at any size (on the CPU,
# smaller steps of torch's small operations cost more than the numpy bake's threads: 32k texels 1.4x slower)
TEXELS_PER_STEP = 1 << 20


def rasterize_uv_torch(uvs: torch.Tensor, faces: torch.Tensor, size: int,
                       max_candidates: int = MAX_CANDIDATES) -> tuple[torch.Tensor, torch.Tensor]:
    """`uv_bake.rasterize_uv` in torch: the triangle covering each texel centre of a `size`^2 texture.

    uvs: [N, 2] in [0, 1] (u right, v up), float; faces: [F, 3] long, on one device.
    Returns face_ids [size, size] long (-1 where no triangle covers the texel) and barycentric weights
    [size, size, 3] in uvs' dtype; row 0 is v = 0. A texel on an edge shared by two faces goes to the later
    face, as in `rasterize_uv` (a scatter of the maximum face index: deterministic on CUDA too). Candidates are
    the texels of each triangle's bounding box, tested `max_candidates` at a time.
    """
    device, dtype = uvs.device, uvs.dtype
    tri = uvs[faces] * size - 0.5  # [F, 3, 2] in texel-centre coordinates
    lo = tri.amin(dim=1).floor().long().clamp(0, size - 1)
    hi = tri.amax(dim=1).ceil().long().clamp(0, size - 1)
    extent = hi - lo + 1  # [F, 2]
    counts = extent[:, 0] * extent[:, 1]
    coefficients, valid = _barycentric_coefficients(tri)

    winner = torch.full((size * size,), -1, dtype=torch.long, device=device)
    ends = torch.cumsum(counts, 0)
    first = 0
    while first < len(faces):  # face groups of about max_candidates candidate texels
        last = int(torch.searchsorted(ends, ends[first] - counts[first] + max_candidates, right=True))
        last = max(last, first + 1)
        group = torch.arange(first, last, device=device)
        group_counts = counts[first:last]
        face_of = torch.repeat_interleave(group, group_counts)
        local = torch.arange(int(group_counts.sum()), device=device)
        local = local - torch.repeat_interleave(torch.cumsum(group_counts, 0) - group_counts, group_counts)
        px = lo[face_of, 0] + local % extent[face_of, 0]
        py = lo[face_of, 1] + local // extent[face_of, 0]
        weights = _barycentrics(coefficients[face_of], px.to(dtype), py.to(dtype))
        inside = valid[face_of] & (weights >= -1e-9).all(dim=1)
        winner.scatter_reduce_(0, (py * size + px)[inside], face_of[inside], reduce="amax")
        first = last

    face_ids = winner.view(size, size)
    covered = face_ids >= 0
    py, px = covered.nonzero(as_tuple=True)
    bary = torch.zeros((size, size, 3), dtype=dtype, device=device)
    bary[py, px] = _barycentrics(coefficients[face_ids[py, px]], px.to(dtype), py.to(dtype))
    return face_ids, bary


def _barycentric_coefficients(tri: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per face of tri ([F, 3, 2]), w1 and w2 as affine functions of the texel centre: [F, 6] with
    w1 = k0 x + k1 y + k2, w2 = k3 x + k4 y + k5; and [F] bool, False for degenerate faces."""
    a, v0, v1 = tri[:, 0], tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    denom = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
    valid = denom.abs() > 1e-12
    inv = 1.0 / torch.where(valid, denom, torch.ones_like(denom))
    coefficients = torch.stack([v1[:, 1] * inv, -v1[:, 0] * inv, (v1[:, 0] * a[:, 1] - v1[:, 1] * a[:, 0]) * inv,
                                -v0[:, 1] * inv, v0[:, 0] * inv, (v0[:, 1] * a[:, 0] - v0[:, 0] * a[:, 1]) * inv],
                               dim=1)
    return coefficients, valid


def _barycentrics(k: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[K, 3] weights (w0, w1, w2) at texel centres (x [K], y [K]) from per-texel coefficients k [K, 6]."""
    w1 = k[:, 0] * x + k[:, 1] * y + k[:, 2]
    w2 = k[:, 3] * x + k[:, 4] * y + k[:, 5]
    return torch.stack([1.0 - w1 - w2, w1, w2], dim=1)


def _unit(x: torch.Tensor, fallback=(0.0, 0.0, 1.0)) -> torch.Tensor:
    length = x.norm(dim=-1, keepdim=True)
    return torch.where(length > 1e-12, x / length.clamp_min(1e-12), x.new_tensor(fallback))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=-1, keepdim=True)


def _to_uint8(values: torch.Tensor) -> torch.Tensor:
    """Floats in [0, 1] -> uint8, rounded half to even (as numpy's rint)."""
    return torch.round(values * 255.0).clamp(0, 255).to(torch.uint8)


def bake_maps_on_device(
    positions: np.ndarray,
    normals: np.ndarray,
    tangents: np.ndarray | None,
    uvs: np.ndarray,
    faces: np.ndarray,
    size: int,
    sampler: FieldSampler,
    normal_map: bool = True,
    dtype: torch.dtype = torch.float32,
) -> BakedMaps:
    """`bake.bake_maps` on `sampler.device`: albedo from `sampler.color_tensor` and, with `normal_map`, the
    tangent-space normal map from `sampler.sdf_tensor`.

    positions, normals: [M, 3] per atlas vertex; tangents: [M, 4] (`bake.vertex_tangents`, needed with
    normal_map); uvs: [M, 2] in [0, 1], v up; faces: [F, 3]. dtype: of the bake's own arithmetic (the field is
    queried in the sampler's dtype). Returns numpy images, row 0 at v = 1.
    """
    if normal_map and tangents is None:
        raise ValueError("a normal map needs the vertex tangents")
    device = sampler.device

    def tensor(array):
        return torch.as_tensor(np.asarray(array), dtype=dtype, device=device)

    faces_t = torch.as_tensor(np.asarray(faces, np.int64), device=device)
    with torch.no_grad():
        # float64 (a few million candidate texels, cheap on any GPU): the texels of the numpy bake, bit for bit
        uvs64 = torch.as_tensor(np.asarray(uvs), dtype=torch.float64, device=device)
        face_ids, bary = rasterize_uv_torch(uvs64, faces_t, size)
        bary = bary.to(dtype)
        face_ids, bary = face_ids.flip(0), bary.flip(0)  # row 0 = v = 1
        coverage = face_ids >= 0
        ids, weights = face_ids[coverage], bary[coverage]  # [K], [K, 3]
        del face_ids, bary
        positions_t = tensor(positions)
        frames_of = (tensor(normals), tensor(tangents)) if normal_map else None
        albedo_texels = torch.empty((len(ids), 3), dtype=torch.uint8, device=device)
        normal_texels = torch.empty_like(albedo_texels) if normal_map else None
        for start in range(0, len(ids), TEXELS_PER_STEP):  # bounded memory at any texture size
            part = slice(start, start + TEXELS_PER_STEP)
            _bake_texels(ids[part], weights[part], faces_t, positions_t, frames_of, sampler, dtype,
                         albedo_texels[part], None if normal_texels is None else normal_texels[part])

        coverage_np = coverage.cpu().numpy()
        nearest = nearest_covered(coverage_np)
        if nearest is not None:
            nearest = tuple(torch.as_tensor(index, device=device) for index in nearest)

        def image(texels: torch.Tensor, empty: tuple[int, int, int]) -> np.ndarray:
            out = torch.tensor(empty, dtype=torch.uint8, device=device).expand(size, size, 3).clone()
            out[coverage] = texels
            return (out if nearest is None else out[nearest]).cpu().numpy()

        albedo = image(albedo_texels, (0, 0, 0))
        normal = None if normal_texels is None else image(normal_texels, (128, 128, 255))
    return BakedMaps(albedo, normal, coverage_np)


def _bake_texels(ids: Tensor, weights: Tensor, faces: Tensor, positions: Tensor, frames_of, sampler: FieldSampler,
                 dtype: torch.dtype, albedo_out: Tensor, normal_out: Tensor | None) -> None:
    """Bake k texels, given their faces ids [k] and barycentric weights [k, 3], into albedo_out [k, 3] uint8 and,
    with `frames_of` = (vertex normals [M, 3], tangents [M, 4]), normal_out [k, 3] uint8."""
    corners = faces[ids]  # [k, 3]
    points = torch.einsum("kc,kcd->kd", weights, positions[corners])
    if frames_of is not None:
        sdf, gradient = (value.to(dtype) for value in sampler.sdf_tensor(points))
        squared = _dot(gradient, gradient).clamp_min(1e-12)
        points = points - sdf[:, None] / squared * gradient  # one Newton step onto the field's surface
        field_normals = _unit(gradient, fallback=(0.0, 0.0, 0.0))
        frame = _tangent_frames(*frames_of, corners, weights)
        flat = field_normals.norm(dim=1) < 0.5  # no gradient: keep the mesh normal
        field_normals = torch.where(flat[:, None], frame[2], field_normals)
        normal_out.copy_(_to_uint8((_to_tangent_space(field_normals, frame) + 1.0) / 2.0))
    albedo_out.copy_(_to_uint8(sampler.color_tensor(points).to(dtype)))


def _tangent_frames(normals: torch.Tensor, tangents: torch.Tensor, corners: torch.Tensor, weights: torch.Tensor):
    """`bake.tangent_frames` in torch: (T, B, N) [K, 3] at points with corner vertices [K, 3], weights [K, 3]."""
    bitangents = tangents[:, 3:] * torch.linalg.cross(normals, tangents[:, :3])

    def interpolate(values):
        return _unit(torch.einsum("kc,kcd->kd", weights, values[corners]))

    return interpolate(tangents[:, :3]), interpolate(bitangents), interpolate(normals)


def _to_tangent_space(vectors: torch.Tensor, frame) -> torch.Tensor:
    """`bake.to_tangent_space` in torch: [K, 3] unit vectors -> unit coordinates in the frame (T, B, N)."""
    t, b, n = frame
    bn, nt, tb = torch.linalg.cross(b, n), torch.linalg.cross(n, t), torch.linalg.cross(t, b)
    det = _dot(t, bn)
    det = torch.where(det.abs() > 1e-12, det, torch.ones_like(det))
    coords = torch.cat([_dot(vectors, bn), _dot(vectors, nt), _dot(vectors, tb)], dim=1) / det
    return _unit(coords)
