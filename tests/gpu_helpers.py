"""The scene and the measurements of the GPU comparisons, shared by tests/test_gpu.py (which asserts the
tolerances) and the benchmarks/*gpu* scripts (which print the numbers and time them).

Nothing here needs CUDA: every function takes the device, so the code itself also runs on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from renderers.cameras import evaluation_cameras, mvp_matrix, sample_training_cameras
from renderers.marching_cubes import DeformableMarchingCubes, TriangleMesh
from renderers.mesh_renderer import MeshRenderer
from renderers.types import Cameras

IMAGES = ("rgb", "alpha", "normal", "depth", "disparity")
IMAGE_CHANNELS = (3, 1, 3, 1, 1)


class SceneField:
    """A sphere smoothly fused with a box, plus a torus (exact-ish SDF), a smooth deformation and colours
    from the position; one object, on `device` (any `renderers.types.Field` consumer accepts it)."""

    batch_size = 1

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    def sdf(self, p: Tensor) -> Tensor:
        sphere = (p - torch.tensor([0.15, 0.0, 0.1], device=p.device)).norm(dim=-1) - 0.45
        q = (p - torch.tensor([-0.25, 0.1, -0.2], device=p.device)).abs() - torch.tensor(
            [0.35, 0.25, 0.3], device=p.device
        )
        box = q.clamp_min(0).norm(dim=-1) + q.amax(-1).clamp_max(0)
        ring = torch.stack([p[..., :2].norm(dim=-1) - 0.6, p[..., 2] + 0.35], -1).norm(dim=-1) - 0.12
        k = 0.1
        d = torch.minimum(sphere, box)
        d = d - k * torch.relu(1 - (sphere - box).abs() / k) ** 2 / 4
        return torch.minimum(d, ring)

    def deformation(self, p: Tensor) -> Tensor:
        return 0.2 * torch.sin(5 * p)

    def color(self, p: Tensor) -> Tensor:
        return 0.5 + 0.5 * torch.sin(3 * p + torch.tensor([0.0, 2.0, 4.0], device=p.device))


def concat_cameras(a: Cameras, b: Cameras) -> Cameras:
    """The views of `a` followed by those of `b` (same objects, same image size)."""
    names = ("c2w", "fovy", "elevation", "azimuth", "distance")
    return Cameras(*(torch.cat([getattr(a, k), getattr(b, k)], dim=1) for k in names), a.height, a.width)


def scene_cameras(views: int, resolution: int, device: torch.device | str) -> Cameras:
    """`views` training cameras (seed 0) followed by `views` evaluation cameras, one object."""
    training = sample_training_cameras(
        1, views, generator=torch.Generator().manual_seed(0), height=resolution, width=resolution
    )
    return concat_cameras(training, evaluation_cameras(views, height=resolution, width=resolution)).to(device)


def scene_mesh(device: torch.device | str, grid: int = 128) -> tuple[SceneField, TriangleMesh, Tensor]:
    """(the field, its marching-cubes mesh without gradient, the field's colour at the vertices)."""
    scene = SceneField(device)
    mesh = DeformableMarchingCubes(resolution=grid)(scene, device=device)[0].detach()
    return scene, mesh, scene.color(mesh.vertices)


def interior_mask(face_index: Tensor, other: Tensor, depth: Tensor) -> Tensor:
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


def image_weights(views: int, resolution: int, device: torch.device | str) -> dict[str, Tensor]:
    """Fixed random weights per image (seed 1) for a scalar loss whose gradients the backends compare."""
    g = torch.Generator().manual_seed(1)
    return {
        n: torch.rand((1, views, c, resolution, resolution), generator=g).to(device)
        for n, c in zip(IMAGES, IMAGE_CHANNELS, strict=True)
    }


@dataclass
class RasterizerComparison:
    """Backend `a` (the reference, nvdiffrast) against backend `b` (PyTorch) on the same mesh and cameras.

    iou: alpha-mask (alpha > 0.5) IoU; face_agreement: fraction of pixels with the same triangle;
    interior_fraction: fraction of `interior_mask` pixels; per image: max / mean |a - b| over all pixels
    and the max over interior pixels (depth: relative to the depth); gradient cosine and norm ratio |b| / |a|
    of a fixed random-weighted loss w.r.t. "vertex positions" and "vertex colours".
    """

    iou: float
    face_agreement: float
    interior_fraction: float
    max_abs: dict[str, float] = field(default_factory=dict)
    mean_abs: dict[str, float] = field(default_factory=dict)
    interior_max: dict[str, float] = field(default_factory=dict)
    grad_cosine: dict[str, float] = field(default_factory=dict)
    grad_norm_ratio: dict[str, float] = field(default_factory=dict)


def compare_rasterizers(
    renderer_a: MeshRenderer, renderer_b: MeshRenderer, mesh: TriangleMesh, colors: Tensor, cameras: Cameras
) -> RasterizerComparison:
    """Render `mesh` with per-vertex `colors` through both renderers (`render_meshes`) and compare."""
    views, resolution = cameras.num_views, cameras.height
    weights = image_weights(views, resolution, mesh.vertices.device)
    outputs, grads, faces = [], [], []
    for renderer in (renderer_a, renderer_b):
        vertices = mesh.vertices.clone().requires_grad_(True)
        vertex_colors = colors.clone().requires_grad_(True)
        out = renderer.render_meshes([TriangleMesh(vertices, mesh.faces)], [vertex_colors], cameras)
        sum((out[n] * weights[n]).sum() for n in IMAGES).backward()
        outputs.append({n: out[n].detach().float() for n in IMAGES})
        grads.append({"vertex positions": vertices.grad.flatten(), "vertex colours": vertex_colors.grad.flatten()})
        homogeneous = torch.cat([mesh.vertices, torch.ones_like(mesh.vertices[:, :1])], -1)
        clip = torch.einsum("vij,nj->vni", mvp_matrix(cameras)[0], homogeneous)
        rasterizer = renderer.rasterizer(mesh.vertices.device)
        faces.append(rasterizer.rasterize(clip, mesh.faces, resolution, resolution).face_index)

    a, b = outputs
    mask_a, mask_b = a["alpha"] > 0.5, b["alpha"] > 0.5
    interior = interior_mask(faces[0], faces[1], a["depth"][0, :, 0])  # [V, H, W]
    result = RasterizerComparison(
        iou=((mask_a & mask_b).sum() / (mask_a | mask_b).sum().clamp_min(1)).item(),
        face_agreement=(faces[0] == faces[1]).float().mean().item(),
        interior_fraction=interior.float().mean().item(),
    )
    for n in IMAGES:
        diff = (a[n] - b[n]).abs()[0]  # [V, C, H, W]
        inner = diff.permute(0, 2, 3, 1)[interior]
        if n == "depth":
            inner = inner / a[n][0].permute(0, 2, 3, 1)[interior].clamp_min(1e-6)
        result.max_abs[n] = diff.max().item()
        result.mean_abs[n] = diff.mean().item()
        result.interior_max[n] = inner.max().item() if inner.numel() else 0.0
    for label in grads[0]:
        ga, gb = grads[0][label].double(), grads[1][label].double()
        result.grad_cosine[label] = F.cosine_similarity(ga, gb, dim=0).item()
        result.grad_norm_ratio[label] = (gb.norm() / ga.norm().clamp_min(1e-30)).item()
    return result


def single_triangle_gradients(device: torch.device | str, backends: dict[str, str]) -> dict[str, Tensor]:
    """Position gradients `[9]` (float64, CPU) of one large triangle rendered without anti-aliasing, with a
    fixed random-weighted rgb loss, for each label -> backend in `backends` on `device` (float32), plus
    "torch cpu f64" and "finite differences" (central, of the float64 PyTorch forward on the CPU)."""
    cameras = evaluation_cameras(1, height=64, width=64)
    tri = torch.tensor([[0.0, -0.5, -0.4], [0.1, 0.6, -0.3], [-0.2, 0.0, 0.7]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2]])
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    weights = torch.rand((1, 1, 3, 64, 64), generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def loss_of(vertices: Tensor, backend: str, dev, dtype) -> Tensor:
        renderer = MeshRenderer(backend=backend, antialias=False).to(dev)
        out = renderer.render_meshes(
            [TriangleMesh(vertices, faces.to(dev))], [colors.to(dev, dtype)], cameras.to(dev)
        )
        return (out["rgb"].to(dtype) * weights.to(dev, dtype)).sum()

    runs = [(label, backend, torch.device(device), torch.float32) for label, backend in backends.items()]
    runs.append(("torch cpu f64", "torch", torch.device("cpu"), torch.float64))
    grads = {}
    for label, backend, dev, dtype in runs:
        v = tri.to(dev, dtype).clone().requires_grad_(True)
        loss_of(v, backend, dev, dtype).backward()
        grads[label] = v.grad.double().cpu().flatten()
    fd = torch.zeros(9, dtype=torch.float64)
    eps = 1e-6
    for i in range(9):
        d = torch.zeros(9, dtype=torch.float64)
        d[i] = eps
        plus = loss_of((tri.flatten() + d).view(3, 3), "torch", "cpu", torch.float64)
        minus = loss_of((tri.flatten() - d).view(3, 3), "torch", "cpu", torch.float64)
        fd[i] = (plus - minus) / (2 * eps)
    grads["finite differences"] = fd
    return grads
