"""GPU benchmark of TriplaneStudent: fixture errors per dtype, then full-size timings with random weights.

    .venv/bin/python benchmarks/student_gpu.py [--device cuda] [--batch 1] [--repeats 5] [--skip-full]

1. triplaneturbo_ref_A through the public API (float32 with TF32 off, float16, bfloat16): max abs error
   per tensor relative to max(1, max |ref|), and the RMS error relative to the RMS of the reference. The
   pass / fail bounds (float32 1e-4, the half-precision error bounds) are tests:
   `pytest -m gpu tests/test_gpu.py -k student`.
2. The full-size SD 2.1-base architecture (random weights, built from configs; no download): time of
   encode_prompt, the 4 UNet steps, the VAE decode, and a 160^3 sdf + deformation grid evaluation,
   plus sample() / (4 UNet forwards + 1 VAE decoder forward), the per-call overhead of the sampler.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lightning_modules.student import TriplaneStudent

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference" / "triplaneturbo_ref_A"


def fixture_errors(device: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    inputs = load_file(str(FIXTURE / "inputs.safetensors"))
    expected = load_file(str(FIXTURE / "expected.safetensors"))
    with safe_open(str(FIXTURE / "inputs.safetensors"), "pt") as f:
        prompts = json.loads(f.metadata()["prompts_json"])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        student = TriplaneStudent.from_pretrained(
            FIXTURE / "base", FIXTURE / "triplane_turbo.pth", device=device, dtype=dtype
        )
        emb = student.encode_prompt(prompts)
        noise = inputs["noise"].view(len(prompts), 6, *inputs["noise"].shape[1:])
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
        print(f"-- fixture, {dtype}")
        for name, value in got.items():
            ref = (expected[name] if name in expected else inputs[name]).float()
            diff = value.float().cpu().reshape(ref.shape) - ref
            err = diff.abs().max().item()
            rms = (diff.square().mean().sqrt() / ref.square().mean().sqrt()).item()
            print(
                f"   {name:16s} max abs err {err:.2e}  / max(1, max |ref|) {err / max(1.0, ref.abs().max().item()):.2e}"
                f"  relative RMS {rms:.2e}"
            )


def _timed(fn, device: str, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats, out


def full_size_timings(device: str, batch: int, dtype: torch.dtype, repeats: int) -> None:
    from transformers import CLIPTokenizer

    from lightning_modules.student.sd_configs import build_sd21_base

    with torch.device(device):
        unet, vae, text_encoder = build_sd21_base()
    tokenizer = CLIPTokenizer.from_pretrained(FIXTURE / "base" / "tokenizer")  # ids fit the full vocabulary
    student = TriplaneStudent(unet, vae, text_encoder, tokenizer).eval().to(device=device, dtype=dtype)
    prompts = ["a DSLR photo of a corgi wearing a red party hat"] * batch

    t_text, emb = _timed(lambda: student.encode_prompt(prompts), device, repeats)
    noise = student.make_noise(batch, seed=0)
    t_sample, field = _timed(lambda: student.sample(emb, noise=noise), device, repeats)
    with torch.no_grad():
        t_unet, _ = _timed(lambda: student.predict_eps(noise, 999, emb), device, repeats)
        t_decode, _ = _timed(lambda: student.decode(noise), device, repeats)
        n = 160
        axis = torch.linspace(-1, 1, n, device=device)
        grid = (
            torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1)
            .view(1, -1, 3)
            .expand(batch, -1, -1)
        )
        t_grid, _ = _timed(lambda: field.sdf_and_deformation(grid), device, repeats)
    steps = student.config.num_inference_steps
    base = steps * t_unet + t_decode
    print(f"-- full size, {dtype}, batch {batch}, planes {tuple(field.planes.shape)}")
    print(f"   encode_prompt {t_text * 1e3:8.1f} ms")
    print(f"   UNet forward  {t_unet * 1e3:8.1f} ms  x {steps}")
    print(f"   VAE decode    {t_decode * 1e3:8.1f} ms  (+ channel split / rotation)")
    print(f"   sample()      {t_sample * 1e3:8.1f} ms  = {t_sample / base:.3f} x (UNet + VAE forwards)")
    print(f"   160^3 sdf+deformation {t_grid * 1e3:8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-full", action="store_true")
    args = parser.parse_args()
    fixture_errors(args.device)
    if not args.skip_full:
        for dtype in (torch.float32, torch.float16):
            if dtype == torch.float16 and not args.device.startswith("cuda"):
                continue
            full_size_timings(args.device, args.batch, dtype, args.repeats)


if __name__ == "__main__":
    main()
