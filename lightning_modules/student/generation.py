"""Prompts -> objects in memory, and their files, with a trained TriplaneTurbo student (the library behind
`prd generate`, `prd serve` and `prd eval --weights`).

    output = generate(student, ["a wooden chair"], seed=0)      # in memory, writes nothing (as diffusers' pipelines)
    output.objects[0].mesh, .vertex_colors, .field, .gaussians  # world frame; Gaussians for a Gaussian student
    for obj in iter_generate(student, prompts, seed=0):         # streamed: each object as soon as its mesh is done
        ...
    records = export_generation(output, "meshes/", file_format="glb")                       # only this writes
    records = generate_meshes(student, ["a wooden chair"], "meshes/", seed=0, file_format="glb")  # both, in batches
    records = generate_meshes(student, prompts, "assets/", asset=AssetSettings(faces=20_000))  # game-ready

Callers that batch differently (`prd serve`) use the halves: `sample_fields(student, prompts, seeds)` runs the
networks for B prompts at once and returns the batched field; `export_object(mesh, object_field(field, i), path,
...)` writes one object's file.

`asset` (`renderers.asset`): the mesh is decimated to a face budget, unwrapped, and albedo and normal maps
are baked from the field into a PBR GLB (or OBJ / MTL); `faces` alone decimates a vertex-colour (or
`uv_texture`) export. Either way the record gets the Chamfer / Hausdorff distance to the full mesh.

Object i of a run is drawn from noise seeded with `seed + i`, so a mesh does not depend on the batch
size or on the other prompts. Each record names the prompt, its seed, the file written and the mesh
sizes (a student with Gaussians also writes `<name>_gaussians.ply`, the 3DGS PLY, beside the mesh);
`StageTimer` collects the seconds per stage (text encoding, denoising, triplane decoding, mesh extraction,
gaussians, export). `generate_meshes(..., export_thread=True)` writes the files in a background thread while the
networks run on the next batch (the default on CUDA). Precision and torch.compile: `lightning_modules.student.
inference`. The command line (`prd generate`) is `lightning_modules.cli.generate`.
"""

from __future__ import annotations

import re
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from renderers.asset import AssetSettings, make_asset, write_asset
from renderers.bake import FieldSampler
from renderers.decimation import decimate, surface_distance
from renderers.errors import UserError
from renderers.export import export_mesh
from renderers.marching_cubes import EmptySurfaceError, extract_mesh

STAGES = ("text encoding", "denoising", "triplane decoding", "mesh extraction", "gaussians", "export")
OPTIONAL_STAGES = ("gaussians",)  # in the table only when it took place
MAX_PROMPT_CHARS = 1000


class PromptError(UserError, ValueError):
    """A prompt, or a prompts file, that cannot be generated from (one-line message)."""


@dataclass
class StageTimer:
    """Wall-clock seconds per named stage (CUDA work is synchronised at stage boundaries). Thread-safe: with the
    export thread, stages overlap and their sum exceeds the wall-clock time."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @contextmanager
    def __call__(self, stage: str, device: torch.device | None = None):
        sync = device is not None and device.type == "cuda"
        if sync:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            with self._lock:
                self.seconds[stage] += elapsed

    @property
    def total(self) -> float:
        return sum(self.seconds.get(s, 0.0) for s in STAGES)

    def table(self, num_meshes: int) -> str:
        rows = [f"{'stage':<20}{'total s':>10}{'per mesh s':>12}"]
        shown = [s for s in STAGES if s not in OPTIONAL_STAGES or s in self.seconds]
        for stage in (*shown, "total"):
            sec = self.total if stage == "total" else self.seconds.get(stage, 0.0)
            rows.append(f"{stage:<20}{sec:>10.3f}{sec / max(num_meshes, 1):>12.3f}")
        return "\n".join(rows)


def slugify(prompt: str, max_len: int = 60) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")
    return slug[:max_len].rstrip("_") or "prompt"


class DeviceError(UserError, ValueError):
    """A `--device` that is not a device, or not on this machine (one-line message)."""


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """`--device`: "auto" (CUDA when available, else the CPU), "cpu", "cuda", "cuda:1", "mps"; checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"{option} {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{option} {name} asked for CUDA, but no CUDA device is available: use {option} cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"{option} {name}: there is no CUDA device {device.index} ({count} available: cuda:0 to cuda:{count - 1})")
        return device
    if device.type == "mps" and torch.backends.mps.is_available():
        return device
    raise DeviceError(f"{option} {name}: {device.type} devices are not available here; use auto, cpu, cuda or cuda:N")


