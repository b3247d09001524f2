"""MultiViewUNet (MVDream / RichDreamer multi-view UNet on diffusers) against the reference fixtures.

- mvdream_ref_A / richdreamer_nd_ref_A: outputs of the ORIGINAL code, reproduced within 1e-4 (fp32);
- other tiny configurations: an independent LDM-layout model (tests/ldm_multiview_reference.py,
  itself checked against both fixtures: test_independent_reference_model_reproduces_the_fixtures)
  writes random checkpoints that MultiViewUNet must reproduce;
- the full released key layouts (*_official_keys.txt) map onto the modules one-to-one;
- one-line errors for missing / malformed files.
"""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from renderers.errors import UserError
from teachers.multiview_unet import (
    ORIGINAL_UNET_PREFIX,
    RELEASED_CHECKPOINTS,
    MultiViewAttnProcessor,
    MultiViewCheckpointError,
    MultiViewCheckpointNotFoundError,
    MultiViewConfigError,
    MultiViewConfigNotFoundError,
    MultiViewUNet,
    camera_vectors,
    load_original_config,
    schedule_from_config,
)
from tests.ldm_multiview_reference import ReferenceMultiViewUNet, randomize_

FAMILIES = ("mvdream_ref_A", "richdreamer_nd_ref_A")
FP32_ATOL = 1e-4  # fixture READMEs: the reference moves by <= 2.5e-6 across thread counts; outputs are O(1)
OFFICIAL_KEYS = {
    "mvdream-sd21-4view": "mvdream_official_keys.txt",
    "richdreamer-nd-mv": "richdreamer_nd_official_keys.txt",
}

_MODELS: dict[tuple, MultiViewUNet] = {}


def fixture_model(fixtures_dir, family: str, dtype=torch.float32) -> MultiViewUNet:
    key = (family, dtype)
    if key not in _MODELS:
        folder = fixtures_dir / family
        _MODELS[key] = MultiViewUNet.from_original_checkpoint(
            folder / "model.ckpt", folder / "config.yaml", dtype=dtype
        )
    return _MODELS[key]


def fixture_tensors(fixtures_dir, family: str):
    folder = fixtures_dir / family
    return load_file(folder / "inputs.safetensors"), load_file(folder / "expected.safetensors")


