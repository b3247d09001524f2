"""Pure-PyTorch 3D Gaussian splatting (any device, differentiable): the projection and rasterisation of
3D Gaussian Splatting (Kerbl et al. 2023) with the conventions of gsplat 1.5, so that the two backends of
`GaussianRenderer` draw the same images.

Projection (EWA splatting), per camera and Gaussian:
- camera-space centre p = W m + t (OpenCV camera: x right, y down, z forward); culled unless
  near <= p_z <= far;
- 2D covariance  Sigma2D = J W Sigma W^T J^T + eps2d I  (eps2d = 0.3 px^2, the low-pass dilation of
  3DGS / gsplat), Sigma = R S S^T R^T, J the Jacobian of the perspective projection at the centre, with
  x / z and y / z clamped to 1.3 x the half field of view as 3DGS does (keeps J bounded off screen);
- pixel centre of the image: u = fx x / z + cx, v = fy y / z + cy (pixel (i, j) is sampled at (j + 0.5,
  i + 0.5)); culled when Sigma2D is not positive definite;
- extent: per axis ceil(k sqrt(Sigma2D_aa)) pixels with k = min(3.33, sqrt(2 ln(255 opacity))) (gsplat's;
  3DGS takes 3 sigma of the largest eigenvalue). Beyond it opacity * exp(-d^2 / 2) < 1/255, so the
  culling drops nothing the alpha threshold below would keep; Gaussians whose extent misses the image,
  or with opacity < 1/255, are culled.

Rasterisation, per pixel, over the Gaussians whose extent overlaps the pixel's tile (8 x 8 pixels here,
16 x 16 in gsplat: the same pixels either way, since outside its extent a Gaussian's alpha is below the
1/255 threshold), nearest centre first (sorted by p_z; ties keep the input order):
- alpha = min(max_alpha, opacity exp(-d^T Sigma2D^-1 d / 2)), d = pixel - centre; skipped when below
  1/255 (max_alpha = 0.99 in 3DGS; gsplat 1.5 hard-codes 0.999);
- front-to-back compositing: weight = alpha T, T the product of (1 - alpha) of the nearer ones; the
  pixel stops, excluding the Gaussian that would take T below 1e-4, as 3DGS does;
- outputs sum(weight feature) and alpha = 1 - T = sum(weight).

The work is vectorised over (tiles x 64 pixels x the Gaussians of the tile) in chunks of at most
`chunk_elements` such triples (tiles with the most Gaussians first, each chunk padded to its own longest
list), so memory is bounded without autograd and proportional to the overlaps with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

ALPHA_THRESHOLD = 1.0 / 255.0
LOG_ALPHA_THRESHOLD = math.log(ALPHA_THRESHOLD)
MIN_TRANSMITTANCE = 1e-4
MAX_EXTENT_SIGMAS = 3.33
EPS2D = 0.3
TILE_SIZE = 8  # gsplat's is 16; the tile size changes no pixel (see the module docstring), only speed


@dataclass
class ProjectedGaussians:
    """Gaussians seen by B x V cameras: tensors `[B, V, N, ...]`; `radii == 0` marks culled ones."""

    means2d: Tensor  # [B, V, N, 2] pixel coordinates (x right, y down)
    depths: Tensor  # [B, V, N] camera-space z (distance along the optical axis)
    conics: Tensor  # [B, V, N, 3] (a, b, c) of the inverse 2D covariance [[a, b], [b, c]]
    radii: Tensor  # [B, V, N, 2] int64 extent in pixels along x and y, 0 when culled
    # [B, V, N] opacity factor of the antialiased (Mip-Splatting) mode, None in the classic one
    compensations: Tensor | None = None


def project_gaussians(
    means: Tensor,
    covariances: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    intrinsics: Tensor,
    height: int,
    width: int,
    near: float,
    far: float,
    eps2d: float = EPS2D,
    antialiased: bool = False,
) -> ProjectedGaussians:
    """EWA projection (see the module docstring).

    antialiased: also return `compensations` = sqrt(det(Sigma2D - eps2d I) / det(Sigma2D)), the opacity factor
    of Mip-Splatting's 2D filter (Yu et al., CVPR 2024; gsplat's rasterize_mode="antialiased").

    means [B, N, 3], covariances [B, N, 3, 3] (world), opacities [B, N]; viewmats [B, V, 4, 4] OpenCV
    world-to-camera; intrinsics [B, V, 3, 3] pixels (renderers.cameras.intrinsics_matrix).
    """
    rotation, translation = viewmats[..., :3, :3], viewmats[..., :3, 3]  # [B, V, 3, 3], [B, V, 3]
    points = torch.einsum("bvij,bnj->bvni", rotation, means) + translation[:, :, None]  # [B, V, N, 3]
    cov_cam = torch.einsum("bvij,bnjk,bvlk->bvnil", rotation, covariances, rotation)  # [B, V, N, 3, 3]
    x, y, z = points.unbind(-1)
    fx, fy = intrinsics[..., 0, 0, None], intrinsics[..., 1, 1, None]  # [B, V, 1]
    cx, cy = intrinsics[..., 0, 2, None], intrinsics[..., 1, 2, None]
    safe_z = torch.where(z > 0, z, torch.ones_like(z))  # culled below; keeps the arithmetic finite
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    tx = safe_z * torch.minimum((width - cx) / fx + 0.3 * tan_x, torch.maximum(-(cx / fx + 0.3 * tan_x), x / safe_z))
    ty = safe_z * torch.minimum((height - cy) / fy + 0.3 * tan_y, torch.maximum(-(cy / fy + 0.3 * tan_y), y / safe_z))
    zeros = torch.zeros_like(safe_z)
    jacobian = torch.stack(
        [fx / safe_z, zeros, -fx * tx / safe_z**2, zeros, fy / safe_z, -fy * ty / safe_z**2], dim=-1
    ).unflatten(-1, (2, 3))  # [B, V, N, 2, 3]
    cov2d = jacobian @ cov_cam @ jacobian.transpose(-1, -2)
    a, b, c = cov2d[..., 0, 0] + eps2d, cov2d[..., 0, 1], cov2d[..., 1, 1] + eps2d
    det = a * c - b * b
    compensations = None
    if antialiased:
        det_unfiltered = cov2d[..., 0, 0] * cov2d[..., 1, 1] - b * b
        compensations = torch.sqrt((det_unfiltered / torch.where(det > 0, det, torch.ones_like(det))).clamp_min(1e-12))
    safe_det = torch.where(det > 0, det, torch.ones_like(det))
    conics = torch.stack([c / safe_det, -b / safe_det, a / safe_det], dim=-1)
    means2d = torch.stack([fx * x / safe_z + cx, fy * y / safe_z + cy], dim=-1)

    with torch.no_grad():
        opacity = opacities[:, None].expand_as(z)
        visible_opacity = opacity >= ALPHA_THRESHOLD
        extent = torch.sqrt(2.0 * torch.log(opacity.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD))
        extent = extent.clamp(max=MAX_EXTENT_SIGMAS)
        radius_x = torch.ceil(extent * a.clamp_min(0).sqrt())
        radius_y = torch.ceil(extent * c.clamp_min(0).sqrt())
        u, v = means2d.unbind(-1)
        on_screen = (u + radius_x > 0) & (u - radius_x < width) & (v + radius_y > 0) & (v - radius_y < height)
        keep = (z >= near) & (z <= far) & (det > 0) & visible_opacity & on_screen & (radius_x > 0) & (radius_y > 0)
        radii = torch.stack([radius_x, radius_y], dim=-1).nan_to_num(0.0).long() * keep[..., None]
    return ProjectedGaussians(means2d=means2d, depths=z, conics=conics, radii=radii, compensations=compensations)


def _tile_lists(
    means2d: Tensor, radii: Tensor, depths: Tensor, tiles_y: int, tiles_x: int, tile_size: int
) -> tuple[Tensor, Tensor]:
    """Which Gaussians overlap each tile, nearest first (no gradient).

    means2d [I, N, 2], radii [I, N, 2], depths [I, N] -> (gaussian [M] flat indices into I * N, sorted by
    tile (flat index into I * tiles_y * tiles_x) then depth; counts [I * tiles_y * tiles_x] per tile).
    """
    images, count = depths.shape
    image_id, gaussian_id = torch.nonzero((radii > 0).all(dim=-1), as_tuple=True)
    centre = means2d[image_id, gaussian_id] / tile_size  # [G, 2]
    reach = radii[image_id, gaussian_id].to(centre.dtype) / tile_size
    low = torch.floor(centre - reach).clamp_min(0).long()
    high = torch.ceil(centre + reach).long()
    high = torch.minimum(high, torch.tensor([tiles_x, tiles_y], device=high.device))
    low = torch.minimum(low, high)
    span = high - low  # [G, 2] tiles along x and y
    per_gaussian = span[:, 0] * span[:, 1]
    owner = torch.repeat_interleave(torch.arange(len(per_gaussian), device=depths.device), per_gaussian)
    first = torch.cumsum(per_gaussian, 0) - per_gaussian
    local = torch.arange(len(owner), device=depths.device) - first[owner]
    tile_x = low[owner, 0] + local % span[owner, 0]
    tile_y = low[owner, 1] + local // span[owner, 0]
    tile = (image_id[owner] * tiles_y + tile_y) * tiles_x + tile_x
    flat = image_id[owner] * count + gaussian_id[owner]
    # lexicographic (tile, depth, input order): stable sort by depth, then stable sort by tile
    by_depth = torch.sort(depths.reshape(-1)[flat], stable=True).indices
    tile, flat = tile[by_depth], flat[by_depth]
    by_tile = torch.sort(tile, stable=True).indices
    tile, flat = tile[by_tile], flat[by_tile]
    counts = torch.bincount(tile, minlength=images * tiles_y * tiles_x)
    return flat, counts


def _pixel_monomials(tile_size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[P, 6] rows (x^2, y^2, x y, x, y, 1) of the pixel centres of a tile relative to its centre, P = tile_size^2
    in row-major order."""
    offsets = torch.arange(tile_size, device=device, dtype=dtype) + 0.5 - tile_size / 2
    y, x = torch.meshgrid(offsets, offsets, indexing="ij")
    x, y = x.reshape(-1), y.reshape(-1)
    return torch.stack([x * x, y * y, x * y, x, y, torch.ones_like(x)], dim=-1)


