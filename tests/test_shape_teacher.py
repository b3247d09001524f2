"""ShapeTeacher: prompt -> procedural target, exact SDFs, target renders from the render's cameras, exact
denoisers (checked against independent density-gradient computations), gradients that pull renders
towards their targets, learning a sphere's radius through real renders, Chamfer distance, YAML."""

from __future__ import annotations

import math

import pytest
import torch
from jsonargparse import ArgumentParser
from torch import nn

from renderers.cameras import evaluation_cameras
from renderers.mesh_renderer import MeshRenderer
from renderers.types import RenderOutput
from renderers.volume_renderer import NeuSVolumeRenderer
from teachers.ensemble import TeacherEnsemble
from teachers.shape_teacher import ShapeTeacher, ddpm_alphas_cumprod
from teachers.shapes import (
    COLORS,
    SHAPE_SDFS,
    ShapePromptError,
    ShapeTarget,
    chamfer_distance,
    parse_shape_prompt,
    sample_mesh_surface,
    sample_surface_points,
    target_gaussians,
    target_mesh,
)
from tests.teacher_helpers import make_cameras

PROMPTS = ["a red ball", "a small blue cube"]


def random_render(batch=2, views=4, size=16, seed=0, channels=(("rgb", 3), ("normal", 3), ("disparity", 1))):
    g = torch.Generator().manual_seed(seed)
    images = {name: torch.rand(batch, views, c, size, size, generator=g).requires_grad_(True) for name, c in channels}
    return RenderOutput(images, make_cameras(batch, views, size, size, seed), "mesh")


class Recorder:
    """Wraps a teacher's ScoreDistillation to keep the denoiser closure and conditioning of the last call."""

    def __init__(self, objective):
        self.inner = objective

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x, denoise, cond, uncond, *args, **kwargs):
        self.x, self.denoise, self.cond, self.uncond = x, denoise, cond, uncond
        self.output = self.inner(x, denoise, cond, uncond, *args, **kwargs)
        return self.output


# ---------------------------------------------------------------------------------------------- prompts
def test_prompt_parsing_shapes_colours_sizes():
    for word, shape in [("sphere", "sphere"), ("Ball", "sphere"), ("cube", "cube"), ("box", "cube"), ("torus", "torus"),
                        ("donut", "torus"), ("ring", "torus"), ("cone", "cone"), ("capsule", "capsule"), ("pill", "capsule"),
                        ("cylinder", "cylinder"), ("octahedron", "octahedron"), ("pyramid", "pyramid")]:
        assert parse_shape_prompt(f"a {word}").shape == shape
    target = parse_shape_prompt("A LARGE, Red  ball.")
    assert (target.shape, target.color_name, target.color, target.scale) == ("sphere", "red", COLORS["red"], 1.2)
    assert target.name == "large red sphere" and target.prompt == "A LARGE, Red  ball."
    assert parse_shape_prompt("small gray box") == ShapeTarget("cube", COLORS["grey"], "grey", 0.7)
    assert parse_shape_prompt("a violet donut").color_name == "purple"
    assert parse_shape_prompt("a red ball") == parse_shape_prompt("red sphere")  # synonyms: same target
    assert parse_shape_prompt("a red ball") != parse_shape_prompt("a blue ball")
    assert parse_shape_prompt("a cone").color_name == "grey" and parse_shape_prompt("a cone").scale == 1.0

    with pytest.raises(ShapePromptError, match="unknown word 'shiny'.*strict=False") as info:
        parse_shape_prompt("a shiny red ball")
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    with pytest.raises(ShapePromptError, match="no shape word"):
        parse_shape_prompt("a red thing")
    with pytest.raises(ShapePromptError, match=r"several shapes \(sphere, cube\)"):
        parse_shape_prompt("a ball on a box")
    with pytest.raises(ShapePromptError, match="several colours"):
        parse_shape_prompt("a red blue cube")

    lenient = parse_shape_prompt("a DSLR photo of a shiny green donut", strict=False)
    assert (lenient.shape, lenient.color_name) == ("torus", "green")
    default = parse_shape_prompt("a photo of a dog", strict=False, default_shape="cube", default_color="orange")
    assert (default.shape, default.color_name, default.scale) == ("cube", "orange", 1.0)
    with pytest.raises(ShapePromptError, match="unknown default colour"):
        parse_shape_prompt("a dog", strict=False, default_color="teal")


