import logging
import math

import pytest
import torch
from PIL import Image

import renderers.rasterizers as rasterizers
from renderers.backgrounds import RandomColorBackground, TextConditionedBackground
from renderers.cameras import cameras_from_spherical, evaluation_cameras, mvp_matrix
from renderers.marching_cubes import TriangleMesh
from renderers.mesh_renderer import MeshRenderer, render_mesh
from renderers.rasterizers import RasterizerBackendError, TorchRasterizer, resolve_backend
from renderers.turntable import render_turntable, save_turntable
from tests.render_fields import SphereField, TinyTriplaneField


def disk_radius_px(radius: float, distance: float, fovy_deg: float, height: int) -> float:
    focal = 0.5 * height / math.tan(math.radians(fovy_deg) / 2)
    return focal * math.tan(math.asin(radius / distance))


def directional_check(loss, tensor: torch.Tensor, seed: int = 0, eps: float = 1e-6) -> tuple[float, float]:
    """(autograd, central finite difference) of `loss` along a random direction of `tensor`."""
    direction = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed), dtype=tensor.dtype)
    tensor.grad = None
    loss().backward()
    autograd = (tensor.grad * direction).sum().item()
    with torch.no_grad():
        tensor.add_(eps * direction)
        plus = loss().item()
        tensor.sub_(2 * eps * direction)
        minus = loss().item()
        tensor.add_(eps * direction)
    return autograd, (plus - minus) / (2 * eps)


def square_mesh(half: float, dtype=torch.float64) -> TriangleMesh:
    """A square in the plane x = 0 (facing +x), two triangles."""
    v = torch.tensor([[0, -half, -half], [0, half, -half], [0, half, half], [0, -half, half]], dtype=dtype)
    return TriangleMesh(v, torch.tensor([[0, 1, 2], [0, 2, 3]]))


def test_sphere_disk_depth_normal_and_disparity():
    cams = evaluation_cameras(2, distance=2.5, fovy=40.0, elevation=10.0, height=64, width=64)
    out = MeshRenderer(resolution=64)(SphereField(0.5), cams)
    for name, channels in (("rgb", 3), ("alpha", 1), ("normal", 3), ("depth", 1), ("disparity", 1)):
        assert out[name].shape == (1, 2, channels, 64, 64) and torch.isfinite(out[name]).all()
    assert out.renderer == "mesh" and out.cameras is cams
    measured = math.sqrt(out["alpha"][0, 0].sum().item() / math.pi)
    assert measured == pytest.approx(disk_radius_px(0.5, 2.5, 40.0, 64), abs=1.0)
    centre = (slice(31, 33), slice(31, 33))
    assert torch.allclose(out["depth"][0, :, 0][(slice(None), *centre)], torch.tensor(2.0), atol=0.01)
    assert torch.allclose(out["normal"][0, :, :, 31:33, 31:33].mean((-1, -2)), torch.tensor([0.5, 0.5, 1.0]), atol=0.02)
    # left of the centre the normal points to camera -x, flipped (RichDreamer) to +x: red > 0.5
    assert out["normal"][0, 0, 0, 32, 20] > 0.7 and out["normal"][0, 0, 1, 20, 32] > 0.7
    assert torch.equal(out["depth"][0, 0, 0, 0, 0], torch.tensor(0.0)) and out["rgb"][0, 0, :, 0, 0].eq(1.0).all()
    near, far = 2.5 - math.sqrt(3), 2.5 + math.sqrt(3)
    clip_z = 2.0 * (1000.1 / 999.9) - 200 / 999.9  # the reference's interpolated clip-space z
    assert out["disparity"][0, 0, 0, 32, 32].item() == pytest.approx((far - clip_z) / (far - near), abs=0.005)
    view = MeshRenderer(resolution=64, disparity_depth="view_z")(SphereField(0.5), cams)
    assert view["disparity"][0, 0, 0, 32, 32].item() == pytest.approx((far - 2.0) / (far - near), abs=0.005)


