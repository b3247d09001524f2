"""The triplane field of TriplaneTurbo: decoder output -> SDF, deformation and colour at 3D points.

The VAE decoder gives `triplane_raw` `[B, 6, output_dim, H, W]` (planes xy_geo, xz_geo, yz_geo, xy_tex,
xz_tex, yz_tex). From there:

1. channel split ("v1"): geometry planes keep the first output_dim / 2 channels, texture planes the last
   -> `space_cache` `[B, 6, C, H, W]`;
2. rotation to the image conventions of SD ("v1": xy transposed, xz rotated 180 deg, yz rotated 90 deg
   clockwise) -> `planes` `[B, 6, C, H, W]`;
3. bilinear lookup at points in [-radius, radius]^3 (align_corners=False, zero padding), with plane
   coordinates xy -> (x, y), xz -> (x, z), yz -> (z, y) as (column, row);
4. geometry feature = sum of the 3 geometry-plane features ("v1"), texture feature = their concatenation
   [xy | xz | yz] ("v2");
5. bias-free ReLU MLPs: SDF (+ sphere prior |p| - 0.5), deformation (3 raw values), colour
   (sigmoid(x) * 1.002 - 0.001).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from renderers.types import GridSDF

GEOMETRY_PLANES = slice(0, 3)
TEXTURE_PLANES = slice(3, 6)


class VanillaMLP(nn.Module):
    """Linear -> ReLU -> [Linear -> ReLU] x (n_hidden_layers - 1) -> Linear, all without bias.

    Parameter names (`layers.0.weight`, `layers.2.weight`, ...) are those of the reference checkpoint.
    """

    def __init__(self, dim_in: int, dim_out: int, n_neurons: int = 64, n_hidden_layers: int = 2):
        super().__init__()
        if n_hidden_layers < 1:
            raise ValueError(f"an MLP needs at least one hidden layer, got n_hidden_layers={n_hidden_layers}")
        layers: list[nn.Module] = [nn.Linear(dim_in, n_neurons, bias=False), nn.ReLU()]
        for _ in range(n_hidden_layers - 1):
            layers += [nn.Linear(n_neurons, n_neurons, bias=False), nn.ReLU()]
        layers.append(nn.Linear(n_neurons, dim_out, bias=False))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


@dataclass(frozen=True)
class FieldConfig:
    """How a triplane is read (field names and values of the reference pipeline config)."""

    radius: float = 1.0
    sdf_bias: str | float = "sphere"
    sdf_bias_params: float | Sequence[float] | None = 0.5
    rotate_planes: str = "v1"
    split_channels: str | None = "v1"
    geo_interpolate: str = "v1"
    tex_interpolate: str = "v2"

    def __post_init__(self):
        if self.rotate_planes not in ("v1", "v2"):
            raise ValueError(f"rotate_planes must be 'v1' or 'v2', got {self.rotate_planes!r}")
        if self.split_channels not in (None, "v1"):
            raise ValueError(f"split_channels must be 'v1' or null, got {self.split_channels!r}")
        for name in ("geo_interpolate", "tex_interpolate"):
            if getattr(self, name) not in ("v1", "v2"):
                raise ValueError(
                    f"{name} must be 'v1' (sum) or 'v2' (concatenation), got {getattr(self, name)!r}"
                )
        if isinstance(self.sdf_bias, str) and self.sdf_bias not in ("sphere", "ellipsoid"):
            raise ValueError(f"sdf_bias must be 'sphere', 'ellipsoid' or a number, got {self.sdf_bias!r}")

    def plane_channels(self, output_dim: int) -> int:
        """Channels per plane after the split."""
        return output_dim // 2 if self.split_channels == "v1" else output_dim

    def feature_dims(self, output_dim: int) -> tuple[int, int]:
        """Input widths (geometry MLPs, colour MLP)."""
        c = self.plane_channels(output_dim)
        return (3 * c if self.geo_interpolate == "v2" else c), (3 * c if self.tex_interpolate == "v2" else c)


def split_channels(triplane_raw: Tensor, mode: str | None = "v1") -> Tensor:
    """`[B, 6, D, H, W]` -> `[B, 6, D/2, H, W]`: geometry planes keep channels [0, D/2), texture [D/2, D)."""
    if mode is None:
        return triplane_raw
    half = triplane_raw.shape[2] // 2
    return torch.cat([triplane_raw[:, GEOMETRY_PLANES, :half], triplane_raw[:, TEXTURE_PLANES, half:]], dim=1)


def rotate_planes(space_cache: Tensor, mode: str = "v1") -> Tensor:
    """Re-orient the planes `[B, 6, C, N, N]` ([row, col] = last two axes) before sampling.

    v1: xy R[h, w] = S[w, h] (transpose); xz R[h, w] = S[N-1-h, N-1-w] (180 deg);
        yz R[h, w] = S[N-1-w, h] (90 deg clockwise).  v2: as v1 but xy flipped along columns.
    Plane p and plane p + 3 (geometry / texture) get the same rotation.
    """
    xy, xz, yz = space_cache[:, 0::3], space_cache[:, 1::3], space_cache[:, 2::3]
    xy = xy.transpose(-1, -2) if mode == "v1" else xy.flip(-1)
    xz = xz.flip(-2, -1)
    yz = torch.rot90(yz, k=-1, dims=(-2, -1))
    # back to the plane order xy_geo, xz_geo, yz_geo, xy_tex, xz_tex, yz_tex
    return torch.stack([xy, xz, yz], dim=2).flatten(1, 2)


_PLANE_AXES = torch.tensor([0, 1, 0, 2, 2, 1])  # (column, row) axes of the planes xy, xz, yz


def plane_coordinates(points: Tensor) -> Tensor:
    """Points `[B, N, 3]` in [-1, 1]^3 -> grid_sample coordinates (column, row) `[B, 3, N, 2]`.

    xy -> (x, y), xz -> (x, z), yz -> (z, y).
    """
    b, n, _ = points.shape
    pairs = points[..., _PLANE_AXES.to(points.device)]  # [B, N, 6]: one gather instead of four stacks
    return pairs.reshape(b, n, 3, 2).transpose(1, 2)


def bilinear_sample(images: Tensor, grid: Tensor) -> Tensor:
    """`F.grid_sample(images, grid[:, None], "bilinear", "zeros", align_corners=False)` written with
    gathers, so it is differentiable twice (w.r.t. the grid as well).

    PyTorch's CUDA grid sampler has no double backward ("derivative for aten::grid_sampler_2d_backward
    is not implemented"), which eikonal losses and normal-dependent renders need: d/dp of the SDF
    gradient. images `[N, C, H, W]`, grid `[N, P, 2]` (x = column, y = row, in [-1, 1]) -> `[N, C, P]`.
    """
    n, c, h, w = images.shape
    x = ((grid[..., 0] + 1) * w - 1) / 2  # [N, P] pixel coordinates, centres at integers
    y = ((grid[..., 1] + 1) * h - 1) / 2
    x0, y0 = x.detach().floor(), y.detach().floor()
    flat = images.reshape(n, c, h * w)
    out = 0
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        xi, yi = x0 + dx, y0 + dy
        weight = (1 - (x - xi).abs()) * (1 - (y - yi).abs())  # bilinear tent, exact for |x - xi| <= 1
        inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
        index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long()  # [N, P]
        values = flat.gather(2, index[:, None, :].expand(n, c, index.shape[1]))  # [N, C, P]
        out = out + values * (weight * inside)[:, None, :]
    return out


def sample_planes(planes: Tensor, points: Tensor, mode: str, twice_differentiable: bool = True) -> Tensor:
    """Bilinear features of 3 planes `[B, 3, C, H, W]` at points `[B, N, 3]` in [-1, 1]^3.

    Pixel centres sit at (2i + 1) / N - 1 (align_corners=False); outside neighbours count as zero.
    Returns `[B, N, C]` (mode "v1": sum over planes) or `[B, N, 3C]` ("v2": [xy | xz | yz]).
    When the points require grad (normals, eikonal terms), the twice-differentiable `bilinear_sample`
    is used, unless `twice_differentiable=False` says that a first derivative will do (baking normal maps);
    otherwise PyTorch's faster `grid_sample`, whose own backward gives the first derivative w.r.t. the points
    (3-4x faster than autograd through the gathers). Both compute the same values and first derivatives (but
    on a texel edge, where the gathers' |x - xi| has a zero derivative and grid_sample's is one-sided).
    """
    b, n_planes, c, h, w = planes.shape
    n = points.shape[1]
    grid = plane_coordinates(points).reshape(b * n_planes, n, 2)
    images = planes.reshape(b * n_planes, c, h, w)
    if twice_differentiable and torch.is_grad_enabled() and points.requires_grad:
        feats = bilinear_sample(images, grid)  # [B*3, C, N]
    else:
        feats = F.grid_sample(images, grid[:, None], mode="bilinear", padding_mode="zeros", align_corners=False)
    feats = feats.reshape(b, n_planes, c, n)
    if mode == "v1":  # summed over the planes while each plane's channels are contiguous
        return feats.sum(dim=1).transpose(1, 2)  # [B, N, C]
    return feats.permute(0, 3, 1, 2).reshape(b, n, n_planes * c)


def color_activation(features: Tensor) -> Tensor:
    """The reference's "sigmoid-mipnerf": sigmoid(x) * 1.002 - 0.001."""
    return torch.sigmoid(features) * (1 + 2 * 0.001) - 0.001


