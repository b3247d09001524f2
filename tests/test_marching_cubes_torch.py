"""The PyTorch marching-cubes topology (renderers/marching_cubes_torch.py) against PyMCubes: the same crossed
edges (= vertices, in the same order), the same triangles in the same order, on closed and open surfaces, several
components and a noise volume; through `DeformableMarchingCubes`, the same meshes and the same gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from renderers.marching_cubes import DeformableMarchingCubes, _sign_topology
from renderers.marching_cubes_torch import case_table, sign_topology

R = 24


def _grid(res: int = R) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.linspace(-1, 1, res, dtype=torch.float64)
    return torch.meshgrid(x, x, x, indexing="ij")


def _volumes() -> dict[str, torch.Tensor]:
    X, Y, Z = _grid()
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.randn(1, 1, 5, 5, 5, generator=g, dtype=torch.float64), size=(R,) * 3, mode="trilinear")[0, 0]
    return {
        "sphere": X**2 + Y**2 + Z**2 < 0.6**2,
        "torus": ((X**2 + Y**2).sqrt() - 0.5) ** 2 + Z**2 < 0.2**2,
        "two spheres": ((X - 0.5) ** 2 + Y**2 + Z**2 < 0.3**2) | ((X + 0.5) ** 2 + Y**2 + Z**2 < 0.3**2),
        "smooth random field": smooth < 0,
        "noise": torch.rand((R,) * 3, generator=g) < 0.5,  # every case of the table, ambiguous ones included
        "touching the border": X < 0.3,  # closed by the padding layer
        "one cell": (X.abs() < 0.05) & (Y.abs() < 0.05) & (Z.abs() < 0.05),
    }


@pytest.mark.parametrize("name", list(_volumes()))
def test_same_topology_as_pymcubes(name):
    inside = _volumes()[name]
    reference = _sign_topology(inside.numpy(), "mcubes")
    edge_ends, faces = sign_topology(inside)
    assert len(reference.faces) > 0
    assert edge_ends.dtype == faces.dtype == torch.int64
    np.testing.assert_array_equal(edge_ends.numpy(), reference.edge_ends)
    np.testing.assert_array_equal(faces.numpy(), reference.faces)  # same triangles, same order, same winding


def test_case_table_is_complete_and_empty_at_the_ends():
    table = case_table()
    assert table.shape == (256, 5, 3)
    assert (table[0] == -1).all() and (table[255] == -1).all()
    counts = (table[:, :, 0] >= 0).sum(1)
    assert counts[1:255].min() >= 1 and counts.max() <= 5
    # a single inside corner is cut by one triangle over its three edges
    assert sorted(table[1, 0].tolist()) == sorted({e for e in table[1, 0].tolist()}) and counts[1] == 1


def test_empty_volume_gives_no_surface():
    edge_ends, faces = sign_topology(torch.zeros((R,) * 3, dtype=torch.bool))
    assert edge_ends.shape == (0, 2) and faces.shape == (0, 3)


def test_sphere_is_watertight():
    _, faces = sign_topology(_volumes()["sphere"])
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    directed = set(map(tuple, edges.tolist()))
    assert len(directed) == len(edges)  # no directed edge twice: consistent winding
    assert all((b, a) in directed for a, b in directed)  # every edge has its opposite: closed


class _SphereField:
    """An SDF with a learnable radius and a small deformation, for the extractor comparison."""

    def __init__(self) -> None:
        self.radius = torch.tensor(0.55, dtype=torch.float64, requires_grad=True)
        self.batch_size = 1

    def sdf(self, points: torch.Tensor) -> torch.Tensor:  # [B, N, 3] -> [B, N]
        return points.norm(dim=-1) - self.radius + 0.05 * torch.sin(4 * points[..., 0])

    def deformation(self, points: torch.Tensor) -> torch.Tensor:  # [B, N, 3] -> [B, N, 3]
        return 0.1 * torch.cos(3 * points) * self.radius


def test_extractors_give_the_same_mesh_and_gradient():
    results = {}
    for extractor in ("torch", "mcubes"):
        field = _SphereField()
        mesh = DeformableMarchingCubes(resolution=20, extractor=extractor)(field, batch_size=1, dtype=torch.float64)[0]
        (mesh.vertices.square().sum() + mesh.vertices[:, 0].sum()).backward()
        results[extractor] = (mesh.vertices.detach(), mesh.faces, field.radius.grad)
    (v_t, f_t, g_t), (v_m, f_m, g_m) = results["torch"], results["mcubes"]
    assert torch.equal(f_t, f_m) and torch.equal(v_t, v_m)
    assert g_m != 0 and torch.equal(g_t, g_m)


def test_unknown_extractor_is_refused():
    with pytest.raises(ValueError, match="torch, mcubes, skimage"):
        DeformableMarchingCubes(resolution=8, extractor="cuda")
