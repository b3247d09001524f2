"""`prd generate`: prompts -> coloured meshes with a trained TriplaneTurbo student.

    prd generate "a prompt" ["another" ... | --prompts-file F] --out DIR [--seed N]
                 [--format glb|obj|ply] [--base ...] [--weights ...] [--resolution 160]
                 [--batch-size N] [--uv-texture] [--device auto|cpu|cuda] [--dtype float32|float16|bfloat16]

Object i of the run is drawn from noise seeded with `seed + i`, so a mesh does not depend on the batch
size or on the other prompts. The output folder gets one mesh per prompt and `manifest.json`
(prompt -> file, seed, mesh sizes, timings).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lightning_modules.cli import UserError
from renderers.export import EXPORT_FORMATS, export_mesh
from renderers.marching_cubes import EmptySurfaceError, extract_mesh

DEFAULT_BASE = "stabilityai/stable-diffusion-2-1-base"
DEFAULT_WEIGHTS = "ZhiyuanthePony/TriplaneTurbo"
STAGES = ("text encoding", "denoising", "triplane decoding", "mesh extraction", "export")
MAX_PROMPT_CHARS = 1000


@dataclass
class StageTimer:
    """Wall-clock seconds per named stage (CUDA work is synchronised at stage boundaries)."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

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
            self.seconds[stage] += time.perf_counter() - start

    @property
    def total(self) -> float:
        return sum(self.seconds.get(s, 0.0) for s in STAGES)

    def table(self, num_meshes: int) -> str:
        rows = [f"{'stage':<20}{'total s':>10}{'per mesh s':>12}"]
        for stage in (*STAGES, "total"):
            sec = self.total if stage == "total" else self.seconds.get(stage, 0.0)
            rows.append(f"{stage:<20}{sec:>10.3f}{sec / max(num_meshes, 1):>12.3f}")
        return "\n".join(rows)


def slugify(prompt: str, max_len: int = 60) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")
    return slug[:max_len].rstrip("_") or "prompt"