def _log_alpha_coefficients(centres: Tensor, conics: Tensor, opacities: Tensor) -> Tensor:
    """Coefficients `[..., 6]` of log(opacity) - d^T Q d / 2 as a polynomial in the monomials of
    `_pixel_monomials`, d = pixel - centre, Q = [[a, b], [b, c]] (conics [..., 3]); centres [..., 2] relative
    to the tile centre (so that the monomials stay small and float32 keeps its precision)."""
    mx, my = centres.unbind(-1)
    a, b, c = conics.unbind(-1)
    log_opacity = torch.log(opacities.clamp_min(torch.finfo(opacities.dtype).tiny))
    constant = log_opacity - (0.5 * a * mx * mx + 0.5 * c * my * my + b * mx * my)
    return torch.stack([-0.5 * a, -0.5 * c, -b, a * mx + b * my, c * my + b * mx, constant], dim=-1)


def _composite_tiles(monomials: Tensor, coefficients: Tensor, features: Tensor, max_alpha: float) -> tuple[Tensor, Tensor]:
    """Front-to-back compositing of T tiles of P pixels over K depth-sorted Gaussians each.

    monomials [P, 6] (`_pixel_monomials`); coefficients [T, K, 6] (`_log_alpha_coefficients`; a zero
    opacity pads the lists); features [T, K, D] -> (features [T, P, D], alpha [T, P, 1]).
    """
    # log alpha for every (tile, pixel, Gaussian) in one matrix product: the costly part
    log_alpha = torch.matmul(monomials, coefficients.transpose(-1, -2))  # [T, P, K]
    # clamped from below too: exp of very negative values is slow (denormals), and they are dropped anyway
    alpha = torch.exp(log_alpha.clamp(min=LOG_ALPHA_THRESHOLD - 1.0, max=math.log(max_alpha)))
    alpha = torch.where(log_alpha < LOG_ALPHA_THRESHOLD, 0.0, alpha)
    transmittance = torch.cumprod(1.0 - alpha, dim=-1)
    if bool((transmittance[..., -1] < MIN_TRANSMITTANCE).any()):
        # a pixel stops before the Gaussian that would take its transmittance below 1e-4; since the
        # transmittance only falls, the Gaussians it still takes are a prefix of the sorted list
        alpha = torch.where(transmittance.detach() < MIN_TRANSMITTANCE, 0.0, alpha)
        transmittance = torch.cumprod(1.0 - alpha, dim=-1)
    # weight_k = alpha_k T_{k-1} = T_{k-1} - T_k, with T_{-1} = 1
    weights = -torch.diff(transmittance, dim=-1, prepend=torch.ones_like(transmittance[..., :1]))  # [T, P, K]
    return torch.matmul(weights, features), 1.0 - transmittance[..., -1:]


