"""Coarse-to-fine SDF on the marching-cubes grid (`lightning_modules/student/triplane_grid.py`): sound bounds,
and the same mesh (and gradients) as evaluating every grid vertex."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.student.triplane_field import FieldConfig, TriplaneField, VanillaMLP
from lightning_modules.student.triplane_grid import TriplaneGridSDF
from renderers.marching_cubes import DeformableMarchingCubes, evaluate_field_on_grid, extract_mesh


def _field(seed: int = 0, batch: int = 1, smooth: bool = True, dtype=torch.float32, **config) -> TriplaneField:
    """A random triplane field whose surface is a bumpy sphere (smooth planes) or a noisy blob."""
    gen = torch.Generator().manual_seed(seed)
    planes = torch.randn(batch * 6, 8, 48, 48, generator=gen)
    if smooth:
        planes = F.avg_pool2d(planes, 7, 1, 3) * 2.5
    planes = planes.reshape(batch, 6, 8, 48, 48) * 0.3
    config = FieldConfig(**config)
    geo_dim, tex_dim = config.feature_dims(16)
    torch.manual_seed(seed)
    sdf_net, color_net, deform_net = VanillaMLP(geo_dim, 1, 32), VanillaMLP(tex_dim, 3, 32), VanillaMLP(geo_dim, 3, 32)
    field = TriplaneField(planes, sdf_net, color_net, deform_net, config)
    field.planes = field.planes.to(dtype)
    for net in (sdf_net, color_net, deform_net):
        net.to(dtype)
    return field


def _assert_same_meshes(fast, dense):
    assert len(fast) == len(dense)
    for a, b in zip(fast, dense, strict=True):
        assert a.faces.shape[0] > 0
        assert torch.equal(a.faces, b.faces)
        scale = b.vertices.detach().abs().max()
        torch.testing.assert_close(a.vertices, b.vertices, rtol=0, atol=1e-6 * float(scale))


@pytest.mark.parametrize(
    ("resolution", "config"),
    [
        (48, {}),  # the student's settings: summed geometry features, sphere prior
        (42, {"geo_interpolate": "v2"}),  # concatenated features; 42 is no multiple of the block sizes
        (32, {"sdf_bias": "ellipsoid", "sdf_bias_params": (0.6, 0.4, 0.5)}),
        (30, {"sdf_bias": -0.05}),
    ],
)
def test_coarse_to_fine_gives_the_dense_mesh(resolution, config):
    field = _field(seed=resolution, batch=2, **config)
    with torch.no_grad():
        fast = extract_mesh(field, resolution=resolution, coarse_to_fine=True)
        dense = extract_mesh(field, resolution=resolution, coarse_to_fine=False)
    _assert_same_meshes(fast, dense)


def test_only_a_shell_around_the_surface_is_evaluated(monkeypatch):
    from lightning_modules.student.triplane_grid import TriplaneGridSDF

    field = _field(seed=1)
    calls = []
    network = TriplaneGridSDF._sdf_network  # the SDF MLP as the grid runs it (in-place ReLUs)
    monkeypatch.setattr(TriplaneGridSDF, "_sdf_network", lambda self, x: calls.append(x.shape[0]) or network(self, x))
    with torch.no_grad():
        grid = field.grid_sdf(64, field.device, field.planes.dtype)
        dense, _ = evaluate_field_on_grid(field, 64)
    assert sum(calls) == int(grid.exact.sum())
    assert grid.exact.float().mean() < 0.25  # the shell, not the grid (about 0.12 here)
    # exact where it says so, the right sign everywhere
    assert torch.equal(grid.values[grid.exact], dense[grid.exact])
    assert torch.equal(grid.values < 0, dense < 0)


def test_where_bounds_decide_little_the_grid_is_still_right():
    field = _field(seed=1)
    field.planes = field.planes * 10  # features dominate the prior: bounds too wide to decide most blocks
    with torch.no_grad():
        grid = field.grid_sdf(40, field.device, field.planes.dtype)
        dense, _ = evaluate_field_on_grid(field, 40)
    assert grid.exact.float().mean() > 0.9  # nearly every vertex read from the plane tables
    assert torch.equal(grid.values[grid.exact], dense[grid.exact])
    assert torch.equal(grid.values < 0, dense < 0)


@pytest.mark.parametrize("smooth", [True, False])
def test_block_bounds_hold_every_value_of_their_block(smooth):
    resolution = 40
    field = _field(seed=3, smooth=smooth)
    grid = TriplaneGridSDF(field, 0, resolution, block_sizes=(8, 4, 2))
    with torch.no_grad():
        dense, _ = evaluate_field_on_grid(field, resolution)
    values = dense.reshape((resolution,) * 3)
    for size in (8, 4, 2):
        nb = resolution // size
        blocks = torch.stack(torch.meshgrid(*(torch.arange(nb),) * 3, indexing="ij"), -1).reshape(-1, 3)
        with torch.no_grad():
            lo, hi = grid.block_bounds(blocks, size)
        per_block = values.reshape(nb, size, nb, size, nb, size).permute(0, 2, 4, 1, 3, 5).reshape(nb**3, -1)
        assert (lo <= per_block.amin(dim=1)).all() and (hi >= per_block.amax(dim=1)).all()
        # and they are bounds worth having: no wider than a few times the true range on average
        width_ratio = (hi - lo) / (per_block.amax(dim=1) - per_block.amin(dim=1))
        assert width_ratio.median() < (8 if smooth else 25)


def test_no_zero_crossing_falls_back_like_the_dense_grid():
    field = _field(seed=4, sdf_bias=0.8)  # everything outside
    for fallback in ("unit_sphere", "center_border"):
        with torch.no_grad():
            fast = extract_mesh(field, resolution=32, empty_fallback=fallback, coarse_to_fine=True)
            dense = extract_mesh(field, resolution=32, empty_fallback=fallback, coarse_to_fine=False)
        assert fast[0].used_fallback and dense[0].used_fallback
        _assert_same_meshes(fast, dense)


def test_training_renders_get_the_same_mesh_and_gradients():
    field = _field(seed=5, dtype=torch.float64)
    leaves = [field.planes.requires_grad_(True), *field.sdf_network.parameters(), *field.deformation_network.parameters()]
    results = []
    for coarse_to_fine in (True, False):
        marching_cubes = DeformableMarchingCubes(resolution=48, sdf_grad_shrink=0.5, coarse_to_fine=coarse_to_fine)
        mesh = marching_cubes(field)[0]
        weights = torch.linspace(-1, 1, mesh.vertices.numel(), dtype=torch.float64).reshape(mesh.vertices.shape)
        grads = torch.autograd.grad((mesh.vertices * weights).sum(), leaves)
        results.append((mesh, grads))
    (fast, fast_grads), (dense, dense_grads) = results
    _assert_same_meshes([fast], [dense])
    for a, b in zip(fast_grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))


def test_fields_it_cannot_bound_are_evaluated_densely():
    field = _field(seed=6)
    field.sdf_network = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    assert field.grid_sdf(32, field.device, torch.float32) is None  # biases and tanh: no interval rule here
    half = _field(seed=6, dtype=torch.bfloat16)
    assert half.grid_sdf(32, half.device, torch.bfloat16) is None  # rounding beyond the margin
    plain = _field(seed=6)
    assert plain.grid_sdf(32, plain.device, torch.float64) is None  # another dtype than the planes'
    with torch.no_grad():
        fast = extract_mesh(field, resolution=32, coarse_to_fine=True)
        dense = extract_mesh(field, resolution=32, coarse_to_fine=False)
    _assert_same_meshes(fast, dense)


def test_block_sizes_must_nest():
    with pytest.raises(ValueError, match="divide"):
        TriplaneGridSDF(_field(), 0, 32, block_sizes=(8, 3))


@pytest.mark.parametrize(("config", "slices"), [({}, 1), ({"geo_interpolate": "v2"}, 4),
                                                ({"sdf_bias": "ellipsoid", "sdf_bias_params": (0.6, 0.4, 0.5)}, 7),
                                                ({}, 30)])
def test_dense_slices_equal_the_vertex_by_vertex_values(config, slices):
    """The slice-by-slice evaluation of every vertex (taken when most of the grid is near the surface) computes
    the vertex-by-vertex values bit for bit, whatever the slice count (7 does not divide 30; 30: the whole grid in
    one call, as on a GPU) and the vertices per call of `sdf_at`."""
    field = _field(seed=3, **config)
    grid = TriplaneGridSDF(field, 0, 30)
    with torch.no_grad():
        vertex_by_vertex = grid.sdf_at(torch.arange(30**3))
        assert torch.equal(grid.sdf_dense(slices), vertex_by_vertex)
        # other call sizes, bit for bit: 997 rows would round a few of the last rows 1 ulp differently on the CPU
        # without the padding to ROW_BLOCK rows
        for chunk in (997, 1024):
            assert torch.equal(grid.sdf_at(torch.arange(30**3), chunk_size=chunk), vertex_by_vertex)


def test_a_surface_nearly_everywhere_takes_the_dense_path_and_gives_the_dense_mesh(monkeypatch):
    """A noisy blob leaves most blocks undecided: every vertex is then evaluated slice by slice (all exact),
    with the mesh of the dense grid; with the dense path forbidden, the same values where exact."""
    import lightning_modules.student.triplane_grid as triplane_grid

    field = _field(seed=4, smooth=False)
    with torch.no_grad():
        grid = field.grid_sdf(40, field.device, field.planes.dtype)
        dense, _ = evaluate_field_on_grid(field, 40)
        assert bool(grid.exact.all()) and torch.equal(grid.values, dense)
        _assert_same_meshes(extract_mesh(field, resolution=40), extract_mesh(field, resolution=40, coarse_to_fine=False))
        # refined down to the finest blocks whatever it costs, and the dense path forbidden: the shell path
        monkeypatch.setattr(triplane_grid, "DENSE_SHARE", 2.0)
        monkeypatch.setattr(TriplaneGridSDF, "_refinement_pays", lambda self, parents, size, child: len(parents) > 0)
        shell = field.grid_sdf(40, field.device, field.planes.dtype)
    assert not bool(shell.exact.all())
    assert torch.equal(shell.values[shell.exact], dense[shell.exact])


def test_refinement_stops_where_the_children_decide_nothing(monkeypatch):
    """Blocks are split only while a sample of the children shows that their bounds save more vertex
    evaluations than they cost: on the noisy blob the bounds stop after the first size and a sample of at most
    REFINE_SAMPLE parents' children; on the smooth bumpy sphere every undecided block is split down to blocks of 4
    (there a sample's children decide about half of their vertices, far more than their bounds cost)."""
    from lightning_modules.student.triplane_grid import REFINE_SAMPLE

    bounded = []
    bounds = TriplaneGridSDF.block_bounds
    monkeypatch.setattr(TriplaneGridSDF, "block_bounds",
                        lambda self, blocks, size: bounded.append((size, len(blocks))) or bounds(self, blocks, size))
    with torch.no_grad():
        TriplaneGridSDF(_field(seed=4, smooth=False), 0, 64).evaluate()
        noisy, bounded[:] = list(bounded), []
        TriplaneGridSDF(_field(seed=1), 0, 64).evaluate()
    assert noisy[0] == (16, 64) and len(noisy) == 2 and noisy[1][0] == 8 and noisy[1][1] <= REFINE_SAMPLE * 8
    # whole levels, not only samples: more blocks of 4 bounded at once than REFINE_SAMPLE parents have children
    assert max(count for size, count in bounded if size == 4) > REFINE_SAMPLE * 8
