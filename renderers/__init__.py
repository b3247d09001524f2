"""Cameras, marching cubes, mesh rasteriser (nvdiffrast / PyTorch), NeuS volume renderer, 3D Gaussian
renderer (gsplat / PyTorch) and Gaussian PLY files, backgrounds, turntables and mesh export: everything
that turns a 3D field, mesh or Gaussians into images. The lowest layer of the project: it imports nothing from datamodules/, teachers/ or lightning_modules/. Shared data contracts (the
`Field` protocol every representation implements, `Cameras`, `RenderOutput`): renderers/types.py; the base
of every one-line user error: renderers/errors.py.

The names below are loaded on first use (`from renderers import MeshRenderer`), so importing one small module
such as `renderers.errors` does not import the renderers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Cameras": "renderers.types",
    "DeformableMarchingCubes": "renderers.marching_cubes",
    "EmptySurfaceError": "renderers.marching_cubes",
    "Field": "renderers.types",
    "FieldWithSharedGeometry": "renderers.types",
    "GaussianRenderer": "renderers.gaussian_renderer",
    "Gaussians": "renderers.gaussians",
    "MeshRenderer": "renderers.mesh_renderer",
    "NeuSVolumeRenderer": "renderers.volume_renderer",
    "RandomColorBackground": "renderers.backgrounds",
    "RasterizerBackendError": "renderers.rasterizers",
    "RenderOutput": "renderers.types",
    "SolidBackground": "renderers.backgrounds",
    "TextConditionedBackground": "renderers.backgrounds",
    "TriangleMesh": "renderers.marching_cubes",
    "UserError": "renderers.errors",
    "evaluation_cameras": "renderers.cameras",
    "extract_mesh": "renderers.marching_cubes",
    "get_rasterizer": "renderers.rasterizers",
    "render_mesh": "renderers.mesh_renderer",
    "resolve_backend": "renderers.rasterizers",
    "sample_training_cameras": "renderers.cameras",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'renderers' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