# ---------------------------------------------------------------------------------------------- shapes
EXACT = {
    "sphere": [((1, 0, 0), 0.4), ((0, 0, 0), -0.6)],
    "cube": [((1, 1, 1), math.sqrt(3) * 0.55), ((1, 0.2, 0), 0.55), ((0.2, 0, 0), -0.25)],
    "torus": [((0.45, 0, 0), -0.2), ((0, 0, 0), 0.25), ((0, 0, 1), math.hypot(0.45, 1) - 0.2)],
    "cone": [((0, 0, 1), 0.4), ((1, 0, -0.45), 0.45), ((0, 0, -1), 0.55), ((0, 0, 0), -0.33 / math.hypot(1.05, 0.55))],
    "capsule": [((0, 0, 1), 0.35), ((1, 0, 0), 0.7), ((0, 0, 0), -0.3)],
    "cylinder": [((1, 0, 1), math.hypot(0.55, 0.55)), ((0.2, 0, 0.4), -0.05), ((0, 0, 0), -0.45)],
    "octahedron": [((1, 1, 1), 2.3 / math.sqrt(3)), ((-1, 0, 0), 0.3), ((1, -1, 0), math.sqrt(2) * 0.65), ((0, 0, 0), -0.7 / math.sqrt(3))],
    "pyramid": [((0, 0, 1), 0.4), ((0, 0, -1), 0.6), ((-1, 1, -0.4), math.sqrt(0.5)), ((0, 0, 0), -0.3 / math.sqrt(1.25))],
}


