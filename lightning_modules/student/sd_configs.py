"""Model configs of Stable Diffusion 2.1-base (public facts), for building the full-size architecture
without downloading weights (meta device for parameter counts, CPU random weights for benchmarks):

    with torch.device("meta"):
        unet, vae, text_encoder = build_sd21_base()
"""

from __future__ import annotations

SD21_BASE_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=1024,
    attention_head_dim=[5, 10, 20, 20],
    use_linear_projection=True,
    dual_cross_attention=False,
    only_cross_attention=False,
    upcast_attention=False,
)

SD21_BASE_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=768,
)

SD21_BASE_TEXT_ENCODER_CONFIG = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,
    vocab_size=49408,
)


def build_sd21_base(text_encoder: bool = True):
    """SD 2.1-base's UNet, VAE and CLIP text encoder (None with `text_encoder=False`) with random weights,
    on the current default device (e.g. inside `with torch.device("meta"):`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**SD21_BASE_UNET_CONFIG)
    vae = AutoencoderKL(**SD21_BASE_VAE_CONFIG)
    encoder = CLIPTextModel(CLIPTextConfig(**SD21_BASE_TEXT_ENCODER_CONFIG)) if text_encoder else None
    return unet, vae, encoder
