"""GPU benchmark of the teachers (run by hand on a CUDA machine; not a test).

    .venv/bin/python benchmarks/teachers_gpu.py                             # tiny models (fixtures)
    .venv/bin/python benchmarks/teachers_gpu.py --sd pretrained/stable-diffusion-2-1-base \
        --mvdream pretrained/sd-v2.1-base-4view.pt --nd pretrained/nd_mv_ema.ckpt \
        --sd15 pretrained/stable-diffusion-v1-5                             # + released weights, full size

For every teacher x dtype (float32 / float16 / bfloat16) x offload (off / on) it runs one forward +
backward on CUDA renders (2 prompts x 4 views) and prints one JSON line per case: forward / backward
times (ms), the frozen weights' size, where they are after the call and after the backward, the CUDA
memory left after the backward and the peak. The pass / fail checks of the tiny cases (finite float32
loss, finite non-zero CUDA gradients, offload back to the CPU with the memory released) are tests:
`pytest -m gpu tests/test_gpu.py -k teacher`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from renderers.types import Cameras, RenderOutput  # noqa: E402
from teachers.camera_vectors import c2w_from_spherical  # noqa: E402
from teachers.mvdream import MVDreamTeacher  # noqa: E402
from teachers.richdreamer import RichDreamerNormalDepthTeacher  # noqa: E402
from teachers.stable_diffusion import StableDiffusionTeacher  # noqa: E402
from tests.teacher_helpers import MV_FIXTURE, ND_FIXTURE, make_sd_dir_for, unet_params, vae_factor  # noqa: E402
from tests.tiny_sd import make_tiny_sd  # noqa: E402

PROMPTS = ["a red chair", "a glass owl"]


def cuda_render(size: int, seed: int = 0) -> RenderOutput:
    g = torch.Generator().manual_seed(seed)
    elevation = (torch.rand(2, 1, generator=g) * 30).expand(2, 4).clone()
    azimuth = (torch.rand(2, 1, generator=g) + torch.arange(4)) / 4 * 360 - 180
    fovy = torch.full((2, 4), math.radians(60.0))
    distance = (0.8 + 0.2 * torch.rand(2, 1, generator=g)).expand(2, 4) / math.tan(math.radians(30))
    cameras = Cameras(
        c2w_from_spherical(elevation, azimuth, distance), fovy, elevation, azimuth, distance, size, size
    )
    images = {
        name: torch.rand(2, 4, c, size, size, generator=g).cuda().requires_grad_(True)
        for name, c in (("rgb", 3), ("normal", 3), ("disparity", 1))
    }
    return RenderOutput(images, cameras.to("cuda"), "mesh")


def measure(name: str, build, size: int, dtype: str, offload: bool) -> dict:
    teacher = build(dtype=dtype, offload=offload)
    render = cuda_render(size)
    teacher(render, PROMPTS, 0)  # warm-up: loading, prompt encoding, kernels
    torch.cuda.synchronize()
    render = cuda_render(size, seed=1)
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    loss = teacher(render, PROMPTS, 0, torch.Generator("cuda").manual_seed(0))[teacher.name]
    torch.cuda.synchronize()
    forward_ms = (time.perf_counter() - start) * 1e3
    devices_after_call = {str(p.device) for p in teacher.frozen_parameters()}
    start = time.perf_counter()
    loss.backward()
    torch.cuda.synchronize()
    backward_ms = (time.perf_counter() - start) * 1e3
    devices_after_backward = {str(p.device) for p in teacher.frozen_parameters()}
    grads = [render[k].grad for k in ("rgb", "normal", "disparity") if render[k].grad is not None]
    del loss
    torch.cuda.synchronize()
    leftover_mb = (torch.cuda.memory_allocated() - before) / 2**20
    weights_mb = sum(p.numel() * p.element_size() for p in teacher.frozen_parameters()) / 2**20
    result = {
        "teacher": name,
        "dtype": dtype,
        "offload": offload,
        "forward_ms": round(forward_ms, 1),
        "backward_ms": round(backward_ms, 1),
        "weights_mb": round(weights_mb, 1),
        "frozen_devices_after_call": sorted(devices_after_call),
        "frozen_devices_after_backward": sorted(devices_after_backward),
        "cuda_mb_left_after_backward": round(leftover_mb, 1),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
    }
    result["finite_gradients"] = bool(grads) and all(bool(torch.isfinite(g).all()) for g in grads)
    print(json.dumps(result), flush=True)
    del teacher
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sd", help="SD 2.1-base directory (SD teacher, MVDream VAE + text encoder)")
    parser.add_argument("--sd15", help="SD 1.5 directory (RichDreamer text encoder)")
    parser.add_argument("--mvdream", help="sd-v2.1-base-4view.pt")
    parser.add_argument("--nd", help="nd_mv_ema.ckpt")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="teachers_gpu_"))
    cache = str(work / "cache")
    tiny_sd = make_tiny_sd(work / "sd")
    mv_sd = make_sd_dir_for(MV_FIXTURE, work / "mv_sd")
    nd_sd = make_sd_dir_for(ND_FIXTURE, work / "nd_sd")
    common = dict(prompt_cache_dir=cache, text_encoder_device="cuda")
    cases = {
        "sd_tiny": (
            lambda **kw: StableDiffusionTeacher(pretrained=str(tiny_sd), resolution=64, **common, **kw),
            64,
        ),
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
    if args.sd:
        cases["sd_2.1_base"] = (lambda **kw: StableDiffusionTeacher(pretrained=args.sd, **common, **kw), 512)
    if args.mvdream and args.sd:
        cases["mvdream"] = (
            lambda **kw: MVDreamTeacher(
                ckpt_path=args.mvdream, vae=args.sd, text_encoder=args.sd, **common, **kw
            ),
            256,
        )
    if args.nd and args.sd15:
        cases["richdreamer_nd"] = (
            lambda **kw: RichDreamerNormalDepthTeacher(
                ckpt_path=args.nd, text_encoder=args.sd15, **common, **kw
            ),
            256,
        )

    errors = 0
    for name, (build, size) in cases.items():
        for dtype in ("float32", "float16", "bfloat16"):
            for offload in (False, True):
                try:
                    measure(name, build, size, dtype, offload)
                except Exception as err:  # report and go on with the other cases
                    print(
                        json.dumps({"teacher": name, "dtype": dtype, "offload": offload, "error": repr(err)})
                    )
                    errors += 1
    print(f"{errors} case(s) raised an error")
    return 0


if __name__ == "__main__":
    sys.exit(main())
