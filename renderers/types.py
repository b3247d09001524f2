"""Data contracts shared by the student, the renderers, the teachers and evaluation.

Conventions (threestudio's, which the TriplaneTurbo reference follows):
- World frame: right-handed, +z up. The object lives in the box [-1, 1]^3.
- Camera-to-world matrices `c2w` use the OpenGL camera convention: camera x right, y up, and the
  camera looks along its -z axis.
- Azimuth 0 deg looks at the object from +x; elevation is measured from the xy-plane towards +z:
  position = distance * (cos(el) cos(az), cos(el) sin(az), sin(el)).
- Images are `[B, V, C, H, W]` (B objects / prompts, V views), float32, row 0 at the top.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Field(Protocol):
    """A batch of B implicit 3D objects in [-1, 1]^3: the one interface between a 3D representation and
    everything that draws or judges it (marching cubes, both renderers, the teachers through the renders,
    validation logging and mesh export). The student's `TriplaneField` is one; `teachers.shapes.ShapeField`
    (analytic targets) is another. A new representation is a class with these members, nothing more:

    - `batch_size`: B, the number of objects;
    - `sdf(points)`, `deformation(points)`, `color(points)` below. Each takes points `[B, N, 3]` and is
      differentiable with respect to the representation's parameters (what trains) and the points.

    Optional members, looked up with `getattr` (see `FieldWithSharedGeometry`):

    - `sdf_and_deformation(points)`: both from one lookup of shared geometry features; marching cubes
      calls it instead of `sdf` + `deformation` at every training render (about 2x faster there);
    - `device` / `dtype` attributes, or being an `nn.Module` with parameters: where evaluation grids are
      built (default: CPU, float32);
    - `grid_sdf(resolution, device, dtype) -> GridSDF | None`: the SDF on marching cubes' R^3 grid, exact only where it must
      be (near the surface) and of the right sign everywhere, or None where the field can't bound itself;
      marching cubes uses it when `coarse_to_fine` is on (`TriplaneField`: interval bounds over blocks of
      vertices; the trained demo student leaves ~3 % of a 160^3 grid to evaluate).

    Normals are not part of the protocol: the volume renderer takes them from the SDF by autograd and the
    mesh renderer from the extracted mesh.
    """

    @property
    def batch_size(self) -> int:
        """B, the number of objects in the batch."""
        ...

    def sdf(self, points: Tensor) -> Tensor:
        """Signed distance `[B, N]` (negative inside), including any prior."""
        ...

    def deformation(self, points: Tensor) -> Tensor:
        """Raw deformation of the marching-cubes grid vertices `[B, N, 3]` in grid cells (zeros when the
        representation has none; `DeformableMarchingCubes(use_deformation=False)` skips it)."""
        ...

    def color(self, points: Tensor) -> Tensor:
        """RGB `[B, N, 3]` in [0, 1]."""
        ...


@dataclass
class GridSDF:
    """The SDF of B objects on an R^3 grid as far as marching cubes needs it.

    values: [B, R^3] exact where `exact` is True; elsewhere a value of the right sign (< 0 inside).
    exact:  [B, R^3] bool.
    """

    values: Tensor
    exact: Tensor


@runtime_checkable
class FieldWithSharedGeometry(Field, Protocol):
    """A `Field` whose SDF and deformation come from the same geometry features, read once for both."""

    def sdf_and_deformation(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """`(sdf(points), deformation(points))`, `[B, N]` and `[B, N, 3]`, from one geometry lookup."""
        ...


@dataclass
class Cameras:
    """A batch of V cameras for each of B objects.

    c2w:       [B, V, 4, 4] camera-to-world (OpenGL camera convention, world +z up)
    fovy:      [B, V] vertical field of view, radians
    elevation: [B, V] degrees
    azimuth:   [B, V] degrees
    distance:  [B, V] absolute distance from the origin
    height, width: image size in pixels the cameras are meant for
    """

    c2w: Tensor
    fovy: Tensor
    elevation: Tensor
    azimuth: Tensor
    distance: Tensor
    height: int
    width: int

    @property
    def batch_size(self) -> int:
        return self.c2w.shape[0]

    @property
    def num_views(self) -> int:
        return self.c2w.shape[1]

    def to(self, device: torch.device | str) -> Cameras:
        return replace(
            self,
            c2w=self.c2w.to(device),
            fovy=self.fovy.to(device),
            elevation=self.elevation.to(device),
            azimuth=self.azimuth.to(device),
            distance=self.distance.to(device),
        )


@dataclass
class RenderOutput:
    """What every renderer returns, so a teacher never needs to know which renderer drew an image.

    images:  name -> [B, V, C, H, W]. Standard names: "rgb" (3, with background composited),
             "alpha" (1), "normal" (3, camera-space normals mapped to [0, 1]), "depth" (1),
             "disparity" (1, normalised to [0, 1] as in the reference).
    cameras: the cameras the images were drawn from.
    renderer: "mesh", "volume" or "gaussian".
    regularizers: name -> scalar loss the renderer computed on the way (e.g. "eikonal", "sparsity").
    """

    images: dict[str, Tensor]
    cameras: Cameras
    renderer: str
    regularizers: dict[str, Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Tensor:
        return self.images[name]
