"""Mesh export: GLB (default), OBJ and PLY with vertex colours, optionally a UV texture via xatlas.

Every file carries per-vertex normals, and GLB (and a textured OBJ's MTL) a non-metallic, fully rough
material, or an unlit one: without a material glTF viewers apply glTF's default material (metallic 1),
which renders the colours dark. Colours are sRGB-encoded (as displayed) everywhere except GLB vertex
colours: glTF's COLOR_0 is linear.

World frame of this project (see renderers/types.py): +z up, and the object's front faces +x (a
camera at azimuth 0 sees the front, as in threestudio / MVDream view-dependent prompting). Common
viewers (glTF's convention, Blender's and MeshLab's defaults for OBJ / PLY) expect +y up with the
front facing +z, so export applies the rotation (x, y, z) -> (y, z, x): a proper rotation (a cyclic
permutation, determinant +1) that keeps the triangle winding.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import trimesh

EXPORT_FORMATS = ("glb", "obj", "ply")
MATERIALS = ("pbr", "unlit")


def world_to_viewer(vertices: np.ndarray) -> np.ndarray:
    """[N, 3] world coordinates (+z up, front +x) -> viewer coordinates (+y up, front +z)."""
    return np.ascontiguousarray(vertices[:, [1, 2, 0]])


def viewer_to_world(vertices: np.ndarray) -> np.ndarray:
    """Inverse of `world_to_viewer`."""
    return np.ascontiguousarray(vertices[:, [2, 0, 1]])


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def srgb_to_linear(rgb: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] (the project's colours, as displayed) -> linear RGB."""
    rgb = np.clip(np.asarray(rgb, dtype=np.float64), 0.0, 1.0)
    return np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(rgb: np.ndarray) -> np.ndarray:
    """Inverse of `srgb_to_linear`."""
    rgb = np.clip(np.asarray(rgb, dtype=np.float64), 0.0, 1.0)
    return np.where(rgb <= 0.0031308, rgb * 12.92, 1.055 * rgb ** (1 / 2.4) - 0.055)


def colors_to_uint8(colors) -> np.ndarray:
    """[N, 3] floats in [0, 1] -> [N, 4] uint8 RGBA (opaque)."""
    rgb = np.clip(np.rint(_numpy(colors).astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], axis=1)


def build_trimesh(vertices, faces, colors) -> trimesh.Trimesh:
    """A trimesh in viewer coordinates with per-vertex colours.

    vertices: [N, 3] float, world coordinates; faces: [F, 3] int; colors: [N, 3] floats in [0, 1].
    """
    vertices, faces = _numpy(vertices).astype(np.float64), _numpy(faces).astype(np.int64)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"expected vertices [N, 3] and faces [F, 3], got {vertices.shape} and {faces.shape}")
    if len(_numpy(colors)) != len(vertices):
        raise ValueError(f"expected one colour per vertex ({len(vertices)}), got {len(_numpy(colors))}")
    return trimesh.Trimesh(
        vertices=world_to_viewer(vertices),
        faces=faces,
        vertex_colors=colors_to_uint8(colors),
        process=False,
    )


def _pbr_material(texture=None) -> trimesh.visual.material.PBRMaterial:
    """Base colour (texture, else white times the vertex colours), metallic 0, roughness 1: a matte look."""
    return trimesh.visual.material.PBRMaterial(
        name="material", baseColorTexture=texture, metallicFactor=0.0, roughnessFactor=1.0
    )


