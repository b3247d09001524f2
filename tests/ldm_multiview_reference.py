"""An independent plain-PyTorch model of the LDM `MultiViewUNetModel` (MVDream / RichDreamer), for tests.

Written from the architecture facts in tests/fixtures/reference/*_ref_A/README.md, with the ORIGINAL
module names, so that its `state_dict()` is a checkpoint in the released key layout. It shares no
code with `teachers.multiview_unet` (no diffusers, manual softmax attention); the tests check it
against the fixtures produced by the original code, then use it as the reference for other
configurations: random weights in the original layout -> file -> `MultiViewUNet` -> same outputs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, scale_shift: bool):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, out_channels * (2 if scale_shift else 1))
        )
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        e = self.emb_layers(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2, mode="nearest"))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b, n, c = x.shape
        d = c // self.heads

        def split(
            t: Tensor,
        ) -> Tensor:  # [b, l, heads*d] -> [b, heads, l, d], head h = channels h*d..(h+1)*d-1
            return t.reshape(b, t.shape[1], self.heads, d).permute(0, 2, 1, 3)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        return self.to_out((weights @ v).permute(0, 2, 1, 3).reshape(b, n, c))


class GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * nn.functional.gelu(gate)


class TransformerBlock3D(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, num_frames: int) -> Tensor:
        n, length, c = x.shape
        grouped = x.reshape(n // num_frames, num_frames * length, c)  # views of one object side by side
        x = (self.attn1(self.norm1(grouped)) + grouped).reshape(n, length, c)
        x = self.attn2(self.norm2(x), context) + x
        return self.ff.net(self.norm3(x)) + x


class SpatialTransformer3D(nn.Module):
    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, linear: bool):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        make = (
            (lambda: nn.Linear(channels, channels)) if linear else (lambda: nn.Conv2d(channels, channels, 1))
        )
        self.proj_in = make()
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock3D(channels, context_dim, heads) for _ in range(depth)
        )
        self.proj_out = make()

    def forward(self, x: Tensor, context: Tensor, num_frames: int) -> Tensor:
        b, c, h, w = x.shape
        t = self.norm(x)
        if not self.linear:
            t = self.proj_in(t)
        t = t.flatten(2).transpose(1, 2)
        if self.linear:
            t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, context, num_frames)
        if self.linear:
            t = self.proj_out(t)
        t = t.transpose(1, 2).reshape(b, c, h, w)
        if not self.linear:
            t = self.proj_out(t)
        return t + x


class Entry(nn.Sequential):
    """One numbered LDM block entry: layers applied in order, each taking what it needs."""

    def forward(self, h: Tensor, emb: Tensor, context: Tensor, num_frames: int) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer3D):
                h = layer(h, context, num_frames)
            else:
                h = layer(h)
        return h


class ReferenceMultiViewUNet(nn.Module):
    """LDM MultiViewUNetModel from its yaml `unet_config.params` (the subset the released models use)."""

    def __init__(self, params: dict):
        super().__init__()
        c = params["model_channels"]
        mult = list(params["channel_mult"])
        nrb = params["num_res_blocks"]
        nrb = [nrb] * len(mult) if isinstance(nrb, int) else list(nrb)
        attn_res = set(params["attention_resolutions"])
        depth = params.get("transformer_depth", 1)
        ctx = params["context_dim"]
        linear = params.get("use_linear_in_transformer", False)
        ss = params.get("use_scale_shift_norm", False)
        nhc, nh = params.get("num_head_channels", -1), params.get("num_heads", -1)
        heads = lambda ch: ch // nhc if nhc != -1 else nh  # noqa: E731
        temb = 4 * c
        self.model_channels = c
        self.time_embed = nn.Sequential(nn.Linear(c, temb), nn.SiLU(), nn.Linear(temb, temb))
        if params.get("camera_dim") is not None:
            self.camera_embed = nn.Sequential(
                nn.Linear(params["camera_dim"], temb), nn.SiLU(), nn.Linear(temb, temb)
            )
        else:
            self.camera_embed = None
        self.input_blocks = nn.ModuleList([Entry(nn.Conv2d(params["in_channels"], c, 3, padding=1))])
        skips, ch = [c], c
        for level, m in enumerate(mult):
            for _ in range(nrb[level]):
                layers = [ResBlock(ch, temb, c * m, ss)]
                ch = c * m
                if 2**level in attn_res:
                    layers.append(SpatialTransformer3D(ch, heads(ch), depth, ctx, linear))
                self.input_blocks.append(Entry(*layers))
                skips.append(ch)
            if level != len(mult) - 1:
                self.input_blocks.append(Entry(Downsample(ch)))
                skips.append(ch)
        self.middle_block = Entry(
            ResBlock(ch, temb, ch, ss),
            SpatialTransformer3D(ch, heads(ch), depth, ctx, linear),
            ResBlock(ch, temb, ch, ss),
        )
        self.output_blocks = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(nrb[level] + 1):
                layers = [ResBlock(ch + skips.pop(), temb, c * m, ss)]
                ch = c * m
                if 2**level in attn_res:
                    layers.append(SpatialTransformer3D(ch, heads(ch), depth, ctx, linear))
                if level and i == nrb[level]:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Entry(*layers))
        self.out = nn.Sequential(
            nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(c, params["out_channels"], 3, padding=1)
        )

    def timestep_embedding(self, timesteps: Tensor) -> Tensor:
        half = self.model_channels // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = timesteps[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(
        self, x: Tensor, timesteps: Tensor, context: Tensor, camera: Tensor | None, num_frames: int
    ) -> Tensor:
        emb = self.time_embed(self.timestep_embedding(timesteps))
        if camera is not None:
            emb = emb + self.camera_embed(camera)
        hs, h = [], x
        for entry in self.input_blocks:
            h = entry(h, emb, context, num_frames)
            hs.append(h)
        h = self.middle_block(h, emb, context, num_frames)
        for entry in self.output_blocks:
            h = entry(torch.cat([h, hs.pop()], dim=1), emb, context, num_frames)
        return self.out(h)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter non-zero and O(1)-scaled: matrices ~ N(0, 1/fan_in), norm scales ~ 1 + 0.2 N, biases ~ 0.1 N."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim >= 2:
            p.copy_(noise / math.sqrt(p[0].numel()))
        elif name.endswith("weight"):
            p.copy_(1 + 0.2 * noise)
        else:
            p.copy_(0.1 * noise)
    return model
