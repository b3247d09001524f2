import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.evaluation.clip_score import (
    CLIPScore3D,
    CLIPWeightsNotFoundError,
    load_open_clip,
    prompt_keys,
)
from renderers.errors import UserError
from tests.tiny_clip import make_tiny_clip, register_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def metric_factory(tiny_clip_dir):
    model, tokenizer = load_open_clip(f"local-dir:{tiny_clip_dir}")

    def make(**kwargs):
        return CLIPScore3D(model=model, tokenizer=tokenizer, **kwargs)

    return make


def direct_scores(image_embeds, text_embeds, prompts, weight=2.5):
    """Loop-by-loop reference: mean CLIPScore over all images, Recall@1 over unique prompts."""
    unique = []
    for p in prompts:
        if p not in unique:
            unique.append(p)
    cand = {p: text_embeds[prompts.index(p)] for p in unique}
    scores, hits = [], []
    for i, prompt in enumerate(prompts):
        for view in image_embeds[i]:
            cos = float(view @ text_embeds[i] / (view.norm() * text_embeds[i].norm()))
            scores.append(weight * max(cos, 0.0))
            sims = {p: float(view @ e / (view.norm() * e.norm())) for p, e in cand.items()}
            hits.append(max(sims, key=sims.get) == prompt)
    return sum(scores) / len(scores), sum(hits) / len(hits)


def test_metric_equals_direct_computation_on_synthetic_embeddings(metric_factory):
    gen = torch.Generator().manual_seed(0)
    prompts = ["a cat", "a dog", "a cat", "a red car", "a boat", "a dog", "a tree"]
    image_embeds = torch.randn(len(prompts), 4, 16, generator=gen)
    base = {p: torch.randn(16, generator=gen) for p in dict.fromkeys(prompts)}
    text_embeds = torch.stack([base[p] for p in prompts])
    # Pull images towards their caption so that both hits and misses occur.
    image_embeds = image_embeds + 1.5 * text_embeds[:, None]

    metric = metric_factory()
    metric.update_embeddings(image_embeds[:3], text_embeds[:3], prompts[:3])
    metric.update_embeddings(image_embeds[3:], text_embeds[3:], prompts[3:])
    out = metric.compute()
    want_score, want_recall = direct_scores(image_embeds, text_embeds, prompts)
    assert out["clip_score"].item() == pytest.approx(want_score, rel=1e-5)
    assert out["recall_at_1"].item() == pytest.approx(want_recall, abs=1e-7)
    assert 0.0 < want_recall < 1.0  # the case exercises both hits and misses


def test_recall_at_1_on_constructed_cases_with_duplicate_prompts(metric_factory):
    e = torch.eye(16)
    # Captions: three orthogonal directions; "a" appears twice (objects 0 and 3).
    prompts = ["a", "b", "c", "a"]
    text = torch.stack([e[0], e[1], e[2], e[0]])
    images = torch.stack(
        [
            torch.stack([e[0], e[0], e[0], e[0]]),  # 4 / 4 right
            torch.stack([e[1], e[1], e[2], e[2]]),  # 2 / 4 right
            torch.stack([e[0], e[1], e[1], e[1]]),  # 0 / 4 right
            torch.stack([e[0] + 0.1 * e[1], e[0], e[0], e[2]]),  # 3 / 4 right (needs "a" counted once)
        ]
    )
    metric = metric_factory()
    metric.update_embeddings(images, text, prompts)
    out = metric.compute()
    assert out["recall_at_1"].item() == pytest.approx(9 / 16)
    cos = F.normalize(images, dim=-1) @ e[:3].T
    want = 2.5 * torch.stack([cos[0, :, 0], cos[1, :, 1], cos[2, :, 2], cos[3, :, 0]]).clamp(min=0).mean()
    assert out["clip_score"].item() == pytest.approx(want.item(), rel=1e-6)


def test_negative_cosine_scores_zero(metric_factory):
    metric = metric_factory()
    text = torch.zeros(1, 16)
    text[0, 0] = 1.0
    images = torch.zeros(1, 2, 16)
    images[0, 0, 0] = -1.0  # cos -1 -> 0
    images[0, 1, 0] = 0.6  # cos 0.6 / |v| with another component
    images[0, 1, 1] = 0.8
    metric.update_embeddings(images, text, ["x"])
    assert metric.compute()["clip_score"].item() == pytest.approx(2.5 * 0.6 / 2)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_compute_without_update_is_a_clear_error(metric_factory):
    with pytest.raises(ValueError, match="at least one update"):
        metric_factory().compute()


