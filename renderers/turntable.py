"""Turntables: a field or a mesh rendered from cameras circling it, saved as PNG frames and / or a GIF."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from renderers.cameras import EVAL_DISTANCE, EVAL_ELEVATION, EVAL_FOVY, evaluation_cameras
from renderers.marching_cubes import TriangleMesh
from renderers.types import Cameras, Field


@torch.no_grad()
def render_turntable(
    renderer: nn.Module,
    target: Field | TriangleMesh | tuple[Tensor, Tensor],
    colors: Tensor | None = None,
    num_frames: int = 36,
    height: int = 256,
    width: int = 256,
    elevation: float = EVAL_ELEVATION,
    distance: float = EVAL_DISTANCE,
    fovy: float = EVAL_FOVY,
    frames_per_call: int = 8,
    image: str = "rgb",
) -> Tensor:
    """Frames `[F, C, H, W]` of one object seen from `num_frames` azimuths (0, 360 / F, ...).

    target: a Field holding ONE object (rendered with `renderer`, a MeshRenderer or NeuSVolumeRenderer),
        or a mesh (TriangleMesh or (vertices, faces)) with per-vertex `colors [Nv, 3]` (MeshRenderer).
    image: which render to keep ("rgb", "normal", "alpha", ...).
    """
    device = next((p.device for p in renderer.parameters()), None) or next((b.device for b in renderer.buffers()), torch.device("cpu"))
    was_training = renderer.training
    renderer.eval()
    try:
        all_cameras = evaluation_cameras(num_frames, elevation=elevation, distance=distance, fovy=fovy, height=height, width=width, device=device)
        frames = []
        for start in range(0, num_frames, frames_per_call):
            cameras = _slice_views(all_cameras, start, start + frames_per_call)
            if isinstance(target, (TriangleMesh, tuple)):
                if colors is None:
                    raise ValueError("a mesh turntable needs per-vertex colors [Nv, 3]")
                out = renderer.render_meshes([target], [colors], cameras)
            else:
                out = renderer(target, cameras)
            frames.append(out[image][0].detach().float().cpu())
        return torch.cat(frames)
    finally:
        renderer.train(was_training)


def _slice_views(cameras: Cameras, start: int, stop: int) -> Cameras:
    return Cameras(
        c2w=cameras.c2w[:, start:stop],
        fovy=cameras.fovy[:, start:stop],
        elevation=cameras.elevation[:, start:stop],
        azimuth=cameras.azimuth[:, start:stop],
        distance=cameras.distance[:, start:stop],
        height=cameras.height,
        width=cameras.width,
    )


def frames_to_uint8(frames: Tensor) -> list[np.ndarray]:
    """`[F, C, H, W]` floats in [0, 1] (C = 1 or 3) -> F arrays `[H, W, 3]` uint8."""
    if frames.dim() != 4 or frames.shape[1] not in (1, 3):
        raise ValueError(f"expected frames [F, 1 or 3, H, W], got {tuple(frames.shape)}")
    frames = frames.expand(-1, 3, -1, -1) if frames.shape[1] == 1 else frames
    array = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return list(array)


def save_turntable(
    frames: Tensor,
    out_dir: str | Path,
    name: str = "turntable",
    png: bool = True,
    gif: bool = True,
    fps: float = 12.0,
) -> list[Path]:
    """Write `frames [F, C, H, W]` as `out_dir/name_000.png ...` and / or `out_dir/name.gif` (looping).
    Returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(a) for a in frames_to_uint8(frames)]
    written = []
    if png:
        for index, img in enumerate(images):
            path = out_dir / f"{name}_{index:03d}.png"
            img.save(path)
            written.append(path)
    if gif:
        path = out_dir / f"{name}.gif"
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(round(1000 / fps)), loop=0)
        written.append(path)
    return written


def image_grid(images: Sequence[Tensor] | Tensor, columns: int) -> Tensor:
    """Tile images `[N, C, H, W]` into one `[C, rows H, columns W]` (for logging render grids)."""
    images = torch.stack(list(images)) if not isinstance(images, Tensor) else images
    count, channels, height, width = images.shape
    rows = -(-count // columns)
    grid = images.new_ones(channels, rows * height, columns * width)
    for index in range(count):
        r, c = divmod(index, columns)
        grid[:, r * height : (r + 1) * height, c * width : (c + 1) * width] = images[index]
    return grid
