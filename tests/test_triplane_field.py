"""TriplaneField: channel split, plane rotation, bilinear lookup, MLP heads, sphere prior, analytic normals."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.student.triplane_field import (
    FieldConfig,
    TriplaneField,
    VanillaMLP,
    color_activation,
    rotate_planes,
    sample_planes,
    split_channels,
)
from renderers.types import Field


def _field(planes: torch.Tensor, config: FieldConfig | None = None, seed: int = 0) -> TriplaneField:
    torch.manual_seed(seed)
    config = config or FieldConfig()
    c = planes.shape[2]
    geo = 3 * c if config.geo_interpolate == "v2" else c
    tex = 3 * c if config.tex_interpolate == "v2" else c
    return TriplaneField(
        planes, VanillaMLP(geo, 1, 8, 2), VanillaMLP(tex, 3, 8, 2), VanillaMLP(geo, 3, 8, 2), config
    )


def test_split_channels_keeps_geometry_first_half_and_texture_second_half():
    raw = torch.randn(2, 6, 6, 5, 5)
    cache = split_channels(raw, "v1")
    assert cache.shape == (2, 6, 3, 5, 5)
    assert torch.equal(cache[:, :3], raw[:, :3, :3])
    assert torch.equal(cache[:, 3:], raw[:, 3:, 3:])
    assert split_channels(raw, None) is raw


def test_rotation_matches_the_reference_index_formulas():
    n = 5
    s = torch.randn(2, 6, 3, n, n)
    r = rotate_planes(s, "v1")
    for h in range(n):
        for w in range(n):
            for p in (0, 3):  # xy: transpose
                assert torch.equal(r[:, p, :, h, w], s[:, p, :, w, h])
            for p in (1, 4):  # xz: 180 degrees
                assert torch.equal(r[:, p, :, h, w], s[:, p, :, n - 1 - h, n - 1 - w])
            for p in (2, 5):  # yz: 90 degrees clockwise
                assert torch.equal(r[:, p, :, h, w], s[:, p, :, n - 1 - w, h])
    r2 = rotate_planes(s, "v2")  # v2 differs only on xy: column flip
    assert torch.equal(r2[:, 0], s[:, 0].flip(-1))
    assert torch.equal(r2[:, 1:3], r[:, 1:3]) and torch.equal(r2[:, 4:], r[:, 4:])


def test_bilinear_lookup_pixel_centres_zero_padding_and_axes():
    n = 4
    planes = torch.zeros(1, 3, 1, n, n)
    planes[0, 0, 0] = torch.arange(n * n, dtype=torch.float32).view(n, n)  # xy plane, value = 4 row + col
    centre = lambda i: (2 * i + 1) / n - 1  # noqa: E731
    # xy plane reads (u, v) = (x, y): x picks the column, y the row
    pts = torch.tensor([[[centre(2), centre(1), 0.3]]])
    assert sample_planes(planes, pts, "v2")[0, 0, 0].item() == pytest.approx(4 * 1 + 2)
    # halfway between two columns: the mean
    pts = torch.tensor([[[(centre(0) + centre(1)) / 2, centre(3), 0.0]]])
    assert sample_planes(planes, pts, "v2")[0, 0, 0].item() == pytest.approx(12.5)
    # at u = +1 the edge pixel gets half weight (outside neighbour is zero)
    pts = torch.tensor([[[1.0, centre(0), 0.0]]])
    assert sample_planes(planes, pts, "v2")[0, 0, 0].item() == pytest.approx(3 / 2)
    # xz reads (x, z), yz reads (z, y)
    ramp = torch.linspace(-1, 1, n).view(1, n).expand(n, n)  # varies along columns
    planes = torch.stack([torch.zeros(n, n), ramp, ramp]).view(1, 3, 1, n, n)
    pts = torch.tensor([[[centre(0), centre(1), centre(3)]]])
    feats = sample_planes(planes, pts, "v2")[0, 0]
    assert feats[1].item() == pytest.approx(ramp[0, 0].item())  # xz: column from x
    assert feats[2].item() == pytest.approx(ramp[0, 3].item())  # yz: column from z


def test_sum_and_concatenation_modes():
    planes = torch.randn(2, 3, 4, 6, 6)
    pts = torch.rand(2, 10, 3) * 2 - 1
    cat = sample_planes(planes, pts, "v2")
    summed = sample_planes(planes, pts, "v1")
    assert cat.shape == (2, 10, 12) and summed.shape == (2, 10, 4)
    torch.testing.assert_close(summed, cat.view(2, 10, 3, 4).sum(2))


def test_heads_shapes_protocol_prior_and_colour():
    field = _field(torch.randn(2, 6, 4, 8, 8))
    assert isinstance(field, Field)
    pts = torch.rand(2, 30, 3) * 2 - 1
    sdf, deform, rgb = field.sdf(pts), field.deformation(pts), field.color(pts)
    assert sdf.shape == (2, 30) and deform.shape == (2, 30, 3) and rgb.shape == (2, 30, 3)
    torch.testing.assert_close(sdf, field.sdf_raw(pts) + pts.norm(dim=-1) - 0.5)
    torch.testing.assert_close(rgb, torch.sigmoid(field.features(pts)) * 1.002 - 0.001)
    sdf2, deform2 = field.sdf_and_deformation(pts)
    torch.testing.assert_close(sdf2, sdf)
    torch.testing.assert_close(deform2, deform)
    # the same points for every object may be given as [N, 3]
    torch.testing.assert_close(field.sdf(pts[0]), field.sdf(pts[0].expand(2, -1, -1)))
    with pytest.raises(ValueError, match="points"):
        field.sdf(torch.rand(3, 30, 3))
    # planes of zeros: the MLPs see zeros, so sdf is exactly the sphere prior
    zero = _field(torch.zeros(1, 6, 4, 8, 8))
    torch.testing.assert_close(zero.sdf(pts[:1]), pts[:1].norm(dim=-1) - 0.5)
    assert color_activation(torch.tensor([-1e4, 1e4])).tolist() == pytest.approx([-0.001, 1.001])


def test_analytic_normals_match_finite_differences_and_support_second_order():
    # float64 and a tiny step: the field is piecewise smooth (bilinear cells, ReLU), so a finite difference
    # is exact up to rounding unless it straddles a kink, which a 1e-7 step almost never does
    planes = torch.randn(1, 6, 4, 16, 16, dtype=torch.float64, requires_grad=True)
    field = _field(planes)
    for net in (field.sdf_network, field.feature_network, field.deformation_network):
        net.double()
    pts = torch.rand(1, 20, 3, dtype=torch.float64) * 1.2 - 0.6
    _, grad = field.sdf_and_gradient(pts)
    eps = 1e-7
    fd = torch.stack(
        [
            (field.sdf(pts + eps * e) - field.sdf(pts - eps * e)) / (2 * eps)
            for e in torch.eye(3, dtype=torch.float64)
        ],
        dim=-1,
    ).detach()
    torch.testing.assert_close(grad, fd, atol=1e-5, rtol=1e-5)
    normal = field.normal(pts)
    torch.testing.assert_close(normal.norm(dim=-1), torch.ones(1, 20, dtype=torch.float64))
    # eikonal-style loss: gradient of the gradient reaches the planes
    _, grad = field.sdf_and_gradient(pts, create_graph=True)
    ((grad.norm(dim=-1) - 1) ** 2).mean().backward()
    assert planes.grad is not None and planes.grad.abs().sum() > 0


def test_radius_scales_lookup_but_not_the_prior():
    planes = torch.randn(1, 6, 4, 8, 8)
    unit = _field(planes, FieldConfig(radius=1.0))
    big = _field(planes, FieldConfig(radius=2.0))
    pts = torch.rand(1, 10, 3) * 2 - 1
    torch.testing.assert_close(big.sdf_raw(2 * pts), unit.sdf_raw(pts))
    torch.testing.assert_close(big.sdf(2 * pts) - big.sdf_raw(2 * pts), (2 * pts).norm(dim=-1) - 0.5)


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="rotate_planes"):
        FieldConfig(rotate_planes="v9")
    with pytest.raises(ValueError, match="tex_interpolate"):
        FieldConfig(tex_interpolate="v3")
    with pytest.raises(ValueError, match="planes"):
        TriplaneField(torch.zeros(1, 3, 4, 8, 8), VanillaMLP(4, 1), VanillaMLP(12, 3))


def test_bilinear_sample_equals_grid_sample_and_is_twice_differentiable():
    from lightning_modules.student.triplane_field import bilinear_sample

    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 2, 5, 7, generator=g, dtype=torch.float64)
    grid = (torch.rand(3, 40, 2, generator=g, dtype=torch.float64) * 2.4 - 1.2)  # also outside [-1, 1]
    expected = torch.nn.functional.grid_sample(images, grid[:, None], "bilinear", "zeros", align_corners=False)[:, :, 0]
    torch.testing.assert_close(bilinear_sample(images, grid), expected, atol=1e-12, rtol=0)
    images.requires_grad_(True)
    grid.requires_grad_(True)
    assert torch.autograd.gradcheck(bilinear_sample, (images, grid))
    assert torch.autograd.gradgradcheck(bilinear_sample, (images, grid))


def test_sdf_gradient_has_a_gradient_wrt_the_planes():
    """The eikonal loss needs d/dplanes of d sdf / d points (double backward through the sampler)."""
    from lightning_modules.student.triplane_field import TriplaneField, VanillaMLP

    g = torch.Generator().manual_seed(1)
    planes = torch.randn(1, 6, 4, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    mlp = lambda d_in, d_out: VanillaMLP(d_in, d_out, n_neurons=8, n_hidden_layers=1).double()  # noqa: E731
    torch.manual_seed(0)
    field = TriplaneField(planes, mlp(4, 1), mlp(12, 3), mlp(4, 3))
    points = torch.rand(1, 30, 3, generator=g, dtype=torch.float64) * 1.8 - 0.9

    def eikonal(p):
        _, grad = TriplaneField(p, field.sdf_network, field.feature_network, field.deformation_network
                                ).sdf_and_gradient(points, create_graph=True)
        return ((grad.norm(dim=-1) - 1) ** 2).mean()

    (analytic,) = torch.autograd.grad(eikonal(planes), planes)
    direction = torch.randn(planes.shape, generator=g, dtype=torch.float64)
    eps = 1e-6
    with torch.no_grad():
        numeric = (eikonal(planes + eps * direction) - eikonal(planes - eps * direction)) / (2 * eps)
    assert analytic.abs().sum() > 0
    torch.testing.assert_close((analytic * direction).sum(), numeric, rtol=1e-6, atol=1e-9)


def test_points_requiring_grad_avoid_grid_sample(monkeypatch):
    """CUDA's grid_sample has no double backward: when the caller may differentiate w.r.t. the points
    (normals, eikonal), the gather-based sampler must be used (checked here by forbidding grid_sample)."""
    from lightning_modules.student import triplane_field

    g = torch.Generator().manual_seed(0)
    planes = torch.randn(1, 3, 2, 6, 6, generator=g)
    points = torch.rand(1, 10, 3, generator=g) * 2 - 1
    fast = triplane_field.sample_planes(planes, points, "v1")

    def forbidden(*args, **kwargs):
        raise AssertionError("grid_sample used for points that require grad")

    monkeypatch.setattr(triplane_field.F, "grid_sample", forbidden)
    twice = triplane_field.sample_planes(planes, points.clone().requires_grad_(True), "v1")
    # two float32 bilinear formulas: equal up to rounding, relative to the sampled values' magnitude
    torch.testing.assert_close(twice, fast, atol=1e-6 * float(fast.abs().max()), rtol=1e-5)


def test_first_order_gradient_equals_the_twice_differentiable_one_and_finite_differences():
    """`sdf_and_gradient` (grid_sample's own backward, first order) = autograd through the gathers of
    `bilinear_sample` = central differences in float64, at points off the texel edges."""
    torch.manual_seed(3)
    field = _field(torch.randn(1, 6, 4, 16, 16).double())
    field.sdf_network.double()
    points = (torch.rand(1, 500, 3, dtype=torch.float64) * 1.8 - 0.9)
    sdf, grad = field.sdf_and_gradient(points)
    with torch.enable_grad():
        p = points.clone().requires_grad_(True)
        (twice,) = torch.autograd.grad(field.sdf(p).sum(), p)  # the gathers' path
    eps = 1e-6
    central = torch.stack([(field.sdf(points + eps * e) - field.sdf(points - eps * e)) / (2 * eps)
                           for e in torch.eye(3, dtype=torch.float64)], dim=-1)
    scale = grad.abs().max().item()
    assert scale > 0.1
    torch.testing.assert_close(grad, twice, atol=1e-9 * scale, rtol=0)
    torch.testing.assert_close(grad, central, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(sdf, field.sdf(points), atol=1e-12, rtol=0)
