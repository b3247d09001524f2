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


@pytest.fixture(scope="module")
def generate_folder(tmp_path_factory):
    """What a Gaussian student's `prd generate` writes for the first two prompts: per prompt a mesh (a red box) and
    `<name>_gaussians.ply` (a green splat box), both listed in the manifest."""
    folder = tmp_path_factory.mktemp("gaussian_generate")
    records = []
    for i, (prompt, half) in enumerate(zip(PROMPTS[:2], HALVES, strict=False)):
        stem = f"{i:04d}_{slugify(prompt)}"
        export_mesh(folder / f"{stem}.glb", *box(half, (1.0, 0.0, 0.0)))
        write_gaussian_ply(folder / f"{stem}_gaussians.ply", gaussian_box(half, (0.0, 0.8, 0.0)))
        records.append({"index": i, "prompt": prompt, "file": f"{stem}.glb", "gaussians_file": f"{stem}_gaussians.ply"})
    (folder / "manifest.json").write_text(json.dumps({"meshes": records}))
    return folder


def _eval_colours(folder, tiny_clip_dir, tmp_path, *extra) -> list[np.ndarray]:
    """`prd eval --meshes folder` on the first two prompts: the mean colour of each prompt's drawn pixels."""
    from lightning_modules.evaluation.run import load_views

    tmp_path.mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    out = tmp_path / "run"
    argv = ["eval", "--meshes", str(folder), "--prompts", str(prompts), "--out", str(out), *extra,
            "--clip-model", f"local-dir:{tiny_clip_dir}", "--resolution", "32", "--no-progress", "--device", "cpu"]  # fmt: skip
    assert prd_main(argv) == 0
    colours = []
    for i, prompt in enumerate(PROMPTS[:2]):
        views = load_views(sorted((out / "renders" / f"{i:04d}_{slugify(prompt)}").glob("az*.png")))
        colours.append(views.permute(0, 2, 3, 1)[non_white(views)].mean(0).numpy())
    return colours


@pytest.mark.parametrize("manifest", [True, False])
def test_representation_gaussians_scores_the_splats_of_a_generate_folder(generate_folder, tiny_clip_dir, tmp_path,
                                                                         manifest):
    """The same folder scores its red meshes by default and its green splats with --representation gaussians,
    found through the manifest's `gaussians_file` or, without a manifest, by their `_gaussians.ply` names."""
    folder = generate_folder
    if not manifest:
        folder = tmp_path / "names"
        folder.mkdir()
        for path in generate_folder.iterdir():
            if path.name != "manifest.json":
                (folder / path.name).write_bytes(path.read_bytes())
    assert (folder / "manifest.json").is_file() == manifest
    for colour in _eval_colours(folder, tiny_clip_dir, tmp_path / "meshes"):
        np.testing.assert_allclose(colour, (1.0, 0.0, 0.0), atol=0.3)
    for colour in _eval_colours(folder, tiny_clip_dir, tmp_path / "splats", "--representation", "gaussians"):
        np.testing.assert_allclose(colour, (0.0, 0.8, 0.0), atol=0.3)


def test_representation_gaussians_without_gaussians_is_a_one_line_error(splat_dir, tiny_clip_dir, tmp_path, capsys):
    """A manifest without `gaussians_file` and a folder without `_gaussians.ply` files: one line, exit code 2."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    with_manifest = tmp_path / "with_manifest"
    with_manifest.mkdir()
    export_mesh(with_manifest / "a.glb", *box())
    (with_manifest / "manifest.json").write_text(json.dumps({"meshes": [{"prompt": PROMPTS[0], "file": "a.glb"}]}))
    for folder, message in ((with_manifest, "lists no Gaussians (prompt 'a red plank')"),
                            (splat_dir, "no Gaussian PLYs (*_gaussians.ply")):
        argv = ["eval", "--meshes", str(folder), "--prompts", str(prompts), "--out", str(tmp_path / "out"),
                "--representation", "gaussians", "--clip-model", f"local-dir:{tiny_clip_dir}", "--device", "cpu"]
        assert prd_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_generate_mode_scores_a_gaussian_students_splats(gaussian_student, tiny_sd_dir, ref_weights, tiny_clip_dir,
                                                         tmp_path, capsys):
    """`prd eval --weights` of a Gaussian student with --representation gaussians generates and scores its 3DGS PLYs
    (kept in OUT/meshes); a mesh-only student is a one-line error."""
    from lightning_modules.evaluation.gaussians import is_gaussian_file

    _, weights = gaussian_student
    prompts = tmp_path / "two.txt"
    prompts.write_text("a red car\na blue chair\n")
    common = ["--prompts", str(prompts), "--clip-model", f"local-dir:{tiny_clip_dir}", "--resolution", "32",
              "--mesh-resolution", "16", "--no-progress", "--device", "cpu", "--representation", "gaussians"]
    assert prd_main(["eval", "--weights", str(weights), "--base", str(tiny_sd_dir), "--out", str(tmp_path / "g"),
                     *common]) == 0
    files = sorted((tmp_path / "g" / "meshes").iterdir())
    assert [p.name for p in files] == ["0000_a_red_car_gaussians.ply", "0001_a_blue_chair_gaussians.ply"]
    assert all(is_gaussian_file(p) for p in files)
    results = json.loads((tmp_path / "g" / "results.json").read_text())
    assert results["num_prompts"] == 2 and 0.0 <= results["clip_score"] <= 2.5
    capsys.readouterr()
    assert prd_main(["eval", "--weights", str(ref_weights), "--out", str(tmp_path / "m"), *common]) == 2
    assert "makes no 3D Gaussians" in capsys.readouterr().err