def validate_prompts(prompts: list[str], source: str = "prompt") -> list[str]:
    if not prompts:
        raise PromptError("no prompt given: pass prompts as arguments or --prompts-file FILE (one per line)")
    for i, p in enumerate(prompts, 1):
        if not p.strip():
            raise PromptError(f"{source} {i} is empty: every prompt must contain text")
        if len(p) > MAX_PROMPT_CHARS:
            raise PromptError(f"{source} {i} has {len(p)} characters: the limit is {MAX_PROMPT_CHARS}")
    return [p.strip() for p in prompts]


class _ObjectOfBatch:
    """Object `index` of any batched `renderers.types.Field` (B = 1): SDF, deformation and colours from one
    batched call, with the object's points in its row (the other rows get zeros)."""

    def __init__(self, field, index: int) -> None:
        self.field, self.index = field, index

    def _batch(self, points):
        batch = points.new_zeros(self.field.batch_size, *points.shape[1:])
        batch[self.index] = points[0]
        return batch

    def color(self, points):  # [1, N, 3] -> [1, N, 3]
        return self.field.color(self._batch(points))[self.index : self.index + 1]

    def sdf(self, points):  # [1, N, 3] -> [1, N]
        return self.field.sdf(self._batch(points))[self.index : self.index + 1]

    def deformation(self, points):  # [1, N, 3] -> [1, N, 3]
        return self.field.deformation(self._batch(points))[self.index : self.index + 1]

    batch_size = 1

    @property
    def device(self):
        return getattr(self.field, "device", None)

    @property
    def dtype(self):
        return getattr(self.field, "dtype", None)


def object_field(field, index: int):
    """The sub-field of object `index` of a batched field: its own `select(index)` when it has one, the planes of
    a TriplaneField, else a view (`_ObjectOfBatch`)."""
    from lightning_modules.student.triplane_field import TriplaneField

    if callable(getattr(field, "select", None)):
        return field.select(index)
    if not isinstance(field, TriplaneField):
        return _ObjectOfBatch(field, index)
    return TriplaneField(
        field.planes[index : index + 1],
        field.sdf_network,
        field.feature_network,
        field.deformation_network,
        field.config,
    )


@dataclass
class GeneratedObject:
    """One prompt's object, in memory (world frame of renderers/types.py).

    field: the object's own field (B = 1): SDF, colour, ...; mesh: its marching-cubes `TriangleMesh`;
    vertex_colors: `[V, 3]` colours of the mesh's vertices (None when not asked for); gaussians: its
    `renderers.gaussians.Gaussians` (B = 1) when the student's representation has them (`field.gaussians()`).
    """

    index: int
    prompt: str
    seed: int
    field: object
    mesh: object
    vertex_colors: torch.Tensor | None = None
    gaussians: object | None = None


@dataclass
class GenerationOutput:
    """What `generate` returns: one `GeneratedObject` per prompt, in order, the seconds per stage, and the
    student's device and dtype (where the fields are evaluated)."""

    objects: list[GeneratedObject]
    timings: dict[str, float]
    device: torch.device
    dtype: torch.dtype

    @property
    def meshes(self) -> list:
        return [o.mesh for o in self.objects]

    @property
    def gaussians(self) -> list:
        return [o.gaussians for o in self.objects]


