import inspect
import math

import numpy as np
import pytest
import torch

from renderers.marching_cubes import (
    DeformableMarchingCubes,
    EmptySurfaceError,
    evaluate_field_on_grid,
    extract_mesh,
    grid_points,
)
from tests.render_fields import BoxField, SphereField, TinyTriplaneField


def edge_face_counts(faces: torch.Tensor) -> np.ndarray:
    f = faces.numpy()
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    return counts


def outward_fraction(mesh, center=(0.0, 0.0, 0.0)) -> float:
    normals = mesh.face_normals()
    centroids = mesh.vertices[mesh.faces].mean(1) - torch.tensor(center)
    return ((normals * centroids).sum(-1) > 0).float().mean().item()


@pytest.mark.parametrize("extractor", ["mcubes", "skimage"])
def test_sphere_is_closed_accurate_and_outward(extractor):
    res = 32
    mesh = DeformableMarchingCubes(resolution=res, extractor=extractor)(SphereField(0.55))[0]
    assert mesh.vertices.shape[1] == 3 and mesh.faces.dtype == torch.int64 and mesh.num_faces > 500
    h = 2 / (res - 1)
    # vertices are linear interpolations on grid edges: within h^2 / (2 r) of the sphere
    assert (mesh.vertices.norm(dim=-1) - 0.55).abs().max() < h * h / (2 * 0.55) + 1e-5
    assert (edge_face_counts(mesh.faces) == 2).all()  # watertight
    assert outward_fraction(mesh) == 1.0
    assert not mesh.used_fallback
    normals = mesh.vertex_normals()
    assert torch.allclose((normals * mesh.vertices / mesh.vertices.norm(dim=-1, keepdim=True)).sum(-1), torch.ones(mesh.num_vertices), atol=0.02)


def test_grid_order_and_axes_are_not_mixed_up():
    center = (0.3, -0.2, 0.1)
    mesh = DeformableMarchingCubes(resolution=24)(SphereField(0.4, center))[0]
    assert torch.allclose(mesh.vertices.mean(0), torch.tensor(center), atol=0.02)
    box = DeformableMarchingCubes(resolution=24)(BoxField(half=(0.6, 0.35, 0.2)))[0]
    extent = box.vertices.amax(0) - box.vertices.amin(0)
    assert torch.allclose(extent, torch.tensor([1.2, 0.7, 0.4]), atol=2 / 23)
    points = grid_points(3)
    assert torch.equal(points[1], torch.tensor([-1.0, -1.0, 0.0]))  # x slowest, z fastest
    assert torch.equal(points[3], torch.tensor([-1.0, 0.0, -1.0]))


def test_deformation_is_in_grid_cells_like_the_reference():
    res = 20
    h = 2 / (res - 1)
    sdf = grid_points(res).norm(dim=-1)[None] - 0.5
    shift = torch.zeros(1, res**3, 3)
    shift[..., 0] = 0.5
    base = DeformableMarchingCubes(resolution=res).extract(sdf)[0]
    moved = DeformableMarchingCubes(resolution=res).extract(sdf, shift)[0]
    assert torch.allclose(moved.vertices - base.vertices, torch.tensor([0.5 * h, 0, 0]).expand_as(base.vertices), atol=1e-6)
    tanh = DeformableMarchingCubes(resolution=res, deformation_activation="tanh").extract(sdf, shift)[0]
    assert torch.allclose(tanh.vertices - base.vertices, torch.tensor([math.tanh(0.5) * h, 0, 0]).expand_as(base.vertices), atol=1e-6)
    off = DeformableMarchingCubes(resolution=res, use_deformation=False).extract(sdf, shift)[0]
    assert torch.allclose(off.vertices, base.vertices)


def test_vertices_are_differentiable_wrt_sdf_and_deformation():
    res = 10
    g = torch.Generator().manual_seed(0)
    sdf = (grid_points(res, dtype=torch.float64).norm(dim=-1) - 0.6 + 0.05 * torch.randn(res**3, generator=g, dtype=torch.float64))[None]
    deform = 0.2 * torch.randn(1, res**3, 3, generator=g, dtype=torch.float64)
    mc = DeformableMarchingCubes(resolution=res)
    weights = None

    def loss(s, d):
        nonlocal weights
        vertices = mc.extract(s, d)[0].vertices
        if weights is None:
            weights = torch.randn(vertices.shape, generator=g, dtype=torch.float64)
        return (vertices * weights).sum()

    s, d = sdf.clone().requires_grad_(), deform.clone().requires_grad_()
    loss(s, d).backward()
    for tensor, grad in ((sdf, s.grad), (deform, d.grad)):
        direction = torch.randn(tensor.shape, generator=g, dtype=torch.float64)
        eps = 1e-6
        plus = loss(sdf + eps * direction if tensor is sdf else sdf, deform + eps * direction if tensor is deform else deform)
        minus = loss(sdf - eps * direction if tensor is sdf else sdf, deform - eps * direction if tensor is deform else deform)
        finite = ((plus - minus) / (2 * eps)).item()
        assert (grad * direction).sum().item() == pytest.approx(finite, rel=1e-6)
        assert grad.abs().sum() > 0


