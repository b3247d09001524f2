"""GPU check: the nvdiffrast and pure-PyTorch rasteriser backends must agree on a test scene.

    pip install -e '.[nvdiffrast]'                       # on the CUDA machine (compiles on first use)
    .venv/bin/python benchmarks/gpu_check_rasterizers.py [--resolution 512] [--views 4] [--repeats 5]

Renders one scene with both backends on the GPU through the SAME code (MeshRenderer.render_meshes and the
field path MeshRenderer(field, cameras)): the marching-cubes mesh of an analytic field (a sphere fused with
a box and a torus, grid 128^3) with per-vertex colours, from 4 training cameras and 4 evaluation cameras.
For every image ("rgb", "alpha", "normal", "depth", "disparity") it prints the max and mean absolute
difference, over all pixels and over "interior" pixels (same triangle in both backends, 4 covered neighbours
at about the same depth, i.e. away from silhouettes and occlusion edges, where only float rounding may differ); the alpha-mask IoU; the
cosine similarity of the gradients w.r.t. vertex positions and vertex colours of a random-weighted loss;
and the forward / forward+backward times of each backend.

Exits with status 1 if any of these tolerances is exceeded:
    alpha IoU (alpha > 0.5)                  >= 0.995
    interior max |difference| (any image)    <= 2e-3   (depth: 2e-3 relative to the depth)
    mean |difference| rgb / alpha / normal   <= 5e-3
    gradient cosine, vertex colours          >= 0.98
    gradient cosine, vertex positions        >= 0.9   (nvdiffrast's own barycentric gradient deviates
                                                       from finite differences of its forward; the
                                                       single-triangle probe shows it)
    single-triangle probe: PyTorch backend gradient vs central finite differences, cosine >= 0.99999
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from renderers.cameras import evaluation_cameras, mvp_matrix, sample_training_cameras
from renderers.marching_cubes import DeformableMarchingCubes, TriangleMesh
from renderers.mesh_renderer import MeshRenderer
from renderers.types import Cameras

IMAGES = ("rgb", "alpha", "normal", "depth", "disparity")
TOLERANCES = {"iou": 0.995, "interior_max": 2e-3, "mean": 5e-3, "grad_cosine": 0.98, "position_grad_cosine": 0.9,
              "probe_fd_cosine": 0.99999}


class SceneField:
    """A sphere smoothly fused with a box and a torus (exact-ish SDF), coloured by position."""

    batch_size = 1

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sdf(self, p: torch.Tensor) -> torch.Tensor:
        sphere = (p - torch.tensor([0.15, 0.0, 0.1], device=p.device)).norm(dim=-1) - 0.45
        q = (p - torch.tensor([-0.25, 0.1, -0.2], device=p.device)).abs() - torch.tensor([0.35, 0.25, 0.3], device=p.device)
        box = q.clamp_min(0).norm(dim=-1) + q.amax(-1).clamp_max(0)
        ring = torch.stack([p[..., :2].norm(dim=-1) - 0.6, p[..., 2] + 0.35], -1).norm(dim=-1) - 0.12
        k = 0.1
        d = torch.minimum(sphere, box)
        d = d - k * torch.relu(1 - (sphere - box).abs() / k) ** 2 / 4
        return torch.minimum(d, ring)

    def deformation(self, p: torch.Tensor) -> torch.Tensor:
        return 0.2 * torch.sin(5 * p)

    def color(self, p: torch.Tensor) -> torch.Tensor:
        return 0.5 + 0.5 * torch.sin(3 * p + torch.tensor([0.0, 2.0, 4.0], device=p.device))


def concat_cameras(a: Cameras, b: Cameras) -> Cameras:
    return Cameras(*(torch.cat([getattr(a, k), getattr(b, k)], dim=1) for k in ("c2w", "fovy", "elevation", "azimuth", "distance")), a.height, a.width)


def interior_mask(face_index: torch.Tensor, other: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """[V, H, W] True where both backends hit the same triangle, and the 4 neighbours are covered at a
    depth within 2 % (no silhouette or occlusion edge next to the pixel, so no anti-aliasing there)."""
    covered = (face_index >= 0).float()
    padded_cov = F.pad(covered[:, None], (1, 1, 1, 1))[:, 0]
    padded_depth = F.pad(depth[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    ok = (face_index == other) & (face_index >= 0)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        neighbour_cov = padded_cov[:, dy : dy + depth.shape[1], dx : dx + depth.shape[2]]
        neighbour_depth = padded_depth[:, dy : dy + depth.shape[1], dx : dx + depth.shape[2]]
        ok &= (neighbour_cov > 0) & ((neighbour_depth - depth).abs() < 0.02 * depth)
    return ok


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


def probe_single_triangle(device: torch.device) -> list[str]:
    """Position gradients of one large triangle (no anti-aliasing): both backends and central finite
    differences of the float64 PyTorch forward (which equals nvdiffrast's forward to float32 rounding).
    The PyTorch backend must match the finite differences; nvdiffrast's deviation is printed."""
    cameras = evaluation_cameras(1, height=64, width=64)
    tri = torch.tensor([[[0.0, -0.5, -0.4], [0.1, 0.6, -0.3], [-0.2, 0.0, 0.7]]], dtype=torch.float64)[0]
    faces = torch.tensor([[0, 1, 2]])
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    weights = torch.rand((1, 1, 3, 64, 64), generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def loss_of(vertices, backend, dev, dtype):
        renderer = MeshRenderer(backend=backend, antialias=False).to(dev)
        out = renderer.render_meshes([TriangleMesh(vertices, faces.to(dev))], [colors.to(dev, dtype)], cameras.to(dev))
        return (out["rgb"].to(dtype) * weights.to(dev, dtype)).sum()

    grads = {}
    for label, backend, dev, dtype in (("nvdiffrast", "nvdiffrast", device, torch.float32),
                                       ("torch cuda", "torch", device, torch.float32),
                                       ("torch cpu f64", "torch", torch.device("cpu"), torch.float64)):
        v = tri.to(dev, dtype).clone().requires_grad_(True)
        loss_of(v, backend, dev, dtype).backward()
        grads[label] = v.grad.double().cpu().flatten()
    fd = torch.zeros(9, dtype=torch.float64)
    eps = 1e-6
    for i in range(9):
        d = torch.zeros(9, dtype=torch.float64)
        d[i] = eps
        fd[i] = (loss_of((tri.flatten() + d).view(3, 3), "torch", "cpu", torch.float64)
                 - loss_of((tri.flatten() - d).view(3, 3), "torch", "cpu", torch.float64)) / (2 * eps)
    grads["finite differences"] = fd
    print("single triangle, no anti-aliasing: position gradients")
    for label, g in grads.items():
        cos = F.cosine_similarity(g, fd, dim=0).item()
        print(f"  {label:<20} cosine vs FD {cos:.6f}   |g|/|fd| {(g.norm() / fd.norm()).item():.4f}   {[round(x, 3) for x in g.tolist()]}")
    failures = []
    for label in ("torch cuda", "torch cpu f64"):
        cos = F.cosine_similarity(grads[label], fd, dim=0).item()
        if cos < TOLERANCES["probe_fd_cosine"]:
            failures.append(f"single-triangle probe: {label} gradient cosine vs finite differences {cos:.6f}")
    return failures


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
        print("no CUDA device: this check compares nvdiffrast with the PyTorch backend on a GPU (or use --self-test-cpu)")
        return 2
    else:
        device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    field = SceneField(device)
    mesh = DeformableMarchingCubes(resolution=args.grid)(field, device=device)[0].detach()
    colors = field.color(mesh.vertices)
    print(f"scene: {mesh.num_vertices} vertices, {mesh.num_faces} faces (grid {args.grid}^3), {args.resolution} px, {2 * args.views} views")
    cameras = concat_cameras(
        sample_training_cameras(1, args.views, generator=torch.Generator().manual_seed(0), height=args.resolution, width=args.resolution),
        evaluation_cameras(args.views, height=args.resolution, width=args.resolution),
    ).to(device)

    backends = {"nvdiffrast": reference, "torch": "torch"}  # label -> backend actually used
    renderers = {name: MeshRenderer(resolution=args.grid, backend=backend).to(device) for name, backend in backends.items()}
    outputs, grads, faces = {}, {}, {}
    weights = {n: torch.rand((1, 2 * args.views, c, args.resolution, args.resolution), generator=torch.Generator().manual_seed(1)).to(device) for n, c in zip(IMAGES, (3, 1, 3, 1, 1), strict=True)}
    for name, renderer in renderers.items():
        vertices = mesh.vertices.clone().requires_grad_(True)
        vertex_colors = colors.clone().requires_grad_(True)
        out = renderer.render_meshes([TriangleMesh(vertices, mesh.faces)], [vertex_colors], cameras)
        sum((out[n] * weights[n]).sum() for n in IMAGES).backward()
        outputs[name] = {n: out[n].detach().float() for n in IMAGES}
        grads[name] = (vertices.grad.flatten(), vertex_colors.grad.flatten())
        clip = torch.einsum("vij,nj->vni", mvp_matrix(cameras)[0], torch.cat([mesh.vertices, torch.ones_like(mesh.vertices[:, :1])], -1))
        faces[name] = renderer.rasterizer(device).rasterize(clip, mesh.faces, args.resolution, args.resolution).face_index

    failures = []
    a, b = outputs["nvdiffrast"], outputs["torch"]
    mask_a, mask_b = a["alpha"] > 0.5, b["alpha"] > 0.5
    iou = ((mask_a & mask_b).sum() / (mask_a | mask_b).sum().clamp_min(1)).item()
    face_agreement = (faces["nvdiffrast"] == faces["torch"]).float().mean().item()
    interior = interior_mask(faces["nvdiffrast"], faces["torch"], a["depth"][0, :, 0])  # [V, H, W]
    print(f"alpha IoU {iou:.5f}   same triangle per pixel {face_agreement:.5f}   interior pixels {interior.float().mean().item():.3f}")
    if iou < TOLERANCES["iou"]:
        failures.append(f"alpha IoU {iou:.5f} < {TOLERANCES['iou']}")
    print(f"{'image':<10} {'max |d|':>10} {'mean |d|':>10} {'interior max':>13}")
    for n in IMAGES:
        diff = (a[n] - b[n]).abs()[0]  # [V, C, H, W]
        inner = diff.permute(0, 2, 3, 1)[interior]
        if n == "depth":
            inner = inner / a[n][0].permute(0, 2, 3, 1)[interior].clamp_min(1e-6)
        inner_max = inner.max().item() if inner.numel() else 0.0
        print(f"{n:<10} {diff.max().item():10.2e} {diff.mean().item():10.2e} {inner_max:13.2e}")
        if inner_max > TOLERANCES["interior_max"]:
            failures.append(f"{n}: interior max difference {inner_max:.2e} > {TOLERANCES['interior_max']}")
        if n in ("rgb", "alpha", "normal") and diff.mean().item() > TOLERANCES["mean"]:
            failures.append(f"{n}: mean difference {diff.mean().item():.2e} > {TOLERANCES['mean']}")
    for label, ga, gb in zip(("vertex positions", "vertex colours"), grads["nvdiffrast"], grads["torch"], strict=True):
        cosine = F.cosine_similarity(ga.double(), gb.double(), dim=0).item()
        ratio = (gb.norm() / ga.norm().clamp_min(1e-30)).item()
        print(f"gradient w.r.t. {label:<17} cosine {cosine:.5f}   |torch| / |nvdiffrast| {ratio:.4f}")
        # nvdiffrast's barycentric gradient is itself not the exact derivative of its forward (see the
        # single-triangle probe against finite differences), so positions get a looser bound.
        bound = TOLERANCES["position_grad_cosine" if label == "vertex positions" else "grad_cosine"]
        if cosine < bound:
            failures.append(f"gradient w.r.t. {label}: cosine {cosine:.4f} < {TOLERANCES['grad_cosine']}")

    # Where do the position gradients differ? One image at a time, with and without anti-aliasing.
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
    failures += probe_single_triangle(device)

    # field path (marching cubes + colour MLP at the surface) through both backends
    field_out = {name: r(field, cameras) for name, r in renderers.items()}
    field_iou = (((field_out["nvdiffrast"]["alpha"] > 0.5) & (field_out["torch"]["alpha"] > 0.5)).sum() / ((field_out["nvdiffrast"]["alpha"] > 0.5) | (field_out["torch"]["alpha"] > 0.5)).sum()).item()
    field_rgb = (field_out["nvdiffrast"]["rgb"] - field_out["torch"]["rgb"]).abs().mean().item()
    print(f"field path: alpha IoU {field_iou:.5f}, mean |d rgb| {field_rgb:.2e}")
    if field_iou < TOLERANCES["iou"] or field_rgb > TOLERANCES["mean"]:
        failures.append(f"field path disagrees: IoU {field_iou:.5f}, mean rgb difference {field_rgb:.2e}")

    print(f"\ntimings (median of {args.repeats}, {2 * args.views} views at {args.resolution} px, mesh of {mesh.num_faces} faces)")
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
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\nOK: the backends agree within the stated tolerances")
    return 0


if __name__ == "__main__":
    sys.exit(main())
