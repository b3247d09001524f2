"""CLIP score and CLIP Recall@1 of multi-view renders, as a torchmetrics Metric on open_clip.

Protocol (the TriplaneTurbo reference's evaluation, after CLIPScore, Hessel et al. 2021):
- every view of every object is one image; its caption is `caption_prefix + prompt`;
- CLIPScore of an image = 2.5 * max(cos(image embedding, caption embedding), 0), averaged over all
  views of all objects;
- Recall@1: each image retrieves the most similar caption among all UNIQUE prompts seen by the metric
  (on all ranks); the fraction of images that retrieve their own prompt.

The CLIP model is held by the metric but is not a registered submodule: it does not enter the state
dict or the parameters of a LightningModule that owns the metric, and it follows the images' device.

open_clip weights are only read from disk (a local file, a `local-dir:` folder, or the open_clip /
Hugging Face caches); nothing is downloaded unless `allow_download=True`.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from renderers.errors import UserError
from teachers.base import hub_offline

DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "openai"
# The CLIPScore paper joins prefix and caption with a space. The TriplaneTurbo reference script
# concatenates them without one ("A photo depictsa cat"); pass caption_prefix="A photo depicts" to
# reproduce that exactly.
DEFAULT_CAPTION_PREFIX = "A photo depicts "
CLIP_SCORE_WEIGHT = 2.5
# open_clip's preferred file names in a Hugging Face repo, safetensors first (as open_clip itself tries).
_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_OFFLINE_NOTE = " (HF_HUB_OFFLINE is set, so nothing is downloaded)"


class CLIPWeightsNotFoundError(UserError, FileNotFoundError):
    """open_clip weights are not on this machine (one-line message says what to fetch)."""


class CLIPWeightsError(UserError, ValueError):
    """A CLIP weights file that exists but does not load into the model (corrupt, another model; one line)."""


# ----------------------------------------------------------------------------------------------
# Loading open_clip offline
# ----------------------------------------------------------------------------------------------


def _hf_candidates(hf_hub: str) -> tuple[str, list[str]]:
    """open_clip's `hf_hub` field ("org/repo/" or "org/repo/file") -> (repo id, candidate file names)."""
    repo_id, filename = os.path.split(hf_hub)
    if not filename:
        return repo_id, list(_HF_WEIGHT_FILES)
    if filename.endswith((".bin", ".pth")):
        return repo_id, [filename[:-4] + ".safetensors", filename]
    return repo_id, [filename]


def cached_pretrained_file(pretrained_cfg: dict, cache_dir: str | None = None) -> str | None:
    """Path of the weights of an open_clip pretrained tag if they are already on disk, else None.

    Looks where open_clip's own download would put them: the Hugging Face hub cache (`hf_hub`) and
    open_clip's URL cache (`cache_dir` or ~/.cache/clip).
    """
    if pretrained_cfg.get("file"):
        return pretrained_cfg["file"] if os.path.isfile(pretrained_cfg["file"]) else None
    if pretrained_cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo_id, names = _hf_candidates(pretrained_cfg["hf_hub"])
        for name in names:
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if pretrained_cfg.get("url"):
        target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(pretrained_cfg["url"])
        if target.is_file():
            return str(target)
    return None


def _missing_weights_message(model_name: str, tag: str, pretrained_cfg: dict, cache_dir: str | None) -> str:
    where = []
    if pretrained_cfg.get("hf_hub"):
        repo_id, names = _hf_candidates(pretrained_cfg["hf_hub"])
        where.append(f"Hugging Face repo {repo_id} file {names[0]} (`hf download {repo_id} {names[0]}`)")
    if pretrained_cfg.get("url"):
        where.append(f"{pretrained_cfg['url']} (into {cache_dir or '~/.cache/clip'})")
    return (
        f"open_clip weights for {model_name} (pretrained {tag!r}) are not on this machine: open_clip would "
        f"download {' or '.join(where)}; fetch them once (or rerun with --clip-download), or pass the file "
        f"with --clip-checkpoint PATH (Python: checkpoint=PATH)"
    )


# The first bytes of the file formats open_clip's loader reads (`open_clip.factory.load_state_dict`: safetensors by
# the .safetensors suffix, NumPy for .npz / .npy, else `torch.load`: a zip archive or the legacy pickle format).
_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _weights_format(path: Path) -> str | None:
    """What `path` holds by its first bytes: "safetensors", "zip", "npy", "torch-legacy" or None."""
    with path.open("rb") as file:
        head = file.read(16)
        if len(head) >= 10 and head[8:9] == b"{":
            (header_size,) = struct.unpack("<Q", head[:8])
            if 2 <= header_size <= 100_000_000:
                return "safetensors"
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return "torch-legacy"
    return None


