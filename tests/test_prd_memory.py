"""The memory switches of PRD training (configs/triplaneturbo_v1_24gb.yaml, README "Training on 24 GB"): the exact
ones change no gradient (gradient checkpointing, attention kernels, shared teacher weights and text encoder), the
precision trades change it by a bounded amount (bf16 teachers, bf16 autocast of the student), offloading counts
the bytes it moves."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_modules.student import TriplaneStudent
from lightning_modules.training.settings import TrainingSettingsError, resolve_student_config
from teachers.ensemble import TeacherEnsemble
from teachers.stable_diffusion import StableDiffusionTeacher, load_vae
from tests.prd_helpers import TINY_STUDENT, tiny_module
from tests.teacher_helpers import make_render
from tests.threads import single_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

# Half-precision teacher weights and activations (the loss and its gradient still float32): relative L2 change of
# the SD teacher's image gradient, measured on this test's seeded tiny teacher on the CPU: bfloat16 6.3 %, float16
# 0.8 % (ASD / dmd: a difference of two noise predictions, so rounding is amplified). Bounds leave room for other
# CPUs' kernels.
HALF_TEACHER_GRAD_RTOL = {"bfloat16": 0.10, "float16": 0.02}
# bf16 autocast of the student's UNet and VAE decoder: relative L2 change of the trainable gradient (measured 0.21 %).
BF16_STUDENT_GRAD_RTOL = 0.01


def tiny_student(tiny_sd_dir, dtype=torch.float64) -> TriplaneStudent:
    torch.manual_seed(0)
    student = TriplaneStudent.from_pretrained(tiny_sd_dir, config=resolve_student_config(dict(TINY_STUDENT)))
    with torch.no_grad():  # the zero-initialised up-projections get values, so every adapter has a gradient
        for p in student.trainable_parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.1)
    return student.to(dtype).train()


def student_gradients(student: TriplaneStudent) -> dict[str, torch.Tensor]:
    """Gradients of a loss on the student's triplanes after one PRD-style step (UNet -> x0 -> VAE decoder)."""
    generator = torch.Generator().manual_seed(1)
    text = student.encode_prompt(["a red ball"])
    noise = student.make_noise(1, generator=generator)
    x0 = student.predict_x0(student.add_noise(noise, student.make_noise(1, generator=generator), 749), 749, text)
    planes = student.decode(x0).planes
    weights = torch.linspace(-1, 1, planes.numel(), dtype=planes.dtype).view_as(planes)
    student.zero_grad(set_to_none=True)
    ((planes * weights).sum() + x0.square().mean()).backward()
    return {name: p.grad.clone() for name, p in student.named_parameters() if p.requires_grad and p.grad is not None}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_gradient_checkpointing_recomputes_and_changes_no_gradient(tiny_sd_dir):
    student = tiny_student(tiny_sd_dir)
    calls = {"unet": [], "decoder": []}
    for part, model in (("unet", student.unet), ("decoder", student.vae.decoder)):
        for name, module in model.named_modules():
            if type(module).__name__ == "ResnetBlock2D":
                module.register_forward_pre_hook(lambda *_, name=name, part=part: calls[part].append(name))
    plain = student_gradients(student)
    once = {part: len(names) for part, names in calls.items()}
    student.enable_gradient_checkpointing()
    checkpointed = student_gradients(student)
    for part, names in calls.items():  # the checkpointed blocks ran again in backward (pre-hooks: the recomputation
        # stops early, before a block's end, once it has what backward needs)
        assert once[part] > 0 and len(names) > 2 * once[part], part
    assert len(plain) > 10 and plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_every_attention_runs_through_sdpa_and_its_kernels_change_no_gradient(tiny_sd_dir):
    """No attention of the student (or of the multi-view teachers) falls back to diffusers' non-SDPA processors, so
    the configured kernel (`attention_backend`) is what runs; the math kernel against PyTorch's fused flash-attention
    CPU kernel, float64, over every attention of the student (joint 6-plane self-attention, cross-attention, VAE)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from lightning_modules.student.adapters import HexaPlaneSelfAttnProcessor
    from teachers.multiview_unet import MultiViewUNet
    from tests.teacher_helpers import MV_FIXTURE

    student = tiny_student(tiny_sd_dir)
    multiview = MultiViewUNet.from_original_config(MV_FIXTURE / "config.yaml")
    for model in (student.unet, student.vae, multiview.unet):
        processors = list(model.attn_processors.values())
        assert processors and all(isinstance(p, (AttnProcessor2_0, HexaPlaneSelfAttnProcessor)) for p in processors)
    assert sum(isinstance(p, HexaPlaneSelfAttnProcessor) for p in student.unet.attn_processors.values()) > 0

    with sdpa_kernel([SDPBackend.MATH]):
        math_kernel = student_gradients(student)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        flash = student_gradients(student)
    for name, grad in math_kernel.items():
        torch.testing.assert_close(flash[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_attention_backend_switch_is_applied(tiny_sd_dir, monkeypatch):
    module = tiny_module(tiny_sd_dir, attention_backend="efficient")  # a CUDA kernel: no CPU attention may run

    def attend(*args, **kwargs):
        q = torch.zeros(1, 1, 4, 8)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    monkeypatch.setattr(module, "_require_student", attend)  # the batch's first call: under the kernel choice
    with pytest.raises(RuntimeError, match="No viable backend|No available kernel"):
        module.run_prd_batch({"prompts": ["a red ball"], "seed": 0}, step=0)
    assert tiny_module(tiny_sd_dir).attention_backends is None
    with pytest.raises(TrainingSettingsError, match="attention_backend"):
        tiny_module(tiny_sd_dir, attention_backend="fastest")


def test_bf16_student_autocast_keeps_float32_weights_and_bounds_the_gradient(tiny_sd_dir):
    student = tiny_student(tiny_sd_dir, torch.float32)
    plain = student_gradients(student)
    student.set_autocast(torch.bfloat16)
    autocast = student_gradients(student)
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert all(g.dtype == torch.float32 for g in autocast.values())
    flat = torch.cat([g.flatten() for g in plain.values()])
    flat_autocast = torch.cat([autocast[name].flatten() for name in plain])
    error = relative_error(flat_autocast, flat)
    assert 0 < error < BF16_STUDENT_GRAD_RTOL  # it did run in bf16, and stays close
    with pytest.raises(ValueError, match="autocast dtype"):
        student.set_autocast(torch.float64)


def sd_image_gradient(tiny_sd_dir, cache_dir, dtype: str) -> torch.Tensor:
    teacher = StableDiffusionTeacher(pretrained=str(tiny_sd_dir), resolution=16, prompt_cache_dir=cache_dir,
                                     text_encoder_device="cpu", dtype=dtype, views_per_object=None)  # fmt: skip
    render = make_render(batch=2, views=2, size=16, seed=3)
    loss = teacher(render, ["a red ball", "a blue cube"], step=0, generator=torch.Generator().manual_seed(5))["stable_diffusion"]
    loss.backward()
    return render.images["rgb"].grad


def test_half_precision_teacher_gradient_stays_within_its_stated_bound(tiny_sd_dir, tmp_path):
    reference = sd_image_gradient(tiny_sd_dir, str(tmp_path), "float32")
    assert reference.abs().max() > 0
    for dtype, bound in HALF_TEACHER_GRAD_RTOL.items():
        half = sd_image_gradient(tiny_sd_dir, str(tmp_path), dtype)
        assert half.dtype == torch.float32
        assert 0 < relative_error(half, reference) < bound, dtype


def test_teachers_share_identical_frozen_models_with_the_same_losses(tiny_sd_dir, tmp_path):
    def ensemble(share: bool) -> TeacherEnsemble:
        options = dict(pretrained=str(tiny_sd_dir), resolution=16, prompt_cache_dir=str(tmp_path), text_encoder_device="cpu")
        return TeacherEnsemble({"a": StableDiffusionTeacher(**options), "b": StableDiffusionTeacher(**options, cfg_scale=3.0)},
                               share_weights=share)  # fmt: skip

    losses = {}
    for share in (False, True):
        teachers = ensemble(share)
        render = make_render(batch=1, views=2, size=16, seed=1)
        losses[share] = teachers(render, ["a red ball"], step=0, generator=torch.Generator().manual_seed(2))
        a, b = teachers.teachers["a"], teachers.teachers["b"]
        assert (a.frozen["vae"] is b.frozen["vae"]) == share and (a.frozen["unet"] is b.frozen["unet"]) == share
    assert losses[True].keys() == losses[False].keys()
    for key, value in losses[False].items():
        torch.testing.assert_close(losses[True][key], value, rtol=0, atol=0)

    # MVDream's VAE is SD 2.1's: one key for both when the source, dtype and options agree
    from teachers.mvdream import MVDreamTeacher

    mvdream = MVDreamTeacher(ckpt_path="unused.pt", hub_id=None, vae=str(tiny_sd_dir), text_encoder=str(tiny_sd_dir))
    mvdream.use_vae(load_vae(str(tiny_sd_dir), torch.float32))
    assert mvdream.frozen_sources["vae"] == teachers.teachers["a"].frozen_sources["vae"]


def test_student_text_encoder_is_shared_with_teachers_of_the_same_base(tiny_sd_dir, tmp_path):
    def teacher():
        return StableDiffusionTeacher(pretrained=str(tiny_sd_dir), resolution=16, prompt_cache_dir=str(tmp_path / "cache"),
                                      text_encoder_device="cpu")  # fmt: skip

    shared = tiny_module(tiny_sd_dir, teachers={"sd": teacher()})
    shared.configure_model()
    processor = shared.teachers.teachers["sd"].prompt_processor
    assert processor._text_encoder is shared.student.text_encoder
    own = teacher().prompt_processor.__class__(str(tiny_sd_dir), disk_cache=False, device="cpu")
    prompts = ["a red ball", "a chair"]
    torch.testing.assert_close(processor.encode_uncached(prompts), own.encode_uncached(prompts), rtol=0, atol=0)
    assert own._text_encoder is not shared.student.text_encoder

    separate = tiny_module(tiny_sd_dir, teachers={"sd": teacher()}, share_text_encoder=False)
    separate.configure_model()
    assert separate.teachers.teachers["sd"].prompt_processor._text_encoder is not separate.student.text_encoder


def test_offloading_counts_the_bytes_it_moves(tiny_sd_dir, tmp_path):
    teacher = StableDiffusionTeacher(pretrained=str(tiny_sd_dir), resolution=16, prompt_cache_dir=str(tmp_path),
                                     text_encoder_device="cpu", offload=True)  # fmt: skip
    teacher.load()
    size = sum(t.numel() * t.element_size() for m in teacher.frozen.values() for t in [*m.parameters(), *m.buffers()])
    teacher(make_render(batch=1, views=2, size=16), ["a red ball"], step=0)
    assert teacher.bytes_moved == 0  # CPU -> CPU: nothing moves
    teacher._move_frozen("meta")  # any other device: every frozen byte is counted once per move
    assert teacher.bytes_moved == size
    teacher._move_frozen("meta")
    assert teacher.bytes_moved == size