# ---------------------------------------------------------------------------------------------
# Reference fixtures


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_outputs_match_original_code(fixtures_dir, family):
    model = fixture_model(fixtures_dir, family)
    inputs, expected = fixture_tensors(fixtures_dir, family)
    x, t, ctx, views = inputs["x"], inputs["timesteps"], inputs["context"], int(inputs["num_frames"])
    cases = {
        "eps": dict(camera=inputs["camera"], num_frames=views),
        "eps_camera_alt": dict(camera=inputs["camera_alt"], num_frames=views),
        "eps_num_frames_1": dict(camera=inputs["camera"], num_frames=1),
        "eps_no_camera": dict(camera=None, num_frames=views),
    }
    with torch.no_grad():
        outputs = {name: model(x, t, ctx, **kwargs) for name, kwargs in cases.items()}
    for name, out in outputs.items():
        assert out.shape == expected[name].shape and out.dtype == torch.float32
        err = (out - expected[name]).abs().max().item()
        assert err <= FP32_ATOL, f"{family} {name}: max abs error {err:.2e}"
    # the four cases really differ (a model ignoring cameras or views would fail above, not here)
    assert (outputs["eps"] - outputs["eps_camera_alt"]).abs().max() > 0.05
    assert (outputs["eps"] - outputs["eps_num_frames_1"]).abs().max() > 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_independent_reference_model_reproduces_the_fixtures(fixtures_dir, family):
    """tests/ldm_multiview_reference.py (no diffusers, no project code) loads each fixture's checkpoint
    strictly, in the original key layout, and reproduces all four outputs of the original code: only then
    is it a reference for the other configurations below."""
    folder = fixtures_dir / family
    params = yaml.safe_load((folder / "config.yaml").read_text())["model"]["params"]["unet_config"]["params"]
    raw = torch.load(folder / "model.ckpt", map_location="cpu", weights_only=True)
    raw = raw.get("state_dict", raw)  # RichDreamer wraps its state dict, MVDream does not
    prefix = "model.diffusion_model."
    reference = ReferenceMultiViewUNet(params).eval()
    reference.load_state_dict({k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}, strict=True)
    inputs, expected = fixture_tensors(fixtures_dir, family)
    x, t, ctx, views = inputs["x"], inputs["timesteps"], inputs["context"], int(inputs["num_frames"])
    cases = {
        "eps": (inputs["camera"], views),
        "eps_camera_alt": (inputs["camera_alt"], views),
        "eps_num_frames_1": (inputs["camera"], 1),
        "eps_no_camera": (None, views),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # its plain matmul / softmax attention stalls on a busy shared CPU otherwise
    try:
        with torch.no_grad():
            outputs = {name: reference(x, t, ctx, camera, n) for name, (camera, n) in cases.items()}
    finally:
        torch.set_num_threads(threads)
    for name, out in outputs.items():
        err = (out - expected[name]).abs().max().item()
        assert err <= FP32_ATOL, f"reference model, {family} {name}: max abs error {err:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_schedule(fixtures_dir, family):
    _, expected = fixture_tensors(fixtures_dir, family)
    model = fixture_model(fixtures_dir, family)
    schedule = schedule_from_config(fixtures_dir / family / "config.yaml")
    for name in ("betas", "alphas_cumprod"):
        assert (getattr(schedule, name) - expected[name]).abs().max().item() <= 1e-7
        assert torch.equal(getattr(model, name), getattr(schedule, name))
    assert schedule.prediction_type == "epsilon" and schedule.num_train_timesteps == 1000
    scheduler = schedule.to_diffusers()
    assert scheduler.config.prediction_type == "epsilon"
    assert (scheduler.alphas_cumprod - expected["alphas_cumprod"]).abs().max() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_cameras_from_angles_feed_the_unet(fixtures_dir, family):
    """The fixture's UNet camera input is rebuilt from (elevation, azimuth, distance) by camera_vectors."""
    inputs, expected = fixture_tensors(fixtures_dir, family)
    if family.startswith("mvdream"):
        camera = camera_vectors(
            inputs["elevation_deg"], inputs["azimuth_deg"], inputs["camera_distances"], "mvdream"
        )
    else:
        camera = camera_vectors(
            inputs["elevation_deg"], inputs["azimuth_deg"], inputs["camera_distances_input"], "richdreamer"
        )
    assert (camera - inputs["camera"]).abs().max() <= 1e-5
    with torch.no_grad():
        eps = fixture_model(fixtures_dir, family)(
            inputs["x"], inputs["timesteps"], inputs["context"], camera, num_frames=4
        )
    assert (eps - expected["eps"]).abs().max() <= FP32_ATOL


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype, atol", [(torch.float16, 0.02), (torch.bfloat16, 0.1)])
def test_half_precision_loading(fixtures_dir, family, dtype, atol):
    """fp16 measured ~6e-3, bf16 ~5e-2 off (outputs up to 2.7; changing the cameras moves them by 0.18)."""
    model = fixture_model(fixtures_dir, family, dtype)
    inputs, expected = fixture_tensors(fixtures_dir, family)
    assert all(p.dtype == dtype for p in model.parameters())
    assert model.alphas_cumprod.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    with torch.no_grad():
        eps = model(inputs["x"], inputs["timesteps"], inputs["context"], inputs["camera"], num_frames=4)
    assert eps.dtype == torch.float32
    assert (eps - expected["eps"]).abs().max() <= atol


def test_cross_view_processor_on_every_attn1_only(fixtures_dir):
    processors = fixture_model(fixtures_dir, "mvdream_ref_A").unet.attn_processors
    assert processors and all(isinstance(p, MultiViewAttnProcessor) for p in processors.values())
    assert all(p.cross_view == name.endswith("attn1.processor") for name, p in processors.items())


def test_views_are_exchangeable_with_their_inputs(fixtures_dir):
    """No view encoding besides the camera: permuting views together with their inputs permutes the outputs."""
    model = fixture_model(fixtures_dir, "richdreamer_nd_ref_A")
    inputs, expected = fixture_tensors(fixtures_dir, "richdreamer_nd_ref_A")
    perm = torch.tensor([2, 0, 3, 1, 5, 7, 4, 6])
    with torch.no_grad():
        eps = model(
            inputs["x"][perm],
            inputs["timesteps"][perm],
            inputs["context"][perm],
            inputs["camera"][perm],
            num_frames=4,
        )
    assert (eps - expected["eps"][perm]).abs().max() <= FP32_ATOL


# ---------------------------------------------------------------------------------------------
# Other configurations: independent reference model -> original-layout checkpoint -> MultiViewUNet

VARIANTS = {
    # SD-2.x style (linear projections, heads from num_head_channels), no attention at level 0,
    # depth-2 transformers, 5 input channels fed through `concat` (like the albedo model), raw dict file
    "linear_depth2_concat": dict(
        container="raw",
        model_params=dict(conditioning_key="hybrid", cond_method="cat_d"),
        unet=dict(in_channels=5, out_channels=3, model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1,
                  attention_resolutions=[2, 4], num_head_channels=16, use_linear_in_transformer=True,
                  transformer_depth=2, context_dim=40, camera_dim=12, use_spatial_transformer=True, legacy=False),
    ),
    # SD-1.x style (1x1 conv projections, fixed head count), per-level num_res_blocks, scale-shift norm
    "conv_scale_shift_lists": dict(
        container="state_dict",
        model_params=dict(linear_start=0.0001, linear_end=0.02, beta_schedule="sqrt_linear"),
        unet=dict(in_channels=4, out_channels=4, model_channels=64, channel_mult=[1, 1], num_res_blocks=[1, 2],
                  attention_resolutions=[1], num_heads=2, context_dim=24, camera_dim=16, use_scale_shift_norm=True,
                  use_spatial_transformer=True, legacy=True),
    ),
    # one level, no camera embedding, safetensors file
    "single_level_no_camera": dict(
        container="safetensors",
        model_params={},
        unet=dict(in_channels=2, out_channels=2, model_channels=32, channel_mult=[1], num_res_blocks=1,
                  attention_resolutions=[1], num_heads=1, context_dim=16, use_spatial_transformer=True),
    ),
}  # fmt: skip


def write_variant(tmp_path, name: str, seed: int = 7):
    """A yaml + checkpoint pair in the original layout, weights written by the reference model."""
    spec = VARIANTS[name]
    config = {
        "model": {
            "target": "ldm.interface.LatentDiffusionInterface",
            "params": {
                "timesteps": 1000,
                "parameterization": "eps",
                **spec["model_params"],
                "unet_config": {"target": "ldm.MultiViewUNetModel", "params": spec["unet"]},
            },
        }
    }
    config_path = tmp_path / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    reference = randomize_(ReferenceMultiViewUNet(spec["unet"]), seed).eval()
    state = {ORIGINAL_UNET_PREFIX + k: v.clone() for k, v in reference.state_dict().items()}
    # sections a released file also holds, which the UNet loader must skip
    state["first_stage_model.decoder.conv_out.weight"] = torch.zeros(3, 4, 3, 3)
    state["betas"] = torch.zeros(1000)
    if spec["container"] == "safetensors":
        ckpt_path = tmp_path / f"{name}.safetensors"
        save_file(state, str(ckpt_path))
    else:
        ckpt_path = tmp_path / f"{name}.ckpt"
        torch.save(state if spec["container"] == "raw" else {"state_dict": state}, ckpt_path)
    return config_path, ckpt_path, reference


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_other_configurations_match_independent_reference(tmp_path, name):
    config_path, ckpt_path, reference = write_variant(tmp_path, name)
    model = MultiViewUNet.from_original_checkpoint(ckpt_path, config_path)
    p = VARIANTS[name]["unet"]
    views, objects, size = 2, 2, 8
    n = views * objects
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, p["in_channels"], size, size, generator=gen)
    t = torch.tensor([10, 10, 900, 900])
    ctx = torch.randn(n, 5, p["context_dim"], generator=gen)
    camera = torch.randn(n, p["camera_dim"], generator=gen) if "camera_dim" in p else None
    concat_channels = 1 if model.config.conditioning_key == "hybrid" else 0
    with torch.no_grad():
        for num_frames in (views, 1):
            expected = reference(x, t, ctx, camera, num_frames)
            if concat_channels:
                out = model(
                    x[:, :-concat_channels],
                    t,
                    ctx,
                    camera,
                    num_frames=num_frames,
                    concat=x[:, -concat_channels:],
                )
            else:
                out = model(x, t, ctx, camera, num_frames=num_frames)
            assert out.shape == (n, p["out_channels"], size, size)
            assert (out - expected).abs().max() <= FP32_ATOL, (name, num_frames)
    # the exported original layout is the reference's own key set, tensor for tensor
    exported = model.original_state_dict(prefix="")
    assert exported.keys() == reference.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in reference.state_dict().items())


