"""The camera-conditioned multi-view UNet of MVDream and RichDreamer, on diffusers building blocks.

MVDream (`sd-v2.1-base-4view.pt`), RichDreamer's normal-depth model (`nd_mv_ema.ckpt`) and its
depth-conditioned albedo model (`albedo_mv_ema.ckpt`) share one architecture, the LDM
"openaimodel" `MultiViewUNetModel`: an SD-1.x/2.x UNet whose

- camera (a 16-vector per image, see `teachers.camera_vectors`) goes through a 2-layer MLP that is
  added to the timestep embedding -- diffusers' `class_embed_type="projection"` with the camera
  as `class_labels`;
- self-attention (attn1 of every transformer block) is cross-view: the tokens of `num_frames`
  consecutive batch items are concatenated before attention (`MultiViewAttnProcessor`).

Everything else is a stock `UNet2DConditionModel`, so the model is built from diffusers blocks and
the original checkpoints load through a key mapping derived from the built module structure
(`original_key_map`). Sizes come from the original yaml (`model.params.unet_config.params`).

    unet = MultiViewUNet.from_original_checkpoint("sd-v2.1-base-4view.pt", "teachers/configs/mvdream_sd21_base_4view.yaml")
    eps = unet(x, timesteps, context, camera, num_frames=4)   # x [B*V, C, h, w] -> eps [B*V, C_out, h, w]
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor, nn

from renderers.errors import UserError
from teachers.camera_vectors import camera_vectors, camera_vectors_from_c2w, richdreamer_condition_distance

CONFIG_DIR = Path(__file__).parent / "configs"
ORIGINAL_UNET_PREFIX = "model.diffusion_model."


# ----------------------------------------------------------------------------------------------
# Errors (one line each; UserError makes the `prd` CLI print them without a traceback)


class MultiViewConfigError(UserError, ValueError):
    """The original yaml config is malformed or describes an unsupported UNet."""


class MultiViewConfigNotFoundError(UserError, FileNotFoundError):
    """The original yaml config does not exist."""


class MultiViewCheckpointNotFoundError(UserError, FileNotFoundError):
    """The released checkpoint file does not exist."""


class MultiViewCheckpointError(UserError, ValueError):
    """The checkpoint cannot be read or does not match the config."""


# ----------------------------------------------------------------------------------------------
# Released checkpoints


@dataclass(frozen=True)
class ReleasedCheckpoint:
    """Where a released multi-view checkpoint comes from and which bundled config describes it."""

    name: str
    filename: str
    config: Path
    source: str
    fetch: str
    upstream_config: str


RELEASED_CHECKPOINTS: dict[str, ReleasedCheckpoint] = {
    "mvdream-sd21-4view": ReleasedCheckpoint(
        name="mvdream-sd21-4view",
        filename="sd-v2.1-base-4view.pt",
        config=CONFIG_DIR / "mvdream_sd21_base_4view.yaml",
        source="Hugging Face hub repo MVDream/MVDream (https://huggingface.co/MVDream/MVDream)",
        fetch="hf download MVDream/MVDream sd-v2.1-base-4view.pt --local-dir pretrained",
        upstream_config="github.com/bytedance/MVDream mvdream/configs/sd-v2-base.yaml",
    ),
    "richdreamer-nd-mv": ReleasedCheckpoint(
        name="richdreamer-nd-mv",
        filename="nd_mv_ema.ckpt",
        config=CONFIG_DIR / "richdreamer_nd_mv.yaml",
        source=(
            "ModelScope model Damo_XR_Lab/Normal-Depth-Diffusion-Model, also at "
            "https://virutalbuy-public.oss-cn-hangzhou.aliyuncs.com/share/RichDreamer/nd_mv_ema.ckpt"
        ),
        fetch="wget -P pretrained https://virutalbuy-public.oss-cn-hangzhou.aliyuncs.com/share/RichDreamer/nd_mv_ema.ckpt",
        upstream_config=(
            "github.com/modelscope/normal-depth-diffusion configs/inference/nd/txtcond_mvsd-4-objaverse_finetune_wovae.yaml"
        ),
    ),
    "richdreamer-albedo-mv": ReleasedCheckpoint(
        name="richdreamer-albedo-mv",
        filename="albedo_mv_ema.ckpt",
        config=CONFIG_DIR / "richdreamer_albedo_mv.yaml",
        source=(
            "ModelScope model Damo_XR_Lab/Normal-Depth-Diffusion-Model, also at "
            "https://virutalbuy-public.oss-cn-hangzhou.aliyuncs.com/share/RichDreamer/albedo_mv_ema.ckpt"
        ),
        fetch="wget -P pretrained https://virutalbuy-public.oss-cn-hangzhou.aliyuncs.com/share/RichDreamer/albedo_mv_ema.ckpt",
        upstream_config=(
            "github.com/modelscope/normal-depth-diffusion configs/inference/albedo/txtcond_mvsd-4-objaverse_finetune_albedo.yaml"
        ),
    ),
}


def _release_hint(ckpt_path: Path | None = None, config_path: Path | None = None) -> str:
    """How to obtain the release that `ckpt_path` / `config_path` names, or all of them."""
    for release in RELEASED_CHECKPOINTS.values():
        if ckpt_path is not None and ckpt_path.name == release.filename:
            break
        if config_path is not None and config_path.resolve() == release.config.resolve():
            break
    else:
        return "released checkpoints: " + "; ".join(
            f"{r.filename} from {r.source} (`{r.fetch}`, config {r.config})"
            for r in RELEASED_CHECKPOINTS.values()
        )
    return (
        f"{release.filename} is released on {release.source}; fetch it with `{release.fetch}` "
        f"and pass its path (config: {release.config})"
    )


# ----------------------------------------------------------------------------------------------
# Original (LDM) yaml config


@dataclass(frozen=True)
class NoiseSchedule:
    """The DDPM noise schedule of an LDM config (float32, index = integer timestep).

    x_t = sqrt(alphas_cumprod[t]) * x_0 + sqrt(1 - alphas_cumprod[t]) * noise
    """

    betas: Tensor  # [T]
    alphas_cumprod: Tensor  # [T]
    prediction_type: str  # diffusers name: "epsilon" | "v_prediction" | "sample"
    beta_schedule: str  # LDM name: "linear" (= diffusers "scaled_linear"), "sqrt_linear", "sqrt", "cosine"
    linear_start: float
    linear_end: float

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]

    def to_diffusers(self, scheduler_cls=DDPMScheduler, **kwargs):
        """A diffusers scheduler with these betas (diffusers recomputes alphas_cumprod in float32)."""
        return scheduler_cls(
            num_train_timesteps=self.num_train_timesteps,
            trained_betas=self.betas.double().numpy(),
            prediction_type=self.prediction_type,
            **kwargs,
        )


_PARAMETERIZATION_TO_DIFFUSERS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# Defaults of MVDream's / normal-depth-diffusion's LatentDiffusionInterface when a key is absent.
_INTERFACE_DEFAULTS = dict(
    linear_start=0.00085,
    linear_end=0.012,
    timesteps=1000,
    beta_schedule="linear",
    cosine_s=8e-3,
    parameterization="eps",
)


def make_beta_schedule(
    beta_schedule: str, num_timesteps: int, linear_start: float, linear_end: float, cosine_s: float = 8e-3
) -> Tensor:
    """LDM's beta schedules, computed in float64 `[T]`."""
    if beta_schedule == "linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if beta_schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, num_timesteps, dtype=torch.float64)
    if beta_schedule == "sqrt":
        return torch.linspace(linear_start, linear_end, num_timesteps, dtype=torch.float64) ** 0.5
    if beta_schedule == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * torch.pi / 2) ** 2
        alphas = alphas / alphas[0]
        return (1 - alphas[1:] / alphas[:-1]).clamp(0, 0.999)
    raise MultiViewConfigError(
        f"unknown beta_schedule {beta_schedule!r}; LDM configs use 'linear', 'sqrt_linear', 'sqrt' or 'cosine'"
    )


