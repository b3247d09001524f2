"""`prd eval`: CLIP score and CLIP Recall@1 of text-to-3D meshes under one rendering protocol.

    prd eval --weights W [--base SD] --prompts dreamfusion415 --split test --out DIR   generate + score
    prd eval --meshes MESH_DIR --prompts prompts.txt --out DIR                         score given meshes

A .ply file with the 3D Gaussian Splatting properties (f_dc_*, opacity, scale_*, rot_*) is scored as
Gaussians under the same protocol (lightning_modules/evaluation/gaussians.py): meshes and splats can share
one folder and one table. A Gaussian student's `prd generate` writes both a mesh and `<name>_gaussians.ply` per
prompt: `--representation gaussians` scores the splats (its manifest's `gaussians_file`; in generate mode the
student's own), the default scores the meshes.

Protocol (the TriplaneTurbo reference's): each mesh is normalised into [-0.9, 0.9]^3 (bounding box,
as the reference's renderer does), rendered unlit with its colours on a white background from 4
azimuths (0, 90, 180, 270 deg; azimuth 0 looks at the front) at elevation 15 deg, distance 3,
FoV 40 deg, 512 x 512; every render is scored by CLIP ViT-B-32 (OpenAI weights) against
"A photo depicts " + prompt. All of it is configurable (see --help).

Matching mesh files to prompts (--meshes), the first rule that applies:
  1. --mesh-map FILE.csv with columns `prompt,file` (relative paths are relative to the CSV);
  2. MESH_DIR/manifest.json (as `prd generate` writes it): {"prompt": "file", ...} or a list of
     {"prompt": ..., "file" | "path" | "mesh": ...} (relative paths are relative to MESH_DIR);
  3. file names: a mesh file (.glb .gltf .obj .ply) of the folder's top level (when the top level holds none:
     of its subfolders, at any depth; files in subfolders beside top-level meshes are left out, with a warning) matches a prompt when its
     stem, or its folder's name (the reference's <prompt>/model.obj layout), equals the prompt
     slugified (lower case, runs of other characters -> "_"), optionally after a "0042_" index prefix;
     a name of 32+ characters also matches a prompt whose slug it starts (truncated names).

Outputs in --out: results.json, per_prompt.csv, report.md with contact_sheet.png and
score_histogram.png, renders/<index>_<slug>/az<deg>.png, and (generate mode) meshes/.
Prompt files follow the project's one policy (README, "Prompt files"): bad lines are skipped with a warning
naming them; a file without a valid prompt is an error. --allow-missing skips prompts without a mesh and
prompts whose mesh cannot be read, each listed in report.md and results.json ("missing", "unreadable").
An interrupted run resumes: finished prompts are kept in progress.jsonl (with their image embeddings)
and renders already on disk are reused; rerun the same command.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from lightning_modules.cli.arguments import CommandParser, float_in, int_at_least
from lightning_modules.cli.paths import input_file, input_folder, output_folder
from lightning_modules.evaluation.meshes import REPRESENTATIONS, match_meshes
from lightning_modules.evaluation.protocol import RenderProtocol
from lightning_modules.evaluation.run import check_run_config, embed_renders, generate_missing_meshes, score
from lightning_modules.student.generation import resolve_device
from renderers.errors import UserError


def load_prompts(spec: str, split: str | None) -> tuple[list[str], str]:
    """Prompts from a bundled set name, a JSON file with splits / a list, or a text file (one per line).

    Returns (prompts, a description such as "dreamfusion415.json#test").
    """
    from datamodules.prompt_sources import PromptFileError, load_prompt_source

    try:
        source = load_prompt_source(spec, split, cache_index=False)
    except (PromptFileError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    prompts = [source.get(i) for i in range(len(source))]
    if not prompts:
        raise UserError(f"no prompts in {source.name}")
    return prompts, Path(source.name).name


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="prd eval",
        description="CLIP score and Recall@1 of generated or given meshes (see the module docstring for details).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="student weights to generate meshes with (file, folder or hub id)")
    source.add_argument("--meshes", help="folder of meshes (.glb .gltf .obj .ply) and / or 3D Gaussian Splatting PLYs to score")
    parser.add_argument("--base", default=None, help="SD base model of the student (default: from its config)")
    parser.add_argument("--prompts", required=True, help="bundled set name (dreamfusion415), .json, .jsonl or .txt")
    parser.add_argument("--split", default="test", help="list to take from a JSON file with splits")
    parser.add_argument("--out", required=True, help="output folder (rerun with the same one to resume)")
    parser.add_argument("--limit", type=int_at_least(1), default=None, help="only the first N prompts")
    parser.add_argument("--mesh-map", default=None, help="CSV with columns prompt,file (--meshes mode)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="skip prompts without a mesh or with an unreadable mesh (each listed in the report) instead of failing")
    parser.add_argument("--representation", choices=REPRESENTATIONS, default="mesh",
                        help="what to score of a Gaussian student: its meshes, or its 3D Gaussians (the "
                             "`<name>_gaussians.ply` files that `prd generate` writes beside them)")
    parser.add_argument("--mesh-frame", choices=("viewer", "world"), default="viewer",
                        help="axes of the mesh files: viewer (+y up, front +z) or world (+z up, front +x)")
    # protocol
    parser.add_argument("--views", type=int_at_least(1, 360), default=RenderProtocol.num_views, help="azimuths per mesh")
    parser.add_argument("--elevation", type=float_in(-90, 90), default=RenderProtocol.elevation, help="degrees")
    parser.add_argument("--distance", type=float_in(0, math.inf, low_open=True, high_open=True), default=RenderProtocol.distance, help="camera distance")
    parser.add_argument("--fov", type=float_in(0, 180, low_open=True, high_open=True), default=RenderProtocol.fovy, help="vertical field of view, degrees")
    parser.add_argument("--resolution", type=int_at_least(8, 4096), default=RenderProtocol.resolution, help="render size in pixels")
    parser.add_argument("--azimuth-start", type=float_in(-360, 360), default=RenderProtocol.azimuth_start, help="first azimuth, degrees")
    parser.add_argument("--normalize", choices=("box", "none"), default=RenderProtocol.normalize,
                        help="box: fit each mesh's bounding box into [-bound, bound]^3")
    parser.add_argument("--bound", type=float_in(0, math.inf, low_open=True, high_open=True), default=RenderProtocol.bound,
                        help="half-size of the box meshes are scaled into (> 0)")
    # CLIP
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name, local-dir:PATH or hf-hub:ID")
    parser.add_argument("--clip-pretrained", default="openai", help="open_clip pretrained tag (or a weights file)")
    parser.add_argument("--clip-checkpoint", default=None, help="local CLIP weights file (instead of the cache)")
    parser.add_argument("--clip-cache-dir", default=None, help="open_clip / Hugging Face cache folder")
    parser.add_argument("--clip-download", action="store_true", help="let open_clip download missing weights")
    parser.add_argument("--caption-prefix", default="A photo depicts ",
                        help="text put before each prompt (the reference script uses 'A photo depicts' with no space)")
    # generation
    parser.add_argument("--seed", type=int_at_least(0, 2**62), default=0, help="generation seed")
    parser.add_argument("--batch-size", type=int_at_least(1), default=4, help="prompts per generation batch")
    parser.add_argument("--mesh-resolution", type=int_at_least(4, 1024), default=160, help="marching-cubes grid for generation")
    parser.add_argument("--mesh-format", choices=("glb", "obj", "ply"), default="glb")
    # running
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--renderer", choices=("auto", "torch", "nvdiffrast"), default="auto",
                        help="rasteriser backend (auto: nvdiffrast on CUDA when installed, else PyTorch; "
                             "Gaussian PLYs: gsplat on CUDA when installed unless torch)")
    parser.add_argument("--max-sheet-rows", type=int_at_least(1), default=16, help="prompts shown on the contact sheet")
    parser.add_argument("--overwrite", action="store_true", help="discard a previous run in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _protocol_from_args(args: argparse.Namespace) -> RenderProtocol:
    protocol = RenderProtocol(
        num_views=args.views,
        elevation=args.elevation,
        distance=args.distance,
        fovy=args.fov,
        resolution=args.resolution,
        azimuth_start=args.azimuth_start,
        normalize=args.normalize,
        bound=args.bound,
        mesh_frame=args.mesh_frame,
    )
    if protocol.normalize == "box" and protocol.distance <= protocol.bound * 3**0.5:
        raise UserError(
            f"--distance {protocol.distance:g} puts the camera inside the box of half-size --bound {protocol.bound:g}: "
            f"use a distance above {protocol.bound * 3**0.5:.3g} or a smaller --bound"
        )
    return protocol


def _check_missing(prompts: Sequence[str], meshes: Sequence[Path | None], allow_missing: bool) -> None:
    missing = [p for p, m in zip(prompts, meshes, strict=True) if m is None]
    if missing and not allow_missing:
        raise UserError(
            f"{len(missing)} of {len(prompts)} prompts have no mesh (first: {missing[0]!r}); see `prd eval --help` "
            "for how files are matched, or pass --allow-missing"
        )
    if len(missing) == len(prompts):
        raise UserError("no prompt has a mesh to evaluate")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    started = time.time()
    progress = not args.no_progress
    # Every argument is checked before any model loads or any mesh is rendered.
    protocol = _protocol_from_args(args)
    prompts, prompts_name = load_prompts(args.prompts, args.split)
    if args.limit is not None:
        prompts = prompts[: args.limit]
    device = resolve_device(args.device)
    if args.weights:
        from lightning_modules.student.weights import check_local_paths

        check_local_paths(args.base, args.weights)
    if args.meshes:
        input_folder(args.meshes, "--meshes", "mesh folder")
    if args.mesh_map:
        input_file(args.mesh_map, "--mesh-map", "CSV file")
    from lightning_modules.evaluation.clip_score import check_weights_file

    if args.clip_checkpoint:
        input_file(args.clip_checkpoint, "--clip-checkpoint", "CLIP weights file")
        check_weights_file(args.clip_checkpoint, "--clip-checkpoint")  # its header: random bytes fail here
    elif not args.clip_model.startswith(("local-dir:", "hf-hub:")) and Path(args.clip_pretrained).expanduser().is_file():
        check_weights_file(args.clip_pretrained, "--clip-pretrained")
    meshes: list[Path | None] = []
    if args.meshes:
        meshes = match_meshes(args.meshes, prompts, args.mesh_map, args.representation)
        _check_missing(prompts, meshes, args.allow_missing)
    out_dir = output_folder(args.out, "--out")

    has_schema = args.clip_model.startswith(("local-dir:", "hf-hub:"))  # open_clip ignores the tag then
    clip_settings = {
        "model": args.clip_model,
        "pretrained": None if has_schema else args.clip_pretrained,
        "checkpoint": str(Path(args.clip_checkpoint).resolve()) if args.clip_checkpoint else None,
    }
    source = {"weights": args.weights, "base": args.base, "seed": args.seed, "mesh_resolution": args.mesh_resolution,
              "mesh_format": args.mesh_format} if args.weights else {"meshes": str(Path(args.meshes).resolve())}
    if args.representation != "mesh":  # absent for meshes: runs started before the option resume as they were
        source["representation"] = args.representation
    check_run_config(out_dir, {"protocol": asdict(protocol), "clip": clip_settings, "source": source}, args.overwrite)

    from lightning_modules.evaluation.clip_score import CLIPScore3D

    metric = CLIPScore3D(
        model_name=args.clip_model,
        pretrained=args.clip_pretrained,
        checkpoint=args.clip_checkpoint,
        cache_dir=args.clip_cache_dir,
        allow_download=args.clip_download,
        caption_prefix=args.caption_prefix,
    )
    metric.clip_model.to(device)

    if args.weights:
        meshes = list(generate_missing_meshes(args, prompts, out_dir, progress))
        _check_missing(prompts, meshes, args.allow_missing)
    missing = [p for p, m in zip(prompts, meshes, strict=True) if m is None]

    unreadable: list[dict] = []
    records = embed_renders(
        prompts, meshes, out_dir, protocol, metric, device, progress, args.renderer,
        unreadable=unreadable if args.allow_missing else None,
    )
    for item in unreadable:
        print(f"prd eval: skipped prompt {item['index']} {item['prompt']!r}: {item['error']}", file=sys.stderr)
    if not records:
        raise UserError(f"no prompt has a readable mesh to evaluate (first: {unreadable[0]['error']})")
    overall, rows = score(records, metric, device)

    from lightning_modules.evaluation.report import write_report

    scores = torch.tensor([r["clip_score"] for r in rows])
    results = {
        "clip_score": overall["clip_score"],
        "recall_at_1": overall["recall_at_1"],
        "clip_score_std": float(scores.std(unbiased=False)),
        "num_prompts": len(rows),
        "num_unique_prompts": len({r["prompt"] for r in rows}),
        "missing": missing,
        "unreadable": unreadable,
        "prompts": f"{prompts_name}" + (f" (first {len(prompts)})" if args.limit is not None else ""),
        "source": args.weights or args.meshes,
        "protocol": asdict(protocol) | {"azimuths": protocol.azimuths, "background": "white"},
        "clip": clip_settings | {"caption_prefix": args.caption_prefix, "weight": metric.weight},
        "seconds": round(time.time() - started, 2),
    }
    paths = write_report(
        out_dir, results, rows, [[out_dir / p for p in r["renders"]] for r in rows], max_rows=args.max_sheet_rows
    )
    print(
        f"CLIP score {results['clip_score']:.4f}  Recall@1 {results['recall_at_1']:.4f}  "
        f"({results['num_prompts']} prompts x {protocol.num_views} views) -> {paths['report']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
