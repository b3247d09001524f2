"""Mesh files for evaluation: which file belongs to which prompt, and reading any OBJ / GLB / glTF / PLY into
world coordinates (`MeshData`: vertices, faces, vertex colours, textures), normalised into the protocol's box.

Matching mesh files to prompts (`match_meshes`), the first rule that applies:
  1. a mesh-map CSV with columns `prompt,file` (relative paths are relative to the CSV);
  2. MESH_DIR/manifest.json (as `prd generate` writes it): {"prompt": "file", ...} or a list of
     {"prompt": ..., "file" | "path" | "mesh": ...} (relative paths are relative to MESH_DIR);
  3. file names: a mesh file (.glb .gltf .obj .ply) of the folder's top level (when the top level holds none:
     of its subfolders, at any depth; files in subfolders beside top-level meshes are left out, with a warning) matches a prompt when its
     stem, or its folder's name (the reference's <prompt>/model.obj layout), equals the prompt
     slugified (lower case, runs of other characters -> "_"), optionally after a "0042_" index prefix;
     a name of 32+ characters also matches a prompt whose slug it starts (truncated names).
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from renderers.errors import UserError

log = logging.getLogger(__name__)

MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply")
MIN_PREFIX_MATCH = 32


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


def slugify(text: str) -> str:
    """Lower case, every run of characters other than [a-z0-9] -> "_", no leading / trailing "_"."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _strip_index(name: str) -> str:
    return re.sub(r"^\d+_", "", name)


def _mesh_files(mesh_dir: Path) -> list[Path]:
    """The mesh files matched by name: those of the top level when it holds any (files in subfolders, e.g.
    other runs' copies, are left out with one warning), else those of every subfolder (the reference's
    <prompt>/model.obj layout)."""
    every = sorted(p for p in mesh_dir.rglob("*") if p.suffix.lower() in MESH_SUFFIXES and p.is_file())
    top = [p for p in every if p.parent == mesh_dir]
    if not top:
        return every
    if len(top) < len(every):
        folders = sorted({p.relative_to(mesh_dir).parts[0] for p in every if p.parent != mesh_dir})
        shown = ", ".join(f"{f}/" for f in folders[:3]) + (", ..." if len(folders) > 3 else "")
        log.warning(
            "%s: evaluating the %d mesh file(s) of the top level only; %d in subfolders (%s) are left out (pass a "
            "subfolder as --meshes to evaluate it)", mesh_dir, len(top), len(every) - len(top), shown,
        )  # fmt: skip
    return top


def _resolve(base: Path, name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else base / path


REPRESENTATIONS = ("mesh", "gaussians")
GAUSSIANS_SUFFIX = "_gaussians"  # `prd generate` writes a Gaussian student's splats as <name>_gaussians.ply


def _manifest_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read mesh manifest {path}: {err}") from None


def _read_manifest(path: Path, representation: str = "mesh") -> dict[str, Path]:
    if representation == "gaussians":
        return _read_manifest_gaussians(path)
    data = _manifest_json(path)
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


def _read_manifest_gaussians(path: Path) -> dict[str, Path]:
    """{prompt: 3DGS PLY} from the `gaussians_file` of each record of a `prd generate` manifest."""
    data = _manifest_json(path)
    records = data.get("meshes") if isinstance(data, dict) else data
    records = [r for r in records if isinstance(r, dict) and isinstance(r.get("prompt"), str)] if isinstance(
        records, list) else []
    without = [r["prompt"] for r in records if not isinstance(r.get("gaussians_file"), str)]
    if not records or without:
        named = f" (prompt {without[0]!r})" if without else ""
        raise UserError(
            f"{path} lists no Gaussians{named}: it is not the folder of a Gaussian student's `prd generate`; "
            "score its meshes with --representation mesh"
        )
    return {r["prompt"]: _resolve(path.parent, r["gaussians_file"]) for r in records}


def _read_mesh_map_csv(path: Path) -> dict[str, Path]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as err:
        raise UserError(f"cannot read mesh map {path}: {err}") from None
    if not rows or not {"prompt", "file"} <= set(rows[0]):
        raise UserError(f"{path}: a mesh map CSV needs a header with columns prompt,file")
    return {row["prompt"]: _resolve(path.parent, row["file"]) for row in rows}


def _match_by_name(mesh_dir: Path, prompts: Sequence[str], representation: str = "mesh") -> dict[str, Path]:
    files = _mesh_files(mesh_dir)
    if representation == "gaussians":
        files = [p for p in files if p.suffix.lower() == ".ply" and p.stem.endswith(GAUSSIANS_SUFFIX)]
        if not files:
            raise UserError(f"no Gaussian PLYs (*{GAUSSIANS_SUFFIX}.ply, as `prd generate` names them) under {mesh_dir}; "
                            "map other files to prompts with --mesh-map FILE.csv")
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
        stem = path.stem.removesuffix(GAUSSIANS_SUFFIX) if representation == "gaussians" else path.stem
        names = {slugify(_strip_index(stem)), slugify(_strip_index(path.parent.name))} - {""}
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
    mesh_dir: str | Path, prompts: Sequence[str], mesh_map: str | Path | None = None, representation: str = "mesh"
) -> list[Path | None]:
    """The mesh file of each prompt (None where there is none), by the rules in the module docstring; with
    representation "gaussians", the 3DGS PLY of a Gaussian student's `prd generate` folder instead (the manifest's
    `gaussians_file`, or by name `<name>_gaussians.ply`; a mesh map is taken as it is)."""
    if representation not in REPRESENTATIONS:
        raise UserError(f"representation must be one of {', '.join(REPRESENTATIONS)}, got {representation!r}")
    mesh_dir = Path(mesh_dir)
    if not mesh_dir.is_dir():
        raise UserError(f"mesh folder not found: {mesh_dir}")
    if mesh_map is not None:
        mapping = _read_mesh_map_csv(Path(mesh_map))
    elif (mesh_dir / "manifest.json").is_file():
        mapping = _read_manifest(mesh_dir / "manifest.json", representation)
    else:
        mapping = _match_by_name(mesh_dir, prompts, representation)
    result = [mapping[p].resolve() if p in mapping else None for p in prompts]
    absent = [str(p) for p in result if p is not None and not p.is_file()]
    if absent:
        raise UserError(f"mesh file listed for a prompt does not exist: {absent[0]}")
    return result


