"""Text embeddings for the teachers, one processor per text encoder, cached on disk per prompt.

A `PromptProcessor` wraps one CLIP text encoder (the `text_encoder` + `tokenizer` of a diffusers
Stable Diffusion directory or hub id) and returns `last_hidden_state` `[B, 77, D]` for a list of
prompts. Every embedding is cached:

    <cache_dir>/<encoder key>/<sha1(prompt)>.safetensors     tensor "embedding" [77, D]

where the encoder key is `<sanitised path or hub id>-<sha1 of the text encoder + tokenizer configs>`,
so two different encoders never share files. Files are written atomically (temporary file in the
same folder, then `os.replace`), so concurrent writers (several processes, several nodes on a
shared disk) never leave a half-written file: the last writer wins with identical values.

Under DDP call `prepare(all_prompts)` once (e.g. in `setup`): rank 0 encodes and writes every
missing prompt, then all ranks meet at a barrier and afterwards only read. A prompt missed later
is encoded by whichever rank needs it (no barrier there, ranks see different prompts).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from teachers.base import TeacherWeightsNotFoundError, missing_pipeline_error, resolve_dtype

DEFAULT_CACHE_DIR = Path(os.environ.get("PRD_CACHE_DIR", Path.home() / ".cache" / "prd")) / "text_embeddings"


@dataclass
class PromptEmbeddings:
    """Conditional and unconditional (negative-prompt) text embeddings of a batch of prompts.

    cond:   [B, L, D]   uncond: [B, L, D]   encoder_key: which processor made them.
    """

    cond: Tensor
    uncond: Tensor
    encoder_key: str

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptEmbeddings:
        return PromptEmbeddings(self.cond.to(device, dtype), self.uncond.to(device, dtype), self.encoder_key)


def prompt_filename(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest() + ".safetensors"


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class PromptProcessor:
    """Prompt -> CLIP text embedding `[L, D]`, cached in memory and on disk.

    Args:
        pretrained: a diffusers Stable Diffusion directory or hub id holding `text_encoder/` and
            `tokenizer/` (e.g. "stabilityai/stable-diffusion-2-1-base", 1024-d, or
            "stable-diffusion-v1-5/stable-diffusion-v1-5", 768-d).
        cache_dir: root of the disk cache (default `$PRD_CACHE_DIR/text_embeddings`, else
            `~/.cache/prd/text_embeddings`); None with `disk_cache=False` keeps memory only.
        device: where the text encoder runs when a prompt is missing (default: CUDA if
            available, else CPU). The encoder is only loaded when needed.
        dtype: text encoder dtype; embeddings are stored in `cache_dtype` (float32 default;
            float16 halves the disk use, about 0.3 MB -> 0.16 MB per prompt for SD 2.1).
        batch_size: prompts per encoder call.
        memory_cache_size: how many embeddings to keep in memory (least recently used dropped).
    """

    def __init__(
        self,
        pretrained: str,
        cache_dir: str | os.PathLike | None = None,
        disk_cache: bool = True,
        device: str | None = None,
        dtype: str | torch.dtype = "float32",
        cache_dtype: str | torch.dtype = "float32",
        text_encoder_subfolder: str = "text_encoder",
        tokenizer_subfolder: str = "tokenizer",
        batch_size: int = 32,
        memory_cache_size: int = 4096,
    ) -> None:
        self.pretrained = str(pretrained)
        self.cache_root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
        self.disk_cache = disk_cache
        self.device = torch.device(device) if device else None
        self.dtype = resolve_dtype(dtype)
        self.cache_dtype = resolve_dtype(cache_dtype)
        self.text_encoder_subfolder = text_encoder_subfolder
        self.tokenizer_subfolder = tokenizer_subfolder
        self.batch_size = batch_size
        self.memory_cache_size = memory_cache_size
        self._memory: OrderedDict[str, Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._key: str | None = None
        self._tokenizer = None
        self._text_encoder = None
        self.num_encoded = 0  # prompts run through the text encoder by this processor
        self.num_encoder_calls = 0

    # ------------------------------------------------------------------ identity
    def _missing_weights(self, what: str) -> TeacherWeightsNotFoundError:
        return missing_pipeline_error(
            self.pretrained,
            f"text encoder {what}",
            "stabilityai/stable-diffusion-2-1-base",
            (self.text_encoder_subfolder, self.tokenizer_subfolder),
        )

    def _read_configs(self) -> dict:
        from transformers import CLIPTextConfig

        try:
            config = CLIPTextConfig.from_pretrained(self.pretrained, subfolder=self.text_encoder_subfolder)
        except OSError as err:
            raise self._missing_weights("config") from err
        config_dict = config.to_dict()
        for volatile in ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures"):
            config_dict.pop(volatile, None)
        tokenizer_config: dict = {}
        local_tokenizer = Path(self.pretrained) / self.tokenizer_subfolder / "tokenizer_config.json"
        if local_tokenizer.is_file():
            tokenizer_config = json.loads(local_tokenizer.read_text())
            tokenizer_config.pop("name_or_path", None)
        return {"text_encoder": config_dict, "tokenizer": tokenizer_config}

    @property
    def key(self) -> str:
        """`<sanitised path or hub id>-<config hash>`: the folder name of this encoder's cache."""
        if self._key is None:
            configs = json.dumps(self._read_configs(), sort_keys=True, default=str)
            digest = hashlib.sha1(configs.encode("utf-8")).hexdigest()[:12]
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", self.pretrained.strip("/")).strip("_")[-80:]
            self._key = f"{name}-{digest}"
        return self._key

    @property
    def cache_dir(self) -> Path:
        return self.cache_root / self.key

    # ------------------------------------------------------------------ encoder
    def _encoder_device(self) -> torch.device:
        if self.device is not None:
            return self.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _load_encoder(self) -> None:
        if self._text_encoder is not None:
            return
        from transformers import CLIPTextModel, CLIPTokenizer

        try:
            self._tokenizer = CLIPTokenizer.from_pretrained(
                self.pretrained, subfolder=self.tokenizer_subfolder
            )
            encoder = CLIPTextModel.from_pretrained(
                self.pretrained, subfolder=self.text_encoder_subfolder, dtype=self.dtype
            )
        except OSError as err:
            raise self._missing_weights("weights") from err
        self._text_encoder = encoder.to(self._encoder_device()).eval().requires_grad_(False)

    def use_encoder(self, text_encoder, tokenizer) -> None:
        """Encode with an already loaded copy of this processor's text encoder and tokenizer (e.g. the student's,
        when it is the same model) instead of loading a second one; it runs on that copy's device."""
        self._text_encoder, self._tokenizer = text_encoder, tokenizer

    def release(self) -> None:
        """Free the text encoder (it is reloaded if a prompt is ever missing again)."""
        self._text_encoder = None
        self._tokenizer = None

    @torch.no_grad()
    def encode_uncached(self, prompts: Sequence[str]) -> Tensor:
        """Run the text encoder on `prompts`: `[B, L, D]` on the CPU in `cache_dtype`."""
        self._load_encoder()
        outputs = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start : start + self.batch_size])
            tokens = self._tokenizer(
                chunk,
                padding="max_length",
                max_length=self._tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            hidden = self._text_encoder(tokens.input_ids.to(self._text_encoder.device))[0]
            outputs.append(hidden.to("cpu", self.cache_dtype))
            self.num_encoder_calls += 1
        self.num_encoded += len(prompts)
        return torch.cat(outputs)

    # ------------------------------------------------------------------ disk cache
    def _path(self, prompt: str) -> Path:
        return self.cache_dir / prompt_filename(prompt)

    def _read(self, prompt: str) -> Tensor | None:
        from safetensors import safe_open

        path = self._path(prompt)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("prompt") != prompt:
                    return None  # a sha1 collision or a foreign file: re-encode
                return handle.get_tensor("embedding")
        except Exception:  # a truncated file from an interrupted, non-atomic copy: re-encode
            return None

    def _write(self, prompt: str, embedding: Tensor) -> None:
        from safetensors.torch import save_file

        directory = self.cache_dir
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(
                {"embedding": embedding.contiguous()},
                tmp_name,
                metadata={"prompt": prompt, "encoder": self.key},
            )
            os.replace(tmp_name, self._path(prompt))
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def _remember(self, prompt: str, embedding: Tensor) -> None:
        self._memory[prompt] = embedding
        self._memory.move_to_end(prompt)
        while len(self._memory) > self.memory_cache_size:
            self._memory.popitem(last=False)

    # ------------------------------------------------------------------ public API
    def get(self, prompts: Sequence[str]) -> Tensor:
        """Embeddings `[B, L, D]` (CPU, `cache_dtype`) of `prompts`: memory, then disk, then encoder."""
        if isinstance(prompts, str):
            raise TypeError("PromptProcessor.get expects a list of prompts, got a single string")
        with self._lock:
            found: dict[str, Tensor] = {}
            missing: list[str] = []
            for prompt in dict.fromkeys(prompts):
                embedding = self._memory.get(prompt)
                if embedding is None and self.disk_cache:
                    embedding = self._read(prompt)
                if embedding is None:
                    missing.append(prompt)
                else:
                    found[prompt] = embedding
            if missing:
                for prompt, embedding in zip(missing, self.encode_uncached(missing), strict=True):
                    embedding = embedding.clone()
                    if self.disk_cache:
                        self._write(prompt, embedding)
                    found[prompt] = embedding
            for prompt, embedding in found.items():
                self._remember(prompt, embedding)
            return torch.stack([found[prompt] for prompt in prompts])

    def __call__(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] = "") -> PromptEmbeddings:
        """Conditional embeddings of `prompts` and unconditional ones of `negative_prompt`
        (one string for all, or one per prompt), both `[B, L, D]`."""
        prompts = list(prompts)
        negatives = (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        )
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        both = self.get(prompts + negatives)
        return PromptEmbeddings(both[: len(prompts)], both[len(prompts) :], self.key)

    def prepare(self, prompts: Iterable[str]) -> int:
        """Fill the disk cache with `prompts` (and return how many this process encoded).

        Under torch.distributed, rank 0 encodes and writes everything missing while the other
        ranks wait at a barrier; afterwards every rank reads from disk.
        """
        prompts = list(dict.fromkeys(prompts))
        encoded_before = self.num_encoded
        distributed = _is_distributed()
        if not distributed or torch.distributed.get_rank() == 0:
            missing = [p for p in prompts if not self.disk_cache or self._read(p) is None]
            for start in range(0, len(missing), self.batch_size * 8):
                self.get(missing[start : start + self.batch_size * 8])
        if distributed:
            torch.distributed.barrier()
        return self.num_encoded - encoded_before


_SHARED: dict[tuple, PromptProcessor] = {}


def shared_prompt_processor(pretrained: str, **kwargs) -> PromptProcessor:
    """One processor per (encoder, options) in this process, so teachers that use the same text
    encoder (SD 2.1 for MVDream and SD) share one encoder and one memory cache."""
    options = tuple(sorted((name, str(value)) for name, value in kwargs.items()))
    key = (str(pretrained), options)
    if key not in _SHARED:
        _SHARED[key] = PromptProcessor(pretrained, **kwargs)
    return _SHARED[key]
