"""The CUDA code paths, against their CPU / PyTorch counterparts and the reference fixtures.

Run on a CUDA machine with `pytest -m gpu` (after `pip install -e '.[nvdiffrast]'`); `make test` deselects
them (`-m "not gpu"` in pyproject's addopts), and without CUDA they skip with that reason. They compare:

- nvdiffrast with the PyTorch rasteriser on the same mesh and cameras (images, coverage, gradients) and
  through the field path (marching cubes + colour at the surface);
- the PyTorch rasteriser's position gradient on CUDA with finite differences (one triangle);
- marching cubes and field queries on CUDA with the CPU: an analytic field, and the reference student's
  triplane field (grid_sample / twice-differentiable lookup, normals, eikonal second-order gradient);
- the student (triplaneturbo_ref_A) on CUDA in float32 (fixture tolerance) and its half-precision error
  bounds (float16 / bfloat16);
- the multi-view teacher UNets on CUDA per dtype, and the teachers' CUDA forward / backward / offload.

Tolerances: those of the former benchmarks/gpu_check_rasterizers.py (measured on an H100: interior pixels
agree to 2e-6, alpha IoU 0.9999) and the fixture READMEs; the half-precision bounds are about 3 x the errors
the same computation has in float16 / bfloat16 on the CPU (worst tensors, sdf / deformation: float16 max
1.8e-2 of max(1, max |ref|), RMS 9.5e-3 of the reference's; bfloat16 0.11 and 7.2e-2), since CUDA kernels
accumulate differently. Not yet run on a GPU by their author (no device in that session).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from renderers.marching_cubes import DeformableMarchingCubes, evaluate_field_on_grid
from renderers.mesh_renderer import MeshRenderer
from tests.gpu_helpers import (
    IMAGES,
    SceneField,
    compare_rasterizers,
    scene_cameras,
    scene_mesh,
    single_triangle_gradients,
)
from tests.tiny_sd import FIXTURES

CUDA = torch.device("cuda")
REFERENCE_BACKEND = "nvdiffrast"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA device (GPU code paths; run `pytest -m gpu` on a CUDA machine)",
    ),
]

# nvdiffrast vs PyTorch rasteriser (512 px, 4 training + 4 evaluation views, 128^3 mesh of SceneField)
RASTER_RESOLUTION, RASTER_VIEWS, RASTER_GRID = 512, 4, 128
MIN_IOU = 0.995  # alpha > 0.5 masks
MAX_INTERIOR_DIFF = 2e-3  # any image, pixels away from silhouette / occlusion edges (depth: relative)
MAX_MEAN_DIFF = 5e-3  # rgb / alpha / normal, all pixels (edges differ by anti-aliasing details)
MIN_COLOUR_GRAD_COSINE = 0.98
# nvdiffrast's own barycentric gradient is not the exact derivative of its forward (the single-triangle
# probe against finite differences shows it), so vertex positions get a looser bound.
MIN_POSITION_GRAD_COSINE = 0.9
MIN_PROBE_FD_COSINE = 0.99999
FP32_FIXTURE_TOL = 1e-4  # x max(1, max |reference|), as tests/test_student_fixture.py
HALF_BOUNDS = {  # dtype: (max abs error / max(1, max |ref|), RMS error / RMS(ref)), per fixture tensor
    torch.float16: (0.06, 0.03),
    torch.bfloat16: (0.35, 0.25),
}
STUDENT_FIXTURE = FIXTURES / "triplaneturbo_ref_A"


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 off: float32 results on CUDA are compared with float32 CPU results."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _require_nvdiffrast() -> None:
    from renderers.rasterizers import nvdiffrast_available

    if not nvdiffrast_available():
        pytest.fail("nvdiffrast is not installed: pip install -e '.[nvdiffrast]' (compiles on first use)")


# ---------------------------------------------------------------------------------------------
# Rasterisers


@pytest.fixture(scope="module")
def raster_scene():
    scene, mesh, colors = scene_mesh(CUDA, RASTER_GRID)
    return scene, mesh, colors, scene_cameras(RASTER_VIEWS, RASTER_RESOLUTION, CUDA)


def _renderers(grid: int = RASTER_GRID) -> tuple[MeshRenderer, MeshRenderer]:
    return (
        MeshRenderer(resolution=grid, backend=REFERENCE_BACKEND).to(CUDA),
        MeshRenderer(resolution=grid, backend="torch").to(CUDA),
    )


def test_nvdiffrast_and_pytorch_rasterisers_agree_on_the_same_mesh(raster_scene):
    _require_nvdiffrast()
    _, mesh, colors, cameras = raster_scene
    assert mesh.num_faces > 10_000
    result = compare_rasterizers(*_renderers(), mesh, colors, cameras)
    assert result.iou >= MIN_IOU, result
    assert result.interior_fraction > 0.05, result  # the interior comparison is not vacuous
    for name in IMAGES:
        assert result.interior_max[name] <= MAX_INTERIOR_DIFF, (name, result)
    for name in ("rgb", "alpha", "normal"):
        assert result.mean_abs[name] <= MAX_MEAN_DIFF, (name, result)
    assert result.grad_cosine["vertex colours"] >= MIN_COLOUR_GRAD_COSINE, result
    assert result.grad_cosine["vertex positions"] >= MIN_POSITION_GRAD_COSINE, result


def test_nvdiffrast_and_pytorch_rasterisers_agree_through_the_field_path(raster_scene):
    """Marching cubes of the field on CUDA, colour MLP at the surface, each backend."""
    _require_nvdiffrast()
    scene, _, _, cameras = raster_scene
    a, b = (renderer(scene, cameras) for renderer in _renderers())
    mask_a, mask_b = a["alpha"] > 0.5, b["alpha"] > 0.5
    iou = ((mask_a & mask_b).sum() / (mask_a | mask_b).sum()).item()
    assert iou >= MIN_IOU
    assert (a["rgb"] - b["rgb"]).abs().mean().item() <= MAX_MEAN_DIFF


def test_pytorch_rasteriser_position_gradient_on_cuda_matches_finite_differences():
    """One large triangle without anti-aliasing: the PyTorch backend's vertex gradient on CUDA (float32) is
    the derivative of its forward (central differences of the float64 forward)."""
    grads = single_triangle_gradients(CUDA, {"torch cuda": "torch"})
    fd = grads["finite differences"]
    assert fd.norm() > 0
    for label in ("torch cuda", "torch cpu f64"):
        cosine = F.cosine_similarity(grads[label], fd, dim=0).item()
        assert cosine >= MIN_PROBE_FD_COSINE, (label, cosine)
        assert (grads[label].norm() / fd.norm()).item() == pytest.approx(1.0, abs=1e-3), label


# ---------------------------------------------------------------------------------------------
# Marching cubes and field queries: CUDA vs CPU


def test_marching_cubes_of_an_analytic_field_on_cuda_matches_the_cpu():
    resolution = 112  # every grid value of SceneField is >= 6e-6 away from 0 (float32 vs float64: 2.4e-7)
    values = {
        key: evaluate_field_on_grid(SceneField(device), resolution, deformation=True, device=device)
        for key, device in (("cpu", "cpu"), ("cuda", CUDA))
    }
    (sdf_cpu, deform_cpu), (sdf_cuda, deform_cuda) = values["cpu"], values["cuda"]
    torch.testing.assert_close(sdf_cuda.cpu(), sdf_cpu, rtol=0, atol=2e-6)  # values up to 1.7
    torch.testing.assert_close(deform_cuda.cpu(), deform_cpu, rtol=0, atol=2e-6)
    assert torch.equal(sdf_cuda.cpu() < 0, sdf_cpu < 0)  # same signs: both devices extract the same topology

    # the extraction itself from the SAME grid values on both devices: vertices and their gradients
    marching_cubes = DeformableMarchingCubes(resolution=resolution)
    meshes, grads = {}, {}
    for key, device in (("cpu", "cpu"), ("cuda", CUDA)):
        sdf = sdf_cpu.detach().clone().to(device).requires_grad_(True)
        deform = deform_cpu.detach().clone().to(device).requires_grad_(True)
        mesh = marching_cubes.extract(sdf, deform)[0]
        weights = torch.rand(mesh.vertices.shape, generator=torch.Generator().manual_seed(0)).to(mesh.vertices)
        (mesh.vertices * weights).sum().backward()
        meshes[key], grads[key] = mesh, (sdf.grad, deform.grad)
    assert meshes["cpu"].num_faces > 10_000 and meshes["cuda"].vertices.is_cuda
    assert torch.equal(meshes["cuda"].faces.cpu(), meshes["cpu"].faces)
    torch.testing.assert_close(meshes["cuda"].vertices.detach().cpu(), meshes["cpu"].vertices.detach(), rtol=0, atol=1e-6)
    for got, expected in zip(grads["cuda"], grads["cpu"], strict=True):
        scale = float(expected.abs().max())
        assert scale > 0
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-6 * scale)

    # the field path (the grid evaluated on CUDA by DeformableMarchingCubes itself): same faces, vertices within
    # a small fraction of a cell (h = 0.018; float32 vs float64 grid values move them by 3.8e-6 on the CPU)
    from_field = DeformableMarchingCubes(resolution=resolution)(SceneField(CUDA))[0]
    assert torch.equal(from_field.faces.cpu(), meshes["cpu"].faces)
    torch.testing.assert_close(from_field.vertices.detach().cpu(), meshes["cpu"].vertices.detach(), rtol=0, atol=5e-5)


@pytest.fixture(scope="module")
def fixture_prompts():
    with safe_open(str(STUDENT_FIXTURE / "inputs.safetensors"), "pt") as f:
        return json.loads(f.metadata()["prompts_json"])


def _sample_fixture(device, dtype, prompts):
    """The fixture student on `device` in `dtype`: (named outputs, field), all through the public API."""
    from lightning_modules.student import TriplaneStudent

    inputs = load_file(str(STUDENT_FIXTURE / "inputs.safetensors"))
    student = TriplaneStudent.from_pretrained(
        STUDENT_FIXTURE / "base", STUDENT_FIXTURE / "triplane_turbo.pth", device=device, dtype=dtype
    )
    emb = student.encode_prompt(prompts)
    noise = inputs["noise"].view(len(prompts), 6, *inputs["noise"].shape[1:]).to(device)
    field, trace = student.sample(emb, noise=noise, return_intermediates=True)
    points = inputs["points"].to(device).expand(len(prompts), -1, -1)
    with torch.no_grad():
        got = {
            "text_embeddings": emb,
            "final_latents": trace.latents,
            "triplane_raw": field.triplane_raw,
            "planes_rotated": field.planes,
            "sdf": field.sdf(points),
            "deformation": field.deformation(points),
            "rgb": field.color(points),
        }
    for k in range(len(trace.timesteps)):
        got[f"step{k}_eps"] = trace.eps[k]
        got[f"step{k}_x0"] = trace.x0[k]
    return got, field


def _fixture_reference(name: str) -> torch.Tensor:
    inputs = load_file(str(STUDENT_FIXTURE / "inputs.safetensors"))
    expected = load_file(str(STUDENT_FIXTURE / "expected.safetensors"))
    return (expected[name] if name in expected else inputs[name]).float()


@pytest.fixture(scope="module")
def cpu_field(fixture_prompts):
    return _sample_fixture("cpu", torch.float32, fixture_prompts)[1]


def _field_on(field, device):
    """The same triplane field (planes and MLPs copied) on another device."""
    moved = copy.copy(field)
    moved.planes = field.planes.detach().to(device)
    for name in ("sdf_network", "feature_network", "deformation_network"):
        network = getattr(field, name)
        setattr(moved, name, None if network is None else copy.deepcopy(network).to(device))
    return moved


def test_triplane_field_queries_on_cuda_match_the_cpu(cpu_field):
    cuda_field = _field_on(cpu_field, CUDA)
    points = torch.rand(cpu_field.batch_size, 4096, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        for name in ("sdf", "deformation", "color", "features", "geo_features", "tex_features"):
            expected = getattr(cpu_field, name)(points)
            got = getattr(cuda_field, name)(points.to(CUDA)).cpu()
            scale = max(1.0, float(expected.abs().max()))
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * scale, msg=name)

    # points requiring grad take the twice-differentiable lookup: same values as grid_sample on CUDA
    cuda_points = points.to(CUDA)
    with torch.no_grad():
        plain = cuda_field.sdf(cuda_points)
    tracked = cuda_field.sdf(cuda_points.clone().requires_grad_(True))
    torch.testing.assert_close(tracked.detach(), plain, rtol=0, atol=1e-5 * max(1.0, float(plain.abs().max())))

    # normals, and the eikonal term's gradient w.r.t. the planes (a second-order derivative, which CUDA's
    # grid sampler does not have), agree with the CPU
    results = {}
    for key, device, field in (("cpu", "cpu", _field_on(cpu_field, "cpu")), ("cuda", CUDA, cuda_field)):
        planes = field.planes.clone().requires_grad_(True)
        field.planes = planes
        _, gradient = field.sdf_and_gradient(points.to(device), create_graph=True)
        ((gradient.norm(dim=-1) - 1) ** 2).mean().backward()
        results[key] = (gradient.detach().cpu(), planes.grad.cpu())
    for got, expected in zip(results["cuda"], results["cpu"], strict=True):
        scale = float(expected.abs().max())
        assert scale > 0
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)


def test_marching_cubes_of_the_student_field_on_cuda_matches_the_cpu(cpu_field):
    resolution = 56  # the fixture field's grid values are >= 4.9e-3 away from 0 at this resolution
    cuda_field = _field_on(cpu_field, CUDA)
    with torch.no_grad():
        sdf_cpu, _ = evaluate_field_on_grid(cpu_field, resolution)
        sdf_cuda, _ = evaluate_field_on_grid(cuda_field, resolution, device=CUDA)
    torch.testing.assert_close(sdf_cuda.cpu(), sdf_cpu, rtol=0, atol=1e-5 * max(1.0, float(sdf_cpu.abs().max())))
    assert torch.equal(sdf_cuda.cpu() < 0, sdf_cpu < 0)  # same signs: the same topology
    with torch.no_grad():
        mesh_cpu = DeformableMarchingCubes(resolution=resolution)(cpu_field)[0]
        mesh_cuda = DeformableMarchingCubes(resolution=resolution)(cuda_field)[0]
    assert mesh_cpu.num_faces > 100 and not mesh_cpu.used_fallback
    assert mesh_cuda.vertices.is_cuda
    assert torch.equal(mesh_cuda.faces.cpu(), mesh_cpu.faces)
    # crossed edges have |d1 - d0| >= 1e-2 here, so value differences of 1e-5 move vertices by < 1e-4 of a cell
    torch.testing.assert_close(mesh_cuda.vertices.cpu(), mesh_cpu.vertices, rtol=0, atol=5e-5)


# ---------------------------------------------------------------------------------------------
# The student on CUDA: float32 fixture tolerance, half-precision error bounds


def test_student_fixture_on_cuda_in_float32(fixture_prompts):
    got, _ = _sample_fixture(CUDA, torch.float32, fixture_prompts)
    for name, value in got.items():
        ref = _fixture_reference(name)
        assert value.is_cuda and value.dtype == torch.float32, name
        err = (value.float().cpu().reshape(ref.shape) - ref).abs().max().item()
        tol = FP32_FIXTURE_TOL * max(1.0, ref.abs().max().item())
        assert err <= tol, f"{name}: max abs error {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_student_half_precision_error_bounds_on_cuda(fixture_prompts, dtype):
    max_bound, rms_bound = HALF_BOUNDS[dtype]
    got, _ = _sample_fixture(CUDA, dtype, fixture_prompts)
    for name, value in got.items():
        ref = _fixture_reference(name)
        assert value.is_cuda and value.dtype == dtype, (name, value.dtype)
        diff = value.float().cpu().reshape(ref.shape) - ref
        assert torch.isfinite(diff).all(), name
        err = diff.abs().max().item()
        assert err <= max_bound * max(1.0, ref.abs().max().item()), f"{name}: max abs error {err:.3e}"
        rms = (diff.square().mean().sqrt() / ref.square().mean().sqrt()).item()
        assert rms <= rms_bound, f"{name}: relative RMS error {rms:.3e}"


# ---------------------------------------------------------------------------------------------
# Teachers on CUDA


@pytest.mark.parametrize("family", ["mvdream_ref_A", "richdreamer_nd_ref_A"])
@pytest.mark.parametrize(
    "dtype, atol", [(torch.float32, 1e-4), (torch.float16, 0.02), (torch.bfloat16, 0.1)], ids=str
)
def test_multiview_unet_fixtures_on_cuda(family, dtype, atol):
    """Tolerances of tests/test_multiview_unet.py (fixture READMEs: float32 1e-4; the half-precision ones
    are about 3 x the CPU errors, outputs up to 2.7)."""
    from teachers.multiview_unet import MultiViewUNet

    folder = FIXTURES / family
    inputs = {k: v.to(CUDA) for k, v in load_file(str(folder / "inputs.safetensors")).items()}
    expected = load_file(str(folder / "expected.safetensors"))
    model = MultiViewUNet.from_original_checkpoint(
        folder / "model.ckpt", folder / "config.yaml", dtype=dtype, device=CUDA
    )
    with torch.no_grad():
        eps = model(inputs["x"], inputs["timesteps"], inputs["context"], inputs["camera"], num_frames=4)
    assert eps.is_cuda and eps.dtype == torch.float32
    err = (eps.cpu() - expected["eps"]).abs().max().item()
    assert err <= atol, f"{family} {dtype}: max abs error {err:.2e}"


def _cuda_render(size: int, seed: int = 0):
    from renderers.types import Cameras, RenderOutput
    from teachers.camera_vectors import c2w_from_spherical

    g = torch.Generator().manual_seed(seed)
    elevation = (torch.rand(2, 1, generator=g) * 30).expand(2, 4).clone()
    azimuth = (torch.rand(2, 1, generator=g) + torch.arange(4)) / 4 * 360 - 180
    fovy = torch.full((2, 4), math.radians(60.0))
    distance = (0.8 + 0.2 * torch.rand(2, 1, generator=g)).expand(2, 4) / math.tan(math.radians(30))
    cameras = Cameras(
        c2w_from_spherical(elevation, azimuth, distance), fovy, elevation, azimuth, distance, size, size
    )
    images = {
        name: torch.rand(2, 4, c, size, size, generator=g).to(CUDA).requires_grad_(True)
        for name, c in (("rgb", 3), ("normal", 3), ("disparity", 1))
    }
    return RenderOutput(images, cameras.to(CUDA), "mesh")


@pytest.fixture(scope="module")
def teacher_builders(tmp_path_factory):
    """name -> (build(**kwargs), render size) for the tiny SD / MVDream / RichDreamer ND teachers."""
    from teachers.mvdream import MVDreamTeacher
    from teachers.richdreamer import RichDreamerNormalDepthTeacher
    from teachers.stable_diffusion import StableDiffusionTeacher
    from tests.teacher_helpers import MV_FIXTURE, ND_FIXTURE, make_sd_dir_for, unet_params, vae_factor
    from tests.tiny_sd import make_tiny_sd

    work = tmp_path_factory.mktemp("teachers_gpu")
    tiny_sd, mv_sd, nd_sd = (
        make_tiny_sd(work / "sd"),
        make_sd_dir_for(MV_FIXTURE, work / "mv_sd"),
        make_sd_dir_for(ND_FIXTURE, work / "nd_sd"),
    )
    common = dict(prompt_cache_dir=str(work / "cache"), text_encoder_device="cuda")
    return {
        "sd_tiny": (lambda **kw: StableDiffusionTeacher(pretrained=str(tiny_sd), resolution=64, **common, **kw), 64),
        "mvdream_fixture": (
            lambda **kw: MVDreamTeacher(
                ckpt_path=str(MV_FIXTURE / "model.ckpt"),
                config_path=str(MV_FIXTURE / "config.yaml"),
                hub_id=None,
                vae=str(mv_sd),
                text_encoder=str(mv_sd),
                resolution=unet_params(MV_FIXTURE)["image_size"] * vae_factor(mv_sd),
                **common,
                **kw,
            ),
            64,
        ),
        "richdreamer_nd_fixture": (
            lambda **kw: RichDreamerNormalDepthTeacher(
                ckpt_path=str(ND_FIXTURE / "model.ckpt"),
                config_path=str(ND_FIXTURE / "config.yaml"),
                text_encoder=str(nd_sd),
                resolution=unet_params(ND_FIXTURE)["image_size"],
                **common,
                **kw,
            ),
            64,
        ),
    }


@pytest.mark.parametrize("offload", [False, True], ids=["resident", "offload"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", ["sd_tiny", "mvdream_fixture", "richdreamer_nd_fixture"])
def test_teacher_forward_backward_and_offload_on_cuda(teacher_builders, name, dtype, offload):
    """A finite float32 loss and a finite, non-zero render gradient on CUDA; with offload the frozen weights
    are back on the CPU once the backward that reads them is done, and their CUDA memory is released;
    without it they stay on CUDA."""
    build, size = teacher_builders[name]
    teacher = build(dtype=dtype, offload=offload)
    teacher(_cuda_render(size), ["a red chair", "a glass owl"], 0)  # loading, prompt encoding, kernels
    torch.cuda.synchronize()
    render = _cuda_render(size, seed=1)
    before = torch.cuda.memory_allocated()
    loss = teacher(render, ["a red chair", "a glass owl"], 0, torch.Generator("cuda").manual_seed(0))[teacher.name]
    assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)
    devices_after_call = {p.device.type for p in teacher.frozen_parameters()}
    loss.backward()
    torch.cuda.synchronize()
    devices_after_backward = {p.device.type for p in teacher.frozen_parameters()}
    grads = [render[k].grad for k in ("rgb", "normal", "disparity") if render[k].grad is not None]
    assert grads and all(g.is_cuda and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    del loss
    torch.cuda.synchronize()
    leftover_mb = (torch.cuda.memory_allocated() - before) / 2**20
    weights_mb = sum(p.numel() * p.element_size() for p in teacher.frozen_parameters()) / 2**20
    if offload:
        assert devices_after_backward == {"cpu"}
        assert leftover_mb < 0.5 * weights_mb + 8, (leftover_mb, weights_mb)
    else:
        assert devices_after_call == devices_after_backward == {"cuda"}
