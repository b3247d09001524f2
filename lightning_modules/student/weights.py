"""Checkpoint I/O of the TriplaneTurbo student: config.json, the official .pth layout, own safetensors, hub ids.

Formats read by `load_student_weights`:
- the official release layout (`triplane_turbo_sd_v1.pth`): a torch zip-pickle `{"epoch", "global_step",
  "pytorch-lightning_version", "state_dict"}` whose state_dict keys are `geometry.bbox`,
  `geometry.space_generator.peft_layers.layers.<i>.<param>` and `geometry.{sdf,feature,deformation}_network.
  layers.<2k>.weight`. The index i follows the reference's insertion order, derived here from the module tree
  (`official_module_order`). Loaded with `torch.load(weights_only=True)`.
- the project's own format (`save_pretrained`): `model.safetensors` holding the trainable state dict under
  the student's module names, plus `config.json`.
Either key layout is accepted in either container (.pth / .ckpt / .pt or .safetensors).

`config.json` (`StudentConfig`, config.py) uses the field names of the reference pipeline config.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_modules.student.adapters import (
    ADAPTER_NAME,
    PLANE_NAMES,
    attention_names,
    locon_conv_names,
)
from lightning_modules.student.config import BASE_HUB_ID, StudentConfig, StudentWeightsError, _one_line
from renderers.errors import UserError

if TYPE_CHECKING:
    from lightning_modules.student.triplane_student import TriplaneStudent

WEIGHTS_HUB_ID = "ZhiyuanthePony/TriplaneTurbo"
WEIGHTS_FILENAME = "triplane_turbo_sd_v1.pth"
CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
OFFICIAL_PREFIX = "geometry."
PEFT_PREFIX = "geometry.space_generator.peft_layers.layers."
OWN_FORMAT = "prd-triplaneturbo-student"
_MAX_LISTED = 20


class StudentFileNotFoundError(UserError, FileNotFoundError):
    """A base model or weights file is missing (one-line message with how to get it)."""

    def __str__(self) -> str:  # FileNotFoundError would otherwise format (errno, strerror)
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------------------- resolution


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None and not name.startswith((".", "~"))


_BASE_FILES = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
_BASE_REQUIRED = ["unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"]


def resolve_base(base: str | os.PathLike) -> Path:
    """A diffusers Stable Diffusion directory, or a hub id downloaded with `snapshot_download`.

    Local directories are used as they are (offline). Errors are one line and say how to fetch the model.
    """
    text = os.fspath(base)
    path = Path(text).expanduser()
    if not path.exists():
        if not _looks_like_hub_id(text):
            raise StudentFileNotFoundError(
                f"base model directory {text!r} does not exist; pass a diffusers Stable Diffusion directory "
                f"or a hub id such as {BASE_HUB_ID} (to fetch it: `hf download {BASE_HUB_ID} "
                f"--local-dir DIR`)"
            )
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(text, allow_patterns=_BASE_FILES))
        except Exception as err:
            raise StudentFileNotFoundError(
                f"base model {text!r} is neither a local directory nor downloadable from the Hugging Face hub "
                f"({type(err).__name__}: {_one_line(err)}); fetch it with `hf download {text} "
                f"--local-dir DIR` and pass DIR"
            ) from None
    if not path.is_dir():
        raise StudentFileNotFoundError(
            f"base model {text!r} is not a directory (expected a diffusers SD layout)"
        )
    missing = [name for name in _BASE_REQUIRED if not (path / name).is_file()]
    if missing:
        raise StudentFileNotFoundError(
            f"base model directory {str(path)!r} lacks {', '.join(missing)}; expected a diffusers Stable "
            f"Diffusion layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/), e.g. {BASE_HUB_ID}"
        )
    return path


_WEIGHT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")


def resolve_weights(weights: str | os.PathLike, filename: str = WEIGHTS_FILENAME) -> tuple[Path, Path | None]:
    """-> (weights file, config.json beside it or None).

    `weights` is a file, a directory (with `model.safetensors`, or exactly one .pth/.ckpt/.pt/.safetensors
    file) or a hub id (`ZhiyuanthePony/TriplaneTurbo`, file `filename`, resolved with `hf_hub_download`).
    """
    text = os.fspath(weights)
    path = Path(text).expanduser()
    how = (
        f"the released weights are {WEIGHTS_FILENAME} in the hub repo {WEIGHTS_HUB_ID}: "
        f"`hf download {WEIGHTS_HUB_ID} {WEIGHTS_FILENAME} --local-dir DIR`"
    )
    if path.is_file():
        config = path.parent / CONFIG_NAME
        return path, (config if config.is_file() else None)
    if path.is_dir():
        candidates = (
            [path / SAFETENSORS_NAME]
            if (path / SAFETENSORS_NAME).is_file()
            else sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
        )
        if len(candidates) != 1:
            found = ", ".join(p.name for p in candidates) or "none"
            raise StudentFileNotFoundError(
                f"weights directory {text!r} must hold {SAFETENSORS_NAME} or exactly one checkpoint file "
                f"(.pth/.ckpt/.pt/.safetensors), found {found}; {how}"
            )
        config = path / CONFIG_NAME
        return candidates[0], (config if config.is_file() else None)
    if _looks_like_hub_id(text) and not path.suffix:
        from huggingface_hub import hf_hub_download

        try:
            file = Path(hf_hub_download(text, filename))
        except Exception as err:
            raise StudentFileNotFoundError(
                f"weights {text!r} are not a local path and {filename} could not be fetched from the hub repo "
                f"{text} ({type(err).__name__}: {_one_line(err)}); {how}"
            ) from None
        try:
            config = Path(hf_hub_download(text, CONFIG_NAME))
        except Exception:
            config = None  # the official release has no config.json: full-size defaults
        return file, config
    raise StudentFileNotFoundError(f"weights file {text!r} not found; {how}")


def check_local_paths(base: str | os.PathLike | None = None, weights: str | os.PathLike | None = None) -> None:
    """The one-line errors of `resolve_base` / `resolve_weights` for local paths, without loading anything and
    without the network: for checks before any work. Hub ids are left to the loaders, except with
    `HF_HUB_OFFLINE=1`, when they must be in the Hugging Face cache."""
    from teachers.base import cached_hub_file, hub_offline, missing_pipeline_files

    if weights is not None:
        text = os.fspath(weights)
        if Path(text).expanduser().exists() or not (_looks_like_hub_id(text) and not Path(text).suffix):
            resolve_weights(weights)
        elif hub_offline() and cached_hub_file(text, WEIGHTS_FILENAME) is None:
            raise StudentFileNotFoundError(
                f"weights {text!r} are not a local path and {WEIGHTS_FILENAME} of the hub repo {text} is not in the "
                f"local cache (HF_HUB_OFFLINE is set): fetch it with `hf download {text} {WEIGHTS_FILENAME} "
                "--local-dir DIR` and pass DIR, or unset HF_HUB_OFFLINE"
            )
    if base is not None:
        text = os.fspath(base)
        if Path(text).expanduser().exists() or not _looks_like_hub_id(text):
            resolve_base(base)
            return
        missing = missing_pipeline_files(text, ("unet", "vae", "scheduler", "text_encoder", "tokenizer"))
        if missing:  # only with HF_HUB_OFFLINE=1 (else None: the loader downloads it)
            raise StudentFileNotFoundError(
                f"base model {text!r} is not a local directory and the hub id is not in the local cache (HF_HUB_OFFLINE "
                f"is set; lacking {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): fetch it with "
                f"`hf download {text} --local-dir DIR` and pass DIR, or unset HF_HUB_OFFLINE"
            )


# -------------------------------------------------------------------------------------- official layout


@dataclass(frozen=True)
class OfficialModule:
    """One `peft_layers.layers.<index>` entry: its kind and the module path inside the student."""

    index: int
    kind: str  # "hexa" | "lora" | "locon" | "conv_out"
    path: str

    @property
    def reference_path(self) -> str:
        """The reference's name for this module (as in meta.json / triplaneturbo_official_keys.txt)."""
        if self.kind in ("hexa", "lora"):
            name = self.path.removeprefix("unet.").removeprefix("vae.")
            return f"{name}.processor"
        if self.kind == "locon":
            return f"{self.path.removeprefix('unet.').removeprefix('vae.')}.lora_layer"
        return self.path


