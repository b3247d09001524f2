"""`bench_prd.py --which v1`: one PRD optimizer step of a TriplaneTurbo v1 config with its full teacher set
(SD 2.1, MVDream, RichDreamer normal-depth; random weights, `benchmarks/prd_models.py`), per config in its own
process, and a table that compares the configs.

Per optimizer step (`accumulate_grad_batches` batches of `data.batch_size` prompts, then the optimizer):
seconds of the student forward, the renders, each teacher's forward, the backward (teacher / render / student
parts, from gradient hooks) and the optimizer; peak allocated and reserved CUDA memory (GPU) or the process's
peak resident set (CPU); host RAM (resident set after the step); bytes of teacher weights moved between host and
GPU by offloading (0 on the CPU, where nothing moves).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red ball", "a blue cube", "a yellow donut", "a green cone", "a wooden chair", "a teapot"]
ROWS = ("student", "render", "teacher", "backward/teacher", "backward/render", "backward/student", "optimizer")


def _build(spec: dict):
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def _scaled(size: int, scale: float, multiple: int = 8) -> int:
    return max(multiple, multiple * round(size * scale / multiple))


def build_module(config_path: Path, width: float, spatial_scale: float = 1.0, teacher_dtype: str | None = None, num_steps: int | None = None):
    """PRDModule of the config (renderers, cameras, schedules, memory switches, teachers with random weights);
    `spatial_scale` multiplies every spatial size, `teacher_dtype` replaces the teachers' dtype."""
    from benchmarks import prd_models
    from lightning_modules.training.prd_module import PRDModule
    from lightning_modules.training.settings import resolve_student_config
    from renderers import TextConditionedBackground
    from teachers.ensemble import TeacherEnsemble

    config = yaml.safe_load(config_path.read_text())
    model = config["model"]["init_args"]
    ensemble = model["teachers"]["init_args"]
    teachers = {}
    for name, spec in ensemble["teachers"].items():
        init_args = dict(spec.get("init_args", {}))
        init_args["resolution"] = _scaled(init_args.get("resolution", 512), spatial_scale)
        if teacher_dtype is not None:
            init_args["dtype"] = teacher_dtype
        teachers[name] = _build({"class_path": spec["class_path"], "init_args": init_args})
    teachers = TeacherEnsemble(teachers, share_weights=ensemble.get("share_weights", True))
    renderers = {}
    for name, spec in model["renderers"].items():
        spec = {"class_path": spec["class_path"], "init_args": dict(spec.get("init_args", {}))}
        for key in ("resolution", "patch_size"):  # the marching-cubes grid, the NeuS full-resolution patch
            if key in spec["init_args"]:
                spec["init_args"][key] = _scaled(spec["init_args"][key], spatial_scale, 4)
        renderers[name] = _build(spec)
    background = dict(model["background"]["init_args"])
    background["text_dim"] = prd_models.text_width(1024, width)
    resolution = {name: _scaled(size, spatial_scale) for name, size in model["render_resolution"].items()}
    student_config = dict(model.get("student_config") or {})
    student_config["latent_size"] = _scaled(student_config.get("latent_size", 32), spatial_scale, 4)
    switches = ("gradient_checkpointing", "student_autocast", "attention_backend", "share_text_encoder",
                "accumulate_grad_batches", "num_steps", "regularizers", "renderer_schedules", "cameras")  # fmt: skip
    module = PRDModule(
        teachers=teachers, renderers=renderers, base=model["base"], background=TextConditionedBackground(**background),
        render_resolution=resolution, **{key: model[key] for key in switches if key in model},
    )  # fmt: skip
    if num_steps is not None:
        module.num_steps = num_steps
    module.student = prd_models.random_student(width, resolve_student_config(student_config)).train()
    module.apply_memory_settings()
    for index, teacher in enumerate(teachers.teachers.values()):
        prd_models.install_random_teacher(teacher, width, seed=index + 1)
    prd_models.install_random_text_encoders(teachers, width)
    return module, config["data"]["init_args"]["batch_size"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def time_teachers(module, device: torch.device, totals: dict) -> None:
    """Add each teacher's forward seconds to totals["teacher/<name>"] (hooks around its call)."""
    for name, teacher in module.teachers.teachers.items():
        def before(_module, _args, name=name):
            _sync(device)
            totals[f"_start/{name}"] = time.perf_counter()

        def after(_module, _args, _output, name=name):
            _sync(device)
            totals[f"teacher/{name}"] += time.perf_counter() - totals.pop(f"_start/{name}")

        teacher.register_forward_pre_hook(before)
        teacher.register_forward_hook(after)


def run_config(config_path: Path, device: torch.device, args, iterations: int, warmup: int) -> dict:
    """Mean figures per optimizer step of `config_path` (see the module docstring)."""
    teacher_dtype = args.teacher_dtype or (None if device.type == "cuda" else "float32")
    module, batch_size = build_module(config_path, args.width, args.spatial_scale, teacher_dtype, args.num_steps)
    module.to(device)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    accumulate = module.accumulate_grad_batches
    totals: dict[str, float] = defaultdict(float)
    step_totals: dict[str, float] = defaultdict(float)
    time_teachers(module, device, step_totals)
    peak_allocated = peak_reserved = host = 0.0
    moved = 0
    batch_index = 0
    for i in range(warmup + iterations):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step_totals.clear()
        moved_before = sum(t.bytes_moved for t in module.teachers.teachers.values())
        _sync(device)
        start = time.perf_counter()
        for _ in range(accumulate):
            prompts = [PROMPTS[(batch_index * batch_size + k) % len(PROMPTS)] for k in range(batch_size)]
            result = module.run_prd_batch(
                {"prompts": prompts, "seed": batch_index}, step=i, backward=lambda loss, _sync: loss.backward(),
                loss_scale=1.0 / accumulate, split_backward=True,
            )  # fmt: skip
            batch_index += 1
            for part, seconds in result.seconds.items():
                step_totals[part] += seconds
        _sync(device)
        t_opt = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        end = time.perf_counter()
        if i < warmup:
            continue
        step_totals["optimizer"] += end - t_opt
        step_totals["step"] += end - start
        for part, seconds in step_totals.items():
            totals[part] += seconds
        moved += sum(t.bytes_moved for t in module.teachers.teachers.values()) - moved_before
        host = max(host, _rss_gb())
        if device.type == "cuda":
            peak_allocated = max(peak_allocated, torch.cuda.max_memory_allocated(device) / 2**30)
            peak_reserved = max(peak_reserved, torch.cuda.max_memory_reserved(device) / 2**30)
    figures = {part: seconds / iterations for part, seconds in totals.items() if not part.startswith("_")}
    figures["peak_allocated_gb"] = peak_allocated
    figures["peak_reserved_gb"] = peak_reserved
    figures["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    figures["host_ram_gb"] = host
    figures["offload_gb_per_step"] = moved / iterations / 2**30
    figures["prompts_per_step"] = batch_size * accumulate
    figures["batches_per_step"] = accumulate
    figures["frozen_teacher_gb"] = _frozen_gb(module)
    figures["student_gb"] = sum(p.numel() * p.element_size() for p in module.student.parameters()) / 2**30
    return figures


def _frozen_gb(module) -> float:
    seen, total = set(), 0
    for teacher in module.teachers.teachers.values():
        for p in teacher.frozen_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total / 2**30


def _table(names: list[str], results: list[dict], device: torch.device) -> None:
    first = results[0]
    teachers = sorted({key for r in results for key in r if key.startswith("teacher/")})
    rows = ["student", "render", *teachers, "backward/teacher", "backward/render", "backward/student", "optimizer", "step"]
    width = max(10, *(len(n) + 2 for n in names))
    label = max(22, *(len(row) + 2 for row in rows))
    header = f"  {'s / optimizer step':<{label}}" + "".join(f"{n:>{width}}" for n in names)
    header += "".join(f"{'ratio ' + str(i + 1):>10}" for i in range(1, len(names)))
    print(header)
    for row in rows:
        line = f"  {row:<{label}}" + "".join(f"{r.get(row, 0.0):>{width}.3f}" for r in results)
        line += "".join(f"{r.get(row, 0.0) / first[row]:>10.2f}" if first.get(row) else f"{'':>10}" for r in results[1:])
        print(line)
    memory = (("peak_allocated_gb", "peak allocated GB"), ("peak_reserved_gb", "peak reserved GB")) if device.type == "cuda" else (("peak_rss_gb", "peak RSS GB"),)
    for key, text in (*memory, ("host_ram_gb", "host RAM GB"), ("offload_gb_per_step", "offload GB / step"),
                       ("frozen_teacher_gb", "teacher weights GB"), ("student_gb", "student weights GB"),
                       ("prompts_per_step", "prompts / step")):  # fmt: skip
        line = f"  {text:<{label}}" + "".join(f"{r[key]:>{width}.2f}" for r in results)
        line += "".join(f"{r[key] / first[key]:>10.2f}" if first[key] else "" for r in results[1:])
        print(line)


def compare_configs(args, device: torch.device) -> None:
    """Run each config of `args.configs` in a child process (or, in the child, the one config) and print the table."""
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    missing = [c for c in configs if not (ROOT / c).is_file() and not Path(c).is_file()]
    if missing:
        raise SystemExit(f"--configs: {', '.join(missing)} not found (paths relative to the repository or absolute)")
    paths = [ROOT / c if (ROOT / c).is_file() else Path(c) for c in configs]
    iterations = args.iterations
    warmup = 1 if args.warmup is None else args.warmup
    if args.json:  # child: one config
        figures = run_config(paths[0], device, args, iterations, warmup)
        Path(args.json).write_text(json.dumps(figures))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, path in enumerate(paths):
            out = Path(tmp) / f"{index}.json"
            command = [sys.executable, str(ROOT / "benchmarks" / "bench_prd.py"), "--which", "v1", "--configs", str(path),
                       "--json", str(out), "--device", str(device), "--width", str(args.width),
                       "--spatial-scale", str(args.spatial_scale), "--iterations", str(iterations), "--warmup", str(warmup)]  # fmt: skip
            for option in ("threads", "teacher_dtype", "num_steps"):
                if getattr(args, option):
                    command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
            subprocess.run(command, check=True)
            results.append(json.loads(out.read_text()))
    names = [p.stem.removeprefix("triplaneturbo_") for p in paths]
    teacher_dtype = args.teacher_dtype or ("as configured" if device.type == "cuda" else "float32")
    print(f"\nTriplaneTurbo v1 configs, full teacher set (random weights), width {args.width}, spatial scale "
          f"{args.spatial_scale}, PRD steps {args.num_steps or 'as configured'}, teachers {teacher_dtype}, {device.type}, "
          f"{iterations} timed optimizer step(s) after {warmup} warm-up")  # fmt: skip
    _table(names, results, device)


def switch_costs(args, device: torch.device, repeats: int = 3) -> None:
    """Student forward + backward (UNet -> x0 -> VAE decoder, one PRD step of one prompt) at `args.width` /
    `args.spatial_scale` under each exact or precision switch, interleaved A/B in this process (best of `repeats`):
    seconds, ratio to plain float32, and on a GPU the peak allocated memory."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from benchmarks import prd_models
    from lightning_modules.training.settings import resolve_student_config

    latent = _scaled(32, args.spatial_scale, 4)
    student = prd_models.random_student(args.width, resolve_student_config({"latent_size": latent})).to(device).train()
    text = student.encode_prompt(["a red ball"])
    generator = torch.Generator().manual_seed(0)
    noisy = student.add_noise(student.make_noise(1, generator=generator), student.make_noise(1, generator=generator), 749)
    variants = {
        "float32 (reference)": dict(),
        "gradient checkpointing": dict(checkpointing=True),
        "bf16 autocast": dict(autocast=torch.bfloat16),
        "checkpointing + bf16 autocast": dict(checkpointing=True, autocast=torch.bfloat16),
        "SDPA math kernel only": dict(kernel=lambda: sdpa_kernel([SDPBackend.MATH])),
    }
    best = {name: float("inf") for name in variants}
    peak = dict.fromkeys(variants, 0.0)
    for _ in range(max(1, repeats)):
        for name, options in variants.items():
            student.enable_gradient_checkpointing(options.get("checkpointing", False))
            student.set_autocast(options.get("autocast"))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            with options.get("kernel", contextlib.nullcontext)():
                planes = student.decode(student.predict_x0(noisy, 749, text)).planes
                planes.square().mean().backward()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
            student.zero_grad(set_to_none=True)
            del planes
            if device.type == "cuda":
                peak[name] = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"\nstudent forward + backward per switch (width {args.width}, planes {latent * 8} px, {device.type}, best of {repeats}, interleaved)")
    reference = best["float32 (reference)"]
    for name in variants:
        memory = f"{peak[name]:>10.2f} GB" if device.type == "cuda" else ""
        print(f"  {name:<32}{best[name]:>9.3f} s{best[name] / reference:>8.2f} x{memory}")
