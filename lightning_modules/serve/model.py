"""The student of `prd serve`, loaded once, and what one request makes of it: a folder of files.

    model = ServeModel(student, "outputs/serve")
    request, notices = model.check("a wooden chair", seed=0, resolution=64, file_format="obj")
    result = model.generate(request, notices)   # result.mesh_file, .glb_file, .turntable_file, .timings

Each request gets its own folder `out_dir/<32 hex digits>/` (a random id, never a name from the request);
the mesh file name is the prompt's slug (`[a-z0-9_]`, `generation.slugify`), and every written path is checked
to lie inside `out_dir`. The student runs one request at a time (a lock), whichever front end calls it.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lightning_modules.serve.requests import MeshRequest, RequestError, check_request
from lightning_modules.student.generation import StageTimer, generate_meshes
from renderers.errors import UserError

_REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9]+)?$")


class PathOutsideError(UserError, ValueError):
    """A file name that would point outside the output folder (one-line message; HTTP 404)."""


def path_inside(root: str | Path, *names: str) -> Path:
    """`root/names...`, for names made of `[A-Za-z0-9_]` with at most one suffix (request ids, mesh files):
    anything else (`..`, separators, absolute paths, NUL) and any path that resolves outside `root` is a
    `PathOutsideError`."""
    root = Path(root).resolve()
    for name in names:
        if not isinstance(name, str) or not _FILE_NAME.match(name):
            raise PathOutsideError(f"{str(name)[:80]!r} is not a file of this server: use the URL a generation returned")
    path = root.joinpath(*names).resolve()
    if not path.is_relative_to(root) or path == root:
        raise PathOutsideError(f"{'/'.join(names)[:80]!r} is outside the output folder")
    return path


@dataclass
class MeshResult:
    """The files of one request (all inside `folder`) and its seconds per stage."""

    request: MeshRequest
    request_id: str
    folder: Path
    mesh_file: Path  # in request.file_format
    glb_file: Path  # the same mesh as GLB, for the 3D view
    turntable_file: Path | None
    vertices: int
    faces: int
    timings: dict[str, float]
    notices: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """JSON-ready: prompt, seed, resolution, format, file names, sizes, timings, notices."""
        return dict(
            request_id=self.request_id, prompt=self.request.prompt, seed=self.request.seed,
            resolution=self.request.resolution, format=self.request.file_format, uv_texture=self.request.uv_texture,
            file=self.mesh_file.name,
            glb=self.glb_file.name, turntable=self.turntable_file.name if self.turntable_file else None,
            vertices=self.vertices, faces=self.faces, timings_seconds=self.timings, notices=self.notices,
        )


class ServeModel:
    """A loaded student and the output folder of its requests.

    turntable_frames: views in the turntable strip (0: none), each `turntable_size` px square.
    empty_surface: "unit_sphere" (the released pipeline) or "error" for a field without a surface.
    """

    def __init__(self, student, out_dir: str | Path, turntable_frames: int = 8, turntable_size: int = 128,
                 empty_surface: str = "unit_sphere", texture_size: int = 512) -> None:
        self.student = student
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.turntable_frames, self.turntable_size = turntable_frames, turntable_size
        self.empty_surface, self.texture_size = empty_surface, texture_size
        self.lock = threading.Lock()

    def check(self, prompt, seed=0, resolution=64, file_format="glb", uv_texture=False) -> tuple[MeshRequest, list[str]]:
        """`check_request` with the student's tokenizer (prompts cut to its 77 tokens)."""
        return check_request(prompt, seed, resolution, file_format, getattr(self.student, "tokenizer", None), uv_texture)

    def generate(self, request: MeshRequest, notices: list[str] | tuple = ()) -> MeshResult:
        """Generate `request` into a new folder; `UserError` (e.g. an empty surface with empty_surface="error")
        when it cannot, with nothing left behind."""
        request_id = uuid.uuid4().hex
        folder = path_inside(self.out_dir, request_id)
        folder.mkdir()
        try:
            return self._generate_into(request, request_id, list(notices))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # a failed request leaves nothing behind
            raise

    def _generate_into(self, request: MeshRequest, request_id: str, notices: list[str]) -> MeshResult:
        folder = path_inside(self.out_dir, request_id)
        timer = StageTimer()
        with self.lock:
            record = generate_meshes(
                self.student, [request.prompt], folder, seed=request.seed, file_format="glb",
                resolution=request.resolution, batch_size=1, empty_surface=self.empty_surface, timer=timer,
                progress=False, uv_texture=request.uv_texture, texture_size=self.texture_size,
            )[0]
        glb_file = path_inside(self.out_dir, request_id, record["file"])
        if record["empty_surface_fallback"]:
            notices.append("the field has no surface at this seed: this is the fallback unit sphere; try another seed")
        timings = dict(timer.seconds)
        mesh_file, turntable_file = glb_file, None
        if request.file_format != "glb" or self.turntable_frames:
            from lightning_modules.evaluation.meshes import load_mesh

            mesh = load_mesh(glb_file)  # world frame, colours in [0, 1]
        if request.file_format != "glb":
            start = time.perf_counter()
            path = path_inside(self.out_dir, request_id, f"{glb_file.stem}.{request.file_format}")
            mesh_file = self._convert(mesh, path, request.uv_texture, self.texture_size)
            timings["export"] = timings.get("export", 0.0) + time.perf_counter() - start
        if self.turntable_frames:
            start = time.perf_counter()
            turntable_file = self._turntable(mesh, path_inside(self.out_dir, request_id, f"{glb_file.stem}_turntable.png"))
            timings["turntable"] = time.perf_counter() - start
        timings["total"] = sum(timings.values())
        return MeshResult(request, request_id, folder, mesh_file, glb_file, turntable_file, record["vertices"],
                          record["faces"], timings, notices)

    def generate_from(self, prompt, seed=0, resolution=64, file_format="glb", uv_texture=False) -> MeshResult:
        """`check` then `generate`: a `RequestError` for bad input, else the result."""
        request, notices = self.check(prompt, seed, resolution, file_format, uv_texture)
        return self.generate(request, notices)

    @staticmethod
    def _convert(mesh, path: Path, uv_texture: bool, texture_size: int) -> Path:
        """`mesh` (world frame, colours `[N, 3]`) written as `path`; a textured OBJ comes as a zip of the OBJ, its
        MTL and PNG (one file to download)."""
        from renderers.export import export_mesh

        written = export_mesh(path, mesh.vertices, mesh.faces, np.clip(mesh.colors, 0, 1), file_format=path.suffix[1:],
                              uv_texture=uv_texture, texture_size=texture_size)
        if not (uv_texture and path.suffix == ".obj"):
            return written
        import zipfile

        archive = path.with_suffix(".zip")
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
            for part in (written, path.with_suffix(".mtl"), path.with_suffix(".png")):
                zipped.write(part, part.name)
        return archive

    def _turntable(self, mesh, path: Path) -> Path:
        """A strip of `turntable_frames` views `[H, frames W, 3]` around the mesh (world frame), as PNG."""
        from PIL import Image

        from renderers.mesh_renderer import MeshRenderer
        from renderers.turntable import frames_to_uint8, image_grid, render_turntable

        vertices, faces = torch.from_numpy(mesh.vertices).float(), torch.from_numpy(mesh.faces)
        colors = torch.from_numpy(mesh.colors).float()
        size, frames = self.turntable_size, self.turntable_frames
        views = render_turntable(MeshRenderer(backend="torch"), (vertices, faces), colors, num_frames=frames,
                                 height=size, width=size)
        Image.fromarray(frames_to_uint8(image_grid(views, columns=frames)[None])[0]).save(path)
        return path


__all__ = ["MeshResult", "PathOutsideError", "RequestError", "ServeModel", "path_inside"]