@dataclass(frozen=True)
class OriginalConfig:
    """The parts of an MVDream / RichDreamer yaml config this project uses."""

    path: Path | None
    unet_params: dict[str, Any]
    schedule: NoiseSchedule
    scale_factor: float | None  # VAE latent scale (0.18215); unused by the VAE-free ND model
    conditioning_key: str | None  # None / "crossattn": x only; "hybrid": cat([x, c_concat], channels)
    cond_method: str | None  # RichDreamer's name for the concat input ("cat_d": disparity), if any
    first_stage: dict[str, Any] | None = field(default=None, repr=False)  # VAE config, for the teacher
    cond_stage_target: str | None = None  # text encoder class the model was trained with


def load_original_config(config: str | Path | Mapping) -> OriginalConfig:
    """Parse an original LDM yaml (a path or an already loaded mapping); errors are one line."""
    path = None
    if not isinstance(config, Mapping):
        path = Path(config)
        if not path.is_file():
            raise MultiViewConfigNotFoundError(f"multi-view UNet config not found: {path}; {_config_hint()}")
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            problem = getattr(err, "problem", None) or type(err).__name__
            raise MultiViewConfigError(f"{path} is not valid YAML{at}: {problem}") from None
    name = str(path) if path is not None else "the config"
    try:
        params = config["model"]["params"]
        unet = params["unet_config"]
    except (KeyError, TypeError):
        raise MultiViewConfigError(
            f"{name} has no model.params.unet_config: expected an MVDream / RichDreamer LDM yaml ({_config_hint()})"
        ) from None
    target = str(unet.get("target", "")) if isinstance(unet, Mapping) else ""
    if target and not target.endswith("MultiViewUNetModel"):
        raise MultiViewConfigError(
            f"{name} describes {target}, not a MultiViewUNetModel (MVDream / RichDreamer)"
        )
    unet_params = unet.get("params") if isinstance(unet, Mapping) else None
    if not isinstance(unet_params, Mapping):
        raise MultiViewConfigError(f"{name} has no model.params.unet_config.params mapping")

    get = lambda key: params.get(key, _INTERFACE_DEFAULTS[key])  # noqa: E731
    try:
        num_timesteps = int(get("timesteps"))
        linear_start, linear_end = float(get("linear_start")), float(get("linear_end"))
        cosine_s = float(get("cosine_s"))
    except (TypeError, ValueError):
        raise MultiViewConfigError(f"{name}: timesteps / linear_start / linear_end must be numbers") from None
    if num_timesteps < 1:
        raise MultiViewConfigError(f"{name}: timesteps must be positive, got {num_timesteps}")
    parameterization = str(get("parameterization"))
    if parameterization not in _PARAMETERIZATION_TO_DIFFUSERS:
        raise MultiViewConfigError(
            f"{name}: unknown parameterization {parameterization!r} (expected eps, v or x0)"
        )
    if params.get("given_betas") is not None:
        betas64 = torch.as_tensor(params["given_betas"], dtype=torch.float64)
    else:
        betas64 = make_beta_schedule(
            str(get("beta_schedule")), num_timesteps, linear_start, linear_end, cosine_s
        )
    schedule = NoiseSchedule(
        betas=betas64.float(),
        alphas_cumprod=torch.cumprod(1 - betas64, dim=0).float(),
        prediction_type=_PARAMETERIZATION_TO_DIFFUSERS[parameterization],
        beta_schedule=str(get("beta_schedule")),
        linear_start=linear_start,
        linear_end=linear_end,
    )
    conditioning_key = params.get("conditioning_key")
    if conditioning_key not in (None, "crossattn", "hybrid"):
        raise MultiViewConfigError(
            f"{name}: conditioning_key {conditioning_key!r} is not supported by the multi-view UNet (None, crossattn, hybrid)"
        )
    first_stage = params.get("first_stage_config")
    cond_stage = params.get("cond_stage_config")
    return OriginalConfig(
        path=path,
        unet_params=dict(unet_params),
        schedule=schedule,
        scale_factor=float(params["scale_factor"]) if "scale_factor" in params else None,
        conditioning_key=conditioning_key,
        cond_method=params.get("cond_method"),
        first_stage=dict(first_stage) if isinstance(first_stage, Mapping) else None,
        cond_stage_target=cond_stage.get("target") if isinstance(cond_stage, Mapping) else None,
    )


