"""Cameras: training sampling as in the reference, evaluation cameras, projection and conversions.

Conventions (see renderers/types.py): world +z up; `c2w` is an OpenGL camera-to-world matrix (camera
x right, y up, looking along -z); position = distance * (cos(el) cos(az), cos(el) sin(az), sin(el)),
azimuth 0 deg looks at the object from +x. Images are row 0 at the top.

Facts reproduced from the reference (TriplaneTurbo, custom/triplaneturbo/data/
multiview_multiprompt_dualrender_multistep_v2.py and configs/TriplaneTurbo_v1.yaml):
- training: per prompt and per denoising step, ONE elevation U[0, 30] deg, ONE field of view (60 deg),
  ONE relative distance U[0.8, 1.0] shared by its 4 views; azimuths (u + k) / 4 * 360 - 180 for
  k = 0..3 with one u ~ U[0, 1) ("evenly spaced with a random offset"); absolute distance =
  relative / tan(fovy / 2) (MVDream's "relative radius").
- evaluation: distance 3.0, fovy 40 deg, elevation 15 deg (the reference spaces its azimuths with
  linspace(0, 360, N), which repeats the first view at 360; we use N distinct azimuths k * 360 / N).
- rasteriser projection: threestudio's perspective matrix with near 0.1, far 1000 and a negated y
  row, so that row 0 of a rasterised image is the top of the picture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from renderers.types import Cameras

TRAIN_ELEVATION_RANGE = (0.0, 30.0)
TRAIN_AZIMUTH_RANGE = (-180.0, 180.0)
TRAIN_FOVY_RANGE = (60.0, 60.0)
TRAIN_RELATIVE_DISTANCE_RANGE = (0.8, 1.0)
EVAL_ELEVATION = 15.0
EVAL_DISTANCE = 3.0
EVAL_FOVY = 40.0
RASTER_NEAR = 0.1
RASTER_FAR = 1000.0


def spherical_to_position(elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor) -> Tensor:
    """Camera positions `[..., 3]` from elevation / azimuth (degrees) and distance, all `[...]`."""
    el, az = torch.deg2rad(elevation_deg), torch.deg2rad(azimuth_deg)
    return torch.stack(
        [distance * torch.cos(el) * torch.cos(az), distance * torch.cos(el) * torch.sin(az), distance * torch.sin(el)],
        dim=-1,
    )


def look_at(positions: Tensor, target: Sequence[float] = (0.0, 0.0, 0.0), up: Sequence[float] = (0.0, 0.0, 1.0)) -> Tensor:
    """OpenGL camera-to-world matrices `[..., 4, 4]` for cameras at `positions [..., 3]` looking at `target`.

    Undefined when a camera looks straight along `up` (elevation +-90 deg).
    """
    target_t = torch.as_tensor(target, dtype=positions.dtype, device=positions.device).expand_as(positions)
    up_t = torch.as_tensor(up, dtype=positions.dtype, device=positions.device).expand_as(positions)
    forward = torch.nn.functional.normalize(target_t - positions, dim=-1)
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, up_t, dim=-1), dim=-1)
    true_up = torch.nn.functional.normalize(torch.linalg.cross(right, forward, dim=-1), dim=-1)
    c2w = torch.zeros(*positions.shape[:-1], 4, 4, dtype=positions.dtype, device=positions.device)
    c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2] = right, true_up, -forward
    c2w[..., :3, 3] = positions
    c2w[..., 3, 3] = 1.0
    return c2w


def cameras_from_spherical(
    elevation_deg: Tensor,
    azimuth_deg: Tensor,
    distance: Tensor,
    fovy_deg: Tensor,
    height: int,
    width: int,
) -> Cameras:
    """Cameras looking at the origin. All inputs `[B, V]` (degrees; `distance` absolute)."""
    shape = torch.broadcast_shapes(elevation_deg.shape, azimuth_deg.shape, distance.shape, fovy_deg.shape)
    if len(shape) != 2:
        raise ValueError(f"camera parameters must broadcast to [B, V], got shape {tuple(shape)}")
    elevation_deg, azimuth_deg, distance, fovy_deg = (
        t.expand(shape).to(torch.float32) for t in (elevation_deg, azimuth_deg, distance, fovy_deg)
    )
    c2w = look_at(spherical_to_position(elevation_deg, azimuth_deg, distance))
    return Cameras(
        c2w=c2w,
        fovy=torch.deg2rad(fovy_deg),
        elevation=elevation_deg.clone(),
        azimuth=azimuth_deg.clone(),
        distance=distance.clone(),
        height=int(height),
        width=int(width),
    )


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def sample_training_cameras(
    batch_size: int,
    num_views: int = 4,
    *,
    generator: torch.Generator | None = None,
    elevation_range: tuple[float, float] = TRAIN_ELEVATION_RANGE,
    azimuth_range: tuple[float, float] = TRAIN_AZIMUTH_RANGE,
    fovy_range: tuple[float, float] = TRAIN_FOVY_RANGE,
    relative_distance_range: tuple[float, float] = TRAIN_RELATIVE_DISTANCE_RANGE,
    height: int = 512,
    width: int = 512,
    device: torch.device | str | None = None,
) -> Cameras:
    """Random training cameras, `[batch_size, num_views]`, as the reference samples them per PRD step.

    Per object: one elevation, one fovy and one relative distance for all its views; azimuths evenly
    spaced over `azimuth_range` with one random offset. Absolute distance = relative / tan(fovy / 2).
    Draws come from `generator` (CPU) in this order: elevation, azimuth offset, fovy, distance.
    """
    if batch_size < 1 or num_views < 1:
        raise ValueError(f"batch_size and num_views must be >= 1, got {batch_size} and {num_views}")
    elevation = _uniform(batch_size, *elevation_range, generator)
    offset = torch.rand(batch_size, generator=generator)
    fovy = _uniform(batch_size, *fovy_range, generator)
    relative = _uniform(batch_size, *relative_distance_range, generator)
    span = azimuth_range[1] - azimuth_range[0]
    azimuth = (offset[:, None] + torch.arange(num_views)[None, :]) / num_views * span + azimuth_range[0]
    distance = relative / torch.tan(torch.deg2rad(fovy) / 2)
    cameras = cameras_from_spherical(
        elevation[:, None].expand(-1, num_views),
        azimuth,
        distance[:, None].expand(-1, num_views),
        fovy[:, None].expand(-1, num_views),
        height,
        width,
    )
    return cameras.to(device) if device is not None else cameras


def evaluation_cameras(
    num_views: int,
    *,
    batch_size: int = 1,
    elevation: float = EVAL_ELEVATION,
    distance: float = EVAL_DISTANCE,
    fovy: float = EVAL_FOVY,
    azimuth_start: float = 0.0,
    height: int = 512,
    width: int = 512,
    device: torch.device | str | None = None,
) -> Cameras:
    """`num_views` cameras around the object at azimuths `azimuth_start + k * 360 / num_views`,
    repeated for `batch_size` objects: `[batch_size, num_views]`. Defaults: the reference protocol."""
    if num_views < 1 or batch_size < 1:
        raise ValueError(f"num_views and batch_size must be >= 1, got {num_views} and {batch_size}")
    azimuth = azimuth_start + torch.arange(num_views, dtype=torch.float32) * (360.0 / num_views)
    shape = (batch_size, num_views)
    cameras = cameras_from_spherical(
        torch.full(shape, float(elevation)),
        azimuth[None].expand(shape),
        torch.full(shape, float(distance)),
        torch.full(shape, float(fovy)),
        height,
        width,
    )
    return cameras.to(device) if device is not None else cameras


def c2w_to_spherical(c2w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Elevation (deg), azimuth (deg, in (-180, 180]) and distance of camera positions, each `[...]`,
    from `c2w [..., 4, 4]`. Assumes the cameras look at the origin (as all cameras here do)."""
    position = c2w[..., :3, 3]
    distance = position.norm(dim=-1)
    elevation = torch.rad2deg(torch.asin((position[..., 2] / distance.clamp_min(1e-12)).clamp(-1.0, 1.0)))
    azimuth = torch.rad2deg(torch.atan2(position[..., 1], position[..., 0]))
    return elevation, azimuth, distance