@pytest.mark.parametrize("shape", sorted(SHAPE_SDFS))
def test_sdfs_are_exact_and_fit_the_box(shape):
    target = ShapeTarget(shape, COLORS["red"], "red")
    points = torch.tensor([p for p, _ in EXACT[shape]], dtype=torch.float64)
    expected = torch.tensor([d for _, d in EXACT[shape]], dtype=torch.float64)
    torch.testing.assert_close(target.sdf(points), expected, atol=1e-6, rtol=0)
    large = ShapeTarget(shape, COLORS["red"], "red", scale=1.2)
    torch.testing.assert_close(large.sdf(points * 1.2), expected * 1.2, atol=1e-6, rtol=0)
    # a true distance: unit gradient almost everywhere
    random = (torch.rand(4000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(target.sdf(random).sum(), random)
    assert (grad.norm(dim=-1) - 1).abs().quantile(0.99) < 1e-6
    # the extracted target mesh lies on the zero set, inside the reference's camera range
    mesh = target_mesh(large, 32)
    assert target.sdf(target_mesh(target, 32).vertices).abs().max() < 2 / 31
    assert mesh.vertices.abs().max() < 0.95
    assert 0.59 <= target_mesh(target, 32).vertices.norm(dim=-1).max() <= 0.85


# ---------------------------------------------------------------------------------------------- target renders
def disk_radius_px(radius, distance, fovy_deg, height):
    focal = 0.5 * height / math.tan(math.radians(fovy_deg) / 2)
    return focal * math.tan(math.asin(radius / distance))


@pytest.mark.parametrize("renderer", ["mesh", "volume"])
def test_sphere_target_is_a_disk_of_the_predicted_radius_in_its_colour(renderer):
    teacher = ShapeTeacher(channels=["rgb", "alpha"], background=(1.0, 1.0, 1.0))
    cameras = evaluation_cameras(2, distance=2.5, fovy=40.0, height=40, width=40)
    for prompt, radius in (("a green sphere", 0.6), ("a large green sphere", 0.72)):
        images = teacher.render_targets([teacher.target(prompt)], cameras, renderer).images
        assert images["rgb"].shape == (1, 2, 3, 40, 40)
        measured = math.sqrt(images["alpha"][0, 0].sum().item() / math.pi)
        assert measured == pytest.approx(disk_radius_px(radius, 2.5, 40.0, 40), abs=0.6)
        centre = images["rgb"][0, :, :, 18:22, 18:22].mean((-1, -2))
        torch.testing.assert_close(centre, torch.tensor([COLORS["green"]] * 2), atol=0.01, rtol=0)
        torch.testing.assert_close(images["rgb"][0, :, :, 0, 0], torch.ones(2, 3), atol=0.005, rtol=0)
    # a cube seen face-on is a square: it fills its bounding box (a disk would fill pi / 4 of it)
    face_on = evaluation_cameras(1, elevation=0.0, distance=2.5, fovy=40.0, height=40, width=40)
    cube = teacher.render_targets([teacher.target("a green cube")], face_on, renderer).images["alpha"][0, 0, 0]
    rows, cols = torch.nonzero(cube > 0.5, as_tuple=True)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert (cube > 0.5).sum() / box > 0.95 and abs((rows.max() - rows.min()) - (cols.max() - cols.min())) <= 1


def test_targets_are_rendered_from_the_render_cameras_and_pooled_like_the_render():
    teacher = ShapeTeacher(channels=["rgb", "normal", "disparity"], resolution=8)
    teacher.objective = Recorder(teacher.objective)
    render = random_render(size=24, seed=3)
    teacher(render, PROMPTS, 0, torch.Generator().manual_seed(0))
    targets = [teacher.target(p) for p in PROMPTS]
    expected = teacher.latents(teacher.render_targets(targets, render.cameras).images)
    assert expected.shape == (8, 7, 8, 8) and teacher.last_targets.shape == expected.shape
    torch.testing.assert_close(teacher.last_targets, expected)
    assert teacher.objective.x.shape == (8, 7, 8, 8)
    # the pooled latent is the area average of the full-resolution images, mapped to [-1, 1]
    full = torch.cat([render.images[n] for n in ("rgb", "normal", "disparity")], dim=2).flatten(0, 1)
    torch.testing.assert_close(teacher.objective.x, full.detach().unflatten(-1, (8, 3)).unflatten(-3, (8, 3)).mean((-1, -3)) * 2 - 1)
    # other cameras, other targets: the red ball seen from elsewhere differs only in its normals/disparity
    other = random_render(size=24, seed=4)
    teacher(other, PROMPTS, 0, torch.Generator().manual_seed(0))
    assert not torch.allclose(teacher.last_targets, expected)
    # per-object timesteps shared by its views (multi-view teacher)
    t = teacher.objective.output.timesteps.view(2, 4)
    assert (t == t[:, :1]).all()


def test_target_renderer_same_draws_each_render_with_its_own_kind():
    teacher = ShapeTeacher(channels=["alpha", "normal"], target_renderer="same")
    kinds = []
    original = teacher.render_targets
    teacher.render_targets = lambda targets, cameras, *kind: kinds.append(kind) or original(targets, cameras, *kind)
    mesh = random_render(size=8, channels=(("alpha", 1), ("normal", 3)))
    volume = RenderOutput({k: v.detach().clone().requires_grad_(True) for k, v in mesh.images.items()}, mesh.cameras, "volume")
    losses = teacher([mesh, volume], PROMPTS, 0)
    assert kinds == [("mesh", "mesh"), ("volume", "volume")] and set(losses) == {"shape/mesh", "shape/volume"}
    # both kinds draw the same silhouettes (mesh vs NeuS of the same exact SDF)
    mesh_alpha, volume_alpha = teacher.last_targets[:8, 0], teacher.last_targets[8:, 0]
    assert ((mesh_alpha > 0) == (volume_alpha > 0)).float().mean() > 0.9


def test_gaussian_targets_are_flat_splats_on_the_surface_and_draw_its_silhouette():
    """target_renderer="gaussian": N Gaussians on the target surface (|sdf| within the 48^3 mesh's error), each a
    disc tangent to it (smallest axis = the SDF gradient), std scale_factor sqrt(area / N), thickness 0.3; their
    render covers the mesh's silhouette and more (the footprint the teacher gives the student's splats too), the
    classic filter's wider than the antialiased one's; "same" draws
    Gaussian renders with them."""
    target = parse_shape_prompt("a large purple capsule")
    splats = target_gaussians(target, 48, num_gaussians=1024, scale_factor=0.5, thickness=0.3, opacity=0.9)
    means = splats.means[0]
    assert means.shape == (1024, 3) and target.sdf(means).abs().max() < 0.01
    probe = means.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(target.sdf(probe).sum(), probe)
    assert (splats.normals()[0] * torch.nn.functional.normalize(gradient, dim=-1)).sum(-1).abs().min() > 0.999
    expected_std = 0.5 * math.sqrt(sample_area(target) / 1024)
    torch.testing.assert_close(splats.scales[0, 0], torch.tensor([1.0, 1.0, 0.3]) * expected_std)
    assert torch.all(splats.opacities == 0.9)

    cameras = evaluation_cameras(4, elevation=20.0, height=24, width=24)
    coverage = {}
    for antialiased in (False, True):
        teacher = ShapeTeacher(channels=["alpha"], target_renderer="gaussian", target_gaussians=dict(num_gaussians=1024, antialiased=antialiased))
        alpha = teacher.render_targets([target], cameras, "gaussian").images["alpha"]
        coverage[antialiased] = float(alpha.sum())
    mesh = ShapeTeacher(channels=["alpha"]).render_targets([target], cameras, "mesh").images["alpha"]
    inside, drawn = mesh > 0.5, alpha > 0.5  # antialiased: the splats cover the silhouette and reach ~1 px beyond it
    assert (inside & drawn).sum() >= 0.98 * inside.sum() and drawn.sum() < 1.3 * inside.sum()
    assert coverage[False] > 1.2 * coverage[True]  # the classic 0.3 px^2 dilation draws them wider still
    teacher = ShapeTeacher(channels=["alpha"], target_renderer="same")
    render = RenderOutput({"alpha": torch.rand(1, 4, 1, 24, 24)}, cameras, "gaussian")
    assert teacher._target_kind(render) == ("gaussian", "mesh")
    with pytest.raises(ValueError, match="target_gaussians: unknown key"):
        ShapeTeacher(target_renderer="gaussian", target_gaussians={"count": 10})


def sample_area(target) -> float:
    mesh = target_mesh(target, 48)
    a, b, c = (mesh.vertices[mesh.faces[:, k].long()].double() for k in range(3))
    return float(torch.linalg.cross(b - a, c - a, dim=-1).norm(dim=-1).sum() / 2)


def test_mesh_targets_for_volume_renders_follow_the_volume_depth_conventions():
    teacher = ShapeTeacher(channels=["depth", "disparity"])
    cameras = evaluation_cameras(2, elevation=20.0, distance=1.6, fovy=60.0, height=24, width=24)
    targets = [teacher.target("a large sphere")]
    mesh = teacher.render_targets(targets, cameras, "mesh").images
    converted = teacher.render_targets(targets, cameras, "mesh", "volume").images
    volume = teacher.render_targets(targets, cameras, "volume").images
    inside = (mesh["alpha"] > 0.999) & (volume["alpha"] > 0.999)
    assert inside.sum() > 300
    for name in ("depth", "disparity"):
        assert (mesh[name] - volume[name])[inside].abs().quantile(0.95) > 0.05  # axial depth / clip_z disparity
        assert (converted[name] - volume[name])[inside].abs().quantile(0.95) < 0.005
    # the teacher picks the conventions from the render's kind
    kinds = []
    original = teacher.render_targets
    teacher.render_targets = lambda targets, cameras, *kind: kinds.append(kind) or original(targets, cameras, *kind)
    render = random_render(size=8, channels=(("depth", 1), ("disparity", 1)))
    teacher([render, RenderOutput(render.images, render.cameras, "volume")], PROMPTS, 0)
    assert kinds == [("mesh", "mesh"), ("mesh", "volume")]


# ---------------------------------------------------------------------------------------------- exact denoisers
def _alpha_sigma(teacher, t):
    abar = teacher.alphas_cumprod[t]
    return abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)


def test_ddpm_schedule_is_stable_diffusions():
    abar = ddpm_alphas_cumprod()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(abar, torch.cumprod(1 - betas, 0).float())


def test_conditional_denoiser_is_the_dirac_at_the_target_for_any_noisy_input():
    teacher = ShapeTeacher(cfg_scale=7.5)
    teacher.objective = Recorder(teacher.objective)
    teacher(random_render(), PROMPTS, 0, torch.Generator().manual_seed(0))
    rec, y = teacher.objective, teacher.last_targets
    g = torch.Generator().manual_seed(5)
    for t_value in (0, 20, 500, 999):
        x_t = torch.randn(y.shape, generator=g) * 3
        t = torch.full((y.shape[0],), t_value)
        alpha, sigma = _alpha_sigma(teacher, t)
        eps = rec.denoise(x_t, t, rec.cond)
        torch.testing.assert_close((x_t - sigma * eps) / alpha, y, atol=1e-4 * (1 + 1 / alpha.min().item()), rtol=0)


def test_unconditional_mixture_is_the_exact_score_of_the_mixture_density():
    teacher = ShapeTeacher(cfg_scale=7.5, unconditional_prompts=["a yellow torus"])
    teacher.objective = Recorder(teacher.objective)
    render = random_render(batch=2, views=2, size=12)
    teacher(render, PROMPTS, 0, torch.Generator().manual_seed(0))
    rec = teacher.objective
    # independent construction of the mixture: each distinct target from the same cameras + the empty scene
    targets = [teacher.target(p) for p in PROMPTS + ["a yellow torus"]]
    renders = [teacher.latents(teacher.render_targets([t, t], render.cameras).images) for t in targets]
    empty = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 1.0, 0.0]) * 2 - 1
    components = torch.stack([*renders, empty[:, None, None].expand_as(renders[0])], dim=1).double()  # [N, 4, C, h, w]
    n, k = components.shape[:2]
    g = torch.Generator().manual_seed(7)
    entropies = []
    for t_value in (999, 900, 600, 100):
        t = torch.full((n,), t_value)
        alpha, sigma = _alpha_sigma(teacher, t)
        # noisy versions of a blend of two components, so that several components matter
        x0 = 0.5 * (components[:, 0] + components[:, 1])
        x_t = (alpha * x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)).float()
        eps = rec.denoise(x_t, t, rec.uncond).double()
        x = x_t.double().flatten(1).requires_grad_(True)
        means = alpha.double().view(n, 1, 1) * components.flatten(2)
        mixture = torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(torch.ones(n, k, dtype=torch.float64)),
            torch.distributions.Independent(torch.distributions.Normal(means, sigma.double().view(n, 1, 1)), 1),
        )
        (score,) = torch.autograd.grad(mixture.log_prob(x).sum(), x)
        expected = -sigma.double().view(n, 1) * score  # Tweedie: eps = -sigma grad log p_t(x_t)
        torch.testing.assert_close(eps.flatten(1), expected, atol=2e-3, rtol=1e-3)
        posterior = torch.softmax(mixture.component_distribution.log_prob(x.detach()[:, None]), dim=1)
        entropies.append(float(-(posterior * posterior.clamp_min(1e-30).log()).sum(1).max()))
    assert max(entropies) > 0.3  # the check covered non-trivial posterior weights


