"""16-value camera vectors fed to the multi-view teachers (MVDream, RichDreamer ND / albedo).

Every function takes cameras in this project's convention (`renderers/types.py`, the threestudio /
TriplaneTurbo one): world +z up, OpenGL camera-to-world matrices (camera x right, y up, looking
along -z), azimuth 0 deg seen from +x turning towards +y, elevation from the xy-plane towards +z,
position = distance * (cos(el) cos(az), cos(el) sin(az), sin(el)).

The vector is a 4x4 camera-to-world matrix flattened row-major,
`[r00 r01 r02 tx, r10 r11 r12 ty, r20 r21 r22 tz, 0 0 0 1]`, after a per-family change:

| convention      | rotation                         | translation                          | equals the family's own helper           |
|-----------------|----------------------------------|--------------------------------------|------------------------------------------|
| `"mvdream"`     | unchanged                        | unit length (`t / (abs(t) + 1e-8)`)  | MVDream `get_camera` at azimuth `az + 90` |
| `"richdreamer"` | world rotated by Rz(-90 deg)     | unit direction times `distance`      | ND `get_camera` at the same azimuth, `camera_distance = distance` |

For `"richdreamer"`, `distance` is the radius written into the vector, not necessarily the render
distance: RichDreamer and TriplaneTurbo use `cam_method="rel_x2"`, i.e. twice the relative distance
`d_rel = distance_abs * tan(fovy / 2)` (see `richdreamer_condition_distance`); the ND model's own
sampler uses 2.0. For `"mvdream"` the distance is irrelevant (the translation is normalised).
"""

from __future__ import annotations

import torch
from torch import Tensor

CONVENTIONS = ("mvdream", "richdreamer")
RICHDREAMER_DISTANCE_METHODS = ("rel_x2", "rel", "abs", "abs_spec")

# Left-multiplied world rotation Rz(-90 deg) of RichDreamer's `rotate_z: true`.
_RZ_MINUS_90 = ((0.0, 1.0, 0.0, 0.0), (-1.0, 0.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0), (0.0, 0.0, 0.0, 1.0))


def c2w_from_spherical(elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor) -> Tensor:
    """Look-at-origin camera-to-world matrices `[..., 4, 4]` (OpenGL camera, world +z up).

    elevation_deg, azimuth_deg, distance: broadcastable tensors `[...]` (degrees, degrees, length).
    Elevation must lie strictly inside (-90, 90): straight up/down views have no defined "right".
    """
    elevation_deg, azimuth_deg, distance = torch.broadcast_tensors(
        *(torch.as_tensor(v, dtype=torch.float32) for v in (elevation_deg, azimuth_deg, distance))
    )
    if (elevation_deg.abs() >= 90).any():
        raise ValueError(
            "camera elevation must lie strictly between -90 and 90 degrees (look-at is undefined at the poles)"
        )
    if (distance <= 0).any():
        raise ValueError("camera distance must be positive")
    el, az = torch.deg2rad(elevation_deg), torch.deg2rad(azimuth_deg)
    position = distance[..., None] * torch.stack(
        [torch.cos(el) * torch.cos(az), torch.cos(el) * torch.sin(az), torch.sin(el)], dim=-1
    )
    world_up = position.new_tensor([0.0, 0.0, 1.0]).expand_as(position)
    forward = torch.nn.functional.normalize(-position, dim=-1)
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, world_up, dim=-1), dim=-1)
    up = torch.nn.functional.normalize(torch.linalg.cross(right, forward, dim=-1), dim=-1)
    c2w = torch.zeros(*position.shape[:-1], 4, 4, dtype=position.dtype, device=position.device)
    c2w[..., :3, :3] = torch.stack([right, up, -forward], dim=-1)
    c2w[..., :3, 3] = position
    c2w[..., 3, 3] = 1.0
    return c2w


