"""`prd eval` on 3D Gaussian Splatting PLYs: read, normalised and rendered under the meshes' protocol."""

import json

import numpy as np
import pytest
import torch

from lightning_modules.cli import main as prd_main
from lightning_modules.evaluation.gaussians import is_gaussian_file, load_gaussians, normalize_gaussians
from lightning_modules.evaluation.meshes import slugify
from lightning_modules.evaluation.protocol import RenderProtocol, render_views
from lightning_modules.evaluation.run import load_object, normalize_object
from renderers.errors import UserError
from renderers.export import export_mesh
from renderers.gaussian_ply import write_gaussian_ply
from renderers.gaussians import Gaussians, rgb_to_sh0
from tests.test_eval import box
from tests.tiny_clip import make_tiny_clip

PROMPTS = ["a red plank", "a green tower", "a blue slab", "a yellow block"]
COLOURS = [(1.0, 0.0, 0.0), (0.0, 0.8, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 0.0)]
HALVES = [(0.8, 0.3, 0.2), (0.2, 0.2, 0.7), (0.6, 0.6, 0.1), (0.4, 0.4, 0.4)]


def gaussian_box(half, colour, spacing: float = 0.05) -> Gaussians:
    """Round Gaussians (standard deviation spacing / 2) on a grid filling the box [-half, half] (world
    frame), one colour, nearly opaque."""
    axes = [torch.linspace(-h, h, round(2 * h / spacing) + 1) for h in half]
    means = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(1, -1, 3)
    count = means.shape[1]
    return Gaussians(
        means=means,
        quats=torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(1, count, 4).clone(),
        scales=torch.full((1, count, 3), spacing / 2),
        opacities=torch.full((1, count), 0.9),
        sh=rgb_to_sh0(torch.tensor(colour)).expand(1, count, 1, 3).clone(),
    )


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip_eval_gaussians"))


@pytest.fixture(scope="module")
def splat_dir(tmp_path_factory):
    """Three Gaussian PLYs and, for the last prompt, a mesh: one table for both."""
    folder = tmp_path_factory.mktemp("splats")
    for i, (prompt, colour, half) in enumerate(zip(PROMPTS, COLOURS, HALVES, strict=True)):
        if i < 3:
            write_gaussian_ply(folder / f"{i:04d}_{slugify(prompt)}.ply", gaussian_box(half, colour))
        else:
            export_mesh(folder / f"{i:04d}_{slugify(prompt)}.glb", *box(half, colour))
    return folder


def non_white(images: torch.Tensor) -> torch.Tensor:
    """[V, 3, H, W] -> [V, H, W] mask of the pixels more than half covered (every colour here has a 0
    channel, which is 1 - coverage on white)."""
    return (images < 0.5).any(dim=1)


def test_a_splat_and_a_mesh_of_the_same_box_render_alike(tmp_path):
    """Same protocol, same axes (files in viewer axes), same normalisation: the silhouettes of a flat,
    long box (orientation matters) as a mesh PLY and as a Gaussian PLY agree, view by view."""
    half, colour = (0.8, 0.3, 0.2), (1.0, 0.0, 0.0)
    export_mesh(tmp_path / "mesh.ply", *box(half, colour))
    write_gaussian_ply(tmp_path / "splat.ply", gaussian_box(half, colour))
    assert is_gaussian_file(tmp_path / "splat.ply") and not is_gaussian_file(tmp_path / "mesh.ply")
    protocol = RenderProtocol(resolution=48)
    renders = {}
    for name in ("mesh", "splat"):
        loaded = load_object(tmp_path / f"{name}.ply", protocol.mesh_frame)
        assert isinstance(loaded, Gaussians) == (name == "splat")
        renders[name] = render_views(normalize_object(loaded, protocol.normalize, protocol.bound), protocol)
    assert renders["splat"].shape == (4, 3, 48, 48)
    mesh_mask, splat_mask = non_white(renders["mesh"]), non_white(renders["splat"])
    # the splat covers the mesh's pixels, and reaches at most 2 px beyond them (its Gaussians' tails: the
    # centres span the box, and a border pixel sees a row of them)
    mesh_grown = torch.nn.functional.max_pool2d(mesh_mask[:, None].float(), 5, stride=1, padding=2)[:, 0] > 0
    for view in range(4):
        assert (mesh_mask[view] & ~splat_mask[view]).sum() <= 0.01 * mesh_mask[view].sum(), view
        assert not (splat_mask[view] & ~mesh_grown[view]).any(), view
        assert (splat_mask[view] & ~mesh_mask[view]).any(), view  # (the check above can fail)
    # the long side faces the cameras at azimuth 90 / 270 (x is the front axis): wider silhouettes there
    width = splat_mask.any(dim=1).sum(dim=-1)  # [V] drawn columns
    assert width[1] > 1.5 * width[0] and width[3] > 1.5 * width[2]
    # and the splat is red where it is drawn
    drawn = renders["splat"].permute(0, 2, 3, 1)[splat_mask]
    assert (drawn[:, 0] > 0.8).float().mean() > 0.5 and (drawn[:, 1:] < 0.3).all(dim=1).float().mean() > 0.5


