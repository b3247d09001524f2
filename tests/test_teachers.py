"""Teacher wrappers on tiny models: Stable Diffusion (tiny SD dirs), MVDream and RichDreamer ND
(the reference fixtures' checkpoints + yaml), through render-shaped inputs on the CPU."""

import json
import shutil

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from renderers.cameras import resized
from renderers.types import RenderOutput
from teachers.base import Teacher, TeacherWeightsNotFoundError
from teachers.ensemble import TeacherEnsemble
from teachers.mvdream import MVDreamTeacher
from teachers.prompt_cache import PromptEmbeddings
from teachers.richdreamer import RichDreamerAlbedoTeacher, RichDreamerNormalDepthTeacher
from teachers.stable_diffusion import StableDiffusionTeacher, encode_rgb
from tests.teacher_helpers import (
    MV_FIXTURE,
    ND_FIXTURE,
    fixture_cameras,
    make_render,
    make_sd_dir_for,
    unet_params,
    vae_factor,
)

PROMPTS = ["a red chair", "a glass owl"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("prompt_cache"))


@pytest.fixture(scope="module")
def mv_sd_dir(tmp_path_factory):
    return make_sd_dir_for(MV_FIXTURE, tmp_path_factory.mktemp("mv_sd"), seed=3)


@pytest.fixture(scope="module")
def nd_sd_dir(tmp_path_factory):
    return make_sd_dir_for(ND_FIXTURE, tmp_path_factory.mktemp("nd_sd"), seed=4)


def sd_teacher(tiny_sd_dir, cache_dir, **kwargs):
    options = dict(
        pretrained=str(tiny_sd_dir), resolution=16, prompt_cache_dir=cache_dir, text_encoder_device="cpu"
    )
    options.update(kwargs)
    return StableDiffusionTeacher(**options)


def mv_teacher(mv_sd_dir, cache_dir, **kwargs):
    options = dict(
        ckpt_path=str(MV_FIXTURE / "model.ckpt"),
        config_path=str(MV_FIXTURE / "config.yaml"),
        hub_id=None,
        vae=str(mv_sd_dir),
        text_encoder=str(mv_sd_dir),
        resolution=unet_params(MV_FIXTURE)["image_size"] * vae_factor(mv_sd_dir),
        prompt_cache_dir=cache_dir,
        text_encoder_device="cpu",
    )
    options.update(kwargs)
    return MVDreamTeacher(**options)


def nd_teacher(nd_sd_dir, cache_dir, **kwargs):
    options = dict(
        ckpt_path=str(ND_FIXTURE / "model.ckpt"),
        config_path=str(ND_FIXTURE / "config.yaml"),
        text_encoder=str(nd_sd_dir),
        resolution=unet_params(ND_FIXTURE)["image_size"],
        prompt_cache_dir=cache_dir,
        text_encoder_device="cpu",
    )
    options.update(kwargs)
    return RichDreamerNormalDepthTeacher(**options)


def nonzero_views(grad):
    """[B, V] bool: which views received any gradient."""
    return grad.flatten(2).abs().sum(-1) > 0


# ---------------------------------------------------------------------------------------------
# Stable Diffusion


def test_sd_one_random_view_and_the_opposite_view_for_the_second_render(tiny_sd_dir, cache_dir):
    teacher = sd_teacher(tiny_sd_dir, cache_dir)
    mesh, volume = make_render(renderer="mesh", seed=0), make_render(size=10, renderer="volume", seed=1)
    losses = teacher([mesh, volume], PROMPTS, step=0, generator=torch.Generator().manual_seed(0))
    assert set(losses) == {"stable_diffusion/mesh", "stable_diffusion/volume"}
    assert all(loss.ndim == 0 and loss.dtype == torch.float32 and loss > 0 for loss in losses.values())
    sum(losses.values()).backward()
    mesh_views, volume_views = nonzero_views(mesh["rgb"].grad), nonzero_views(volume["rgb"].grad)
    assert (mesh_views.sum(1) == 1).all() and (volume_views.sum(1) == 1).all()
    first = mesh_views.float().argmax(1)
    assert (volume_views.float().argmax(1) == (first + 2) % 4).all()
    assert mesh["normal"].grad is None  # SD only reads "rgb"