def official_module_order(student: TriplaneStudent) -> list[OfficialModule]:
    """The reference's insertion order of `peft_layers.layers.<i>`, derived from the module tree:

    1. UNet attention processors in `attn_processors` order (attn1 -> hexa LoRA, attn2 -> shared LoRA);
    2. the VAE decoder attention processors (shared LoRA);
    3. the UNet LoCon convs in module-tree order; 4. the VAE decoder LoCon convs; 5. the new conv_out.
    """
    entries: list[tuple[str, str]] = []
    for name in student.unet.attn_processors:
        attn = name.removesuffix(".processor")
        entries.append(("hexa" if attn.endswith("attn1") else "lora", f"unet.{attn}"))
    entries += [("lora", f"vae.decoder.{name}") for name in attention_names(student.vae.decoder)]
    entries += [("locon", f"unet.{name}") for name in locon_conv_names(student.unet)]
    entries += [("locon", f"vae.decoder.{name}") for name in locon_conv_names(student.vae.decoder)]
    entries.append(("conv_out", "vae.decoder.conv_out"))
    return [OfficialModule(i, kind, path) for i, (kind, path) in enumerate(entries)]


def _peft_weight(module: torch.nn.Module, which: str) -> Tensor:
    return getattr(module, which)[ADAPTER_NAME].weight