def test_unconditional_gaussian_is_the_exact_score_of_the_gaussian():
    teacher = ShapeTeacher(cfg_scale=3.0, unconditional="gaussian", unconditional_std=0.4, channels=["rgb"])
    teacher.objective = Recorder(teacher.objective)
    teacher(random_render(channels=(("rgb", 3),)), PROMPTS, 0, torch.Generator().manual_seed(0))
    rec = teacher.objective
    n = rec.x.shape[0]
    g = torch.Generator().manual_seed(9)
    for t_value in (999, 500, 50):
        t = torch.full((n,), t_value)
        alpha, sigma = _alpha_sigma(teacher, t)
        x_t = torch.randn(rec.x.shape, generator=g)
        eps = rec.denoise(x_t, t, rec.uncond)
        x = x_t.double().requires_grad_(True)
        scale = (alpha.double() ** 2 * 0.16 + sigma.double() ** 2).sqrt()
        log_p = torch.distributions.Normal(alpha.double() * 1.0, scale).log_prob(x).sum()  # empty scene: white = +1
        (score,) = torch.autograd.grad(log_p, x)
        torch.testing.assert_close(eps.double(), -sigma.double() * score, atol=1e-4, rtol=1e-4)


def test_cfg_one_never_renders_the_mixture():
    teacher = ShapeTeacher(cfg_scale=1.0, unconditional_prompts=["a yellow torus", "a green cone"])
    drawn = []
    original = teacher.render_targets
    teacher.render_targets = lambda targets, cameras, *kind: drawn.append(len(targets)) or original(targets, cameras, *kind)
    teacher(random_render(), PROMPTS, 0)
    assert drawn == [2]  # only the two prompts' targets
    teacher.objective.cfg_scale = type(teacher.objective.cfg_scale).parse(2.0)
    teacher(random_render(), PROMPTS, 0)
    assert drawn == [2, 8]  # 4 distinct targets x 2 objects' cameras