def rasterize_gaussians(
    projected: ProjectedGaussians,
    opacities: Tensor,
    features: Tensor,
    height: int,
    width: int,
    max_alpha: float = 0.99,
    tile_size: int = TILE_SIZE,
    chunk_elements: int = 2**22,
) -> tuple[Tensor, Tensor]:
    """Composite per-view features of the projected Gaussians (see the module docstring).

    projected: `[B, V, N, ...]`; opacities [B, N] or per view [B, V, N]; features [B, V, N, D] (e.g. rgb, normal, depth).
    Returns (features [B, V, H, W, D] = sum weight * feature, 0 where nothing is drawn; alpha [B, V, H, W, 1]).
    """
    batch, views, count = projected.depths.shape
    images, dims = batch * views, features.shape[-1]
    tiles_y, tiles_x = -(-height // tile_size), -(-width // tile_size)
    means2d = projected.means2d.reshape(images * count, 2)
    conics = projected.conics.reshape(images * count, 3)
    opacity = (opacities if opacities.dim() == 3 else opacities[:, None]).expand(batch, views, count).reshape(images * count)
    flat_features = features.reshape(images * count, dims)
    # one zero-opacity Gaussian at the end pads the per-tile lists
    means2d = torch.cat([means2d, means2d.new_zeros(1, 2)])
    conics = torch.cat([conics, conics.new_zeros(1, 3)])
    opacity = torch.cat([opacity, opacity.new_zeros(1)])
    flat_features = torch.cat([flat_features, flat_features.new_zeros(1, dims)])
    pad = images * count

    with torch.no_grad():
        gaussian, counts = _tile_lists(
            projected.means2d.detach().reshape(images, count, 2),
            projected.radii.reshape(images, count, 2),
            projected.depths.detach().reshape(images, count),
            tiles_y,
            tiles_x,
            tile_size,
        )
        starts = torch.cumsum(counts, 0) - counts
        order = torch.argsort(counts, descending=True, stable=True)
        occupied = int((counts > 0).sum())
        counts_host = counts[order[:occupied]].tolist()
    monomials = _pixel_monomials(tile_size, means2d.dtype, means2d.device)

    pixels_per_tile = tile_size * tile_size
    chunks_out, chunks_alpha, chunk_tiles = [], [], []
    start = 0
    while start < occupied:
        longest = counts_host[start]
        size = max(1, chunk_elements // (pixels_per_tile * longest))
        tiles = order[start : start + size]
        start += len(tiles)
        with torch.no_grad():
            slot = torch.arange(longest, device=counts.device)
            valid = slot[None] < counts[tiles][:, None]  # [T, K]
            index = torch.where(valid, gaussian[(starts[tiles][:, None] + slot[None]).clamp(max=len(gaussian) - 1)], pad)
            local_tile = tiles % (tiles_y * tiles_x)
            centre = (torch.stack([local_tile % tiles_x, local_tile // tiles_x], dim=-1) + 0.5) * tile_size  # [T, 2]
        coefficients = _log_alpha_coefficients(means2d[index] - centre[:, None].to(means2d.dtype), conics[index], opacity[index])
        out, alpha = _composite_tiles(monomials, coefficients, flat_features[index], max_alpha)
        chunks_out.append(out)
        chunks_alpha.append(alpha)
        chunk_tiles.append(tiles)

    all_tiles = images * tiles_y * tiles_x
    result = flat_features.new_zeros(all_tiles, pixels_per_tile, dims + 1)
    if chunks_out:
        values = torch.cat([torch.cat(chunks_out), torch.cat(chunks_alpha)], dim=-1)
        result = result.index_copy(0, torch.cat(chunk_tiles), values)
    result = result.reshape(images, tiles_y, tiles_x, tile_size, tile_size, dims + 1)
    result = result.permute(0, 1, 3, 2, 4, 5).reshape(images, tiles_y * tile_size, tiles_x * tile_size, dims + 1)
    result = result[:, :height, :width].reshape(batch, views, height, width, dims + 1)
    return result[..., :dims], result[..., dims:]
