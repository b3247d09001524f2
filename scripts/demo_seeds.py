"""Run the CPU demo (`make demo`) for several training seeds and print the Chamfer reduction of every prompt.

    .venv/bin/python scripts/demo_seeds.py                       # seeds 0 1 2, configs/demo_cpu.yaml
    .venv/bin/python scripts/demo_seeds.py --seeds 0 1 2 3 4 -- --trainer.max_steps=200

Each seed is one `python -m lightning_modules.demo --seed_everything=S` run in a subprocess (the same
entry point as `make demo`), with its checkpoints, TensorBoard logs, meshes and report under
`--out/seed_S/` (a copy of the config points its output folders there), so the seeds run one after the
other without touching `outputs/demo` or `outputs/demo_cpu`. Arguments after `--` go to every demo run.
Prints one row per prompt with its reduction for each seed, the minimum and the mean, then each run's
wall time and phases; writes `--out/seeds.json`. Exit code 1 when a run failed or a reduction is below
`--target` (default 0.65, the demo's margin over its 50 % pass line).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def seed_config(config: Path, out: Path) -> Path:
    """A copy of `config` whose checkpoint and log folders lie under `out` (written to `out/config.yaml`)."""
    data = yaml.safe_load(config.read_text())
    trainer = data.setdefault("trainer", {})
    logger = trainer.get("logger")
    if isinstance(logger, dict):
        logger.setdefault("init_args", {})["save_dir"] = str(out / "logs")
    for callback in trainer.get("callbacks") or []:
        if callback.get("class_path", "").endswith("ModelCheckpoint"):
            callback.setdefault("init_args", {})["dirpath"] = str(out / "checkpoints")
    trainer["default_root_dir"] = str(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_seed(seed: int, args: argparse.Namespace, extra: list[str]) -> dict:
    out = Path(args.out) / f"seed_{seed}"
    config = seed_config(Path(args.config), out)
    command = [
        sys.executable, "-m", "lightning_modules.demo", "--config", str(config), "--out", str(out / "demo"),
        f"--seed_everything={seed}", "--trainer.enable_progress_bar=false", *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    with open(out / "demo.log", "w") as log:
        code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    wall = time.perf_counter() - start
    report_path = out / "demo" / "report.json"
    if not report_path.is_file():
        return dict(seed=seed, code=code, wall=wall, report=None, log=str(out / "demo.log"))
    return dict(seed=seed, code=code, wall=wall, report=json.loads(report_path.read_text()), log=str(out / "demo.log"))


def format_runs(runs: list[dict], target: float) -> tuple[str, bool]:
    done = [run for run in runs if run["report"] is not None]
    ok = len(done) == len(runs)
    lines = []
    if done:
        prompts = [p["prompt"] for p in done[0]["report"]["prompts"]]
        header = f"{'prompt':<28}" + "".join(f"{'seed ' + str(r['seed']):>10}" for r in done) + f"{'min':>9}{'mean':>9}"
        lines.append(header)
        for i, prompt in enumerate(prompts):
            values = [r["report"]["prompts"][i]["reduction"] for r in done]
            ok = ok and min(values) >= target
            cells = "".join(f"{-v:>+10.1%}" for v in values)
            lines.append(f"{prompt[:28]:<28}{cells}{-min(values):>+9.1%}{-sum(values) / len(values):>+9.1%}")
        everything = [p["reduction"] for r in done for p in r["report"]["prompts"]]
        lines.append(f"all prompts and seeds: min {-min(everything):+.1%}, mean {-sum(everything) / len(everything):+.1%}")
    lines.append("")
    lines.append(f"{'seed':<6}{'exit':>5}{'wall':>9}{'start-up':>10}{'base':>8}{'training':>10}{'meshes':>8}")
    for run in runs:
        seconds = (run["report"] or {}).get("seconds", {})
        phases = "".join(f"{seconds[k]:>{w}.0f}s" if k in seconds else f"{'-':>{w + 1}}"
                         for k, w in (("startup", 9), ("base", 7), ("training", 9), ("meshes", 7)))
        lines.append(f"{run['seed']:<6}{run['code']:>5}{run['wall']:>8.0f}s{phases}" + ("" if run["report"] else f"  see {run['log']}"))
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo_cpu.yaml"), help="demo config (default: %(default)s)")
    parser.add_argument("--out", default="outputs/demo_seeds", help="one folder per seed below this (default: %(default)s)")
    parser.add_argument("--target", type=float, default=0.65, help="reduction every prompt must reach (default: %(default)s)")
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="seeds run at once, one core each (default: %(default)s; the figures do not depend on it, the wall times do)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.jobs < 1:
        print(f"demo_seeds: error: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    if not Path(args.config).is_file():
        print(f"demo_seeds: error: config {args.config} not found", file=sys.stderr)
        return 2
    def one(seed: int) -> dict:
        run = run_seed(seed, args, extra)
        print(f"seed {seed}: exit {run['code']}, {run['wall']:.0f} s", flush=True)
        return run

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each worker waits on its demo subprocess
        runs = list(pool.map(one, args.seeds))
    table, ok = format_runs(runs, args.target)
    print()
    print(table)
    summary = [dict(seed=r["seed"], exit_code=r["code"], wall_seconds=r["wall"], report=r["report"]) for r in runs]
    (Path(args.out) / "seeds.json").write_text(json.dumps(dict(target=args.target, extra_args=extra, runs=summary), indent=2))
    print(f"{'OK' if ok else 'BELOW TARGET'}: every prompt of every seed {'reached' if ok else 'did not reach'} -{args.target:.0%}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
