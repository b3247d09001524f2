import math

import pytest
import torch
import torch.nn.functional as F

from renderers.cameras import evaluation_cameras, pixel_rays
from renderers.mesh_renderer import MeshRenderer
from renderers.volume_renderer import NeuSVolumeRenderer
from tests.render_fields import SphereField, TinyTriplaneField
from tests.test_render_mesh import directional_check, disk_radius_px


def test_sphere_disk_depth_normal_and_disparity():
    cams = evaluation_cameras(1, distance=2.5, fovy=40.0, elevation=10.0, height=64, width=64)
    renderer = NeuSVolumeRenderer().eval()
    with torch.no_grad():
        out = renderer(SphereField(0.5), cams)
    for name, channels in (("rgb", 3), ("alpha", 1), ("normal", 3), ("depth", 1), ("disparity", 1)):
        assert out[name].shape == (1, 1, channels, 64, 64) and torch.isfinite(out[name]).all()
    assert out.renderer == "volume"
    measured = math.sqrt(out["alpha"][0, 0].sum().item() / math.pi)
    assert measured == pytest.approx(disk_radius_px(0.5, 2.5, 40.0, 64), abs=1.0)
    assert torch.allclose(out["depth"][0, 0, 0, 31:33, 31:33], torch.tensor(2.0), atol=0.01)
    assert torch.allclose(out["normal"][0, 0, :, 31:33, 31:33].mean((-1, -2)), torch.tensor([0.5, 0.5, 1.0]), atol=0.02)
    assert out["normal"][0, 0, 0, 32, 20] > 0.7  # x flipped as for the mesh renderer
    near, far = 2.5 - math.sqrt(3), 2.5 + math.sqrt(3)
    assert out["disparity"][0, 0, 0, 32, 32].item() == pytest.approx((far - 2.0) / (far - near), abs=0.005)
    # rays that miss keep the small residual opacity of the reference's NeuS alpha (+1e-5 terms)
    assert out["rgb"][0, 0, :, 0, 0].allclose(torch.ones(3), atol=5e-3) and out["disparity"][0, 0, 0, 0, 0] < 5e-3
    # regularisers: an exact SDF has |grad| = 1; sparsity is the reference's formula over the opacity image
    assert out.regularizers["eikonal"].item() < 1e-6
    assert out.regularizers["sparsity"].item() == pytest.approx(torch.sqrt(out["alpha"] ** 2 + 0.01).mean().item(), rel=1e-6)
    with torch.no_grad():
        doubled = NeuSVolumeRenderer(num_proposal_samples=16, num_importance_samples=8).eval()(SphereField(0.5, scale=2.0), evaluation_cameras(1, height=8, width=8))
    assert doubled.regularizers["eikonal"].item() == pytest.approx(1.0, abs=1e-4)  # (|2| - 1)^2


@pytest.fixture(scope="module")
def tiny_field64():
    return TinyTriplaneField(resolution=8, sdf_scale=0.2, dtype=torch.float64)


@pytest.mark.parametrize("planes", ["texture_planes", "geometry_planes"])
def test_volume_path_finite_difference_gradients(tiny_field64, planes):
    renderer = NeuSVolumeRenderer(num_proposal_samples=32, num_importance_samples=16).eval()
    origins, directions = pixel_rays(evaluation_cameras(1, distance=2.2, elevation=10.0, height=8, width=8))
    origins, directions = origins.reshape(1, -1, 3).double(), directions.reshape(1, -1, 3).double()
    edges = renderer.sample_intervals(tiny_field64, origins, directions)  # samples are constants, as in the reference
    g = torch.Generator().manual_seed(3)
    weights = {k: torch.rand(1, origins.shape[1], c, generator=g, dtype=torch.float64) for k, c in (("rgb_fg", 3), ("opacity", 1), ("depth", 1), ("normal", 3))}

    def loss():
        out = renderer.render_rays(tiny_field64, origins, directions, edges)
        return sum((out[k] * w).sum() for k, w in weights.items()) + 5 * out["eikonal"]

    autograd, finite = directional_check(loss, getattr(tiny_field64, planes))
    assert autograd == pytest.approx(finite, rel=1e-5) and abs(finite) > 1e-3


