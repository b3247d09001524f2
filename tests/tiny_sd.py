"""Build tiny random-weight Stable Diffusion directories (diffusers layout) for tests.

Nothing here touches the network: the tokenizer is the real CLIP BPE tokenizer shipped with the
TriplaneTurbo fixture (692 tokens), every model is built from a config with seeded random weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
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