def test_update_with_images_matches_open_clip_directly(metric_factory, tiny_clip_dir):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 3, 48, 48, generator=gen)
    prompts = ["a small house", "a green frog"]
    metric = metric_factory()
    metric.update(images, prompts)
    out = metric.compute()

    model, tokenizer = metric.clip_model, metric.tokenizer
    transform = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), is_train=False)
    mean = torch.tensor(metric.preprocess_cfg["mean"])[:, None, None]
    std = torch.tensor(metric.preprocess_cfg["std"])[:, None, None]
    with torch.no_grad():
        # open_clip's own eval transform on the tensor, clamped to the image range like an 8-bit image.
        pix = torch.stack([(transform(img) * std + mean).clamp(0, 1) for img in images.flatten(0, 1)])
        pix = (pix - mean) / std
        img = F.normalize(model.encode_image(pix), dim=-1).reshape(2, 3, -1)
        txt = F.normalize(model.encode_text(tokenizer([f"A photo depicts {p}" for p in prompts])), dim=-1)
    want_score, want_recall = direct_scores(img, txt, prompts)
    assert out["clip_score"].item() == pytest.approx(want_score, rel=1e-4)
    assert out["recall_at_1"].item() == pytest.approx(want_recall)


def test_caption_prefix_is_used_verbatim(metric_factory):
    spaced, glued = metric_factory(), metric_factory(caption_prefix="A photo depicts")
    a = spaced.encode_prompts(["a cat"])
    b = glued.encode_prompts(["a cat"])
    direct = F.normalize(spaced.clip_model.encode_text(spaced.tokenizer(["A photo depictsa cat"])), dim=-1)
    assert torch.allclose(b, direct, atol=1e-6) and not torch.allclose(a, b, atol=1e-4)


def test_clip_model_stays_out_of_owner_state_dict_and_parameters(metric_factory):
    owner = nn.Module()
    owner.layer = nn.Linear(2, 2)
    owner.val_clip = metric_factory()
    assert set(owner.state_dict()) == {"layer.weight", "layer.bias"}
    assert sum(p.numel() for p in owner.parameters()) == 6


def test_bad_shapes_are_clear_errors(metric_factory):
    metric = metric_factory()
    with pytest.raises(ValueError, match=r"\[B, V, 3, H, W\]"):
        metric.update(torch.rand(2, 3, 32, 32), ["a", "b"])
    with pytest.raises(ValueError, match="2 objects but 1 prompts"):
        metric.update(torch.rand(2, 1, 3, 32, 32), ["a"])
    metric.update_embeddings(torch.randn(1, 4, 16), torch.randn(1, 16), ["a"])
    with pytest.raises(ValueError, match="same number of views"):
        metric.update_embeddings(torch.randn(1, 2, 16), torch.randn(1, 16), ["b"])


def test_prompt_keys_are_stable_and_distinct():
    keys = prompt_keys(["a cat", "a dog", "a cat"])
    assert keys[0] == keys[2] and keys[0] != keys[1] and (keys >= 0).all()
    # sha256-based: the same in every process (Python's hash() is salted per process).
    assert int(prompt_keys(["a cat"])[0]) == int.from_bytes(
        __import__("hashlib").sha256(b"a cat").digest()[:8], "little"
    ) >> 1


# -- loading ------------------------------------------------------------------------------------


def test_load_builtin_name_with_local_checkpoint_file(tiny_clip_dir, tmp_path):
    name = register_tiny_clip(tmp_path / "configs")
    ckpt = tiny_clip_dir / "open_clip_model.safetensors"
    by_name, tok = load_open_clip(name, pretrained=None, checkpoint=ckpt)
    by_dir, _ = load_open_clip(f"local-dir:{tiny_clip_dir}")
    assert not any(p.requires_grad for p in by_name.parameters()) and not by_name.training
    tokens = tok(["A photo depicts a cat"])
    assert torch.equal(by_name.encode_text(tokens), by_dir.encode_text(tokens))
    # `pretrained` may also be a file path (open_clip's convention).
    by_path, _ = load_open_clip(name, pretrained=str(ckpt))
    assert torch.equal(by_path.encode_text(tokens), by_dir.encode_text(tokens))


def test_missing_openai_weights_is_one_line_error_naming_what_to_fetch(tmp_path):
    with pytest.raises(CLIPWeightsNotFoundError) as info:
        load_open_clip("ViT-B-32", "openai", cache_dir=str(tmp_path))
    msg = str(info.value)
    assert "\n" not in msg
    for part in ("ViT-B-32", "'openai'", "timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors",
                 "--clip-checkpoint"):
        assert part in msg
    assert isinstance(info.value, UserError) and isinstance(info.value, FileNotFoundError)


def test_allowed_download_while_offline_is_one_line_error(tmp_path, empty_hub_cache):
    """`allow_download=True` (configs/triplaneturbo_v1.yaml's validation CLIP score) with HF_HUB_OFFLINE=1 and the
    weights nowhere: the one line of missing weights, not the hub client's traceback at instantiation."""
    with pytest.raises(CLIPWeightsNotFoundError, match="HF_HUB_OFFLINE is set") as info:
        load_open_clip("ViT-B-32", "openai", cache_dir=str(tmp_path), allow_download=True)
    assert "\n" not in str(info.value) and "open_clip_model.safetensors" in str(info.value)
    with pytest.raises(CLIPWeightsNotFoundError, match="HF_HUB_OFFLINE is set"):
        load_open_clip("hf-hub:nobody/not-cached", allow_download=True)


