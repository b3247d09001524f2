"""The Gaussian renderer (pure-PyTorch backend), the Gaussians container and the 3DGS PLY format."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import renderers.gaussian_renderer as gaussian_renderer
from renderers import GaussianRenderer, Gaussians
from renderers.cameras import cameras_from_spherical, evaluation_cameras, intrinsics_matrix
from renderers.errors import UserError
from renderers.gaussian_ply import GaussianPlyError, is_gaussian_ply, read_gaussian_ply, write_gaussian_ply
from renderers.gaussian_raster import project_gaussians, rasterize_gaussians
from renderers.gaussian_renderer import opencv_viewmats
from renderers.gaussians import SH_C0, rgb_to_sh0
from renderers.rasterizers import RasterizerBackendError


def one_camera(height: int, width: int, fovy: float = 40.0, distance: float = 3.0, elevation=0.0, azimuth=0.0, dtype=torch.float64):
    cameras = cameras_from_spherical(
        torch.tensor([[elevation]]), torch.tensor([[azimuth]]), torch.tensor([[distance]]), torch.tensor([[fovy]]), height, width
    )
    cameras.c2w = cameras.c2w.to(dtype)
    return cameras


def gaussians_of(means, quats, scales, opacities, colors, dtype=torch.float64, degree=0) -> Gaussians:
    """One object from per-Gaussian lists; `colors` RGB in [0, 1] (degree 0) or SH [N, 4, 3]."""

    def t(x):
        return torch.as_tensor(x, dtype=dtype)[None]

    sh = rgb_to_sh0(torch.as_tensor(colors, dtype=dtype))[:, None] if degree == 0 else torch.as_tensor(colors, dtype=dtype)
    return Gaussians(t(means), F.normalize(t(quats), dim=-1), t(scales), t(opacities), sh[None])


def random_gaussians(count: int, degree: int = 1, dtype=torch.float32, batch: int = 1) -> Gaussians:
    return Gaussians(
        means=torch.randn(batch, count, 3, dtype=dtype) * 0.4,
        quats=F.normalize(torch.randn(batch, count, 4, dtype=dtype), dim=-1),
        scales=torch.exp(torch.rand(batch, count, 3, dtype=dtype) * 1.5 - 3.5),
        opacities=torch.rand(batch, count, dtype=dtype) * 0.9 + 0.05,
        sh=torch.randn(batch, count, (degree + 1) ** 2, 3, dtype=dtype) * 0.5,
    )


def axis_angle_rotation(axis, angle) -> tuple[torch.Tensor, torch.Tensor]:
    """(quaternion w x y z, rotation matrix by Rodrigues' formula) for a rotation of `angle` about `axis`."""
    axis = torch.as_tensor(axis, dtype=torch.float64)
    axis = axis / axis.norm()
    quat = torch.cat([torch.tensor([math.cos(angle / 2)], dtype=torch.float64), math.sin(angle / 2) * axis])
    k = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=torch.float64)
    return quat, torch.eye(3, dtype=torch.float64) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


