"""`prd eval`: CLIP score and CLIP Recall@1 of text-to-3D meshes under one rendering protocol.

    prd eval --weights W [--base SD] --prompts dreamfusion415 --split test --out DIR   generate + score
    prd eval --meshes MESH_DIR --prompts prompts.txt --out DIR                         score given meshes

Protocol (the TriplaneTurbo reference's): each mesh is normalised into [-0.9, 0.9]^3 (bounding box,
as the reference's renderer does), rendered unlit with its colours on a white background from 4
azimuths (0, 90, 180, 270 deg; azimuth 0 looks at the front) at elevation 15 deg, distance 3,
FoV 40 deg, 512 x 512; every render is scored by CLIP ViT-B-32 (OpenAI weights) against
"A photo depicts " + prompt. All of it is configurable (see --help).

Matching mesh files to prompts (--meshes), the first rule that applies:
  1. --mesh-map FILE.csv with columns `prompt,file` (relative paths are relative to the CSV);
  2. MESH_DIR/manifest.json (as `prd generate` writes it): {"prompt": "file", ...} or a list of
     {"prompt": ..., "file" | "path" | "mesh": ...} (relative paths are relative to MESH_DIR);
  3. file names: a mesh file (.glb .gltf .obj .ply, searched recursively) matches a prompt when its
     stem, or its folder's name (the reference's <prompt>/model.obj layout), equals the prompt
     slugified (lower case, runs of other characters -> "_"), optionally after a "0042_" index prefix;
     a name of 32+ characters also matches a prompt whose slug it starts (truncated names).

Outputs in --out: results.json, per_prompt.csv, report.md with contact_sheet.png and
score_histogram.png, renders/<index>_<slug>/az<deg>.png, and (generate mode) meshes/.
An interrupted run resumes: finished prompts are kept in progress.jsonl (with their image embeddings)
and renders already on disk are reused; rerun the same command.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_modules.cli import UserError
from lightning_modules.generate import resolve_device

MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply")
PROGRESS_JSONL = "progress.jsonl"
GENERATED_JSONL = "generated.jsonl"
CONFIG_JSON = "eval_config.json"
RENDERS_DIR = "renders"
MESHES_DIR = "meshes"
MIN_PREFIX_MATCH = 32


@dataclass(frozen=True)
class RenderProtocol:
    """How meshes are rendered for evaluation (defaults: the reference protocol)."""

    num_views: int = 4
    elevation: float = 15.0
    distance: float = 3.0
    fovy: float = 40.0
    resolution: int = 512
    azimuth_start: float = 0.0
    normalize: str = "box"  # "box": bounding box centred and scaled into [-bound, bound]^3; "none"
    bound: float = 0.9
    mesh_frame: str = "viewer"  # files in viewer axes (+y up, front +z) or "world" (+z up, front +x)

    @property
    def azimuths(self) -> list[float]:
        return [self.azimuth_start + k * 360.0 / self.num_views for k in range(self.num_views)]


@dataclass
class MeshData:
    """A mesh in world coordinates, coloured per vertex and / or by textures.

    vertices [N, 3] float32; faces [F, 3] int64; colors [N, 3] in [0, 1] (for textured parts: the
    texture sampled at the vertices, a fallback only); uv [N, 2] (v up, glTF / OBJ convention) and
    texture_index [N] int64 (-1: the part uses its vertex colours, k: it uses textures[k]) when any part
    is textured; textures: [Ht, Wt, 3] float32 images in [0, 1].
    """

    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray
    uv: np.ndarray | None = None
    texture_index: np.ndarray | None = None
    textures: list[np.ndarray] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Prompts and mesh files
# ----------------------------------------------------------------------------------------------


def slugify(text: str) -> str:
    """Lower case, every run of characters other than [a-z0-9] -> "_", no leading / trailing "_"."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def load_prompts(spec: str, split: str | None) -> tuple[list[str], str]:
    """Prompts from a bundled set name, a JSON file with splits / a list, or a text file (one per line).

    Returns (prompts, a description such as "dreamfusion415.json#test").
    """
    from datamodules.prompt_sources import PromptFileError, load_prompt_source

    try:
        source = load_prompt_source(spec, split, cache_index=False)
    except (PromptFileError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    prompts = [source.get(i) for i in range(len(source))]
    if not prompts:
        raise UserError(f"no prompts in {source.name}")
    return prompts, Path(source.name).name


def _strip_index(name: str) -> str:
    return re.sub(r"^\d+_", "", name)


def _mesh_files(mesh_dir: Path) -> list[Path]:
    return sorted(p for p in mesh_dir.rglob("*") if p.suffix.lower() in MESH_SUFFIXES and p.is_file())


def _resolve(base: Path, name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else base / path


def _read_manifest(path: Path) -> dict[str, Path]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read mesh manifest {path}: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("meshes"), (list, dict)):
        data = data["meshes"]
    entries: list[tuple[str, str]] = []
    if isinstance(data, dict):
        entries = [(k, v) for k, v in data.items() if isinstance(v, str)]
    elif isinstance(data, list):
        for item in data:
            file = next((item.get(k) for k in ("file", "path", "mesh") if isinstance(item, dict) and item.get(k)), None)
            if isinstance(item, dict) and isinstance(item.get("prompt"), str) and isinstance(file, str):
                entries.append((item["prompt"], file))
    if not entries:
        raise UserError(
            f"{path}: expected {{\"prompt\": \"file\"}} or a list of {{\"prompt\": ..., \"file\": ...}} entries"
        )
    return {prompt: _resolve(path.parent, file) for prompt, file in entries}


def _read_mesh_map_csv(path: Path) -> dict[str, Path]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as err:
        raise UserError(f"cannot read mesh map {path}: {err}") from None
    if not rows or not {"prompt", "file"} <= set(rows[0]):
        raise UserError(f"{path}: a mesh map CSV needs a header with columns prompt,file")
    return {row["prompt"]: _resolve(path.parent, row["file"]) for row in rows}


def _match_by_name(mesh_dir: Path, prompts: Sequence[str]) -> dict[str, Path]:
    files = _mesh_files(mesh_dir)
    if not files:
        raise UserError(f"no mesh files ({', '.join(MESH_SUFFIXES)}) under {mesh_dir}")
    by_slug: dict[str, list[str]] = {}
    for prompt in dict.fromkeys(prompts):
        by_slug.setdefault(slugify(prompt), []).append(prompt)
    clashes = [group for group in by_slug.values() if len(group) > 1]
    if clashes:
        raise UserError(
            f"prompts {clashes[0]!r} have the same file-name slug; map files to prompts with "
            "--mesh-map FILE.csv or a manifest.json"
        )
    found: dict[str, list[Path]] = {}
    for path in files:
        names = {slugify(_strip_index(path.stem)), slugify(_strip_index(path.parent.name))} - {""}
        hits = {by_slug[n][0] for n in names if n in by_slug}
        if not hits:
            for name in names:
                if len(name) >= MIN_PREFIX_MATCH:
                    starts = [s for s in by_slug if s.startswith(name)]
                    if len(starts) == 1:
                        hits.add(by_slug[starts[0]][0])
        for prompt in hits:
            found.setdefault(prompt, []).append(path)
    for prompt, paths in found.items():
        if len(paths) > 1:
            raise UserError(
                f"several meshes match the prompt {prompt!r} ({paths[0]}, {paths[1]}); "
                "map files to prompts with --mesh-map FILE.csv or a manifest.json"
            )
    return {prompt: paths[0] for prompt, paths in found.items()}


def match_meshes(
    mesh_dir: str | Path, prompts: Sequence[str], mesh_map: str | Path | None = None
) -> list[Path | None]:
    """The mesh file of each prompt (None where there is none), by the rules in the module docstring."""
    mesh_dir = Path(mesh_dir)
    if not mesh_dir.is_dir():
        raise UserError(f"mesh folder not found: {mesh_dir}")
    if mesh_map is not None:
        mapping = _read_mesh_map_csv(Path(mesh_map))
    elif (mesh_dir / "manifest.json").is_file():
        mapping = _read_manifest(mesh_dir / "manifest.json")
    else:
        mapping = _match_by_name(mesh_dir, prompts)
    result = [mapping[p].resolve() if p in mapping else None for p in prompts]
    absent = [str(p) for p in result if p is not None and not p.is_file()]
    if absent:
        raise UserError(f"mesh file listed for a prompt does not exist: {absent[0]}")
    return result


# ----------------------------------------------------------------------------------------------
# Meshes -> renders
# ----------------------------------------------------------------------------------------------


def _texture_image(visual) -> np.ndarray | None:
    """The base-colour image of a textured trimesh visual as [Ht, Wt, 3] float32, or None."""
    material = getattr(visual, "material", None)
    image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    if image is None or getattr(visual, "uv", None) is None:
        return None
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _mesh_part(mesh) -> dict:
    """vertices, faces, per-vertex RGB in [0, 1], and uv / texture of one trimesh, whatever its visual."""
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    visual = mesh.visual
    kind = getattr(visual, "kind", None)
    if kind == "face":
        # Flat colours stay exact: one vertex per face corner.
        corners = vertices[faces].reshape(-1, 3)
        rgb = np.repeat(np.asarray(visual.face_colors)[:, :3], 3, axis=0)
        return {"vertices": corners, "faces": np.arange(len(corners)).reshape(-1, 3), "colors": rgb / 255.0}
    part = {"vertices": vertices, "faces": faces}
    if kind == "texture":
        texture = _texture_image(visual)
        if texture is not None:
            part["uv"], part["texture"] = np.asarray(visual.uv, dtype=np.float64)[:, :2], texture
        visual = visual.to_color()  # the texture (or material colour) at the vertices
    part["colors"] = np.asarray(visual.vertex_colors)[:, :3] / 255.0
    return part


def load_mesh(path: str | Path, mesh_frame: str = "viewer") -> MeshData:
    """Read an OBJ / GLB / glTF / PLY file into world coordinates (+z up, front +x).

    Vertex colours, face colours and base-colour textures (rendered with their UVs) are kept; parts of a
    scene are merged with their scene transforms.
    mesh_frame: "viewer" for files in viewer axes (+y up, front +z: glTF, `prd generate`'s exports),
    "world" for files already in the world frame (threestudio-style exports).
    """
    import trimesh

    from renderers.export import viewer_to_world

    if mesh_frame not in ("viewer", "world"):
        raise ValueError(f"mesh_frame must be 'viewer' or 'world', got {mesh_frame!r}")
    try:
        scene = trimesh.load(str(path), force="scene", process=False)
    except Exception as err:  # trimesh raises many types for unreadable files
        raise UserError(f"cannot read mesh {path}: {err}") from None
    parts = [_mesh_part(m) for m in scene.dump() if isinstance(m, trimesh.Trimesh) and len(m.faces)]
    if not parts:
        raise UserError(f"mesh {path} has no triangles")
    offsets = np.cumsum([0] + [len(p["vertices"]) for p in parts])
    vertices = np.concatenate([p["vertices"] for p in parts])
    if mesh_frame == "viewer":
        vertices = viewer_to_world(vertices)
    mesh = MeshData(
        vertices=vertices.astype(np.float32),
        faces=np.concatenate([p["faces"] + offset for p, offset in zip(parts, offsets, strict=False)]),
        colors=np.concatenate([p["colors"] for p in parts]).astype(np.float32),
    )
    if any("texture" in p for p in parts):
        mesh.textures = [p["texture"] for p in parts if "texture" in p]
        ids = np.cumsum(["texture" in p for p in parts]) - 1
        mesh.uv = np.concatenate([p.get("uv", np.zeros((len(p["vertices"]), 2))) for p in parts]).astype(np.float32)
        mesh.texture_index = np.concatenate(
            [np.full(len(p["vertices"]), ids[k] if "texture" in p else -1) for k, p in enumerate(parts)]
        ).astype(np.int64)
    return mesh


def normalize_mesh(mesh: MeshData, mode: str = "box", bound: float = 0.9) -> MeshData:
    """"box": centre the bounding box and scale its longest side to 2 * bound; "none": unchanged."""
    if mode == "none":
        return mesh
    if mode != "box":
        raise ValueError(f"normalize must be 'box' or 'none', got {mode!r}")
    low, high = mesh.vertices.min(axis=0), mesh.vertices.max(axis=0)
    extent = float((high - low).max())
    scale = 2.0 * bound / extent if extent > 0 else 1.0
    vertices = (mesh.vertices - (low + high) / 2) * scale
    return replace(mesh, vertices=vertices.astype(np.float32))


def evaluation_cameras_for(protocol: RenderProtocol, device: torch.device | str = "cpu"):
    """The protocol's cameras, `[1, V]`."""
    from renderers.cameras import evaluation_cameras

    return evaluation_cameras(
        protocol.num_views,
        elevation=protocol.elevation,
        distance=protocol.distance,
        fovy=protocol.fovy,
        azimuth_start=protocol.azimuth_start,
        height=protocol.resolution,
        width=protocol.resolution,
        device=device,
    )


def render_views(
    mesh: MeshData, protocol: RenderProtocol, device: torch.device | str = "cpu", backend: str = "auto"
) -> Tensor:
    """Render `mesh` (world coordinates) under `protocol`: unlit RGB on white, `[V, 3, H, W]` in [0, 1].

    The one place that calls the project's rasteriser (backend: "auto", "torch" or "nvdiffrast").
    """
    from renderers.mesh_renderer import render_mesh

    cameras = evaluation_cameras_for(protocol, device)
    with torch.no_grad():
        if mesh.textures:
            return render_textured(mesh, cameras, backend)[0].clamp(0, 1)
        out = render_mesh(
            torch.from_numpy(mesh.vertices).to(device),
            torch.from_numpy(mesh.faces).to(device),
            torch.from_numpy(mesh.colors).to(device),
            cameras,
            background=(1.0, 1.0, 1.0),
            backend=backend,
        )
    return out["rgb"][0].clamp(0, 1)


def render_textured(mesh: MeshData, cameras, backend: str = "auto") -> Tensor:
    """A textured mesh seen by `cameras` ([1, V]): `[1, V, 3, H, W]`, on white, anti-aliased.

    Shading on the project's rasteriser primitives, as `renderers.mesh_renderer.render_mesh` does for
    vertex colours: UVs are interpolated per pixel and the texture is sampled bilinearly (texel centres
    at (i + 0.5) / size, repeating outside [0, 1], as nvdiffrast's texture lookup); parts without a
    texture keep their vertex colours.
    """
    import torch.nn.functional as F

    from renderers.cameras import mvp_matrix
    from renderers.rasterizers import get_rasterizer

    device = cameras.c2w.device
    height, width = cameras.height, cameras.width
    rasterizer = get_rasterizer(backend, device)
    vertices = torch.from_numpy(mesh.vertices).to(device)
    faces = torch.from_numpy(mesh.faces).to(device)
    clip = torch.einsum("vij,nj->vni", mvp_matrix(cameras)[0], F.pad(vertices, (0, 1), value=1.0))  # [V, Nv, 4]
    fragments = rasterizer.rasterize(clip, faces, height, width)
    index = torch.from_numpy(mesh.texture_index).to(device)
    uses = torch.stack([index == k for k in range(len(mesh.textures))], dim=-1).float()  # [Nv, K]
    attributes = torch.cat([torch.from_numpy(mesh.colors).to(device), torch.from_numpy(mesh.uv).to(device), uses], -1)
    values = rasterizer.interpolate(attributes, fragments)  # [V, H, W, 5 + K]
    color, uv, weight = values[..., :3], values[..., 3:5].remainder(1.0), values[..., 5:]
    grid = torch.stack([uv[..., 0] * 2 - 1, 1 - uv[..., 1] * 2], dim=-1)  # image row 0 is v = 1
    views = grid.shape[0]
    for k, texture in enumerate(mesh.textures):
        image = torch.from_numpy(texture).to(device).permute(2, 0, 1)[None]  # [1, 3, Ht, Wt]
        sampled = F.grid_sample(image, grid.reshape(1, views * height, width, 2), mode="bilinear",
                                padding_mode="border", align_corners=False)
        sampled = sampled[0].permute(1, 2, 0).reshape(views, height, width, 3)
        color = color + weight[..., k : k + 1] * (sampled - color)
    mask = fragments.mask.to(color.dtype)
    rgb = rasterizer.antialias(torch.lerp(torch.ones_like(color), color, mask), fragments)
    return rgb.permute(0, 3, 1, 2)[None]


def save_views(images: Tensor, folder: Path, azimuths: Sequence[float]) -> list[Path]:
    """Write `images [V, 3, H, W]` in [0, 1] as 8-bit PNGs (atomically, so a crash leaves no half file)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    paths = []
    for image, azimuth in zip(pixels, azimuths, strict=True):
        path = folder / f"az{round(azimuth) % 360:03d}.png"
        tmp = path.with_suffix(".tmp.png")
        Image.fromarray(image).save(tmp)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def load_views(paths: Sequence[Path]) -> Tensor:
    """PNG files -> `[V, 3, H, W]` float32 in [0, 1] (the pixels that get scored)."""
    from PIL import Image

    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def view_paths(out_dir: Path, index: int, prompt: str, protocol: RenderProtocol) -> list[Path]:
    folder = out_dir / RENDERS_DIR / f"{index:04d}_{slugify(prompt)[:60]}"
    return [folder / f"az{round(a) % 360:03d}.png" for a in protocol.azimuths]


# ----------------------------------------------------------------------------------------------
# Resumable state in the output folder
# ----------------------------------------------------------------------------------------------


def _encode_array(x: Tensor) -> str:
    return base64.b64encode(x.detach().float().cpu().numpy().astype("<f4").tobytes()).decode("ascii")


def _decode_array(text: str, shape: Sequence[int]) -> Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype="<f4").copy().reshape(shape))


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a torn last line (a crash while writing) is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def check_run_config(out_dir: Path, config: dict, overwrite: bool) -> None:
    """Write the run's settings, or check them against a run being resumed in the same folder."""
    path = out_dir / CONFIG_JSON
    if path.is_file() and not overwrite:
        previous = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in sorted(set(config) | set(previous)) if config.get(k) != previous.get(k)]
        if changed:
            key = changed[0]
            raise UserError(
                f"{out_dir} holds an evaluation with other settings ({key}: {previous.get(key)!r} there, "
                f"{config.get(key)!r} now); use another --out, or --overwrite to start over"
            )
        return
    if overwrite:
        for name in (PROGRESS_JSONL, GENERATED_JSONL):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / RENDERS_DIR, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Generation (weights mode)