def test_sd_render_gradient_is_the_objective_gradient_through_the_vae(tiny_sd_dir, cache_dir):
    teacher = sd_teacher(tiny_sd_dir, cache_dir, views_per_object=2, sample_posterior=False, t_min=0.2)
    render = make_render()
    loss = teacher(render, PROMPTS, step=0, generator=torch.Generator().manual_seed(1))["stable_diffusion"]
    loss.backward()
    views = teacher.last_views[0]  # [B, 2]
    chosen = render["rgb"].detach()[torch.arange(2)[:, None], views].flatten(0, 1).requires_grad_(True)
    latents = encode_rgb(teacher.frozen["vae"], chosen, 16, sample=False, generator=None)
    # loss = sum over objects of per-image losses / views_per_object  =>  d loss / d latent = grad / 2
    (expected,) = torch.autograd.grad(latents, chosen, teacher.last_output.grad / 2)
    got = render["rgb"].grad[torch.arange(2)[:, None], views].flatten(0, 1)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(loss.detach(), teacher.last_output.loss.sum() / 2)
    assert nonzero_views(render["rgb"].grad).sum() == 4


def test_sd_v_prediction_is_converted_to_epsilon(tiny_sd_dir, cache_dir, tmp_path):
    v_dir = tmp_path / "sd_v"
    shutil.copytree(tiny_sd_dir, v_dir)
    scheduler_config = v_dir / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler_config.read_text())
    config["prediction_type"] = "v_prediction"
    scheduler_config.write_text(json.dumps(config))
    teacher = sd_teacher(v_dir, cache_dir, text_encoder=str(tiny_sd_dir))
    captured = {}
    objective = teacher.objective

    def spy(x, denoise, *args, **kwargs):
        captured["denoise"] = denoise
        return objective(x, denoise, *args, **kwargs)

    teacher.objective = spy
    teacher(make_render(), PROMPTS, step=0)
    assert teacher.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(0)
    x_t, t, context = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([100, 900]),
        torch.randn(2, 77, 32, generator=g),
    )
    with torch.no_grad():
        v = teacher.frozen["unet"](x_t, t, encoder_hidden_states=context).sample
        abar = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(
            captured["denoise"](x_t, t, context), abar.sqrt() * v + (1 - abar).sqrt() * x_t
        )


