import math

import pytest
import torch

from renderers.cameras import (
    c2w_to_spherical,
    cameras_from_spherical,
    evaluation_cameras,
    intrinsics_matrix,
    mvp_matrix,
    pixel_ray_directions,
    relative_distance,
    sample_training_cameras,
    world_to_camera,
)


def project(cameras, points):
    """World points [N, 3] -> pixel (col, row) [B, V, N, 2] with the rasteriser's MVP."""
    mvp = mvp_matrix(cameras)
    homogeneous = torch.cat([points, torch.ones(len(points), 1)], dim=-1)
    clip = torch.einsum("bvij,nj->bvni", mvp, homogeneous)
    ndc = clip[..., :2] / clip[..., 3:]
    col = (ndc[..., 0] + 1) * cameras.width / 2 - 0.5
    row = (ndc[..., 1] + 1) * cameras.height / 2 - 0.5
    return torch.stack([col, row], dim=-1)


def test_training_cameras_follow_the_reference_distribution():
    cams = sample_training_cameras(64, 4, generator=torch.Generator().manual_seed(0), height=32, width=32)
    assert cams.c2w.shape == (64, 4, 4, 4) and cams.height == 32
    # one elevation / fovy / distance per object, shared by its 4 views
    for values in (cams.elevation, cams.fovy, cams.distance):
        assert torch.allclose(values, values[:, :1].expand_as(values))
    assert cams.elevation.min() >= 0 and cams.elevation.max() <= 30 and cams.elevation.std() > 5
    assert torch.allclose(cams.fovy, torch.full_like(cams.fovy, math.radians(60)))
    rel = relative_distance(cams)
    assert rel.min() >= 0.8 - 1e-6 and rel.max() <= 1.0 + 1e-6 and rel.std() > 0.03
    # azimuths evenly spaced by 90 deg with a random offset in [-180, -90)
    assert torch.allclose(torch.diff(cams.azimuth, dim=1), torch.full((64, 3), 90.0), atol=1e-4)
    assert cams.azimuth[:, 0].min() >= -180 and cams.azimuth[:, 0].max() < -90 and cams.azimuth[:, 0].std() > 10


def test_training_cameras_are_reproducible_with_a_generator():
    a = sample_training_cameras(2, generator=torch.Generator().manual_seed(3))
    b = sample_training_cameras(2, generator=torch.Generator().manual_seed(3))
    c = sample_training_cameras(2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.c2w, b.c2w) and not torch.equal(a.c2w, c.c2w)


def test_c2w_is_an_opengl_look_at_matrix_and_round_trips():
    cams = sample_training_cameras(3, 4, generator=torch.Generator().manual_seed(1))
    rotation = cams.c2w[..., :3, :3]
    assert torch.allclose(rotation.transpose(-1, -2) @ rotation, torch.eye(3).expand_as(rotation), atol=1e-5)
    assert torch.allclose(torch.linalg.det(rotation), torch.ones(3, 4), atol=1e-5)
    position = cams.c2w[..., :3, 3]
    # the camera looks along its -z axis, towards the origin, with its y axis pointing up (+z world)
    assert torch.allclose(-rotation[..., :, 2], -position / position.norm(dim=-1, keepdim=True), atol=1e-5)
    assert (rotation[..., 2, 1] > 0).all()
    elevation, azimuth, distance = c2w_to_spherical(cams.c2w)
    assert torch.allclose(elevation, cams.elevation, atol=1e-3)
    assert torch.allclose(distance, cams.distance, atol=1e-5)
    wrapped = (azimuth - cams.azimuth + 180) % 360 - 180
    assert wrapped.abs().max() < 1e-3
    assert torch.allclose(world_to_camera(cams.c2w), torch.linalg.inv(cams.c2w), atol=1e-5)


def test_azimuth_zero_looks_from_plus_x_and_elevation_from_above():
    cams = cameras_from_spherical(torch.tensor([[30.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.tensor([[40.0]]), 8, 8)
    expected = 2.0 * torch.tensor([math.cos(math.radians(30)), 0.0, math.sin(math.radians(30))])
    assert torch.allclose(cams.c2w[0, 0, :3, 3], expected, atol=1e-6)


def test_evaluation_cameras_match_the_protocol():
    cams = evaluation_cameras(4, batch_size=2, height=16, width=16)
    assert cams.c2w.shape == (2, 4, 4, 4)
    assert torch.allclose(cams.distance, torch.full((2, 4), 3.0))
    assert torch.allclose(cams.elevation, torch.full((2, 4), 15.0))
    assert torch.allclose(cams.fovy, torch.full((2, 4), math.radians(40)))
    assert torch.allclose(cams.azimuth[0], torch.tensor([0.0, 90.0, 180.0, 270.0]))
    with pytest.raises(ValueError, match="num_views"):
        evaluation_cameras(0)


def test_projection_puts_up_at_the_top_and_right_on_the_right():
    cams = evaluation_cameras(1, elevation=0.0, distance=2.0, fovy=60.0, height=64, width=64)  # camera on +x
    pixels = project(cams, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.5], [0.0, 0.5, 0.0]]))[0, 0]
    assert torch.allclose(pixels[0], torch.tensor([31.5, 31.5]), atol=1e-4)  # origin at the image centre
    assert pixels[1, 1] < 31.5 - 5  # +z (up) appears above the centre: a smaller row
    assert pixels[2, 0] > 31.5 + 5  # seen from +x, world +y lies to the right
    focal = 32 / math.tan(math.radians(30))
    assert pixels[1, 1] == pytest.approx(31.5 - focal * 0.5 / 2.0, abs=1e-3)


def test_rays_and_intrinsics_agree_with_the_projection():
    cams = sample_training_cameras(1, 2, generator=torch.Generator().manual_seed(2), height=24, width=32)
    directions = pixel_ray_directions(cams)
    assert directions.shape == (1, 2, 24, 32, 3)
    assert torch.allclose(directions.norm(dim=-1), torch.ones(1, 2, 24, 32), atol=1e-5)
    row, col = 5, 27
    point = cams.c2w[0, 0, :3, 3] + 1.7 * directions[0, 0, row, col]
    assert torch.allclose(project(cams, point[None])[0, 0, 0], torch.tensor([col, row], dtype=torch.float32), atol=1e-3)
    # OpenCV intrinsics: camera coordinates (x right, y down, z forward) -> pixel coordinates + 0.5
    cam = world_to_camera(cams.c2w)[0, 0] @ torch.cat([point, torch.ones(1)])
    opencv = torch.stack([cam[0], -cam[1], -cam[2]])
    uv = intrinsics_matrix(cams)[0, 0] @ opencv
    assert torch.allclose(uv[:2] / uv[2], torch.tensor([col + 0.5, row + 0.5]), atol=1e-3)
