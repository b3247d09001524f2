"""Cameras, marching cubes, mesh rasteriser (nvdiffrast / PyTorch), NeuS volume renderer, backgrounds,
turntables and mesh export. Shared data contracts: renderers/types.py."""

from renderers.backgrounds import RandomColorBackground, SolidBackground, TextConditionedBackground
from renderers.cameras import evaluation_cameras, sample_training_cameras
from renderers.marching_cubes import DeformableMarchingCubes, EmptySurfaceError, TriangleMesh, extract_mesh
from renderers.mesh_renderer import MeshRenderer, render_mesh
from renderers.rasterizers import RasterizerBackendError, get_rasterizer, resolve_backend
from renderers.types import Cameras, Field, RenderOutput
from renderers.volume_renderer import NeuSVolumeRenderer

__all__ = [
    "Cameras",
    "DeformableMarchingCubes",
    "EmptySurfaceError",
    "Field",
    "MeshRenderer",
    "NeuSVolumeRenderer",
    "RandomColorBackground",
    "RasterizerBackendError",
    "RenderOutput",
    "SolidBackground",
    "TextConditionedBackground",
    "TriangleMesh",
    "evaluation_cameras",
    "extract_mesh",
    "get_rasterizer",
    "render_mesh",
    "resolve_backend",
    "sample_training_cameras",
]
