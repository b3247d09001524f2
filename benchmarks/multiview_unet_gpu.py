"""GPU benchmark of the multi-view UNet (MVDream / RichDreamer): fixture errors per dtype, full-size timings.

    .venv/bin/python benchmarks/multiview_unet_gpu.py [--device cuda]
    MVDREAM_CKPT=pretrained/sd-v2.1-base-4view.pt RICHDREAMER_ND_CKPT=pretrained/nd_mv_ema.ckpt \
        .venv/bin/python benchmarks/multiview_unet_gpu.py     # also loads the released weights if present

Prints, per fixture and dtype, the max abs error to the original code's epsilon; then the time of one
forward of the full-size released architectures (random weights unless the released files are given)
on a guidance-sized batch: 2 objects x 4 views x (cond, uncond) = 16 images at 32 x 32. The fixture
tolerances per dtype are checked by `pytest -m gpu tests/test_gpu.py -k multiview`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from teachers.multiview_unet import RELEASED_CHECKPOINTS, MultiViewUNet, camera_vectors

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference"


def fixture_errors(device: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for family in ("mvdream_ref_A", "richdreamer_nd_ref_A"):
        inputs = {k: v.to(device) for k, v in load_file(FIXTURES / family / "inputs.safetensors").items()}
        expected = load_file(FIXTURES / family / "expected.safetensors")
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            model = MultiViewUNet.from_original_checkpoint(
                FIXTURES / family / "model.ckpt",
                FIXTURES / family / "config.yaml",
                dtype=dtype,
                device=device,
            )
            with torch.no_grad():
                eps = model(
                    inputs["x"], inputs["timesteps"], inputs["context"], inputs["camera"], num_frames=4
                )
            err = (eps.cpu() - expected["eps"]).abs().max().item()
            print(f"{family:22s} {str(dtype):15s} max abs error {err:.2e}")


def full_size_timing(device: str, dtype: torch.dtype) -> None:
    for release, env in (
        ("mvdream-sd21-4view", "MVDREAM_CKPT"),
        ("richdreamer-nd-mv", "RICHDREAMER_ND_CKPT"),
    ):
        info = RELEASED_CHECKPOINTS[release]
        start = time.perf_counter()
        if os.environ.get(env):
            model = MultiViewUNet.from_original_checkpoint(
                os.environ[env], info.config, dtype=dtype, device=device
            )
            source = os.environ[env]
        else:
            model = MultiViewUNet.from_original_config(info.config, device=device, dtype=dtype).eval()
            source = "random weights"
        load_s = time.perf_counter() - start
        objects, views = 2, 4
        n = 2 * objects * views
        elevation = torch.full((n,), 15.0)
        azimuth = torch.arange(n, dtype=torch.float32) % views * 90.0
        convention = "mvdream" if release.startswith("mvdream") else "richdreamer"
        camera = camera_vectors(
            elevation, azimuth, 2.0 if convention == "richdreamer" else 1.0, convention
        ).to(device)
        x = torch.randn(n, model.in_channels, 32, 32, device=device)
        t = torch.full((n,), 500, device=device)
        ctx = torch.randn(n, 77, model.context_dim, device=device)
        with torch.no_grad():
            model(x, t, ctx, camera, num_frames=views)  # warm-up
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(5):
                eps = model(x, t, ctx, camera, num_frames=views)
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / 5 * 1000
        print(
            f"{release:20s} {str(dtype):15s} load {load_s:6.1f} s ({source}); forward of {n} images: {ms:7.1f} ms, "
            f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, finite={bool(torch.isfinite(eps).all())}"
        )
        del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    fixture_errors(args.device)
    for dtype in (torch.float16, torch.bfloat16):
        full_size_timing(args.device, dtype)


if __name__ == "__main__":
    main()