@torch.no_grad()
def sample_fields(student, prompts: list[str], seeds: list[int], timer: StageTimer | None = None):
    """The networks for B prompts at once: text encoding, denoising from `student.make_noise(1, seed=seeds[i])`
    per object, triplane decoding (timed as those stages). Returns the batched `TriplaneField` (planes
    `[B, 6, ...]`; object i with `object_field(field, i)`), the same per object whatever the batch."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    timer = timer if timer is not None else StageTimer()
    device = student.device
    with timer("text encoding", device):
        emb = student.encode_prompt(list(prompts))
    with timer("denoising", device):
        noise = torch.cat([student.make_noise(1, seed=s) for s in seeds])
        latents = student.denoise(emb, noise)
    with timer("triplane decoding", device):
        return student.decode(latents)


@torch.no_grad()  # for generators too: each resumption runs without grad
def iter_generate(
    student,
    prompts: list[str],
    seed: int = 0,
    resolution: int = 160,
    batch_size: int = 4,
    empty_surface: str = "unit_sphere",
    vertex_colors: bool = True,
    first_index: int = 0,
    timer: StageTimer | None = None,
    coarse_to_fine: bool = True,
) -> Iterator[GeneratedObject]:
    """Prompts -> objects, yielded one by one, in order, as soon as each object's mesh is done; writes nothing.

    The networks run `batch_size` prompts at once (`sample_fields`); the meshes are then extracted object by
    object, so the first object of a batch comes out before the others are extracted. Object i
    (`first_index + i`) is drawn from noise `student.make_noise(1, seed=seed + i)`, so it does not depend on the
    batch. Every object gets its marching-cubes mesh (`resolution`^3 grid; `empty_surface`: "unit_sphere" as
    the released pipeline, or "error") with its vertex colours, and its Gaussians when the student's field
    offers `gaussians()` (`TriplaneGaussianStudent`). `timer` collects the seconds per stage. `coarse_to_fine`:
    the grid SDF is evaluated exactly only near the surface (`extract_mesh`; False: at every grid vertex, the same
    mesh).
    """
    prompts = validate_prompts(list(prompts))
    timer = timer if timer is not None else StageTimer()
    device, dtype = student.device, student.field_dtype
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        field_batch = sample_fields(student, batch, [seed + start + i for i in range(len(batch))], timer)
        splats = [None] * len(batch)
        if callable(getattr(field_batch, "gaussians", None)):
            with timer("gaussians", device):
                gaussians = field_batch.gaussians()
                splats = [gaussians.select(i) for i in range(len(batch))]
        for i, prompt in enumerate(batch):
            index = first_index + start + i
            with timer("mesh extraction", device):
                obj = object_field(field_batch, i)
                try:
                    (mesh,) = extract_mesh(obj, batch_size=1, resolution=resolution, empty_fallback=empty_surface,
                                           coarse_to_fine=coarse_to_fine)
                except EmptySurfaceError as err:
                    raise UserError(f"{err} (prompt {index + 1})") from None
                colors = obj.color(mesh.vertices[None].to(device, dtype))[0] if vertex_colors else None
            yield GeneratedObject(index, prompt, seed + start + i, obj, mesh, colors, splats[i])


@torch.no_grad()
def generate(
    student,
    prompts: list[str],
    seed: int = 0,
    resolution: int = 160,
    batch_size: int = 4,
    empty_surface: str = "unit_sphere",
    vertex_colors: bool = True,
    first_index: int = 0,
    timer: StageTimer | None = None,
    coarse_to_fine: bool = True,
) -> GenerationOutput:
    """Prompts -> objects in memory, all at once (`iter_generate` streams them); writes nothing
    (`export_generation` writes them). The output holds the seconds per stage, and the device and the dtype
    where the fields are evaluated (`student.field_dtype`)."""
    timer = timer if timer is not None else StageTimer()
    objects = list(iter_generate(student, prompts, seed, resolution, batch_size, empty_surface, vertex_colors,
                                 first_index, timer, coarse_to_fine))
    return GenerationOutput(objects, dict(timer.seconds), student.device, student.field_dtype)


def export_generation(
    output: GenerationOutput,
    out_dir: str | Path,
    file_format: str = "glb",
    uv_texture: bool = False,
    texture_size: int = 1024,
    material: str = "pbr",
    faces: int | None = None,
    asset: AssetSettings | None = None,
    timer: StageTimer | None = None,
) -> list[dict]:
    """Write every object of `output` into `out_dir` (which exists): its mesh as `NNNN_<slug>.<file_format>`
    and, when it has Gaussians, the 3DGS PLY `NNNN_<slug>_gaussians.ply`; one manifest record per object."""
    return [export_generated(obj, out_dir, file_format=file_format, uv_texture=uv_texture, texture_size=texture_size,
                             material=material, faces=faces, asset=asset, device=output.device, dtype=output.dtype,
                             timer=timer)
            for obj in output.objects]


def export_generated(
    obj: GeneratedObject,
    out_dir: str | Path,
    file_format: str = "glb",
    uv_texture: bool = False,
    texture_size: int = 1024,
    material: str = "pbr",
    faces: int | None = None,
    asset: AssetSettings | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    timer: StageTimer | None = None,
) -> dict:
    """Write one generated object into `out_dir` (its field evaluated on `device` in `dtype`): the mesh file and,
    with Gaussians, the 3DGS PLY. Returns its manifest record."""
    out_dir = Path(out_dir)
    timer = timer if timer is not None else StageTimer()
    device = torch.device(device)
    stem = f"{obj.index:04d}_{slugify(obj.prompt)}"
    record = dict(index=obj.index, prompt=obj.prompt, seed=obj.seed)
    record.update(export_object(obj.mesh, obj.field, out_dir / f"{stem}.{file_format}", rgb=obj.vertex_colors,
                                device=device, dtype=dtype, timer=timer, file_format=file_format, faces=faces,
                                asset=asset, uv_texture=uv_texture, texture_size=texture_size, material=material))
    if obj.gaussians is not None:
        from renderers.gaussian_ply import write_gaussian_ply

        with timer("export", device):
            splat_path = out_dir / f"{stem}_gaussians.ply"
            write_gaussian_ply(splat_path, obj.gaussians)
        record.update(gaussians_file=splat_path.name, gaussians=obj.gaussians.num_gaussians,
                      sh_degree=obj.gaussians.sh_degree)
    return record


def generate_meshes(
    student,
    prompts: list[str],
    out_dir: str | Path,
    seed: int = 0,
    file_format: str = "glb",
    resolution: int = 160,
    batch_size: int = 4,
    uv_texture: bool = False,
    texture_size: int = 1024,
    material: str = "pbr",
    empty_surface: str = "unit_sphere",
    timer: StageTimer | None = None,
    progress: bool = True,
    faces: int | None = None,
    asset: AssetSettings | bool | None = None,
    export_thread: bool | None = None,
    coarse_to_fine: bool = True,
) -> list[dict]:
    """`iter_generate` then `export_generated` per object, `batch_size` prompts at a time, into `out_dir`; one
    manifest record per prompt, in order (the Gaussian PLY's too, for a student with Gaussians).

    Prompt i uses noise `student.make_noise(1, seed=seed + i)`. `empty_surface` is the marching-cubes
    fallback when an SDF has no zero crossing ("unit_sphere" as the released pipeline, or "error").
    faces: decimate to this many faces before a vertex-colour / `uv_texture` export. asset: `AssetSettings`
    (True: the defaults) for a game-ready PBR asset (glb / obj): decimate, unwrap, bake albedo + normal map;
    its record gets "asset" (stats, distances, seconds per stage). export_thread: write the files in one
    background thread while the networks and marching cubes go on with the next objects (None: on CUDA only;
    on a 2-core CPU the two compete for the same cores, see README). coarse_to_fine: see `iter_generate`.
    """
    prompts = validate_prompts(list(prompts))
    asset = AssetSettings() if asset is True else (asset or None)
    if asset is not None and file_format not in ("glb", "obj"):
        raise UserError(f"an asset needs glb or obj, not {file_format}: PLY has no textures")
    if asset is not None and faces is not None:
        raise UserError("an asset takes its face budget from AssetSettings(faces=...): leave faces unset")
    if faces is not None and faces < 4:
        raise UserError(f"faces must be at least 4, got {faces}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = timer if timer is not None else StageTimer()
    if export_thread is None:
        export_thread = student.device.type == "cuda"
    export = dict(file_format=file_format, uv_texture=uv_texture, texture_size=texture_size, material=material,
                  faces=faces, asset=asset, device=student.device, dtype=student.field_dtype, timer=timer)
    objects = iter_generate(student, prompts, seed=seed, resolution=resolution, batch_size=batch_size,
                            empty_surface=empty_surface, vertex_colors=asset is None, timer=timer,
                            coarse_to_fine=coarse_to_fine)
    bar = tqdm(total=len(prompts), desc="generating", unit="mesh", disable=not progress)
    if not export_thread:
        records = []
        for obj in objects:
            records.append(export_generated(obj, out_dir, **export))
            bar.update(1)
    else:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prd-export") as pool:
            pending = []
            for obj in objects:
                future = pool.submit(export_generated, obj, out_dir, **export)
                future.add_done_callback(lambda _: bar.update(1))
                pending.append(future)
                if len(pending) > batch_size:  # at most one batch of objects waits in memory
                    pending[-batch_size - 1].result()
            records = [future.result() for future in pending]
    bar.close()
    return records


def export_object(
    mesh,
    obj,
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    timer: StageTimer | None = None,
    file_format: str = "glb",
    faces: int | None = None,
    asset: AssetSettings | None = None,
    uv_texture: bool = False,
    texture_size: int = 1024,
    material: str = "pbr",
    rgb: torch.Tensor | None = None,
) -> dict:
    """The file of one object at `path`, as `generate_meshes` writes it: its marching-cubes `mesh` and its field
    `obj` (`object_field(field, i)`, batch size 1, evaluated on `device` in `dtype`). Returns the record (file,
    vertices, faces, empty_surface_fallback; "asset", or the distances when decimated). Vertex colours are
    timed as "mesh extraction" (unless given as `rgb` `[V, 3]`), the file as "export"."""
    timer = timer if timer is not None else StageTimer()
    device = torch.device(device)
    with torch.no_grad():
        with timer("mesh extraction", device):  # vertex colours (an asset bakes its maps instead)
            if asset is None and rgb is None:
                rgb = obj.color(mesh.vertices[None].to(device, dtype))[0]
        with timer("export", device):
            if asset is not None:
                record = _write_asset(Path(path), mesh, obj, asset, file_format, device, dtype)
            else:
                record = _write_mesh(Path(path), mesh, rgb, obj, faces, file_format, uv_texture, texture_size,
                                     material, device, dtype)
    record["empty_surface_fallback"] = bool(mesh.used_fallback)
    return record


def _write_asset(path: Path, mesh, obj, settings: AssetSettings, file_format: str, device, dtype) -> dict:
    """The game-ready asset of one object (sub-field `obj`): its manifest entries."""
    sampler = FieldSampler(obj, device=device, dtype=dtype)
    built = make_asset(mesh.vertices.detach().float().cpu().numpy(), mesh.faces.detach().cpu().numpy(),
                       sampler, settings)
    written = write_asset(path, built, file_format)
    stats = dict(built.stats)
    return dict(file=written.name, vertices=stats.pop("atlas_vertices"), faces=stats.pop("faces"),
                asset=dict(stats, roughness=settings.roughness, seconds=dict(built.seconds)))


def _write_mesh(path: Path, mesh, rgb, obj, faces, file_format, uv_texture, texture_size, material, device,
                dtype) -> dict:
    """The vertex-colour (or `uv_texture`) file of one object, decimated to `faces` when given."""
    vertices, triangles, entries = mesh.vertices.float(), mesh.faces, {}
    if faces is not None and mesh.num_faces > faces:
        full_v, full_f = vertices.detach().cpu().numpy(), triangles.detach().cpu().numpy()
        small_v, small_f = decimate(full_v, full_f, faces)
        entries = dict(full_vertices=mesh.num_vertices, full_faces=mesh.num_faces,
                       distance_to_full_mesh=surface_distance(small_v, small_f, full_v, full_f).as_dict())
        vertices, triangles = torch.as_tensor(small_v, dtype=torch.float32), torch.as_tensor(small_f)
        rgb = obj.color(vertices[None].to(device, dtype))[0]
    color_fn = None
    if uv_texture:
        color_fn = FieldSampler(obj, device=device, dtype=dtype).color
    written = export_mesh(path, vertices, triangles, rgb.float().clamp(0, 1), file_format=file_format,
                          uv_texture=uv_texture, texture_size=texture_size, color_fn=color_fn, material=material)
    return dict(file=written.name, vertices=len(vertices), faces=len(triangles), **entries)
