"""Kill a `prd fit` run with SIGKILL at random moments, resume it with `--ckpt_path last` each time, and check that
every checkpoint it leaves behind loads and that training goes on from the saved step.

    python scripts/kill_and_resume.py --checkpoint-dir outputs/demo_cpu/checkpoints --kills 5 -- \\
        prd fit --config configs/demo_cpu.yaml

The command is run with `--ckpt_path last` appended (the first run finds no checkpoint and starts afresh, as a
requeued cluster job would). Each run is watched until the checkpoint folder changes (a temporary file appears or
`last.ckpt` is replaced) and then killed: at once for even-numbered kills (most likely while the checkpoint is
being written), after a random delay of up to `--max-delay` seconds for odd-numbered ones (somewhere in the next
step). After every kill `last.ckpt` must load (`torch.load(weights_only=True)`) and its global step must not go
back. The last run is left to finish and must exit with code 0. Prints one line per kill; exit code 1 on any
failure. Use a config that checkpoints often (ModelCheckpoint `every_n_train_steps: 1`) and a checkpoint folder
that starts empty.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LAST = "last.ckpt"


@dataclass
class Kill:
    """What one killed run left behind."""

    run: int
    delay: float  # seconds between the checkpoint folder's change and SIGKILL
    step_before: int | None  # global step of last.ckpt when the run started (None: no checkpoint yet)
    step_after: int | None  # global step of last.ckpt after the kill
    mid_write: bool  # the kill interrupted a checkpoint write (a new temporary file was left behind)


class CheckpointCorrupted(RuntimeError):
    pass


def folder_state(directory: Path) -> frozenset:
    """(name, size, mtime, inode) of every file in `directory`: changes when a file is created or replaced."""
    entries = set()
    if directory.is_dir():
        for path in directory.iterdir():
            try:
                stat = path.stat()
            except FileNotFoundError:  # renamed or removed meanwhile
                continue
            entries.add((path.name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    return frozenset(entries)


def temporary_names(directory: Path) -> set[str]:
    """Names of interrupted atomic writes (`lightning_modules.training.checkpoint_io`: `.<name>.<random>.tmp`)."""
    return {p.name for p in directory.glob(".*.tmp")} if directory.is_dir() else set()


def checkpoint_step(path: Path) -> int | None:
    """The global step of a checkpoint file, None when there is none; CheckpointCorrupted when it does not load."""
    import torch

    if not path.exists():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        return int(checkpoint["global_step"])
    except Exception as err:  # a truncated zip, a missing key: either way the file is unusable
        raise CheckpointCorrupted(f"{path} does not load after a kill: {type(err).__name__}: {err}") from err


def wait_for_change(process: subprocess.Popen, directory: Path, before: frozenset, timeout: float) -> bool:
    """Poll (1 ms) until `directory` changes; False if the process ended or `timeout` passed first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if folder_state(directory) != before:
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.001)
    return False


def kill_and_resume(
    command: list[str],
    checkpoint_dir: str | os.PathLike,
    kills: int = 3,
    seed: int = 0,
    max_delay: float = 0.5,
    env: dict[str, str] | None = None,
    log: str | os.PathLike | None = None,
    timeout: float = 600.0,
) -> tuple[list[Kill], int]:
    """Run `command + ["--ckpt_path", "last"]`, SIGKILL it `kills` times (each run once), then let the last run
    finish. Returns the kills and the last run's exit code; raises CheckpointCorrupted when `last.ckpt` does not
    load after a kill, RuntimeError when the global step goes back or a run ends before it could be killed."""
    directory = Path(checkpoint_dir)
    command = [*command, "--ckpt_path", "last"]
    rng = random.Random(seed)
    output = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    events: list[Kill] = []
    try:
        for run in range(kills):
            step_before = checkpoint_step(directory / LAST)
            temps_before = temporary_names(directory)
            before = folder_state(directory)
            delay = 0.0 if run % 2 == 0 else rng.uniform(0.0, max_delay)
            process = subprocess.Popen(command, env=env, stdout=output, stderr=output)
            try:
                if not wait_for_change(process, directory, before, timeout):
                    raise RuntimeError(
                        f"run {run} ended (exit code {process.poll()}) or timed out before writing a checkpoint; "
                        "use more steps or checkpoint more often"
                    )
                time.sleep(delay)
            finally:
                process.kill()  # SIGKILL: no handler, no clean-up
                process.wait()
            step_after = checkpoint_step(directory / LAST)
            if step_before is not None and (step_after is None or step_after < step_before):
                raise RuntimeError(f"run {run}: last.ckpt went back from step {step_before} to {step_after}")
            mid_write = bool(temporary_names(directory) - temps_before)
            events.append(Kill(run, delay, step_before, step_after, mid_write))
        final = subprocess.run(command, env=env, stdout=output, stderr=output, timeout=timeout)
    finally:
        if output is not subprocess.DEVNULL:
            output.close()
    checkpoint_step(directory / LAST)
    return events, final.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint-dir", required=True, help="the folder the run writes last.ckpt to")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="seeds the random kill delays")
    parser.add_argument("--max-delay", type=float, default=0.5, help="longest delay after a checkpoint change, s")
    parser.add_argument("--log", default=None, help="append the runs' output to this file (default: discarded)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per run, s")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- prd fit --config ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the training command after --, e.g. -- prd fit --config configs/demo_cpu.yaml")
    try:
        events, code = kill_and_resume(
            command, args.checkpoint_dir, args.kills, args.seed, args.max_delay, log=args.log, timeout=args.timeout
        )
    except (CheckpointCorrupted, RuntimeError) as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    for event in events:
        after = "no last.ckpt yet" if event.step_after is None else f"last.ckpt at step {event.step_after} loads"
        print(
            f"kill {event.run}: {event.delay * 1000:.0f} ms after a checkpoint change; run started at step "
            f"{event.step_before or 0}; {after}{' (killed mid-write)' if event.mid_write else ''}"
        )
    final = checkpoint_step(Path(args.checkpoint_dir) / LAST)
    print(f"final run: exit code {code}, last.ckpt at step {final}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