class TriplaneField:
    """A batch of B objects, each a geometry and a texture triplane read by shared MLPs.

    Satisfies `renderers.types.Field`. Every method takes points `[B, N, 3]` (or `[N, 3]`, the same points
    for every object) in [-radius, radius]^3 and is differentiable w.r.t. the planes, the MLPs and the points.

    Attributes:
        planes:       `[B, 6, C, H, W]` rotated planes (0-2 geometry, 3-5 texture), what is sampled
        space_cache:  `[B, 6, C, H, W]` after the channel split, before rotation (or None)
        triplane_raw: `[B, 6, output_dim, H, W]` decoder output (or None)
    """

    def __init__(
        self,
        planes: Tensor,
        sdf_network: nn.Module,
        feature_network: nn.Module,
        deformation_network: nn.Module | None = None,
        config: FieldConfig | None = None,
        space_cache: Tensor | None = None,
        triplane_raw: Tensor | None = None,
    ):
        if planes.ndim != 5 or planes.shape[1] != 6:
            raise ValueError(f"planes must be [B, 6, C, H, W], got {tuple(planes.shape)}")
        self.planes = planes
        self.sdf_network = sdf_network
        self.feature_network = feature_network
        self.deformation_network = deformation_network
        self.config = config or FieldConfig()
        self.space_cache = space_cache
        self.triplane_raw = triplane_raw

    @classmethod
    def from_decoder_output(
        cls,
        triplane_raw: Tensor,
        sdf_network: nn.Module,
        feature_network: nn.Module,
        deformation_network: nn.Module | None = None,
        config: FieldConfig | None = None,
    ) -> TriplaneField:
        """Build the field from the VAE decoder output `[B, 6, output_dim, H, W]`."""
        config = config or FieldConfig()
        space_cache = split_channels(triplane_raw, config.split_channels)
        planes = rotate_planes(space_cache, config.rotate_planes)
        return cls(
            planes, sdf_network, feature_network, deformation_network, config, space_cache, triplane_raw
        )

    @property
    def batch_size(self) -> int:
        return self.planes.shape[0]

    @property
    def device(self) -> torch.device:
        return self.planes.device

    def _points(self, points: Tensor) -> Tensor:
        if points.shape[-1] != 3:
            raise ValueError(f"points must end with 3 coordinates, got {tuple(points.shape)}")
        if points.ndim == 2:
            points = points.unsqueeze(0).expand(self.batch_size, -1, -1)
        if points.ndim != 3 or points.shape[0] != self.batch_size:
            raise ValueError(
                f"points must be [B={self.batch_size}, N, 3] or [N, 3], got {tuple(points.shape)}"
            )
        return points.to(self.planes.dtype)

    def geo_features(self, points: Tensor, twice_differentiable: bool = True) -> Tensor:
        """Geometry features `[B, N, C]` ("v1") or `[B, N, 3C]` ("v2")."""
        points = self._points(points)
        return sample_planes(
            self.planes[:, GEOMETRY_PLANES], points / self.config.radius, self.config.geo_interpolate,
            twice_differentiable,
        )

    def tex_features(self, points: Tensor) -> Tensor:
        """Texture features `[B, N, 3C]` ("v2", [xy | xz | yz]) or `[B, N, C]` ("v1")."""
        points = self._points(points)
        return sample_planes(
            self.planes[:, TEXTURE_PLANES], points / self.config.radius, self.config.tex_interpolate
        )

    def sdf_bias(self, points: Tensor) -> Tensor | float:
        """The SDF prior `[B, N]` at unscaled points, e.g. the sphere |p| - 0.5."""
        cfg = self.config
        if cfg.sdf_bias == "sphere":
            return points.norm(dim=-1) - float(cfg.sdf_bias_params)
        if cfg.sdf_bias == "ellipsoid":
            size = torch.as_tensor(cfg.sdf_bias_params, dtype=points.dtype, device=points.device)
            return (points / size).norm(dim=-1) - 1.0
        return float(cfg.sdf_bias)

    def sdf_raw(self, points: Tensor, twice_differentiable: bool = True) -> Tensor:
        """SDF MLP output without the prior `[B, N]`."""
        return self.sdf_network(self.geo_features(points, twice_differentiable)).squeeze(-1)

    def sdf(self, points: Tensor, twice_differentiable: bool = True) -> Tensor:
        """Signed distance `[B, N]` (negative inside), sphere prior included. `twice_differentiable=False`: the
        points' first derivative only (faster; `sample_planes`)."""
        points = self._points(points)
        return self.sdf_raw(points, twice_differentiable) + self.sdf_bias(points)

    def deformation(self, points: Tensor) -> Tensor:
        """Raw deformation `[B, N, 3]` of marching-cubes grid vertices (zeros without a deformation MLP)."""
        if self.deformation_network is None:
            return self._points(points).new_zeros(self._points(points).shape)
        return self.deformation_network(self.geo_features(points))

    def sdf_and_deformation(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """`sdf` `[B, N]` and `deformation` `[B, N, 3]` from one geometry lookup (for marching cubes)."""
        points = self._points(points)
        geo = self.geo_features(points)
        sdf = self.sdf_network(geo).squeeze(-1) + self.sdf_bias(points)
        if self.deformation_network is None:
            return sdf, torch.zeros_like(points)
        return sdf, self.deformation_network(geo)

    def grid_sdf(self, resolution: int, device: torch.device, dtype: torch.dtype) -> GridSDF | None:
        """The SDF `[B, R^3]` on marching cubes' R^3 grid, coarse to fine (`triplane_grid`): exact values in the
        blocks whose interval bound contains zero, the sign elsewhere. None when the grid is wanted on another
        device or dtype than the planes', or the MLP or dtype can't be bounded (then marching cubes evaluates
        every grid vertex)."""
        from lightning_modules.student.triplane_grid import TriplaneGridSDF, supports_grid_bounds

        if (torch.device(device), dtype) != (self.planes.device, self.planes.dtype) or not supports_grid_bounds(self):
            return None
        parts = [TriplaneGridSDF(self, index, resolution).evaluate() for index in range(self.batch_size)]
        return GridSDF(torch.cat([p.values for p in parts]), torch.cat([p.exact for p in parts]))

    def features(self, points: Tensor) -> Tensor:
        """Raw colour MLP output `[B, N, 3]` (before the activation)."""
        return self.feature_network(self.tex_features(points))

    def color(self, points: Tensor) -> Tensor:
        """RGB `[B, N, 3]` in [-0.001, 1.001] (the reference's sigmoid * 1.002 - 0.001)."""
        return color_activation(self.features(points))

    def sdf_and_gradient(self, points: Tensor, create_graph: bool = False) -> tuple[Tensor, Tensor]:
        """`sdf` `[B, N]` and its analytic gradient w.r.t. the points `[B, N, 3]` (autograd).

        `create_graph=True` keeps the graph of the gradient (eikonal losses in training).
        """
        points = self._points(points)
        with torch.enable_grad():
            if not points.requires_grad:
                points = points.detach().requires_grad_(True)
            sdf = self.sdf(points, twice_differentiable=create_graph)
            (grad,) = torch.autograd.grad(sdf.sum(), points, create_graph=create_graph)
        return sdf, grad

    def normal(self, points: Tensor, create_graph: bool = False) -> Tensor:
        """Unit outward normals `[B, N, 3]`: the normalised analytic SDF gradient."""
        return F.normalize(self.sdf_and_gradient(points, create_graph)[1], dim=-1)