def resolve_device(name: str) -> torch.device:
    """`--device`: "auto" (CUDA when available, else the CPU), "cpu", "cuda", "cuda:1", ..."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but no CUDA device is available: use --device cpu")
    return device


def validate_prompts(prompts: list[str], source: str = "prompt") -> list[str]:
    if not prompts:
        raise UserError("no prompt given: pass prompts as arguments or --prompts-file FILE (one per line)")
    for i, p in enumerate(prompts, 1):
        if not p.strip():
            raise UserError(f"{source} {i} is empty: every prompt must contain text")
        if len(p) > MAX_PROMPT_CHARS:
            raise UserError(f"{source} {i} has {len(p)} characters: the limit is {MAX_PROMPT_CHARS}")
    return [p.strip() for p in prompts]


def read_prompts_file(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"prompts file {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise UserError(f"prompts file {path} is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"prompts file {path} holds no prompt: write one prompt per line")
    return prompts


def _object_field(field, index: int):
    """The sub-field of object `index` of a batched TriplaneField."""
    from lightning_modules.triplane_field import TriplaneField

    return TriplaneField(
        field.planes[index : index + 1],
        field.sdf_network,
        field.feature_network,
        field.deformation_network,
        field.config,
    )


@torch.no_grad()
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
    empty_surface: str = "unit_sphere",
    timer: StageTimer | None = None,
    progress: bool = True,
) -> list[dict]:
    """Generate one mesh per prompt into `out_dir`; returns one manifest record per prompt.

    Prompt i uses noise `student.make_noise(1, seed=seed + i)`. `empty_surface` is the marching-cubes
    fallback when an SDF has no zero crossing ("unit_sphere" as the released pipeline, or "error").
    """
    prompts = validate_prompts(list(prompts))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = timer if timer is not None else StageTimer()
    device = student.device
    records: list[dict] = []
    bar = tqdm(total=len(prompts), desc="generating", unit="mesh", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        with timer("text encoding", device):
            emb = student.encode_prompt(batch)
        with timer("denoising", device):
            noise = torch.cat([student.make_noise(1, seed=seed + start + i) for i in range(len(batch))])
            latents = student.denoise(emb, noise)
        with timer("triplane decoding", device):
            field_batch = student.decode(latents)
        with timer("mesh extraction", device):
            try:
                meshes = extract_mesh(field_batch, resolution=resolution, empty_fallback=empty_surface)
            except EmptySurfaceError as err:
                raise UserError(f"{err} (prompts {start + 1}-{start + len(batch)})") from None
            colors = [
                _object_field(field_batch, i).color(m.vertices[None].to(device, student.dtype))[0]
                for i, m in enumerate(meshes)
            ]
        with timer("export", device):
            for i, (prompt, mesh, rgb) in enumerate(zip(batch, meshes, colors, strict=True)):
                index = start + i
                color_fn = None
                if uv_texture:
                    obj = _object_field(field_batch, i)

                    def color_fn(points, obj=obj):
                        pts = torch.as_tensor(points, dtype=student.dtype, device=device)[None]
                        return obj.color(pts)[0].float().cpu().numpy()

                path = export_mesh(
                    out_dir / f"{index:04d}_{slugify(prompt)}.{file_format}",
                    mesh.vertices.float(),
                    mesh.faces,
                    rgb.float().clamp(0, 1),
                    file_format=file_format,
                    uv_texture=uv_texture,
                    texture_size=texture_size,
                    color_fn=color_fn,
                )
                records.append(
                    dict(
                        index=index,
                        prompt=prompt,
                        seed=seed + index,
                        file=path.name,
                        vertices=mesh.num_vertices,
                        faces=mesh.num_faces,
                        empty_surface_fallback=bool(mesh.used_fallback),
                    )
                )
        bar.update(len(batch))
    bar.close()
    return records


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prd generate", description="Generate textured meshes from text prompts.")
    p.add_argument("prompts", nargs="*", help="text prompts (or use --prompts-file)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the first prompt (prompt i uses seed + i)")
    p.add_argument("--format", dest="file_format", choices=EXPORT_FORMATS, default="glb")
    p.add_argument("--base", default=None, help=f"SD directory or hub id (default: from config.json, else {DEFAULT_BASE})")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="TriplaneTurbo weights: file, folder or hub id")
    p.add_argument("--resolution", type=int, default=160, help="marching-cubes grid vertices per axis")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--uv-texture", action="store_true", help="unwrap with xatlas and bake a texture (glb / obj)")
    p.add_argument("--texture-size", type=int, default=1024)
    p.add_argument("--empty-surface", choices=("unit_sphere", "error"), default="unit_sphere",
                   help="when a field has no surface: the released pipeline's unit sphere, or an error")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--no-merge", action="store_true",
                   help="keep the LoRA / LoCon adapters separate (default: folded into the weights, faster)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    prompts = list(args.prompts)
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    prompts = validate_prompts(prompts)
    if args.resolution < 4:
        raise UserError(f"--resolution must be at least 4, got {args.resolution}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.uv_texture and args.file_format == "ply":
        raise UserError("--uv-texture needs --format glb or obj: PLY stores vertex colours only")
    device = resolve_device(args.device)

    from lightning_modules.student import TriplaneStudent

    start = time.perf_counter()
    student = TriplaneStudent.from_pretrained(args.base, weights=args.weights, device=device)
    student.to(dtype=getattr(torch, args.dtype))
    if not args.no_merge:
        student.merge_adapters()
    load_seconds = time.perf_counter() - start

    timer = StageTimer()
    records = generate_meshes(
        student, prompts, args.out, seed=args.seed, file_format=args.file_format, resolution=args.resolution,
        batch_size=args.batch_size, uv_texture=args.uv_texture, texture_size=args.texture_size,
        empty_surface=args.empty_surface, timer=timer, progress=not args.no_progress,
    )
    manifest = dict(
        meshes=records,
        weights=str(args.weights),
        base=str(args.base),
        resolution=args.resolution,
        format=args.file_format,
        timings_seconds=dict(timer.seconds, load=load_seconds, total=timer.total),
    )
    Path(args.out, "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"wrote {len(records)} mesh(es) to {args.out} (model loading {load_seconds:.2f} s)")
    print(timer.table(len(records)))
    return 0