@pytest.mark.parametrize("antialiased", [False, True])
def test_single_gaussian_footprint_is_the_projected_2d_gaussian(antialiased):
    """The alpha image of one Gaussian is opacity * exp(-d^T Sigma2D^-1 d / 2) at the pixel centres, with
    Sigma2D = J W R S^2 R^T W^T J^T + 0.3 I computed here from the camera matrix and Rodrigues' rotation,
    clamped at 0.99 and zero below 1/255; antialiased (Mip-Splatting's filter), the opacity times
    sqrt(det(Sigma2D - 0.3 I) / det(Sigma2D)). Odd image size: partial tiles are cropped correctly."""
    height, width = 37, 45
    cameras = one_camera(height, width, fovy=40.0, distance=3.0, elevation=10.0, azimuth=20.0)
    quat, rotation = axis_angle_rotation([0.3, -0.5, 0.8], 0.9)
    mean = torch.tensor([0.12, -0.25, 0.08], dtype=torch.float64)
    scales = torch.tensor([0.3, 0.08, 0.18], dtype=torch.float64)
    opacity = 0.93
    gaussians = gaussians_of([mean.tolist()], [quat.tolist()], [scales.tolist()], [opacity], [[0.2, 0.5, 0.9]])
    out = GaussianRenderer(backend="torch", background=(1.0, 1.0, 1.0), antialiased=antialiased)(gaussians, cameras)

    c2w = cameras.c2w[0, 0]
    w2c_cv = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)) @ c2w[:3, :3].T  # OpenCV axes
    x, y, z = (w2c_cv @ (mean - c2w[:3, 3])).tolist()
    focal = 0.5 * height / math.tan(cameras.fovy[0, 0].item() / 2)  # the camera's own (float32) field of view
    centre = torch.tensor([focal * x / z + width / 2, focal * y / z + height / 2], dtype=torch.float64)
    jacobian = torch.tensor([[focal / z, 0, -focal * x / z**2], [0, focal / z, -focal * y / z**2]], dtype=torch.float64)
    sigma3d = rotation @ torch.diag(scales**2) @ rotation.T
    sigma2d = jacobian @ w2c_cv @ sigma3d @ w2c_cv.T @ jacobian.T + 0.3 * torch.eye(2, dtype=torch.float64)
    rows, cols = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    d = torch.stack([cols, rows], dim=-1).to(torch.float64) - centre
    mahalanobis = torch.einsum("hwi,ij,hwj->hw", d, torch.linalg.inv(sigma2d), d)
    if antialiased:
        opacity = opacity * math.sqrt(torch.det(sigma2d - 0.3 * torch.eye(2, dtype=torch.float64)) / torch.det(sigma2d))
        assert 0.5 < opacity < 0.9  # a few pixels wide: the filter takes a visible part of the opacity
    expected = (opacity * torch.exp(-0.5 * mahalanobis)).clamp(max=0.99)
    expected = torch.where(expected < 1 / 255, torch.zeros_like(expected), expected)

    alpha = out["alpha"][0, 0, 0]
    assert (expected > 0.5).sum() > 20 and (expected == 0).sum() > 200  # a footprint with an edge, in the image
    torch.testing.assert_close(alpha, expected, atol=1e-9, rtol=0)
    color = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)[:, None, None]
    torch.testing.assert_close(out["rgb"][0, 0], color * alpha + (1 - alpha), atol=1e-9, rtol=0)
    # depth: the centre's distance along the optical axis where the Gaussian is drawn
    torch.testing.assert_close(out["depth"][0, 0, 0], z * alpha, atol=1e-9, rtol=0)


def test_antialiased_mode_keeps_a_subpixel_gaussians_coverage_instead_of_dilating_it():
    """A Gaussian smaller than a pixel: its summed alpha is its own projected mass opacity 2 pi sqrt(det
    Sigma2D_own) with the antialiased filter (the dilation blurs it and adds nothing; up to the 1/255 cut of
    its tails, ~2 %), while the classic 0.3 px^2 dilation multiplies it (here ~4x): what makes classic splats
    draw fatter than the surface they sit on."""
    cameras = one_camera(33, 33, fovy=40.0, distance=3.0)
    std = 0.02  # world units: ~0.3 px at this distance and field of view
    focal = 0.5 * 33 / math.tan(cameras.fovy[0, 0].item() / 2)
    own = 0.9 * 2 * math.pi * (focal * std / 3.0) ** 2  # the centre is 3 units in front of the camera
    gaussians = gaussians_of([[0.0, 0.0, 0.0]], [[1.0, 0.0, 0.0, 0.0]], [[std, std, std]], [0.9], [[1.0, 0.0, 0.0]])
    coverage = {
        mode: float(GaussianRenderer(backend="torch", antialiased=mode)(gaussians, cameras)["alpha"].sum()) for mode in (False, True)
    }
    assert coverage[True] == pytest.approx(own, rel=0.03)
    assert coverage[False] > 3 * own


# (mean, quaternion, scales, opacity, rgb): a red Gaussian at x = 0.5 in front of a larger green one at
# x = -0.5, as seen from +x
RED = ([0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.3], 1.0, [1.0, 0.0, 0.0])
GREEN = ([-0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.7, 0.7, 0.7], 0.9, [0.0, 1.0, 0.0])


def scene_of(*gaussians) -> Gaussians:
    return gaussians_of(*(list(values) for values in zip(*gaussians, strict=True)))


