"""Time `prd generate` for the FULL-SIZE TriplaneTurbo student with random weights: per stage and end to end
(prompt in, GLB on disk), latency at batch 1, throughput at larger batches, peak memory, for float32 / float16 /
bfloat16 / compiled, in one run.

    .venv/bin/python benchmarks/bench_generate.py [--device cpu|cuda] [--resolution 160]
        [--rows float32 float16 bfloat16 compiled] [--batch-sizes 8 32] [--compile-mode auto] [--repeats 2]
        [--channels-last] [--no-networks] [--threads N] [--throughput-batches 2]

Builds SD 2.1-base's UNet, VAE decoder and text encoder from their public configs (no download; the
tokenizer is the small real CLIP BPE of the test fixtures), adds the adapters, and runs the same
code path as `prd generate` (`prepare_for_inference`, then `generate_meshes`: text encoding, 4 DDIM steps,
triplane decoding, marching cubes, GLB export). Per row it prints:

- latency at batch 1: seconds per stage and the wall-clock time per mesh, the best of `--repeats`;
- throughput at each `--batch-sizes` N: meshes per second over 2N prompts (`--throughput-batches`) in batches of N (wall clock,
  files written; the export thread as `prd generate` uses it: on with CUDA);
- peak memory: CUDA's max allocated bytes of the row, or on the CPU the process's peak resident set so far;
- compile warm-up (the "compiled" row; on CUDA every row warms up), apart from every per-mesh figure;
- "marching cubes + grid SDF" (`time_mesh_extraction`) on the field of the latency run.

A row that cannot run on the device prints why, in one line. The CPU's inductor compiles the full-size UNet for
a very long time (7 min already for the tiny test model): leave "compiled" out of CPU runs (`--rows float32`).
The float32 row (unless --no-networks) then times the networks alone (4 UNet forwards and one VAE-decoder
forward of the 6 planes), once as the student runs them (adapters merged, joint attention over the 6 planes) and
once as bare SD 2.1 (adapters off), and prints the end-to-end latency / network time for both:

    total / student networks      goal: <= 1.25   (what text encoding, sampling, field, marching
                                                   cubes and export add to the networks)
    total / bare SD networks      for information (includes the cost of the adapters and of the
                                                   6x longer joint attention)

Random weights make the SDF arbitrary: marching cubes runs on whatever surface the random field has
(or the unit-sphere fallback), so mesh sizes differ from a trained model's.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "reference" / "triplaneturbo_ref_A" / "base" / "tokenizer"
ROWS = ("float32", "float16", "bfloat16", "compiled")


def random_full_size_student():
    """The full-size student (SD 2.1-base architecture, rank-16 adapters) with random weights on the CPU,
    float32, seed 0. Its zero-initialised up-projections get small random values, so that the adapters
    cost what trained ones cost and gradients reach every adapter (also used by bench_prd.py)."""
    from transformers import CLIPTokenizer

    from lightning_modules.student import TriplaneStudent
    from lightning_modules.student.sd_configs import build_sd21_base

    torch.manual_seed(0)
    unet, vae, text_encoder = build_sd21_base()
    student = TriplaneStudent(unet, vae, text_encoder, CLIPTokenizer.from_pretrained(TOKENIZER))
    with torch.no_grad():
        for p in student.trainable_parameters():
            if p.abs().max() == 0:
                p.normal_(0, 1e-3)
    return student


def build_full_size_student(device: torch.device, dtype: torch.dtype = torch.float32, compile_mode: str | None = None,
                            channels_last: bool = False):
    """The random full-size student as `prd generate` runs it: adapters merged (in float32), then
    `prepare_for_inference` (precision, channels_last, torch.compile)."""
    from lightning_modules.student.inference import prepare_for_inference

    student = random_full_size_student().to(device=device).eval()
    student.merge_adapters()
    return prepare_for_inference(student, dtype, compile_mode, channels_last)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_networks(student, emb, noise, repeats: int, adapters: bool) -> tuple[float, float]:
    """Best seconds of 4 UNet forwards and of one VAE-decoder forward of the 6 planes.

    adapters=True: the student's own networks (merged LoRA / LoCon, per-plane LoRA and joint attention
    over the 6 planes); False: the bare SD 2.1 networks (adapters off, attention per plane).
    """
    device = student.device
    x = noise.flatten(0, 1).to(device, student.dtype)
    cond = emb.repeat_interleave(6, dim=0)
    best_unet = best_vae = float("inf")
    with contextlib.nullcontext() if adapters else student.adapters_disabled():
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            for t in student.sampling_timesteps().tolist():
                student.unet(x, t, encoder_hidden_states=cond)
            sync(device)
            t1 = time.perf_counter()
            student.vae.decoder(student.vae.post_quant_conv(x))
            sync(device)
            best_unet = min(best_unet, t1 - t0)
            best_vae = min(best_vae, time.perf_counter() - t1)
    return best_unet, best_vae


def time_mesh_extraction(field, resolution: int, repeats: int = 1) -> dict[str, float]:
    """"marching cubes + grid SDF": best seconds of `renderers.marching_cubes.extract_mesh` on a field of one
    object (the grid SDF at `resolution`^3, the topology, the vertex positions), dense (every grid vertex through
    the field) and coarse to fine (the default: exact values only where interval bounds leave the sign open;
    `benchmarks/bench_marching_cubes.py` compares the two on more fields)."""
    from renderers.marching_cubes import extract_mesh

    device = field.device
    result = {}
    for name, coarse_to_fine in (("dense", False), ("coarse to fine", True)):
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            extract_mesh(field, batch_size=1, resolution=resolution, coarse_to_fine=coarse_to_fine)
            sync(device)
            best = min(best, time.perf_counter() - start)
        result[name] = best
    with torch.no_grad():  # which path the coarse-to-fine grid took: the share of grid vertices evaluated exactly
        grid = field.grid_sdf(resolution, device, field.planes.dtype) if hasattr(field, "grid_sdf") else None
    result["exact share"] = float(grid.exact.float().mean()) if grid is not None else 1.0
    return result


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated (peak of the row)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident (process peak so far)"


def why_not(row: str, device: torch.device, compile_mode: str) -> str | None:
    """Why a row cannot run on `device` (None: it can)."""
    from lightning_modules.student.inference import InferenceSettingsError, check_inference_settings

    if row != "compiled":
        return None
    try:
        check_inference_settings(device, "float32", compile_mode)
    except InferenceSettingsError as err:
        return str(err)
    return None


def prompts_for(count: int) -> list[str]:
    return [f"a DSLR photo of object number {i}" for i in range(count)]


def run_row(row: str, args, device: torch.device) -> dict:
    """Build the student of `row`, warm it up, time batch-1 latency, throughput, mesh extraction (and for the
    float32 row the networks alone); print them."""
    from lightning_modules.student.generation import (
        StageTimer,
        export_generated,
        generate_meshes,
        iter_generate,
    )
    from lightning_modules.student.inference import DTYPES, resolve_compile_mode, warm_up

    compiled = row == "compiled"
    dtype = DTYPES["float16" if device.type == "cuda" else "float32"] if compiled else DTYPES[row]
    mode = resolve_compile_mode(args.compile_mode, device) if compiled else None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    student = build_full_size_student(device, dtype, mode, args.channels_last)
    label = f"{row} ({str(dtype).removeprefix('torch.')}, torch.compile {mode})" if compiled else row
    print(f"\n== {label}: built in {time.perf_counter() - t0:.1f} s", flush=True)
    if compiled or device.type == "cuda":  # compilation / CUDA allocations and kernel selection, not timed below
        warm = warm_up(student, [1, *args.batch_sizes])
        print(f"warm-up {warm:.1f} s{' (compilation; excluded from every figure below)' if compiled else ''}")

    result = dict(row=row)
    with tempfile.TemporaryDirectory() as out:
        best = None
        for _ in range(args.repeats):  # what generate_meshes does at batch 1, keeping the field
            timer = StageTimer()
            start = time.perf_counter()
            records, fields = [], []
            for obj in iter_generate(student, prompts_for(1), resolution=args.resolution, batch_size=1, timer=timer):
                records.append(export_generated(obj, out, device=student.device, dtype=student.field_dtype,
                                                timer=timer))
                fields.append(obj.field)
            sync(device)
            wall = time.perf_counter() - start
            if best is None or wall < best[0]:
                best = (wall, timer, records, fields[0])
        wall, timer, records, field = best
        print(f"latency at batch 1 (prompt -> GLB on disk), best of {args.repeats}:")
        print(timer.table(1))
        print(f"end to end (wall) {wall:.3f} s per mesh; mesh {records[0]['vertices']} vertices, "
              f"{records[0]['faces']} faces", flush=True)
        result.update(latency=wall, stages=dict(timer.seconds))
        for size in args.batch_sizes:
            count = args.throughput_batches * size
            start = time.perf_counter()
            generate_meshes(student, prompts_for(count), out, resolution=args.resolution, batch_size=size, progress=False)
            seconds = time.perf_counter() - start
            print(f"throughput at batch {size}: {count / seconds:.3f} meshes/s ({count} meshes in {seconds:.1f} s)",
                  flush=True)
            result[f"throughput_{size}"] = count / seconds
    extraction = time_mesh_extraction(field, args.resolution, args.repeats)
    share = extraction.pop("exact share")
    print(f"marching cubes + grid SDF at {args.resolution}^3: "
          + ", ".join(f"{name} {sec:.3f} s" for name, sec in extraction.items())
          + f" ({100 * share:.1f} % of the grid vertices evaluated exactly)")
    print(f"peak memory: {peak_memory(device)}", flush=True)
    if row == "float32" and not args.no_networks:
        print_network_ratios(student, wall, args.repeats)
    return result


def print_network_ratios(student, total: float, repeats: int) -> None:
    """The networks alone (batch 1), as the student runs them and as bare SD 2.1, and end to end / networks."""
    emb = student.encode_prompt(prompts_for(1))
    noise = student.make_noise(1, seed=0)
    print(f"networks alone ({str(student.dtype).removeprefix('torch.')}, batch 1):")
    for adapters, label in ((True, "student networks (adapters merged, joint 6-plane attention)"),
                            (False, "bare SD 2.1 networks (no adapters, attention per plane)")):
        unet_s, vae_s = time_networks(student, emb, noise, repeats, adapters)
        print(f"  {label}: UNet x 4 {unet_s:.3f} s + VAE decoder {vae_s:.3f} s = {unet_s + vae_s:.3f} s"
              f"  -> end to end / networks = {total / (unet_s + vae_s):.3f}", flush=True)
    print("  goal: end to end / student networks <= 1.25 (the pipeline adds at most 25 % to the networks it must run)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[8, 32],
                        help="throughput batch sizes (each runs 2 batches); the CPU wants small ones, e.g. 2")
    parser.add_argument("--compile-mode", default="auto", help="mode of the compiled row (see prd generate --help)")
    parser.add_argument("--channels-last", action="store_true", help="every row in channels_last")
    parser.add_argument("--resolution", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions of the latency (the best is kept)")
    parser.add_argument("--throughput-batches", type=int, default=2, help="batches per throughput figure")
    parser.add_argument("--no-networks", action="store_true",
                        help="skip the float32 row's network timing and the ratios")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if min([*args.batch_sizes, args.repeats, args.throughput_batches]) < 1 or args.resolution < 4:
        parser.error("--batch-sizes, --repeats and --throughput-batches must be at least 1, --resolution at least 4")
    device = torch.device(args.device)
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, resolution "
          f"{args.resolution}, batch sizes {args.batch_sizes}")

    for row in args.rows:
        reason = why_not(row, device, args.compile_mode)
        if reason is not None:
            print(f"\n== {row}: cannot run on {device}: {reason}")
            continue
        run_row(row, args, device)


if __name__ == "__main__":
    main()
