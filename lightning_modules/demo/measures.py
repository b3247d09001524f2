"""What the CPU demo does around training: the untrained student's snapshot, and each prompt's mesh generated,
exported, measured against its target shape and shown as a turntable image."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch


class SaveUntrainedStudent(pl.Callback):
    """Saves the student as fit starts (before the first optimizer step), with `PRDModule.save_student`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0 and trainer.is_global_zero:
            pl_module.save_student(self.directory)


def save_turntable_image(mesh, out_path: Path, frames: int, size: int = 128) -> Path:
    """One row of `frames` views around a mesh (`evaluate.MeshData`, world frame, vertex colours), as PNG."""
    from PIL import Image

    from renderers.mesh_renderer import MeshRenderer
    from renderers.turntable import frames_to_uint8, image_grid, render_turntable

    vertices, faces = torch.from_numpy(mesh.vertices), torch.from_numpy(mesh.faces)
    colors = torch.from_numpy(mesh.colors)
    views = render_turntable(MeshRenderer(backend="torch"), (vertices, faces), colors, num_frames=frames, height=size, width=size)
    Image.fromarray(frames_to_uint8(image_grid(views, columns=frames)[None])[0]).save(out_path)
    return out_path


def generate_and_measure(
    weights: Path, base: str, prompts: list[str], target_points: list[torch.Tensor], out_dir: Path, args, turntables: bool
) -> list[dict]:
    """Generate each prompt's object with the student saved in `weights` (prompt i: noise seed + i) and measure
    the exported file: `chamfer` to every target (`target_points[j]`, `[N, 3]`), `nearest` target, and what was
    `measured`: "mesh" (points sampled on the GLB) or, for a student with Gaussians, "gaussian centres" (the
    centres in its 3DGS PLY)."""
    from lightning_modules.evaluation.meshes import load_mesh
    from lightning_modules.student import TriplaneStudent
    from lightning_modules.student.generation import generate_meshes
    from teachers.shapes import chamfer_distance, sample_mesh_surface

    student = TriplaneStudent.from_pretrained(base, weights=weights)
    records = generate_meshes(student, prompts, out_dir, seed=args.seed, resolution=args.mesh_resolution, progress=False)
    for index, record in enumerate(records):
        path = out_dir / record["file"]
        mesh = load_mesh(path)  # the exported file, back in the world frame
        if "gaussians_file" in record:
            from renderers.gaussian_ply import read_gaussian_ply

            points = read_gaussian_ply(out_dir / record["gaussians_file"]).means[0].float()  # [N, 3]
            record["measured"] = "gaussian centres"
        else:
            points = sample_mesh_surface(torch.from_numpy(mesh.vertices), torch.from_numpy(mesh.faces), args.num_points, seed=1)
            record["measured"] = "mesh"
        distances = [float(chamfer_distance(points, target)) for target in target_points]
        record["chamfer"] = distances[index]
        record["nearest"] = int(np.argmin(distances))  # whether the shapes are told apart
        if turntables:
            record["turntable"] = save_turntable_image(mesh, path.with_name(path.stem + "_turntable.png"), args.turntable_frames).name
    return records
