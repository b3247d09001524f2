"""Random-weight stand-ins, at the true architecture sizes (or a reduced width), for every network of a
TriplaneTurbo v1 PRD run: the student (SD 2.1-base UNet, VAE decoder, text encoder + adapters), the SD 2.1
teacher (UNet, VAE encoder), MVDream (multi-view UNet of its bundled yaml + SD 2.1 VAE encoder), RichDreamer
normal-depth (multi-view UNet of its bundled yaml) and the teachers' text encoders (SD 2.1: 1024-d, 23 layers;
SD 1.5: 768-d, 12 layers). Nothing is downloaded; the tokenizer is the small real CLIP BPE of the test fixtures.

`width` multiplies every channel count (UNet base channels 320 -> 64 x round(5 w), VAE 128 -> 32 x round(4 w),
text widths 1024 / 768 -> 64 x round(16 w) / 64 x round(12 w), heads of 64 channels), depth and resolutions
unchanged: width 1 is the true size; width 0.2 runs a whole v1 optimizer step on a laptop CPU in about a
minute, to follow ratios between configs without a GPU (attention and renderer costs do not shrink with width,
so the ratios are indicative, not the GPU's).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml

from lightning_modules.student.sd_configs import (
    SD21_BASE_TEXT_ENCODER_CONFIG,
    SD21_BASE_UNET_CONFIG,
    SD21_BASE_VAE_CONFIG,
)

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "reference" / "triplaneturbo_ref_A" / "base" / "tokenizer"
# SD 2.1-base's scheduler (public): scaled-linear betas 0.00085 -> 0.012 over 1000 steps, epsilon prediction.
SD21_BASE_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)  # fmt: skip
SD15_TEXT_LAYERS = 12  # CLIP ViT-L/14 text tower (768-d)


def unet_channels(width: float) -> int:
    return 64 * max(1, round(5 * width))


def vae_channels(width: float) -> int:
    return 32 * max(1, round(4 * width))


def text_width(full: int, width: float) -> int:
    return 64 * max(1, round(full / 64 * width))


def sd21_unet_config(width: float) -> dict:
    base = unet_channels(width)
    config = dict(SD21_BASE_UNET_CONFIG)
    config["block_out_channels"] = [base * m for m in (1, 2, 4, 4)]
    config["attention_head_dim"] = [base * m // 64 for m in (1, 2, 4, 4)]  # diffusers' SD 2 naming: head count
    config["cross_attention_dim"] = text_width(1024, width)
    return config


def sd21_vae_config(width: float) -> dict:
    base = vae_channels(width)
    return dict(SD21_BASE_VAE_CONFIG, block_out_channels=[base * m for m in (1, 2, 4, 4)])


def text_encoder(full_width: int, layers: int, width: float):
    """Random CLIP text tower of `layers` layers and width `text_width(full_width, width)`, float32, frozen."""
    from transformers import CLIPTextConfig, CLIPTextModel

    hidden = text_width(full_width, width)
    config = dict(SD21_BASE_TEXT_ENCODER_CONFIG, hidden_size=hidden, intermediate_size=4 * hidden,
                  num_hidden_layers=layers, num_attention_heads=hidden // 64)  # fmt: skip
    return CLIPTextModel(CLIPTextConfig(**config)).eval().requires_grad_(False)


def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOKENIZER)


def random_student(width: float, config=None, seed: int = 0):
    """TriplaneStudent on SD 2.1-base's architecture at `width` with random weights (float32, CPU). Zero-initialised
    adapter up-projections get small random values, so that gradients reach every adapter."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from lightning_modules.student import TriplaneStudent

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**sd21_unet_config(width))
    vae = AutoencoderKL(**sd21_vae_config(width))
    student = TriplaneStudent(unet, vae, text_encoder(1024, 23, width), tokenizer(), config=config)
    with torch.no_grad():
        for p in student.trainable_parameters():
            if p.abs().max() == 0:
                p.normal_(0, 1e-3)
    return student


def multiview_unet(config_name: str, width: float, context_full: int):
    """`MultiViewUNet` of the bundled yaml `teachers/configs/<config_name>` at `width`, random weights."""
    from teachers.multiview_unet import CONFIG_DIR, MultiViewUNet

    config = yaml.safe_load((Path(CONFIG_DIR) / config_name).read_text())
    config = copy.deepcopy(config)
    params = config["model"]["params"]["unet_config"]["params"]
    params["model_channels"] = unet_channels(width)
    params["context_dim"] = text_width(context_full, width)
    return MultiViewUNet.from_original_config(config)


def install_random_teacher(teacher, width: float, seed: int = 0) -> None:
    """Give `teacher` (SD, MVDream or RichDreamer normal-depth) random frozen models of its true architecture at
    `width`, through the same install path as its pretrained weights (`use_models` / `use_unet` / `use_vae`)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from teachers.mvdream import MVDreamTeacher
    from teachers.richdreamer import RichDreamerNormalDepthTeacher
    from teachers.stable_diffusion import StableDiffusionTeacher

    torch.manual_seed(seed)
    if isinstance(teacher, StableDiffusionTeacher):
        scheduler = DDPMScheduler(**{k: v for k, v in SD21_BASE_SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one",)})
        teacher.use_models(UNet2DConditionModel(**sd21_unet_config(width)), AutoencoderKL(**sd21_vae_config(width)), scheduler)
    elif isinstance(teacher, MVDreamTeacher):
        teacher.use_unet(multiview_unet("mvdream_sd21_base_4view.yaml", width, 1024))
        teacher.use_vae(AutoencoderKL(**sd21_vae_config(width)))
    elif isinstance(teacher, RichDreamerNormalDepthTeacher):
        teacher.use_unet(multiview_unet("richdreamer_nd_mv.yaml", width, 768))
    else:
        raise TypeError(f"no random-weight stand-in for {type(teacher).__name__}")


def install_random_text_encoders(teachers, width: float) -> None:
    """A random text encoder (SD 2.1's for 1024-d teachers, SD 1.5's for 768-d ones) in every teacher's prompt
    processor that has none yet (a shared one, e.g. the student's, is kept); memory cache only, no disk."""
    for teacher in teachers.teachers.values():
        processor = teacher.prompt_processor
        processor.disk_cache = False
        full = 768 if "v1-5" in teacher.text_encoder else 1024
        processor._key = f"random-{full}-w{width}"
        if processor._text_encoder is None:
            encoder = text_encoder(full, SD15_TEXT_LAYERS if full == 768 else 23, width)
            processor.use_encoder(encoder.to(processor._encoder_device()), tokenizer())
