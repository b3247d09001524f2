"""Gaussian renderer: 3D Gaussians drawn from every camera, with the images the mesh and volume renderers
return, so every teacher takes them unchanged.

Per view (RenderOutput(renderer="gaussian").images, each `[B, V, C, H, W]`), with w the compositing
weights of renderers/gaussian_raster.py and a = sum w:
- "rgb" (3): sum w colour + (1 - a) background (the same background modules as MeshRenderer);
- "alpha" (1): a;
- "normal" (3): n = normalise(sum w normal) in camera space (OpenGL camera: x right, y up, z towards the
  viewer; x negated by default as the reference does for RichDreamer), (n + 1) / 2 a + (1 - a) (0.5, 0.5, 1).
  A Gaussian's normal is its local axis of smallest scale, flipped to face the camera;
- "depth" (1): sum w z, z the camera-space depth of each centre (distance along the optical axis): the
  depth of opaque surfaces, 0 on the background, as MeshRenderer's;
- "disparity" (1): (a far - depth) / (far - near) clamped to [0, 1], near / far = camera distance -/+ sqrt(3):
  the volume renderer's normalisation at the expected depth (depth / a), 0 on the background.

Backends: "torch" (renderers/gaussian_raster.py, any device, differentiable), "gsplat" (CUDA; `pip install
-e '.[gsplat]'`, its kernels compile on first use) and "auto" (gsplat for CUDA tensors when it imports,
else torch with a one-line notice). Both take each Gaussian's colour from `Gaussians.colors` and its normal
and depth as extra channels of one rasterisation. gsplat 1.5 clamps alpha at 0.999 where the torch backend
uses `max_alpha` (0.99 as in 3DGS): pass max_alpha=0.999 to compare them like for like.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from renderers.backgrounds import NORMAL_BACKGROUND, as_background
from renderers.cameras import camera_positions, intrinsics_matrix, pixel_ray_directions, world_to_camera
from renderers.gaussian_raster import EPS2D, project_gaussians, rasterize_gaussians
from renderers.gaussians import Gaussians
from renderers.rasterizers import RasterizerBackendError, _notice_once
from renderers.types import Cameras, RenderOutput

GaussianBackend = Literal["auto", "torch", "gsplat"]
BACKENDS = ("auto", "torch", "gsplat")
# OpenGL camera (y up, looking along -z) -> OpenCV camera (y down, looking along +z)
_GL_TO_CV = (1.0, -1.0, -1.0)


class GaussianSource(Protocol):
    """A representation's field that holds Gaussians."""

    def gaussians(self) -> Gaussians: ...


def gsplat_available() -> bool:
    """True when `gsplat` imports (its CUDA kernels compile later, on first use)."""
    try:
        import gsplat  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as missing
        return False
    return True


def resolve_gaussian_backend(backend: str, device: torch.device | str | None = None) -> str:
    """The backend, "torch" or "gsplat", for tensors on `device`. "auto": gsplat for CUDA tensors when it imports, else
    torch (one notice). "gsplat" without CUDA or without the package: `RasterizerBackendError`."""
    if backend not in BACKENDS:
        raise RasterizerBackendError(f"unknown Gaussian renderer backend {backend!r}: use one of {', '.join(BACKENDS)}")
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if backend == "torch":
        return "torch"
    if backend == "gsplat":
        if not torch.cuda.is_available():
            raise RasterizerBackendError(
                "Gaussian renderer backend 'gsplat' needs a CUDA GPU, but torch.cuda.is_available() is False; "
                "use backend='torch' (or 'auto') on this machine"
            )
        if device is not None and not on_cuda:
            raise RasterizerBackendError(
                f"Gaussian renderer backend 'gsplat' needs CUDA tensors, but the Gaussians are on {device}; "
                "move them to the GPU or use backend='torch'"
            )
        if not gsplat_available():
            raise RasterizerBackendError(
                "Gaussian renderer backend 'gsplat' is not installed: pip install -e '.[gsplat]' "
                "(compiled on first use on a CUDA machine), or use backend='torch'"
            )
        return "gsplat"
    if not on_cuda:
        _notice_once("Gaussian renderer: the Gaussians are not on a CUDA device, using the pure-PyTorch backend")
        return "torch"
    if not gsplat_available():
        _notice_once("Gaussian renderer: gsplat is not installed, using the pure-PyTorch backend on the GPU (faster: pip install -e '.[gsplat]')")
        return "torch"
    return "gsplat"


