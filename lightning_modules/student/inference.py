"""Inference settings of a student: precision, memory format, torch.compile (`prd generate --dtype / --compile /
--channels-last`, `benchmarks/bench_generate.py`).

    check_inference_settings(device, "bfloat16", compile_mode="auto")   # before loading: one-line errors
    prepare_for_inference(student, torch.bfloat16, compile_mode="auto")  # in place
    seconds = warm_up(student, batch_sizes=[4, 1])                       # compile at the shapes that will run

Precision (`TriplaneStudent.set_precision`): the UNet, the VAE decoder and the text encoder run in the dtype; the
latents between the 4 DDIM steps and the DDIM arithmetic stay float32, and so does the field (planes, MLPs,
grid points, marching cubes, vertex colours), whose inputs are coordinates. float16 and bfloat16 run on the CPU
too (slowly: they are meant for CUDA).

Attention: every attention of the UNet and the VAE runs through `F.scaled_dot_product_attention` (diffusers'
`AttnProcessor2_0`, the joint 6-plane `HexaPlaneSelfAttnProcessor`; the CLIP text encoder's "sdpa"), which
picks flash / memory-efficient kernels on CUDA; `attention_implementations` lists them.

Compile: `torch.compile` of the UNet's and the VAE decoder's forward (fixed shapes, `dynamic=False`: each batch
size compiles once, which `warm_up` does ahead of the timed run). Modes: "default", "max-autotune-no-cudagraphs",
and on CUDA only "reduce-overhead" / "max-autotune" (CUDA graphs; their outputs are cloned, as a graph's next
replay overwrites them). "auto": "reduce-overhead" on CUDA, "default" elsewhere. The CPU needs a C++ compiler.
"""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from renderers.errors import UserError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class InferenceSettingsError(UserError, ValueError):
    """A precision / compile setting this device cannot run (one-line message)."""


def resolve_compile_mode(mode: str, device: torch.device) -> str:
    """"auto" -> "reduce-overhead" (CUDA graphs) on CUDA, "default" elsewhere; other modes as given."""
    if mode == "auto":
        return "reduce-overhead" if device.type == "cuda" else "default"
    return mode


def check_inference_settings(device: torch.device, dtype: str = "float32", compile_mode: str | None = None) -> None:
    """Raise `InferenceSettingsError` for a dtype or compile mode that cannot run on `device` (before loading)."""
    if dtype not in DTYPES:
        raise InferenceSettingsError(f"--dtype {dtype!r} is not a dtype: use {', '.join(DTYPES)}")
    if compile_mode is None:
        return
    if compile_mode not in COMPILE_MODES:
        raise InferenceSettingsError(f"--compile-mode {compile_mode!r} is unknown: use {', '.join(COMPILE_MODES)}")
    mode = resolve_compile_mode(compile_mode, device)
    if mode in CUDA_GRAPH_MODES and device.type != "cuda":
        raise InferenceSettingsError(f"--compile-mode {mode} uses CUDA graphs and needs a CUDA device, not "
                                     f"{device.type}: use --compile-mode default")
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise InferenceSettingsError("--compile on the CPU needs a C++ compiler (g++, c++ or clang++ on the PATH): "
                                     "install one or drop --compile")


@contextmanager
def _quiet_diffusers_casts():
    """diffusers warns on every `.to(dtype)` of a model that has no modules to keep in float32 ("[]")."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def attention_implementations(student) -> dict[str, set[str]]:
    """network -> the attention implementations it runs: processor class names for the UNet and the VAE, the
    `_attn_implementation` of the text encoder. All of them call `F.scaled_dot_product_attention`."""
    found = {"unet": {type(p).__name__ for p in student.unet.attn_processors.values()},
             "vae": {type(p).__name__ for p in student.vae.attn_processors.values()}}
    if student.text_encoder is not None:
        found["text_encoder"] = {str(getattr(student.text_encoder.config, "_attn_implementation", "eager"))}
    return found


def _clone_outputs(out):
    """A copy of a network's output (a tensor, or a diffusers output dataclass of tensors)."""
    if isinstance(out, Tensor):
        return out.clone()
    if hasattr(out, "items"):
        return type(out)(**{key: value.clone() if isinstance(value, Tensor) else value for key, value in out.items()})
    return out


def compile_forward(module: nn.Module, mode: str = "default", backend: str = "inductor") -> nn.Module:
    """Replace `module.forward` by its `torch.compile` (fixed shapes) in place; module names and the state dict stay
    as they are (`uncompile_forward` undoes it). CUDA-graph modes clone the outputs."""
    compiled = torch.compile(module.forward, mode=None if mode == "default" else mode, backend=backend, dynamic=False)
    if mode in CUDA_GRAPH_MODES:
        def forward(*args, **kwargs):
            torch.compiler.cudagraph_mark_step_begin()
            return _clone_outputs(compiled(*args, **kwargs))
    else:
        forward = compiled
    module.forward = forward
    return module


def uncompile_forward(module: nn.Module) -> nn.Module:
    """Undo `compile_forward`: the class's own forward again."""
    module.__dict__.pop("forward", None)
    return module


def prepare_for_inference(
    student,
    dtype: torch.dtype = torch.float32,
    compile_mode: str | None = None,
    channels_last: bool = False,
    backend: str = "inductor",
):
    """Set the student up for generation, in place: `set_precision(dtype)`, optionally channels_last for the UNet and
    VAE decoder convolutions and `torch.compile` (`compile_mode`, see the module docstring) of their forwards.
    Compilation itself happens at the first call of each shape (`warm_up`). Returns the student."""
    with _quiet_diffusers_casts():
        student.set_precision(dtype)
    if channels_last:
        student.unet.to(memory_format=torch.channels_last)
        student.vae.decoder.to(memory_format=torch.channels_last)
    if compile_mode is not None:
        mode = resolve_compile_mode(compile_mode, student.device)
        check_inference_settings(student.device, "float32", mode)
        compile_forward(student.unet, mode, backend)
        compile_forward(student.vae.decoder, mode, backend)
    return student


@torch.no_grad()
def warm_up(student, batch_sizes, prompt: str = "warm-up") -> float:
    """Run the networks once at each batch size (compilation, autotuning, CUDA-graph capture happen here, not in
    the first timed objects). Returns the seconds it took."""
    from lightning_modules.student.generation import sample_fields

    start = time.perf_counter()
    for size in sorted(set(batch_sizes), reverse=True):
        sample_fields(student, [prompt] * size, list(range(size)))
    if student.device.type == "cuda":
        torch.cuda.synchronize(student.device)
    return time.perf_counter() - start


def batch_sizes_of_run(num_prompts: int, batch_size: int) -> list[int]:
    """The batch sizes a run of `num_prompts` in batches of `batch_size` meets (the last one may be smaller)."""
    sizes = [min(batch_size, num_prompts)]
    if num_prompts > batch_size and num_prompts % batch_size:
        sizes.append(num_prompts % batch_size)
    return sizes
