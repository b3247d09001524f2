"""The CPU demo behind `make demo`: PRD trains a tiny student on procedural shapes, then meshes are exported
and measured against their targets.

    python -m lightning_modules.demo [--representation mesh|gaussians] [--config configs/demo_cpu.yaml]
                                     [--out outputs/demo] [--mesh-resolution 48] [--min-reduction 0.5] [--seed 0]
                                     [LightningCLI overrides, e.g. --trainer.max_steps=20]

`--representation gaussians` trains configs/demo_cpu_gaussians.yaml (the same demo with the student's
Gaussians, drawn by the Gaussian rasteriser) into outputs/demo_gaussians and measures the Chamfer distance of the
exported Gaussians' centres (the 3DGS PLY read back) instead of the mesh's; the GLB of the same SDF is written too.

1. builds the tiny base model named in the config's `model.init_args.base` (`build_demo_base`, reused
   when it is already there);
2. trains the config with Lightning exactly as `prd fit --config ...` does (same CLI, same Trainer),
   saving the untrained student at the start of fit and the trained one at the end;
3. for every training prompt, generates a mesh with each student (same seeds), exports it as GLB
   (`prd generate`'s code) with a turntable image of the trained one, and measures the Chamfer distance
   of the exported mesh to the prompt's target shape (`teachers.shapes`);
4. prints the table and writes `report.json`; exits 1 when a prompt's Chamfer distance fell by less than
   `--min-reduction` (50 %), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = "configs/demo_cpu.yaml"
# --representation -> (config, output folder)
REPRESENTATIONS = {"mesh": (DEFAULT_CONFIG, "outputs/demo"), "gaussians": ("configs/demo_cpu_gaussians.yaml", "outputs/demo_gaussians")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules.demo",
        allow_abbrev=False,  # unknown options go to LightningCLI untouched
        description="Train configs/demo_cpu.yaml on the CPU and measure each prompt's mesh against its target shape.",
    )
    parser.add_argument(
        "--representation", choices=tuple(REPRESENTATIONS), default="mesh",
        help="mesh: configs/demo_cpu.yaml into outputs/demo; gaussians: configs/demo_cpu_gaussians.yaml into "
             "outputs/demo_gaussians, measuring the Gaussians' centres (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--config", default=None, help="PRD config with ShapeTeacher prompts (default: the representation's)")
    parser.add_argument("--out", default=None, help="meshes, turntables, students and report.json (default: the representation's)")
    parser.add_argument("--mesh-resolution", type=int, default=48, help="marching-cubes grid of the exported meshes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of prompt i is seed + i, before and after training (default: %(default)s)")
    parser.add_argument("--min-reduction", type=float, default=0.5, help="required Chamfer reduction per prompt (default: %(default)s)")
    parser.add_argument("--num-points", type=int, default=5000, help="surface points per mesh for the Chamfer distance (default: %(default)s)")
    parser.add_argument("--base-pretrain-steps", type=int, default=600, help="UNet pretraining steps of a newly built base model (default: %(default)s)")
    parser.add_argument(
        "--pretrain-base", action="store_true",
        help="pretrain a newly built base's UNet here (~80 s) even when the shipped weights "
             "(lightning_modules/demo/demo_base_unet.safetensors) were pretrained with the same settings",
    )  # fmt: skip
    parser.add_argument("--turntable-frames", type=int, default=8, help="views in each turntable image (default: %(default)s)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads; the figures depend on it (summation order), not on the machine's core count. The "
             "demo's tiny models run faster on one (0.68 s per step vs 0.85 s on two cores), and a busy second core "
             "does not stall it (default: %(default)s)",
    )  # fmt: skip
    return parser


def format_table(prompts, targets, before, after, nearest) -> str:
    rows = [f"{'prompt':<28} {'target':<16} {'CD before':>10} {'CD after':>10} {'change':>8}  nearest target"]
    for i, prompt in enumerate(prompts):
        change = after[i] / before[i] - 1
        rows.append(
            f"{prompt[:28]:<28} {targets[i].name[:16]:<16} {before[i]:10.4f} {after[i]:10.4f} {change:+8.1%}  "
            f"{targets[nearest[i]].name}{'' if nearest[i] == i else '  (not its own)'}"
        )
    return "\n".join(rows)


def check_arguments(args: argparse.Namespace) -> None:
    """One-line `UserError` for an out-of-range option, before anything is built or trained."""
    from renderers.errors import UserError

    minimum = {"--mesh-resolution": (args.mesh_resolution, 8), "--num-points": (args.num_points, 1),
               "--base-pretrain-steps": (args.base_pretrain_steps, 0), "--turntable-frames": (args.turntable_frames, 1),
               "--threads": (args.threads, 1)}  # fmt: skip
    for option, (value, low) in minimum.items():
        if value < low:
            raise UserError(f"{option} must be >= {low}, got {value}")


def run(argv: list[str]) -> int:
    from lightning_modules.cli.paths import output_folder
    from renderers.errors import UserError

    start = time.perf_counter()  # before the heavy imports: the start-up is part of the time printed
    args, overrides = build_parser().parse_known_args(argv)
    config, out = REPRESENTATIONS[args.representation]
    args.config, args.out = args.config or config, args.out or out
    if not Path(args.config).is_file():
        raise UserError(f"config {args.config} not found: run from the repository root or pass --config PATH")
    check_arguments(args)
    return _run(args, overrides, output_folder(args.out), start)


def _run(args: argparse.Namespace, overrides: list[str], out: Path, start: float) -> int:
    import torch

    from lightning_modules.cli.fit import PRDCLI
    from lightning_modules.cli.main import _quiet_model_loading
    from lightning_modules.demo.measures import SaveUntrainedStudent, generate_and_measure
    from lightning_modules.demo.tiny_models import build_demo_base
    from renderers.errors import UserError
    from teachers.shapes import ShapePromptError, parse_shape_prompt, sample_surface_points

    torch.set_num_threads(args.threads)
    _quiet_model_loading()
    # `prd fit`'s command line and checks (PRDCLI): argument errors end in one line, and every input of the
    # training (output folders, prompt libraries, init_weights, the teachers' weights, trainer settings) is checked
    # before the base is built; the base itself is the demo's to build.
    try:
        cli = PRDCLI(["--config", args.config, *overrides], run=False)
    except SystemExit as exit_:  # jsonargparse's usage text and the one-line reason are printed
        return exit_.code if isinstance(exit_.code, int) else 2
    cli.check_inputs(check_base=False)
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    prompts = list(dict.fromkeys(datamodule.prompts("train")))
    try:
        targets = [parse_shape_prompt(p) for p in prompts]
    except ShapePromptError as err:
        raise UserError(f"the demo measures shape prompts only: {err}") from None
    base = str(model.base)
    ready = time.perf_counter()
    latent_size = int(model.student_config.latent_height)
    steps = int(model.num_steps or model.student_config.num_inference_steps)
    timesteps = tuple(999 - k * (1000 // steps) for k in range(steps))  # the student's DDIM "leading" timesteps
    build_demo_base(base, prompts, latent_size=latent_size, steps=args.base_pretrain_steps, timesteps=timesteps, pretrain=args.pretrain_base)
    built = time.perf_counter()

    trainer.callbacks.append(SaveUntrainedStudent(out / "student_untrained"))
    trainer.fit(model, datamodule=datamodule)
    model.save_student(out / "student")
    trained = time.perf_counter()

    target_points = [sample_surface_points(target, args.num_points, seed=0) for target in targets]
    before = generate_and_measure(out / "student_untrained", base, prompts, target_points, out / "untrained", args, turntables=False)
    after = generate_and_measure(out / "student", base, prompts, target_points, out, args, turntables=True)
    nearest = [r["nearest"] for r in after]
    done = time.perf_counter()

    cd_before = [r["chamfer"] for r in before]
    cd_after = [r["chamfer"] for r in after]
    measured = after[0]["measured"]
    what = f"exported mesh ({args.mesh_resolution}^3 grid)" if measured == "mesh" else "exported object's Gaussian centres"
    print()
    print(f"PRD demo: {trainer.global_step} training steps on {len(prompts)} prompts; Chamfer distance of each "
          f"{what} to its target shape, untrained vs trained student, same seeds")
    print(format_table(prompts, targets, cd_before, cd_after, nearest))
    print(f"time: start-up {ready - start:.0f} s, base model {built - ready:.0f} s, training {trained - built:.0f} s, meshes and measures "
          f"{done - trained:.0f} s, total {done - start:.0f} s")
    print(f"meshes and turntables: {out}/")
    failed = [p for p, b, a in zip(prompts, cd_before, cd_after, strict=True) if a > (1 - args.min_reduction) * b]
    report = dict(
        config=args.config,
        measured=measured,
        steps=trainer.global_step,
        min_reduction=args.min_reduction,
        prompts=[
            dict(prompt=p, target=t.name, chamfer_before=b, chamfer_after=a, reduction=1 - a / b,
                 nearest_target=targets[n].name, file=r["file"], turntable=r.get("turntable"),
                 **({"gaussians_file": r["gaussians_file"]} if "gaussians_file" in r else {}))
            for p, t, b, a, n, r in zip(prompts, targets, cd_before, cd_after, nearest, after, strict=True)
        ],
        seconds=dict(startup=ready - start, base=built - ready, training=trained - built, meshes=done - trained, total=done - start),
        passed=not failed,
    )
    (out / "report.json").write_text(json.dumps(report, indent=2))
    if failed:
        print(f"FAILED: the Chamfer distance fell by less than {args.min_reduction:.0%} for: {', '.join(failed)}")
        return 1
    print(f"OK: every prompt's Chamfer distance fell by at least {args.min_reduction:.0%}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from lightning_modules.cli.main import one_line, user_error_of

    try:
        return run(list(sys.argv[1:] if argv is None else argv))
    except Exception as err:  # a UserError, also when jsonargparse wraps it (as `prd` does)
        user_error = user_error_of(err)
        if user_error is None:
            raise
        print(f"demo: error: {one_line(user_error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