def test_overlapping_gaussians_composite_nearest_first_whatever_their_order():
    cameras = one_camera(32, 32, fovy=40.0, distance=3.0)
    renderer = GaussianRenderer(backend="torch", background=(0.0, 0.0, 1.0))
    out = renderer(scene_of(RED, GREEN), cameras)
    swapped = renderer(scene_of(GREEN, RED), cameras)
    for name in ("rgb", "alpha", "normal", "depth", "disparity"):
        torch.testing.assert_close(swapped[name], out[name], atol=1e-12, rtol=0)
    rgb = out["rgb"][0, 0]
    centre = rgb[:, 15:17, 15:17]
    # at the centre (0.7 px from both centres, sigma > 5 px): red alpha clamps at 0.99, green's ~0.9 is
    # seen through the remaining 0.01
    torch.testing.assert_close(centre[0], torch.full_like(centre[0], 0.99), atol=1e-9, rtol=0)
    torch.testing.assert_close(centre[1], torch.full_like(centre[1], 0.009), atol=2e-4, rtol=0)
    # where the front one is (nearly) opaque the picture is red: its own alpha, green only through the rest
    red_alpha = renderer(scene_of(RED), cameras)["alpha"][0, 0, 0]
    front = red_alpha > 0.95
    assert front.sum() > 9
    torch.testing.assert_close(rgb[0][front], red_alpha[front], atol=1e-12, rtol=0)
    assert (rgb[1][front] <= 1 - red_alpha[front]).all()
    # and green shows around it, where only the larger back Gaussian reaches
    assert (rgb[1] > rgb[0] + 0.15).any()


def test_a_zero_opacity_gaussian_changes_nothing():
    cameras = evaluation_cameras(2, height=24, width=24, device="cpu")
    gaussians = random_gaussians(12, dtype=torch.float64)
    ghost = Gaussians(
        means=torch.tensor([[[0.8, 0.0, 0.0]]], dtype=torch.float64),  # in front of everything in view 0
        quats=torch.tensor([[[1.0, 0.0, 0.0, 0.0]]], dtype=torch.float64),
        scales=torch.full((1, 1, 3), 0.5, dtype=torch.float64),
        opacities=torch.zeros(1, 1, dtype=torch.float64),
        sh=torch.full((1, 1, 4, 3), 2.0, dtype=torch.float64),
    )
    with_ghost = Gaussians(*(torch.cat([a, b], dim=1) for a, b in zip(ghost.__dict__.values(), gaussians.__dict__.values(), strict=True)))
    renderer = GaussianRenderer(backend="torch")
    out, out_ghost = renderer(gaussians, cameras), renderer(with_ghost, cameras)
    assert out["alpha"].amax() > 0.5
    for name in out.images:  # equal up to the summation order of the padded per-tile lists
        torch.testing.assert_close(out_ghost[name], out[name], atol=1e-12, rtol=0)


