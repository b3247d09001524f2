"""`TriplaneStudent`: Stable Diffusion's UNet and VAE decoder, adapted to turn noise into a triplane field.

    student = TriplaneStudent.from_pretrained(base, weights=None)
    emb = student.encode_prompt(["a red car"])                    # [B, 77, D]
    field = student.sample(emb, noise=noise, num_steps=4)         # noise [B, 6, 4, h, w]
    field.sdf(points); field.deformation(points); field.color(points)

Every object is 6 latent planes (xy_geo, xz_geo, yz_geo, xy_tex, xz_tex, yz_tex); in the UNet / VAE batch,
object b owns indices 6b .. 6b+5 and all its planes get object b's text embedding (interleaved).
Sampling is 4-step DDIM (eta 0) at 999, 749, 499, 249; the result is the x0 prediction of the last step,
decoded without the VAE scaling factor. Only the adapters, the new VAE conv_out and the MLPs train.

Precision: `student.set_precision(torch.bfloat16)` runs the networks (UNet, VAE decoder, text encoder) in half
precision while the latents between sampler steps, the DDIM arithmetic and the field (planes, MLPs, grid
coordinates, mesh vertices) stay in float32 (`latent_dtype`, `field_dtype`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_modules.student.adapters import (
    NUM_PLANES,
    adapters_disabled,
    add_triplane_adapters,
    is_adapter_parameter,
    merge_adapters,
)
from lightning_modules.student.config import StudentConfig, StudentWeightsError
from lightning_modules.student.triplane_field import TriplaneField, VanillaMLP
from lightning_modules.student.weights import (
    WEIGHTS_FILENAME,
    load_student_weights,
    resolve_base,
    resolve_weights,
    save_official_checkpoint,
    save_own_weights,
    training_checkpoint_config,
)

# The SD 2.1-base noise schedule, used when no scheduler config is given (e.g. models built on the meta device).
DEFAULT_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
}
_MLP_NAMES = ("sdf_network", "feature_network", "deformation_network")
_TRAINABLE_PREFIXES = tuple(f"{n}." for n in _MLP_NAMES) + ("vae.decoder.conv_out.",)


@dataclass
class SamplerTrace:
    """Per-step tensors of `TriplaneStudent.sample(..., return_intermediates=True)`, each `[B, 6, C, h, w]`."""

    timesteps: Tensor  # [K] int64
    eps: list[Tensor] = field(default_factory=list)
    x0: list[Tensor] = field(default_factory=list)
    prev_sample: list[Tensor] = field(default_factory=list)
    latents: Tensor | None = None  # = x0[-1], what is decoded


class TriplaneStudent(nn.Module):
    """The TriplaneTurbo generator: text embedding + 6 noise planes per object -> `TriplaneField`.

    Sub-modules: `unet` (diffusers UNet2DConditionModel with adapters), `vae` (AutoencoderKL without
    encoder; decoder with adapters and a new `conv_out`), `text_encoder` / `tokenizer` (optional, CLIP),
    `sdf_network`, `feature_network`, `deformation_network` (bias-free ReLU MLPs).
    Build it with `from_pretrained`, or from modules (e.g. on the meta device) with the constructor.

    A subclass brings another representation: it returns its own `renderers.types.Field` from `decode` and
    lists the names of any new trainable modules in `trainable_prefixes` (they then train, and are saved and
    loaded with the adapters).
    """

    # Parameter-name prefixes of what trains besides the adapters: the MLPs and the new VAE conv_out.
    trainable_prefixes: tuple[str, ...] = _TRAINABLE_PREFIXES

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module | None = None,
        tokenizer=None,
        scheduler_config: dict | None = None,
        config: StudentConfig | None = None,
    ):
        super().__init__()
        from diffusers import DDIMScheduler, DDPMScheduler

        self.config = config or StudentConfig()
        cfg = self.config
        if (
            unet.config.in_channels != cfg.latent_channels
            or vae.config.latent_channels != cfg.latent_channels
        ):
            raise StudentWeightsError(
                f"latent_channels {cfg.latent_channels} does not match the base model (UNet in_channels "
                f"{unet.config.in_channels}, VAE latent_channels {vae.config.latent_channels})"
            )
        # Decoder only: the encoder side of the VAE is never used.
        for name in ("encoder", "quant_conv"):
            if getattr(vae, name, None) is not None:
                delattr(vae, name)
                setattr(vae, name, None)
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        if text_encoder is not None:
            text_encoder.requires_grad_(False)
        add_triplane_adapters(unet, vae, cfg.ranks, cfg.output_dim)

        param = next(unet.parameters())
        geo_dim, tex_dim = cfg.field_config.feature_dims(cfg.output_dim)
        mlp = dict(n_neurons=cfg.mlp_neurons, n_hidden_layers=cfg.mlp_hidden_layers)
        self.sdf_network = VanillaMLP(geo_dim, 1, **mlp).to(param.device, param.dtype)
        self.feature_network = VanillaMLP(tex_dim, cfg.n_feature_dims, **mlp).to(param.device, param.dtype)
        self.deformation_network = (
            VanillaMLP(geo_dim, 3, **mlp).to(param.device, param.dtype) if cfg.deformable_grid else None
        )
        r = cfg.field_config.radius
        self.register_buffer(
            "bbox", torch.tensor([[-r, -r, -r], [r, r, r]], dtype=torch.float32), persistent=False
        )

        scheduler_config = dict(scheduler_config or DEFAULT_SCHEDULER_CONFIG)
        if scheduler_config.get("prediction_type", "epsilon") != "epsilon":
            raise StudentWeightsError(
                f"the student needs an epsilon-prediction base model, got prediction_type "
                f"{scheduler_config['prediction_type']!r}"
            )
        # bf16 / fp16 autocast of the UNet and VAE-decoder forwards (training memory; the weights stay in their dtype)
        self.autocast_dtype: torch.dtype | None = None
        self.noise_scheduler = DDPMScheduler.from_config(scheduler_config)  # training: add_noise
        self.sample_scheduler = DDIMScheduler.from_config(scheduler_config)  # sampling: eta 0
        for name, p in self.named_parameters():
            p.requires_grad_(self._is_trainable(name))

    # ------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike | None = None,
        weights: str | os.PathLike | None = None,
        *,
        config: StudentConfig | str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        weights_filename: str = WEIGHTS_FILENAME,
        load_text_encoder: bool = True,
    ) -> TriplaneStudent:
        """Build the student on a diffusers SD directory or hub id and optionally load trained weights.

        base:    SD directory or hub id (e.g. `stabilityai/stable-diffusion-2-1-base`); None takes
                 `base_model_name_or_path` of the config (relative to the config's folder when it exists there).
        weights: None (fresh adapters: up-projections zero, so the UNet starts as the base model), a
                 checkpoint file (official .pth layout or own .safetensors), a directory written by
                 `save_pretrained`, or a hub id (`ZhiyuanthePony/TriplaneTurbo`, file `weights_filename`).
        config:  StudentConfig or a config.json path; default: the student config a `prd fit` checkpoint
                 recorded (any configuration, with its base), else config.json beside the weights, else the
                 full-size defaults. Its `student_class` (an import path) builds that subclass instead: how a
                 second representation comes in (README, "Adding a representation").
        device, dtype: where the model runs (float32 by default; the reference ran in float32).
        """
        weights_file, config_path = (None, None)
        if weights is not None:
            weights_file, config_path = resolve_weights(weights, weights_filename)
        if isinstance(config, (str, os.PathLike)):
            config_path, config = Path(config), None
        elif config is None and weights_file is not None:
            config = training_checkpoint_config(weights_file)  # a `prd fit` checkpoint knows its student
        if config is None:
            config = StudentConfig.from_json(config_path) if config_path is not None else StudentConfig()
        if base is None:
            base = config.base_model_name_or_path
            if config_path is not None and (Path(config_path).parent / base).exists():
                base = Path(config_path).parent / base
        cls = _student_class(cls, config)
        base_dir = resolve_base(base)
        unet, vae, text_encoder, tokenizer, scheduler_config = _load_base(base_dir, load_text_encoder)
        student = cls(unet, vae, text_encoder, tokenizer, scheduler_config, config)
        if weights_file is not None:
            load_student_weights(student, weights_file)
        student.eval()
        if device is not None or dtype is not None:
            student.to(device=device, dtype=dtype)
        return student

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `model.safetensors` (trainable weights, module names) and `config.json` to `directory`."""
        return save_own_weights(self, directory)

    def save_official(self, path: str | os.PathLike) -> None:
        """Write the trainable weights in the official `triplane_turbo_sd_v1.pth` layout."""
        save_official_checkpoint(self, path)

    def config_summary(self) -> str:
        cfg = self.config
        r = cfg.ranks
        return (
            f"ranks self/cross/locon {r.self_attn}/{r.cross_attn}/{r.locon}, output_dim {cfg.output_dim}, "
            f"MLP {cfg.mlp_neurons} wide x {cfg.mlp_hidden_layers} hidden layers; set them in config.json"
        )

    # ---------------------------------------------------------------------------------- parameters

    def _is_trainable(self, name: str) -> bool:
        return name.startswith(self.trainable_prefixes) or (
            name.startswith(("unet.", "vae.")) and is_adapter_parameter(name)
        )

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Adapters, the new VAE conv_out and the MLPs (the base stays frozen)."""
        return (p for name, p in self.named_parameters() if self._is_trainable(name))

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """name -> parameter (not copies) of everything that trains, under the student's module names."""
        return {name: p for name, p in self.named_parameters() if self._is_trainable(name)}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Strict inverse of `trainable_state_dict` (missing / unexpected / wrong-shape keys raise)."""
        own = self.trainable_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or wrong:
            raise StudentWeightsError(
                f"trainable state dict does not fit ({self.config_summary()}): missing {missing[:10]}, "
                f"unexpected {unexpected[:10]}, wrong shapes {wrong[:10]}"
            )
        with torch.no_grad():
            for key, p in own.items():
                p.copy_(state[key].to(p.dtype))

    def adapters_disabled(self):
        """Context manager: the UNet and VAE decoder run as the base model (conv_out and MLPs stay)."""
        return adapters_disabled(self.unet, self.vae)

    def merge_adapters(self, merge: bool = True) -> int:
        """Fold the peft adapters into the UNet / VAE-decoder weights for fast inference (`merge=False`
        unfolds them again; training needs them unfolded). Returns the number of layers changed."""
        return merge_adapters(self.unet, self.vae, merge=merge)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute UNet and VAE-decoder activations in backward (saves memory in training)."""
        if enabled:
            self.unet.enable_gradient_checkpointing()
            self.vae.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()
            self.vae.disable_gradient_checkpointing()

    def set_autocast(self, dtype: torch.dtype | None) -> None:
        """Run the UNet and VAE-decoder forwards under `torch.autocast(dtype)` (None: off). Their outputs are cast
        back to the weights' dtype, so the triplanes, the MLPs and everything after stay in it (float32 master
        weights with bfloat16 matmuls / convolutions)."""
        if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"student autocast dtype must be bfloat16, float16 or None, got {dtype}")
        self.autocast_dtype = dtype

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:  # not autocast(enabled=False): that would switch off an outer autocast
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the networks (UNet, VAE decoder)."""
        return next(self.unet.parameters()).dtype

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype of the noise, the latents between sampler steps and the DDIM arithmetic: the networks'
        dtype, but at least float32 (at t = 999 the x0 update divides by sqrt(abar) = 0.068, which would
        amplify bfloat16 rounding of the latents 15 times)."""
        return torch.promote_types(self.dtype, torch.float32)

    def field_modules(self) -> dict[str, nn.Module]:
        """name -> the modules a decoded field evaluates (the MLPs; a subclass adds its heads)."""
        return {name: getattr(self, name) for name in _MLP_NAMES if getattr(self, name) is not None}

    @property
    def field_dtype(self) -> torch.dtype:
        """The dtype of the field: its planes, MLPs, grid points and mesh vertices."""
        return next(self.sdf_network.parameters()).dtype

    def set_precision(self, dtype: torch.dtype) -> TriplaneStudent:
        """Networks (UNet, VAE decoder, text encoder) in `dtype`; the field modules in `dtype` but at least float32.

        The field stays in float32 because its inputs are coordinates: in bfloat16 the 160^3 grid points near
        the box's faces round to multiples of 1/128, a third of a grid cell, and so would the mesh vertices.
        Its MLPs are a small share of the work. Returns the student."""
        for module in (self.unet, self.vae, self.text_encoder):
            if module is not None:
                module.to(dtype=dtype)
        field_dtype = torch.promote_types(dtype, torch.float32)
        for module in self.field_modules().values():
            module.to(dtype=field_dtype)
        return self

    # ------------------------------------------------------------------------------------- text

    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str]) -> Tensor:
        """CLIP last hidden state (after the final layer norm) `[B, 77, D]`; no attention mask, no CFG."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this student was built without a text encoder; pass text embeddings instead")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompt given: pass at least one non-empty prompt")
        empty = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
        if empty:
            raise ValueError(f"empty prompt at position(s) {empty}: every prompt must be non-empty text")
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(tokens.input_ids.to(device))[0].to(self.dtype)

    # ------------------------------------------------------------------------------ denoising

    @property
    def alphas_cumprod(self) -> Tensor:
        """abar_t `[T]`, float32, as diffusers computes it."""
        return self.noise_scheduler.alphas_cumprod

    def sampling_timesteps(self, num_steps: int | None = None) -> Tensor:
        """DDIM timesteps ("leading" spacing) shifted to start at T - 1: 999, 749, 499, 249 for 4 steps."""
        num_steps = num_steps or self.config.num_inference_steps
        scheduler = self.sample_scheduler
        scheduler.set_timesteps(num_steps)
        timesteps = scheduler.timesteps
        return timesteps + (scheduler.config.num_train_timesteps - 1 - timesteps.max())

    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor | int) -> Tensor:
        """DDPM forward process sqrt(abar_t) x + sqrt(1 - abar_t) n; latents/noise `[B, 6, C, h, w]`, t int or `[B]`."""
        t = self._timesteps_per_object(timesteps, latents.shape[0], latents.device)
        a = self.alphas_cumprod.to(latents.device)[t].to(latents.dtype).view(-1, 1, 1, 1, 1)
        return a.sqrt() * latents + (1 - a).sqrt() * noise

    @staticmethod
    def _timesteps_per_object(timesteps: Tensor | int, batch: int, device: torch.device) -> Tensor:
        t = torch.as_tensor(timesteps, device=device).long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"timesteps must be one value or one per object ({batch}), got {t.numel()}")
        return t

    def _check_latents(self, latents: Tensor, name: str) -> None:
        c = self.config.latent_channels
        if latents.ndim != 5 or latents.shape[1] != NUM_PLANES or latents.shape[2] != c:
            raise ValueError(f"{name} must be [B, {NUM_PLANES}, {c}, h, w], got {tuple(latents.shape)}")

    def predict_eps(self, noisy_latents: Tensor, timestep: Tensor | int, text_embeddings: Tensor) -> Tensor:
        """UNet epsilon `[B, 6, C, h, w]` for noisy latents `[B, 6, C, h, w]`.

        timestep: int, 0-dim or `[B]` (one per object). text_embeddings: `[B, L, D]` (repeated for the 6
        planes of each object) or `[B, 6, L, D]` (one per plane).
        """
        self._check_latents(noisy_latents, "noisy_latents")
        b = noisy_latents.shape[0]
        if text_embeddings.ndim == 3:
            cond = text_embeddings.repeat_interleave(NUM_PLANES, dim=0)
        elif text_embeddings.ndim == 4 and text_embeddings.shape[1] == NUM_PLANES:
            cond = text_embeddings.flatten(0, 1)
        else:
            raise ValueError(
                f"text_embeddings must be [B, L, D] or [B, 6, L, D], got {tuple(text_embeddings.shape)}"
            )
        if cond.shape[0] != b * NUM_PLANES:
            raise ValueError(f"{text_embeddings.shape[0]} text embeddings for {b} objects")
        t = torch.as_tensor(timestep, device=noisy_latents.device)
        if t.ndim > 0 and t.numel() > 1:
            t = self._timesteps_per_object(t, b, noisy_latents.device).repeat_interleave(NUM_PLANES)
        else:
            t = t.reshape(())
        with self._autocast(noisy_latents.device):
            eps = self.unet(
                noisy_latents.flatten(0, 1).to(self.dtype), t, encoder_hidden_states=cond.to(self.dtype)
            ).sample
        return eps.to(noisy_latents.dtype).view_as(noisy_latents)

    def predict_x0(
        self, noisy_latents: Tensor, timestep: Tensor | int, text_embeddings: Tensor, return_eps: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t), `[B, 6, C, h, w]`, differentiable w.r.t. the adapters."""
        eps = self.predict_eps(noisy_latents, timestep, text_embeddings)
        t = self._timesteps_per_object(timestep, noisy_latents.shape[0], noisy_latents.device)
        a = self.alphas_cumprod.to(noisy_latents.device)[t].to(eps.dtype).view(-1, 1, 1, 1, 1)
        x0 = (noisy_latents - (1 - a) ** 0.5 * eps) / a**0.5
        return (x0, eps) if return_eps else x0

    def decode(self, latents: Tensor) -> TriplaneField:
        """Latents `[B, 6, C, h, w]` (no VAE scaling) -> `TriplaneField` with planes `[B, 6, D/2, 8h, 8w]`
        in `field_dtype`.

        Differentiable w.r.t. the latents, the decoder adapters, conv_out and the MLPs.
        """
        self._check_latents(latents, "latents")
        z = latents.flatten(0, 1).to(next(self.vae.decoder.parameters()).dtype)
        with self._autocast(latents.device):
            if getattr(self.vae, "post_quant_conv", None) is not None:
                z = self.vae.post_quant_conv(z)
            out = self.vae.decoder(z)  # [6B, D, H, W]
        triplane_raw = out.view(latents.shape[0], NUM_PLANES, *out.shape[1:]).to(self.field_dtype)
        return TriplaneField.from_decoder_output(
            triplane_raw,
            self.sdf_network,
            self.feature_network,
            self.deformation_network,
            self.config.field_config,
        )

    def make_noise(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Gaussian latents `[B, 6, C, h, w]` (sizes from the config) in `latent_dtype`. A `seed` draws on the CPU,
        so the same seed gives the same noise on every device."""
        cfg = self.config
        shape = (batch_size, NUM_PLANES, cfg.latent_channels, cfg.latent_height, cfg.latent_width)
        if seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        gen_device = generator.device if generator is not None else (device or self.device)
        noise = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
        return noise.to(device or self.device, self.latent_dtype)

    @torch.no_grad()
    def denoise(
        self,
        text_embeddings: Tensor,
        noise: Tensor | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        return_intermediates: bool = False,
    ) -> Tensor | tuple[Tensor, SamplerTrace]:
        """Few-step DDIM from noise `[B, 6, C, h, w]` (drawn with `generator` / `seed` when None).

        Returns the last step's x0 `[B, 6, C, h, w]`, the latents `decode` turns into a field (and the
        per-step trace if requested).
        """
        b = text_embeddings.shape[0]
        if noise is None:
            noise = self.make_noise(b, generator=generator, seed=seed)
        self._check_latents(noise, "noise")
        if noise.shape[0] != b:
            raise ValueError(f"noise has {noise.shape[0]} objects but text_embeddings {b}")
        timesteps = self.sampling_timesteps(num_steps)
        scheduler = self.sample_scheduler
        trace = SamplerTrace(timesteps=timesteps.clone())
        x = noise.to(self.device, self.latent_dtype)  # the DDIM arithmetic in latent_dtype, the UNet in dtype
        emb = text_embeddings.to(self.device, self.dtype)
        x0 = x
        for t in timesteps.tolist():
            eps = self.predict_eps(x, t, emb)
            step = scheduler.step(eps, t, x, eta=0.0)
            x0, x = step.pred_original_sample, step.prev_sample
            if return_intermediates:
                trace.eps.append(eps)
                trace.x0.append(x0)
                trace.prev_sample.append(x)
        trace.latents = x0
        return (x0, trace) if return_intermediates else x0

    @torch.no_grad()
    def sample(
        self,
        text_embeddings: Tensor,
        noise: Tensor | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        return_intermediates: bool = False,
    ) -> TriplaneField | tuple[TriplaneField, SamplerTrace]:
        """`decode(denoise(...))`: the field of the few-step sample (and the per-step trace if requested)."""
        latents, trace = self.denoise(text_embeddings, noise, num_steps, generator, seed, return_intermediates=True)
        field = self.decode(latents)
        return (field, trace) if return_intermediates else field


def _student_class(cls: type[TriplaneStudent], config: StudentConfig) -> type[TriplaneStudent]:
    """The class `config.student_class` names (a subclass of `cls`), else `cls`."""
    if config.student_class is None:
        return cls
    module_name, _, name = config.student_class.rpartition(".")
    try:
        chosen = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise StudentWeightsError(
            f"student_class {config.student_class!r} cannot be imported ({type(err).__name__}: {err}); "
            "give the import path of a TriplaneStudent subclass, e.g. 'my_package.my_module.MyStudent'"
        ) from None
    if not (isinstance(chosen, type) and issubclass(chosen, TriplaneStudent)):
        raise StudentWeightsError(f"student_class {config.student_class!r} is not a subclass of TriplaneStudent")
    return chosen if issubclass(chosen, cls) else cls


def _load_base(base_dir: Path, load_text_encoder: bool):
    """UNet, VAE, text encoder, tokenizer and scheduler config of a diffusers SD directory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(base_dir, subfolder="vae")
        text_encoder = tokenizer = None
        if load_text_encoder:
            from transformers import CLIPTextModel, CLIPTokenizer

            text_encoder = CLIPTextModel.from_pretrained(base_dir, subfolder="text_encoder")
            tokenizer = CLIPTokenizer.from_pretrained(base_dir, subfolder="tokenizer")
        scheduler_config = json.loads((base_dir / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise StudentWeightsError(
            f"cannot load the base model from {base_dir}: {' '.join(str(err).split())[:300]}"
        ) from None
    if text_encoder is not None:
        text_encoder.eval()
    return unet.eval(), vae.eval(), text_encoder, tokenizer, scheduler_config