def opencv_viewmats(cameras: Cameras) -> Tensor:
    """OpenCV world-to-camera matrices `[B, V, 4, 4]` (x right, y down, z forward) from the OpenGL c2w."""
    flip = torch.tensor([*_GL_TO_CV, 1.0], dtype=cameras.c2w.dtype, device=cameras.c2w.device)
    return flip[:, None] * world_to_camera(cameras.c2w)


def view_features(gaussians: Gaussians, cameras: Cameras, normal_flip_x: bool) -> Tensor:
    """Per-view features `[B, V, N, 6]`: rgb (Gaussians.colors) and the camera-space (OpenGL) normal,
    facing the camera, x negated when `normal_flip_x`."""
    dtype = gaussians.dtype
    positions = camera_positions(cameras).to(dtype)  # [B, V, 3]
    rgb = gaussians.colors(positions)
    normals = gaussians.normals()[:, None]  # [B, 1, N, 3]
    towards_camera = positions[:, :, None] - gaussians.means[:, None]  # [B, V, N, 3]
    sign = torch.where((normals * towards_camera).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(dtype)
    rotation = world_to_camera(cameras.c2w)[..., :3, :3].to(dtype)  # [B, V, 3, 3]
    normals_cam = torch.einsum("bvij,bvnj->bvni", rotation, normals * sign)
    if normal_flip_x:
        normals_cam = normals_cam * torch.tensor([-1.0, 1.0, 1.0], dtype=dtype, device=normals_cam.device)
    return torch.cat([rgb, normals_cam], dim=-1)


class GaussianRenderer(nn.Module):
    """Renders `Gaussians` (or a field with a `gaussians()` method) from every camera.

    Args:
        backend: "auto", "torch" or "gsplat" (see the module docstring).
        background: a module mapping directions `[B, V, H, W, 3]` (+ text embedding) to RGB, or an RGB
            triple; default white (as MeshRenderer).
        normal_flip_x: negate camera-space x of the normals (reference, for RichDreamer).
        normal_background: RGB of the normal image on the background.
        near, far: camera-space depth range of the Gaussian centres that are drawn.
        max_alpha: clamp of a Gaussian's alpha at a pixel (torch backend; 3DGS 0.99, gsplat 0.999).
        eps2d: low-pass dilation added to the diagonal of the 2D covariances, px^2 (3DGS / gsplat: 0.3).
        antialiased: Mip-Splatting's 2D filter (gsplat's rasterize_mode "antialiased"): each Gaussian's opacity
            is scaled by sqrt(det(Sigma2D - eps2d I) / det(Sigma2D)), so the dilation blurs a splat without
            adding to its coverage: a sub-pixel or edge-on splat draws faint instead of as a 0.55 px blob.
        chunk_elements: (tile pixels x Gaussians) pairs evaluated at once by the torch backend.
    """

    def __init__(
        self,
        backend: GaussianBackend = "auto",
        background: nn.Module | Sequence[float] | None = None,
        normal_flip_x: bool = True,
        normal_background: Sequence[float] = NORMAL_BACKGROUND,
        near: float = 0.01,
        far: float = 1e10,
        max_alpha: float = 0.99,
        eps2d: float = EPS2D,
        antialiased: bool = False,
        chunk_elements: int = 2**22,
    ) -> None:
        super().__init__()
        if backend != "auto":
            resolve_gaussian_backend(backend)  # an unknown name, or gsplat without CUDA, fails here
        if not 0.0 < max_alpha < 1.0:
            raise ValueError(f"max_alpha must be in (0, 1), got {max_alpha}")
        self.backend = backend
        self.background = as_background(background)
        self.normal_flip_x = normal_flip_x
        self.normal_background = tuple(float(c) for c in normal_background)
        self.near, self.far = float(near), float(far)
        self.max_alpha = float(max_alpha)
        self.eps2d = float(eps2d)
        self.antialiased = bool(antialiased)
        self.chunk_elements = int(chunk_elements)

    def forward(
        self, field: Gaussians | GaussianSource, cameras: Cameras, text_embedding: Tensor | None = None
    ) -> RenderOutput:
        """Render the B objects of `field` from `cameras` ([B, V], image size cameras.height x width).

        text_embedding: [B, D] or [B, T, D] for a text-conditioned background, else None.
        """
        gaussians = field if isinstance(field, Gaussians) else field.gaussians()
        if gaussians.batch_size != cameras.batch_size:
            raise ValueError(f"got {gaussians.batch_size} objects of Gaussians for cameras of batch size {cameras.batch_size}")
        device = gaussians.device
        # float64 Gaussians render in float64 (gradient checks); anything else in float32
        dtype = torch.float64 if gaussians.dtype == torch.float64 else torch.float32
        gaussians = gaussians.to(dtype)
        view = replace(cameras.to(device), c2w=cameras.c2w.to(device, dtype), fovy=cameras.fovy.to(device, dtype))
        features = view_features(gaussians, view, self.normal_flip_x)  # [B, V, N, 6]
        if resolve_gaussian_backend(self.backend, device) == "gsplat":
            composited, alpha = self._rasterize_gsplat(gaussians, view, features)
        else:
            composited, alpha = self._rasterize_torch(gaussians, view, features)
        images = self._images(composited, alpha, view, text_embedding, dtype)
        return RenderOutput(images=images, cameras=cameras, renderer="gaussian")

    def _rasterize_torch(self, gaussians: Gaussians, cameras: Cameras, features: Tensor) -> tuple[Tensor, Tensor]:
        """features [B, V, N, 6] -> (rgb, normal, depth composited [B, V, H, W, 7], alpha [B, V, H, W, 1])."""
        dtype = gaussians.dtype
        projected = project_gaussians(
            gaussians.means,
            gaussians.covariances(),
            gaussians.opacities,
            opencv_viewmats(cameras).to(dtype),
            intrinsics_matrix(cameras).to(dtype),
            cameras.height,
            cameras.width,
            self.near,
            self.far,
            self.eps2d,
            self.antialiased,
        )
        features = torch.cat([features, projected.depths[..., None]], dim=-1)
        opacities = gaussians.opacities
        if projected.compensations is not None:
            opacities = opacities[:, None] * projected.compensations  # [B, V, N]
        return rasterize_gaussians(
            projected,
            opacities,
            features,
            cameras.height,
            cameras.width,
            max_alpha=self.max_alpha,
            chunk_elements=self.chunk_elements,
        )

    def _rasterize_gsplat(self, gaussians: Gaussians, cameras: Cameras, features: Tensor) -> tuple[Tensor, Tensor]:
        """As `_rasterize_torch`, with gsplat.rasterization (float32, CUDA)."""
        from gsplat import rasterization

        composited, alpha, _ = rasterization(
            means=gaussians.means.float(),
            quats=F.normalize(gaussians.quats.float(), dim=-1),
            scales=gaussians.scales.float(),
            opacities=gaussians.opacities.float(),
            colors=features.float(),  # [B, V, N, 6]: per-view features, no SH evaluation inside gsplat
            viewmats=opencv_viewmats(cameras).float(),
            Ks=intrinsics_matrix(cameras).float(),
            width=cameras.width,
            height=cameras.height,
            near_plane=self.near,
            far_plane=self.far,
            eps2d=self.eps2d,
            sh_degree=None,
            packed=False,
            tile_size=16,
            backgrounds=None,
            render_mode="RGB+D",  # the last channel: accumulated depth sum w z
            rasterize_mode="antialiased" if self.antialiased else "classic",
        )
        return composited.to(gaussians.dtype), alpha.to(gaussians.dtype)

    def _images(
        self, composited: Tensor, alpha: Tensor, cameras: Cameras, text_embedding: Tensor | None, dtype: torch.dtype
    ) -> dict[str, Tensor]:
        """composited [B, V, H, W, 7] (rgb, normal, depth), alpha [B, V, H, W, 1] -> the five images."""
        rgb_fg, normal_sum, depth = composited[..., :3], composited[..., 3:6], composited[..., 6:7]
        background = self.background(pixel_ray_directions(cameras).to(dtype), text_embedding).to(dtype)
        rgb = rgb_fg + (1.0 - alpha) * background
        normal_bg = torch.tensor(self.normal_background, dtype=dtype, device=alpha.device)
        normal = (F.normalize(normal_sum, dim=-1) + 1.0) / 2.0 * alpha + (1.0 - alpha) * normal_bg
        distance = cameras.distance.to(dtype)[:, :, None, None, None]
        far, near = distance + math.sqrt(3.0), distance - math.sqrt(3.0)
        disparity = ((alpha * far - depth) / (far - near)).clamp(0.0, 1.0)
        images = {"rgb": rgb, "alpha": alpha, "normal": normal, "depth": depth, "disparity": disparity}
        return {name: image.permute(0, 1, 4, 2, 3) for name, image in images.items()}