@pytest.mark.parametrize("antialiased", [False, True])
def test_gradients_match_finite_differences(antialiased):
    """Every image's gradient w.r.t. means, quats, scales, opacities and SH coefficients (float64). The
    Gaussians are large against the 12 px image, so no 1/255 edge or extent limit lies in it (a
    perturbation crossing one would be a true discontinuity), and opacities stay below the 0.99 clamp."""
    cameras = cameras_from_spherical(
        torch.tensor([[10.0, -20.0]]), torch.tensor([[0.0, 70.0]]), torch.tensor([[3.0, 3.0]]), torch.tensor([[60.0, 60.0]]), 12, 12
    )
    cameras.c2w = cameras.c2w.double()
    base = Gaussians(
        means=torch.randn(1, 3, 3, dtype=torch.float64) * 0.3,
        quats=F.normalize(torch.randn(1, 3, 4, dtype=torch.float64), dim=-1),
        scales=torch.rand(1, 3, 3, dtype=torch.float64) * 0.6 + 1.0,
        opacities=torch.rand(1, 3, dtype=torch.float64) * 0.3 + 0.4,
        sh=torch.randn(1, 3, 4, 3, dtype=torch.float64) * 0.2,
    )
    weights = {name: torch.rand(1, 2, c, 12, 12, dtype=torch.float64) for name, c in [("rgb", 3), ("alpha", 1), ("normal", 3), ("depth", 1), ("disparity", 1)]}
    renderer = GaussianRenderer(backend="torch", background=(0.3, 0.6, 0.9), antialiased=antialiased)

    def losses(means, quats, scales, opacities, sh):
        out = renderer(Gaussians(means, quats, scales, opacities, sh), cameras)
        return torch.stack([(out[name] * w).sum() for name, w in weights.items()])

    inputs = tuple(t.clone().requires_grad_(True) for t in base.__dict__.values())
    with torch.no_grad():
        out = renderer(base, cameras)
    assert out["alpha"].amin() > 0.1  # every pixel is well inside the footprints' smooth part (the cut is at 1/255)
    # fast mode: each input's Jacobian along a random direction (all elements at once), 2 renders per input
    assert torch.autograd.gradcheck(losses, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_tile_size_and_chunking_change_no_pixel():
    """Extent culling drops only alpha < 1/255, so tiles of 4, 8 or 16 px and any chunking agree."""
    cameras = evaluation_cameras(2, height=40, width=40)
    cameras.c2w = cameras.c2w.double()
    gaussians = random_gaussians(60, dtype=torch.float64)
    projected = project_gaussians(
        gaussians.means, gaussians.covariances(), gaussians.opacities,
        opencv_viewmats(cameras), intrinsics_matrix(cameras), 40, 40, 0.01, 1e10,
    )  # fmt: skip
    features = torch.rand(1, 2, 60, 4, dtype=torch.float64)
    reference = rasterize_gaussians(projected, gaussians.opacities, features, 40, 40, tile_size=16)
    for tile_size, chunk in [(4, 2**22), (8, 2**22), (8, 500), (16, 1)]:
        result = rasterize_gaussians(projected, gaussians.opacities, features, 40, 40, tile_size=tile_size, chunk_elements=chunk)
        for got, want in zip(result, reference, strict=True):
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert reference[1].amax() > 0.5


def test_render_output_and_background():
    """Shapes, the renderer name, a field's `gaussians()`, and the background where nothing is drawn."""

    class Field:
        def __init__(self, gaussians):
            self._gaussians = gaussians

        def gaussians(self):
            return self._gaussians

    cameras = evaluation_cameras(3, batch_size=2, height=20, width=28)
    gaussians = random_gaussians(30, batch=2)
    out = GaussianRenderer(backend="auto", background=(0.25, 0.5, 0.75))(Field(gaussians), cameras)
    assert out.renderer == "gaussian"
    shapes = {name: tuple(image.shape) for name, image in out.images.items()}
    assert shapes == {"rgb": (2, 3, 3, 20, 28), "alpha": (2, 3, 1, 20, 28), "normal": (2, 3, 3, 20, 28), "depth": (2, 3, 1, 20, 28), "disparity": (2, 3, 1, 20, 28)}
    empty = out["alpha"][:, :, 0] == 0
    assert empty.any() and (~empty).any()
    rgb = out["rgb"].permute(0, 1, 3, 4, 2)[empty]
    torch.testing.assert_close(rgb, torch.tensor([0.25, 0.5, 0.75]).expand_as(rgb))
    normal = out["normal"].permute(0, 1, 3, 4, 2)[empty]
    torch.testing.assert_close(normal, torch.tensor([0.5, 0.5, 1.0]).expand_as(normal))
    assert (out["depth"][:, :, 0][empty] == 0).all() and (out["disparity"][:, :, 0][empty] == 0).all()
    # object b is drawn from cameras[b]: rendering object 1 alone gives the same images
    alone = GaussianRenderer(backend="torch", background=(0.25, 0.5, 0.75))(gaussians.select(1), evaluation_cameras(3, height=20, width=28))
    torch.testing.assert_close(alone["rgb"][0], out["rgb"][1])


def test_normals_face_the_camera_along_the_smallest_axis():
    """A flat Gaussian (thin along world x) seen from +x and from -x: camera-space normal (0, 0, 1), i.e.
    (0.5, 0.5, 1) once mapped to [0, 1], from both sides."""
    flat = gaussians_of([[0.0, 0.0, 0.0]], [[1.0, 0.0, 0.0, 0.0]], [[0.01, 0.4, 0.4]], [0.99], [[0.5, 0.5, 0.5]])
    for azimuth in (0.0, 180.0):
        out = GaussianRenderer(backend="torch")(flat, one_camera(16, 16, azimuth=azimuth))
        centre = out["normal"][0, 0, :, 8, 8]
        torch.testing.assert_close(centre, torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64), atol=1e-6, rtol=0)
    tilted = gaussians_of([[0.0, 0.0, 0.0]], [[1.0, 0.0, 0.0, 0.0]], [[0.4, 0.01, 0.4]], [0.99], [[0.5, 0.5, 0.5]])
    out = GaussianRenderer(backend="torch", normal_flip_x=False)(tilted, one_camera(16, 16, azimuth=45.0))
    # world +y seen from azimuth 45 deg: camera-space (cos 45, 0, sin 45), composited on the background
    alpha = out["alpha"][0, 0, 0, 8, 8]
    normal = torch.tensor([math.sqrt(0.5), 0.0, math.sqrt(0.5)], dtype=torch.float64)
    expected = (normal + 1) / 2 * alpha + (1 - alpha) * torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64)
    assert alpha > 0.9
    torch.testing.assert_close(out["normal"][0, 0, :, 8, 8], expected, atol=1e-9, rtol=0)