def schedule_from_config(config: str | Path | Mapping) -> NoiseSchedule:
    """The noise schedule (betas, alphas_cumprod) of an original yaml config."""
    return load_original_config(config).schedule


def _config_hint(ckpt_path: Path | None = None) -> str:
    """Where the yaml of `ckpt_path`'s release (or of every release) is bundled and published."""
    releases = [
        r for r in RELEASED_CHECKPOINTS.values() if ckpt_path is not None and r.filename == ckpt_path.name
    ]
    if releases:
        r = releases[0]
        return f"the config of {r.filename} is bundled as {r.config} (upstream: {r.upstream_config})"
    return "full-size configs of the released models are bundled in " + ", ".join(
        f"{r.config} ({r.filename}; upstream: {r.upstream_config})" for r in RELEASED_CHECKPOINTS.values()
    )


# Accepted LDM MultiViewUNetModel parameters, with the values this implementation supports.
_IGNORED_PARAMS = {
    "image_size",
    "use_checkpoint",
    "use_fp16",
    "use_bf16",
    "legacy",
    "use_new_attention_order",
}
_REQUIRED_VALUES = {
    "use_spatial_transformer": True,
    "conv_resample": True,
    "dims": 2,
    "resblock_updown": False,
    "num_classes": None,
    "n_embed": None,
    "num_attention_blocks": None,
    "disable_middle_self_attn": False,
    "adm_in_channels": None,
}
_MAPPED_PARAMS = {
    "in_channels",
    "out_channels",
    "model_channels",
    "num_res_blocks",
    "attention_resolutions",
    "channel_mult",
    "num_heads",
    "num_head_channels",
    "num_heads_upsample",
    "use_linear_in_transformer",
    "transformer_depth",
    "context_dim",
    "camera_dim",
    "use_scale_shift_norm",
    "disable_self_attentions",
    "dropout",
}
_GROUPS = 32  # LDM `normalization()` is GroupNorm(32, C) everywhere


