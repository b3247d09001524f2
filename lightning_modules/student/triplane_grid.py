"""Coarse-to-fine SDF of a triplane field on the marching-cubes grid: exact where the surface can be, the
sign proven everywhere else.

On the R^3 grid the geometry feature of grid vertex (i, j, k) is A[i, j] + B[i, k] + C[k, j] (mode "v1"; the
xy, xz and yz planes sampled at the grid's coordinates, 3 R^2 lookups instead of 3 R^3), or their
concatenation (mode "v2"). The first layer of the SDF MLP is linear, so its pre-activation is
W A + W B + W C. Over a block of b^3 grid vertices, the minima and maxima of these three tables over the
block's index ranges bound every neuron's pre-activation; interval arithmetic (centre / radius, |W| for the
radius) carries the bound through the ReLU layers, and the exact range of the prior (|p| - 0.5 for the
sphere) over the block's vertices is added. A block whose interval lies on one side of zero has that sign at
all its vertices and is not evaluated; the others, a shell around the surface, are evaluated vertex by vertex
with `TriplaneField.sdf`'s arithmetic (feature sum, then the MLP). Marching cubes needs exact values only at
the ends of crossed edges and the sign everywhere else, so the mesh is the dense grid's mesh.

Bounds are widened by a margin (1e-4 of the magnitude of each layer's terms) that covers the float32 rounding of
the exact evaluation and of the bounds themselves, so they hold for the values the dense float32 evaluation
computes, not only for the real-number ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from renderers.marching_cubes import grid_chunk_points
from renderers.types import GridSDF

BLOCK_SIZES = (16, 8, 4, 2)  # block sides, coarse to fine: undecided blocks are split into the next size
BOUND_COST = 6  # one block's bound costs about 6 exact vertex evaluations (measured at block sides 2 - 8 on 2 CPU cores)
REFINE_SAMPLE = 64  # undecided blocks whose children are bounded to decide whether refining pays
DENSE_SHARE = 0.6  # above this share of exact vertices, every vertex is evaluated slice by slice (no gathers)
ROW_BLOCK = 16  # rows per matrix-product call are padded to a multiple of this (see `_sdf_network`)
ROUNDING_MARGIN = 1e-4  # relative to the magnitude of each layer's terms; float32 dot products of 64 terms err < 1e-5


def linear_layers(mlp: nn.Module) -> list[Tensor] | None:
    """The weights `[out, in]` of a bias-free Linear -> ReLU -> ... -> Linear stack (`VanillaMLP`), or None
    when the network is anything else (then the grid is evaluated densely)."""
    layers = getattr(mlp, "layers", None)
    if not isinstance(layers, nn.Sequential) or len(layers) % 2 == 0:
        return None
    weights = []
    for index, layer in enumerate(layers):
        expected = nn.Linear if index % 2 == 0 else nn.ReLU
        if type(layer) is not expected or (expected is nn.Linear and layer.bias is not None):
            return None
        if expected is nn.Linear:
            weights.append(layer.weight)
    return weights


class TriplaneGridSDF:
    """The SDF of one object of a `TriplaneField` on the R^3 grid of `renderers.marching_cubes.grid_points`.

    Args:
        field: a `TriplaneField` (B objects) whose SDF MLP `linear_layers` can read; `index` picks the object.
        resolution: R, grid vertices per axis over [-1, 1].
        block_sizes: block sides, coarse to fine, each dividing the one before.
    """

    def __init__(self, field, index: int, resolution: int, block_sizes: tuple[int, ...] = BLOCK_SIZES):
        if any(a % b for a, b in zip(block_sizes, block_sizes[1:], strict=False)):
            raise ValueError(f"each block size must divide the one before, got {block_sizes}")
        self.field, self.resolution, self.block_sizes = field, resolution, tuple(block_sizes)
        self.mode = field.config.geo_interpolate
        self.weights = linear_layers(field.sdf_network)
        self.axis = torch.linspace(-1.0, 1.0, resolution, device=field.device, dtype=field.planes.dtype)
        coords = self.axis / field.config.radius
        # xy -> (column x, row y), xz -> (x, z), yz -> (z, y), as `plane_coordinates`
        first, second = torch.meshgrid(coords, coords, indexing="ij")  # [R, R]: the first index slow
        grid = torch.stack([first, second], dim=-1)  # [R, R, 2] (column, row)
        sampled = F.grid_sample(field.planes[index, :3], grid[None].expand(3, -1, -1, -1), mode="bilinear",
                                padding_mode="zeros", align_corners=False)  # fmt: skip
        # [3, C, R, R] -> 3 tables [R * R, C]: xy row i R + j, xz row i R + k, yz row k R + j
        self.tables = sampled.flatten(2).transpose(1, 2).contiguous().unbind(0)
        self._pyramids: dict[int, tuple] | None = None

    # ------------------------------------------------------------------ exact values
    def features(self, i: Tensor, j: Tensor, k: Tensor) -> Tensor:
        """Geometry features `[n, C]` ("v1") or `[n, 3C]` ("v2") at grid vertices (i, j, k), each `[n]`."""
        r = self.resolution
        xy, xz, yz = self.tables
        a, b, c = xy.index_select(0, i * r + j), xz.index_select(0, i * r + k), yz.index_select(0, k * r + j)
        return a + b + c if self.mode == "v1" else torch.cat([a, b, c], dim=1)

    def sdf_at(self, flat: Tensor, chunk_size: int | None = None) -> Tensor:
        """Exact SDF `[n]` at flat grid indices `flat [n]` (x slowest, z fastest): `TriplaneField.sdf`'s
        arithmetic (feature sum, MLP, prior), `chunk_size` vertices per call (default: `grid_chunk_points`)."""
        r = self.resolution
        chunk_size = chunk_size or grid_chunk_points(flat.device)
        out = [flat.new_zeros(0, dtype=self.axis.dtype)]
        for start in range(0, flat.numel(), chunk_size):
            part = flat[start : start + chunk_size]
            i, j, k = part // (r * r), (part // r) % r, part % r
            points = torch.stack([self.axis[i], self.axis[j], self.axis[k]], dim=-1)
            raw = self._sdf_network(self.features(i, j, k)).squeeze(-1)
            out.append(raw + self.field.sdf_bias(points))
        return torch.cat(out)

    def sdf_dense(self, slices: int = 1) -> Tensor:
        """Exact SDF `[R^3]` at every grid vertex (x slowest, z fastest), `slices` x-slices at a time: each
        slice's features are the broadcast sum of its table rows (A[i, j] + B[i, k] + C[k, j], or their
        concatenation), so no vertex index is computed or gathered; the same arithmetic as `sdf_at`, bit for bit."""
        r, (xy, xz, yz) = self.resolution, self.tables
        channels = xy.shape[1]
        yz_grid = yz.reshape(r, r, channels).transpose(0, 1)  # [j, k, C]: row k r + j
        out = []
        for first in range(0, r, slices):
            i = torch.arange(first, min(first + slices, r), device=self.axis.device)
            a = xy.reshape(r, r, channels)[i][:, :, None].expand(-1, r, r, channels)  # [s, j, k, C]
            b = xz.reshape(r, r, channels)[i][:, None].expand(-1, r, r, channels)
            c = yz_grid[None].expand(len(i), r, r, channels)
            features = a + b + c if self.mode == "v1" else torch.cat([a, b, c], dim=-1)
            x, y, z = torch.meshgrid(self.axis[i], self.axis, self.axis, indexing="ij")
            points = torch.stack([x, y, z], dim=-1).reshape(-1, 3)
            raw = self._sdf_network(features.reshape(-1, features.shape[-1])).squeeze(-1)
            out.append(raw + self.field.sdf_bias(points))
        return torch.cat(out)

    def _sdf_network(self, x: Tensor) -> Tensor:
        """`field.sdf_network(x)` (`[n, in]` -> `[n, 1]`, the same values bit for bit) with the ReLUs in place:
        no gradient is needed here, and on the CPU the separate ReLU passes over the 64-wide activations of
        millions of grid vertices cost about a third of the matrix products. The rows are padded to a multiple of
        `ROW_BLOCK`: the CPU's matrix product rounds the last rows of a call of another size differently (1 ulp),
        so a vertex gets the value the dense grid's full-size calls give it, whatever the call it falls in."""
        rows = x.shape[0]
        if rows % ROW_BLOCK:
            x = torch.cat([x, x.new_zeros(ROW_BLOCK - rows % ROW_BLOCK, x.shape[1])])
        last = len(self.weights) - 1
        for index, weight in enumerate(self.weights):
            x = F.linear(x, weight)
            if index < last:
                x.relu_()
        return x[:rows]

    # ------------------------------------------------------------------ bounds
    def _block_pyramids(self) -> dict[int, tuple]:
        """For every block size b: per plane, the block minima and maxima of the first layer's terms
        (`[nb * nb, H]` each) and the block maxima of the features' magnitudes (`[nb * nb, C]`)."""
        if self._pyramids is not None:
            return self._pyramids
        r, largest = self.resolution, self.block_sizes[0]
        c = self.tables[0].shape[1]
        w = self.weights[0]
        w_planes = (w, w, w) if self.mode == "v1" else (w[:, :c], w[:, c : 2 * c], w[:, 2 * c :])
        padded = -(-r // largest) * largest
        pyramids: dict[int, list] = {size: [] for size in self.block_sizes}
        for table, w_plane in zip(self.tables, w_planes, strict=True):
            terms = table @ w_plane.T  # [R * R, H]: this plane's share of the first pre-activation
            stacked = torch.cat([terms, terms, table.abs()], dim=1).reshape(1, r, r, -1).permute(0, 3, 1, 2)
            # a partial last block repeats a vertex it has: min and max unchanged
            stacked = F.pad(stacked, (0, padded - r, 0, padded - r), mode="replicate")[0]  # [2H + C, P, P]
            h = terms.shape[1]
            lo, hi, mag = stacked[:h], stacked[h : 2 * h], stacked[2 * h :]
            previous = 1
            for size in reversed(self.block_sizes):  # fine to coarse, each from the one before
                f = size // previous
                lo = -F.max_pool2d(-lo[None], f)[0]
                hi, mag = F.max_pool2d(hi[None], f)[0], F.max_pool2d(mag[None], f)[0]
                pyramids[size].append(tuple(x.flatten(1).T.contiguous() for x in (lo, hi, mag)))
                previous = size
        self._pyramids = pyramids
        return pyramids

    def _prior_range(self, blocks: Tensor, block: int) -> tuple[Tensor, Tensor]:
        """Exact min and max `[n]` of the SDF prior over the vertices of blocks `[n, 3]` of side b."""
        r = self.resolution
        nb = -(-r // block)
        padded = F.pad(self.axis[None, None], (0, nb * block - r), mode="replicate")[0, 0].reshape(nb, block)
        config = self.field.config
        if config.sdf_bias not in ("sphere", "ellipsoid"):
            value = torch.full((len(blocks),), float(config.sdf_bias), dtype=self.axis.dtype, device=self.axis.device)
            return value, value
        if config.sdf_bias == "sphere":
            size, offset = [1.0] * 3, float(config.sdf_bias_params)
        else:
            size, offset = [float(x) for x in config.sdf_bias_params], 1.0
        lo_sq = hi_sq = 0
        for d in range(3):
            scaled = padded / size[d]  # [nb, b]
            crosses = (scaled.amin(dim=1) <= 0) & (scaled.amax(dim=1) >= 0)
            lo_sq = lo_sq + torch.where(crosses, 0.0, scaled.square().amin(dim=1))[blocks[:, d]]
            hi_sq = hi_sq + scaled.square().amax(dim=1)[blocks[:, d]]
        return lo_sq.sqrt() - offset, hi_sq.sqrt() - offset

    def block_bounds(self, blocks: Tensor, block: int) -> tuple[Tensor, Tensor]:
        """Lower and upper bounds `[n]` of the SDF over blocks of b^3 grid vertices, given by their indices
        `blocks [n, 3]` (block (u, v, w) holds the vertices i in [u b, u b + b), j in [v b, ...), k in [w b, ...)),
        valid for the values `sdf_at` computes (its rounding included)."""
        nb = -(-self.resolution // self.block_sizes[0]) * self.block_sizes[0] // block
        u, v, w = blocks.unbind(-1)
        rows = (u * nb + v, u * nb + w, w * nb + v)  # the block's rows in the xy, xz and yz pyramids
        parts = [tuple(x.index_select(0, row) for x in level) for level, row in zip(self._block_pyramids()[block], rows, strict=True)]
        lo = sum(p[0] for p in parts)  # [n, H]
        hi = sum(p[1] for p in parts)
        feature_abs = sum(p[2] for p in parts) if self.mode == "v1" else torch.cat([p[2] for p in parts], dim=1)
        # `sdf_at` sums the three features, then takes the dot product: its rounding is relative to
        # sum_c |W_hc| (|A_c| + |B_c| + |C_c|), not to the (possibly cancelling) result
        margin = ROUNDING_MARGIN * (feature_abs @ self.weights[0].abs().T)
        lo, hi = lo - margin, hi + margin
        for weight in self.weights[1:]:
            lo, hi = lo.clamp_min(0), hi.clamp_min(0)  # ReLU
            centre, radius = ((lo + hi) / 2) @ weight.T, ((hi - lo) / 2) @ weight.abs().T
            margin = ROUNDING_MARGIN * (hi @ weight.abs().T)  # hi >= |lo| >= 0 after the ReLU
            lo, hi = centre - radius - margin, centre + radius + margin
        prior_lo, prior_hi = self._prior_range(blocks, block)
        prior_margin = ROUNDING_MARGIN * (prior_lo.abs() + prior_hi.abs() + 1.0)
        return lo[:, 0] + prior_lo - prior_margin, hi[:, 0] + prior_hi + prior_margin

    def _refinement_pays(self, parents: Tensor, size: int, child: int) -> bool:
        """Whether bounding the children (side `child`) of the undecided blocks `parents [n, 3]` (side `size`) is
        expected to save more vertex evaluations than the bounds cost: the share of children decided is measured
        on up to `REFINE_SAMPLE` parents spread over the list (a noisy field, whose surface is everywhere,
        decides none at any size; a shape's shell decides more the finer the blocks)."""
        if len(parents) == 0:
            return False
        sample = _children(parents[:: max(1, len(parents) // REFINE_SAMPLE)], size, child, self.resolution)
        lo, hi = self.block_bounds(sample, child)
        decided = float(((lo >= 0) | (hi < 0)).float().mean())
        return size**3 * decided > (size // child) ** 3 * BOUND_COST

    # ------------------------------------------------------------------ the grid
    def evaluate(self) -> GridSDF:
        """Values `[1, R^3]` (exact in the blocks that may hold the surface; elsewhere a bound of the block,
        which has the right sign) and the mask `[1, R^3]` of exact ones.

        Blocks are refined coarse to fine: every block of the first size is bounded, only those whose bound
        contains zero are split into the blocks of the next size, and so on while the bounds of a sample of their
        children save more vertex evaluations than they cost (`_refinement_pays`, `BOUND_COST`);
        the vertices of the blocks still undecided at the end are evaluated (with loose bounds: all of them, from
        the plane tables, which is still cheaper than sampling the planes at every vertex).
        """
        r, device = self.resolution, self.axis.device
        first = self.block_sizes[0]
        nb = -(-r // first)
        blocks = _cube_indices(nb, device)
        lo, hi = self.block_bounds(blocks, first)
        # every vertex first takes its block's bound nearest zero (the sign is what marching cubes reads outside
        # the undecided blocks); children of undecided blocks overwrite theirs at the finer sizes
        nearest = torch.where(hi < 0, hi, lo).reshape(nb, 1, nb, 1, nb, 1)
        values = nearest.expand(-1, first, -1, first, -1, first).reshape((nb * first,) * 3)[:r, :r, :r].contiguous()
        undecided = (lo < 0) & (hi >= 0)  # inside is sdf < 0, the marching cubes' sign convention
        for size in self.block_sizes[1:]:
            if not self._refinement_pays(blocks[undecided], first, size):
                break
            blocks = _children(blocks[undecided], first, size, r)
            lo, hi = self.block_bounds(blocks, size)
            undecided = (lo < 0) & (hi >= 0)
            # the undecided children keep their parent's bound until a finer size or the evaluation replaces it
            _fill_blocks(values, blocks[~undecided], size, torch.where(hi < 0, hi, lo)[~undecided])
            first = size
        if int(undecided.sum()) * first**3 >= DENSE_SHARE * r**3:  # the surface is nearly everywhere
            values = self.sdf_dense(slices=max(1, grid_chunk_points(device) // r**2))
            return GridSDF(values=values[None], exact=torch.ones_like(values, dtype=torch.bool)[None])
        flat = _block_vertices(blocks[undecided], first, r)
        values = values.reshape(-1)
        values[flat] = self.sdf_at(flat)
        exact = torch.zeros(r**3, dtype=torch.bool, device=device)
        exact[flat] = True
        return GridSDF(values=values[None], exact=exact[None])


def _cube_indices(n: int, device) -> Tensor:
    """All (u, v, w) in [0, n)^3, `[n^3, 3]`, w fastest."""
    axis = torch.arange(n, device=device)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)


def _children(blocks: Tensor, size: int, child: int, resolution: int) -> Tensor:
    """The blocks of side `child` inside blocks `[n, 3]` of side `size`, `[m, 3]` parent by parent, without those
    that start outside the grid."""
    factor = size // child
    children = (blocks[:, None] * factor + _cube_indices(factor, blocks.device)).reshape(-1, 3)
    return children[(children * child < resolution).all(dim=1)]


def _block_vertices(blocks: Tensor, size: int, resolution: int) -> Tensor:
    """Flat grid indices of the vertices of blocks `[n, 3]` of side `size`: `[m]`, block by block."""
    vertices = (blocks[:, None] * size + _cube_indices(size, blocks.device)).reshape(-1, 3)
    if resolution % size:
        vertices = vertices[(vertices < resolution).all(dim=1)]
    return (vertices[:, 0] * resolution + vertices[:, 1]) * resolution + vertices[:, 2]


def _fill_blocks(grid: Tensor, blocks: Tensor, size: int, block_values: Tensor) -> None:
    """Write `block_values [n]` to every vertex of the blocks `[n, 3]` of side `size` in `grid [R, R, R]`."""
    r = grid.shape[0]
    per_vertex = block_values[:, None].expand(-1, size**3).reshape(-1)
    vertices = (blocks[:, None] * size + _cube_indices(size, grid.device)).reshape(-1, 3)
    if r % size:
        keep = (vertices < r).all(dim=1)
        vertices, per_vertex = vertices[keep], per_vertex[keep]
    grid.view(-1)[(vertices[:, 0] * r + vertices[:, 1]) * r + vertices[:, 2]] = per_vertex


def supports_grid_bounds(field) -> bool:
    """Whether `TriplaneGridSDF` can bound this field's SDF: a bias-free ReLU MLP on summed or concatenated
    plane features, and a float32 / float64 field (half-precision rounding is not covered by the margin)."""
    return (
        linear_layers(field.sdf_network) is not None
        and field.planes.dtype in (torch.float32, torch.float64)
        and field.config.geo_interpolate in ("v1", "v2")
    )