def test_sh_degree_one_colour_is_the_3dgs_formula():
    gaussians = random_gaussians(5, degree=1, dtype=torch.float64)
    camera = torch.tensor([[[2.0, -1.0, 0.5]]], dtype=torch.float64)
    d = F.normalize(gaussians.means[0] - camera[0], dim=-1)
    sh = gaussians.sh[0]
    expected = 0.5 + SH_C0 * sh[:, 0] + 0.4886025119029199 * (-d[:, 1:2] * sh[:, 1] + d[:, 2:3] * sh[:, 2] - d[:, 0:1] * sh[:, 3])
    torch.testing.assert_close(gaussians.colors(camera)[0, 0], expected.clamp_min(0))
    assert gaussians.sh_degree == 1 and gaussians.num_gaussians == 5 and gaussians.batch_size == 1


def test_gaussians_reject_inconsistent_shapes():
    g = random_gaussians(4)
    with pytest.raises(ValueError, match="scales must be"):
        Gaussians(g.means, g.quats, g.scales[:, :3], g.opacities, g.sh)
    with pytest.raises(ValueError, match="K = 9"):
        Gaussians(g.means, g.quats, g.scales, g.opacities, torch.zeros(1, 4, 9, 3))


def test_turning_the_gaussians_and_the_cameras_alike_changes_no_render():
    """`Gaussians.transformed`: centres, rotations and the degree-1 colour turn together."""
    from renderers.gaussians import quaternion_to_rotation

    gaussians = random_gaussians(40, degree=1, dtype=torch.float64)
    gaussians.sh[..., 1:, :] *= 3  # a strongly view-dependent colour
    turn = F.normalize(torch.tensor([0.3, -0.2, 0.8, 0.4], dtype=torch.float64), dim=0)
    cameras = evaluation_cameras(2, height=24, width=24)
    cameras.c2w = cameras.c2w.double()
    turned_cameras = evaluation_cameras(2, height=24, width=24)
    turned_cameras.c2w = cameras.c2w.clone()
    turned_cameras.c2w[..., :3, :] = quaternion_to_rotation(turn) @ cameras.c2w[..., :3, :]
    renderer = GaussianRenderer(backend="torch")
    before, after = renderer(gaussians, cameras), renderer(gaussians.transformed(turn), turned_cameras)
    assert before["alpha"].amax() > 0.5
    for name in ("rgb", "alpha", "depth", "normal"):
        torch.testing.assert_close(after[name], before[name], atol=1e-9, rtol=0)
    moved = gaussians.transformed(scale=2.0, offset=torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(moved.means, gaussians.means * 2 + torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(moved.scales, gaussians.scales * 2)


# ---------------------------------------------------------------------------------------------- PLY
@pytest.mark.parametrize("degree", [0, 1])
def test_ply_round_trip_renders_the_same(tmp_path, degree):
    from plyfile import PlyData

    gaussians = random_gaussians(200, degree=degree)
    path = tmp_path / "splat.ply"
    write_gaussian_ply(path, gaussians, frame="world")

    vertex = PlyData.read(str(path))["vertex"]
    rest = 3 * ((degree + 1) ** 2 - 1)
    expected_names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    expected_names += [f"f_rest_{i}" for i in range(rest)] + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert [p.name for p in vertex.properties] == expected_names
    assert all(p.val_dtype in ("f4", "float32") for p in vertex.properties)
    assert len(vertex.data) == 200
    i = 17
    np.testing.assert_allclose(vertex["opacity"][i], torch.logit(gaussians.opacities[0, i]).item(), rtol=1e-5)
    np.testing.assert_allclose(vertex["scale_1"][i], gaussians.scales[0, i, 1].log().item(), rtol=1e-5)
    assert vertex["nx"][i] == 0 and vertex["rot_0"][i] == pytest.approx(gaussians.quats[0, i, 0].item(), abs=1e-6)
    if degree == 1:  # channel-major: f_rest_{c * 3 + k} holds coefficient k + 1 of channel c
        for c in range(3):
            for k in range(3):
                assert vertex[f"f_rest_{c * 3 + k}"][i] == pytest.approx(gaussians.sh[0, i, k + 1, c].item(), abs=1e-7)

    loaded = read_gaussian_ply(path, frame="world")
    assert loaded.sh_degree == degree and loaded.num_gaussians == 200 and loaded.batch_size == 1
    # the default: a file in viewer axes (+y up, front +z) like the mesh exports, read back to the world frame
    write_gaussian_ply(tmp_path / "viewer.ply", gaussians)
    viewer = PlyData.read(str(tmp_path / "viewer.ply"))["vertex"]
    np.testing.assert_allclose(np.stack([viewer[c] for c in "xyz"], -1), gaussians.means[0][:, [1, 2, 0]].numpy(), atol=1e-7)
    cameras = evaluation_cameras(2, height=32, width=32)
    renderer = GaussianRenderer(backend="torch")
    before = renderer(gaussians, cameras)
    assert before["alpha"].amax() > 0.9
    for back in (loaded, read_gaussian_ply(tmp_path / "viewer.ply")):
        after = renderer(back, cameras)
        for name in before.images:
            assert (after[name] - before[name]).abs().max() <= 1e-5, name


def test_ply_writes_one_object_only(tmp_path):
    with pytest.raises(ValueError, match="select"):
        write_gaussian_ply(tmp_path / "two.ply", random_gaussians(3, batch=2))
    write_gaussian_ply(tmp_path / "one.ply", random_gaussians(3, batch=2).select(1))
    assert read_gaussian_ply(tmp_path / "one.ply").num_gaussians == 3


def test_bad_ply_files_give_one_line_errors(tmp_path):
    from plyfile import PlyData, PlyElement

    def error_of(path) -> str:
        with pytest.raises(GaussianPlyError) as info:
            read_gaussian_ply(path)
        assert isinstance(info.value, UserError)
        message = str(info.value)
        assert "\n" not in message
        return message

    assert "does not exist" in error_of(tmp_path / "missing.ply")
    (tmp_path / "text.ply").write_text("this is not a ply file\n")
    assert "not a readable PLY" in error_of(tmp_path / "text.ply")
    mesh = np.array([(0.0, 0.0, 0.0, 1.0)], dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("opacity", "f4")])
    PlyData([PlyElement.describe(mesh, "vertex")]).write(str(tmp_path / "points.ply"))
    message = error_of(tmp_path / "points.ply")
    assert "f_dc_0" in message and "rot_3" in message and "opacity" not in message.split("lacks")[1].split(":")[0]
    faces = np.array([([0, 1, 2],)], dtype=[("vertex_indices", "i4", (3,))])
    PlyData([PlyElement.describe(faces, "face")]).write(str(tmp_path / "faces.ply"))
    assert "no 'vertex' element" in error_of(tmp_path / "faces.ply")
    degree3 = np.zeros(2, dtype=[(name, "f4") for name in ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(45)]])
    PlyData([PlyElement.describe(degree3, "vertex")]).write(str(tmp_path / "degree3.ply"))
    assert "45 f_rest" in error_of(tmp_path / "degree3.ply")
    write_gaussian_ply(tmp_path / "good.ply", random_gaussians(3))
    assert is_gaussian_ply(tmp_path / "good.ply")
    assert not any(is_gaussian_ply(tmp_path / name) for name in ("points.ply", "text.ply", "degree3.ply", "missing.ply"))