def test_variant_schedule_and_conditioning(tmp_path):
    config = load_original_config(write_variant(tmp_path, "conv_scale_shift_lists")[0])
    expected_betas = torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(config.schedule.betas, expected_betas.float())
    assert config.conditioning_key is None
    hybrid = load_original_config(write_variant(tmp_path, "linear_depth2_concat")[0])
    assert hybrid.conditioning_key == "hybrid" and hybrid.cond_method == "cat_d"


def test_model_without_camera_rejects_cameras(tmp_path):
    config_path, ckpt_path, _ = write_variant(tmp_path, "single_level_no_camera")
    model = MultiViewUNet.from_original_checkpoint(ckpt_path, config_path)
    assert model.camera_dim is None
    with pytest.raises(ValueError, match="no camera embedding"):
        model(torch.zeros(2, 2, 4, 4), 5, torch.zeros(2, 3, 16), torch.zeros(2, 16), num_frames=2)


# ---------------------------------------------------------------------------------------------
# Full-size released layouts (meta device)


def official_unet_keys(path) -> dict[str, tuple[list[int], str]]:
    rows, section = {}, None
    for line in path.read_text().splitlines():
        if line.startswith("## section:"):
            section = line.split(":", 1)[1].split()[0]
        elif line and not line.startswith("#") and section == "UNet":
            key, shape, diffusers_key = line.split("\t")
            rows[key[len(ORIGINAL_UNET_PREFIX) :]] = (yaml.safe_load(shape), diffusers_key)
    return rows