def relative_distance(cameras: Cameras) -> Tensor:
    """MVDream's relative camera distance `[B, V]`: distance * tan(fovy / 2) (U[0.8, 1.0] in training)."""
    return cameras.distance * torch.tan(cameras.fovy / 2)


def camera_positions(cameras: Cameras) -> Tensor:
    """World positions of the cameras `[B, V, 3]`."""
    return cameras.c2w[..., :3, 3]


def world_to_camera(c2w: Tensor) -> Tensor:
    """Rigid inverse of `c2w [..., 4, 4]`: world-to-camera `[..., 4, 4]`."""
    rotation_t = c2w[..., :3, :3].transpose(-1, -2)
    w2c = torch.zeros_like(c2w)
    w2c[..., :3, :3] = rotation_t
    w2c[..., :3, 3:] = -rotation_t @ c2w[..., :3, 3:]
    w2c[..., 3, 3] = 1.0
    return w2c


def focal_length_pixels(fovy: Tensor, height: int) -> Tensor:
    """Focal length in pixels `[...]` for a vertical field of view `fovy [...]` (radians)."""
    return 0.5 * height / torch.tan(fovy / 2)


def intrinsics_matrix(cameras: Cameras, height: int | None = None, width: int | None = None) -> Tensor:
    """Pinhole intrinsics `[B, V, 3, 3]` in the OpenCV pixel convention (x right, y down, origin at the
    top-left corner of the image, pixel centres at integer + 0.5), square pixels."""
    height, width = height or cameras.height, width or cameras.width
    focal = focal_length_pixels(cameras.fovy, height)
    k = torch.zeros(*cameras.fovy.shape, 3, 3, dtype=cameras.c2w.dtype, device=cameras.c2w.device)
    k[..., 0, 0], k[..., 1, 1] = focal, focal
    k[..., 0, 2], k[..., 1, 2], k[..., 2, 2] = width / 2, height / 2, 1.0
    return k


