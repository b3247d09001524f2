"""Time one PRD training iteration, split into student, rendering and teacher time, and its peak memory.

    .venv/bin/python benchmarks/bench_prd.py                       # demo config + full-size student
    .venv/bin/python benchmarks/bench_prd.py --which full --device cuda --reference-renders
    .venv/bin/python benchmarks/bench_prd.py --which checkpoint    # full-size checkpoint size only
    .venv/bin/python benchmarks/bench_prd.py --which full --iterations 1 --num-steps 1   # CPU: ~1/4 iteration
    .venv/bin/python benchmarks/bench_prd.py --which v1 --device cuda        # the three teachers, both v1 configs
    .venv/bin/python benchmarks/bench_prd.py --which v1 --device cpu --width 0.2 --threads 1   # same, reduced width

Two set-ups, both through `PRDModule.run_prd_batch` (the code `training_step` runs) + one optimizer step:

- "demo": `configs/demo_cpu.yaml` exactly as configured (built with LightningCLI), on a tiny random SD
  directory created in a temporary folder (unless --base is given).
- "full": the FULL-SIZE student (SD 2.1-base UNet, VAE decoder and text encoder built from their public
  configs with random weights, no download; the fixture's small CLIP tokenizer), rank-16 adapters, the
  reference's renderers (--reference-renders: 128^3 grid, mesh 512 px, NeuS 128 px with 128 + 64
  samples; default on the CPU: 64^3 / 128 px / 64 px so that it finishes), with tiny teachers: the
  analytic `ShapeTeacher` (no weights). It then writes a training checkpoint and prints its size:
  trainable weights + Adan state only.

- "v1": `configs/triplaneturbo_v1.yaml` and `configs/triplaneturbo_v1_24gb.yaml` (or --configs) as configured:
  their renderers, cameras, batch size, accumulation and memory switches, and their full teacher set (SD 2.1,
  MVDream, RichDreamer normal-depth, the real teacher classes) with random weights at the true sizes
  (`benchmarks/prd_models.py`), one optimizer step per iteration; see `benchmarks/prd_models.py` for --width.
  Each config runs in its own process (peak memory is per process) and a table compares them.

Times (seconds per iteration): student forward (text, UNet, VAE decoder), render forward, teacher
forward, and the backward pass split by gradient hooks into teacher / render / student parts
(approximate), plus the optimizer step. Peak memory: CUDA `max_memory_allocated` on a GPU, the
process's peak resident set size on the CPU. The first iteration (warm-up) is not counted.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPE_PROMPTS = ["a red ball", "a blue cube", "a yellow donut", "a green cone"]
PARTS = ("student", "render", "teacher", "backward/teacher", "backward/render", "backward/student", "optimizer")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def demo_module(base: str | None, workdir: Path):
    """PRDModule and its datamodule from configs/demo_cpu.yaml (LightningCLI, nothing trained)."""
    from lightning.pytorch.cli import LightningCLI

    if base is None:
        from tests.tiny_sd import make_tiny_sd

        base = str(make_tiny_sd(workdir / "tiny_sd", seed=0))
    cli = LightningCLI(
        args=[
            "--config", str(ROOT / "configs" / "demo_cpu.yaml"),
            "--model.init_args.base", base,
            "--trainer.logger", "false",
            "--trainer.default_root_dir", str(workdir),
        ],
        run=False, subclass_mode_model=True, subclass_mode_data=True, save_config_callback=None,
    )  # fmt: skip
    return cli.model, cli.datamodule


def full_size_module(reference_renders: bool, gradient_checkpointing: bool):
    from lightning_modules.training.prd_module import PRDModule
    from renderers import MeshRenderer, NeuSVolumeRenderer, TextConditionedBackground
    from teachers.shape_teacher import ShapeTeacher

    if reference_renders:
        grid, sizes, samples = 128, {"mesh": 512, "volume": 128}, (128, 64)
    else:
        grid, sizes, samples = 64, {"mesh": 128, "volume": 64}, (64, 32)
    module = PRDModule(
        teachers={"shape": ShapeTeacher(resolution=sizes["volume"], target_mesh_resolution=64)},
        renderers={
            "mesh": MeshRenderer(resolution=grid),
            "volume": NeuSVolumeRenderer(num_proposal_samples=samples[0], num_importance_samples=samples[1]),
        },
        background=TextConditionedBackground(text_dim=1024),
        render_resolution=sizes,
        regularizers={"volume/eikonal": [0, 1.0, 0.0, 20000], "volume/sparsity": [0, 1.0, 0.0, 20000]},
        renderer_schedules={"volume.rgb_grad_shrink": [0, 1.0, 0.01, 20000]},
        gradient_checkpointing=gradient_checkpointing,
    )
    from benchmarks.bench_generate import random_full_size_student

    student = random_full_size_student().train()
    if gradient_checkpointing:
        student.enable_gradient_checkpointing()
    module.student = student  # configure_model keeps an existing student
    return module


def run(module, batches: list[dict], device: torch.device, iterations: int, warmup: int = 1) -> dict:
    """`warmup` + `iterations` PRD iterations (one batch + one optimizer step each); mean seconds per part."""
    module.configure_model()
    module.to(device)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    totals: dict[str, float] = defaultdict(float)
    peak = 0.0
    for i in range(warmup + iterations):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batch = batches[i % len(batches)]
        sync(device)
        start = time.perf_counter()
        result = module.run_prd_batch(batch, step=i, backward=lambda loss, _sync: loss.backward(), split_backward=True)
        sync(device)
        t_opt = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        end = time.perf_counter()
        if i < warmup:
            continue  # warm-up (teacher loading, caches, allocator)
        for part, seconds in result.seconds.items():
            totals[part] += seconds
        totals["optimizer"] += end - t_opt
        totals["iteration"] += end - start
        peak = max(peak, torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else peak_rss_gb())
    mean = {part: seconds / iterations for part, seconds in totals.items()}
    mean["peak_memory_gb"] = peak
    return mean


def report(title: str, mean: dict, batch_size: int, views: int, steps: int, device: torch.device) -> None:
    memory = "CUDA max allocated" if device.type == "cuda" else "peak RSS of the process"
    print(f"\n{title}  ({device.type}, {batch_size} prompt(s) x {views} views, {steps} PRD steps per iteration)")
    print(f"  {'part':<20}{'s / iteration':>14}{'share':>8}")
    total = mean["iteration"]
    for part in PARTS:
        if part in mean:
            print(f"  {part:<20}{mean[part]:>14.3f}{mean[part] / total:>8.1%}")
    other = total - sum(mean.get(p, 0.0) for p in PARTS)
    print(f"  {'other':<20}{other:>14.3f}{other / total:>8.1%}")
    print(f"  {'iteration':<20}{total:>14.3f}")
    forward = {p: mean.get(p, 0.0) + mean.get(f"backward/{p}", 0.0) for p in ("student", "render", "teacher")}
    print("  forward + backward: " + ", ".join(f"{p} {s:.3f} s" for p, s in forward.items()))
    print(f"  peak memory: {mean['peak_memory_gb']:.2f} GB ({memory})")


def checkpoint_size(module, directory: Path) -> None:
    """Write what a PRD checkpoint holds (state_dict + optimizer state) and print the sizes."""
    import os

    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    params = module.trainable_parameters()
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates Adan's state for every trainable parameter
    optimizer.zero_grad(set_to_none=True)
    state = module.state_dict()
    path = directory / "checkpoint.pt"
    torch.save({"state_dict": state, "optimizer_states": [optimizer.state_dict()]}, path)
    weights = sum(v.numel() * v.element_size() for v in state.values())
    moments = sum(
        v.numel() * v.element_size()
        for s in optimizer.state_dict()["state"].values()
        for v in s.values()
        if torch.is_tensor(v)
    )
    frozen = sum(p.numel() * p.element_size() for p in module.parameters()) - weights
    trainable = sum(p.numel() for p in params)
    adapters = sum(p.numel() for name, p in module.trainable_named_parameters().items() if "network" not in name and "conv_out" not in name and "background" not in name)
    print("\nfull-size checkpoint (trainable weights + Adan state; never the frozen base or the teachers)")
    print(f"  trainable parameters: {trainable / 1e6:.2f} M (adapters {adapters / 1e6:.2f} M; conv_out, MLPs, background the rest)")
    print(f"  weights {weights / 2**20:.1f} MiB + optimizer state {moments / 2**20:.1f} MiB = file {os.path.getsize(path) / 2**20:.1f} MiB")
    print(f"  (the frozen base the checkpoint leaves out: {frozen / 2**30:.2f} GiB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--which", default="demo,full", help="comma list of: demo, full, checkpoint, v1, switches")
    parser.add_argument("--configs", default="configs/triplaneturbo_v1.yaml,configs/triplaneturbo_v1_24gb.yaml",
                        help="'v1': comma list of PRD configs (YAML) to compare")
    parser.add_argument("--width", type=float, default=1.0,
                        help="'v1': channel multiplier of every network (1: true sizes; e.g. 0.2 on the CPU)")
    parser.add_argument("--spatial-scale", type=float, default=1.0,
                        help="'v1': multiplies every spatial size: renders, marching-cubes grid, NeuS patch, the student's "
                             "latent (planes) and the teachers' input resolutions (e.g. 0.5 on the CPU)")
    parser.add_argument("--teacher-dtype", default=None,
                        help="'v1': run every teacher in this dtype instead of the config's (default: the config's on a "
                             "GPU, float32 on the CPU, whose half-precision kernels are emulated and slow)")
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)  # 'v1' child process: write results here
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations after the warm-up")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 1; 0 for 'full' on the CPU)")
    parser.add_argument("--num-steps", type=int, default=None, help="PRD steps per iteration for 'full' (default: 4)")
    parser.add_argument("--base", default=None, help="tiny SD directory for the demo (default: built in a temp dir)")
    parser.add_argument("--full-batch-size", type=int, default=None, help="prompts per iteration (default: 2 on a GPU, 1 on the CPU)")
    parser.add_argument("--reference-renders", action="store_true", help="the reference's render settings for 'full'")
    parser.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
        help="student gradient checkpointing for 'full' (default: on for the CPU, where memory is short; off on a GPU)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    which = {w.strip() for w in args.which.split(",") if w.strip()}
    unknown = which - {"demo", "full", "checkpoint", "v1", "switches"}
    if unknown:
        parser.error(f"unknown --which entries: {', '.join(sorted(unknown))}")
    print(f"torch {torch.__version__}, device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"))

    if "switches" in which:
        from benchmarks.bench_prd_v1 import switch_costs

        switch_costs(args, device, repeats=args.iterations + 1)
    if "v1" in which:
        from benchmarks.bench_prd_v1 import compare_configs

        compare_configs(args, device)
    which = which - {"v1", "switches"}
    if not which:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "demo" in which:
            module, data = demo_module(args.base, tmp)
            data.setup("fit")
            batches = list(data.train_dataloader())
            mean = run(module, batches, device, args.iterations, 1 if args.warmup is None else args.warmup)
            report("demo config (configs/demo_cpu.yaml)", mean, len(batches[0]["prompts"]), module.cameras.num_views, 4, device)
            del module
        if "full" in which or "checkpoint" in which:
            checkpointing = args.gradient_checkpointing if args.gradient_checkpointing is not None else device.type == "cpu"
            module = full_size_module(args.reference_renders, checkpointing)
            if "full" in which:
                batch_size = args.full_batch_size or (2 if device.type == "cuda" else 1)
                batches = [{"prompts": SHAPE_PROMPTS[i : i + batch_size], "seed": i} for i in range(0, 4, batch_size)]
                batches = [b for b in batches if len(b["prompts"]) == batch_size] or [{"prompts": SHAPE_PROMPTS[:batch_size], "seed": 0}]
                renders = "reference renders" if args.reference_renders else "reduced renders"
                renders += ", gradient checkpointing" if checkpointing else ""
                module.num_steps = args.num_steps
                warmup = args.warmup if args.warmup is not None else int(device.type == "cuda")
                mean = run(module, batches, device, args.iterations, warmup)
                steps = args.num_steps or 4
                report(f"full-size student (random weights), ShapeTeacher, {renders}", mean, batch_size, module.cameras.num_views, steps, device)
            if "checkpoint" in which:
                module.configure_model()
                checkpoint_size(module, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