@pytest.mark.parametrize("release", sorted(OFFICIAL_KEYS))
def test_full_released_key_layout(fixtures_dir, release):
    official = official_unet_keys(fixtures_dir / OFFICIAL_KEYS[release])
    model = MultiViewUNet.from_original_config(RELEASED_CHECKPOINTS[release].config, device="meta")
    assert model.unet.device.type == "meta"
    key_map = model.original_key_map()
    state = model.unet.state_dict()
    assert len(official) == 690
    assert sorted(key_map) == sorted(official)  # no missing or unexpected key
    for key, (shape, diffusers_key) in official.items():
        assert list(state[key_map[key]].shape) == shape, key
        assert key_map[key] == diffusers_key, key
    n_params = sum(t.numel() for t in state.values())
    assert n_params == {"mvdream-sd21-4view": 867_572_164, "richdreamer-nd-mv": 861_182_404}[release]


def test_full_albedo_layout_is_mvdream_with_five_input_channels(fixtures_dir):
    """Albedo-MV (established from its public yaml): MVDream's layout except conv_in takes latent + disparity."""
    mvdream = official_unet_keys(fixtures_dir / OFFICIAL_KEYS["mvdream-sd21-4view"])
    model = MultiViewUNet.from_original_config(
        RELEASED_CHECKPOINTS["richdreamer-albedo-mv"].config, device="meta"
    )
    state, key_map = model.unet.state_dict(), model.original_key_map()
    assert sorted(key_map) == sorted(mvdream)
    for key, (shape, _) in mvdream.items():
        expected = [320, 5, 3, 3] if key == "input_blocks.0.0.weight" else shape
        assert list(state[key_map[key]].shape) == expected, key
    assert model.config.conditioning_key == "hybrid" and model.context_dim == 1024 and model.camera_dim == 16


# ---------------------------------------------------------------------------------------------
# Errors


def _one_line(err: BaseException) -> str:
    message = str(err)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("release", sorted(RELEASED_CHECKPOINTS))
