"""`prd generate`: prompts -> coloured meshes with a trained TriplaneTurbo student.

    prd generate "a prompt" ["another" ... | --prompts-file F] --out DIR [--seed N]
                 [--format glb|obj|ply] [--base ...] [--weights ...] [--resolution 160] [--dense-grid]
                 [--batch-size N] [--uv-texture] [--device auto|cpu|cuda] [--dtype float32|float16|bfloat16]
                 [--compile [--compile-mode MODE]] [--channels-last] [--export-thread auto|on|off]
                 [--asset [--faces 20000] [--texture-size 1024] [--roughness 1]] [--faces N]

A student with Gaussians (`TriplaneGaussianStudent`, its config.json names it) also writes each object's 3D
Gaussians as a 3DGS PLY, `<name>_gaussians.ply`, beside the mesh of the same SDF; `--format` is the mesh's format.

`--dtype`, `--compile`, `--channels-last`: how the networks run (`lightning_modules.student.inference`); the
compile warm-up is timed apart from the per-mesh stages. `--export-thread`: files written in a background thread
while the networks go on (auto: on CUDA).

`--asset`: a game-ready PBR asset per prompt (decimated to --faces, UV atlas, albedo and normal maps baked
from the field, GLB or OBJ / MTL); `--faces` alone decimates the vertex-colour (or --uv-texture) export.

Object i of the run is drawn from noise seeded with `seed + i`, so a mesh does not depend on the batch
size or on the other prompts. The output folder gets one mesh per prompt and `manifest.json`
(prompt -> file, seed, mesh sizes, timings). The generation itself: `lightning_modules.student.generation`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lightning_modules.cli.arguments import (
    CommandParser,
    add_inference_arguments,
    float_in,
    inference_options,
    int_at_least,
)
from lightning_modules.cli.paths import output_folder
from lightning_modules.student.generation import (
    MAX_PROMPT_CHARS,
    StageTimer,
    generate_meshes,
    resolve_device,
    validate_prompts,
)
from lightning_modules.student.inference import (
    DTYPES,
    batch_sizes_of_run,
    prepare_for_inference,
    warm_up,
)
from renderers.asset import MAX_TEXTURE_SIZE, AssetSettings
from renderers.errors import UserError
from renderers.export import EXPORT_FORMATS, MATERIALS

DEFAULT_BASE = "stabilityai/stable-diffusion-2-1-base"
DEFAULT_WEIGHTS = "ZhiyuanthePony/TriplaneTurbo"
MAX_SEED = 2**63 - 1


def read_prompts_file(path: str | Path) -> list[str]:
    """The prompts of `--prompts-file` (text: one per line; .jsonl / .json as `prd eval --prompts` reads them).

    The project's one policy for prompt files: bad lines (empty, invalid UTF-8, too long) are skipped with one
    warning that names them (file:line); a file without a single valid prompt, a missing file or a folder is a
    one-line `PromptFileError`."""
    from datamodules.prompt_sources import load_prompt_source

    source = load_prompt_source(str(path), None, max_chars=MAX_PROMPT_CHARS, cache_index=False)
    return [source.get(i) for i in range(len(source))]


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="prd generate", description="Generate textured meshes from text prompts.")
    p.add_argument("prompts", nargs="*", help="text prompts (or use --prompts-file)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=0, help="noise seed of the first prompt (prompt i uses seed + i)")
    p.add_argument("--format", dest="file_format", choices=EXPORT_FORMATS, default="glb",
                   help="mesh file format (a student with Gaussians writes <name>_gaussians.ply, the 3DGS PLY, as well)")
    p.add_argument("--base", default=None, help=f"SD directory or hub id (default: from config.json, else {DEFAULT_BASE})")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="TriplaneTurbo weights: file, folder or hub id")
    p.add_argument("--resolution", type=int_at_least(4, 1024), default=160, help="marching-cubes grid vertices per axis")
    p.add_argument("--dense-grid", action="store_true",
                   help="evaluate the SDF at every grid vertex instead of coarse to fine (the same mesh, slower)")
    p.add_argument("--batch-size", type=int_at_least(1), default=4)
    p.add_argument("--uv-texture", action="store_true", help="unwrap with xatlas and bake a texture (glb / obj)")
    p.add_argument("--texture-size", type=int_at_least(16, 16384), default=1024,
                   help=f"texels per side (--uv-texture; --asset: at most {MAX_TEXTURE_SIZE})")
    p.add_argument("--asset", action="store_true",
                   help="game-ready asset: decimate to --faces, unwrap, bake albedo + normal maps, PBR glb / obj")
    p.add_argument("--faces", type=int_at_least(4), default=None,
                   help="face budget of the written mesh (decimation; --asset default 20000)")
    p.add_argument("--roughness", type=float_in(0.0, 1.0), default=None, help="--asset material roughness (default 1)")
    p.add_argument("--material", choices=MATERIALS, default="pbr",
                   help="glb / obj material: pbr (metallic 0, roughness 1) or unlit (colours shown as is)")
    p.add_argument("--empty-surface", choices=("unit_sphere", "error"), default="unit_sphere",
                   help="when a field has no surface: the released pipeline's unit sphere, or an error")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    add_inference_arguments(p)
    p.add_argument("--export-thread", choices=("auto", "on", "off"), default="auto",
                   help="write files in a background thread while the networks run on (auto: on with CUDA)")
    p.add_argument("--no-merge", action="store_true",
                   help="keep the LoRA / LoCon adapters separate (default: folded into the weights, faster)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    # Every argument is checked before the model loads.
    prompts = list(args.prompts)
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    prompts = validate_prompts(prompts)
    if args.seed + len(prompts) > MAX_SEED:
        raise UserError(f"--seed {args.seed} + {len(prompts)} prompts exceeds the largest seed {MAX_SEED}")
    if args.uv_texture and args.file_format == "ply":
        raise UserError("--uv-texture needs --format glb or obj: PLY stores vertex colours only")
    if args.material != "pbr" and args.file_format != "glb" and not args.uv_texture:
        raise UserError(f"--material {args.material} needs --format glb (or obj with --uv-texture): a vertex-colour "
                        f"{args.file_format.upper()} has no material")
    asset = None
    if args.asset:
        if args.file_format == "ply" or args.uv_texture or args.material != "pbr":
            raise UserError("--asset writes a PBR glb or obj with its own textures: drop --format ply, --uv-texture "
                            "and --material unlit")
        asset = AssetSettings(faces=args.faces or AssetSettings.faces, texture_size=args.texture_size,
                              roughness=1.0 if args.roughness is None else args.roughness)
    elif args.roughness is not None:
        raise UserError("--roughness sets the material of --asset: add --asset")
    device = resolve_device(args.device)
    compile_mode = inference_options(args, device)
    out_dir = output_folder(args.out, "--out")

    from lightning_modules.student import TriplaneStudent

    start = time.perf_counter()
    student = TriplaneStudent.from_pretrained(args.base, weights=args.weights, device=device)
    if not args.no_merge:
        student.merge_adapters()  # in float32, before any cast
    prepare_for_inference(student, DTYPES[args.dtype], compile_mode, channels_last=args.channels_last)
    load_seconds = time.perf_counter() - start
    warm_up_seconds = warm_up(student, batch_sizes_of_run(len(prompts), args.batch_size)) if args.compile else 0.0

    timer = StageTimer()
    start = time.perf_counter()
    records = generate_meshes(
        student, prompts, out_dir, seed=args.seed, file_format=args.file_format, resolution=args.resolution,
        batch_size=args.batch_size, uv_texture=args.uv_texture, texture_size=args.texture_size,
        material=args.material, faces=None if asset else args.faces, asset=asset,
        empty_surface=args.empty_surface, timer=timer, progress=not args.no_progress,
        export_thread=None if args.export_thread == "auto" else args.export_thread == "on",
        coarse_to_fine=not args.dense_grid,
    )
    wall_seconds = time.perf_counter() - start
    manifest = dict(
        meshes=records,
        weights=str(args.weights),
        base=str(args.base),
        resolution=args.resolution,
        format=args.file_format,
        dtype=args.dtype,
        compile_mode=compile_mode,
        timings_seconds=dict(timer.seconds, load=load_seconds, warm_up=warm_up_seconds, total=timer.total,
                             wall=wall_seconds),
    )
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    splats = sum("gaussians_file" in r for r in records)
    print(f"wrote {len(records)} mesh(es){f' and {splats} Gaussian PLY(s)' if splats else ''} to {args.out} "
          f"(model loading {load_seconds:.2f} s{f', compile warm-up {warm_up_seconds:.2f} s' if args.compile else ''})")
    print(timer.table(len(records)))
    print(f"wall-clock {wall_seconds:.3f} s, {wall_seconds / len(records):.3f} s per mesh")
    return 0