def test_torch_rasterizer_matches_brute_force_and_chunking():
    g = torch.Generator().manual_seed(0)
    clip = torch.cat([torch.rand(1, 30, 2, generator=g) * 2.4 - 1.2, torch.rand(1, 30, 1, generator=g) * 1.6 - 0.8, torch.ones(1, 30, 1)], -1)
    clip = clip * (1 + torch.rand(1, 30, 1, generator=g))  # w in [1, 2]: perspective division matters
    faces = torch.randint(0, 30, (12, 3), generator=g)
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    height, width = 20, 24
    fragments = TorchRasterizer().rasterize(clip, faces, height, width)
    ndc = clip[0, :, :3] / clip[0, :, 3:]
    expected = torch.full((height, width), -1)
    for row in range(height):
        for col in range(width):
            p = torch.tensor([(2 * col + 1) / width - 1, (2 * row + 1) / height - 1])
            best = float("inf")
            for f, (a, b, c) in enumerate(faces.tolist()):
                m = torch.stack([ndc[b, :2] - ndc[a, :2], ndc[c, :2] - ndc[a, :2]], 1)
                if abs(torch.linalg.det(m)) < 1e-9:
                    continue
                u, v = torch.linalg.solve(m, p - ndc[a, :2]).tolist()
                if u >= 0 and v >= 0 and u + v <= 1:
                    z = ndc[a, 2] + u * (ndc[b, 2] - ndc[a, 2]) + v * (ndc[c, 2] - ndc[a, 2])
                    if z < best:
                        best, expected[row, col] = z, f
    assert (fragments.face_index[0] >= 0).sum() > 100
    assert torch.equal(fragments.face_index[0], expected)
    chunked = TorchRasterizer(max_fragments=7).rasterize(clip, faces, height, width)
    assert torch.equal(chunked.face_index, fragments.face_index)


def test_interpolation_is_perspective_correct():
    # a plane tilted away from the camera: depth per pixel must equal the ray-plane intersection
    cams = evaluation_cameras(1, elevation=0.0, distance=3.0, fovy=50.0, height=32, width=32)  # camera on +x
    v = torch.tensor([[0.6, -0.8, -0.8], [-0.6, 0.8, -0.8], [-0.6, 0.8, 0.8], [0.6, -0.8, 0.8]], dtype=torch.float64)
    mesh = TriangleMesh(v, torch.tensor([[0, 1, 2], [0, 2, 3]]))
    out = MeshRenderer(antialias=False).render_meshes([mesh], [torch.zeros(4, 3, dtype=torch.float64)], cams)
    from renderers.cameras import pixel_ray_directions

    dirs = pixel_ray_directions(cams)[0, 0].double()
    origin = torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
    normal = torch.tensor([0.8, 0.6, 0.0], dtype=torch.float64)  # plane 0.8 x + 0.6 y = 0
    t = -(origin @ normal) / (dirs @ normal)
    view_depth = t * (-dirs[..., 0])  # the camera looks along -x
    mask = out["alpha"][0, 0, 0] > 0
    assert mask.sum() > 100
    assert torch.allclose(out["depth"][0, 0, 0][mask], view_depth[mask], atol=1e-9)


@pytest.mark.parametrize("angle", [0.0, 20.0])
def test_antialiased_coverage_and_its_gradient(angle):
    cams = evaluation_cameras(1, elevation=0.0, distance=3.0, fovy=40.0, height=32, width=32)
    scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    rot = math.radians(angle)
    rotation = torch.tensor([[1, 0, 0], [0, math.cos(rot), -math.sin(rot)], [0, math.sin(rot), math.cos(rot)]], dtype=torch.float64)
    base = square_mesh(0.37)

    def coverage(aa=True):
        mesh = TriangleMesh(base.vertices @ rotation.T * scale, base.faces)
        out = MeshRenderer(antialias=aa).render_meshes([mesh], [torch.zeros(4, 3, dtype=torch.float64)], cams)
        return out["alpha"].sum()

    focal = 16 / math.tan(math.radians(20))
    true_area = (2 * 0.37 * focal / 3.0) ** 2
    assert abs(coverage().item() - true_area) < 0.5 * abs(coverage(False).item() - true_area) + 1.0
    autograd, finite = directional_check(coverage, scale)
    assert autograd == pytest.approx(finite, rel=1e-5)
    # the silhouette gradient approximates d area / d scale = 2 area (exact only for an exact coverage)
    assert scale.grad.item() == pytest.approx(2 * true_area, rel=0.2)