def test_missing_released_checkpoint_names_file_hub_and_fetch(tmp_path, release):
    info = RELEASED_CHECKPOINTS[release]
    with pytest.raises(MultiViewCheckpointNotFoundError) as err:
        MultiViewUNet.from_original_checkpoint(tmp_path / info.filename)  # config defaults to the bundled one
    message = _one_line(err.value)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, UserError)
    assert str(tmp_path / info.filename) in message and info.fetch in message
    hub = "MVDream/MVDream" if release.startswith("mvdream") else "Damo_XR_Lab/Normal-Depth-Diffusion-Model"
    assert hub in message


def test_missing_checkpoint_with_unknown_name_lists_releases(tmp_path, fixtures_dir):
    with pytest.raises(MultiViewCheckpointNotFoundError) as err:
        MultiViewUNet.from_original_checkpoint(
            tmp_path / "teacher.ckpt", fixtures_dir / "mvdream_ref_A" / "config.yaml"
        )
    message = _one_line(err.value)
    assert all(r.filename in message for r in RELEASED_CHECKPOINTS.values())


def test_unknown_checkpoint_name_without_config(tmp_path):
    with pytest.raises(MultiViewConfigError, match="pass config_path"):
        MultiViewUNet.from_original_checkpoint(tmp_path / "teacher.ckpt")


def test_missing_config(tmp_path, fixtures_dir):
    with pytest.raises(MultiViewConfigNotFoundError) as err:
        MultiViewUNet.from_original_checkpoint(
            fixtures_dir / "mvdream_ref_A" / "model.ckpt", tmp_path / "nope.yaml"
        )
    assert "nope.yaml" in _one_line(err.value) and "mvdream_sd21_base_4view.yaml" in str(err.value)
    with pytest.raises(
        MultiViewConfigNotFoundError
    ) as err:  # a released file name: its own config and source
        MultiViewUNet.from_original_checkpoint(tmp_path / "nd_mv_ema.ckpt", tmp_path / "nope.yaml")
    message = _one_line(err.value)
    assert "richdreamer_nd_mv.yaml" in message and "txtcond_mvsd-4-objaverse_finetune_wovae.yaml" in message


def _write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def _fixture_config(fixtures_dir, family="mvdream_ref_A") -> dict:
    return yaml.safe_load((fixtures_dir / family / "config.yaml").read_text())


def test_bad_yaml_errors(tmp_path, fixtures_dir):
    with pytest.raises(MultiViewConfigError, match="not valid YAML at line") as err:
        load_original_config(_write(tmp_path, "model:\n  params: [unclosed\n"))
    _one_line(err.value)
    with pytest.raises(MultiViewConfigError, match="no model.params.unet_config"):
        load_original_config(_write(tmp_path, "model:\n  params: {}\n"))
    with pytest.raises(MultiViewConfigError, match="not a MultiViewUNetModel"):
        config = _fixture_config(fixtures_dir)
        config["model"]["params"]["unet_config"]["target"] = (
            "ldm.modules.diffusionmodules.openaimodel.UNetModel"
        )
        load_original_config(_write(tmp_path, yaml.safe_dump(config)))
    with pytest.raises(MultiViewConfigError, match="beta_schedule"):
        config = _fixture_config(fixtures_dir)
        config["model"]["params"]["beta_schedule"] = "quadratic"
        schedule_from_config(_write(tmp_path, yaml.safe_dump(config)))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(resblock_updown=True), "resblock_updown"),
        (dict(num_head_channels=24), "do not split into heads"),
        (dict(model_channels=48), "not a multiple of 32"),
        (dict(channel_mult=[2, 2]), "must start with 1"),
        (dict(transformer_depth=[1, 1]), "transformer_depth"),
        (dict(some_new_option=1), "unsupported unet_config parameter"),
    ],
)
def test_unsupported_unet_configs(tmp_path, fixtures_dir, change, message):
    config = _fixture_config(fixtures_dir)
    config["model"]["params"]["unet_config"]["params"].update(change)
    with pytest.raises(MultiViewConfigError, match=message) as err:
        MultiViewUNet.from_original_config(_write(tmp_path, yaml.safe_dump(config)), device="meta")
    _one_line(err.value)


