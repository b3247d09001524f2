"""Fast generation on the tiny reference student: half precision (bounded against float32 and the fixture),
SDPA everywhere, torch.compile wiring, streaming, batching and the export thread (issue 11, items 3-5)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from lightning_modules.cli import main
from lightning_modules.student import TriplaneStudent
from lightning_modules.student import generation as generation_module
from lightning_modules.student.generation import generate, generate_meshes, iter_generate, sample_fields
from lightning_modules.student.inference import (
    attention_implementations,
    batch_sizes_of_run,
    compile_forward,
    prepare_for_inference,
    uncompile_forward,
)
from renderers.marching_cubes import extract_mesh, grid_points
from tests.threads import single_thread  # noqa: F401  (fixture)

PROMPTS = ["a red car", "a blue chair", "a green lamp"]
pytestmark = pytest.mark.usefixtures("single_thread")


def load_student(fixtures_dir, dtype=torch.float32):
    folder = fixtures_dir / "triplaneturbo_ref_A"
    student = TriplaneStudent.from_pretrained(folder / "base", weights=folder / "triplane_turbo.pth")
    student.merge_adapters()  # as prd generate: in float32, before the cast
    return prepare_for_inference(student, dtype)


@pytest.fixture(scope="module")
def student(fixtures_dir):
    return load_student(fixtures_dir)


@pytest.fixture(scope="module")
def student_bf16(fixtures_dir):
    return load_student(fixtures_dir, torch.bfloat16)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def chamfer(a: torch.Tensor, b: torch.Tensor) -> float:
    """Symmetric mean nearest-neighbour distance of two vertex sets `[N, 3]`, `[M, 3]`."""
    d = torch.cdist(a.float(), b.float())
    return 0.5 * (d.min(1).values.mean() + d.min(0).values.mean()).item()


def test_bfloat16_keeps_sampler_and_field_in_float32(student_bf16):
    assert student_bf16.dtype == torch.bfloat16
    assert student_bf16.latent_dtype == torch.float32 and student_bf16.field_dtype == torch.float32
    assert next(student_bf16.text_encoder.parameters()).dtype == torch.bfloat16
    emb = student_bf16.encode_prompt(PROMPTS[:1])
    latents = student_bf16.denoise(emb, student_bf16.make_noise(1, seed=0))
    field = student_bf16.decode(latents)
    assert latents.dtype == torch.float32 and field.planes.dtype == torch.float32


def test_bfloat16_error_against_float32_is_bounded(student, student_bf16):
    """Measured (1 thread, CPU, 2 objects, 64^3): latents 0.31 %, planes 0.94 % of their max; SDF on the grid
    0.10 (its values reach 10), 4 of 524,288 grid signs flipped; vertices 268 / 272 and 124 / 132 (bf16 / fp32),
    Chamfer distance of the vertex sets below 0.1 grid cell."""
    resolution = 64
    fields, latents = {}, {}
    for name, s in (("float32", student), ("bfloat16", student_bf16)):
        emb = s.encode_prompt(PROMPTS[:2])
        latents[name] = s.denoise(emb, torch.cat([s.make_noise(1, seed=i) for i in (0, 1)]))
        fields[name] = s.decode(latents[name])
    ref, half = fields["float32"], fields["bfloat16"]
    assert relative_error(latents["bfloat16"], latents["float32"]) < 0.01
    assert relative_error(half.planes, ref.planes) < 0.03
    points = grid_points(resolution)
    sdf_ref, sdf_half = ref.sdf(points), half.sdf(points)
    assert (sdf_half - sdf_ref).abs().max() < 0.025 * sdf_ref.abs().max()
    assert ((sdf_half < 0) != (sdf_ref < 0)).float().mean() < 5e-5
    cell = 2 / (resolution - 1)
    for mesh_ref, mesh_half in zip(extract_mesh(ref, resolution=resolution), extract_mesh(half, resolution=resolution),
                                   strict=True):
        assert mesh_ref.num_vertices > 100
        assert abs(mesh_half.num_vertices - mesh_ref.num_vertices) <= 0.1 * mesh_ref.num_vertices
        distance = chamfer(mesh_half.vertices, mesh_ref.vertices)
        assert distance < 0.2 * cell, f"Chamfer {distance / cell:.3f} cells"


@pytest.mark.parametrize(("dtype", "bounds"), [
    # measured max error / max(1, max |reference|), merged adapters, CPU: see README (precision)
    (torch.bfloat16, dict(final_latents=0.015, planes_rotated=0.03, sdf=0.02, deformation=0.04, rgb=0.015)),
    (torch.float16, dict(final_latents=0.002, planes_rotated=0.005, sdf=0.004, deformation=0.006, rgb=0.002)),
])
def test_reference_fixture_in_half_precision(fixtures_dir, dtype, bounds):
    folder = fixtures_dir / "triplaneturbo_ref_A"
    with safe_open(str(folder / "inputs.safetensors"), "pt") as f:
        prompts = json.loads(f.metadata()["prompts_json"])
    inputs, expected = load_file(str(folder / "inputs.safetensors")), load_file(str(folder / "expected.safetensors"))
    s = load_student(fixtures_dir, dtype)
    noise = inputs["noise"].view(len(prompts), 6, *inputs["noise"].shape[1:])
    field, trace = s.sample(s.encode_prompt(prompts), noise=noise, return_intermediates=True)
    points = inputs["points"].expand(len(prompts), -1, -1)
    got = dict(final_latents=trace.latents, planes_rotated=field.planes, sdf=field.sdf(points),
               deformation=field.deformation(points), rgb=field.color(points))
    for name, value in got.items():
        ref = expected[name]
        error = (value.float().reshape(ref.shape) - ref).abs().max().item() / max(1.0, ref.abs().max().item())
        assert error < bounds[name], f"{name}: {error:.2e}"
        assert error > 1e-5, f"{name}: {error:.2e} is float32's error: did {dtype} run at all?"


def test_every_attention_runs_through_sdpa(student, monkeypatch):
    assert attention_implementations(student) == {
        "unet": {"AttnProcessor2_0", "HexaPlaneSelfAttnProcessor"}, "vae": {"AttnProcessor2_0"},
        "text_encoder": {"sdpa"}}
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    fields = sample_fields(student, PROMPTS[:1], [0])
    unet_attention = sum(1 for _ in student.unet.attn_processors)  # attn1 and attn2 of every transformer block
    vae_attention = sum(1 for _ in student.vae.decoder.modules() if type(_).__name__ == "Attention")
    text_attention = student.text_encoder.config.num_hidden_layers
    steps = len(student.sampling_timesteps())
    assert len(calls) == text_attention + steps * unet_attention + vae_attention
    assert fields.planes.shape[0] == 1


def test_compiled_networks_give_the_same_mesh(fixtures_dir):
    """The compile wiring with dynamo's "eager" backend: the CPU's inductor needs minutes of warm-up even for
    this tiny model (7 min measured), too slow for a test; the benchmark times inductor."""
    s = load_student(fixtures_dir)
    eager = generate(s, PROMPTS[:1], seed=5, resolution=24)
    torch._dynamo.reset()
    try:
        for module in (s.unet, s.vae.decoder):
            compile_forward(module, "default", backend="eager")
        assert "forward" in vars(s.unet) and "forward" in vars(s.vae.decoder)
        assert set(s.state_dict()) == set(load_student(fixtures_dir).state_dict())  # names untouched
        compiled = generate(s, PROMPTS[:1], seed=5, resolution=24)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # dynamo traced both networks
    finally:
        for module in (s.unet, s.vae.decoder):
            uncompile_forward(module)
        torch._dynamo.reset()
    assert "forward" not in vars(s.unet)
    a, b = eager.objects[0], compiled.objects[0]
    assert a.mesh.num_vertices > 20
    torch.testing.assert_close(b.field.planes, a.field.planes, rtol=0, atol=1e-5 * a.field.planes.abs().max().item())
    assert torch.equal(b.mesh.faces, a.mesh.faces)
    torch.testing.assert_close(b.mesh.vertices, a.mesh.vertices, rtol=0, atol=1e-5)


def test_batch_sizes_of_run():
    assert batch_sizes_of_run(10, 4) == [4, 2]
    assert batch_sizes_of_run(8, 4) == [4]
    assert batch_sizes_of_run(3, 8) == [3]


def test_streaming_yields_what_generate_returns_in_order(student, monkeypatch):
    expected = generate(student, PROMPTS, seed=2, resolution=32, batch_size=2)
    assert sum(o.mesh.num_vertices for o in expected.objects) > 100
    denoised = []
    real = student.denoise
    monkeypatch.setattr(student, "denoise", lambda emb, noise, **kw: denoised.append(len(emb)) or real(emb, noise, **kw))
    stream = iter_generate(student, PROMPTS, seed=2, resolution=32, batch_size=2)
    first = next(stream)
    assert denoised == [2]  # lazily: only the first batch has run
    streamed = [first, *stream]
    assert denoised == [2, 1]
    assert [o.index for o in streamed] == [0, 1, 2] and [o.seed for o in streamed] == [2, 3, 4]
    assert [o.prompt for o in streamed] == PROMPTS
    for got, want in zip(streamed, expected.objects, strict=True):
        assert torch.equal(got.mesh.faces, want.mesh.faces)
        torch.testing.assert_close(got.mesh.vertices, want.mesh.vertices, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.vertex_colors, want.vertex_colors, rtol=0, atol=1e-6)


def test_batch_size_does_not_change_a_mesh(student):
    one = generate(student, PROMPTS, seed=9, resolution=32, batch_size=1)
    three = generate(student, PROMPTS, seed=9, resolution=32, batch_size=3)
    for a, b in zip(one.objects, three.objects, strict=True):
        assert a.mesh.num_vertices > 50 and not a.mesh.used_fallback and torch.equal(a.mesh.faces, b.mesh.faces)
        torch.testing.assert_close(a.mesh.vertices, b.mesh.vertices, rtol=0, atol=1e-5)


def test_export_thread_writes_the_same_files(student, tmp_path):
    inline = generate_meshes(student, PROMPTS, tmp_path / "a", seed=1, resolution=20, batch_size=2, progress=False,
                             export_thread=False)
    threaded = generate_meshes(student, PROMPTS, tmp_path / "b", seed=1, resolution=20, batch_size=2, progress=False,
                               export_thread=True)
    assert inline == threaded
    for record in inline:
        assert (tmp_path / "a" / record["file"]).read_bytes() == (tmp_path / "b" / record["file"]).read_bytes()


def test_export_thread_passes_errors_on(student, tmp_path, monkeypatch):
    real = generation_module.export_object

    def fail_second(mesh, obj, path, **kwargs):
        if "0001_" in str(path):
            raise OSError(28, "No space left on device")
        return real(mesh, obj, path, **kwargs)

    monkeypatch.setattr(generation_module, "export_object", fail_second)
    with pytest.raises(OSError, match="No space left"):
        generate_meshes(student, PROMPTS, tmp_path, resolution=16, batch_size=1, progress=False, export_thread=True)


def test_cli_half_precision_with_export_thread(tmp_path, capsys, ref_weights):
    out = tmp_path / "o"
    code = main(["generate", *PROMPTS[:2], "--weights", str(ref_weights), "--out", str(out), "--resolution", "16",
                 "--dtype", "bfloat16", "--export-thread", "on", "--batch-size", "1", "--no-progress"])
    stdout = capsys.readouterr().out
    assert code == 0 and "wall-clock" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["compile_mode"] is None
    assert [m["prompt"] for m in manifest["meshes"]] == PROMPTS[:2]
    assert all((out / m["file"]).stat().st_size > 0 for m in manifest["meshes"])
    assert manifest["timings_seconds"]["wall"] > 0 and manifest["timings_seconds"]["warm_up"] == 0


@pytest.mark.parametrize(("argv", "message"), [
    (["--compile-mode", "default"], "--compile-mode sets the mode of --compile: add --compile"),
    (["--compile", "--compile-mode", "reduce-overhead", "--device", "cpu"], "needs a CUDA device"),
    (["--compile", "--compile-mode", "max-autotune", "--device", "cpu"], "needs a CUDA device"),
    (["--dtype", "float8"], "invalid choice: 'float8'"),
    (["--export-thread", "sometimes"], "invalid choice: 'sometimes'"),
])
def test_bad_speed_options_are_one_line_errors(tmp_path, capsys, argv, message, monkeypatch):
    monkeypatch.setattr(TriplaneStudent, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    code = main(["generate", "a cat", "--out", str(tmp_path / "o"), *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("prd: error: ") and message in lines[0], lines


def test_compile_on_a_cpu_without_compiler_is_one_line_error(tmp_path, capsys, monkeypatch):
    from lightning_modules.student import inference

    monkeypatch.setattr(inference.shutil, "which", lambda name: None)
    monkeypatch.setattr(TriplaneStudent, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    code = main(["generate", "a cat", "--out", str(tmp_path / "o"), "--compile", "--device", "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "needs a C++ compiler" in lines[0]


def test_vertex_positions_are_not_quantised_in_half_precision(student_bf16):
    """The mesh vertices of a bfloat16 student are float32 and off the bfloat16 grid (1/128 near 1)."""
    (obj,) = generate(student_bf16, PROMPTS[:1], seed=0, resolution=24).objects
    vertices = obj.mesh.vertices
    assert vertices.dtype == torch.float32 and obj.vertex_colors.dtype == torch.float32
    rounded = vertices.to(torch.bfloat16).float()
    assert np.mean((rounded != vertices).numpy()) > 0.5