def _official_views(student: TriplaneStudent) -> Iterator[tuple[str, Tensor]]:
    """(official key, tensor) pairs; each tensor is the student's parameter or a view into it."""
    yield f"{OFFICIAL_PREFIX}bbox", student.bbox
    for entry in official_module_order(student):
        prefix = f"{PEFT_PREFIX}{entry.index}."
        module = student.get_submodule(entry.path)
        if entry.kind == "hexa":
            proc = module.processor
            for plane in ("xy", "xz", "yz"):
                for part in ("geo", "tex"):
                    p = PLANE_NAMES.index(f"{plane}_{part}")
                    for k, proj in enumerate(("q", "k", "v")):
                        yield f"{prefix}to_{proj}_{plane}_lora_{part}.down.weight", proc.qkv_down[k, p]
                        yield f"{prefix}to_{proj}_{plane}_lora_{part}.up.weight", proc.qkv_up[k, p]
                    yield f"{prefix}to_out_{plane}_lora_{part}.down.weight", proc.out_down[p]
                    yield f"{prefix}to_out_{plane}_lora_{part}.up.weight", proc.out_up[p]
        elif entry.kind == "lora":
            for proj, layer in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("out", "to_out.0")):
                sub = module.get_submodule(layer)
                yield f"{prefix}to_{proj}_lora.down.weight", _peft_weight(sub, "lora_A")
                yield f"{prefix}to_{proj}_lora.up.weight", _peft_weight(sub, "lora_B")
        elif entry.kind == "locon":
            yield f"{prefix}down.weight", _peft_weight(module, "lora_A")
            yield f"{prefix}up.weight", _peft_weight(module, "lora_B")
        else:
            yield f"{prefix}weight", module.weight
            yield f"{prefix}bias", module.bias
    for net in ("sdf_network", "feature_network", "deformation_network"):
        mlp = getattr(student, net)
        if mlp is not None:
            for name, p in mlp.named_parameters():
                yield f"{OFFICIAL_PREFIX}{net}.{name}", p


def official_state_dict(student: TriplaneStudent) -> dict[str, Tensor]:
    """The student's trainable weights under the official checkpoint keys (detached contiguous copies)."""
    return {key: t.detach().clone().contiguous() for key, t in _official_views(student)}


def official_key_shapes(student: TriplaneStudent) -> dict[str, tuple[int, ...]]:
    """Official key -> shape, without copying (works for students on the meta device)."""
    return {key: tuple(t.shape) for key, t in _official_views(student)}


def save_official_checkpoint(student: TriplaneStudent, path: str | os.PathLike) -> None:
    """Write the official `triplane_turbo_sd_v1.pth` container and key layout (float32)."""
    state = {k: v.float().cpu() for k, v in official_state_dict(student).items()}
    torch.save(
        {"epoch": 0, "global_step": 0, "pytorch-lightning_version": "2.0.0", "state_dict": state}, path
    )


# ------------------------------------------------------------------------------------------- loading

# The section of a PRD training checkpoint (`prd fit`) that records the student's config: the key of
# `lightning_modules.training.checkpoints.CHECKPOINT_KEY` (named here: this layer does not import training/).
TRAINING_CHECKPOINT_SECTION = "prd"