def test_gaussian_box_normalisation_ignores_invisible_gaussians():
    gaussians = gaussian_box((0.5, 0.25, 0.1), (1.0, 1.0, 1.0), spacing=0.1)
    far = Gaussians(
        means=torch.tensor([[[5.0, 5.0, 5.0]]]), quats=torch.tensor([[[1.0, 0.0, 0.0, 0.0]]]),
        scales=torch.full((1, 1, 3), 0.1), opacities=torch.zeros(1, 1), sh=torch.zeros(1, 1, 1, 3),
    )  # fmt: skip
    both = Gaussians(*(torch.cat([a, b], dim=1) for a, b in zip(gaussians.__dict__.values(), far.__dict__.values(), strict=True)))
    out = normalize_gaussians(both, "box", 0.9)
    visible = out.means[0, :-1]
    torch.testing.assert_close(visible.amax(0), torch.tensor([0.9, 0.45, 0.18]))
    torch.testing.assert_close(visible.amin(0), -torch.tensor([0.9, 0.45, 0.18]))
    torch.testing.assert_close(out.scales, both.scales * 1.8)
    assert normalize_gaussians(both, "none") is both


def test_a_splat_without_visible_gaussians_is_a_one_line_error(tmp_path):
    ghost = gaussian_box((0.5, 0.5, 0.5), (1.0, 0.0, 0.0), spacing=0.5)
    ghost.opacities.zero_()
    write_gaussian_ply(tmp_path / "ghost.ply", ghost)
    with pytest.raises(UserError, match="no visible Gaussian"):
        load_gaussians(tmp_path / "ghost.ply")


def test_prd_eval_scores_gaussian_plys_and_meshes_in_one_table(splat_dir, tiny_clip_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "run"
    argv = ["eval", "--meshes", str(splat_dir), "--prompts", str(prompts), "--out", str(out),
            "--clip-model", f"local-dir:{tiny_clip_dir}", "--resolution", "32", "--no-progress", "--device", "cpu"]  # fmt: skip
    assert prd_main(argv) == 0
    assert "CLIP score" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["num_prompts"] == 4 and results["missing"] == [] and results["unreadable"] == []
    assert 0.0 <= results["clip_score"] <= 2.5
    from lightning_modules.evaluation.run import load_views

    for i, (prompt, colour) in enumerate(zip(PROMPTS, COLOURS, strict=True)):
        folder = out / "renders" / f"{i:04d}_{slugify(prompt)}"
        views = load_views(sorted(folder.glob("az*.png")))
        assert views.shape == (4, 3, 32, 32)
        drawn = views.permute(0, 2, 3, 1)[non_white(views)]
        assert len(drawn) > 20, prompt
        # each object shows its own colour (the splats as the mesh): mean colour near it
        np.testing.assert_allclose(drawn.mean(0).numpy(), colour, atol=0.3)
