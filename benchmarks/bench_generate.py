"""Time `prd generate` stage by stage for the FULL-SIZE TriplaneTurbo student with random weights.

    .venv/bin/python benchmarks/bench_generate.py [--device cpu|cuda] [--resolution 160] [--prompts 1]

Builds SD 2.1-base's UNet, VAE decoder and text encoder from their public configs (no download; the
tokenizer is the small real CLIP BPE of the test fixtures), adds the adapters, and runs the same
code path as `prd generate` (text encoding, 4 DDIM steps, triplane decoding, marching cubes at
160^3, GLB export). It then times the networks alone (4 UNet forwards and one VAE-decoder forward of the 6 planes),
once as the student runs them (adapters merged, joint attention over the 6 planes) and once as bare
SD 2.1 (adapters off), and prints total generate time / network time for both:

    total / student networks      goal: <= 1.25   (what text encoding, sampling, field, marching
                                                   cubes and export add to the networks)
    total / bare SD networks      for information (includes the cost of the adapters and of the
                                                   6x longer joint attention)

Random weights make the SDF arbitrary: marching cubes runs on whatever surface the random field has
(or the unit-sphere fallback), so mesh sizes differ from a trained model's.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "reference" / "triplaneturbo_ref_A" / "base" / "tokenizer"


def random_full_size_student():
    """The full-size student (SD 2.1-base architecture, rank-16 adapters) with random weights on the CPU,
    float32, seed 0. Its zero-initialised up-projections get small random values, so that the adapters
    cost what trained ones cost and gradients reach every adapter (also used by bench_prd.py)."""
    from transformers import CLIPTokenizer

    from lightning_modules.student import TriplaneStudent
    from lightning_modules.student.sd_configs import build_sd21_base

    torch.manual_seed(0)
    unet, vae, text_encoder = build_sd21_base()
    student = TriplaneStudent(unet, vae, text_encoder, CLIPTokenizer.from_pretrained(TOKENIZER))
    with torch.no_grad():
        for p in student.trainable_parameters():
            if p.abs().max() == 0:
                p.normal_(0, 1e-3)
    return student


def build_full_size_student(device: torch.device, dtype: torch.dtype):
    student = random_full_size_student().to(device=device, dtype=dtype).eval()
    student.merge_adapters()  # as `prd generate` does
    return student


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_networks(student, emb, noise, repeats: int, adapters: bool) -> tuple[float, float]:
    """Best seconds of 4 UNet forwards and of one VAE-decoder forward of the 6 planes.

    adapters=True: the student's own networks (merged LoRA / LoCon, per-plane LoRA and joint attention
    over the 6 planes); False: the bare SD 2.1 networks (adapters off, attention per plane).
    """
    device = student.device
    x = noise.flatten(0, 1).to(device, student.dtype)
    cond = emb.repeat_interleave(6, dim=0)
    best_unet = best_vae = float("inf")
    with contextlib.nullcontext() if adapters else student.adapters_disabled():
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            for t in student.sampling_timesteps().tolist():
                student.unet(x, t, encoder_hidden_states=cond)
            sync(device)
            t1 = time.perf_counter()
            student.vae.decoder(student.vae.post_quant_conv(x))
            sync(device)
            best_unet = min(best_unet, t1 - t0)
            best_vae = min(best_vae, time.perf_counter() - t1)
    return best_unet, best_vae


def main() -> None:
    from lightning_modules.student.generation import StageTimer, generate_meshes

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--resolution", type=int, default=160)
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions (the best is kept)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    t0 = time.perf_counter()
    student = build_full_size_student(device, dtype)
    print(f"built the full-size student in {time.perf_counter() - t0:.1f} s on {device} ({args.dtype}, "
          f"{torch.get_num_threads()} threads)")
    prompts = [f"a DSLR photo of object number {i}" for i in range(args.prompts)]

    with tempfile.TemporaryDirectory() as out:
        generate_meshes(student, prompts, out, resolution=args.resolution, batch_size=len(prompts), progress=False)
        best = None
        for _ in range(args.repeats):
            timer = StageTimer()
            records = generate_meshes(student, prompts, out, resolution=args.resolution,
                                      batch_size=len(prompts), timer=timer, progress=False)
            if best is None or timer.total < best.total:
                best = timer
    print(best.table(len(prompts)))
    print(f"mesh sizes: {[(r['vertices'], r['faces']) for r in records]}")

    emb = student.encode_prompt(prompts)
    noise = torch.cat([student.make_noise(1, seed=i) for i in range(len(prompts))])
    for adapters, label in ((True, "student networks (adapters merged, joint 6-plane attention)"),
                            (False, "bare SD 2.1 networks (no adapters, attention per plane)")):
        unet_s, vae_s = time_networks(student, emb, noise, args.repeats, adapters)
        print(f"{label}: UNet x 4 {unet_s:.3f} s + VAE decoder {vae_s:.3f} s = {unet_s + vae_s:.3f} s"
              f"  -> total / networks = {best.total / (unet_s + vae_s):.3f}")
    print("goal: total / student networks <= 1.25 (the pipeline adds at most 25 % to the networks it must run)")

if __name__ == "__main__":
    main()
