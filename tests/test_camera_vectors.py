"""Camera vectors of the multi-view teachers against the reference cameras (cameras.safetensors).

The fixture tensors were produced by the original code: threestudio's c2w, TriplaneTurbo's /
RichDreamer's conversions, MVDream's and normal-depth-diffusion's `get_camera` helpers.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from teachers.camera_vectors import (
    c2w_from_spherical,
    camera_vectors_from_c2w,
    native_camera_vectors,
    richdreamer_condition_distance,
)
from teachers.multiview_unet import camera_vectors  # the public import path of the teachers

ATOL = 1e-5  # float32 trigonometry; the task's bound is 1e-4


@pytest.fixture(scope="module")
def cams(fixtures_dir):
    tensors = load_file(fixtures_dir / "mvdream_ref_A" / "cameras.safetensors")
    other = load_file(fixtures_dir / "richdreamer_nd_ref_A" / "cameras.safetensors")
    assert all(torch.equal(tensors[k], other[k]) for k in tensors)  # "identical in every fixture folder"
    return tensors


def _max_err(a, b) -> float:
    return (a - b).abs().max().item()


def test_threestudio_c2w(cams):
    c2w = c2w_from_spherical(cams["elevation_deg"], cams["azimuth_deg"], cams["camera_distances"])
    assert _max_err(c2w, cams["threestudio_c2w"]) <= ATOL


def test_mvdream_vectors(cams):
    from_angles = camera_vectors(
        cams["elevation_deg"], cams["azimuth_deg"], cams["camera_distances"], "mvdream"
    )
    from_c2w = camera_vectors_from_c2w(cams["threestudio_c2w"], "mvdream")
    assert _max_err(from_angles, cams["mvdream_cond"]) <= ATOL
    assert _max_err(from_c2w, cams["mvdream_cond"]) <= ATOL
    # the distance does not matter for MVDream (unit translation)
    assert (
        _max_err(
            camera_vectors(cams["elevation_deg"], cams["azimuth_deg"], 7.0, "mvdream"), cams["mvdream_cond"]
        )
        <= ATOL
    )


def test_richdreamer_vectors(cams):
    fovy = torch.deg2rad(cams["fovy_deg"])
    rel_x2 = richdreamer_condition_distance(cams["camera_distances"], fovy, "rel_x2")
    assert _max_err(rel_x2, 2 * cams["camera_distances_relative"]) <= ATOL
    assert (
        _max_err(
            camera_vectors(cams["elevation_deg"], cams["azimuth_deg"], rel_x2, "richdreamer"),
            cams["richdreamer_cond_rel_x2"],
        )
        <= ATOL
    )
    assert (
        _max_err(
            camera_vectors_from_c2w(cams["threestudio_c2w"], "richdreamer", rel_x2),
            cams["richdreamer_cond_rel_x2"],
        )
        <= ATOL
    )
    absolute = richdreamer_condition_distance(cams["camera_distances"], method="abs")
    assert (
        _max_err(
            camera_vectors(cams["elevation_deg"], cams["azimuth_deg"], absolute, "richdreamer"),
            cams["richdreamer_cond_abs"],
        )
        <= ATOL
    )
    assert torch.equal(
        richdreamer_condition_distance(cams["camera_distances"], method="abs_spec"), torch.full((6,), 2.0)
    )
    rel = richdreamer_condition_distance(cams["camera_distances"], fovy, "rel")
    assert _max_err(rel, cams["camera_distances_relative"]) <= ATOL


def test_native_helpers(cams):
    """MVDream's own helper at azimuth a is this project's camera at a - 90; ND's at the same azimuth."""
    el, az = cams["elevation_deg"], cams["azimuth_deg"]
    assert (
        _max_err(
            native_camera_vectors(el, az + 90, convention="mvdream"), cams["mvdream_get_camera_az_plus_90"]
        )
        <= ATOL
    )
    assert (
        _max_err(native_camera_vectors(el, az, convention="mvdream"), cams["mvdream_get_camera_same_az"])
        <= ATOL
    )
    assert (
        _max_err(cams["mvdream_get_camera_same_az"], cams["mvdream_cond"]) > 0.5
    )  # the 90 deg offset is real
    four = native_camera_vectors(
        torch.full((4,), 15.0), torch.tensor([0.0, 90.0, 180.0, 270.0]), convention="mvdream"
    )
    assert _max_err(four, cams["mvdream_get_camera_4views_elev15_az0"]) <= ATOL
    nd = native_camera_vectors(el, az, 2 * cams["camera_distances_relative"], convention="richdreamer")
    assert _max_err(nd, cams["nd_get_camera_dist_2rel"]) <= ATOL


@pytest.mark.parametrize(
    "family, convention", [("mvdream_ref_A", "mvdream"), ("richdreamer_nd_ref_A", "richdreamer")]
)
def test_unet_inputs_of_the_fixtures(fixtures_dir, family, convention):
    inputs = load_file(fixtures_dir / family / "inputs.safetensors")
    distance = inputs.get("camera_distances_input", inputs["camera_distances"])
    vectors = camera_vectors(inputs["elevation_deg"], inputs["azimuth_deg"], distance, convention)
    assert _max_err(vectors, inputs["camera"]) <= ATOL
    c2w = inputs["c2w"].clone()
    assert _max_err(camera_vectors_from_c2w(c2w, convention, distance), inputs["camera"]) <= ATOL
    assert torch.equal(
        c2w, inputs["c2w"]
    )  # unlike the reference, the input matrices are not normalised in place
    rolled = vectors.view(2, 4, 16).roll(1, dims=1).reshape(8, 16)  # view v gets the camera of view v-1
    assert _max_err(rolled, inputs["camera_alt"]) <= ATOL


def test_batched_shapes():
    el = torch.full((2, 4), 20.0)
    az = torch.tensor([0.0, 90.0, 180.0, 270.0]).expand(2, 4)
    out = camera_vectors(el, az, torch.tensor([[1.0], [2.0]]), "richdreamer")
    assert out.shape == (2, 4, 16)
    translation = out.view(2, 4, 4, 4)[..., :3, 3].norm(dim=-1)
    assert torch.allclose(translation, torch.tensor([[1.0], [2.0]]).expand(2, 4), atol=1e-6)
    rotation = out.view(2, 4, 4, 4)[..., :3, :3]
    assert torch.allclose(rotation @ rotation.transpose(-1, -2), torch.eye(3).expand(2, 4, 3, 3), atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="unknown camera convention"):
        camera_vectors(torch.zeros(1), torch.zeros(1), 1.0, "zero123")
    with pytest.raises(ValueError, match="needs `distance`"):
        camera_vectors_from_c2w(torch.eye(4)[None], "richdreamer")
    with pytest.raises(ValueError, match="strictly between -90 and 90"):
        camera_vectors(torch.tensor([90.0]), torch.zeros(1))
    with pytest.raises(ValueError, match="positive"):
        camera_vectors(torch.zeros(1), torch.zeros(1), 0.0)
    with pytest.raises(ValueError, match="needs fovy_rad"):
        richdreamer_condition_distance(torch.ones(1), method="rel_x2")
    with pytest.raises(ValueError, match="unknown RichDreamer distance method"):
        richdreamer_condition_distance(torch.ones(1), 1.0, method="rel_xauto")
    with pytest.raises(ValueError, match=r"\[..., 4, 4\]"):
        camera_vectors_from_c2w(torch.zeros(3, 16))