def test_cached_openai_weights_are_found_without_network(tmp_path, monkeypatch):
    """A file in open_clip's URL cache counts as present: loading gets past the lookup to the file."""
    import open_clip

    from lightning_modules.evaluation.clip_score import cached_pretrained_file

    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    target = tmp_path / os.path.basename(cfg["url"])
    target.write_bytes(b"")
    assert cached_pretrained_file(cfg, str(tmp_path)) == str(target)
    assert cached_pretrained_file(cfg, str(tmp_path / "empty")) is None


def test_loading_errors(tiny_clip_dir, tmp_path):
    with pytest.raises(UserError, match="neither a pretrained tag"):
        load_open_clip("ViT-B-32", "no-such-tag")
    with pytest.raises(UserError, match="unknown open_clip model"):
        load_open_clip("ViT-Q-99", "openai")
    with pytest.raises(CLIPWeightsNotFoundError, match="checkpoint file not found"):
        load_open_clip("ViT-B-32", "openai", checkpoint=tmp_path / "nope.pt")
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "open_clip_config.json").write_text((tiny_clip_dir / "open_clip_config.json").read_text())
    with pytest.raises(CLIPWeightsNotFoundError, match="no weights file"):
        load_open_clip(f"local-dir:{empty}")
    with pytest.raises(CLIPWeightsNotFoundError, match="not in the Hugging Face cache"):
        load_open_clip("hf-hub:nobody/not-cached", cache_dir=str(tmp_path))


def test_weights_file_check_reads_headers_only(tmp_path):
    """The up-front check of `prd eval --clip-checkpoint` takes every format open_clip reads and refuses the
    rest by its first bytes (or its zip directory), in one line."""
    from safetensors.torch import save_file

    from lightning_modules.evaluation.clip_score import CLIPWeightsError, check_weights_file

    state = {"w": torch.arange(6.0).reshape(2, 3)}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for name in ("w.safetensors", "w.pt", "legacy.pth"):
        assert check_weights_file(tmp_path / name) == tmp_path / name
    (tmp_path / "w.bin").write_bytes((tmp_path / "w.safetensors").read_bytes())
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:-8])
    (tmp_path / "text.pt").write_text("not weights at all")
    cases = {"w.bin": "rename it to .safetensors", "cut.pt": "truncated or corrupt archive",
             "cut.safetensors": "not a readable safetensors file", "text.pt": "is not a weights file"}
    for name, words in cases.items():
        with pytest.raises(CLIPWeightsError, match=words) as info:
            check_weights_file(tmp_path / name)
        assert "\n" not in str(info.value)
    with pytest.raises(CLIPWeightsError, match="is not a weights file"):  # load_open_clip checks it too
        load_open_clip("ViT-B-32", "openai", checkpoint=tmp_path / "text.pt")


# -- DDP ----------------------------------------------------------------------------------------

DDP_PROMPTS = ["a cat", "a dog", "a shared prompt", "a red car", "a shared prompt"]
DDP_SPLIT = {0: [0, 1, 2], 1: [3, 4]}  # uneven, with one prompt on both ranks


def _ddp_images():
    return torch.rand(len(DDP_PROMPTS), 2, 3, 40, 40, generator=torch.Generator().manual_seed(3))


def _ddp_worker(rank, world_size, port, clip_dir, out_path):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        metric = CLIPScore3D(f"local-dir:{clip_dir}")
        idx = DDP_SPLIT[rank]
        metric.update(_ddp_images()[idx], [DDP_PROMPTS[i] for i in idx])
        out = metric.compute()
        torch.save({k: v.item() for k, v in out.items()}, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_process_gloo_matches_single_process(tiny_clip_dir, metric_factory, tmp_path):
    """Rank 1 in a spawned process, rank 0 in this one (saves one process start-up)."""
    import torch.multiprocessing as mp

    out_path, port = str(tmp_path / "ddp"), _free_port()
    other = mp.get_context("spawn").Process(target=_ddp_worker, args=(1, 2, port, str(tiny_clip_dir), out_path))
    other.start()
    threads = torch.get_num_threads()
    try:
        _ddp_worker(0, 2, port, str(tiny_clip_dir), out_path)
    finally:
        torch.set_num_threads(threads)
        other.join(timeout=120)
    assert other.exitcode == 0
    single = metric_factory()
    single.update(_ddp_images(), DDP_PROMPTS)
    want = {k: v.item() for k, v in single.compute().items()}
    for rank in (0, 1):
        got = torch.load(f"{out_path}.{rank}", weights_only=True)
        assert got["clip_score"] == pytest.approx(want["clip_score"], rel=1e-5)
        assert got["recall_at_1"] == pytest.approx(want["recall_at_1"])
    # Rank 0's data alone scores differently, so equal numbers above mean the states were synced.
    local = metric_factory()
    local.update(_ddp_images()[DDP_SPLIT[0]], [DDP_PROMPTS[i] for i in DDP_SPLIT[0]])
    assert local.compute()["clip_score"].item() != pytest.approx(want["clip_score"], rel=1e-5)
    assert not math.isnan(want["clip_score"])