def diffusers_unet_config(unet_params: Mapping[str, Any], name: str = "the config") -> dict[str, Any]:
    """`UNet2DConditionModel` kwargs equivalent to LDM `MultiViewUNetModel(**unet_params)`."""
    p = dict(unet_params)
    unknown = set(p) - _IGNORED_PARAMS - set(_REQUIRED_VALUES) - _MAPPED_PARAMS
    if unknown:
        raise MultiViewConfigError(f"{name}: unsupported unet_config parameter(s) {sorted(unknown)}")
    for key, required in _REQUIRED_VALUES.items():
        if key in p and p[key] != required:
            raise MultiViewConfigError(
                f"{name}: unet_config {key}={p[key]!r} is not supported (only {required!r})"
            )
    if "use_spatial_transformer" not in p:
        raise MultiViewConfigError(
            f"{name}: unet_config must set use_spatial_transformer: true (multi-view transformers)"
        )
    if any(p.get("disable_self_attentions") or []):
        raise MultiViewConfigError(
            f"{name}: disable_self_attentions is not supported (cross-view attn1 is the point)"
        )
    for key in (
        "in_channels",
        "out_channels",
        "model_channels",
        "num_res_blocks",
        "attention_resolutions",
        "channel_mult",
        "context_dim",
    ):
        if key not in p:
            raise MultiViewConfigError(f"{name}: unet_config is missing {key}")

    try:
        model_channels = int(p["model_channels"])
        channel_mult = [int(m) for m in p["channel_mult"]]
        attention_resolutions = {int(r) for r in p["attention_resolutions"]}
        num_heads = int(p.get("num_heads", -1))
        num_head_channels = int(p.get("num_head_channels", -1))
        num_heads_upsample = int(p.get("num_heads_upsample", -1))
        depth = p.get("transformer_depth", 1)
        context_dim = p["context_dim"]
        num_res_blocks = p["num_res_blocks"]
        layers = (
            [int(num_res_blocks)] * len(channel_mult)
            if isinstance(num_res_blocks, int)
            else [int(n) for n in num_res_blocks]
        )
    except (TypeError, ValueError):
        raise MultiViewConfigError(
            f"{name}: unet_config sizes must be integers / lists of integers"
        ) from None
    if not isinstance(depth, int) or depth < 1:
        raise MultiViewConfigError(f"{name}: transformer_depth must be a positive integer, got {depth!r}")
    if not isinstance(context_dim, int):
        raise MultiViewConfigError(f"{name}: context_dim must be one integer, got {context_dim!r}")
    if len(layers) != len(channel_mult) or not channel_mult:
        raise MultiViewConfigError(
            f"{name}: num_res_blocks must be an int or one value per channel_mult level"
        )
    if channel_mult[0] != 1:
        raise MultiViewConfigError(
            f"{name}: channel_mult must start with 1 (the timestep embedding width is model_channels), got {channel_mult}"
        )
    if num_heads == -1 and num_head_channels == -1:
        raise MultiViewConfigError(f"{name}: set num_heads or num_head_channels")
    if num_heads_upsample not in (-1, num_heads):
        raise MultiViewConfigError(f"{name}: num_heads_upsample different from num_heads is not supported")

    block_out_channels = [model_channels * m for m in channel_mult]
    heads = []
    for level, channels in enumerate(block_out_channels):
        if channels % _GROUPS:
            raise MultiViewConfigError(
                f"{name}: level {level} has {channels} channels, not a multiple of {_GROUPS} (GroupNorm)"
            )
        level_heads = channels // num_head_channels if num_head_channels != -1 else num_heads
        has_attention = (
            2**level in attention_resolutions or level == len(block_out_channels) - 1
        )  # last: middle block
        head_channels = num_head_channels if num_head_channels != -1 else channels // max(level_heads, 1)
        if has_attention and (level_heads < 1 or level_heads * head_channels != channels):
            raise MultiViewConfigError(
                f"{name}: {channels} channels at level {level} do not split into heads "
                f"(num_heads={num_heads}, num_head_channels={num_head_channels})"
            )
        heads.append(max(level_heads, 1))
    attention_levels = [2**level in attention_resolutions for level in range(len(channel_mult))]
    camera_dim = p.get("camera_dim")
    return dict(
        sample_size=p.get("image_size") if isinstance(p.get("image_size"), int) else None,
        in_channels=int(p["in_channels"]),
        out_channels=int(p["out_channels"]),
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)],
        block_out_channels=block_out_channels,
        layers_per_block=layers[0] if len(set(layers)) == 1 else layers,
        transformer_layers_per_block=depth,
        attention_head_dim=heads,  # diffusers' historical name for the number of heads
        cross_attention_dim=context_dim,
        use_linear_projection=bool(p.get("use_linear_in_transformer", False)),
        class_embed_type="projection" if camera_dim is not None else None,
        projection_class_embeddings_input_dim=int(camera_dim) if camera_dim is not None else None,
        resnet_time_scale_shift="scale_shift" if p.get("use_scale_shift_norm", False) else "default",
        flip_sin_to_cos=True,
        freq_shift=0,
        norm_num_groups=_GROUPS,
        norm_eps=1e-5,
        dropout=float(p.get("dropout", 0.0)),
    )


