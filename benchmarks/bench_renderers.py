"""Throughput of the mesh and volume renderers at 64, 128 and 256 px, on the CPU (and the GPU when present).

    .venv/bin/python benchmarks/bench_renderers.py [--resolutions 64 128 256] [--views 4] [--grid 128]
        [--threads N] [--repeats 2] [--device cpu|cuda|all] [--backend auto|torch|nvdiffrast]

Scene: a tiny random triplane field (tests/render_fields.py: 16^2 planes, 4 channels, MLPs 16 wide), one
object seen by `--views` cameras. For each device and resolution it prints:
- mesh renderer, one PRD step: marching cubes on the `--grid`^3 grid + rasterisation + backward;
- mesh renderer, no-grad evaluation render;
- volume renderer, one PRD step (training pass: H/3 global + 40 x 40 patch, 128 + 64 samples) + backward;
- volume renderer, no-grad full-resolution evaluation render (skipped above 128 px on the CPU unless --full).
Figures are the median wall time of `--repeats` runs after one warm-up, and views per second.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from renderers.cameras import sample_training_cameras  # noqa: E402
from renderers.mesh_renderer import MeshRenderer  # noqa: E402
from renderers.volume_renderer import NeuSVolumeRenderer  # noqa: E402
from tests.render_fields import TinyTriplaneField  # noqa: E402


def measure(fn, repeats: int, device: torch.device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_device(device: torch.device, args) -> None:
    field = TinyTriplaneField(resolution=16, seed=0).to(device)
    mesh_renderer = MeshRenderer(resolution=args.grid, backend=args.backend).to(device)
    volume_renderer = NeuSVolumeRenderer().to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n== {name}: {args.views} views, marching cubes {args.grid}^3, rasteriser backend {mesh_renderer.rasterizer(device).name}")
    print(f"{'renderer / pass':<46} {'px':>5} {'seconds':>9} {'views/s':>9}")
    for resolution in args.resolutions:
        cameras = sample_training_cameras(1, args.views, generator=torch.Generator().manual_seed(0), height=resolution, width=resolution).to(device)

        def mesh_step(cameras=cameras):
            field.zero_grad()
            out = mesh_renderer(field, cameras)
            (out["rgb"].mean() + out["normal"].mean()).backward()

        def mesh_eval(cameras=cameras):
            with torch.no_grad():
                mesh_renderer.eval()(field, cameras)
            mesh_renderer.train()

        def volume_step(cameras=cameras):
            field.zero_grad()
            out = volume_renderer.train()(field, cameras)
            (out["rgb"].mean() + out.regularizers["eikonal"] + out.regularizers["sparsity"]).backward()

        def volume_eval(cameras=cameras):
            with torch.no_grad():
                volume_renderer.eval()(field, cameras)
            volume_renderer.train()

        runs = [
            ("mesh: PRD step (marching cubes + render + bwd)", mesh_step),
            ("mesh: evaluation render (no grad)", mesh_eval),
            ("volume: PRD step (global + patch, + bwd)", volume_step),
        ]
        if device.type == "cuda" or resolution <= 128 or args.full:
            runs.append(("volume: evaluation render (no grad, full res)", volume_eval))
        for label, fn in runs:
            seconds = measure(fn, args.repeats, device)
            print(f"{label:<46} {resolution:>5} {seconds:9.3f} {args.views / seconds:9.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--grid", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--backend", choices=["auto", "torch", "nvdiffrast"], default="auto")
    parser.add_argument("--full", action="store_true", help="also the full-resolution volume render above 128 px on the CPU")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    elif args.device == "cuda":
        sys.exit("no CUDA device available")
    for device in devices:
        backend = args.backend
        if device.type == "cpu" and backend == "nvdiffrast":
            backend = "torch"
        bench_device(device, argparse.Namespace(**{**vars(args), "backend": backend}))


if __name__ == "__main__":
    main()
