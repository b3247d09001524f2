"""`prd serve`: the web demo and HTTP API of a trained student (`make serve`).

    prd serve [--base DIR|ID] [--weights FILE|DIR|ID] [--host 127.0.0.1] [--port 7860] [--out outputs/serve]
              [--concurrency 1] [--max-queue 32] [--device auto|cpu|cuda] [--turntable-frames 8]

Weights as for `prd generate`. Without `--weights` it serves the CPU demo's trained student
(`outputs/demo/student` on the base `.demo/tiny_sd`, both written by `make demo`). Every argument is checked
before the model loads; the student is loaded once. Listens on 127.0.0.1 unless `--host` says otherwise.
"""

from __future__ import annotations

import time
from pathlib import Path

from lightning_modules.cli.arguments import CommandParser, int_at_least
from lightning_modules.cli.paths import output_folder
from lightning_modules.student.generation import resolve_device
from renderers.errors import UserError

DEMO_STUDENT = Path("outputs/demo/student")
DEMO_BASE = Path(".demo/tiny_sd")


class NoWeightsError(UserError, ValueError):
    """`prd serve` without weights and without the CPU demo's student (one-line message)."""


def build_parser() -> CommandParser:
    p = CommandParser(prog="prd serve", description="Serve a web page and an HTTP API: prompt -> mesh.")
    p.add_argument("--base", default=None, help="SD directory or hub id (default: from the weights' config.json)")
    p.add_argument("--weights", default=None,
                   help=f"TriplaneTurbo weights: file, folder or hub id (default: the CPU demo's {DEMO_STUDENT})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int_at_least(1, 65535), default=7860)
    p.add_argument("--out", default="outputs/serve", help="folder of the generated files (default: %(default)s)")
    p.add_argument("--concurrency", type=int_at_least(1, 64), default=1, help="page requests taken from the queue at once (the student itself runs one at a time)")
    p.add_argument("--max-queue", type=int_at_least(1, 10000), default=32, help="requests waiting at most (then refused)")
    p.add_argument("--turntable-frames", type=int_at_least(0, 36), default=8, help="views in the turntable strip (0: none)")
    p.add_argument("--texture-size", type=int_at_least(16, 4096), default=512, help="texels per side of UV textures")
    p.add_argument("--empty-surface", choices=("unit_sphere", "error"), default="unit_sphere",
                   help="when a field has no surface: the released pipeline's unit sphere, or an error message")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    return p


def resolve_weights(base: str | None, weights: str | None) -> tuple[str | None, str]:
    """(base, weights): as given, or the CPU demo's student and base; a `NoWeightsError` when neither is there."""
    if weights is not None:  # checked by the loader, one line when missing or corrupt
        return base, weights
    if not (DEMO_STUDENT.is_dir() and DEMO_BASE.is_dir()):
        raise NoWeightsError(f"no --weights given and the CPU demo's student ({DEMO_STUDENT} on {DEMO_BASE}) is not "
                             "here: run `make demo` first, or pass --weights (and --base)")
    return str(base or DEMO_BASE), str(DEMO_STUDENT)


def main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    base, weights = resolve_weights(args.base, args.weights)
    device = resolve_device(args.device)
    out_dir = output_folder(args.out, "--out")

    import uvicorn

    from lightning_modules.serve.app import create_app
    from lightning_modules.serve.model import ServeModel
    from lightning_modules.student import TriplaneStudent

    start = time.perf_counter()
    student = TriplaneStudent.from_pretrained(base, weights=weights, device=device)
    student.merge_adapters()
    model = ServeModel(student, out_dir, turntable_frames=args.turntable_frames, empty_surface=args.empty_surface,
                        texture_size=args.texture_size)
    print(f"loaded {weights} in {time.perf_counter() - start:.1f} s; serving on http://{args.host}:{args.port}/ "
          f"(API: POST /generate), files in {out_dir}", flush=True)
    uvicorn.run(create_app(model, args.concurrency, args.max_queue), host=args.host, port=args.port, log_level="warning")
    return 0