def test_render_mesh_api_with_vertex_colours():
    # a cube with one colour per face (separate vertices per face)
    faces_v, faces_i, colors = [], [], []
    palette = torch.rand(6, 3, generator=torch.Generator().manual_seed(0))
    for axis in range(3):
        for k, sign in enumerate((1.0, -1.0)):
            u, w = [a for a in range(3) if a != axis]
            quad = []
            for du, dw in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
                p = [0.0, 0.0, 0.0]
                p[axis], p[u], p[w] = 0.5 * sign, 0.5 * du, 0.5 * dw
                quad.append(p)
            base = len(faces_v)
            faces_v += quad
            faces_i += [[base, base + 1, base + 2], [base, base + 2, base + 3]]
            colors += [palette[2 * axis + k].tolist()] * 4
    vertices, faces, colors = torch.tensor(faces_v), torch.tensor(faces_i), torch.tensor(colors)
    cams = cameras_from_spherical(torch.zeros(1, 2), torch.tensor([[0.0, 90.0]]), torch.full((1, 2), 3.0), torch.full((1, 2), 40.0), 32, 32)
    out = render_mesh(vertices, faces, colors, cams, background=(0.0, 0.0, 0.0))
    assert out["rgb"].shape == (1, 2, 3, 32, 32)
    assert torch.allclose(out["rgb"][0, 0, :, 16, 16], palette[0], atol=1e-5)  # +x face seen from azimuth 0
    assert torch.allclose(out["rgb"][0, 1, :, 16, 16], palette[2], atol=1e-5)  # +y face seen from azimuth 90
    assert out["rgb"][0, 0, :, 0, 0].eq(0).all()
    half_px = 16 / math.tan(math.radians(20)) * 0.5 / 2.5  # front face at distance 2.5
    assert out["alpha"][0, 0].sum().item() == pytest.approx((2 * half_px) ** 2, rel=0.05)
    with pytest.raises(ValueError, match="per-vertex colours"):
        render_mesh(vertices, faces, colors[:5], cams)
    empty = render_mesh(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3), cams)
    assert empty["alpha"].eq(0).all() and empty["rgb"].eq(1).all()


def test_backend_selection_messages(monkeypatch, caplog):
    rasterizers._NOTICES_GIVEN.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="renderers.rasterizers"):
        assert resolve_backend("auto", "cpu") == "torch"
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and "pure-PyTorch" in notices[0] and "\n" not in notices[0]
    with pytest.raises(RasterizerBackendError, match="needs a CUDA GPU") as info:
        resolve_backend("nvdiffrast", "cpu")
    assert "\n" not in str(info.value)
    with pytest.raises(RasterizerBackendError, match="CUDA"):
        MeshRenderer(backend="nvdiffrast")
    with pytest.raises(RasterizerBackendError, match="unknown rasteriser backend"):
        resolve_backend("opengl")
    # CUDA present but nvdiffrast missing: the PyTorch backend, with its own notice
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(rasterizers, "nvdiffrast_available", lambda: False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="renderers.rasterizers"):
        assert resolve_backend("auto", "cuda") == "torch"
    assert any("nvdiffrast is not installed" in r.getMessage() for r in caplog.records)
    with pytest.raises(RasterizerBackendError, match="not installed"):
        resolve_backend("nvdiffrast", "cuda")
    with pytest.raises(RasterizerBackendError, match="CUDA tensors"):
        resolve_backend("nvdiffrast", "cpu")
    monkeypatch.setattr(rasterizers, "nvdiffrast_available", lambda: True)
    assert resolve_backend("auto", "cuda") == "nvdiffrast"
    assert resolve_backend("torch", "cuda") == "torch"


