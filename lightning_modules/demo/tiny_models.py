"""Tiny Stable Diffusion directories (diffusers layout) for tests and the CPU demo.

- `make_tiny_sd`: seeded random weights (tests).
- `build_demo_base`: the demo's base model, a tiny SD whose UNet is briefly pretrained as a
  text-conditioned denoiser (see its docstring for why a random UNet cannot stand in for SD there).

Nothing here touches the network: the tokenizer is the real CLIP BPE tokenizer shipped with the
TriplaneTurbo fixture in tests/fixtures (692 tokens), every model is built from a config.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from renderers.errors import UserError

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "reference"
FIXTURE_TOKENIZER = FIXTURES / "triplaneturbo_ref_A" / "base" / "tokenizer"
FIXTURE_SCHEDULER = FIXTURES / "triplaneturbo_ref_A" / "base" / "scheduler"


def tiny_unet_config(
    block_out_channels=(16, 32),
    layers_per_block: int = 1,
    cross_attention_dim: int = 32,
    heads=(2, 2),
    norm_num_groups: int = 8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    sample_size: int = 8,
) -> dict:
    """SD 2.x-style UNet config (linear projections, heads given as `attention_head_dim`)."""
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=layers_per_block,
        block_out_channels=list(block_out_channels),
        down_block_types=list(down_block_types),
        up_block_types=list(up_block_types),
        attention_head_dim=list(heads),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=norm_num_groups,
        use_linear_projection=True,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def tiny_vae_config(block_out_channels=(8, 16), layers_per_block: int = 1, norm_num_groups: int = 4) -> dict:
    n = len(block_out_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=layers_per_block,
        block_out_channels=list(block_out_channels),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        norm_num_groups=norm_num_groups,
        sample_size=32,
    )


def tiny_text_encoder_config(hidden_size: int = 32, layers: int = 2, heads: int = 4) -> dict:
    return dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=hidden_size,
        vocab_size=692,
        bos_token_id=690,
        eos_token_id=691,
        pad_token_id=0,
    )


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter a non-trivial seeded value (zero-initialised layers included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def make_tiny_sd(
    directory: str | Path,
    seed: int = 0,
    unet: dict | None = None,
    vae: dict | None = None,
    text_encoder: dict | None = None,
) -> Path:
    """Write a tiny SD pipeline (unet, vae, text_encoder, tokenizer, scheduler) to `directory`.

    The UNet's `cross_attention_dim` is forced to the text encoder's hidden size.
    Returns the directory, loadable with `StableDiffusionPipeline.from_pretrained(directory)`.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    te_cfg = tiny_text_encoder_config(**(text_encoder or {}))
    unet_cfg = tiny_unet_config(**(unet or {}))
    unet_cfg["cross_attention_dim"] = te_cfg["hidden_size"]
    vae_cfg = tiny_vae_config(**(vae or {}))

    torch.manual_seed(seed)
    unet_model = UNet2DConditionModel(**unet_cfg)
    _randomize(unet_model, seed + 1)
    unet_model.save_pretrained(directory / "unet")
    vae_model = AutoencoderKL(**vae_cfg)
    _randomize(vae_model, seed + 2)
    vae_model.save_pretrained(directory / "vae")
    te_model = CLIPTextModel(CLIPTextConfig(**te_cfg))
    _randomize(te_model, seed + 3)
    te_model.save_pretrained(directory / "text_encoder")
    shutil.copytree(FIXTURE_TOKENIZER, directory / "tokenizer", dirs_exist_ok=True)
    shutil.copytree(FIXTURE_SCHEDULER, directory / "scheduler", dirs_exist_ok=True)
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (directory / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return directory


DEMO_BASE_MARKER = "demo_base.json"
# The demo base's UNet as `build_demo_base` pretrains it with the demo's settings (`SHIPPED_DEMO_UNET_SETTINGS`),
# shipped like SD's weights are downloaded: the demo does not spend 80 s of its 4 minutes on it, and every
# machine starts from the same bits (pretraining in float32 on another CPU drifts in the last digits).
# `tests/test_demo.py` pretrains it anew and compares; `prd demo --pretrain-base` redoes it.
SHIPPED_DEMO_UNET = Path(__file__).with_name("demo_base_unet.safetensors")
SHIPPED_DEMO_UNET_SETTINGS = SHIPPED_DEMO_UNET.with_suffix(".json")


class DemoBaseExistsError(UserError):
    """The base folder holds something else than the base asked for (one-line message)."""

# The demo base's UNet: `tiny_unet_config` with its attention blocks at the 8 x 8 level instead of the 16 x 16
# one. The student's joint self-attention spans the 6 planes of an object (6 x 16 x 16 = 1536 tokens at the
# top level); at 8 x 8 it is 16x cheaper, and this attention was a third of a demo training step on the CPU.
DEMO_UNET = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def toy_latent_images(num_prompts: int, size: int, channels: int = 4, seed: int = 0) -> Tensor:
    """One smooth random latent image per prompt `[P, C, size, size]`, zero mean and unit std per channel
    (bicubic upsampling of a quarter-resolution Gaussian field)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_prompts, channels, max(size // 4, 1), max(size // 4, 1), generator=g)
    x = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)


def build_demo_base(
    directory: str | Path,
    prompts: list[str],
    latent_size: int = 16,
    steps: int = 600,
    timesteps: tuple[int, ...] = (999, 499),
    batch_size: int = 16,
    lr: float = 6e-3,
    seed: int = 0,
    unet: dict | None = DEMO_UNET,
    log: Callable[[str], None] | None = print,
    pretrain: bool = False,
) -> Path:
    """Write the CPU demo's base model to `directory`: reused when it was built with the same settings, never
    overwritten when it was built with others (`DemoBaseExistsError`: students trained on it need it as it is).

    A tiny SD (`make_tiny_sd` sizes) whose UNet is pretrained for `steps` AdamW steps as the denoiser of
    a toy text-to-latent distribution: prompt i's data is one fixed smooth random latent image
    (`toy_latent_images`), no shapes and nothing 3D. Loss: the x0 prediction's MSE at `timesteps` (those
    the student samples at: 999 and 499 for the demo's 2 steps), with the noise schedule of the scheduler
    config. `unet`: `tiny_unet_config` arguments (default `DEMO_UNET`). The
    global RNG state is left as it was. With the settings the shipped UNet was pretrained with
    (`SHIPPED_DEMO_UNET_SETTINGS`: the demo's), its weights are loaded instead of pretraining anew, unless
    `pretrain`.

    Why: the student relies on its base being a denoiser. A random UNet's x0 prediction at t = 999 is
    its input noise amplified ~15x (x0 = (x - sqrt(1 - abar) eps) / sqrt(abar), sqrt(abar) = 0.068), and
    the prompt changes the triplanes ~20x less than the noise does, so no few-minute PRD run can make
    it prompt-dependent. After this pretraining the sampled x0 is bounded and mostly set by the prompt,
    as with a real pretrained SD, and PRD has to learn only what it learns at full size: the 3D.
    Measured on the 2-step sampler's x0 (4 prompts x 6 noise seeds): the variance between prompts over the
    variance between seeds of one prompt is 1.0 after the former 300 steps at lr 3e-3 on 4 timesteps, 3.1
    after 600 steps at lr 6e-3 on the 2 sampled ones; PRD learns distinct shapes much sooner with the latter.
    """
    directory = Path(directory)
    settings = dict(
        prompts=list(prompts), latent_size=latent_size, steps=steps, timesteps=list(timesteps),
        batch_size=batch_size, lr=lr, seed=seed, unet=tiny_unet_config(**(unet or {})), version=2,
    )
    marker = directory / DEMO_BASE_MARKER
    if marker.exists():
        built = json.loads(marker.read_text())
        if built == settings:
            return directory
        changed = ", ".join(sorted(k for k in {*built, *settings} if built.get(k) != settings.get(k)))
        # students and checkpoints trained on it would silently stop matching a rebuilt base
        raise DemoBaseExistsError(
            f"{directory} holds a demo base built with other settings ({changed}); the students trained on it need "
            f"it as it is: name another folder (--model.init_args.base .demo/tiny_sd_2) or delete {directory}"
        )
    if directory.exists() and any(directory.iterdir()):
        raise DemoBaseExistsError(f"{directory} exists and is not a demo base: name an empty or new folder for it")
    # built beside it and renamed when complete: an interrupted build leaves no half-built base behind
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shipped = not pretrain and SHIPPED_DEMO_UNET.exists() and json.loads(SHIPPED_DEMO_UNET_SETTINGS.read_text()) == settings
    with torch.random.fork_rng():  # callers' seeded initialisations must not depend on whether we built
        make_tiny_sd(partial, seed=seed, unet=unet)
        if shipped:
            _load_shipped_unet(partial, log)
        else:
            _pretrain_demo_base(partial, prompts, latent_size, steps, timesteps, batch_size, lr, seed, log)
    (partial / DEMO_BASE_MARKER).write_text(json.dumps(settings, indent=2))
    if directory.exists():
        directory.rmdir()  # empty (checked above)
    partial.rename(directory)
    return directory


def _load_shipped_unet(directory: Path, log: Callable[[str], None] | None) -> None:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    unet = UNet2DConditionModel(**UNet2DConditionModel.load_config(directory / "unet"))
    unet.load_state_dict(load_file(SHIPPED_DEMO_UNET), strict=True)
    unet.eval().save_pretrained(directory / "unet")
    if log is not None:
        log(f"demo base: pretrained UNet loaded from {SHIPPED_DEMO_UNET.name} (--pretrain-base pretrains it here, ~80 s)")


def _pretrain_demo_base(directory, prompts, latent_size, steps, timesteps, batch_size, lr, seed, log) -> None:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(directory / "text_encoder").eval()
    scheduler = DDPMScheduler.from_pretrained(directory / "scheduler")
    with torch.no_grad():
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        embeddings = text_encoder(ids)[0]  # [P, 77, D], as TriplaneStudent.encode_prompt
    # diffusers' default initialisation trains faster here than make_tiny_sd's random weights
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNet2DConditionModel.load_config(directory / "unet"))
    data = toy_latent_images(len(prompts), latent_size, unet.config.in_channels, seed=seed)
    abar = scheduler.alphas_cumprod
    ts = torch.tensor(timesteps)
    g = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    unet.train()
    for step in range(steps):
        index = torch.randint(0, len(prompts), (batch_size,), generator=g)
        t = ts[torch.randint(0, len(ts), (batch_size,), generator=g)]
        x0 = data[index]
        noise = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        eps = unet(noisy, t, encoder_hidden_states=embeddings[index]).sample
        loss = F.mse_loss((noisy - (1 - a).sqrt() * eps) / a.sqrt(), x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log is not None and (step + 1) % 100 == 0:
            log(f"demo base: UNet pretraining step {step + 1}/{steps}, x0 MSE {loss.item():.3f}")
    unet.eval().save_pretrained(directory / "unet")