# ---------------------------------------------------------------------------------------------- backends
def test_gsplat_backend_without_cuda_or_gsplat_is_a_one_line_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RasterizerBackendError, match="needs a CUDA GPU") as info:
        GaussianRenderer(backend="gsplat")
    assert "\n" not in str(info.value) and isinstance(info.value, UserError)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gaussian_renderer, "gsplat_available", lambda: False)
    with pytest.raises(RasterizerBackendError, match=r"not installed: pip install -e '\.\[gsplat\]'"):
        GaussianRenderer(backend="gsplat")
    with pytest.raises(RasterizerBackendError, match="needs CUDA tensors"):
        gaussian_renderer.resolve_gaussian_backend("gsplat", "cpu")
    with pytest.raises(RasterizerBackendError, match="unknown Gaussian renderer backend"):
        GaussianRenderer(backend="splatty")


def test_auto_backend_uses_torch_on_the_cpu():
    assert gaussian_renderer.resolve_gaussian_backend("auto", "cpu") == "torch"
    cameras = evaluation_cameras(2, height=24, width=24)
    gaussians = random_gaussians(20)
    auto, torch_ = GaussianRenderer(backend="auto")(gaussians, cameras), GaussianRenderer(backend="torch")(gaussians, cameras)
    for name in auto.images:
        torch.testing.assert_close(auto[name], torch_[name], atol=0, rtol=0)


