"""Mutation check: hand-written bugs in the core numerics, each of which named tests must catch.

    .venv/bin/python scripts/mutation_check.py            # all mutants (a few minutes on one core)
    .venv/bin/python scripts/mutation_check.py --list     # the mutants and their tests
    .venv/bin/python scripts/mutation_check.py -k prd     # only mutants whose name contains "prd"

Not a test: it copies the repository's files (tracked and untracked-not-ignored, as git lists them) to a
temporary folder, checks that the named tests pass there unmutated, then applies ONE mutant at a time to the
copy (an exact snippet of a source file replaced; the working tree is never written), runs that mutant's tests
in the copy (`python -m pytest -x -q -n 0 ...`, PYTHONPATH = the copy, one torch thread) and restores the file.
A mutant is caught when its tests fail (pytest exit code 1); it survived when they pass; any other outcome
(collection error, timeout) is reported as an error. Prints caught / survived per mutant and a summary, and
exits 1 unless every mutant was caught (2 when the unmutated tests already fail).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    tests: tuple[str, ...]  # pytest node ids that must fail


STUDENT_FIXTURE = "tests/test_student_fixture.py"
PRD = "tests/test_prd_module.py"
OBJECTIVES = "tests/test_objectives.py"
FIELD = "tests/test_triplane_field.py"

MUTANTS = [
    # --- adapters
    Mutant(
        "adapters: non-default ranks lose alpha = rank (peft alpha_pattern dropped)",
        "lightning_modules/student/adapters.py",
        "alpha_pattern=dict(pattern),",
        "alpha_pattern={},",
        ("tests/test_student.py::test_every_lora_layer_is_w_plus_b_a_at_scale_one_whatever_its_rank",),
    ),
    Mutant(
        "adapters: LoRA scale 2 instead of 1 (lora_alpha = 2 r)",
        "lightning_modules/student/adapters.py",
        "lora_alpha=default_rank,",
        "lora_alpha=2 * default_rank,",
        (f"{STUDENT_FIXTURE}::test_single_step",),
    ),
    Mutant(
        "adapters: self-attention out-LoRA reads the attention output before to_out (not sequential)",
        "lightning_modules/student/adapters.py",
        "        out = attn.to_out[0](out)\n        y = out.view(objects, planes, seq, -1)\n"
        '        delta = torch.einsum("bpsc,prc->bpsr", y, self.out_down)\n',
        "        y = attn.to_out[0](out).view(objects, planes, seq, -1)\n"
        '        delta = torch.einsum("bpsc,prc->bpsr", out.view(objects, planes, seq, -1), self.out_down)\n',
        (f"{STUDENT_FIXTURE}::test_single_step",),
    ),
    # --- student sampler
    Mutant(
        "sampler: timesteps not shifted to start at T - 1 (750, 500, 250, 0)",
        "lightning_modules/student/triplane_student.py",
        "return timesteps + (scheduler.config.num_train_timesteps - 1 - timesteps.max())",
        "return timesteps",
        (f"{STUDENT_FIXTURE}::test_timesteps_and_alphas",),
    ),
    Mutant(
        "sampler: x0 = (x - (1 - abar) eps) / sqrt(abar) (sigma not square-rooted)",
        "lightning_modules/student/triplane_student.py",
        "x0 = (noisy_latents - (1 - a) ** 0.5 * eps) / a**0.5",
        "x0 = (noisy_latents - (1 - a) * eps) / a**0.5",
        (f"{STUDENT_FIXTURE}::test_single_step",),
    ),
    Mutant(
        "sampler: the DDIM loop continues from x0 instead of the previous sample",
        "lightning_modules/student/triplane_student.py",
        "x0, x = step.pred_original_sample, step.prev_sample",
        "x0, x = step.pred_original_sample, step.pred_original_sample",
        (f"{STUDENT_FIXTURE}::test_every_sampler_step",),
    ),
    # --- triplane field
    Mutant(
        "field: yz plane sampled at (y, z) instead of (z, y)",
        "lightning_modules/student/triplane_field.py",
        "torch.stack([x, z], -1), torch.stack([z, y], -1)], dim=1)",
        "torch.stack([x, z], -1), torch.stack([y, z], -1)], dim=1)",
        (f"{FIELD}::test_bilinear_lookup_pixel_centres_zero_padding_and_axes",),
    ),
    Mutant(
        "field: twice-differentiable lookup with align_corners=True pixel centres",
        "lightning_modules/student/triplane_field.py",
        "x = ((grid[..., 0] + 1) * w - 1) / 2",
        "x = (grid[..., 0] + 1) * (w - 1) / 2",
        (f"{FIELD}::test_bilinear_sample_equals_grid_sample_and_is_twice_differentiable",),
    ),
    Mutant(
        "field: sphere prior |p| - 0.5 dropped",
        "lightning_modules/student/triplane_field.py",
        "return points.norm(dim=-1) - float(cfg.sdf_bias_params)",
        "return points.norm(dim=-1) * 0.0",
        (f"{FIELD}::test_heads_shapes_protocol_prior_and_colour",),
    ),
    # --- objectives
    Mutant(
        "objectives: classifier-free guidance around eps_c instead of eps_u",
        "teachers/objectives.py",
        "eps_cfg = eps_u + self.cfg_scale(step) * (eps_c - eps_u)",
        "eps_cfg = eps_c + self.cfg_scale(step) * (eps_c - eps_u)",
        (f"{OBJECTIVES}::test_gradient_equals_formula[uniform-sds-0.0]",),
    ),
    Mutant(
        "objectives: SDS weighting abar_t instead of 1 - abar_t",
        "teachers/objectives.py",
        "grad = (1 - abar[t]).view(-1, 1, 1, 1) * (first - second)",
        "grad = abar[t].view(-1, 1, 1, 1) * (first - second)",
        (f"{OBJECTIVES}::test_gradient_equals_formula[sds-sds-0.0]",),
    ),
    Mutant(
        "objectives: dmd normaliser without its eps",
        "teachers/objectives.py",
        "grad = (x0_second - x0_first) / (w + self.dmd_eps)",
        "grad = (x0_second - x0_first) / w",
        (f"{OBJECTIVES}::test_gradient_equals_formula[dmd-asd-0.1]",),
    ),
    Mutant(
        "objectives: loss ||x - stopgrad(x - grad)||^2 without the 0.5 (gradient doubled)",
        "teachers/objectives.py",
        "loss = 0.5 * (x.float() - target).square().flatten(1).sum(dim=1)",
        "loss = (x.float() - target).square().flatten(1).sum(dim=1)",
        (f"{OBJECTIVES}::test_gradient_equals_formula[uniform-asd-0.0]",),
    ),
    Mutant(
        "objectives: timesteps drawn from [0, t_max) ignoring t_min",
        "teachers/objectives.py",
        "t = randint(min_step, max_step, (num_groups,), generator, device)",
        "t = randint(0, max_step, (num_groups,), generator, device)",
        (f"{OBJECTIVES}::test_timesteps_range_groups_and_second_timestep",),
    ),
    # --- PRD step
    Mutant(
        "prd: every step backpropagated with weight 1 instead of 1 / steps",
        "lightning_modules/training/prd_module.py",
        "step_weight = 1.0 / len(timesteps)",
        "step_weight = 1.0",
        (f"{PRD}::test_each_prd_step_backpropagates_its_loss_times_one_over_steps",),
    ),
    Mutant(
        "prd: no detach between steps (step k + 1 backpropagates into step k)",
        "lightning_modules/training/prd_module.py",
        '                        timer.seconds[f"backward/{part}"] += seconds\n            latent = x0.detach()\n',
        '                        timer.seconds[f"backward/{part}"] += seconds\n            latent = x0\n',
        (f"{PRD}::test_no_gradient_crosses_from_a_prd_step_to_the_previous_ones",),
    ),
    Mutant(
        "prd: the previous x0 re-noised with the noise of the first step (no fresh noise)",
        "lightning_modules/training/prd_module.py",
        "                noise = student.make_noise(batch_size, generator=generator)\n"
        "                x0 = student.predict_x0(student.add_noise(latent, noise, t), t, text)",
        "                noise = latent if k == 0 else noise\n"
        "                x0 = student.predict_x0(student.add_noise(latent, noise, t), t, text)",
        (f"{PRD}::test_prd_batch_is_the_reference_loop",),
    ),
    # --- resume state
    Mutant(
        "resume: the accumulation window position is not restored",
        "lightning_modules/training/checkpoints.py",
        'self._window_batches = int(state.get("window_batches", 0))',
        "self._window_batches = 0",
        (f"{PRD}::test_mid_window_checkpoint_keeps_the_accumulated_gradient",),
    ),
    Mutant(
        "resume: the gradients of a mid-window checkpoint are not put back",
        "lightning_modules/training/checkpoints.py",
        "own[name].grad = grad.to(own[name].device, own[name].dtype)",
        "own[name].grad = None",
        (f"{PRD}::test_mid_window_checkpoint_keeps_the_accumulated_gradient",),
    ),
    Mutant(
        "resume: the data position restarts the interrupted epoch from its first batch",
        "datamodules/prompts.py",
        'epoch, start = int(state["epoch"]), int(state["batches_consumed"])',
        'epoch, start = int(state["epoch"]), 0',
        ("tests/test_datamodule_prompts.py::test_interrupted_then_resumed_iteration_equals_uninterrupted[3-0]",),
    ),
]


def repository_files(root: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored files, as git lists them (what a fresh checkout would hold)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout
    return [name for name in out.decode().split("\0") if name and (root / name).is_file()]


def copy_repository(root: Path, dest: Path) -> None:
    for name in repository_files(root):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)


def check_mutant(mutant: Mutant, root: Path) -> str | None:
    """Why the mutant cannot be applied to `root` (None when its snippet occurs exactly once)."""
    path = root / mutant.path
    if not path.is_file():
        return f"{mutant.path} does not exist"
    count = path.read_text().count(mutant.original)
    if count != 1:
        return f"its snippet occurs {count} times in {mutant.path} (must be exactly once)"
    if mutant.original == mutant.replacement:
        return "the replacement equals the original"
    return None


def test_environment(copy: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(copy),
        PYTHONDONTWRITEBYTECODE="1",  # no stale bytecode between a mutant and its restore
        OMP_NUM_THREADS=str(threads),
        PRD_TEST_THREADS=str(threads),
    )
    env.pop("PYTEST_ADDOPTS", None)
    return env


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_tests(copy: Path, tests: tuple[str, ...], threads: int, timeout: float) -> tuple[int | None, float, float, str]:
    """(pytest exit code or None on timeout, wall seconds, CPU seconds, the last lines of its output)."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", *tests]
    start, cpu = time.perf_counter(), _children_cpu_seconds()
    try:
        done = subprocess.run(
            command, cwd=copy, env=test_environment(copy, threads), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - start, _children_cpu_seconds() - cpu, f"timed out after {timeout:.0f} s"
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
    return done.returncode, time.perf_counter() - start, _children_cpu_seconds() - cpu, tail


def imports_resolve_to(copy: Path, threads: int) -> str | None:
    """None when the project's packages import from the copy, else what they import from."""
    code = (
        "import datamodules, lightning_modules, renderers, teachers\n"
        "print('\\n'.join(m.__file__ for m in (datamodules, lightning_modules, renderers, teachers)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=copy, env=test_environment(copy, threads), capture_output=True, text=True
    )
    files = done.stdout.split()
    if done.returncode != 0 or len(files) != 4:
        return done.stderr.strip() or "import failed"
    outside = [f for f in files if not Path(f).resolve().is_relative_to(copy.resolve())]
    return ", ".join(outside) or None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="select", default="", help="only mutants whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of the test runs")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per test run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    args = parser.parse_args()

    mutants = [m for m in MUTANTS if args.select.lower() in m.name.lower()]
    if not mutants:
        print(f"no mutant matches {args.select!r}")
        return 2
    if args.list:
        for mutant in mutants:
            print(f"{mutant.name}\n    {mutant.path}: {mutant.original.strip()!r} -> {mutant.replacement.strip()!r}")
            for test in mutant.tests:
                print(f"    must fail: {test}")
        return 0
    problems = [(m.name, why) for m in mutants if (why := check_mutant(m, ROOT))]
    if problems:
        for name, why in problems:
            print(f"stale mutant {name!r}: {why}")
        return 2

    copy = Path(tempfile.mkdtemp(prefix="prd-mutants-"))
    started = time.perf_counter()
    try:
        copy_repository(ROOT, copy)
        outside = imports_resolve_to(copy, args.threads)
        if outside:
            print(f"the copy's packages do not import from the copy ({outside}); nothing was run")
            return 2
        all_tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        rc, seconds, cpu, tail = run_tests(copy, all_tests, args.threads, args.timeout)
        print(f"baseline: {len(all_tests)} test node(s) unmutated in {copy}: exit {rc} ({seconds:.0f} s, CPU {cpu:.0f} s)")
        if rc != 0:
            print(tail)
            print("the tests fail without any mutant: fix them first")
            return 2

        results = []
        for mutant in mutants:
            path = copy / mutant.path
            original = path.read_text()
            path.write_text(original.replace(mutant.original, mutant.replacement, 1))
            try:
                rc, seconds, cpu, tail = run_tests(copy, mutant.tests, args.threads, args.timeout)
            finally:
                path.write_text(original)
            verdict = "caught" if rc == 1 else "SURVIVED" if rc == 0 else f"ERROR (exit {rc})"
            results.append(verdict)
            print(f"{verdict:<9} {seconds:5.0f} s (CPU {cpu:4.0f} s)  {mutant.name}", flush=True)
            if rc != 1:
                print("          " + tail.replace("\n", "\n          "))
    finally:
        if args.keep:
            print(f"copy kept: {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)

    caught = results.count("caught")
    survived = results.count("SURVIVED")
    errors = len(results) - caught - survived
    print(
        f"\n{len(results)} mutants: {caught} caught, {survived} survived, {errors} error(s) "
        f"in {time.perf_counter() - started:.0f} s (test runs: CPU {_children_cpu_seconds():.0f} s)"
    )
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
