"""The evaluation protocol itself: a cube with one colour per face, written with export_mesh, loaded
and rendered as `prd eval` does, covers the analytically expected area, shows the expected faces
(the front +x at azimuth 0) and sits on a white background."""

import math

import numpy as np
import pytest

from lightning_modules.evaluation.meshes import load_mesh, normalize_mesh
from lightning_modules.evaluation.protocol import RenderProtocol, render_views
from renderers.export import export_mesh

# One colour per face, each with a zero channel shared with the top face's blue, so that the
# coverage of any pixel (anti-aliased against white) is 1 - min(r, g, b).
FACE_COLOURS = {
    "+x": (1.0, 0.0, 0.0),
    "-x": (0.0, 1.0, 1.0),
    "+y": (0.0, 1.0, 0.0),
    "-y": (1.0, 0.0, 1.0),
    "+z": (0.0, 0.0, 1.0),
    "-z": (1.0, 1.0, 0.0),
}


def face_coloured_cube(half: float):
    """24 vertices (4 per face, so colours do not blend across edges), 12 outward triangles."""
    vertices, faces, colours = [], [], []
    for name, colour in FACE_COLOURS.items():
        axis, sign = "xyz".index(name[1]), 1.0 if name[0] == "+" else -1.0
        u, v = [a for a in range(3) if a != axis]
        quad = []
        for du, dv in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
            p = [0.0, 0.0, 0.0]
            p[axis], p[u], p[v] = sign * half, du * half, dv * half
            quad.append(p)
        base = len(vertices)
        vertices += quad
        colours += [colour] * 4
        tri = [[base, base + 1, base + 2], [base, base + 2, base + 3]]
        # orient outwards: normal of (p1 - p0) x (p2 - p0) along sign * axis
        n = np.cross(np.subtract(quad[1], quad[0]), np.subtract(quad[2], quad[0]))
        if n[axis] * sign < 0:
            tri = [t[::-1] for t in tri]
        faces += tri
    return np.array(vertices, np.float32), np.array(faces, np.int64), np.array(colours, np.float32)


def project(points, protocol: RenderProtocol, azimuth: float):
    """Pixel coordinates (column, row) of world points for a look-at-origin pinhole camera, +z up."""
    el, az = math.radians(protocol.elevation), math.radians(azimuth)
    eye = protocol.distance * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    forward = -eye / np.linalg.norm(eye)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    rel = np.asarray(points, np.float64) - eye
    x, y, z = rel @ right, rel @ up, rel @ forward
    focal = protocol.resolution / 2 / math.tan(math.radians(protocol.fovy) / 2)
    return np.stack([protocol.resolution / 2 + focal * x / z, protocol.resolution / 2 - focal * y / z], axis=-1)


def convex_hull_area(points):
    pts = sorted(map(tuple, points))

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and np.cross(np.subtract(out[-1], out[-2]), np.subtract(p, out[-2])) <= 0:
                out.pop()
            out.append(p)
        return out

    hull = half(pts)[:-1] + half(pts[::-1])[:-1]
    xs, ys = np.array(hull).T
    return 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))