# ----------------------------------------------------------------------------------------------
# diffusers modules


class MultiViewAttnProcessor(AttnProcessor2_0):
    """Scaled-dot-product attention; with `cross_view`, the views of an object attend jointly.

    cross_view=True (every attn1): hidden states `[N, L, C]` with N = objects x num_frames are
    regrouped to `[N / num_frames, num_frames * L, C]` (the tokens of consecutive batch items
    concatenated view after view), attended, and split back. num_frames=1 is plain self-attention.
    cross_view=False (attn2): ordinary per-image attention; it only accepts `num_frames` so that the
    UNet's `cross_attention_kwargs` reach every processor without warnings.
    """

    def __init__(self, cross_view: bool):
        super().__init__()
        self.cross_view = cross_view

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        num_frames: int = 1,
    ) -> Tensor:
        if not self.cross_view or num_frames == 1:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError("cross-view attention is self-attention on [N, L, C] tokens, without mask")
        batch, length, channels = hidden_states.shape
        grouped = hidden_states.reshape(batch // num_frames, num_frames * length, channels)
        out = super().__call__(attn, grouped, None, None, temb)
        return out.reshape(batch, length, channels)


class CameraConditionedUNet2DConditionModel(UNet2DConditionModel):
    """`UNet2DConditionModel` whose class embedding (the camera MLP) is optional at call time.

    Without `class_labels` nothing is added to the timestep embedding, as in the original model
    when no camera is given (diffusers itself would raise).
    """

    def get_class_embed(self, sample: Tensor, class_labels: Tensor | None) -> Tensor | None:
        if class_labels is None:
            return None
        return super().get_class_embed(sample=sample, class_labels=class_labels)


def set_multiview_attn_processors(unet: UNet2DConditionModel) -> None:
    """Cross-view processors on every attn1, per-image SDPA on every attn2."""
    unet.set_attn_processor(
        {
            name: MultiViewAttnProcessor(cross_view=name.endswith("attn1.processor"))
            for name in unet.attn_processors
        }
    )


_RESNET_TO_ORIGINAL = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def original_key_map(unet: UNet2DConditionModel) -> dict[str, str]:
    """original (LDM `MultiViewUNetModel`) state-dict key -> diffusers key, for every tensor of `unet`.

    Derived from the diffusers module structure: the LDM UNet numbers its blocks consecutively
    (`input_blocks.k`, `middle_block.k`, `output_blocks.k`, sub-index 0 = ResBlock, then transformer,
    then up/downsampler); transformer internals have the same names in both layouts.
    """
    modules: dict[str, tuple[str, bool]] = {}  # diffusers module prefix -> (original prefix, is_resnet)

    def add(diffusers_prefix: str, original_prefix: str, is_resnet: bool = False) -> None:
        modules[diffusers_prefix] = (original_prefix, is_resnet)

    add("time_embedding.linear_1", "time_embed.0")
    add("time_embedding.linear_2", "time_embed.2")
    if unet.class_embedding is not None:
        add("class_embedding.linear_1", "camera_embed.0")
        add("class_embedding.linear_2", "camera_embed.2")
    add("conv_in", "input_blocks.0.0")
    entry = 1
    for i, block in enumerate(unet.down_blocks):
        has_attention = getattr(block, "attentions", None) is not None
        for j in range(len(block.resnets)):
            add(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{entry}.0", is_resnet=True)
            if has_attention:
                add(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{entry}.1")
            entry += 1
        if block.downsamplers is not None:
            add(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{entry}.0.op")
            entry += 1
    add("mid_block.resnets.0", "middle_block.0", is_resnet=True)
    for k in range(len(unet.mid_block.attentions)):
        add(f"mid_block.attentions.{k}", f"middle_block.{2 * k + 1}")
        add(f"mid_block.resnets.{k + 1}", f"middle_block.{2 * k + 2}", is_resnet=True)
    entry = 0
    for i, block in enumerate(unet.up_blocks):
        has_attention = getattr(block, "attentions", None) is not None
        for j in range(len(block.resnets)):
            add(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{entry}.0", is_resnet=True)
            if has_attention:
                add(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{entry}.1")
            if j == len(block.resnets) - 1 and block.upsamplers is not None:
                add(
                    f"up_blocks.{i}.upsamplers.0.conv",
                    f"output_blocks.{entry}.{2 if has_attention else 1}.conv",
                )
            entry += 1
    add("conv_norm_out", "out.0")
    add("conv_out", "out.2")

    mapping: dict[str, str] = {}
    for key in unet.state_dict():
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:n])
            if prefix in modules:
                original_prefix, is_resnet = modules[prefix]
                rest = parts[n:]
                if is_resnet:
                    rest = [_RESNET_TO_ORIGINAL[rest[0]], *rest[1:]]
                mapping[".".join([original_prefix, *rest])] = key
                break
        else:
            raise RuntimeError(
                f"no original-layout name for diffusers tensor {key} (unsupported UNet structure)"
            )
    if len(mapping) != len(unet.state_dict()):
        raise RuntimeError("the original-layout key map is not one-to-one")
    return mapping


# ----------------------------------------------------------------------------------------------
# Checkpoint reading


def load_original_unet_state_dict(
    ckpt_path: str | Path, config_path: Path | None = None
) -> dict[str, Tensor]:
    """The UNet tensors of an original checkpoint, keys without the `model.diffusion_model.` prefix.

    Reads MVDream's raw state dict (`sd-v2.1-base-4view.pt`), RichDreamer's `{"state_dict": ...}`
    (`nd_mv_ema.ckpt`, `albedo_mv_ema.ckpt`), a `.safetensors` file, or a bare UNet state dict.
    VAE / text-encoder / schedule entries are skipped; large files are memory-mapped.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise MultiViewCheckpointNotFoundError(
            f"multi-view UNet checkpoint not found: {path}; {_release_hint(path, config_path)}"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # legacy (non-zip) torch.save files cannot be memory-mapped
                raise MultiViewCheckpointError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise MultiViewCheckpointError(
                f"{path} holds objects other than tensors and was refused by torch.load(weights_only=True) "
                f"({str(err).splitlines()[0]}); re-save only its state dict from a trusted environment"
            ) from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise MultiViewCheckpointError(f"{path} does not hold a state dict (found {type(state).__name__})")
    unet_state = {
        k[len(ORIGINAL_UNET_PREFIX) :]: v for k, v in state.items() if k.startswith(ORIGINAL_UNET_PREFIX)
    }
    if not unet_state and "input_blocks.0.0.weight" in state:
        unet_state = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not unet_state:
        raise MultiViewCheckpointError(
            f"{path} has no '{ORIGINAL_UNET_PREFIX}*' tensors: not an MVDream / RichDreamer checkpoint; {_release_hint(path, config_path)}"
        )
    return unet_state


# ----------------------------------------------------------------------------------------------
# The model


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


class MultiViewUNet(nn.Module):
    """MVDream / RichDreamer multi-view UNet: `eps = unet(x, timesteps, context, camera, num_frames)`.

    Attributes: `unet` (the diffusers `UNet2DConditionModel`, multi-view processors installed),
    `config` (`OriginalConfig`: unet params, schedule, VAE scale factor, conditioning key),
    `schedule` / `alphas_cumprod` / `betas` (float32 CPU, never cast with the weights).
    """

    def __init__(self, config: OriginalConfig, unet: UNet2DConditionModel | None = None):
        super().__init__()
        self.config = config
        name = str(config.path) if config.path is not None else "the config"
        self.unet = (
            unet
            if unet is not None
            else CameraConditionedUNet2DConditionModel(**diffusers_unet_config(config.unet_params, name))
        )
        set_multiview_attn_processors(self.unet)

    # construction ----------------------------------------------------------------------------

    @classmethod
    def from_original_config(
        cls,
        config_path: str | Path | Mapping,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> MultiViewUNet:
        """Randomly initialised model of the config's sizes (`device="meta"` builds it without memory)."""
        config = load_original_config(config_path)
        with torch.device(device or "cpu"):
            model = cls(config)
        return model.to(dtype=_as_dtype(dtype)) if dtype is not None else model

    @classmethod
    def from_original_checkpoint(
        cls,
        ckpt_path: str | Path,
        config_path: str | Path | None = None,
        *,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
    ) -> MultiViewUNet:
        """Load a released checkpoint (or any checkpoint in the original layout) with its yaml.

        ckpt_path: `sd-v2.1-base-4view.pt`, `nd_mv_ema.ckpt`, `albedo_mv_ema.ckpt`, ...
        config_path: the original yaml; defaults to the bundled config of a released file name.
        Returns the model in eval mode with frozen parameters, on `device` in `dtype`.
        """
        ckpt_path = Path(ckpt_path)
        if config_path is None:
            release = next((r for r in RELEASED_CHECKPOINTS.values() if r.filename == ckpt_path.name), None)
            if release is None:
                raise MultiViewConfigError(
                    f"no config given for {ckpt_path.name}: pass config_path (the original yaml; {_config_hint()})"
                )
            config_path = release.config
        config_path = Path(config_path)
        if not config_path.is_file():
            raise MultiViewConfigNotFoundError(
                f"multi-view UNet config not found: {config_path}; {_config_hint(ckpt_path)}"
            )
        config = load_original_config(config_path)
        state = load_original_unet_state_dict(ckpt_path, config_path)
        with torch.device("meta"):
            model = cls(config)
        model.load_original_state_dict(state, assign=True, source=str(ckpt_path))
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftover:
            raise RuntimeError(f"tensors left uninitialised after loading: {leftover[:3]}")
        model.requires_grad_(False).eval()
        return model.to(device=device, dtype=_as_dtype(dtype))

    # original layout -------------------------------------------------------------------------

    def original_key_map(self) -> dict[str, str]:
        """original key (without `model.diffusion_model.`) -> key of `self.unet`."""
        return original_key_map(self.unet)

    def load_original_state_dict(
        self, state: Mapping[str, Tensor], *, assign: bool = False, source: str = "the state dict"
    ) -> None:
        """Load UNet tensors in the original layout (prefix already stripped), strictly."""
        key_map = self.original_key_map()
        missing = [k for k in key_map if k not in state]
        unexpected = [k for k in state if k not in key_map]
        if missing or unexpected:
            raise MultiViewCheckpointError(
                f"{source} does not match the config: {len(missing)} missing UNet tensor(s) {missing[:3]}, "
                f"{len(unexpected)} unexpected {unexpected[:3]} (wrong yaml for this checkpoint?)"
            )
        targets = self.unet.state_dict()
        converted = {}
        for original, tensor in state.items():
            name = key_map[original]
            if tuple(tensor.shape) != tuple(targets[name].shape):
                raise MultiViewCheckpointError(
                    f"{source}: {original} has shape {list(tensor.shape)} but the config needs "
                    f"{list(targets[name].shape)} (wrong yaml for this checkpoint?)"
                )
            converted[name] = tensor
        self.unet.load_state_dict(converted, strict=True, assign=assign)

    def original_state_dict(self, prefix: str = ORIGINAL_UNET_PREFIX) -> dict[str, Tensor]:
        """The UNet tensors under their original names (e.g. to save a checkpoint in that layout)."""
        state = self.unet.state_dict()
        return {prefix + original: state[name] for original, name in self.original_key_map().items()}

    # properties ------------------------------------------------------------------------------

    @property
    def schedule(self) -> NoiseSchedule:
        return self.config.schedule

    @property
    def alphas_cumprod(self) -> Tensor:
        """`[T]` float32 on the CPU."""
        return self.config.schedule.alphas_cumprod

    @property
    def betas(self) -> Tensor:
        return self.config.schedule.betas

    @property
    def in_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def out_channels(self) -> int:
        return self.unet.config.out_channels

    @property
    def camera_dim(self) -> int | None:
        return self.unet.config.projection_class_embeddings_input_dim

    @property
    def context_dim(self) -> int:
        return self.unet.config.cross_attention_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    # forward ---------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor | int,
        context: Tensor,
        camera: Tensor | None = None,
        num_frames: int = 4,
        concat: Tensor | None = None,
    ) -> Tensor:
        """Predict the model output (epsilon for the released models) for every view.

        x:         [N, C, h, w] noisy input, N = objects x num_frames (index = object * num_frames + view);
                   MVDream / albedo: VAE latents; RichDreamer ND: normal + disparity, no VAE.
        timesteps: [N] integer timesteps (one per image) or a scalar for all.
        context:   [N, L, D] text embeddings (D = `context_dim`: 1024 MVDream / albedo, 768 ND).
        camera:    [N, camera_dim] camera vectors (`camera_vectors`) or None (no camera term).
        num_frames: views per object attending to each other (4 for the released models).
        concat:    [N, C', h, w] extra input channels appended after x (albedo model: disparity,
                   C + C' = in_channels), for `conditioning_key: hybrid` configs.
        Returns [N, out_channels, h, w] in x's dtype (computed in the model's dtype).
        """
        n = x.shape[0]
        if num_frames < 1 or n % num_frames:
            raise ValueError(f"batch of {n} images is not a whole number of {num_frames}-view groups")
        if concat is not None:
            if concat.shape[0] != n or concat.shape[2:] != x.shape[2:]:
                raise ValueError(f"concat {list(concat.shape)} does not match x {list(x.shape)}")
            x_in = torch.cat([x, concat.to(x.dtype)], dim=1)
        else:
            x_in = x
        if x_in.shape[1] != self.in_channels:
            hint = (
                " (this model also takes `concat` channels)"
                if self.config.conditioning_key == "hybrid"
                else ""
            )
            raise ValueError(f"the UNet takes {self.in_channels} input channels, got {x_in.shape[1]}{hint}")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(n)
        if timesteps.shape != (n,):
            raise ValueError(
                f"timesteps must be [N]={n} (one per image) or a scalar, got {list(timesteps.shape)}"
            )
        if context.ndim != 3 or context.shape[0] != n or context.shape[2] != self.context_dim:
            raise ValueError(f"context must be [N={n}, L, {self.context_dim}], got {list(context.shape)}")
        if camera is not None:
            if self.camera_dim is None:
                raise ValueError(
                    "this UNet has no camera embedding (camera_dim unset in its config); pass camera=None"
                )
            if camera.shape != (n, self.camera_dim):
                raise ValueError(f"camera must be [N={n}, {self.camera_dim}], got {list(camera.shape)}")
            camera = camera.to(x.device, self.dtype)
        out = self.unet(
            x_in.to(self.dtype),
            timesteps,
            encoder_hidden_states=context.to(self.dtype),
            class_labels=camera,
            cross_attention_kwargs={"num_frames": num_frames},
            return_dict=False,
        )[0]
        return out.to(x.dtype)


__all__ = [
    "CONFIG_DIR",
    "RELEASED_CHECKPOINTS",
    "CameraConditionedUNet2DConditionModel",
    "MultiViewAttnProcessor",
    "MultiViewCheckpointError",
    "MultiViewCheckpointNotFoundError",
    "MultiViewConfigError",
    "MultiViewConfigNotFoundError",
    "MultiViewUNet",
    "NoiseSchedule",
    "OriginalConfig",
    "ReleasedCheckpoint",
    "camera_vectors",
    "camera_vectors_from_c2w",
    "diffusers_unet_config",
    "load_original_config",
    "load_original_unet_state_dict",
    "original_key_map",
    "richdreamer_condition_distance",
    "schedule_from_config",
    "set_multiview_attn_processors",
]