def check_weights_file(path: str | os.PathLike, option: str = "--clip-checkpoint") -> Path:
    """A cheap check, before any model is built, that `path` is a weights file open_clip can read: its header
    only (a safetensors header, a zip archive with a complete directory, a NumPy array, or PyTorch's legacy
    format), nothing is unpickled. One-line `CLIPWeightsError` for random bytes, a truncated archive, a
    safetensors file under another suffix (open_clip picks the reader by the suffix) and the like."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise CLIPWeightsNotFoundError(f"CLIP checkpoint file not found: {file}")
    kind = _weights_format(file)
    suffix = file.suffix.lower()
    fix = "pass the weights file of the CLIP model (.safetensors, or a PyTorch .bin / .pt / .pth)"
    if kind is None:
        raise CLIPWeightsError(
            f"{option} {str(path)!r} is not a weights file (neither safetensors, nor a PyTorch checkpoint, nor "
            f"NumPy; corrupt or another kind of file): {fix}"
        )
    if suffix == ".safetensors" or kind == "safetensors":
        if kind != "safetensors":
            raise CLIPWeightsError(f"{option} {str(path)!r} ends in .safetensors but holds no safetensors header: {fix}")
        if suffix != ".safetensors":
            raise CLIPWeightsError(
                f"{option} {str(path)!r} is a safetensors file named {suffix or 'without a suffix'}: open_clip reads "
                "it by its suffix, rename it to .safetensors"
            )
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as weights:
                weights.keys()
        except Exception as err:
            raise CLIPWeightsError(
                f"{option} {str(path)!r} is not a readable safetensors file (truncated or corrupt: "
                f"{' '.join(str(err).split())[:120]}): {fix}"
            ) from None
    elif kind == "zip":
        import zipfile

        try:
            with zipfile.ZipFile(file) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            raise CLIPWeightsError(
                f"{option} {str(path)!r} is a truncated or corrupt archive ({err}): {fix}"
            ) from None
        if suffix not in (".npz", ".npy") and not any(name.endswith("data.pkl") for name in names):
            raise CLIPWeightsError(f"{option} {str(path)!r} is a zip archive but not a PyTorch checkpoint: {fix}")
    return file


def load_open_clip(
    model_name: str = DEFAULT_CLIP_MODEL,
    pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
    checkpoint: str | os.PathLike | None = None,
    cache_dir: str | None = None,
    allow_download: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, object]:
    """Build an open_clip model with its weights and its tokenizer, offline by default.

    model_name: a built-in open_clip architecture ("ViT-B-32", "ViT-L-14", ...), or
        "local-dir:/path" (a folder with open_clip_config.json and a weights file), or "hf-hub:org/repo"
        (read from the Hugging Face cache).
    pretrained: a pretrained tag of that architecture ("openai", "laion2b_s34b_b79k", ...) or a
        weights file; ignored with a schema. With `checkpoint`, the tag only chooses the tag's settings
        (QuickGELU, preprocessing) and the weights come from `checkpoint`.
    checkpoint: a local weights file (.safetensors, .bin, .pt, .pth) to load instead of the cached one.
    Returns (model in eval mode with frozen parameters, tokenizer).
    """
    import open_clip
    from open_clip.factory import parse_model_name
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    schema, identifier = parse_model_name(model_name)
    create_kwargs: dict = {"device": device, "cache_dir": cache_dir}
    if checkpoint is not None:
        checkpoint = check_weights_file(checkpoint, "CLIP checkpoint")

    if schema == "local-dir":
        folder = Path(identifier).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise CLIPWeightsNotFoundError(
                f"{folder} is not an open_clip model folder: it needs open_clip_config.json and a weights file"
            )
        if checkpoint is None and not any(any(folder.glob(p)) for p in ("*.safetensors", "*.bin", "*.pth")):
            raise CLIPWeightsNotFoundError(
                f"no weights file (*.safetensors, *.bin, *.pth) in the open_clip model folder {folder}"
            )
        create_kwargs["model_name"] = f"local-dir:{folder}"
    elif schema == "hf-hub":
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(identifier, "open_clip_config.json", cache_dir=cache_dir)
        weights = [try_to_load_from_cache(identifier, name, cache_dir=cache_dir) for name in _HF_WEIGHT_FILES]
        have_weights = checkpoint is not None or any(isinstance(w, str) for w in weights)
        if not (isinstance(config, str) and have_weights) and not (allow_download and not hub_offline()):
            raise CLIPWeightsNotFoundError(
                f"open_clip model {model_name} is not in the Hugging Face cache{_OFFLINE_NOTE if allow_download else ''}: "
                f"fetch it with `hf download {identifier} open_clip_config.json {_HF_WEIGHT_FILES[0]}` "
                "(or rerun with --clip-download), or use local-dir:/path/to/folder"
            )
        create_kwargs["model_name"] = model_name
    else:
        name = identifier.replace("/", "-")
        if name not in open_clip.list_models():
            raise UserError(f"unknown open_clip model {model_name!r}: see open_clip.list_models()")
        create_kwargs["model_name"] = name
        tag_cfg = {}
        if pretrained and os.path.isfile(os.path.expanduser(pretrained)):
            checkpoint = checkpoint or check_weights_file(pretrained, "CLIP pretrained file")
        elif pretrained:
            tag_cfg = get_pretrained_cfg(name, pretrained)
            if not tag_cfg:
                tags = ", ".join(list_pretrained_tags_by_model(name)) or "none"
                raise UserError(
                    f"{pretrained!r} is neither a pretrained tag of open_clip model {name} (tags: {tags}) nor a file"
                )
            create_kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
            preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
            create_kwargs["force_preprocess_cfg"] = preprocess
            if checkpoint is None:
                found = cached_pretrained_file(tag_cfg, cache_dir)
                if found is None and allow_download and hub_offline():
                    raise CLIPWeightsNotFoundError(
                        _missing_weights_message(name, pretrained, tag_cfg, cache_dir) + _OFFLINE_NOTE
                    )
                if found is None and allow_download:
                    try:
                        found = open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir)
                    except Exception as err:  # no network, no such file: the message says what to fetch
                        raise CLIPWeightsNotFoundError(
                            _missing_weights_message(name, pretrained, tag_cfg, cache_dir)
                            + f" (the download failed: {type(err).__name__})"
                        ) from None
                if found is None:
                    raise CLIPWeightsNotFoundError(_missing_weights_message(name, pretrained, tag_cfg, cache_dir))
                checkpoint = Path(found)
        elif checkpoint is None:
            raise UserError(
                f"open_clip model {name} needs weights: give a pretrained tag or a checkpoint file "
                "(random CLIP weights make the score meaningless)"
            )
        create_kwargs["pretrained"] = str(checkpoint)

    try:
        model = open_clip.create_model(**create_kwargs)
        if schema is not None and checkpoint is not None:
            open_clip.load_checkpoint(model, str(checkpoint))
    except Exception as err:
        if checkpoint is None:
            raise
        first = " ".join(str(err).split(".")[0].split())[:160] or type(err).__name__
        raise CLIPWeightsError(
            f"CLIP weights {checkpoint} do not load into open_clip model {model_name!r} ({type(err).__name__}: "
            f"{first}); pass the weights file of that model (.safetensors / .bin / .pt)"
        ) from None
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(create_kwargs["model_name"], cache_dir=cache_dir)
    return model, tokenizer


# ----------------------------------------------------------------------------------------------
# The metric's maths on embeddings (also used by `prd eval` for per-prompt numbers)
# ----------------------------------------------------------------------------------------------


def prompt_keys(prompts: Sequence[str]) -> Tensor:
    """Stable 63-bit integer key per prompt `[N]` (the same in every process, unlike `hash`)."""
    keys = [int.from_bytes(hashlib.sha256(p.encode("utf-8")).digest()[:8], "little") >> 1 for p in prompts]
    return torch.tensor(keys, dtype=torch.int64)


def clip_scores(image_embeds: Tensor, text_embeds: Tensor, weight: float = CLIP_SCORE_WEIGHT) -> Tensor:
    """Per-image CLIPScore `[N, V]` = weight * max(cos, 0).

    image_embeds: [N, V, D] (N objects, V views); text_embeds: [N, D], the caption of each object.
    """
    cos = (F.normalize(image_embeds, dim=-1) * F.normalize(text_embeds, dim=-1)[:, None]).sum(-1)
    return weight * cos.clamp(min=0)


def unique_prompt_index(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Unique prompts among `keys [N]`: (first occurrence of each unique prompt [U], target index [N]).

    Unique prompts are ordered by key, so the candidate list does not depend on how objects were
    split over processes.
    """
    unique, target = torch.unique(keys, sorted=True, return_inverse=True)
    positions = torch.arange(len(keys), device=keys.device)
    first = torch.full((len(unique),), len(keys), dtype=torch.long, device=keys.device)
    first = first.scatter_reduce(0, target, positions, reduce="amin")
    return first, target