def projection_matrix(fovy: Tensor, aspect_wh: float, near: float = RASTER_NEAR, far: float = RASTER_FAR) -> Tensor:
    """OpenGL perspective projection `[..., 4, 4]` with the y row negated (threestudio's), so that image
    row 0 is the top. `fovy [...]` in radians, `aspect_wh` = width / height."""
    proj = torch.zeros(*fovy.shape, 4, 4, dtype=fovy.dtype, device=fovy.device)
    tan_half = torch.tan(fovy / 2)
    proj[..., 0, 0] = 1.0 / (tan_half * aspect_wh)
    proj[..., 1, 1] = -1.0 / tan_half
    proj[..., 2, 2] = -(far + near) / (far - near)
    proj[..., 2, 3] = -2.0 * far * near / (far - near)
    proj[..., 3, 2] = -1.0
    return proj


def mvp_matrix(
    cameras: Cameras,
    near: float = RASTER_NEAR,
    far: float = RASTER_FAR,
    height: int | None = None,
    width: int | None = None,
) -> Tensor:
    """Model-view-projection matrices `[B, V, 4, 4]` (world points -> clip space) for the rasterisers."""
    height, width = height or cameras.height, width or cameras.width
    return projection_matrix(cameras.fovy.to(cameras.c2w.dtype), width / height, near, far) @ world_to_camera(cameras.c2w)


def pixel_ray_directions(cameras: Cameras, height: int | None = None, width: int | None = None) -> Tensor:
    """Unit world-space ray directions through the pixel centres, `[B, V, H, W, 3]`.

    Pixel (row i, col j) looks along camera-space ((j + 0.5 - W/2) / f, -(i + 0.5 - H/2) / f, -1) with
    f = focal_length_pixels(fovy, H), the same pixel centres the rasterisers use.
    """
    height, width = height or cameras.height, width or cameras.width
    device, dtype = cameras.c2w.device, cameras.c2w.dtype
    cols = torch.arange(width, device=device, dtype=dtype) + 0.5 - width / 2
    rows = torch.arange(height, device=device, dtype=dtype) + 0.5 - height / 2
    focal = focal_length_pixels(cameras.fovy.to(dtype), height)[..., None, None]  # [B, V, 1, 1]
    x = cols[None, None, None, :] / focal
    y = -rows[None, None, :, None] / focal
    x, y = torch.broadcast_tensors(x, y)
    camera_dirs = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # [B, V, H, W, 3]
    world_dirs = torch.einsum("bvij,bvhwj->bvhwi", cameras.c2w[..., :3, :3], camera_dirs)
    return torch.nn.functional.normalize(world_dirs, dim=-1)


def pixel_rays(cameras: Cameras, height: int | None = None, width: int | None = None) -> tuple[Tensor, Tensor]:
    """Ray origins and unit directions through the pixel centres, both `[B, V, H, W, 3]`."""
    directions = pixel_ray_directions(cameras, height, width)
    origins = camera_positions(cameras)[:, :, None, None, :].expand_as(directions)
    return origins, directions


def resized(cameras: Cameras, height: int, width: int) -> Cameras:
    """The same cameras meant for another image size (the field of view is kept)."""
    return Cameras(
        c2w=cameras.c2w,
        fovy=cameras.fovy,
        elevation=cameras.elevation,
        azimuth=cameras.azimuth,
        distance=cameras.distance,
        height=int(height),
        width=int(width),
    )
