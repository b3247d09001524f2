"""The student of `prd serve`, loaded once, and what one request makes of it: a folder of files.

    model = ServeModel(student, "outputs/serve")
    request, notices = model.check("a wooden chair", seed=0, resolution=64, file_format="obj")
    result = model.generate(request, notices)   # result.mesh_file, .glb_file, .turntable_file, .timings

`sample_batch` runs the student's networks once for several requests (`batcher.Batcher` gathers them), and
`write_result` writes one request's files from its part of the batch (in the request's own thread, so that the
next batch's networks run meanwhile); `generate_batch` does both. Each request gets its own folder `out_dir/<32 hex digits>/` (a random id, never a name from the request);
the mesh file name is the prompt's slug (`[a-z0-9_]`, `generation.slugify`), and every written path is checked
to lie inside `out_dir`. The student runs one batch at a time (a lock), whichever front end calls it.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from lightning_modules.serve.requests import MeshRequest, RequestError, check_request
from lightning_modules.student.generation import (
    StageTimer,
    export_object,
    object_field,
    sample_fields,
    slugify,
)
from renderers.asset import AssetSettings
from renderers.errors import UserError
from renderers.marching_cubes import EmptySurfaceError, extract_mesh

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
    batch_size: int = 1  # requests whose networks ran in the same student call

    def summary(self) -> dict:
        """JSON-ready: prompt, seed, resolution, format, file names, sizes, timings, notices."""
        return dict(
            request_id=self.request_id, prompt=self.request.prompt, seed=self.request.seed,
            resolution=self.request.resolution, format=self.request.file_format, uv_texture=self.request.uv_texture,
            file=self.mesh_file.name,
            glb=self.glb_file.name, turntable=self.turntable_file.name if self.turntable_file else None,
            vertices=self.vertices, faces=self.faces, timings_seconds=self.timings, notices=self.notices,
            batch_size=self.batch_size,
        )


class Sampled(NamedTuple):
    """One request's object of a batched network run: its field (batch size 1), the batch's seconds per stage
    (text encoding, denoising, triplane decoding) and the number of requests in the batch."""

    field: object
    seconds: dict[str, float]
    batch_size: int


class ServeModel:
    """A loaded student and the output folder of its requests.

    turntable_frames: views in the turntable strip (0: none), each `turntable_size` px square.
    empty_surface: "unit_sphere" (the released pipeline) or "error" for a field without a surface.
    keep_requests / keep_seconds: after each request, the request folders beyond the newest `keep_requests`, and
    those older than `keep_seconds` (None: no age limit), are deleted (`prune`), so `out_dir` stays bounded.
    """

    def __init__(self, student, out_dir: str | Path, turntable_frames: int = 8, turntable_size: int = 128,
                 empty_surface: str = "unit_sphere", texture_size: int = 512, asset_faces: int = 20_000,
                 keep_requests: int = 100, keep_seconds: float | None = None) -> None:
        self.student = student
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.turntable_frames, self.turntable_size = turntable_frames, turntable_size
        self.empty_surface, self.texture_size, self.asset_faces = empty_surface, texture_size, asset_faces
        self.keep_requests, self.keep_seconds = keep_requests, keep_seconds
        self.lock = threading.Lock()

    def check(self, prompt, seed=0, resolution=64, file_format="glb", uv_texture=False) -> tuple[MeshRequest, list[str]]:
        """`check_request` with the student's tokenizer (prompts cut to its 77 tokens)."""
        return check_request(prompt, seed, resolution, file_format, getattr(self.student, "tokenizer", None), uv_texture)

    def generate(self, request: MeshRequest, notices: list[str] | tuple = ()) -> MeshResult:
        """Generate `request` alone (a batch of one) into a new folder; `UserError` (e.g. an empty surface with
        empty_surface="error") when it cannot, with nothing left behind."""
        (result,) = self.generate_batch([(request, notices)])
        if isinstance(result, BaseException):
            raise result
        return result

    def generate_batch(self, items: list[tuple[MeshRequest, list[str] | tuple]]) -> list[MeshResult | BaseException]:
        """B requests `(request, notices)`: `sample_batch` (one run of the student's networks), then `write_result`
        for each. Entry i is request i's result or the exception it failed with: one request's failure never
        fails the others."""
        results: list[MeshResult | BaseException] = []
        for (request, notices), sampled in zip(items, self.sample_batch(items), strict=True):
            try:
                results.append(sampled if isinstance(sampled, BaseException) else
                               self.write_result(request, notices, sampled))
            except Exception as err:
                results.append(err)
        return results

    def sample_batch(self, items: list[tuple[MeshRequest, list[str] | tuple]]) -> list[Sampled | BaseException]:
        """The student's networks once for B requests (`sample_fields`: B prompts, B seeds; one batch at a time):
        entry i is request i's `Sampled` field, or the exception it failed with (a failed batched run is retried
        request by request, so one request cannot fail the others)."""
        if not items:
            return []
        timer = StageTimer()
        try:
            with self.lock:
                fields = sample_fields(self.student, [r.prompt for r, _ in items], [r.seed for r, _ in items], timer)
        except Exception as err:
            if len(items) == 1:
                return [err]
            return [sampled for item in items for sampled in self.sample_batch([item])]
        return [Sampled(object_field(fields, i), dict(timer.seconds), len(items)) for i in range(len(items))]

    def write_result(self, request: MeshRequest, notices: list[str] | tuple, sampled: Sampled) -> MeshResult:
        """The files of one sampled request (mesh at its resolution, its format, turntable) in a new folder;
        nothing left behind when it fails. Runs in the caller's thread, beside the next batch's networks."""
        request_id = uuid.uuid4().hex
        folder = path_inside(self.out_dir, request_id)
        folder.mkdir()
        try:
            result = self._generate_into(request, request_id, list(notices), sampled.field,
                                         StageTimer(defaultdict(float, sampled.seconds)))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # a failed request leaves nothing behind
            raise
        result.batch_size = sampled.batch_size
        self.prune(keep=request_id)
        return result

    def prune(self, keep: str | None = None) -> list[str]:
        """Delete the request folders (`<32 hex digits>/` in `out_dir`; nothing else there is touched) beyond the
        newest `keep_requests` (by modification time) and those older than `keep_seconds`, never `keep`;
        returns the deleted ids."""
        folders = [p for p in self.out_dir.iterdir() if _REQUEST_ID.match(p.name) and p.is_dir()]
        ages = {}
        for folder in folders:
            try:
                ages[folder] = folder.stat().st_mtime
            except FileNotFoundError:  # pruned by another thread meanwhile
                continue
        newest_first = sorted(ages, key=ages.get, reverse=True)
        now = time.time()
        stale = [p for i, p in enumerate(newest_first) if p.name != keep and (
            i >= self.keep_requests or (self.keep_seconds is not None and now - ages[p] > self.keep_seconds))]
        for folder in stale:
            shutil.rmtree(folder, ignore_errors=True)
        return [p.name for p in stale]

    def _generate_into(self, request: MeshRequest, request_id: str, notices: list[str], obj, timer: StageTimer
                       ) -> MeshResult:
        folder = path_inside(self.out_dir, request_id)
        is_asset = request.file_format == "asset"  # the textured PBR GLB of `prd generate --asset`
        asset = AssetSettings(faces=self.asset_faces, texture_size=self.texture_size) if is_asset else None
        with timer("mesh extraction", self.student.device):
            try:
                (mesh,) = extract_mesh(obj, resolution=request.resolution, empty_fallback=self.empty_surface)
            except EmptySurfaceError as err:
                raise UserError(str(err)) from None
        record = export_object(mesh, obj, path_inside(self.out_dir, request_id, f"0000_{slugify(request.prompt)}.glb"),
                               device=self.student.device, dtype=self.student.field_dtype, timer=timer, asset=asset,
                               uv_texture=request.uv_texture, texture_size=self.texture_size)
        glb_file = path_inside(self.out_dir, request_id, record["file"])
        if record["empty_surface_fallback"]:
            notices.append("the field has no surface at this seed: this is the fallback unit sphere; try another seed")
        timings = dict(timer.seconds)
        mesh_file, turntable_file = glb_file, None
        if request.file_format not in ("glb", "asset") or self.turntable_frames:
            from lightning_modules.evaluation.meshes import load_mesh

            mesh = load_mesh(glb_file)  # world frame, colours in [0, 1]
        if request.file_format not in ("glb", "asset"):
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
