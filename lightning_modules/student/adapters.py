"""The TriplaneTurbo adapters on a diffusers UNet and VAE decoder.

Every object is 6 UNet / VAE batch elements, in the plane order of `PLANE_NAMES` (object b owns batch
indices 6b .. 6b+5). The adapters (all scale 1, no bias):

- UNet self-attention (attn1): `HexaPlaneSelfAttnProcessor`, a diffusers attention processor with one
  LoRA set per plane on q, k, v and out, and attention computed jointly over the 6 planes of an object.
  Its out-LoRA is *sequential*: it reads the projected output y of `to_out[0]` (y + B A y), which no
  standard LoRA layer does, hence a processor instead of peft.
- UNet cross-attention (attn2) q, k, v, out: one shared peft LoRA (parallel form).
- "LoCon" on every resnet conv1 / conv2 / conv_shortcut and down/up-sampler conv of the UNet and the VAE
  decoder: peft's Conv2d LoRA (k x k down conv with the wrapped conv's stride and padding, then a 1 x 1 up
  conv).
- VAE decoder attention (mid block) q, k, v, out: one shared peft LoRA; attention stays per plane.
- A new trainable VAE decoder `conv_out` (block_out_channels[0] -> output_dim, 3 x 3).

Module names are discovered from the module tree (`locon_conv_names`, `attention_names`), never listed by
hand, so the same code adapts any SD-2-style UNet / VAE and gives the checkpoint index order of the reference.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import Tensor, nn

PLANE_NAMES = ("xy_geo", "xz_geo", "yz_geo", "xy_tex", "xz_tex", "yz_tex")
NUM_PLANES = len(PLANE_NAMES)
ADAPTER_NAME = "default"  # the peft adapter name

# Convolutions that carry a LoCon: resnet convs and the single conv of a down/up-sampler.
_LOCON_PATTERN = re.compile(
    r"(^|\.)(resnets\.\d+\.(conv1|conv2|conv_shortcut)|(downsamplers|upsamplers)\.\d+\.conv)$"
)
# Sub-modules that peft creates inside a wrapped layer; the wrapper itself keeps the original name.
_PEFT_INTERNAL = re.compile(
    r"\.(base_layer|lora_A|lora_B|lora_dropout|lora_embedding_A|lora_embedding_B)(\.|$)"
)


@dataclass(frozen=True)
class AdapterRanks:
    """LoRA ranks; the VAE attention LoRA uses the self-attention rank, as in the reference."""

    self_attn: int = 16
    cross_attn: int = 16
    locon: int = 16


def locon_conv_names(module: nn.Module) -> list[str]:
    """Names of the convs that carry a LoCon, in module-tree order (the reference's checkpoint order)."""
    return [
        name
        for name, _ in module.named_modules()
        if _LOCON_PATTERN.search(name) and not _PEFT_INTERNAL.search(name)
    ]


def attention_names(module: nn.Module) -> list[str]:
    """Names of the diffusers `Attention` modules (anything with `set_processor`), in module-tree order."""
    return [
        name
        for name, sub in module.named_modules()
        if hasattr(sub, "set_processor") and hasattr(sub, "get_processor") and not _PEFT_INTERNAL.search(name)
    ]


def is_self_attention(name: str) -> bool:
    return name.endswith("attn1")


class HexaPlaneSelfAttnProcessor(nn.Module):
    """Self-attention with a LoRA set per plane and joint attention over the 6 planes of each object.

    For batch element 6b + j (plane j of object b) and its tokens h `[S, C]`:
        q = Wq h + Uq_j Dq_j h   (same for k and v)
        a = attention over the 6 S tokens of object b (all planes, plane order 0..5)
        y = Wo a + bo;  y' = y + Uo_j Do_j y   (sequential out-LoRA)

    Parameters (stacked so that all planes run in one batched product):
        qkv_down [3, 6, r, C_in], qkv_up [3, 6, C_inner, r]   (index 0/1/2 = q/k/v)
        out_down [6, r, C_out],   out_up [6, C_out, r]
    Down projections start as N(0, 1/r^2) and up projections at zero (the reference's initialisation),
    so a fresh processor computes plain joint attention.
    """

    def __init__(self, query_dim: int, inner_dim: int, out_dim: int, rank: int, num_planes: int = NUM_PLANES):
        super().__init__()
        self.rank = rank
        self.num_planes = num_planes
        self.qkv_down = nn.Parameter(torch.empty(3, num_planes, rank, query_dim))
        self.qkv_up = nn.Parameter(torch.zeros(3, num_planes, inner_dim, rank))
        self.out_down = nn.Parameter(torch.empty(num_planes, rank, out_dim))
        self.out_up = nn.Parameter(torch.zeros(num_planes, out_dim, rank))
        nn.init.normal_(self.qkv_down, std=1.0 / rank)
        nn.init.normal_(self.out_down, std=1.0 / rank)
        self.enabled = True

    @classmethod
    def for_attention(cls, attn: nn.Module, rank: int) -> HexaPlaneSelfAttnProcessor:
        """A processor sized for the diffusers `Attention` module `attn` (widths read from its layers)."""
        to_out = attn.to_out[0]
        return cls(attn.to_q.in_features, attn.to_q.out_features, to_out.out_features, rank)

    def forward(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        if not self.enabled:  # the base model's own per-element attention
            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("HexaPlaneSelfAttnProcessor is a self-attention processor without mask")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        n, seq, _ = hidden_states.shape
        planes = self.num_planes
        if n % planes:
            raise ValueError(f"batch {n} is not a multiple of {planes} planes per object")
        objects = n // planes
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        # Per-plane LoRA of q, k, v in two batched products: [3, B, 6, S, C_inner].
        h = hidden_states.view(objects, planes, seq, -1)
        lora = torch.einsum("bpsc,kprc->kbpsr", h, self.qkv_down)
        lora = torch.einsum("kbpsr,kpor->kbpso", lora, self.qkv_up)
        inner = lora.shape[-1]
        heads = attn.heads
        head_dim = inner // heads

        def joint(base: Tensor, delta: Tensor) -> Tensor:
            # [6B, S, C] -> all tokens of one object in plane order: [B, heads, 6S, d]
            x = base.view(objects, planes * seq, inner) + delta.reshape(objects, planes * seq, inner)
            return x.view(objects, planes * seq, heads, head_dim).transpose(1, 2)

        query = joint(attn.to_q(hidden_states), lora[0])
        key = joint(attn.to_k(hidden_states), lora[1])
        value = joint(attn.to_v(hidden_states), lora[2])
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        out = out.transpose(1, 2).reshape(n, seq, inner).to(query.dtype)

        out = attn.to_out[0](out)
        y = out.view(objects, planes, seq, -1)
        delta = torch.einsum("bpsc,prc->bpsr", y, self.out_down)
        delta = torch.einsum("bpsr,pcr->bpsc", delta, self.out_up)
        out = (y + delta).view(n, seq, -1)
        out = attn.to_out[1](out)

        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _lora_config(default_rank: int, target_modules: list[str], ranks: dict[str, int]):
    """A peft LoraConfig for exactly `target_modules`, with per-module ranks and alpha = rank (scale 1)."""
    from peft import LoraConfig

    pattern = {re.escape(name): r for name, r in ranks.items() if r != default_rank}
    return LoraConfig(
        r=default_rank,
        lora_alpha=default_rank,
        target_modules=target_modules,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,
    )


def _inject_peft(module: nn.Module, ranks: dict[str, int]) -> None:
    """Wrap the named Linear / Conv2d layers of `module` with peft LoRA of the given ranks."""
    from peft import inject_adapter_in_model

    if not ranks:
        return
    names = list(ranks)
    default_rank = max(set(ranks.values()), key=list(ranks.values()).count)
    inject_adapter_in_model(_lora_config(default_rank, names, ranks), module, adapter_name=ADAPTER_NAME)


def add_triplane_adapters(unet: nn.Module, vae: nn.Module, ranks: AdapterRanks, output_dim: int) -> None:
    """Attach all TriplaneTurbo adapters in place to a diffusers UNet and AutoencoderKL (decoder side).

    Also replaces `vae.decoder.conv_out` by a new Conv2d(block_out_channels[0] -> output_dim, 3 x 3).
    Base weights are frozen (requires_grad False); adapter weights are trainable.
    """
    for p in list(unet.parameters()) + list(vae.parameters()):
        p.requires_grad_(False)

    # UNet attention: hexa processor on attn1, shared peft LoRA on the attn2 projections.
    processors = dict(unet.attn_processors)
    unet_ranks: dict[str, int] = {}
    for name in attention_names(unet):
        attn = unet.get_submodule(name)
        if is_self_attention(name):
            processors[f"{name}.processor"] = HexaPlaneSelfAttnProcessor.for_attention(
                attn, ranks.self_attn
            ).to(device=attn.to_q.weight.device, dtype=attn.to_q.weight.dtype)
        else:
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                unet_ranks[f"{name}.{proj}"] = ranks.cross_attn
    unet.set_attn_processor(processors)
    for name in locon_conv_names(unet):
        unet_ranks[name] = ranks.locon
    _inject_peft(unet, unet_ranks)

    decoder = vae.decoder
    decoder_ranks: dict[str, int] = {}
    for name in attention_names(decoder):
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            decoder_ranks[f"{name}.{proj}"] = ranks.self_attn
    for name in locon_conv_names(decoder):
        decoder_ranks[name] = ranks.locon
    _inject_peft(decoder, decoder_ranks)

    old = decoder.conv_out
    decoder.conv_out = nn.Conv2d(old.in_channels, output_dim, kernel_size=3, padding=1).to(
        device=old.weight.device, dtype=old.weight.dtype
    )

    for module in (unet, decoder):
        for name, p in module.named_parameters():
            p.requires_grad_(is_adapter_parameter(name))
    decoder.conv_out.requires_grad_(True)


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name belongs to a LoRA / LoCon / hexa-processor adapter (not conv_out)."""
    return ".lora_A." in name or ".lora_B." in name or ".processor." in name


@contextmanager
def adapters_disabled(*modules: nn.Module) -> Iterator[None]:
    """Run the wrapped base layers without any adapter (peft LoRA / LoCon and hexa processors)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]
    hexa = [m for module in modules for m in module.modules() if isinstance(m, HexaPlaneSelfAttnProcessor)]
    # peft's enable_adapters also flips requires_grad: remember and restore it
    requires_grad = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        for proc in hexa:
            proc.enabled = False
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for proc in hexa:
            proc.enabled = True
        for p, flag in requires_grad:
            p.requires_grad_(flag)


def merge_adapters(*modules: nn.Module, merge: bool = True) -> int:
    """Fold the peft LoRA / LoCon weights into their base layers (inference speed-up), or unfold them.

    Merged layers compute W' x with W' = W + B A: the same function in one kernel instead of three.
    The per-plane hexa self-attention LoRAs cannot be merged (each plane has its own) and stay as they
    are. Training must run unmerged. Returns the number of layers changed.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    changed = 0
    for module in modules:
        for layer in module.modules():
            if not isinstance(layer, BaseTunerLayer) or bool(layer.merged) == merge:
                continue
            layer.merge() if merge else layer.unmerge()
            changed += 1
    return changed