def test_sd_precomputed_embeddings_give_the_same_loss(tiny_sd_dir, cache_dir):
    teacher = sd_teacher(tiny_sd_dir, cache_dir)
    render = make_render(leaf=False)
    from_strings = teacher(render, PROMPTS, 0, torch.Generator().manual_seed(5))["stable_diffusion"]
    embeddings = teacher.prompt_processor(PROMPTS, negative_prompt="")
    assert isinstance(embeddings, PromptEmbeddings)
    from_embeddings = teacher(render, embeddings, 0, torch.Generator().manual_seed(5))["stable_diffusion"]
    from_mapping = teacher(render, {embeddings.encoder_key: embeddings}, 0, torch.Generator().manual_seed(5))
    torch.testing.assert_close(from_strings, from_embeddings)
    torch.testing.assert_close(from_strings, from_mapping["stable_diffusion"])
    with pytest.raises(ValueError, match="no precomputed embeddings"):
        teacher(render, {"other-encoder": embeddings}, 0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sd_half_precision_weights_keep_a_float32_loss(tiny_sd_dir, cache_dir, dtype):
    teacher = sd_teacher(tiny_sd_dir, cache_dir, dtype=dtype)
    render = make_render()
    loss = teacher(render, PROMPTS, 0, torch.Generator().manual_seed(0))["stable_diffusion"]
    assert next(teacher.frozen["unet"].parameters()).dtype == getattr(torch, dtype)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert render["rgb"].grad.dtype == torch.float32 and torch.isfinite(render["rgb"].grad).all()
    assert render["rgb"].grad.abs().sum() > 0


def test_sd_vae_gradient_checkpointing_gives_the_same_gradient(tiny_sd_dir, cache_dir):
    grads = []
    for checkpointing in (False, True):
        teacher = sd_teacher(
            tiny_sd_dir, cache_dir, sample_posterior=False, gradient_checkpointing=checkpointing
        )
        render = make_render()
        teacher(render, PROMPTS, 0, torch.Generator().manual_seed(7))["stable_diffusion"].backward()
        assert teacher.frozen["vae"].encoder.gradient_checkpointing == checkpointing
        grads.append(render["rgb"].grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_inputs_are_clear_errors(tiny_sd_dir, cache_dir):
    teacher = sd_teacher(tiny_sd_dir, cache_dir)
    render = make_render()
    no_rgb = RenderOutput({"normal": render["normal"]}, render.cameras, "mesh")
    with pytest.raises(ValueError, match="needs render images 'rgb'"):
        teacher(no_rgb, PROMPTS, 0)
    with pytest.raises(ValueError, match="3 prompts for a render batch of 2"):
        teacher(render, PROMPTS + ["a third"], 0)
    with pytest.raises(ValueError, match="views_per_object"):
        sd_teacher(tiny_sd_dir, cache_dir, views_per_object=0)


# ---------------------------------------------------------------------------------------------
# Frozen, outside checkpoints and DDP buckets, offloadable


class ToyPRDModule(pl.LightningModule):
    def __init__(self, teachers: TeacherEnsemble):
        super().__init__()
        self.student = torch.nn.Linear(3, 3)
        self.teachers = teachers


def test_teachers_are_frozen_and_never_in_a_checkpoint(tiny_sd_dir, cache_dir, nd_sd_dir):
    sd = sd_teacher(tiny_sd_dir, cache_dir)
    nd = nd_teacher(nd_sd_dir, cache_dir)
    module = ToyPRDModule(TeacherEnsemble({"sd": sd, "nd": nd}))
    render = make_render()
    module.teachers(render, PROMPTS, 0)
    assert sd.is_loaded and nd.is_loaded
    frozen = list(sd.frozen_parameters()) + list(nd.frozen_parameters())
    assert len(frozen) > 100 and not any(p.requires_grad for p in frozen)
    assert set(module.state_dict()) == {"student.weight", "student.bias"}
    assert [name for name, _ in module.named_parameters()] == ["student.weight", "student.bias"]
    assert not list(module.buffers())
    module.train()
    assert not any(m.training for t in (sd, nd) for m in t.frozen.values())
    module.half()  # the parent's casts do not reach the teachers' weights
    assert next(sd.frozen["unet"].parameters()).dtype == torch.float32
    module.float()
    module.load_state_dict(module.state_dict(), strict=True)


class MoveRecorder(torch.nn.Module):
    """A stand-in frozen model that records every `.to(device)`."""

    def __init__(self):
        super().__init__()
        self.moves = []

    def to(self, *args, **kwargs):
        self.moves.append(str(args[0]))
        return self


class OffloadProbe(Teacher):
    """A teacher whose frozen model records where it is moved (`moves_during_call`: before the loss)."""

    def load(self):
        self.frozen = {"model": MoveRecorder()}

    def compute_losses(self, renders, prompts, step, generator):
        self.moves_during_call = list(self.frozen["model"].moves)
        return [(renders[0]["rgb"] ** 2).sum()]


def test_offload_moves_models_to_the_render_device_and_back():
    for offload, expected in ((True, ["cpu", "cpu"]), (False, ["cpu"])):
        probe = OffloadProbe(offload=offload)
        with torch.no_grad():  # nothing to wait for (see the next test for the backward case)
            probe(make_render(), PROMPTS, 0)
        assert probe.moves_during_call == ["cpu"]  # the render's device, before the call
        assert probe.frozen["model"].moves == expected  # back to the CPU after it only with offload


# ---------------------------------------------------------------------------------------------
# Multi-view teachers on the reference fixtures


def test_mvdream_camera_vectors_match_the_fixture(mv_sd_dir, cache_dir):
    cameras, expected = fixture_cameras(MV_FIXTURE)
    got = mv_teacher(mv_sd_dir, cache_dir).camera_condition(cameras)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["rel_x2", "abs"])
def test_richdreamer_camera_vectors_match_the_fixture(nd_sd_dir, cache_dir, mode):
    cameras, expected = fixture_cameras(ND_FIXTURE)
    got = nd_teacher(nd_sd_dir, cache_dir, camera_distance=mode).camera_condition(cameras)
    if mode == "rel_x2":
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    else:  # "abs" writes the absolute distance: same rotation, longer translation
        view = got.view(-1, 4, 4)
        torch.testing.assert_close(view[:, :3, :3], expected.view(-1, 4, 4)[:, :3, :3], atol=1e-5, rtol=0)
        torch.testing.assert_close(view[:, :3, 3].norm(dim=-1), cameras.distance.flatten(), atol=1e-5, rtol=0)


def clip_text_embeddings(sd_dir, prompts: list[str]) -> torch.Tensor:
    """`last_hidden_state` [B, 77, D] of the SD directory's CLIP text encoder, straight from transformers
    (the conditioning of the reference guidance), not through the project's prompt processor / cache."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(sd_dir, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(sd_dir, subfolder="text_encoder").eval()
    ids = tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return encoder(ids).last_hidden_state


def fixture_render(fixture, size: int, seed: int = 0):
    """A random 2 objects x 4 views render seen by the fixture's cameras, and the camera vectors the
    ORIGINAL code fed its UNet for those cameras (inputs.safetensors "camera")."""
    cameras, vectors = fixture_cameras(fixture)
    return make_render(size=size, seed=seed, cameras=resized(cameras, size, size)), vectors


def fixture_alphas_cumprod(fixture) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(fixture / "expected.safetensors"))["alphas_cumprod"]


def independent_multiview_grad(teacher, x, text, camera, abar, cfg_scale, concat=None):
    """The teacher's gradient recomputed with direct UNet calls from its last timesteps / noise and
    independently built conditioning: text = (cond, uncond) [B, 77, D] from `clip_text_embeddings`, the
    fixture's camera vectors [B * 4, 16], the fixture's alphas_cumprod and a hand-evaluated CFG scale
    (ASD with "dmd" weighting, eps 0.1: x0 estimates from the clean latent, normalised by mean |x - x0_cfg|)."""
    out = teacher.last_output
    unet = teacher.frozen["unet"]
    cond, uncond = (e.repeat_interleave(4, 0) for e in text)
    t, t_plus, noise = out.timesteps, out.timesteps_plus, out.noise
    a, s = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
    x_t = a * x + s * noise
    extra = {} if concat is None else {"concat": concat}
    with torch.no_grad():
        eps_c = unet(x_t, t, cond, camera, num_frames=4, **extra)
        eps_u = unet(x_t, t, uncond, camera, num_frames=4, **extra)
        if t_plus is None:
            eps_2nd = eps_c
        else:
            ap, sp = abar[t_plus].sqrt().view(-1, 1, 1, 1), (1 - abar[t_plus]).sqrt().view(-1, 1, 1, 1)
            eps_2nd = unet(ap * x + sp * noise, t_plus, cond, camera, num_frames=4, **extra)
    eps_cfg = eps_u + cfg_scale * (eps_c - eps_u)
    x0_cfg, x0_2nd = (x - s * eps_cfg) / a, (x - s * eps_2nd) / a
    w = (x - x0_cfg).abs().mean(dim=(1, 2, 3), keepdim=True)
    return (x0_2nd - x0_cfg) / (w + 0.1)


def test_mvdream_fixture_teacher_gradient(mv_sd_dir, cache_dir):
    teacher = mv_teacher(mv_sd_dir, cache_dir, sample_posterior=False)
    render, camera = fixture_render(MV_FIXTURE, size=20)
    step = 10000
    loss = teacher(render, PROMPTS, step, torch.Generator().manual_seed(2))["mvdream"]
    assert teacher.objective.cfg_scale(step) == pytest.approx(15.0)  # CFG 20 -> 10 over 20k steps
    t = teacher.last_output.timesteps.view(2, 4)
    assert (t == t[:, :1]).all() and teacher.last_output.timesteps_plus is None  # one t per object
    loss.backward()
    assert nonzero_views(render["rgb"].grad).all()  # every view of every object
    x = encode_rgb(
        teacher.frozen["vae"], render["rgb"].detach().flatten(0, 1), teacher.resolution, False, None
    )
    assert x.shape[-1] == unet_params(MV_FIXTURE)["image_size"]
    text = (
        clip_text_embeddings(mv_sd_dir, PROMPTS),
        clip_text_embeddings(mv_sd_dir, [teacher.negative_prompt] * 2),
    )
    abar = fixture_alphas_cumprod(MV_FIXTURE)
    expected = independent_multiview_grad(teacher, x, text, camera, abar, cfg_scale=15.0)  # halfway 20 -> 10
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(teacher.last_output.grad, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss.detach(), 0.5 * expected.square().sum() / 4, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("minus_one_one", [False, True])
def test_richdreamer_fixture_teacher_gradient(nd_sd_dir, cache_dir, minus_one_one):
    teacher = nd_teacher(nd_sd_dir, cache_dir, map_to_minus_one_one=minus_one_one)
    render, camera = fixture_render(ND_FIXTURE, size=24)
    loss = teacher(render, PROMPTS, 0, torch.Generator().manual_seed(3))["richdreamer_nd"]
    assert teacher.last_output.timesteps_plus is not None  # asd with plus_ratio 0.1
    loss.backward()
    size = unet_params(ND_FIXTURE)["image_size"]
    maps = torch.cat([render["normal"].detach(), render["disparity"].detach()], dim=2).flatten(0, 1)
    x = F.adaptive_avg_pool2d(maps, size)
    x = 2 * x - 1 if minus_one_one else x
    text = (
        clip_text_embeddings(nd_sd_dir, PROMPTS),
        clip_text_embeddings(nd_sd_dir, [teacher.negative_prompt] * 2),
    )
    abar = fixture_alphas_cumprod(ND_FIXTURE)
    expected = independent_multiview_grad(teacher, x, text, camera, abar, cfg_scale=20.0)
    torch.testing.assert_close(teacher.last_output.grad, expected, atol=1e-4, rtol=1e-4)
    # d loss / d maps = pooling VJP of the teacher's grad / 4 views (times 2 for the [-1, 1] mapping);
    # the teacher's grad itself was compared with the independent one above.
    maps_leaf = maps.clone().requires_grad_(True)
    pooled = F.adaptive_avg_pool2d(maps_leaf, size) * (2 if minus_one_one else 1)
    (expected_maps,) = torch.autograd.grad(pooled, maps_leaf, teacher.last_output.grad / 4)
    got = torch.cat([render["normal"].grad, render["disparity"].grad], dim=2).flatten(0, 1)
    torch.testing.assert_close(got, expected_maps, atol=1e-6, rtol=1e-4)
    assert render["rgb"].grad is None


@pytest.fixture(scope="module")
def albedo_checkpoint(tmp_path_factory):
    """A tiny random RichDreamer-albedo-like model: the MVDream fixture's sizes, 5 input channels
    (4 latent + disparity through `concat`), conditioning_key hybrid; original-layout checkpoint + yaml."""
    import yaml

    from teachers.multiview_unet import MultiViewUNet

    directory = tmp_path_factory.mktemp("albedo")
    config = yaml.safe_load((MV_FIXTURE / "config.yaml").read_text())
    config["model"]["params"].update(conditioning_key="hybrid", cond_method="cat_d")
    config["model"]["params"]["unet_config"]["params"]["in_channels"] = 5
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    model = MultiViewUNet.from_original_config(directory / "config.yaml")
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    torch.save({"state_dict": model.original_state_dict()}, directory / "albedo_mv_ema.ckpt")
    return directory


def test_richdreamer_albedo_teacher_uses_disparity_as_a_condition(mv_sd_dir, cache_dir, albedo_checkpoint):
    teacher = RichDreamerAlbedoTeacher(
        ckpt_path=str(albedo_checkpoint / "albedo_mv_ema.ckpt"),
        config_path=str(albedo_checkpoint / "config.yaml"),
        vae=str(mv_sd_dir),
        text_encoder=str(mv_sd_dir),
        resolution=unet_params(MV_FIXTURE)["image_size"] * vae_factor(mv_sd_dir),
        sample_posterior=False,
        prompt_cache_dir=cache_dir,
        text_encoder_device="cpu",
    )
    render, camera = fixture_render(ND_FIXTURE, size=20)  # same camera convention as the ND model
    loss = teacher(render, PROMPTS, 0, torch.Generator().manual_seed(4))["richdreamer_albedo"]
    loss.backward()
    assert nonzero_views(render["rgb"].grad).all()
    assert render["disparity"].grad is None  # a condition, not distilled
    x = encode_rgb(
        teacher.frozen["vae"], render["rgb"].detach().flatten(0, 1), teacher.resolution, False, None
    )
    disparity = render["disparity"].detach().flatten(0, 1)
    concat = F.interpolate(2 * disparity - 1, size=x.shape[-2:], mode="nearest")
    text = (
        clip_text_embeddings(mv_sd_dir, PROMPTS),
        clip_text_embeddings(mv_sd_dir, [teacher.negative_prompt] * 2),
    )
    abar = fixture_alphas_cumprod(
        MV_FIXTURE
    )  # the albedo yaml is the MVDream fixture's with 5 input channels
    expected = independent_multiview_grad(teacher, x, text, camera, abar, 20.0, concat=concat)
    torch.testing.assert_close(teacher.last_output.grad, expected, atol=1e-4, rtol=1e-4)
    without_depth = independent_multiview_grad(
        teacher, x, text, camera, abar, 20.0, concat=torch.zeros_like(concat)
    )
    assert (without_depth - expected).abs().max() > 1e-3  # the disparity channel matters
    cameras, nd_vectors = fixture_cameras(ND_FIXTURE)  # same camera convention as the ND model
    torch.testing.assert_close(teacher.camera_condition(cameras), nd_vectors, atol=1e-5, rtol=0)


def test_multiview_teacher_in_bfloat16(nd_sd_dir, cache_dir):
    teacher = nd_teacher(nd_sd_dir, cache_dir, dtype="bfloat16")
    render = make_render()
    loss = teacher(render, PROMPTS, 0, torch.Generator().manual_seed(0))["richdreamer_nd"]
    assert next(teacher.frozen_parameters()).dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    for name in ("normal", "disparity"):
        grad = render[name].grad
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_multiview_teachers_accept_two_renders(mv_sd_dir, cache_dir):
    teacher = mv_teacher(mv_sd_dir, cache_dir)
    mesh, volume = make_render(renderer="mesh"), make_render(size=14, renderer="volume", seed=5)
    losses = teacher([mesh, volume], PROMPTS, 0, torch.Generator().manual_seed(0))
    assert set(losses) == {"mvdream/mesh", "mvdream/volume"}
    sum(losses.values()).backward()
    assert nonzero_views(mesh["rgb"].grad).all() and nonzero_views(volume["rgb"].grad).all()
    assert teacher.last_output.timesteps.shape == (16,)  # both renders in one teacher batch


# ---------------------------------------------------------------------------------------------
# Missing weights


def test_missing_weights_are_one_line_errors_with_fetch_instructions(tmp_path, cache_dir, tiny_sd_dir):
    cases = [
        (
            MVDreamTeacher(ckpt_path=str(tmp_path / "sd-v2.1-base-4view.pt"), prompt_cache_dir=cache_dir),
            ["sd-v2.1-base-4view.pt", "MVDream/MVDream", "hf download"],
        ),
        (
            RichDreamerNormalDepthTeacher(
                ckpt_path=str(tmp_path / "nd_mv_ema.ckpt"), prompt_cache_dir=cache_dir
            ),
            ["nd_mv_ema.ckpt", "Normal-Depth-Diffusion-Model", "wget"],
        ),
        (
            RichDreamerAlbedoTeacher(
                ckpt_path=str(tmp_path / "albedo_mv_ema.ckpt"), prompt_cache_dir=cache_dir
            ),
            ["albedo_mv_ema.ckpt", "Normal-Depth-Diffusion-Model", "wget"],
        ),
        (
            StableDiffusionTeacher(
                pretrained=str(tmp_path / "stable-diffusion-2-1-base"), prompt_cache_dir=cache_dir
            ),
            ["stable-diffusion-2-1-base", "hf download"],
        ),
    ]
    for teacher, needles in cases:
        with pytest.raises(TeacherWeightsNotFoundError) as info:
            teacher(make_render(leaf=False), PROMPTS, 0)
        message = str(info.value)
        assert "\n" not in message, message
        for needle in needles:
            assert needle in message, (needle, message)
    from renderers.errors import UserError

    assert issubclass(TeacherWeightsNotFoundError, UserError) and issubclass(
        TeacherWeightsNotFoundError, FileNotFoundError
    )


def _all_local_teachers(sd: str, folder, **change) -> TeacherEnsemble:
    """The full recipe's three teachers with every weight local (tiny SD, stand-in checkpoint files), then
    `change` ("teacher__argument" -> value) applied."""
    (folder / "4view.pt").write_bytes(b"stand-in")
    (folder / "nd.ckpt").write_bytes(b"stand-in")
    args = {
        "mvdream": {"ckpt_path": str(folder / "4view.pt"), "vae": sd, "text_encoder": sd},
        "richdreamer_nd": {"ckpt_path": str(folder / "nd.ckpt"), "text_encoder": sd},
        "stable_diffusion": {"pretrained": sd},
    }
    for key, value in change.items():
        teacher, argument = key.split("__")
        args[teacher][argument] = value
    return TeacherEnsemble({
        "mvdream": MVDreamTeacher(**args["mvdream"]),
        "richdreamer_nd": RichDreamerNormalDepthTeacher(**args["richdreamer_nd"]),
        "stable_diffusion": StableDiffusionTeacher(**args["stable_diffusion"]),
    })


WEIGHT_CHECK_CASES = [
    # (case, change of the all-local teachers ({tmp}: a folder), expected words of the one-line message)
    ("mvdream checkpoint missing, hub id not cached", {"mvdream__ckpt_path": "{tmp}/sd-v2.1-base-4view.ckpt"},
     ["MVDream checkpoint", "sd-v2.1-base-4view.ckpt", "hub id 'MVDream/MVDream' is not in the local cache",
      "hf download MVDream/MVDream sd-v2.1-base-4view.pt"]),
    ("mvdream config_path missing", {"mvdream__config_path": "{tmp}/sd-v2-base.yaml"}, ["config_path", "sd-v2-base.yaml"]),
    ("mvdream vae folder missing", {"mvdream__vae": "{tmp}/no_vae"}, ["mvdream VAE", "no_vae", "does not exist", "hf download"]),
    ("richdreamer checkpoint missing", {"richdreamer_nd__ckpt_path": "{tmp}/nd_mv_ema.ckpt"}, ["nd_mv_ema.ckpt", "wget"]),
    ("text encoder hub id not cached", {"richdreamer_nd__text_encoder": "stable-diffusion-v1-5/stable-diffusion-v1-5"},
     ["richdreamer_nd text encoder", "hub id 'stable-diffusion-v1-5/stable-diffusion-v1-5' is not in the local cache",
      "text_encoder/config.json", "hf download stable-diffusion-v1-5/stable-diffusion-v1-5"]),
    ("sd hub id not cached", {"stable_diffusion__pretrained": "stabilityai/stable-diffusion-2-1-base"},
     ["stable_diffusion Stable Diffusion", "'stabilityai/stable-diffusion-2-1-base' is not in the local cache",
      "unet/config.json", "hf download stabilityai/stable-diffusion-2-1-base"]),
    ("sd folder without weights", {"stable_diffusion__pretrained": "{tmp}"},
     ["stable_diffusion Stable Diffusion", "lacks unet/config.json", "hf download"]),
]


@pytest.mark.parametrize("case, change, words", WEIGHT_CHECK_CASES, ids=[c[0] for c in WEIGHT_CHECK_CASES])
def test_weight_checks_name_what_is_missing_without_loading(case, change, words, tmp_path, tiny_sd_dir, empty_hub_cache):
    """`check_weights` (what `prd fit` runs before any work): local files or folders that are not there, and hub ids
    not in the cache (HF_HUB_OFFLINE=1), each one line naming them and how to fetch them; nothing loads."""
    teachers = _all_local_teachers(str(tiny_sd_dir), tmp_path, **{k: v.replace("{tmp}", str(tmp_path)) for k, v in change.items()})
    with pytest.raises(TeacherWeightsNotFoundError) as info:
        teachers.check_weights()
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, (word, message)
    assert not any(teacher.is_loaded for teacher in teachers.teachers.values())


def test_weight_checks_pass_for_local_cached_or_downloadable_weights(tmp_path, tiny_sd_dir, empty_hub_cache, monkeypatch):
    """No false alarm: all-local weights pass; so does a hub id whose file is in the cache; and with the hub
    reachable (HF_HUB_OFFLINE unset) a hub id not in the cache is left to the loader, which downloads it."""
    from huggingface_hub import constants

    from tests.teacher_helpers import put_in_hub_cache

    _all_local_teachers(str(tiny_sd_dir), tmp_path).check_weights()
    put_in_hub_cache(empty_hub_cache, "MVDream/MVDream", "sd-v2.1-base-4view.pt")
    _all_local_teachers(str(tiny_sd_dir), tmp_path, mvdream__ckpt_path=str(tmp_path / "not_here.pt")).check_weights()
    hub_ids = {"mvdream__hub_id": "someone/elsewhere", "mvdream__ckpt_path": str(tmp_path / "not_here.pt"),
               "stable_diffusion__pretrained": "stabilityai/stable-diffusion-2-1-base"}
    with pytest.raises(TeacherWeightsNotFoundError):
        _all_local_teachers(str(tiny_sd_dir), tmp_path, **hub_ids).check_weights()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    _all_local_teachers(str(tiny_sd_dir), tmp_path, **hub_ids).check_weights()  # never reaches the network
    with pytest.raises(TeacherWeightsNotFoundError, match="does not exist"):  # a local path is checked online too
        _all_local_teachers(str(tiny_sd_dir), tmp_path, mvdream__vae=str(tmp_path / "no_vae")).check_weights()


def test_offload_waits_for_the_backward_that_still_needs_the_weights():
    """`Module.to` swaps parameter storage, so weights used by the backward (e.g. a VAE encoder on the
    render path) may only leave the device once the gradients of the teacher's inputs are complete."""
    probe = OffloadProbe(offload=True)
    render = make_render()
    leaf = render.images["rgb"].detach().requires_grad_(True)
    render.images["rgb"] = leaf * 1.0
    loss = probe(render, PROMPTS, 0)[probe.name]
    assert probe.frozen["model"].moves == ["cpu"]  # still on the render's device: backward pending
    loss.backward()
    assert probe.frozen["model"].moves == ["cpu", "cpu"] and leaf.grad is not None
    with torch.no_grad():  # no backward to wait for: offloaded at once
        probe(make_render(), PROMPTS, 0)
    assert probe.frozen["model"].moves == ["cpu", "cpu", "cpu", "cpu"]