def test_checkpoint_config_mismatch(fixtures_dir, tmp_path):
    # RichDreamer weights with the MVDream config: same key names, other shapes
    with pytest.raises(MultiViewCheckpointError, match="shape") as err:
        MultiViewUNet.from_original_checkpoint(
            fixtures_dir / "richdreamer_nd_ref_A" / "model.ckpt",
            fixtures_dir / "mvdream_ref_A" / "config.yaml",
        )
    _one_line(err.value)
    # a truncated state dict
    state = torch.load(fixtures_dir / "mvdream_ref_A" / "model.ckpt", weights_only=True)
    state.pop(ORIGINAL_UNET_PREFIX + "out.2.weight")
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(MultiViewCheckpointError, match="1 missing UNet tensor"):
        MultiViewUNet.from_original_checkpoint(
            tmp_path / "partial.pt", fixtures_dir / "mvdream_ref_A" / "config.yaml"
        )
    # no UNet at all
    torch.save({"state_dict": {"first_stage_model.x": torch.zeros(1)}}, tmp_path / "vae_only.ckpt")
    with pytest.raises(MultiViewCheckpointError, match="no 'model.diffusion_model"):
        MultiViewUNet.from_original_checkpoint(
            tmp_path / "vae_only.ckpt", fixtures_dir / "mvdream_ref_A" / "config.yaml"
        )


class _NotATensor:
    pass


def test_pickled_objects_are_refused(tmp_path, fixtures_dir):
    torch.save({"state_dict": {}, "callback": _NotATensor()}, tmp_path / "pickled.ckpt")
    with pytest.raises(MultiViewCheckpointError, match="weights_only=True") as err:
        MultiViewUNet.from_original_checkpoint(
            tmp_path / "pickled.ckpt", fixtures_dir / "mvdream_ref_A" / "config.yaml"
        )
    _one_line(err.value)


def test_forward_input_errors(fixtures_dir):
    model = fixture_model(fixtures_dir, "mvdream_ref_A")
    inputs, _ = fixture_tensors(fixtures_dir, "mvdream_ref_A")
    x, t, ctx, cam = inputs["x"], inputs["timesteps"], inputs["context"], inputs["camera"]
    with pytest.raises(ValueError, match="whole number of 3-view groups"):
        model(x, t, ctx, cam, num_frames=3)
    with pytest.raises(ValueError, match="camera must be"):
        model(x, t, ctx, cam[:, :12], num_frames=4)
    with pytest.raises(ValueError, match="timesteps must be"):
        model(x, t[:4], ctx, cam, num_frames=4)
    with pytest.raises(ValueError, match="context must be"):
        model(x, t, ctx[..., :32], cam, num_frames=4)
    with pytest.raises(ValueError, match="input channels"):
        model(x[:, :3], t, ctx, cam, num_frames=4)


def test_scalar_timestep_and_string_dtype(fixtures_dir):
    inputs, expected = fixture_tensors(fixtures_dir, "mvdream_ref_A")
    model = fixture_model(fixtures_dir, "mvdream_ref_A")
    half = slice(0, 4)  # first object: one timestep for all its views
    with torch.no_grad():
        eps = model(
            inputs["x"][half], int(inputs["timesteps"][0]), inputs["context"][half], inputs["camera"][half]
        )
    assert (eps - expected["eps"][half]).abs().max() <= FP32_ATOL
    folder = fixtures_dir / "mvdream_ref_A"
    assert (
        MultiViewUNet.from_original_checkpoint(
            folder / "model.ckpt", folder / "config.yaml", dtype="bf16"
        ).dtype
        == torch.bfloat16
    )


def test_models_are_independent_copies(fixtures_dir):
    """deepcopy (as Lightning / EMA utilities do) keeps the multi-view processors working."""
    model = copy.deepcopy(fixture_model(fixtures_dir, "richdreamer_nd_ref_A"))
    inputs, expected = fixture_tensors(fixtures_dir, "richdreamer_nd_ref_A")
    with torch.no_grad():
        eps = model(inputs["x"], inputs["timesteps"], inputs["context"], inputs["camera"], num_frames=4)
    assert (eps - expected["eps"]).abs().max() <= FP32_ATOL