# ----------------------------------------------------------------------------------------------


def _consecutive_batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Split sorted indices into runs of consecutive numbers, each cut into batches of `batch_size`."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1 and len(runs[-1]) < batch_size:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def generate_missing_meshes(
    args: argparse.Namespace, prompts: Sequence[str], out_dir: Path, progress: bool
) -> list[Path]:
    """Generate one mesh per prompt with the student into OUT/meshes/ (resumable).

    Prompt i is generated from noise seeded with `seed + i`, as `prd generate` does for the same prompt
    list, so a resumed run makes the same meshes. Finished prompts are listed in generated.jsonl.
    """
    from tqdm import tqdm

    records = {
        (r["index"], r["prompt"]): Path(r["mesh"])
        for r in read_jsonl(out_dir / GENERATED_JSONL)
        if Path(r["mesh"]).is_file()
    }
    todo = [i for i, p in enumerate(prompts) if (i, p) not in records]
    if todo:
        from lightning_modules.generate import generate_meshes
        from lightning_modules.student import TriplaneStudent

        mesh_dir = (out_dir / MESHES_DIR).resolve()
        partial = mesh_dir / ".partial"
        student = TriplaneStudent.from_pretrained(args.base, args.weights, device=resolve_device(args.device))
        bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="generate", unit="mesh", disable=not progress)
        for batch in _consecutive_batches(todo, args.batch_size):
            made = generate_meshes(
                student,
                [prompts[i] for i in batch],
                partial,
                seed=args.seed + batch[0],
                file_format=args.mesh_format,
                resolution=args.mesh_resolution,
                batch_size=args.batch_size,
                progress=False,
            )
            for i, record in zip(batch, made, strict=True):
                path = mesh_dir / f"{i:04d}_{slugify(prompts[i])[:60]}.{args.mesh_format}"
                os.replace(partial / record["file"], path)
                records[(i, prompts[i])] = path
                append_jsonl(out_dir / GENERATED_JSONL, {"index": i, "prompt": prompts[i], "mesh": str(path)})
            bar.update(len(batch))
        bar.close()
        shutil.rmtree(partial, ignore_errors=True)
        del student
    return [records[(i, p)] for i, p in enumerate(prompts)]


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def embed_renders(
    prompts: Sequence[str],
    meshes: Sequence[Path | None],
    out_dir: Path,
    protocol: RenderProtocol,
    metric,
    device: torch.device,
    progress: bool = True,
    backend: str = "auto",
) -> dict[int, dict]:
    """Render and CLIP-embed every prompt's mesh, resumably. Returns index -> progress record."""
    from tqdm import tqdm

    done = {}
    for record in read_jsonl(out_dir / PROGRESS_JSONL):
        i = record["index"]
        if i < len(prompts) and record["prompt"] == prompts[i] and meshes[i] is not None and record["mesh"] == str(meshes[i]):
            done[i] = record
    todo = [i for i, mesh in enumerate(meshes) if mesh is not None and i not in done]
    total = sum(m is not None for m in meshes)
    bar = tqdm(total=total, initial=total - len(todo), desc="render + CLIP", unit="mesh", disable=not progress)
    for i in todo:
        paths = view_paths(out_dir, i, prompts[i], protocol)
        if not all(p.is_file() for p in paths):
            mesh = normalize_mesh(load_mesh(meshes[i], protocol.mesh_frame), protocol.normalize, protocol.bound)
            save_views(render_views(mesh, protocol, device, backend), paths[0].parent, protocol.azimuths)
        embeds = metric.encode_images(load_views(paths)[None].to(device))[0]  # [V, D]
        record = {
            "index": i,
            "prompt": prompts[i],
            "mesh": str(meshes[i]),
            "renders": [str(p.relative_to(out_dir)) for p in paths],
            "azimuths": protocol.azimuths,
            "image_embeds": _encode_array(embeds),
            "shape": list(embeds.shape),
        }
        append_jsonl(out_dir / PROGRESS_JSONL, record)
        done[i] = record
        bar.update(1)
    bar.close()
    return done


