"""Shared helpers for the teacher tests: render-shaped inputs and tiny teacher models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from renderers.types import Cameras, RenderOutput
from teachers.camera_vectors import c2w_from_spherical
from tests.tiny_sd import FIXTURES, make_tiny_sd

MV_FIXTURE = FIXTURES / "mvdream_ref_A"
ND_FIXTURE = FIXTURES / "richdreamer_nd_ref_A"


def unet_params(fixture: Path) -> dict:
    return yaml.safe_load((fixture / "config.yaml").read_text())["model"]["params"]["unet_config"]["params"]


def vae_factor(sd_dir: Path) -> int:
    import json

    config = json.loads((Path(sd_dir) / "vae" / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)


def make_sd_dir_for(fixture: Path, directory: Path, seed: int = 0) -> Path:
    """A tiny SD directory whose text encoder width equals the fixture UNet's context_dim."""
    return make_tiny_sd(
        directory, seed=seed, text_encoder=dict(hidden_size=unet_params(fixture)["context_dim"])
    )


@pytest.fixture(scope="module", name="dirs")
def teacher_dirs(tmp_path_factory, tiny_sd_dir) -> dict[str, str]:
    """Fixture `dirs`: tiny SD directories for the teachers ("sd"; "mv" / "nd" with the MVDream / RichDreamer
    fixture's text width) and a prompt-cache folder ("cache"). Import `teacher_dirs` into a test module."""
    return {
        "sd": str(tiny_sd_dir),
        "mv": str(make_sd_dir_for(MV_FIXTURE, tmp_path_factory.mktemp("mv_sd"), seed=3)),
        "nd": str(make_sd_dir_for(ND_FIXTURE, tmp_path_factory.mktemp("nd_sd"), seed=4)),
        "cache": str(tmp_path_factory.mktemp("prompt_cache")),
    }


def make_cameras(batch: int, views: int, height: int, width: int, seed: int = 0) -> Cameras:
    """TriplaneTurbo-style training cameras: elevation U[0, 30], evenly spaced azimuths with a random
    offset, fovy 60 deg, distance = U[0.8, 1.0] / tan(fovy / 2)."""
    g = torch.Generator().manual_seed(seed)
    elevation = (torch.rand(batch, 1, generator=g) * 30).expand(batch, views).clone()
    offset = torch.rand(batch, 1, generator=g)
    azimuth = (offset + torch.arange(views)) / views * 360 - 180
    fovy = torch.full((batch, views), math.radians(60.0))
    relative = (0.8 + 0.2 * torch.rand(batch, 1, generator=g)).expand(batch, views)
    distance = relative / torch.tan(fovy / 2)
    c2w = c2w_from_spherical(elevation, azimuth, distance)
    return Cameras(c2w, fovy, elevation, azimuth, distance, height, width)


def make_render(
    batch: int = 2,
    views: int = 4,
    size: int = 12,
    renderer: str = "mesh",
    seed: int = 0,
    leaf: bool = True,
    cameras: Cameras | None = None,
) -> RenderOutput:
    """Random images in [0, 1] ("rgb" 3, "normal" 3, "disparity" 1), leaf tensors requiring grad, seen by
    `cameras` (default: `make_cameras`)."""
    g = torch.Generator().manual_seed(seed + 100)
    images = {
        name: torch.rand(batch, views, channels, size, size, generator=g).requires_grad_(leaf)
        for name, channels in (("rgb", 3), ("normal", 3), ("disparity", 1))
    }
    if cameras is None:
        cameras = make_cameras(batch, views, size, size, seed)
    return RenderOutput(images, cameras, renderer)


def fixture_cameras(fixture: Path) -> tuple[Cameras, torch.Tensor]:
    """The fixture's cameras as a `Cameras` [objects, 4] and the camera vectors the UNet received."""
    from safetensors.torch import load_file

    inputs = load_file(str(fixture / "inputs.safetensors"))
    views = int(inputs["num_frames"])
    shape = (-1, views)
    fovy = torch.deg2rad(inputs["fovy_deg"]).view(shape)
    c2w = inputs["c2w"].view(-1, views, 4, 4)
    cameras = Cameras(
        c2w,
        fovy,
        inputs["elevation_deg"].view(shape),
        inputs["azimuth_deg"].view(shape),
        inputs["camera_distances"].view(shape),
        16,
        16,
    )
    return cameras, inputs["camera"]


def put_in_hub_cache(cache, repo_id: str, filename: str, data: bytes = b"stand-in") -> None:
    """A file of a hub repo in a Hugging Face cache folder, laid out as huggingface_hub downloads it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0123abc")
    file = repo / "snapshots" / "0123abc" / filename
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(data)
