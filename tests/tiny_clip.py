"""A tiny random open_clip model saved like a real one, for tests (no download).

`make_tiny_clip(folder)` writes an open_clip `local-dir:` folder (open_clip_config.json +
open_clip_model.safetensors) and returns it; `register_tiny_clip()` registers the same architecture
under a built-in name, so "name + checkpoint file" loading can be tested too. The tokenizer is
open_clip's SimpleTokenizer, whose BPE vocabulary ships inside the open_clip package.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CLIP_NAME = "prd-test-tiny-clip"
TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def make_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """Write a random tiny open_clip model folder; returns the folder (use "local-dir:<folder>")."""
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CFG)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def register_tiny_clip(config_dir: str | Path) -> str:
    """Register the tiny architecture as a built-in open_clip model name; returns the name."""
    import open_clip

    config_dir = Path(config_dir)
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / f"{TINY_CLIP_NAME}.json"
    path.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(path)
    return TINY_CLIP_NAME
