"""Prompt embeddings: cached on disk per (encoder, prompt), safe under concurrent writers and DDP."""

import multiprocessing as mp

import pytest
import torch
from safetensors import safe_open

from teachers.base import TeacherWeightsNotFoundError
from teachers.prompt_cache import PromptProcessor, prompt_filename, shared_prompt_processor
from tests.tiny_sd import make_tiny_sd

PROMPTS = ["a red chair", "a wooden boat, high detail", "an owl made of glass", ""]


def reference_embeddings(sd_dir, prompts):
    """Independent encoding with transformers: last_hidden_state of max-length padded tokens."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(sd_dir, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(sd_dir, subfolder="text_encoder").eval()
    tokens = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return encoder(tokens.input_ids).last_hidden_state


def test_embeddings_match_the_text_encoder(tiny_sd_dir, tmp_path):
    processor = PromptProcessor(tiny_sd_dir, cache_dir=tmp_path, device="cpu")
    embeddings = processor.get(PROMPTS)
    assert embeddings.shape == (4, 77, 32)
    torch.testing.assert_close(embeddings, reference_embeddings(tiny_sd_dir, PROMPTS), atol=1e-5, rtol=1e-5)
    pair = processor(PROMPTS[:2], negative_prompt="blurry")
    torch.testing.assert_close(pair.cond, embeddings[:2])
    torch.testing.assert_close(
        pair.uncond, reference_embeddings(tiny_sd_dir, ["blurry", "blurry"]), atol=1e-5, rtol=1e-5
    )
    assert pair.encoder_key == processor.key


def test_second_run_encodes_nothing(tiny_sd_dir, tmp_path):
    first = PromptProcessor(tiny_sd_dir, cache_dir=tmp_path, device="cpu")
    values = first.get(PROMPTS)
    assert first.num_encoded == len(PROMPTS)
    first.get(PROMPTS[::-1])  # memory hit
    assert first.num_encoded == len(PROMPTS)

    files = sorted((tmp_path / first.key).iterdir())
    assert [f.name for f in files] == sorted(prompt_filename(p) for p in PROMPTS)
    for path, prompt in ((tmp_path / first.key / prompt_filename(p), p) for p in PROMPTS):
        with safe_open(str(path), framework="pt") as handle:
            assert handle.metadata()["prompt"] == prompt

    second = PromptProcessor(tiny_sd_dir, cache_dir=tmp_path, device="cpu")
    again = second.get(PROMPTS)
    assert second.num_encoded == 0 and second.num_encoder_calls == 0
    assert second._text_encoder is None  # never even loaded
    torch.testing.assert_close(again, values)
    assert second.prepare(PROMPTS) == 0


def test_encoders_with_different_configs_get_different_keys(tiny_sd_dir, tmp_path):
    other = make_tiny_sd(tmp_path / "other", seed=1, text_encoder=dict(hidden_size=48))
    a = PromptProcessor(tiny_sd_dir, cache_dir=tmp_path / "cache")
    b = PromptProcessor(other, cache_dir=tmp_path / "cache")
    assert a.key != b.key
    assert a.key.split("-")[-1] != b.key.split("-")[-1]  # the config hash differs
    assert PromptProcessor(tiny_sd_dir, cache_dir=tmp_path / "x").key == a.key  # stable
    assert b.get(["a cat"]).shape == (1, 77, 48)


def test_corrupt_or_foreign_file_is_re_encoded(tiny_sd_dir, tmp_path):
    processor = PromptProcessor(tiny_sd_dir, cache_dir=tmp_path)
    good = processor.get(["a cat"])
    path = processor.cache_dir / prompt_filename("a cat")
    path.write_bytes(b"not a safetensors file")
    fresh = PromptProcessor(tiny_sd_dir, cache_dir=tmp_path)
    torch.testing.assert_close(fresh.get(["a cat"]), good)
    assert fresh.num_encoded == 1
    assert not list(processor.cache_dir.glob(".tmp-*"))


def test_shared_processor_is_one_instance(tiny_sd_dir, tmp_path):
    a = shared_prompt_processor(tiny_sd_dir, cache_dir=str(tmp_path), device=None)
    b = shared_prompt_processor(tiny_sd_dir, cache_dir=str(tmp_path), device=None)
    c = shared_prompt_processor(tiny_sd_dir, cache_dir=str(tmp_path / "elsewhere"), device=None)
    assert a is b and a is not c


def test_missing_text_encoder_is_a_one_line_error(tmp_path):
    processor = PromptProcessor(str(tmp_path / "no-such-sd"), cache_dir=tmp_path)
    with pytest.raises(TeacherWeightsNotFoundError) as info:
        processor.get(["a cat"])
    message = str(info.value)
    assert "\n" not in message and "no-such-sd" in message and "hf download" in message


def _worker(rank, world, init_file, sd_dir, cache_dir, concurrent_prompts, ddp_prompts, start, queue):
    # Phase 1: both processes fill the same cache at once, one write per prompt (no coordination).
    start.wait(timeout=120)
    racer = PromptProcessor(sd_dir, cache_dir=cache_dir, device="cpu")
    for prompt in concurrent_prompts:
        racer.get([prompt])
    # Phase 2: DDP; `prepare` lets rank 0 encode and write while rank 1 waits at the barrier.
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        processor = PromptProcessor(sd_dir, cache_dir=cache_dir, device="cpu")
        encoded = processor.prepare(ddp_prompts)
        values = processor.get(ddp_prompts).numpy()  # numpy: pickled by value, no fd sharing
        queue.put((rank, racer.num_encoded, encoded, processor.num_encoded, values))
    finally:
        torch.distributed.destroy_process_group()


def test_concurrent_fill_is_valid_and_ddp_rank0_writes_behind_a_barrier(tiny_sd_dir, tmp_path):
    """Two spawned processes: (1) fill one cache at once -> every file valid; (2) under DDP,
    `prepare` encodes on rank 0 only and rank 1 reads rank 0's files."""
    concurrent_prompts = [f"object number {i}" for i in range(24)]
    ddp_prompts = [f"a toy {i}" for i in range(6)]
    cache = tmp_path / "cache"
    ctx = mp.get_context("spawn")
    start, queue = ctx.Event(), ctx.Queue()
    args = (
        str(tmp_path / "dist_init"),
        str(tiny_sd_dir),
        str(cache),
        concurrent_prompts,
        ddp_prompts,
        start,
        queue,
    )
    workers = [ctx.Process(target=_worker, args=(rank, 2, *args)) for rank in range(2)]
    for worker in workers:
        worker.start()
    start.set()
    results = {r[0]: r[1:] for r in (queue.get(timeout=240) for _ in workers)}
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0

    # (1) the race: together they encoded everything, and the cache holds exactly one valid file per prompt
    assert results[0][0] + results[1][0] >= len(concurrent_prompts)
    reader = PromptProcessor(tiny_sd_dir, cache_dir=cache, device="cpu")
    assert not list(reader.cache_dir.glob(".tmp-*"))
    assert len(list(reader.cache_dir.iterdir())) == len(concurrent_prompts) + len(ddp_prompts)
    cached = reader.get(concurrent_prompts)
    assert reader.num_encoded == 0
    torch.testing.assert_close(
        cached, reference_embeddings(tiny_sd_dir, concurrent_prompts), atol=1e-5, rtol=1e-5
    )

    # (2) DDP: rank 0 encoded every prompt, rank 1 none, and both hold the same values
    assert results[0][1] == len(ddp_prompts) and results[1][1] == 0 and results[1][2] == 0
    torch.testing.assert_close(torch.from_numpy(results[0][3]), torch.from_numpy(results[1][3]))
    torch.testing.assert_close(
        torch.from_numpy(results[1][3]), reference_embeddings(tiny_sd_dir, ddp_prompts), atol=1e-5, rtol=1e-5
    )