def unit_vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals, unit length; +y where undefined (only degenerate faces around).

    Summed with bincount: several times faster than trimesh's angle-weighted `vertex_normals`.
    """
    corners = vertices[faces]
    cross = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # 2 * area * normal
    normals = np.stack(
        [np.bincount(faces.ravel(), np.repeat(cross[:, k], 3), minlength=len(vertices)) for k in range(3)], axis=1
    )
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return np.where(length > 1e-12, normals / np.maximum(length, 1e-12), [0.0, 1.0, 0.0])


def _with_unlit(tree: dict) -> None:
    """glTF tree post-processor: every material KHR_materials_unlit (base colour shown as is)."""
    for material in tree.get("materials", []):
        material.setdefault("extensions", {})["KHR_materials_unlit"] = {}
    tree["extensionsUsed"] = sorted({*tree.get("extensionsUsed", []), "KHR_materials_unlit"})


def _mtl(material: str, texture_file: str) -> str:
    """The OBJ material of a texture: white diffuse (times the texture), no specular, not metallic (`Pm` /
    `Pr`: the PBR extension that Blender reads; `Ns 0` is roughness 1 for the others)."""
    illum = 0 if material == "unlit" else 1  # 0: colour only, no lighting; 1: diffuse only
    lines = ["newmtl material", "Ka 0 0 0", "Kd 1 1 1", "Ks 0 0 0", "Ns 0", "Pm 0", "Pr 1", f"illum {illum}",
             f"map_Kd {texture_file}"]
    return "\n".join(lines) + "\n"


PNG_COMPRESS_LEVEL = 1  # zlib level of texture PNGs: 3-4x faster to encode than Pillow's 6, files ~15 % larger


def texture_image(pixels: np.ndarray):
    """A PIL image of `pixels [H, W, 3]` uint8 that every later `save` (ours, trimesh's GLB writer) encodes as PNG
    at `PNG_COMPRESS_LEVEL`: Pillow merges an image's `encoderinfo` into the options of each save."""
    from PIL import Image

    image = Image.fromarray(pixels)
    image.encoderinfo = {"compress_level": PNG_COMPRESS_LEVEL}
    return image


def _write_obj(path: Path, mesh: trimesh.Trimesh, material: str) -> None:
    """`<stem>.obj` with vertex normals and vertex colours, or with UVs, `<stem>.mtl` and `<stem>.png`.

    A vertex-colour OBJ gets no MTL: three.js's OBJLoader (given the MTL) and trimesh then ignore the
    vertex colours. The MTL is written here, not by trimesh: its MTL is always named `material.mtl` (the
    meshes of one folder overwrite each other's) and has grey (0.4) diffuse / ambient / specular
    factors, which darken the texture or make it metallic in common viewers.
    """
    from trimesh.exchange.obj import export_obj

    path.write_text(export_obj(mesh, include_normals=True, header=None, mtl_name=f"{path.stem}.mtl"))
    texture = getattr(getattr(mesh.visual, "material", None), "baseColorTexture", None)
    if texture is not None:
        texture.save(path.with_suffix(".png"))
        path.with_suffix(".mtl").write_text(_mtl(material, f"{path.stem}.png"))


def _write_glb(path: Path, mesh: trimesh.Trimesh, material: str) -> None:
    """GLB with NORMAL, the material and COLOR_0 (vertex colours) or TEXCOORD_0 (texture)."""
    from trimesh.exchange.gltf import export_glb

    linear_rgb = None
    if not isinstance(mesh.visual, trimesh.visual.TextureVisuals):
        # glTF reads COLOR_0 as linear RGB, while trimesh writes the (sRGB) colour bytes as they are, which
        # viewers then show washed out: COLOR_0 is added below, linear, as floats (8 bits lose the darks)
        linear_rgb = srgb_to_linear(mesh.visual.vertex_colors[:, :3] / 255.0)
        mesh = trimesh.Trimesh(mesh.vertices, mesh.faces, vertex_normals=mesh.vertex_normals, process=False,
                               visual=trimesh.visual.TextureVisuals(material=_pbr_material()))
    glb = export_glb(mesh, include_normals=True, tree_postprocessor=_with_unlit if material == "unlit" else None)
    if linear_rgb is not None:
        glb = _with_color_0(glb, linear_rgb)
    path.write_bytes(glb)


def _with_color_0(glb: bytes, rgb: np.ndarray) -> bytes:
    """The GLB of one primitive with `rgb` ([N, 3] floats, linear) appended as its COLOR_0."""
    return _with_attribute(glb, "COLOR_0", rgb)


def _with_attribute(glb: bytes, name: str, values: np.ndarray) -> bytes:
    """The GLB of one primitive with `values` ([N, 3] or [N, 4] floats) appended as vertex attribute `name`."""
    import pygltflib

    gltf = pygltflib.GLTF2.load_from_bytes(glb)
    blob = gltf.binary_blob()
    blob += b"\0" * (-len(blob) % 4)
    data = np.ascontiguousarray(values, dtype="<f4").tobytes()
    gltf.bufferViews.append(
        pygltflib.BufferView(buffer=0, byteOffset=len(blob), byteLength=len(data), target=pygltflib.ARRAY_BUFFER)
    )
    gltf.accessors.append(pygltflib.Accessor(
        bufferView=len(gltf.bufferViews) - 1, componentType=pygltflib.FLOAT, count=len(values),
        type=pygltflib.VEC4 if values.shape[1] == 4 else pygltflib.VEC3,
    ))
    (primitive,) = gltf.meshes[0].primitives
    setattr(primitive.attributes, name, len(gltf.accessors) - 1)
    # vertex and index views say what they hold (the glTF validator's hint; trimesh leaves it unset)
    for index in [i for i in vars(primitive.attributes).values() if isinstance(i, int)]:
        gltf.bufferViews[gltf.accessors[index].bufferView].target = pygltflib.ARRAY_BUFFER
    if primitive.indices is not None:
        gltf.bufferViews[gltf.accessors[primitive.indices].bufferView].target = pygltflib.ELEMENT_ARRAY_BUFFER
    gltf.set_binary_blob(blob + data)
    gltf.buffers[0].byteLength = len(blob) + len(data)
    return b"".join(gltf.save_to_bytes())


def _bake_uv_texture(
    mesh: trimesh.Trimesh,
    color_fn: Callable[[np.ndarray], np.ndarray] | None,
    texture_size: int,
) -> trimesh.Trimesh:
    """Unwrap with xatlas and bake colours into a texture image (a PBR material's base colour).

    color_fn maps world points [M, 3] to colours [M, 3] in [0, 1] (e.g. the field's colour MLP); without
    it the vertex colours are interpolated.
    """
    import xatlas

    from renderers.uv_bake import rasterize_uv

    vmapping, indices, uvs = xatlas.parametrize(mesh.vertices.astype(np.float32), mesh.faces.astype(np.uint32))
    positions = mesh.vertices[vmapping]
    vertex_rgb = mesh.visual.vertex_colors[vmapping, :3].astype(np.float64) / 255.0
    face_ids, bary = rasterize_uv(uvs, indices, texture_size)  # [T, T], [T, T, 3]
    covered = face_ids >= 0
    corners = indices[face_ids[covered]]  # [M, 3]
    weights = bary[covered][..., None]  # [M, 3, 1]
    if color_fn is None:
        texel_rgb = (vertex_rgb[corners] * weights).sum(axis=1)
    else:
        texel_world = viewer_to_world((positions[corners] * weights).sum(axis=1))
        texel_rgb = np.asarray(color_fn(texel_world), dtype=np.float64)
    image = np.zeros((texture_size, texture_size, 3), np.float64)
    image[covered] = texel_rgb
    image = _dilate(image, covered, iterations=4)
    texture = texture_image(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)[::-1])
    visual = trimesh.visual.TextureVisuals(uv=uvs, material=_pbr_material(texture))
    textured = trimesh.Trimesh(vertices=positions, faces=indices.astype(np.int64), visual=visual, process=False)
    # normals of the unsplit mesh: the copies of a seam vertex keep one normal, so no shading seam
    textured.vertex_normals = mesh.vertex_normals[vmapping]
    return textured