def _texture_image(visual) -> np.ndarray | None:
    """The base-colour image of a textured trimesh visual as [Ht, Wt, 3] float32, or None."""
    material = getattr(visual, "material", None)
    image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    if image is None or getattr(visual, "uv", None) is None:
        return None
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _colour_attribute_to_vertex_colours(mesh) -> None:
    """glTF COLOR_0 beside an untextured material (`prd generate`'s GLBs) -> sRGB vertex colours, in place.

    trimesh keeps such colours as a vertex attribute of a TextureVisuals, which `Scene.dump()` drops.
    COLOR_0 and baseColorFactor are linear in glTF; COLOR_0 of files without a material is left as it is
    (mostly trimesh exports, which hold sRGB bytes there).
    """
    import trimesh

    from renderers.export import linear_to_srgb

    rgba = getattr(mesh.visual, "vertex_attributes", {}).get("color")
    untextured = getattr(mesh.visual, "kind", None) == "texture" and getattr(mesh.visual, "uv", None) is None
    if untextured and rgba is not None and len(rgba) == len(mesh.vertices):
        rgb = np.asarray(rgba, dtype=np.float64)[:, :3]
        if np.issubdtype(np.asarray(rgba).dtype, np.integer):
            rgb = rgb / np.iinfo(np.asarray(rgba).dtype).max  # normalized unsigned byte / short
        factor = getattr(mesh.visual.material, "baseColorFactor", None)  # RGBA uint8
        if factor is not None:
            rgb = rgb * np.asarray(factor)[:3] / 255.0
        srgb = np.clip(np.rint(linear_to_srgb(rgb) * 255), 0, 255).astype(np.uint8)
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=srgb)


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
    for mesh in scene.geometry.values():
        _colour_attribute_to_vertex_colours(mesh)
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


def box_fit(low, high, mode: str = "box", bound: float = 0.9):
    """(centre, scale) that put the box [low, high] (arrays or tensors `[3]`) at the origin with its longest side
    2 * bound ("box"), or None ("none": leave the object as it is). The normalisation of meshes and Gaussians."""
    if mode == "none":
        return None
    if mode != "box":
        raise ValueError(f"normalize must be 'box' or 'none', got {mode!r}")
    extent = float((high - low).max())
    return (low + high) / 2, (2.0 * bound / extent if extent > 0 else 1.0)


def normalize_mesh(mesh: MeshData, mode: str = "box", bound: float = 0.9) -> MeshData:
    """"box": centre the bounding box and scale its longest side to 2 * bound; "none": unchanged."""
    fit = box_fit(mesh.vertices.min(axis=0), mesh.vertices.max(axis=0), mode, bound)
    if fit is None:
        return mesh
    centre, scale = fit
    vertices = (mesh.vertices - centre) * scale
    return replace(mesh, vertices=vertices.astype(np.float32))