def test_gradient_shrink_scales_exactly():
    res = 12
    sdf = (grid_points(res).norm(dim=-1) - 0.6)[None]
    deform = torch.full((1, res**3, 3), 0.1)
    grads = {}
    for factor in (1.0, 0.001, 0.0):
        s, d = sdf.clone().requires_grad_(), deform.clone().requires_grad_()
        vertices = DeformableMarchingCubes(res, sdf_grad_shrink=factor, deformation_grad_shrink=factor).extract(s, d)[0].vertices
        if factor == 0.0:
            assert not vertices.requires_grad
            continue
        vertices.pow(2).sum().backward()
        grads[factor] = (s.grad, d.grad)
    assert torch.allclose(grads[0.001][0], 0.001 * grads[1.0][0], rtol=1e-4, atol=1e-9)
    assert torch.allclose(grads[0.001][1], 0.001 * grads[1.0][1], rtol=1e-4, atol=1e-9)


def test_field_path_matches_full_grid_extraction_and_reaches_the_triplanes():
    field = TinyTriplaneField(resolution=8, sdf_scale=0.3)
    mc = DeformableMarchingCubes(resolution=20, chunk_size=1000)
    mesh = mc(field)[0]
    with torch.no_grad():
        sdf, deform = evaluate_field_on_grid(field, 20, deformation=True)
    reference = mc.extract(sdf, deform)[0]
    assert torch.equal(mesh.faces, reference.faces)
    assert torch.allclose(mesh.vertices, reference.vertices, atol=1e-5)
    mesh.vertices.sum().backward()
    assert field.geometry_planes.grad.abs().sum() > 0
    assert field.texture_planes.grad is None  # geometry only


def test_fields_with_sdf_and_deformation_are_read_once_per_point_with_the_same_result():
    """A field offering `sdf_and_deformation` (like TriplaneField) is read by it at the edge ends, in chunks,
    giving the same mesh and triplane gradients as separate `sdf` / `deformation` calls."""

    class JointField(TinyTriplaneField):
        def sdf_and_deformation(self, points):
            self.joint_calls += 1
            return self.sdf(points), self.deformation(points)

    results = []
    for joint in (False, True):
        field = (JointField if joint else TinyTriplaneField)(resolution=8, sdf_scale=0.3)
        field.joint_calls = 0
        mesh = DeformableMarchingCubes(resolution=20, chunk_size=500)(field)[0]
        mesh.vertices.pow(2).sum().backward()
        results.append((mesh, field.geometry_planes.grad, field.joint_calls))
    (separate, separate_grad, _), (joint, joint_grad, calls) = results
    assert calls > 1  # chunked: more edge ends than chunk_size
    assert torch.equal(joint.faces, separate.faces)
    torch.testing.assert_close(joint.vertices, separate.vertices, rtol=0, atol=0)
    torch.testing.assert_close(joint_grad, separate_grad, rtol=1e-6, atol=1e-7)


def test_surface_touching_the_box_is_closed_outside_it():
    res = 16
    mesh = DeformableMarchingCubes(res).extract((grid_points(res).norm(dim=-1) - 1.2)[None])[0]
    assert (edge_face_counts(mesh.faces) == 2).all()
    assert mesh.vertices.abs().max() <= 1 + 2 / (res - 1) + 1e-6
    assert mesh.vertices.abs().max() > 1.0


@pytest.mark.parametrize("offset", [1.0, -3.0])
def test_empty_sdf_fallbacks(offset):
    res = 16
    sdf = (grid_points(res).norm(dim=-1) * 0.1 + offset)[None]  # all positive, or all negative
    centre = DeformableMarchingCubes(res, empty_fallback="center_border").extract(sdf)[0]
    assert centre.used_fallback and centre.num_faces > 0
    assert (edge_face_counts(centre.faces) == 2).all()
    if offset > 0:  # only the centre vertex turned negative: a tiny closed surface around it
        assert centre.vertices.norm(dim=-1).max() < 2 * 2 / (res - 1)
    sphere = DeformableMarchingCubes(res, empty_fallback="unit_sphere").extract(sdf)[0]
    assert sphere.used_fallback and (sphere.vertices.norm(dim=-1) - 1).abs().max() < 0.01
    with pytest.raises(EmptySurfaceError, match=r"no zero crossing on the 16\^3 grid") as info:
        DeformableMarchingCubes(res, empty_fallback="error").extract(sdf)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)


def test_export_extraction_defaults_and_errors():
    assert inspect.signature(extract_mesh).parameters["resolution"].default == 160
    meshes = extract_mesh(SphereField([0.5, 0.3]), resolution=24)
    assert len(meshes) == 2 and not meshes[0].vertices.requires_grad
    assert meshes[0].vertices.norm(dim=-1).mean() > meshes[1].vertices.norm(dim=-1).mean()
    with pytest.raises(EmptySurfaceError):
        extract_mesh(SphereField(3.0), resolution=12, empty_fallback="error")  # all inside

    class NoBatch:
        def sdf(self, p):
            return p.norm(dim=-1)

    with pytest.raises(ValueError, match="batch_size"):
        DeformableMarchingCubes(8)(NoBatch())

    class NaNField(SphereField):
        def sdf(self, p):
            return super().sdf(p) * float("nan")

    with pytest.raises(ValueError, match="NaN"):
        DeformableMarchingCubes(8)(NaNField())