def camera_vectors_from_c2w(
    c2w: Tensor, convention: str = "mvdream", distance: Tensor | float | None = None
) -> Tensor:
    """Camera vectors `[..., 16]` from camera-to-world matrices `[..., 4, 4]` (this project's convention).

    distance: `[...]` or a float; required for `"richdreamer"` (the radius written into the
    translation), ignored for `"mvdream"`. The input is never modified.
    """
    _check_convention(convention)
    if c2w.shape[-2:] != (4, 4):
        raise ValueError(f"c2w must have shape [..., 4, 4], got {list(c2w.shape)}")
    matrix = c2w.clone()
    translation = matrix[..., :3, 3]
    matrix[..., :3, 3] = translation / (translation.norm(dim=-1, keepdim=True) + 1e-8)
    if convention == "richdreamer":
        if distance is None:
            raise ValueError(
                "the 'richdreamer' camera convention needs `distance` (RichDreamer/TriplaneTurbo: "
                "2 * relative distance, see richdreamer_condition_distance)"
            )
        matrix = matrix.new_tensor(_RZ_MINUS_90) @ matrix
        scale = torch.as_tensor(distance, dtype=matrix.dtype, device=matrix.device)
        matrix[..., :3, 3] = matrix[..., :3, 3] * scale[..., None]
    return matrix.flatten(-2)


def camera_vectors(
    elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor | float = 1.0, convention: str = "mvdream"
) -> Tensor:
    """Camera vectors `[..., 16]` for cameras looking at the origin.

    elevation_deg, azimuth_deg: `[...]` degrees, this project's convention (module docstring).
    distance: `[...]` or a float. `"mvdream"`: any positive value (the translation is normalised).
        `"richdreamer"`: the radius written into the vector -- RichDreamer / TriplaneTurbo feed
        `2 * d_rel` (`richdreamer_condition_distance(..., method="rel_x2")`).
    convention: `"mvdream"` (MVDream sd-v2.1-base-4view) or `"richdreamer"` (RichDreamer ND-MV and
        albedo-MV with `rotate_z: true`).
    """
    _check_convention(convention)
    c2w = c2w_from_spherical(elevation_deg, azimuth_deg, distance)
    return camera_vectors_from_c2w(c2w, convention, distance=c2w[..., :3, 3].norm(dim=-1))


def richdreamer_condition_distance(
    distance: Tensor | float, fovy_rad: Tensor | float | None = None, method: str = "rel_x2"
) -> Tensor:
    """The radius RichDreamer writes into its camera vector, from the absolute render distance.

    distance: `[...]` absolute camera distance; fovy_rad: `[...]` vertical field of view (radians),
    needed by the relative methods (`d_rel = distance * tan(fovy / 2)`).
    method (RichDreamer's `cam_method`): `"rel_x2"` -> 2 d_rel (RichDreamer and TriplaneTurbo),
    `"rel"` -> d_rel, `"abs"` -> distance, `"abs_spec"` -> 2.0 (the ND sampler's fixed distance).
    """
    distance = torch.as_tensor(distance, dtype=torch.float32)
    if method == "abs":
        return distance
    if method == "abs_spec":
        return torch.full_like(distance, 2.0)
    if method not in RICHDREAMER_DISTANCE_METHODS:
        raise ValueError(
            f"unknown RichDreamer distance method {method!r}; choose one of {RICHDREAMER_DISTANCE_METHODS}"
        )
    if fovy_rad is None:
        raise ValueError(
            f"method {method!r} needs fovy_rad to turn the absolute distance into a relative one"
        )
    relative = distance * torch.tan(torch.as_tensor(fovy_rad, dtype=torch.float32) / 2)
    return 2 * relative if method == "rel_x2" else relative


def native_camera_vectors(
    elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor | float = 1.0, convention: str = "mvdream"
) -> Tensor:
    """Camera vectors `[..., 16]` with the families' OWN angle conventions (their samplers' `get_camera`).

    MVDream's and normal-depth-diffusion's helpers place the camera at (y-up, OpenGL world)
    `r (cos e sin a, sin e, cos e cos a)` and then swap to z-up; that is this project's camera at
    azimuth `a - 90` deg (MVDream, unit radius) and, after RichDreamer's Rz(-90) world rotation,
    at azimuth `a` with radius r (ND). Useful to reproduce the papers' sampling cameras
    (MVDream: elevation 15, azimuths 0/90/180/270; ND: elevation 15, azimuth from 45, r = 2).
    """
    _check_convention(convention)
    azimuth_deg = torch.as_tensor(azimuth_deg, dtype=torch.float32)
    if convention == "mvdream":
        return camera_vectors(elevation_deg, azimuth_deg - 90.0, 1.0, "mvdream")
    return camera_vectors(elevation_deg, azimuth_deg, distance, "richdreamer")


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown camera convention {convention!r}; choose one of {CONVENTIONS}")


__all__ = [
    "CONVENTIONS",
    "c2w_from_spherical",
    "camera_vectors",
    "camera_vectors_from_c2w",
    "native_camera_vectors",
    "richdreamer_condition_distance",
]