def training_checkpoint_config(path: str | os.PathLike) -> StudentConfig | None:
    """The student config a PRD training checkpoint (`prd fit`'s .ckpt) recorded, with the base it was trained
    on, or None for any other file. Checkpoints written before the student recorded its base give the module's
    `base` hyper-parameter instead of the default hub id."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None  # not a zip checkpoint: read_state_dict says what is wrong with it
    section = checkpoint.get(TRAINING_CHECKPOINT_SECTION) if isinstance(checkpoint, dict) else None
    if not isinstance(section, dict) or not isinstance(section.get("student_config"), dict):
        return None
    config = StudentConfig.from_dict(section["student_config"], source=f"{path} (its student_config)")
    hparams = checkpoint.get("hyper_parameters")
    base = hparams.get("base") if isinstance(hparams, dict) else None
    if config.base_model_name_or_path == BASE_HUB_ID and isinstance(base, str) and base:
        config = replace(config, base_model_name_or_path=base)
    return config



def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a .safetensors file or a torch checkpoint (loaded with weights_only=True)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise StudentWeightsError(
                f"weights file {path} is not a valid safetensors file: {_one_line(err)}"
            ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise StudentWeightsError(
            f"weights file {path} is not a readable PyTorch checkpoint (corrupt, or not a checkpoint): "
            f"{_one_line(err)}"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    ):
        raise StudentWeightsError(
            f"weights file {path} holds no state dict of tensors (expected the official layout with a "
            f"'state_dict' entry, or a flat name -> tensor dict)"
        )
    return obj


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _check_keys(path: str, got: dict[str, Tensor], expected: dict[str, tuple[int, ...]], hint: str) -> None:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
        raise StudentWeightsError(
            f"weights file {path} does not fit the student ({hint}): {'; '.join(parts)}"
        )
    wrong = [
        f"{k} {tuple(got[k].shape)} vs {expected[k]}" for k in expected if tuple(got[k].shape) != expected[k]
    ]
    if wrong:
        raise StudentWeightsError(
            f"weights file {path} does not fit the student ({hint}): {len(wrong)} wrong shape(s) "
            f"(file vs model): {_listing(wrong)}"
        )


def is_official_layout(state: dict[str, Tensor]) -> bool:
    return any(k.startswith(OFFICIAL_PREFIX) for k in state)


def load_student_weights(student: TriplaneStudent, path: str | os.PathLike) -> str:
    """Load a checkpoint (official or own layout) into the student, strictly. Returns the layout name."""
    path = str(path)
    state = read_state_dict(path)
    hint = student.config_summary()
    if is_official_layout(state):
        views = dict(_official_views(student))
        _check_keys(path, state, {k: tuple(v.shape) for k, v in views.items()}, hint)
        with torch.no_grad():
            for key, view in views.items():
                view.copy_(state[key].to(view.dtype))
        return "official"
    own = student.trainable_state_dict()
    state = _strip_wrapper_prefix(state, student)
    _check_keys(path, state, {k: tuple(v.shape) for k, v in own.items()}, hint)
    student.load_trainable_state_dict(state)
    return "own"


def _strip_wrapper_prefix(state: dict[str, Tensor], student: TriplaneStudent) -> dict[str, Tensor]:
    """Accept a full state dict of a module that holds the student (e.g. a Lightning checkpoint with keys
    `student.unet...`): keep the keys under that prefix and drop the student's frozen base weights."""
    own = student.trainable_state_dict()
    if not own or any(k in state for k in own):
        return state
    probe = next(iter(own))
    prefixes = {k[: -len(probe)] for k in state if k.endswith("." + probe)}
    if len(prefixes) != 1:
        return state
    (prefix,) = prefixes
    inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    frozen = {name for name, _ in student.named_parameters() if name not in own}
    frozen |= {name for name, _ in student.named_buffers()}
    return {k: v for k, v in inner.items() if k not in frozen}


def save_own_weights(student: TriplaneStudent, directory: str | os.PathLike) -> Path:
    """`directory/model.safetensors` (trainable state dict, module names) + `directory/config.json`."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in student.trainable_state_dict().items()}
    save_file(state, str(directory / SAFETENSORS_NAME), metadata={"format": OWN_FORMAT})
    student.config.to_json(directory / CONFIG_NAME)
    return directory