@pytest.fixture(scope="module")
def tiny_field64():
    return TinyTriplaneField(resolution=8, sdf_scale=0.2, dtype=torch.float64)


def mesh_loss(renderer, field, cams, names=("rgb", "alpha", "normal", "depth", "disparity")):
    g = torch.Generator().manual_seed(5)
    out = renderer(field, cams)
    return sum((out[n] * torch.rand(out[n].shape, generator=g, dtype=out[n].dtype)).sum() for n in names)


@pytest.mark.parametrize("planes", ["texture_planes", "geometry_planes"])
def test_mesh_path_finite_difference_gradients(tiny_field64, planes):
    cams = evaluation_cameras(2, distance=2.2, elevation=10.0, height=24, width=24)
    renderer = MeshRenderer(resolution=20, sdf_grad_shrink=1.0, deformation_grad_shrink=1.0)
    tensor = getattr(tiny_field64, planes)
    autograd, finite = directional_check(lambda: mesh_loss(renderer, tiny_field64, cams), tensor)
    assert autograd == pytest.approx(finite, rel=1e-5) and abs(finite) > 1e-3
    if planes == "geometry_planes":  # silhouettes alone (anti-aliased coverage) carry geometry gradient too
        autograd, finite = directional_check(lambda: mesh_loss(renderer, tiny_field64, cams, ("alpha",)), tensor, seed=1)
        assert autograd == pytest.approx(finite, rel=1e-5) and abs(finite) > 1e-4


def test_mesh_path_gradient_shrink_and_reaching_the_triplanes(tiny_field64):
    cams = evaluation_cameras(2, distance=2.2, height=16, width=16)
    grads = {}
    for factor in (1.0, 0.001):
        tiny_field64.zero_grad()
        mesh_loss(MeshRenderer(resolution=16, sdf_grad_shrink=factor, deformation_grad_shrink=factor), tiny_field64, cams).backward()
        grads[factor] = (tiny_field64.geometry_planes.grad.clone(), tiny_field64.texture_planes.grad.clone())
    assert grads[1.0][0].abs().sum() > 0 and grads[1.0][1].abs().sum() > 0
    assert torch.allclose(grads[0.001][0], 0.001 * grads[1.0][0], rtol=1e-6, atol=1e-12)
    assert torch.equal(grads[0.001][1], grads[1.0][1])  # colour keeps its full gradient


def test_four_views_at_64px_of_two_tiny_fields_are_batched():
    """(Its time is a benchmark figure: benchmarks/bench_renderers.py.)"""
    field = TinyTriplaneField(batch_size=2, resolution=16, seed=1)
    cams = evaluation_cameras(4, batch_size=2, height=64, width=64)
    out = MeshRenderer(resolution=64)(field, cams)
    out["rgb"].mean().backward()
    assert out["rgb"].shape == (2, 4, 3, 64, 64)
    assert not torch.allclose(out["alpha"][0], out["alpha"][1])  # each object drawn from its own field
    assert field.texture_planes.grad.abs().sum() > 0


def test_backgrounds():
    cams = evaluation_cameras(2, batch_size=2, height=16, width=16)
    background = TextConditionedBackground(text_dim=8)
    renderer = MeshRenderer(resolution=16, background=background)
    out = renderer(SphereField([0.4, 0.4]), cams, text_embedding=torch.randn(2, 5, 8))
    out["rgb"][:, :, :, 0, 0].sum().backward()
    assert background.hypernetwork[0].weight.grad.abs().sum() > 0
    corner = out["rgb"][:, :, :, 0, 0]
    assert not torch.allclose(corner[0], corner[1])  # prompt-dependent
    renderer.eval()
    assert renderer(SphereField([0.4, 0.4]), cams)["rgb"][:, :, :, 0, 0].eq(1.0).all()  # white at evaluation
    random_bg = RandomColorBackground(generator=torch.Generator().manual_seed(0))
    colors = random_bg(torch.zeros(2, 3, 4, 4, 3))
    assert torch.equal(colors[0, 0], colors[0, 2]) and not torch.equal(colors[0, 0], colors[1, 0])


