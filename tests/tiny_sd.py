"""Tiny random-weight Stable Diffusion directories for tests (re-exported from `lightning_modules.demo.tiny_models`)."""

from lightning_modules.demo.tiny_models import (  # noqa: F401
    FIXTURE_SCHEDULER,
    FIXTURE_TOKENIZER,
    FIXTURES,
    make_tiny_sd,
    tiny_text_encoder_config,
    tiny_unet_config,
    tiny_vae_config,
)