@pytest.mark.parametrize("fmt", ["glb", "ply"])
def test_coloured_cube_under_the_reference_protocol(tmp_path, fmt):
    # 4 azimuths, elevation 15, distance 3, FoV 40; the bounding box scaled to [-0.5, 0.5]^3 so that
    # the whole cube stays in the picture (its corners would leave it at the default bound 0.9).
    protocol = RenderProtocol(resolution=96, bound=0.5)
    path = export_mesh(tmp_path / f"cube.{fmt}", *face_coloured_cube(0.3))
    mesh = normalize_mesh(load_mesh(path), protocol.normalize, protocol.bound)
    images = render_views(mesh, protocol, "cpu", backend="torch").numpy()  # [V, 3, H, W]
    assert images.shape == (4, 3, 96, 96)

    half = protocol.bound  # normalisation scales the cube from half-size 0.3 to 0.5
    corners = np.array([[x, y, z] for x in (-half, half) for y in (-half, half) for z in (-half, half)])
    front_faces = {0.0: "+x", 90.0: "+y", 180.0: "-x", 270.0: "-y"}
    for view, azimuth in enumerate(protocol.azimuths):
        rgb = images[view].transpose(1, 2, 0)  # [H, W, 3]
        coverage = 1.0 - rgb.min(axis=-1)
        expected = convex_hull_area(project(corners, protocol, azimuth))
        assert coverage.sum() == pytest.approx(expected, rel=0.005), f"azimuth {azimuth}"
        assert (rgb[0, 0] == 1.0).all() and (rgb[-1, -1] == 1.0).all()  # white background
        # the face towards the camera, at the projection of its centre; the top face above it
        side = front_faces[azimuth]
        centre = np.zeros(3)
        centre["xyz".index(side[1])] = half if side[0] == "+" else -half
        col, row = np.round(project([centre], protocol, azimuth)[0] - 0.5).astype(int)
        assert np.allclose(rgb[row, col], FACE_COLOURS[side], atol=1e-4), f"azimuth {azimuth}: {rgb[row, col]}"
        col, row = np.round(project([[0.0, 0.0, half]], protocol, azimuth)[0] - 0.5).astype(int)
        assert np.allclose(rgb[row, col], FACE_COLOURS["+z"], atol=1e-4), f"azimuth {azimuth}: top"
    # the bottom face is never visible from elevation 15
    assert not np.any(np.all(np.isclose(images.transpose(0, 2, 3, 1), FACE_COLOURS["-z"], atol=0.05), axis=-1))


@pytest.mark.parametrize("fmt", ["glb", "obj"])
def test_uv_textured_mesh_renders_like_its_vertex_colours(tmp_path, fmt):
    """A cube exported with a baked UV texture (OBJ + MTL + PNG, or GLB) is rendered by sampling the
    texture per pixel: the same picture as the vertex-coloured cube up to texel seams, much closer
    than the vertex-colour fallback of the textured file."""
    from lightning_modules.evaluation.meshes import MeshData

    protocol = RenderProtocol(resolution=64, bound=0.5)
    cube = face_coloured_cube(0.5)
    reference = render_views(load_mesh(export_mesh(tmp_path / "plain.ply", *cube)), protocol, "cpu", "torch")
    textured = load_mesh(export_mesh(tmp_path / f"baked.{fmt}", *cube, uv_texture=True, texture_size=128))
    assert len(textured.textures) == 1 and (textured.texture_index == 0).all()
    image = render_views(textured, protocol, "cpu", "torch")
    fallback = render_views(MeshData(textured.vertices, textured.faces, textured.colors), protocol, "cpu", "torch")
    assert (image - reference).abs().mean() < 0.002
    assert (fallback - reference).abs().mean() > 5 * (image - reference).abs().mean()


def test_scene_with_textured_and_vertex_coloured_parts(tmp_path):
    import trimesh

    textured = trimesh.load(export_mesh(tmp_path / "a.glb", *face_coloured_cube(0.2), uv_texture=True, texture_size=64),
                            force="mesh", process=False)
    plain = trimesh.Trimesh(*face_coloured_cube(0.2)[:2], process=False)
    plain.visual.vertex_colors = [255, 128, 0, 255]
    plain.apply_translation([0.6, 0.0, 0.0])  # viewer +x = world +y
    scene = trimesh.Scene([textured, plain])
    scene.export(tmp_path / "scene.glb")
    mesh = load_mesh(tmp_path / "scene.glb")
    assert sorted(set(mesh.texture_index.tolist())) == [-1, 0] and len(mesh.textures) == 1
    protocol = RenderProtocol(resolution=64, bound=0.9, azimuth_start=0.0, num_views=1)
    rgb = render_views(normalize_mesh(mesh, protocol.normalize, protocol.bound), protocol, "cpu", "torch")[0]
    pixels = rgb.permute(1, 2, 0).reshape(-1, 3).numpy()
    assert np.isclose(pixels, [1.0, 128 / 255, 0.0], atol=0.01).all(axis=1).sum() > 20  # the plain part
    assert np.isclose(pixels, FACE_COLOURS["+x"], atol=0.01).all(axis=1).sum() > 20  # the textured front