def score(records: dict[int, dict], metric, device: torch.device) -> tuple[dict, list[dict]]:
    """Overall metric values and per-prompt rows from the embedded renders."""
    from lightning_modules.clip_score import clip_scores, prompt_keys, retrieve_top1, unique_prompt_index

    order = sorted(records)
    prompts = [records[i]["prompt"] for i in order]
    image_embeds = torch.stack([_decode_array(records[i]["image_embeds"], records[i]["shape"]) for i in order]).to(device)
    text_embeds = metric.encode_prompts(prompts, device)
    metric.reset()
    metric.update_embeddings(image_embeds, text_embeds, prompts)
    overall = {k: float(v) for k, v in metric.compute().items()}

    per_view = clip_scores(image_embeds, text_embeds, metric.weight).cpu()  # [N, V]
    first, target = unique_prompt_index(prompt_keys(prompts))
    top1 = retrieve_top1(image_embeds, text_embeds[first.to(device)]).cpu()  # [N, V]
    hits = top1 == target[:, None]
    rows = []
    for n, i in enumerate(order):
        retrieved = torch.bincount(top1[n], minlength=len(first)).argmax()  # most frequent over views
        rows.append(
            {
                "index": i,
                "prompt": prompts[n],
                "clip_score": float(per_view[n].mean()),
                "recall_at_1": float(hits[n].float().mean()),
                "retrieved_prompt": prompts[int(first[retrieved])],
                **{f"clip_score_az{round(a) % 360:03d}": float(s) for a, s in zip(records[i]["azimuths"], per_view[n], strict=True)},
                "mesh": records[i]["mesh"],
                "renders": records[i]["renders"],
            }
        )
    return overall, rows


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one-line user error instead of usage + exit
        raise UserError(f"eval: {message} (see prd eval --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="prd eval",
        description="CLIP score and Recall@1 of generated or given meshes (see the module docstring for details).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="student weights to generate meshes with (file, folder or hub id)")
    source.add_argument("--meshes", help="folder of meshes (.glb .gltf .obj .ply) to score")
    parser.add_argument("--base", default=None, help="SD base model of the student (default: from its config)")
    parser.add_argument("--prompts", required=True, help="bundled set name (dreamfusion415), .json, .jsonl or .txt")
    parser.add_argument("--split", default="test", help="list to take from a JSON file with splits")
    parser.add_argument("--out", required=True, help="output folder (rerun with the same one to resume)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--mesh-map", default=None, help="CSV with columns prompt,file (--meshes mode)")
    parser.add_argument("--allow-missing", action="store_true", help="skip prompts without a mesh instead of failing")
    parser.add_argument("--mesh-frame", choices=("viewer", "world"), default="viewer",
                        help="axes of the mesh files: viewer (+y up, front +z) or world (+z up, front +x)")
    # protocol
    parser.add_argument("--views", type=int, default=RenderProtocol.num_views, help="azimuths per mesh")
    parser.add_argument("--elevation", type=float, default=RenderProtocol.elevation, help="degrees")
    parser.add_argument("--distance", type=float, default=RenderProtocol.distance, help="camera distance")
    parser.add_argument("--fov", type=float, default=RenderProtocol.fovy, help="vertical field of view, degrees")
    parser.add_argument("--resolution", type=int, default=RenderProtocol.resolution, help="render size in pixels")
    parser.add_argument("--azimuth-start", type=float, default=RenderProtocol.azimuth_start, help="first azimuth, degrees")
    parser.add_argument("--normalize", choices=("box", "none"), default=RenderProtocol.normalize,
                        help="box: fit each mesh's bounding box into [-bound, bound]^3")
    parser.add_argument("--bound", type=float, default=RenderProtocol.bound)
    # CLIP
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name, local-dir:PATH or hf-hub:ID")
    parser.add_argument("--clip-pretrained", default="openai", help="open_clip pretrained tag (or a weights file)")
    parser.add_argument("--clip-checkpoint", default=None, help="local CLIP weights file (instead of the cache)")
    parser.add_argument("--clip-cache-dir", default=None, help="open_clip / Hugging Face cache folder")
    parser.add_argument("--clip-download", action="store_true", help="let open_clip download missing weights")
    parser.add_argument("--caption-prefix", default="A photo depicts ",
                        help="text put before each prompt (the reference script uses 'A photo depicts' with no space)")
    # generation
    parser.add_argument("--seed", type=int, default=0, help="generation seed")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per generation batch")
    parser.add_argument("--mesh-resolution", type=int, default=160, help="marching-cubes grid for generation")
    parser.add_argument("--mesh-format", choices=("glb", "obj", "ply"), default="glb")
    # running
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--renderer", choices=("auto", "torch", "nvdiffrast"), default="auto",
                        help="rasteriser backend (auto: nvdiffrast on CUDA when installed, else PyTorch)")
    parser.add_argument("--max-sheet-rows", type=int, default=16, help="prompts shown on the contact sheet")
    parser.add_argument("--overwrite", action="store_true", help="discard a previous run in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _protocol_from_args(args: argparse.Namespace) -> RenderProtocol:
    protocol = RenderProtocol(
        num_views=args.views,
        elevation=args.elevation,
        distance=args.distance,
        fovy=args.fov,
        resolution=args.resolution,
        azimuth_start=args.azimuth_start,
        normalize=args.normalize,
        bound=args.bound,
        mesh_frame=args.mesh_frame,
    )
    if protocol.num_views < 1 or protocol.resolution < 8:
        raise UserError("--views must be >= 1 and --resolution >= 8")
    if not 0 < protocol.fovy < 180 or protocol.distance <= 0:
        raise UserError("--fov must be in (0, 180) degrees and --distance > 0")
    return protocol


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    started = time.time()
    progress = not args.no_progress
    protocol = _protocol_from_args(args)
    prompts, prompts_name = load_prompts(args.prompts, args.split)
    if args.limit is not None:
        if args.limit < 1:
            raise UserError(f"--limit must be at least 1, got {args.limit}")
        prompts = prompts[: args.limit]
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    out_dir = Path(args.out)
    device = resolve_device(args.device)

    has_schema = args.clip_model.startswith(("local-dir:", "hf-hub:"))  # open_clip ignores the tag then
    clip_settings = {
        "model": args.clip_model,
        "pretrained": None if has_schema else args.clip_pretrained,
        "checkpoint": str(Path(args.clip_checkpoint).resolve()) if args.clip_checkpoint else None,
    }
    source = {"weights": args.weights, "base": args.base, "seed": args.seed, "mesh_resolution": args.mesh_resolution,
              "mesh_format": args.mesh_format} if args.weights else {"meshes": str(Path(args.meshes).resolve())}
    check_run_config(out_dir, {"protocol": asdict(protocol), "clip": clip_settings, "source": source}, args.overwrite)

    from lightning_modules.clip_score import CLIPScore3D

    metric = CLIPScore3D(
        model_name=args.clip_model,
        pretrained=args.clip_pretrained,
        checkpoint=args.clip_checkpoint,
        cache_dir=args.clip_cache_dir,
        allow_download=args.clip_download,
        caption_prefix=args.caption_prefix,
    )
    metric.clip_model.to(device)

    if args.weights:
        meshes: list[Path | None] = list(generate_missing_meshes(args, prompts, out_dir, progress))
    else:
        meshes = match_meshes(args.meshes, prompts, args.mesh_map)
    missing = [p for p, m in zip(prompts, meshes, strict=True) if m is None]
    if missing and not args.allow_missing:
        raise UserError(
            f"{len(missing)} of {len(prompts)} prompts have no mesh (first: {missing[0]!r}); see `prd eval --help` "
            "for how files are matched, or pass --allow-missing"
        )
    if len(missing) == len(prompts):
        raise UserError("no prompt has a mesh to evaluate")

    records = embed_renders(prompts, meshes, out_dir, protocol, metric, device, progress, args.renderer)
    overall, rows = score(records, metric, device)

    from lightning_modules.eval_report import write_report

    scores = torch.tensor([r["clip_score"] for r in rows])
    results = {
        "clip_score": overall["clip_score"],
        "recall_at_1": overall["recall_at_1"],
        "clip_score_std": float(scores.std(unbiased=False)),
        "num_prompts": len(rows),
        "num_unique_prompts": len({r["prompt"] for r in rows}),
        "missing": missing,
        "prompts": f"{prompts_name}" + (f" (first {len(prompts)})" if args.limit is not None else ""),
        "source": args.weights or args.meshes,
        "protocol": asdict(protocol) | {"azimuths": protocol.azimuths, "background": "white"},
        "clip": clip_settings | {"caption_prefix": args.caption_prefix, "weight": metric.weight},
        "seconds": round(time.time() - started, 2),
    }
    paths = write_report(
        out_dir, results, rows, [[out_dir / p for p in r["renders"]] for r in rows], max_rows=args.max_sheet_rows
    )
    print(
        f"CLIP score {results['clip_score']:.4f}  Recall@1 {results['recall_at_1']:.4f}  "
        f"({results['num_prompts']} prompts x {protocol.num_views} views) -> {paths['report']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
