"""The arithmetic floor of `prd generate` on this machine: the full-size student's network FLOPs per mesh, and the
seconds they need at this device's measured matrix-multiply throughput, per dtype.

    .venv/bin/python benchmarks/bench_arithmetic_floor.py [--device cpu|cuda] [--dtypes float32 bfloat16] [--threads N]

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on the meta device (no weights, no arithmetic, about
2 s): the student as `prd generate` runs it (adapters merged, joint attention over the 6 planes), 4 UNet passes on
6 x 4 x 32 x 32 latents and one VAE-decoder pass of the 6 planes. Counted on the meta device, attention counts too
(on the CPU the counter does not see the fused flash-attention kernel). Throughput: the best of 5 products of two
4096 x 4096 matrices in each dtype. Floor = FLOPs / throughput: no implementation of these networks in that dtype
runs faster on this device; `bench_generate.py` gives the measured time to compare with.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def network_flops() -> dict[str, float]:
    """FLOPs of one mesh's networks at batch 1: {"unet (4 passes)": ..., "vae decoder": ...}."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTokenizer

    from benchmarks.bench_generate import TOKENIZER
    from lightning_modules.student import TriplaneStudent
    from lightning_modules.student.sd_configs import build_sd21_base

    with torch.device("meta"):
        unet, vae, _ = build_sd21_base(text_encoder=False)
        student = TriplaneStudent(unet, vae, None, CLIPTokenizer.from_pretrained(TOKENIZER))
        student.merge_adapters()
        latents = torch.empty(6, 4, 32, 32)
        text = torch.empty(6, 77, 1024)
    steps = len(student.sampling_timesteps())
    with torch.no_grad(), FlopCounterMode(display=False) as unet_counter:
        student.unet(latents, 500, encoder_hidden_states=text)
    with torch.no_grad(), FlopCounterMode(display=False) as vae_counter:
        student.vae.decoder(student.vae.post_quant_conv(latents))
    return {f"unet ({steps} passes)": steps * unet_counter.get_total_flops(),
            "vae decoder": vae_counter.get_total_flops()}


def matmul_throughput(device: torch.device, dtype: torch.dtype, size: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` products of two `size` x `size` matrices."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, dtype)
    b = torch.randn(size, size, generator=generator).to(device, dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    flops = network_flops()
    total = sum(flops.values())
    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    for name, value in flops.items():
        print(f"{name:>18}: {value / 1e12:6.3f} TFLOP")
    print(f"{'per mesh':>18}: {total / 1e12:6.3f} TFLOP")
    for name in args.dtypes:
        throughput = matmul_throughput(device, getattr(torch, name))
        print(f"{name:>9}: 4096^2 matmul {throughput / 1e9:8.1f} GFLOP/s -> floor {total / throughput:8.3f} s per mesh "
              "(networks only)", flush=True)


if __name__ == "__main__":
    main()
