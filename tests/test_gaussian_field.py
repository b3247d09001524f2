"""TriplaneGaussianField / TriplaneGaussianStudent: Gaussians on the triplane SDF's zero level, their attributes,
their gradients, the settings, the parameter count and the weights round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lightning_modules.student import TriplaneStudent
from lightning_modules.student.config import StudentWeightsError
from lightning_modules.student.gaussian_field import (
    SH_C0,
    GaussianSettings,
    TriplaneGaussianField,
    TriplaneGaussianStudent,
    attribute_head,
    quaternion_multiply,
    sample_surface,
    z_to_direction,
)
from lightning_modules.student.triplane_field import TriplaneField, VanillaMLP
from lightning_modules.training.settings import resolve_student_config
from renderers.types import FieldWithSharedGeometry
from tests.gaussian_helpers import GAUSSIAN_STUDENT
from tests.prd_helpers import TINY_STUDENT
from tests.threads import single_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_GAUSSIANS = dict(num_gaussians=256, surface_resolution=16, mlp_neurons=16)


class ConstantSDF(nn.Module):
    """An "SDF MLP" that returns one learnable constant: the field's SDF is |p| - 0.5 + offset, a sphere of
    radius 0.5 - offset."""

    def __init__(self, offset: float = 0.0) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.tensor(offset))

    def forward(self, features):
        return features[..., :1] * 0 + self.offset


def rotate(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """v `[..., 3]` rotated by unit quaternions q `[..., 4]` (q v q*), written independently of the module."""
    qv = torch.cat([torch.zeros_like(v[..., :1]), v], dim=-1)
    conj = q * torch.tensor([1.0, -1.0, -1.0, -1.0])
    return quaternion_multiply(quaternion_multiply(q, qv), conj)[..., 1:]


def gaussian_field(sdf_network: nn.Module | None, settings: GaussianSettings, deformation: bool = False,
                   channels: int = 4, batch: int = 2, seed: int = 0):
    """A small TriplaneGaussianField on random planes (geometry features: channels, texture: 3 x channels), from
    `seed`: with a random SDF MLP when `sdf_network` is None (the sphere prior plus bumps), and a random
    deformation MLP for marching cubes when `deformation`."""
    torch.manual_seed(seed)
    sdf_network = sdf_network or VanillaMLP(channels, 1, 8, 1)
    planes = torch.randn(batch, 6, channels, 8, 8) * 0.3
    deformation_network = VanillaMLP(channels, 3, 8, 1) if deformation else None
    triplane = TriplaneField(planes, sdf_network, VanillaMLP(3 * channels, 3, 8, 1), deformation_network)
    color_head = attribute_head(3 * channels, 9, 8, 1) if settings.sh_degree == 1 else None
    return TriplaneGaussianField.from_triplane(triplane, attribute_head(channels, 8, 8, 1), color_head, settings)


def test_untrained_gaussians_are_discs_on_the_zero_level_with_the_fields_colour():
    settings = GaussianSettings(**TINY_GAUSSIANS, init_opacity=0.8, thickness=0.25)
    field = gaussian_field(ConstantSDF(0.1), settings)  # the sphere of radius 0.4
    assert isinstance(field, FieldWithSharedGeometry) and field.batch_size == 2
    with torch.no_grad():
        g = field.gaussian_attributes()
    n = settings.num_gaussians
    assert g["means"].shape == (2, n, 3) and g["quats"].shape == (2, n, 4) and g["scales"].shape == (2, n, 3)
    assert g["opacities"].shape == (2, n) and g["sh"].shape == (2, n, 1, 3)
    # the marching-cubes anchors lie near the sphere; one Newton step puts the centres on it (exact for a sphere)
    assert (g["anchors"].norm(dim=-1) - 0.4).abs().max() < 0.03  # flat triangles in cells 2/15 wide
    assert (g["means"].norm(dim=-1) - 0.4).abs().max() < 1e-5
    assert torch.allclose(g["normals"], g["means"] / 0.4, atol=1e-4)
    # every anchor is its own draw: no duplicates, spread over the whole sphere
    assert torch.unique(g["anchors"][0], dim=0).shape[0] == n
    assert (g["means"][0].mean(0).norm() < 0.1) and (g["means"][0, :, 2].min() < -0.3) and (g["means"][0, :, 2].max() > 0.3)
    # defaults of the zero-initialised heads: opacity, flat discs whose thin axis is the normal, size = spacing
    assert torch.allclose(g["opacities"], torch.full_like(g["opacities"], 0.8), atol=1e-6)
    assert torch.allclose(g["quats"].norm(dim=-1), torch.ones(2, n), atol=1e-6)
    thin_axis = rotate(g["quats"], torch.tensor([0.0, 0.0, 1.0]).expand(2, n, 3))
    assert torch.allclose(thin_axis, g["normals"], atol=1e-5)
    sphere_spacing = math.sqrt(4 * math.pi * 0.4**2 / n)  # the marching-cubes area is a little less than the sphere's
    assert torch.allclose(g["spacing"], torch.full((2,), sphere_spacing), rtol=0.05)
    expected = settings.scale_factor * g["spacing"][:, None, None] * torch.tensor([1.0, 1.0, 0.25])
    assert torch.allclose(g["scales"], expected.expand(2, n, 3), rtol=1e-6)
    # SH degree 0 in the 3DGS convention gives back the field's colour at the centre
    assert torch.allclose(0.5 + SH_C0 * g["sh"][:, :, 0], field.color(g["means"]), atol=1e-6)


def test_the_centres_move_with_the_sdf_as_its_zero_level_does():
    """d(centre)/d(SDF offset) = -normal (MeshSDF's iso-surface derivative; |grad s| = 1 here): autograd
    agrees with the centres of a field whose offset is moved by +-0.02 (finite difference)."""
    settings = GaussianSettings(**TINY_GAUSSIANS)
    sdf = ConstantSDF(0.1)
    g = gaussian_field(sdf, settings).gaussian_attributes()
    radius = g["means"].norm(dim=-1)  # [B, N]
    (derivative,) = torch.autograd.grad(radius.mean(), sdf.offset)
    assert float(derivative) == pytest.approx(-1.0, abs=1e-5)
    radii = []
    for offset in (0.08, 0.12):
        with torch.no_grad():
            radii.append(gaussian_field(ConstantSDF(offset), settings).gaussian_attributes()["means"].norm(dim=-1).mean())
    assert float((radii[1] - radii[0]) / 0.04) == pytest.approx(float(derivative), abs=1e-4)


@pytest.mark.parametrize("sh_degree", [0, 1])
def test_every_attribute_trains_the_planes_the_sdf_the_colour_and_the_heads(sh_degree):
    settings = GaussianSettings(**TINY_GAUSSIANS, sh_degree=sh_degree)
    field = gaussian_field(None, settings, deformation=True)  # the sphere prior plus a bumpy MLP
    field.planes.requires_grad_(True)
    with torch.no_grad():
        for head in (field.geometry_head, field.color_head or nn.Identity()):
            for p in head.parameters():
                p.normal_(0, 0.2)  # trained heads (the zero-initialised last layers would stop the first ones)
    g = field.gaussian_attributes()
    assert g["sh"].shape[-2] == settings.sh_coefficients
    with torch.no_grad():  # the Newton step brings the centres closer to the zero level
        assert field.sdf(g["means"]).abs().mean() < 0.3 * field.sdf(g["anchors"]).abs().mean()
    loss = sum(g[name].square().sum() for name in ("means", "quats", "scales", "opacities", "sh"))
    loss.backward()
    modules = {"sdf": field.sdf_network, "colour": field.feature_network, "geometry head": field.geometry_head}
    if sh_degree == 1:
        modules["colour head"] = field.color_head
    for name, module in modules.items():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    assert field.planes.grad.abs().sum() > 0
    # under no_grad (generation) nothing keeps a graph
    with torch.no_grad():
        fresh = gaussian_field(None, settings, deformation=True).gaussian_attributes()
    assert not any(value.requires_grad for value in fresh.values())
    assert torch.equal(fresh["means"], g["means"].detach())  # same field, same seed: the same Gaussians


def test_helpers_surface_sampling_and_the_normal_frame():
    vertices = torch.tensor([[0.0, 0, 0], [2, 0, 0], [0, 1, 0], [0, 0, 5]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])  # areas 1 and 2.5
    points, area = sample_surface(vertices, faces, 7000, torch.Generator().manual_seed(0))
    assert area == pytest.approx(3.5)
    on_first = (points[:, 2].abs() < 1e-7)
    assert float(on_first.float().mean()) == pytest.approx(1 / 3.5, abs=0.02)  # area-weighted
    inside = points[on_first]
    assert (inside[:, 0] / 2 + inside[:, 1] <= 1 + 1e-6).all()  # inside the triangle
    assert float(inside[:, 0].mean()) == pytest.approx(2 / 3, abs=0.03)  # uniform: its centroid
    normals = torch.nn.functional.normalize(torch.randn(1000, 3), dim=-1)
    normals[0] = torch.tensor([0.0, 0.0, -1.0])
    normals[1] = torch.tensor([0.0, 0.0, 1.0])
    q = z_to_direction(normals)
    assert torch.allclose(rotate(q, torch.tensor([0.0, 0.0, 1.0]).expand(1000, 3)), normals, atol=1e-5)


@pytest.mark.parametrize(
    "representation, message",
    [
        ({"num_gaussian": 10}, "unknown setting"),
        ({"sh_degree": 2}, "sh_degree must be 0 or 1"),
        ({"num_gaussians": 0}, "num_gaussians must be >= 1"),
        ({"init_opacity": 1.0}, "init_opacity"),
        ({"num_gaussians": "many"}, "is a number"),
    ],
)
def test_bad_gaussian_settings_are_a_one_line_error(representation, message):
    with pytest.raises(StudentWeightsError, match=message) as err:
        GaussianSettings.from_dict(representation)
    assert "\n" not in str(err.value)


def test_the_new_heads_are_small():
    """Parameters of the new MLPs (the only new weights): full size (geometry features 32, texture 96, heads 64
    wide, 1 hidden layer) 2,632 with SH degree 0 and 9,425 with degree 1, against the student's 22.68 M trainable."""

    def count(module):
        return sum(p.numel() for p in module.parameters())

    full = GaussianSettings()
    geometry = attribute_head(32, 8, full.mlp_neurons, full.mlp_hidden_layers)
    colour = attribute_head(96, 9, full.mlp_neurons, full.mlp_hidden_layers)
    assert count(geometry) == 32 * 64 + 64 + 64 * 8 + 8 == 2632
    assert count(geometry) + count(colour) == 2632 + 96 * 64 + 64 + 64 * 9 + 9 == 9425


def test_the_gaussian_student_trains_saves_and_loads_its_heads(tiny_sd_dir, tmp_path):
    representation = dict(TINY_GAUSSIANS, sh_degree=1)
    config = resolve_student_config({**TINY_STUDENT, "student_class": GAUSSIAN_STUDENT, "representation": representation})
    student = TriplaneStudent.from_pretrained(tiny_sd_dir, config=config)
    assert type(student) is TriplaneGaussianStudent
    heads = {k: v for k, v in student.trainable_state_dict().items() if k.startswith("gaussian_")}
    # TINY_STUDENT: output_dim 8 -> 4 channels per plane: geometry features 4, texture 12; heads 16 wide
    assert sum(v.numel() for v in heads.values()) == (4 * 16 + 16 + 16 * 8 + 8) + (12 * 16 + 16 + 16 * 9 + 9) == 577
    assert all(v.requires_grad for v in heads.values())
    with torch.no_grad():
        for value in heads.values():
            value.normal_(0, 0.1)  # "trained" heads
        field = student.sample(student.encode_prompt(["a red ball"]), seed=0)
        before = field.gaussian_attributes()
    assert isinstance(field, TriplaneGaussianField) and before["means"].shape == (1, 256, 3)

    directory = student.save_pretrained(tmp_path / "weights")
    saved = json.loads((directory / "config.json").read_text())
    assert saved["student_class"] == GAUSSIAN_STUDENT and saved["representation"] == representation
    again = TriplaneStudent.from_pretrained(tiny_sd_dir, weights=directory)
    assert type(again) is TriplaneGaussianStudent and again.gaussian_settings == student.gaussian_settings
    with torch.no_grad():
        after = again.sample(again.encode_prompt(["a red ball"]), seed=0).gaussian_attributes()
    for name in ("means", "quats", "scales", "opacities", "sh"):
        assert torch.equal(before[name], after[name]), name


def test_gaussians_come_as_the_renderers_gaussians():
    import renderers.gaussians as gaussians_module
    field = gaussian_field(ConstantSDF(0.1), GaussianSettings(**TINY_GAUSSIANS, sh_degree=1))
    with torch.no_grad():
        splats, attributes = field.gaussians(), field.gaussian_attributes()
    assert isinstance(splats, gaussians_module.Gaussians)
    assert splats.batch_size == 2 and splats.num_gaussians == 256 and splats.sh_degree == 1
    assert torch.equal(splats.means, attributes["means"]) and torch.equal(splats.sh, attributes["sh"])
