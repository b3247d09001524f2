"""`Gaussians`: B objects of N 3D Gaussians each, the object the Gaussian renderer draws and PLY files hold.

World frame of renderers/types.py (+z up, objects in [-1, 1]^3). Each Gaussian has a centre, a rotation
(unit quaternion w, x, y, z), standard deviations along its local axes, an opacity and spherical-harmonics
colour coefficients of degree 0 or 1 in the 3D Gaussian Splatting convention:

    rgb(d) = max(0.5 + C0 sh_0 + C1 (-y sh_1 + z sh_2 - x sh_3), 0),   d = (x, y, z) = unit(centre - camera)

with C0 = 0.28209479177387814 and C1 = 0.4886025119029199 (the real SH basis of degrees 0 and 1).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_DEGREES = (0, 1)


def num_sh_coefficients(degree: int) -> int:
    """K = (degree + 1)^2 coefficients per colour channel."""
    return (degree + 1) ** 2


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    """The degree-0 coefficient `[..., 3]` whose colour is `rgb [..., 3]` (inverse of 0.5 + C0 sh_0)."""
    return (rgb - 0.5) / SH_C0


def quaternion_to_rotation(quats: Tensor) -> Tensor:
    """Rotation matrices `[..., 3, 3]` from quaternions `[..., 4]` (w, x, y, z; normalised here)."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).unflatten(-1, (3, 3))


def quaternion_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product a b of quaternions `[..., 4]` (w, x, y, z): the rotation b, then a."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


@dataclass
class Gaussians:
    """B objects of N 3D Gaussians each, world frame of renderers/types.py.

    means:     [B, N, 3] centres
    quats:     [B, N, 4] rotations, unit quaternions (w, x, y, z)
    scales:    [B, N, 3] standard deviations along the local axes (linear, > 0)
    opacities: [B, N] in [0, 1]
    sh:        [B, N, K, 3] spherical-harmonics colour coefficients, K = (degree + 1)^2, degree 0 or 1
               (see the module docstring for the colour they give)
    """

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    sh: Tensor

    def __post_init__(self) -> None:
        if self.means.dim() != 3 or self.means.shape[-1] != 3:
            raise ValueError(f"means must be [B, N, 3], got {tuple(self.means.shape)}")
        batch, count = self.means.shape[:2]
        expected = {"quats": (batch, count, 4), "scales": (batch, count, 3), "opacities": (batch, count)}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} must be {list(shape)} for means {list(self.means.shape)}, got {list(getattr(self, name).shape)}")
        if self.sh.dim() != 4 or self.sh.shape[:2] != (batch, count) or self.sh.shape[-1] != 3:
            raise ValueError(f"sh must be [B, N, K, 3] for means {list(self.means.shape)}, got {list(self.sh.shape)}")
        if self.sh.shape[2] not in [num_sh_coefficients(d) for d in SH_DEGREES]:
            raise ValueError(f"sh must hold K = 1 (degree 0) or 4 (degree 1) coefficients, got K = {self.sh.shape[2]}")

    @property
    def batch_size(self) -> int:
        return self.means.shape[0]

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[1]

    @property
    def sh_degree(self) -> int:
        return 0 if self.sh.shape[2] == 1 else 1

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    def _map(self, fn) -> Gaussians:
        return Gaussians(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, *args, **kwargs) -> Gaussians:
        """Every tensor moved / cast as `Tensor.to(*args, **kwargs)` does."""
        return self._map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> Gaussians:
        return self._map(Tensor.detach)

    def select(self, index: int | slice | Tensor | list[int]) -> Gaussians:
        """Objects along the batch axis: an int gives one object (B = 1, e.g. for export); a slice, a list
        or an index / boolean tensor gives that subset of the B objects."""
        if isinstance(index, int):
            if not -self.batch_size <= index < self.batch_size:
                raise IndexError(f"object {index} out of range for a batch of {self.batch_size}")
            index = slice(index, index + 1 if index != -1 else None)
        return self._map(lambda t: t[index])

    def transformed(self, rotation: Tensor | None = None, scale: float = 1.0, offset: Tensor | None = None) -> Gaussians:
        """The same objects moved by x -> scale R x + offset: R from the unit quaternion `rotation [4]`
        (w, x, y, z; None: identity), `scale` > 0, `offset [3]`. Orientations and the view-dependent
        colour (SH degree 1) turn with R, so every render from cameras moved the same way is unchanged."""
        means, quats, sh = self.means * scale, self.quats, self.sh
        if rotation is not None:
            rotation = rotation.to(self.means)
            matrix = quaternion_to_rotation(rotation)
            means = means @ matrix.T
            quats = quaternion_multiply(rotation.expand_as(quats), quats)
            if self.sh_degree == 1:
                # colour = d . a with a = (-sh_3, -sh_1, sh_2) per channel; a turns with the directions d
                a = torch.stack([-sh[..., 3, :], -sh[..., 1, :], sh[..., 2, :]], dim=-2)  # [B, N, 3 (xyz), 3 (rgb)]
                a = torch.einsum("ij,bnjc->bnic", matrix, a)
                sh = torch.stack([sh[..., 0, :], -a[..., 1, :], a[..., 2, :], -a[..., 0, :]], dim=-2)
        if offset is not None:
            means = means + offset.to(means)
        return Gaussians(means=means, quats=quats, scales=self.scales * scale, opacities=self.opacities, sh=sh)

    def colors(self, camera_positions: Tensor) -> Tensor:
        """RGB `[B, V, N, 3]` (>= 0) of every Gaussian seen from cameras at `camera_positions [B, V, 3]`."""
        base = SH_C0 * self.sh[:, None, :, 0, :]  # [B, 1, N, 3]
        if self.sh_degree == 0:
            rgb = base.expand(-1, camera_positions.shape[1], -1, -1)
        else:
            directions = F.normalize(self.means[:, None] - camera_positions[:, :, None].to(self.means), dim=-1)
            x, y, z = (directions[..., i : i + 1] for i in range(3))  # [B, V, N, 1]
            sh = self.sh[:, None]
            rgb = base + SH_C1 * (-y * sh[..., 1, :] + z * sh[..., 2, :] - x * sh[..., 3, :])
        return (rgb + 0.5).clamp_min(0.0)

    def normals(self) -> Tensor:
        """Unit world-space normals `[B, N, 3]`: the local axis of each Gaussian's smallest scale (a flat
        Gaussian's normal), with an arbitrary sign (renderers flip it towards the camera)."""
        rotation = quaternion_to_rotation(self.quats)  # [B, N, 3, 3], columns = local axes
        axis = self.scales.argmin(dim=-1)  # [B, N]
        index = axis[..., None, None].expand(*axis.shape, 3, 1)
        return torch.gather(rotation, -1, index).squeeze(-1)

    def covariances(self) -> Tensor:
        """World covariances `[B, N, 3, 3]` = R S S^T R^T, S = diag(scales)."""
        m = quaternion_to_rotation(self.quats) * self.scales[..., None, :]
        return m @ m.transpose(-1, -2)