def retrieve_top1(image_embeds: Tensor, candidate_embeds: Tensor) -> Tensor:
    """Index of the most similar candidate caption for each image `[N, V]`.

    image_embeds: [N, V, D]; candidate_embeds: [U, D] (one per unique prompt). Ties go to the lower
    index; the reference clamps similarities at 0 before its argmax, which only differs when every
    similarity of an image is negative.
    """
    sims = F.normalize(image_embeds, dim=-1) @ F.normalize(candidate_embeds, dim=-1).T  # [N, V, U]
    return sims.argmax(dim=-1)


# ----------------------------------------------------------------------------------------------
# The metric
# ----------------------------------------------------------------------------------------------


class CLIPScore3D(Metric):
    """CLIPScore and Recall@1 of multi-view renders of text-conditioned 3D objects.

    update(images [B, V, 3, H, W] in [0, 1], prompts: list of B str)
    compute() -> {"clip_score": scalar, "recall_at_1": scalar}

    Correct under DDP: image and caption embeddings and a stable key per prompt are gathered from
    all processes; Recall@1 candidates are the unique prompts over all processes.

    Args:
        model_name, pretrained, checkpoint, cache_dir, allow_download: see `load_open_clip`.
        caption_prefix: prepended to every prompt ("A photo depicts ").
        weight: CLIPScore's w (2.5).
        image_batch_size: images per CLIP forward pass.
        model, tokenizer: an already built open_clip model and tokenizer (skips loading).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    image_embeds: list[Tensor]
    text_embeds: list[Tensor]
    keys: list[Tensor]

    def __init__(
        self,
        model_name: str = DEFAULT_CLIP_MODEL,
        pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
        checkpoint: str | os.PathLike | None = None,
        cache_dir: str | None = None,
        allow_download: bool = False,
        caption_prefix: str = DEFAULT_CAPTION_PREFIX,
        weight: float = CLIP_SCORE_WEIGHT,
        image_batch_size: int = 64,
        model: nn.Module | None = None,
        tokenizer=None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if model is None:
            model, tokenizer = load_open_clip(model_name, pretrained, checkpoint, cache_dir, allow_download)
        elif tokenizer is None:
            raise ValueError("CLIPScore3D(model=...) also needs the model's tokenizer")
        import open_clip

        model.eval().requires_grad_(False)
        # Plain attributes, not submodules: kept out of state_dict() / parameters() of any owner.
        object.__setattr__(self, "clip_model", model)
        object.__setattr__(self, "tokenizer", tokenizer)
        self.preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
        self.caption_prefix = caption_prefix
        self.weight = float(weight)
        self.image_batch_size = int(image_batch_size)
        self._text_cache: dict[str, Tensor] = {}
        self.add_state("image_embeds", default=[], dist_reduce_fx="cat")
        self.add_state("text_embeds", default=[], dist_reduce_fx="cat")
        self.add_state("keys", default=[], dist_reduce_fx="cat")

    # -- encoders ------------------------------------------------------------------------------

    def _model_on(self, device: torch.device) -> nn.Module:
        param = next(self.clip_model.parameters())
        if param.device != device:
            self.clip_model.to(device)
        return self.clip_model

    def preprocess(self, images: Tensor) -> Tensor:
        """[N, 3, H, W] in [0, 1] -> CLIP input [N, 3, S, S] (open_clip's eval transform, on tensors)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        size = self.preprocess_cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        mode = InterpolationMode.BILINEAR if self.preprocess_cfg.get("interpolation") == "bilinear" else InterpolationMode.BICUBIC
        h, w = images.shape[-2:]
        resize_mode = self.preprocess_cfg.get("resize_mode", "shortest")
        if resize_mode == "squash" or (h, w) == size:
            target = list(size)
        else:
            pick = min if resize_mode == "shortest" else max
            scale = pick(size[0] / h, size[1] / w)
            target = [max(1, round(h * scale)), max(1, round(w * scale))]
        x = images.float()
        if list(x.shape[-2:]) != target:
            # Clamp like an 8-bit image would be after PIL's bicubic resize (the reference's path).
            x = TF.resize(x, target, interpolation=mode, antialias=True).clamp(0, 1)
        x = TF.center_crop(x, list(size))
        return TF.normalize(x, list(self.preprocess_cfg["mean"]), list(self.preprocess_cfg["std"]))

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """images [B, V, 3, H, W] in [0, 1] -> unit image embeddings [B, V, D] (float32)."""
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"CLIPScore3D expects images [B, V, 3, H, W], got {tuple(images.shape)}")
        b, v = images.shape[:2]
        model = self._model_on(images.device)
        flat = images.reshape(b * v, *images.shape[2:])
        chunks = [
            model.encode_image(self.preprocess(flat[i : i + self.image_batch_size])).float()
            for i in range(0, b * v, self.image_batch_size)
        ]
        return F.normalize(torch.cat(chunks), dim=-1).reshape(b, v, -1)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], device: torch.device | str | None = None) -> Tensor:
        """prompts (B str) -> unit caption embeddings [B, D] (float32), cached per prompt."""
        device = torch.device(device) if device is not None else next(self.clip_model.parameters()).device
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            model = self._model_on(device)
            tokens = self.tokenizer([self.caption_prefix + p for p in missing]).to(device)
            embeds = F.normalize(model.encode_text(tokens).float(), dim=-1).cpu()
            self._text_cache.update(zip(missing, embeds, strict=True))
        return torch.stack([self._text_cache[p] for p in prompts]).to(device)

    # -- metric API ----------------------------------------------------------------------------

    def update(
        self,
        images: Tensor | None,
        prompts: Sequence[str],
        image_embeds: Tensor | None = None,
        text_embeds: Tensor | None = None,
    ) -> None:
        """images [B, V, 3, H, W] in [0, 1]; prompts: B strings (one per object).

        Or, with images=None, precomputed unit embeddings: image_embeds [B, V, D] and optionally
        text_embeds [B, D] (else the prompts are encoded).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if images is not None:
            if images.ndim != 5 or images.shape[2] != 3:
                raise ValueError(f"CLIPScore3D expects images [B, V, 3, H, W], got {tuple(images.shape)}")
            if len(prompts) != images.shape[0]:
                raise ValueError(f"got {images.shape[0]} objects but {len(prompts)} prompts")
            image_embeds = self.encode_images(images)
        if image_embeds is None:
            raise ValueError("CLIPScore3D.update needs images or image_embeds")
        if text_embeds is None:
            text_embeds = self.encode_prompts(prompts, image_embeds.device)
        if image_embeds.ndim != 3 or text_embeds.ndim != 2 or len(prompts) != image_embeds.shape[0]:
            raise ValueError(
                f"expected image_embeds [B, V, D], text_embeds [B, D] and B prompts, got "
                f"{tuple(image_embeds.shape)}, {tuple(text_embeds.shape)} and {len(prompts)}"
            )
        if len(self.image_embeds) and self.image_embeds[0].shape[1:] != image_embeds.shape[1:]:
            raise ValueError(
                f"every update needs the same number of views and embedding size: "
                f"{tuple(self.image_embeds[0].shape[1:])} before, {tuple(image_embeds.shape[1:])} now"
            )
        device = image_embeds.device
        self.image_embeds.append(image_embeds.float())
        self.text_embeds.append(text_embeds.float().to(device))
        self.keys.append(prompt_keys(prompts).to(device))

    def update_embeddings(self, image_embeds: Tensor, text_embeds: Tensor | None, prompts: Sequence[str]) -> None:
        """Add precomputed embeddings: image_embeds [B, V, D], text_embeds [B, D] (or None), B prompts."""
        self.update(None, prompts, image_embeds=image_embeds, text_embeds=text_embeds)

    def compute(self) -> dict[str, Tensor]:
        # After a DDP sync the list states arrive already concatenated into tensors.
        if isinstance(self.keys, list) and not self.keys:
            raise ValueError("CLIPScore3D.compute() needs at least one update()")
        image_embeds = dim_zero_cat(self.image_embeds)  # [N, V, D]
        text_embeds = dim_zero_cat(self.text_embeds)  # [N, D]
        keys = dim_zero_cat(self.keys)  # [N]
        first, target = unique_prompt_index(keys)
        top1 = retrieve_top1(image_embeds, text_embeds[first])  # [N, V]
        return {
            "clip_score": clip_scores(image_embeds, text_embeds, self.weight).mean(),
            "recall_at_1": (top1 == target[:, None]).float().mean(),
        }
