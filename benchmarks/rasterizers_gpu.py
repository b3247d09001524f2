"""GPU benchmark: the nvdiffrast and pure-PyTorch rasteriser backends side by side on a test scene.

    pip install -e '.[nvdiffrast]'                       # on the CUDA machine (compiles on first use)
    .venv/bin/python benchmarks/rasterizers_gpu.py [--resolution 512] [--views 4] [--grid 128] [--repeats 5]

Renders one scene with both backends on the GPU through the SAME code (MeshRenderer.render_meshes and the
field path MeshRenderer(field, cameras)): the marching-cubes mesh of an analytic field (a sphere fused with
a box and a torus, `tests.gpu_helpers.SceneField`) with per-vertex colours, from 4 training cameras and 4
evaluation cameras. It prints, per image ("rgb", "alpha", "normal", "depth", "disparity"), the max and mean
absolute difference over all pixels and over "interior" pixels (same triangle in both backends, away from
silhouette and occlusion edges); the alpha-mask IoU; the cosine similarity of the gradients w.r.t. vertex
positions and colours of a random-weighted loss, per image with and without anti-aliasing; a single-triangle
probe of the position gradients against finite differences; the field path; and the forward /
forward+backward times of each backend.

The pass / fail checks of these numbers (tolerances included) are tests: `pytest -m gpu tests/test_gpu.py`
(test_nvdiffrast_and_pytorch_rasterisers_agree_*, test_pytorch_rasteriser_position_gradient_*). This script
only measures. `--self-test-cpu` compares the PyTorch backend with itself on the CPU (checks the script).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests/ helpers

from renderers.marching_cubes import TriangleMesh  # noqa: E402
from renderers.mesh_renderer import MeshRenderer  # noqa: E402
from tests.gpu_helpers import (  # noqa: E402
    IMAGES,
    compare_rasterizers,
    image_weights,
    scene_cameras,
    scene_mesh,
    single_triangle_gradients,
)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    fn()
    _sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--grid", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--self-test-cpu",
        action="store_true",
        help="compare the PyTorch backend with itself on the CPU (checks this script only, not nvdiffrast)",
    )
    args = parser.parse_args()
    reference = "nvdiffrast"
    if args.self_test_cpu:
        device, reference = torch.device("cpu"), "torch"
    elif not torch.cuda.is_available():
        print("no CUDA device: this benchmark compares nvdiffrast with the PyTorch backend on a GPU (or use --self-test-cpu)")
        return 2
    else:
        device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    field, mesh, colors = scene_mesh(device, args.grid)
    views = 2 * args.views
    print(f"scene: {mesh.num_vertices} vertices, {mesh.num_faces} faces (grid {args.grid}^3), {args.resolution} px, {views} views")
    cameras = scene_cameras(args.views, args.resolution, device)
    renderers = {
        "nvdiffrast": MeshRenderer(resolution=args.grid, backend=reference).to(device),
        "torch": MeshRenderer(resolution=args.grid, backend="torch").to(device),
    }

    result = compare_rasterizers(renderers["nvdiffrast"], renderers["torch"], mesh, colors, cameras)
    print(
        f"alpha IoU {result.iou:.5f}   same triangle per pixel {result.face_agreement:.5f}   "
        f"interior pixels {result.interior_fraction:.3f}"
    )
    print(f"{'image':<10} {'max |d|':>10} {'mean |d|':>10} {'interior max':>13}")
    for n in IMAGES:
        print(f"{n:<10} {result.max_abs[n]:10.2e} {result.mean_abs[n]:10.2e} {result.interior_max[n]:13.2e}")
    for label, cosine in result.grad_cosine.items():
        ratio = result.grad_norm_ratio[label]
        print(f"gradient w.r.t. {label:<17} cosine {cosine:.5f}   |torch| / |nvdiffrast| {ratio:.4f}")

    # Where do the position gradients differ? One image at a time, with and without anti-aliasing.
    weights = image_weights(views, args.resolution, device)
    print("position-gradient cosine per image:        antialias on   antialias off")
    for n in IMAGES:
        cosines = []
        for antialias in (True, False):
            per_backend = []
            for renderer in renderers.values():
                renderer.antialias = antialias
                vertices = mesh.vertices.clone().requires_grad_(True)
                out = renderer.render_meshes([TriangleMesh(vertices, mesh.faces)], [colors], cameras)
                loss = (out[n] * weights[n]).sum()
                renderer.antialias = True
                if not loss.requires_grad:  # e.g. a hard mask without anti-aliasing
                    break
                loss.backward()
                per_backend.append(vertices.grad.flatten().double())
            cosines.append(F.cosine_similarity(*per_backend, dim=0).item() if len(per_backend) == 2 else float("nan"))
        print(f"  {n:<40} {cosines[0]:12.5f} {cosines[1]:15.5f}")

    grads = single_triangle_gradients(device, {"nvdiffrast": reference, "torch cuda": "torch"})
    fd = grads["finite differences"]
    print("single triangle, no anti-aliasing: position gradients")
    for label, g in grads.items():
        cos = F.cosine_similarity(g, fd, dim=0).item()
        print(f"  {label:<20} cosine vs FD {cos:.6f}   |g|/|fd| {(g.norm() / fd.norm()).item():.4f}   {[round(x, 3) for x in g.tolist()]}")

    # field path (marching cubes + colour at the surface) through both backends
    field_out = {name: r(field, cameras) for name, r in renderers.items()}
    mask_a, mask_b = field_out["nvdiffrast"]["alpha"] > 0.5, field_out["torch"]["alpha"] > 0.5
    field_iou = ((mask_a & mask_b).sum() / (mask_a | mask_b).sum()).item()
    field_rgb = (field_out["nvdiffrast"]["rgb"] - field_out["torch"]["rgb"]).abs().mean().item()
    print(f"field path: alpha IoU {field_iou:.5f}, mean |d rgb| {field_rgb:.2e}")

    print(f"\ntimings (median of {args.repeats}, {views} views at {args.resolution} px, mesh of {mesh.num_faces} faces)")
    for name, renderer in renderers.items():
        vertices = mesh.vertices.clone().requires_grad_(True)

        def forward(renderer=renderer, vertices=vertices):
            return renderer.render_meshes([TriangleMesh(vertices, mesh.faces)], [colors], cameras)

        def forward_backward(forward=forward):
            out = forward()
            (out["rgb"].mean() + out["alpha"].mean()).backward()

        def field_step(renderer=renderer):
            renderer(field, cameras)["rgb"].mean()

        print(
            f"{name:<11} forward {timed(forward, args.repeats) * 1e3:8.1f} ms   forward+backward {timed(forward_backward, args.repeats) * 1e3:8.1f} ms"
            f"   field path (marching cubes {args.grid}^3 + render) {timed(field_step, args.repeats) * 1e3:8.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