# ---------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize(
    "config",
    [
        dict(objective="sds", weighting="dmd", cfg_scale=1.0),
        dict(objective="sds", weighting="dmd", cfg_scale=7.5),
        dict(objective="sds", weighting="sds", cfg_scale=7.5, unconditional="gaussian"),
        dict(objective="asd", weighting="dmd", cfg_scale=7.5, plus_ratio=0.5, t_min=0.3),
        dict(objective="asd", weighting="dmd", cfg_scale=1.0, plus_ratio=0.5, t_min=0.3),
    ],
    ids=["sds-cfg1", "sds-cfg7.5", "sds-sdsweight-gauss", "asd-cfg7.5", "asd-cfg1"],
)
def test_a_gradient_step_on_the_images_moves_them_towards_the_target(config):
    teacher = ShapeTeacher(**config)
    render = random_render(seed=11)
    loss = sum(teacher(render, PROMPTS, 0, torch.Generator().manual_seed(2)).values())
    loss.backward()
    y = teacher.last_targets
    before = (teacher.latents(render.images) - y).square().flatten(1).sum(1)
    with torch.no_grad():
        stepped = {name: image - 0.02 * image.grad for name, image in render.images.items()}
    after = (teacher.latents(stepped) - y).square().flatten(1).sum(1)
    assert (after < before).all(), (before, after)


