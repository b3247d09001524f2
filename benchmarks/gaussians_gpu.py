"""Gaussian renderer benchmark: the pure-PyTorch and gsplat backends on the same scenes.

    pip install -e '.[gsplat]'                     # on the CUDA machine (gsplat compiles on first use)
    .venv/bin/python benchmarks/gaussians_gpu.py [--repeats 5] [--count 65536] [--resolutions 256 512]
    .venv/bin/python benchmarks/gaussians_gpu.py --device cpu    # the PyTorch backend alone, small sizes

On CUDA it renders each scene (`scene`: random blobs, and a sphere of flat, nearly opaque Gaussians)
from 4 evaluation cameras with both backends and prints the mean / max absolute difference per image;
the torch backend runs with max_alpha = 0.999 there, gsplat's constant (and once with 3DGS's 0.99, to
show what that clamp alone changes). Then it times forward and forward + backward of 4 views at 256 and
512 px with 64k Gaussians on both backends (median of --repeats, after a warm-up that also compiles
gsplat's kernels). On the CPU it times the PyTorch backend for 4 views at 64 / 128 px with 1k / 4k
Gaussians (one thread, as on this project's reference machine).
The pass / fail check of the agreement is `pytest -m gpu tests/test_gaussian_renderer.py`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from renderers.cameras import evaluation_cameras  # noqa: E402
from renderers.gaussian_renderer import GaussianRenderer, gsplat_available  # noqa: E402
from renderers.gaussians import Gaussians  # noqa: E402

IMAGES = ("rgb", "alpha", "normal", "depth", "disparity")


def scene(kind: str, count: int, device: torch.device, seed: int = 0) -> Gaussians:
    """One object of `count` Gaussians, SH degree 1, drawn from a seeded generator.

    "blobs": centres ~ N(0, 0.4^2), log-uniform scales in [e^-4.5, e^-3], opacities U[0.05, 0.95];
    "surface": centres on the unit sphere, flat (smallest scale along the normal), opacities U[0.8, 1.0].
    """
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(1, count, 4, 3, generator=g) * 0.4
    if kind == "blobs":
        means = torch.randn(1, count, 3, generator=g) * 0.4
        quats = F.normalize(torch.randn(1, count, 4, generator=g), dim=-1)
        scales = torch.exp(torch.rand(1, count, 3, generator=g) * 1.5 - 4.5)
        opacities = torch.rand(1, count, generator=g) * 0.9 + 0.05
    elif kind == "surface":
        means = F.normalize(torch.randn(1, count, 3, generator=g), dim=-1) * 0.8
        # the quaternion rotating local z onto the outward normal (half-way vector construction)
        z = torch.tensor([0.0, 0.0, 1.0]).expand_as(means)
        half = F.normalize(z + F.normalize(means, dim=-1), dim=-1)
        quats = torch.cat([(z * half).sum(-1, keepdim=True), torch.linalg.cross(z, half, dim=-1)], dim=-1)
        spacing = 0.8 * math.sqrt(4 * math.pi / count)
        scales = torch.tensor([spacing, spacing, spacing * 0.05]).expand(1, count, 3).clone()
        opacities = torch.rand(1, count, generator=g) * 0.2 + 0.8
    else:
        raise ValueError(f"unknown scene {kind!r}")
    return Gaussians(means, quats, scales, opacities, sh).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs, after one warm-up run."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def render_times(renderer: GaussianRenderer, gaussians: Gaussians, cameras, device, repeats: int) -> tuple[float, float]:
    """(forward, forward + backward) seconds of one render of all views."""

    def forward() -> None:
        with torch.no_grad():
            renderer(gaussians, cameras)

    params = [t.detach().clone().requires_grad_(True) for t in gaussians.__dict__.values()]
    weights = torch.rand(cameras.batch_size, cameras.num_views, 3, cameras.height, cameras.width, device=device)

    def forward_backward() -> None:
        out = renderer(Gaussians(*params), cameras)
        (out["rgb"] * weights).sum().backward()

    return timed(forward, device, repeats), timed(forward_backward, device, repeats)


def compare(device: torch.device, resolution: int, count: int) -> None:
    print(f"torch vs gsplat, 4 views at {resolution} px, {count} Gaussians: mean / max |difference| per image")
    cameras = evaluation_cameras(4, height=resolution, width=resolution, device=device)
    gsplat = GaussianRenderer(backend="gsplat")
    for kind in ("blobs", "surface"):
        gaussians = scene(kind, count, device)
        with torch.no_grad():
            reference = gsplat(gaussians, cameras)
            for max_alpha in (0.999, 0.99):
                out = GaussianRenderer(backend="torch", max_alpha=max_alpha)(gaussians, cameras)
                cells = []
                for name in IMAGES:
                    diff = (out[name] - reference[name]).abs()
                    cells.append(f"{name} {diff.mean().item():.2e} / {diff.max().item():.2e}")
                print(f"  {kind:8s} max_alpha {max_alpha}: " + ", ".join(cells))
        print(f"  {kind:8s} coverage (mean alpha, gsplat): {reference['alpha'].mean().item():.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--count", type=int, default=65536, help="Gaussians in the GPU timings")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512], help="GPU image sizes")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
        print("PyTorch backend on the CPU (1 thread), 4 views, blobs scene: forward / forward + backward")
        for count in (1000, 4000):
            for resolution in (64, 128):
                cameras = evaluation_cameras(4, height=resolution, width=resolution)
                fwd, bwd = render_times(GaussianRenderer(backend="torch"), scene("blobs", count, device), cameras, device, args.repeats)
                print(f"  {count:5d} Gaussians, {resolution:3d} px: {fwd * 1000:7.1f} ms / {bwd * 1000:7.1f} ms")
        return 0
    if not gsplat_available():
        print("gsplat is not installed: pip install -e '.[gsplat]' (timing the PyTorch backend alone)")
    else:
        compare(device, 256, 16384)
    backends = ("torch", "gsplat") if gsplat_available() else ("torch",)
    print(f"times, 4 views, {args.count} Gaussians (blobs), median of {args.repeats}: forward / forward + backward")
    for resolution in args.resolutions:
        cameras = evaluation_cameras(4, height=resolution, width=resolution, device=device)
        gaussians = scene("blobs", args.count, device)
        for backend in backends:
            torch.cuda.reset_peak_memory_stats(device)
            fwd, bwd = render_times(GaussianRenderer(backend=backend), gaussians, cameras, device, args.repeats)
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            print(f"  {resolution:4d} px {backend:6s}: {fwd * 1000:8.2f} ms / {bwd * 1000:8.2f} ms  (peak {peak:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
