"""3D Gaussian Splatting PLY files (the layout of the 3DGS reference code, which common splat viewers open).

One binary little-endian `vertex` element, one float32 row per Gaussian, properties in this order:
x y z, nx ny nz (zeros), f_dc_0..2 (degree-0 SH of R, G, B), f_rest_0..f_rest_{3(K-1)-1} (the higher SH
coefficients channel-major: all of R's, then G's, then B's), opacity (logit), scale_0..2 (natural log),
rot_0..3 (unit quaternion w x y z). Files with SH degree 0 or 1 (0 or 9 f_rest) are read; a quaternion
read back is normalised, as renderers do.

Axes: by default (`frame="viewer"`) a file holds the Gaussians in viewer axes (+y up, front +z), as the
project's mesh exports do (renderers/export.py), so a splat and the GLB of the same object line up in a
viewer; writing turns world-frame Gaussians into those axes and reading turns them back (centres,
rotations and the view-dependent colour). `frame="world"` stores the world frame (+z up, front +x) as is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from renderers.errors import UserError
from renderers.gaussians import SH_DEGREES, Gaussians, num_sh_coefficients

FRAMES = ("viewer", "world")
# world -> viewer axes (x, y, z) -> (y, z, x), renderers.export.world_to_viewer, as a rotation quaternion
_WORLD_TO_VIEWER = (0.5, -0.5, -0.5, -0.5)
_VIEWER_TO_WORLD = (0.5, 0.5, 0.5, 0.5)
# keeps opacities of exactly 0 or 1 finite as logits; renders change by < 1e-6
_OPACITY_EPS = 1e-6
_MIN_SCALE = 1e-30


class GaussianPlyError(UserError, ValueError):
    """A Gaussian PLY file that cannot be read."""


def ply_property_names(sh_degree: int) -> list[str]:
    """The 3DGS property names, in file order, for SH degree 0 or 1."""
    rest = 3 * (num_sh_coefficients(sh_degree) - 1)
    return [
        "x", "y", "z", "nx", "ny", "nz",
        *(f"f_dc_{i}" for i in range(3)),
        *(f"f_rest_{i}" for i in range(rest)),
        "opacity",
        *(f"scale_{i}" for i in range(3)),
        *(f"rot_{i}" for i in range(4)),
    ]  # fmt: skip


def _check_frame(frame: str) -> None:
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {', '.join(FRAMES)}, got {frame!r}")


def write_gaussian_ply(path: str | Path, gaussians: Gaussians, frame: str = "viewer") -> None:
    """Write exactly one object (B == 1, world frame) to `path` in the 3DGS layout, in `frame` axes (see
    the module docstring)."""
    from plyfile import PlyData, PlyElement

    _check_frame(frame)
    if gaussians.batch_size != 1:
        raise ValueError(f"a PLY file holds one object, got a batch of {gaussians.batch_size}: use gaussians.select(i)")
    g = gaussians.detach().to(device="cpu", dtype=torch.float64)
    if frame == "viewer":
        g = g.transformed(torch.tensor(_WORLD_TO_VIEWER, dtype=torch.float64))
    count = g.num_gaussians
    sh = g.sh[0]  # [N, K, 3]
    columns = [
        g.means[0],
        torch.zeros(count, 3, dtype=torch.float64),
        sh[:, 0, :],
        sh[:, 1:, :].transpose(1, 2).reshape(count, -1),  # channel-major: [N, 3, K - 1]
        torch.logit(g.opacities[0].clamp(_OPACITY_EPS, 1.0 - _OPACITY_EPS))[:, None],
        torch.log(g.scales[0].clamp_min(_MIN_SCALE)),
        torch.nn.functional.normalize(g.quats[0], dim=-1),
    ]
    values = torch.cat(columns, dim=1).numpy().astype(np.float32)
    names = ply_property_names(g.sh_degree)
    rows = np.empty(count, dtype=[(name, "f4") for name in names])
    for i, name in enumerate(names):
        rows[name] = values[:, i]
    PlyData([PlyElement.describe(rows, "vertex")], text=False).write(str(path))


def is_gaussian_ply(path: str | Path) -> bool:
    """True when `path` starts with a PLY header whose vertex element has the 3DGS properties (f_dc_0,
    opacity, scale_0, rot_0); reads the header only."""
    try:
        with open(path, "rb") as fh:
            header = fh.read(1 << 16)
    except OSError:
        return False
    if not header.startswith(b"ply"):
        return False
    names = {line.split()[-1] for line in header.split(b"end_header")[0].splitlines() if line.startswith(b"property")}
    return {b"f_dc_0", b"opacity", b"scale_0", b"rot_0"} <= names


def read_gaussian_ply(path: str | Path, frame: str = "viewer") -> Gaussians:
    """One object (B == 1) of float32 Gaussians in the world frame from a 3DGS PLY file whose axes are
    `frame`'s; `GaussianPlyError` (one line) when the file is missing, is not a PLY file, or lacks a
    property of the layout."""
    from plyfile import PlyData

    _check_frame(frame)
    path = Path(path)
    if not path.is_file():
        raise GaussianPlyError(f"Gaussian PLY file {path} does not exist")
    try:
        ply = PlyData.read(str(path))
    except Exception as error:  # noqa: BLE001 - plyfile raises several kinds on bad input
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GaussianPlyError(f"{path} is not a readable PLY file ({reason})") from None
    if "vertex" not in [element.name for element in ply.elements]:
        raise GaussianPlyError(f"{path} has no 'vertex' element: not a 3D Gaussian Splatting PLY file")
    vertex = ply["vertex"]
    present = {prop.name for prop in vertex.properties}
    rest = sorted((name for name in present if name.startswith("f_rest_")), key=lambda n: int(n[7:]) if n[7:].isdigit() else -1)
    degrees = {3 * (num_sh_coefficients(d) - 1): d for d in SH_DEGREES}
    if len(rest) not in degrees:
        raise GaussianPlyError(
            f"{path} has {len(rest)} f_rest properties; only SH degree 0 (none) or 1 (9) is supported"
        )
    required = [name for name in ply_property_names(degrees[len(rest)]) if name not in ("nx", "ny", "nz")]
    missing = [name for name in required if name not in present]
    if missing:
        raise GaussianPlyError(f"{path} lacks the 3D Gaussian property(ies) {', '.join(missing)}: not a 3D Gaussian Splatting PLY file")

    def column(*names: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.asarray(vertex[name], dtype=np.float32) for name in names], axis=-1))

    means = column("x", "y", "z")
    count = means.shape[0]
    # an infinite opacity logit or log scale is a valid 0 / 1 opacity or zero scale; NaN never is
    if not torch.isfinite(means).all() or column(*required[3:]).isnan().any():
        raise GaussianPlyError(f"{path} holds NaN attributes or non-finite centres")
    k = num_sh_coefficients(degrees[len(rest)])
    dc = column("f_dc_0", "f_dc_1", "f_dc_2")[:, None, :]  # [N, 1, 3]
    if k > 1:
        higher = column(*(f"f_rest_{i}" for i in range(3 * (k - 1)))).reshape(count, 3, k - 1).transpose(1, 2)
        sh = torch.cat([dc, higher], dim=1)
    else:
        sh = dc
    gaussians = Gaussians(
        means=means[None],
        quats=torch.nn.functional.normalize(column("rot_0", "rot_1", "rot_2", "rot_3"), dim=-1)[None],
        scales=torch.exp(column("scale_0", "scale_1", "scale_2"))[None],
        opacities=torch.sigmoid(column("opacity")[:, 0])[None],
        sh=sh[None].contiguous(),
    )
    if frame == "viewer":
        gaussians = gaussians.transformed(torch.tensor(_VIEWER_TO_WORLD))
    return gaussians