def _dilate(image: np.ndarray, mask: np.ndarray, iterations: int) -> np.ndarray:
    """Grow the baked texels into empty neighbours so texture filtering does not bleed black seams."""
    image, mask = image.copy(), mask.copy()
    for _ in range(iterations):
        acc = np.zeros_like(image)
        count = np.zeros(mask.shape, np.float64)
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            acc += np.roll(image * mask[..., None], (dy, dx), axis=(0, 1))
            count += np.roll(mask, (dy, dx), axis=(0, 1))
        grow = (~mask) & (count > 0)
        image[grow] = acc[grow] / count[grow, None]
        mask = mask | grow
    return image


def export_mesh(
    path: str | Path,
    vertices,
    faces,
    colors,
    file_format: str | None = None,
    uv_texture: bool = False,
    texture_size: int = 1024,
    color_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    material: str = "pbr",
) -> Path:
    """Write a coloured mesh with vertex normals and (GLB / OBJ) a material.

    vertices: [N, 3] world coordinates (+z up, front +x); faces: [F, 3]; colors: [N, 3] in [0, 1].
    file_format: "glb", "obj" or "ply" (default: from the suffix of `path`, else "glb").
    uv_texture: unwrap with xatlas and bake a `texture_size`^2 texture (GLB and OBJ only), sampled
    from `color_fn(world_points [M, 3]) -> [M, 3]` when given, else from the vertex colours.
    material: "pbr" (metallic 0, roughness 1) or "unlit" (glTF KHR_materials_unlit, MTL `illum 0`).
    Vertex-colour OBJ and PLY have no material; a textured OBJ gets `<stem>.mtl` and `<stem>.png` beside it.
    """
    path = Path(path)
    file_format = (file_format or path.suffix.lstrip(".") or "glb").lower()
    if file_format not in EXPORT_FORMATS:
        raise ValueError(f"unknown mesh format {file_format!r}: use one of {', '.join(EXPORT_FORMATS)}")
    if material not in MATERIALS:
        raise ValueError(f"unknown material {material!r}: use one of {', '.join(MATERIALS)}")
    if uv_texture and file_format == "ply":
        raise ValueError("a UV texture needs GLB or OBJ: PLY stores vertex colours only")
    if material != "pbr" and file_format != "glb" and not uv_texture:
        raise ValueError(f"material {material!r} needs GLB (or a UV texture): a vertex-colour {file_format.upper()} "
                         "has no material")
    if path.suffix.lstrip(".").lower() != file_format:
        path = path.with_suffix(f".{file_format}")
    mesh = build_trimesh(vertices, faces, colors)
    mesh.vertex_normals = unit_vertex_normals(mesh.vertices, mesh.faces)
    if uv_texture:
        mesh = _bake_uv_texture(mesh, color_fn, texture_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    if file_format == "glb":
        _write_glb(path, mesh, material)
    elif file_format == "obj":
        _write_obj(path, mesh, material)
    else:
        mesh.export(path, file_type="ply", vertex_normal=True)
    return path


def write_textured_mesh(
    path: str | Path,
    vertices: np.ndarray,
    faces: np.ndarray,
    uvs: np.ndarray,
    normals: np.ndarray,
    tangents: np.ndarray | None,
    albedo: np.ndarray,
    normal_map: np.ndarray | None = None,
    roughness: float = 1.0,
    file_format: str | None = None,
) -> Path:
    """A PBR-textured mesh: GLB (baseColorTexture, normalTexture, NORMAL, TANGENT, metallic 0, roughness)
    or OBJ with `<stem>.mtl`, `<stem>.png` (albedo) and `<stem>_normal.png` beside it.

    World coordinates as everywhere in this module: vertices, normals (unit) [M, 3]; tangents [M, 4]
    (xyz unit, w = +-1; needed with a normal map); faces [F, 3]; uvs [M, 2] in [0, 1], v up; albedo
    [T, T, 3] uint8 sRGB and normal_map [T, T, 3] uint8 tangent-space (linear), row 0 at v = 1.
    OBJ has no tangent attribute: viewers derive the frame from the UVs (MikkTSpace), close to ours.
    """
    path = Path(path)
    file_format = (file_format or path.suffix.lstrip(".") or "glb").lower()
    if file_format not in ("glb", "obj"):
        raise ValueError(f"a textured mesh is written as glb or obj, not {file_format!r}")
    if normal_map is not None and tangents is None:
        raise ValueError("a normal map needs the vertex tangents")
    if path.suffix.lstrip(".").lower() != file_format:
        path = path.with_suffix(f".{file_format}")
    path.parent.mkdir(parents=True, exist_ok=True)
    material = trimesh.visual.material.PBRMaterial(
        name="material", baseColorTexture=texture_image(albedo),
        normalTexture=None if normal_map is None else texture_image(normal_map),
        metallicFactor=0.0, roughnessFactor=float(roughness),
    )
    mesh = trimesh.Trimesh(
        vertices=world_to_viewer(np.asarray(vertices, np.float64)), faces=np.asarray(faces, np.int64),
        vertex_normals=world_to_viewer(np.asarray(normals, np.float64)),
        visual=trimesh.visual.TextureVisuals(uv=uvs, material=material), process=False,
    )
    if file_format == "obj":
        from trimesh.exchange.obj import export_obj

        path.write_text(export_obj(mesh, include_normals=True, header=None, mtl_name=f"{path.stem}.mtl"))
        material.baseColorTexture.save(path.with_suffix(".png"))
        lines = ["newmtl material", "Ka 0 0 0", "Kd 1 1 1", "Ks 0 0 0", "Ns 0", "Pm 0", f"Pr {roughness:g}",
                 "illum 1", f"map_Kd {path.stem}.png"]
        if normal_map is not None:
            normal_file = path.with_name(f"{path.stem}_normal.png")
            material.normalTexture.save(normal_file)
            lines.append(f"norm {normal_file.name}")  # the MTL PBR extension's tangent-space normal map
        path.with_suffix(".mtl").write_text("\n".join(lines) + "\n")
        return path
    from trimesh.exchange.gltf import export_glb

    glb = export_glb(mesh, include_normals=True)
    if tangents is not None:
        tangents = np.asarray(tangents, np.float64)
        glb = _with_attribute(glb, "TANGENT", np.concatenate([world_to_viewer(tangents[:, :3]), tangents[:, 3:]], 1))
    path.write_bytes(glb)
    return path