class LearnableSphere(nn.Module):
    """One sphere whose radius is the only parameter; red, like the target."""

    def __init__(self, radius: float) -> None:
        super().__init__()
        self.radius = nn.Parameter(torch.tensor(float(radius)))
        self.batch_size = 1

    def sdf(self, points):
        return points.norm(dim=-1) - self.radius

    def deformation(self, points):
        return torch.zeros_like(points)

    def color(self, points):
        return torch.tensor(COLORS["red"]).expand(points.shape)


@pytest.mark.parametrize(
    "renderer, start, config",
    [
        ("mesh", 0.35, dict()),
        ("mesh", 0.85, dict(objective="asd", cfg_scale=7.5, plus_ratio=0.1, channels=["alpha", "disparity"])),
        ("volume", 0.85, dict(channels=["rgb", "normal"])),
    ],
)
def test_prd_is_verifiable_a_sphere_radius_learns_the_target_through_real_renders(renderer, start, config):
    size = 24 if renderer == "mesh" else 12
    if renderer == "mesh":
        draw = MeshRenderer(resolution=24, backend="torch", sdf_grad_shrink=1.0, use_deformation=False)
    else:
        draw = NeuSVolumeRenderer(num_proposal_samples=32, num_importance_samples=16, patch_size=0)
    field, teacher = LearnableSphere(start), ShapeTeacher(target_mesh_resolution=32, **config)
    optimizer = torch.optim.Adam(field.parameters(), lr=0.04)
    generator = torch.Generator().manual_seed(0)
    for step in range(5):
        render = draw(field, make_cameras(1, 4, size, size, seed=step))
        loss = sum(teacher(render, ["a red ball"], step, generator).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moved = field.radius.item() - start
    assert abs(start + moved - 0.6) < abs(start - 0.6) - 0.1, field.radius.item()  # at least 0.1 closer to 0.6


# ---------------------------------------------------------------------------------------------- Chamfer
def test_chamfer_distance_on_simple_point_sets():
    a = torch.tensor([[0.0, 0, 0], [1.0, 0, 0]])
    b = torch.tensor([[0.0, 0, 0]])
    assert chamfer_distance(a, a).item() == 0.0
    assert chamfer_distance(a, b).item() == pytest.approx(0.5 * (0.5 + 0.0))
    assert chamfer_distance(a * 2, b, squared=True).item() == pytest.approx(0.5 * (4.0 / 2))
    assert chamfer_distance(a, b).item() == chamfer_distance(b, a).item()
    shifted = torch.tensor([[0.0, 0, 0.3]])
    assert chamfer_distance(b, shifted).item() == pytest.approx(0.3)
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(300, 3, generator=g), torch.randn(200, 3, generator=g)
    d = ((p[:, None].double() - q[None].double()) ** 2).sum(-1).sqrt()  # every pair: the brute-force reference
    brute = 0.5 * (d.min(1).values.mean() + d.min(0).values.mean())
    torch.testing.assert_close(chamfer_distance(p, q), brute, rtol=1e-12, atol=0.0)
    with pytest.raises(ValueError, match="non-empty"):
        chamfer_distance(p, q[:0])


def test_surface_samples_and_chamfer_between_targets():
    sphere, large = parse_shape_prompt("a ball"), parse_shape_prompt("a large ball")
    points = sample_surface_points(sphere, 3000, seed=0, resolution=64)
    assert points.shape == (3000, 3)
    assert (points.norm(dim=-1) - 0.6).abs().max() < 0.01
    again = sample_surface_points(sphere, 3000, seed=1, resolution=64)
    assert chamfer_distance(points, again).item() < 0.02  # two samplings of one surface
    bigger = sample_surface_points(large, 3000, seed=2, resolution=64)
    assert chamfer_distance(points, bigger).item() == pytest.approx(0.12, abs=0.01)  # concentric: radius gap
    cube = sample_surface_points(parse_shape_prompt("a cube"), 3000, seed=3, resolution=64)
    assert (cube.abs().amax(dim=-1) - 0.45).abs().max() < 0.02
    torch.testing.assert_close(sample_surface_points(sphere, 100, seed=4, resolution=64), sample_surface_points(sphere, 100, seed=4, resolution=64))
    with pytest.raises(ValueError, match="without faces"):
        sample_mesh_surface(torch.zeros(3, 3), torch.zeros(0, 3, dtype=torch.long), 10)


# ---------------------------------------------------------------------------------------------- config and errors
def test_yaml_class_path_and_no_state():
    parser = ArgumentParser()
    parser.add_argument("--teachers", type=TeacherEnsemble)
    config = parser.parse_string(
        "teachers:\n  class_path: teachers.ensemble.TeacherEnsemble\n  init_args:\n    teachers:\n"
        "      shape:\n        class_path: teachers.shape_teacher.ShapeTeacher\n        init_args:\n"
        "          channels: [rgb, disparity]\n          resolution: 8\n          objective: asd\n"
        "          cfg_scale: [0, 20.0, 10.0, 100]\n          t_min: [0.5, 0.02, 100]\n          plus_ratio: 0.1\n"
        "          unconditional_prompts: [a green cone]\n          weight: [0, 1.0, 0.5, 100]\n"
    )
    ensemble = parser.instantiate(config).teachers
    teacher = ensemble.teachers["shape"]
    assert isinstance(teacher, ShapeTeacher) and teacher.channels == ["rgb", "disparity"] and teacher.resolution == 8
    assert teacher.objective.cfg_scale(50) == pytest.approx(15.0) and teacher.objective.t_min(100) == pytest.approx(0.02)
    assert ensemble.weights(100) == {"shape": 0.5}
    losses = ensemble(random_render(channels=(("rgb", 3), ("disparity", 1))), PROMPTS, 100, torch.Generator().manual_seed(0))
    assert set(losses) == {"shape"} and torch.isfinite(losses["shape"]) and losses["shape"] > 0
    assert teacher.is_loaded and dict(teacher.state_dict()) == {} and list(teacher.parameters()) == []
    ensemble.prepare_prompts(["a red ball"])
    with pytest.raises(ShapePromptError, match="unknown word"):
        ensemble.prepare_prompts(["a glass owl"])


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="channels"):
        ShapeTeacher(channels=["rgb", "albedo"])
    with pytest.raises(ValueError, match="unconditional"):
        ShapeTeacher(unconditional="uniform")
    with pytest.raises(ShapePromptError, match="'owl'"):
        ShapeTeacher(unconditional_prompts=["a glass owl"])
    teacher = ShapeTeacher(channels=["rgb", "normal"])
    with pytest.raises(ValueError, match="needs render images 'normal'"):
        teacher(random_render(channels=(("rgb", 3),)), PROMPTS, 0)
    with pytest.raises(ValueError, match="3 prompts for a render batch of 2"):
        teacher(random_render(), PROMPTS + ["a cone"], 0)
    with pytest.raises(TypeError, match="needs the prompt strings"):
        teacher(random_render(), torch.zeros(2, 77, 8), 0)
    losses = teacher([random_render(seed=1), random_render(seed=2)], {"text": PROMPTS}, 0)
    assert set(losses) == {"shape/mesh_0", "shape/mesh_1"}
    with pytest.raises(ValueError, match="different sizes"):
        teacher([random_render(size=16), random_render(size=12)], PROMPTS, 0)