def test_empty_field_renders_the_fallback():
    cams = evaluation_cameras(1, height=16, width=16)
    out = MeshRenderer(resolution=16)(SphereField(-0.5), cams)  # no zero crossing: the SDF is positive everywhere
    assert torch.isfinite(out["rgb"]).all() and 0 < out["alpha"].sum() < 16 * 16 * 0.2
    detached = MeshRenderer(resolution=16, detach_empty=True)(SphereField(-0.5), cams)
    assert not detached["rgb"].requires_grad


def test_turntable_frames_and_gif(tmp_path):
    renderer = MeshRenderer(resolution=24)
    frames = render_turntable(renderer, SphereField(0.5), num_frames=5, height=24, width=24, frames_per_call=2)
    assert frames.shape == (5, 3, 24, 24)
    paths = save_turntable(frames, tmp_path, name="sphere")
    assert [p.name for p in paths][-1] == "sphere.gif" and len(paths) == 6
    with Image.open(paths[-1]) as gif:
        assert gif.n_frames == 5 and gif.size == (24, 24)
    assert Image.open(paths[0]).size == (24, 24)
    mesh = renderer.marching_cubes(SphereField(0.5))[0].detach()
    mesh_frames = render_turntable(renderer, mesh, colors=torch.full((mesh.num_vertices, 3), 0.2), num_frames=2, height=24, width=24)
    assert mesh_frames[:, :, 12, 12].allclose(torch.tensor(0.2))
    assert renderer.training  # mode restored


def test_mvp_and_renderer_agree_on_pixel_centres():
    # a tiny triangle around one pixel centre covers exactly that pixel
    cams = evaluation_cameras(1, elevation=0.0, distance=2.0, fovy=60.0, height=16, width=16)
    mvp = mvp_matrix(cams)[0, 0]
    target_row, target_col = 3, 11
    ndc = torch.tensor([(2 * target_col + 1) / 16 - 1, (2 * target_row + 1) / 16 - 1])
    inv = torch.linalg.inv(mvp)
    corners = []
    for dx, dy in ((-0.02, -0.02), (0.03, -0.02), (0.0, 0.03)):
        world = inv @ torch.tensor([ndc[0] + dx, ndc[1] + dy, 0.5, 1.0])
        corners.append((world[:3] / world[3]).tolist())
    mesh = TriangleMesh(torch.tensor(corners), torch.tensor([[0, 1, 2]]))
    out = MeshRenderer(antialias=False).render_meshes([mesh], [torch.zeros(3, 3)], cams)
    covered = torch.nonzero(out["alpha"][0, 0, 0])
    assert covered.tolist() == [[target_row, target_col]]


def test_renderers_are_configurable_by_class_path():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--mesh", type=torch.nn.Module)
    parser.add_argument("--volume", type=torch.nn.Module)
    config = parser.parse_string(
        """
mesh:
  class_path: renderers.MeshRenderer
  init_args: {resolution: 24, sdf_grad_shrink: 0.01, background: {class_path: renderers.RandomColorBackground, init_args: {per_view: true}}}
volume:
  class_path: renderers.NeuSVolumeRenderer
  init_args: {patch_size: 20, num_importance_samples: 32, background: [0.5, 0.5, 0.5]}
"""
    )
    built = parser.instantiate(config) if hasattr(parser, "instantiate") else parser.instantiate_classes(config)
    assert isinstance(built.mesh, MeshRenderer) and built.mesh.marching_cubes.resolution == 24
    assert built.mesh.sdf_grad_shrink == 0.01 and isinstance(built.mesh.background, RandomColorBackground)
    assert built.volume.patch_size == 20 and torch.equal(built.volume.background.color, torch.tensor([0.5, 0.5, 0.5]))