def test_training_pass_is_low_res_global_plus_full_res_patch():
    field = SphereField(0.6)
    cams = evaluation_cameras(2, distance=2.5, height=30, width=30)
    renderer = NeuSVolumeRenderer(num_proposal_samples=32, num_importance_samples=16, global_downsample=3, patch_size=12, stratified=False, generator=torch.Generator().manual_seed(0))
    train = renderer.train()(field, cams)
    full = NeuSVolumeRenderer(num_proposal_samples=32, num_importance_samples=16).eval()(field, cams)
    low = NeuSVolumeRenderer(num_proposal_samples=32, num_importance_samples=16).eval()(field, evaluation_cameras(2, distance=2.5, height=10, width=10))
    assert train["rgb"].shape == (1, 2, 3, 30, 30)
    upsampled = F.interpolate(low["alpha"][0], size=(30, 30), mode="bilinear", align_corners=False)
    top, left, size = renderer.last_patch
    assert size == 12
    assert torch.allclose(train["alpha"][0, :, :, top : top + 12, left : left + 12], full["alpha"][0, :, :, top : top + 12, left : left + 12], atol=1e-5)
    outside = torch.ones(30, 30, dtype=torch.bool)
    outside[top : top + 12, left : left + 12] = False
    assert torch.allclose(train["alpha"][0][..., outside], upsampled[..., outside], atol=1e-5)
    assert set(train.regularizers) == {"eikonal", "sparsity"}


def test_rgb_gradient_shrink_and_gradients_reaching_the_triplanes(tiny_field64):
    cams = evaluation_cameras(1, distance=2.2, height=8, width=8)
    grads = {}
    for factor in (1.0, 0.01):
        tiny_field64.zero_grad()
        renderer = NeuSVolumeRenderer(num_proposal_samples=16, num_importance_samples=8, rgb_grad_shrink=factor).eval()
        out = renderer(tiny_field64, cams)
        (out["rgb"].sum() + out["normal"].sum() + out.regularizers["eikonal"] + out.regularizers["sparsity"]).backward()
        grads[factor] = (tiny_field64.texture_planes.grad.clone(), tiny_field64.geometry_planes.grad.clone())
    assert grads[1.0][0].abs().sum() > 0 and grads[1.0][1].abs().sum() > 0
    assert torch.allclose(grads[0.01][0], 0.01 * grads[1.0][0], rtol=1e-6, atol=1e-12)


def test_no_grad_rendering_and_ray_chunks_give_the_same_images():
    field = TinyTriplaneField(resolution=8, seed=2)
    cams = evaluation_cameras(1, height=12, width=12)
    renderer = NeuSVolumeRenderer(num_proposal_samples=32, num_importance_samples=16).eval()
    with_grad = renderer(field, cams)
    with torch.no_grad():
        chunked = NeuSVolumeRenderer(num_proposal_samples=32, num_importance_samples=16, ray_chunk=7).eval()(field, cams)
    for name in ("rgb", "alpha", "normal", "depth", "disparity"):
        assert torch.allclose(with_grad[name], chunked[name], atol=1e-4), name
    assert not chunked["rgb"].requires_grad


def test_mesh_and_volume_masks_agree():
    field = TinyTriplaneField(resolution=16, seed=0)
    cams = evaluation_cameras(2, distance=2.5, elevation=15.0, height=32, width=32)
    with torch.no_grad():
        mesh = MeshRenderer(resolution=64)(field, cams)
        volume = NeuSVolumeRenderer().eval()(field, cams)
    a, b = mesh["alpha"] > 0.5, volume["alpha"] > 0.5
    iou = ((a & b).sum() / (a | b).sum()).item()
    print(f"mesh vs volume mask IoU {iou:.4f}")
    assert iou >= 0.95 and a.float().mean() > 0.1


def test_four_views_at_64px_of_a_tiny_field_train_step():
    """A training step's renders and regularisers reach the planes (its time is a benchmark figure:
    benchmarks/bench_renderers.py)."""
    field = TinyTriplaneField(resolution=16, seed=1)
    cams = evaluation_cameras(4, height=64, width=64)
    renderer = NeuSVolumeRenderer().train()
    out = renderer(field, cams)
    (out["rgb"].mean() + out.regularizers["eikonal"] + out.regularizers["sparsity"]).backward()
    assert out["rgb"].shape == (1, 4, 3, 64, 64)
    assert field.geometry_planes.grad.abs().sum() > 0