def test_projection_is_gsplats_reference_projection():
    """Where gsplat is installed (`.[gsplat]`): centres, depths and conics equal those of gsplat's own
    pure-PyTorch reference projection (`gsplat.cuda._torch_impl`, runs on the CPU)."""
    reference = pytest.importorskip("gsplat.cuda._torch_impl")
    cameras = evaluation_cameras(4, height=48, width=40)
    gaussians = random_gaussians(300, dtype=torch.float64)
    viewmats, ks = opencv_viewmats(cameras).double(), intrinsics_matrix(cameras).double()
    ours = project_gaussians(gaussians.means, gaussians.covariances(), gaussians.opacities, viewmats, ks, 48, 40, 0.01, 1e10)
    radii, means2d, depths, conics, _ = reference._fully_fused_projection(
        gaussians.means, gaussians.covariances(), viewmats, ks, 40, 48, eps2d=0.3, near_plane=0.01, far_plane=1e10
    )
    both = (radii > 0).all(-1) & (ours.radii > 0).all(-1)
    assert both.sum() > 500
    torch.testing.assert_close(ours.means2d[both], means2d[both], atol=1e-10, rtol=0)
    torch.testing.assert_close(ours.depths[both], depths[both], atol=1e-12, rtol=0)
    torch.testing.assert_close(ours.conics[both], conics[both], atol=1e-12, rtol=1e-10)


@pytest.mark.gpu
def test_gsplat_and_torch_backends_agree_on_cuda():
    """On CUDA with gsplat: the two backends on the benchmark's scenes (random blobs; a sphere of flat,
    nearly opaque Gaussians), torch at gsplat's alpha clamp 0.999: mean |rgb difference| <= 1e-3."""
    if not torch.cuda.is_available() or not gaussian_renderer.gsplat_available():
        pytest.skip("needs CUDA and gsplat (pip install -e '.[gsplat]')")
    from benchmarks.gaussians_gpu import scene

    cameras = evaluation_cameras(4, height=256, width=256, device="cuda")
    for kind in ("blobs", "surface"):
        gaussians = scene(kind, 16384, torch.device("cuda"))
        with torch.no_grad():
            ours = GaussianRenderer(backend="torch", max_alpha=0.999)(gaussians, cameras)
            theirs = GaussianRenderer(backend="gsplat")(gaussians, cameras)
        assert theirs["alpha"].mean() > 0.1
        for name in ("rgb", "alpha", "normal", "disparity"):
            assert (ours[name] - theirs[name]).abs().mean() <= 1e-3, (kind, name)
