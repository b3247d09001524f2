"""One resumable evaluation run in an output folder: generate the missing meshes (weights mode), render and
CLIP-embed every prompt's mesh (or 3D Gaussian Splatting PLY, lightning_modules/evaluation/gaussians.py),
score them.

The folder holds `eval_config.json` (the run's settings: a rerun with other settings is refused),
`progress.jsonl` (one record per finished prompt, with its CLIP image embeddings), `generated.jsonl` and
`meshes/` (weights mode), and `renders/<index>_<slug>/az<deg>.png`. An interrupted run resumes where it
stopped: rerun the same command.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_modules.evaluation.gaussians import is_gaussian_file, load_gaussians, normalize_gaussians
from lightning_modules.evaluation.meshes import GAUSSIANS_SUFFIX, MeshData, load_mesh, normalize_mesh, slugify
from lightning_modules.evaluation.protocol import RenderProtocol, render_views
from lightning_modules.student.generation import resolve_device
from renderers.errors import UserError
from renderers.gaussians import Gaussians

PROGRESS_JSONL = "progress.jsonl"
GENERATED_JSONL = "generated.jsonl"
CONFIG_JSON = "eval_config.json"
RENDERS_DIR = "renders"
MESHES_DIR = "meshes"


def save_views(images: Tensor, folder: Path, azimuths: Sequence[float]) -> list[Path]:
    """Write `images [V, 3, H, W]` in [0, 1] as 8-bit PNGs (atomically, so a crash leaves no half file)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    paths = []
    for image, azimuth in zip(pixels, azimuths, strict=True):
        path = folder / f"az{round(azimuth) % 360:03d}.png"
        tmp = path.with_suffix(".tmp.png")
        Image.fromarray(image).save(tmp)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def load_views(paths: Sequence[Path]) -> Tensor:
    """PNG files -> `[V, 3, H, W]` float32 in [0, 1] (the pixels that get scored)."""
    from PIL import Image

    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def view_paths(out_dir: Path, index: int, prompt: str, protocol: RenderProtocol) -> list[Path]:
    folder = out_dir / RENDERS_DIR / f"{index:04d}_{slugify(prompt)[:60]}"
    return [folder / f"az{round(a) % 360:03d}.png" for a in protocol.azimuths]


def _encode_array(x: Tensor) -> str:
    return base64.b64encode(x.detach().float().cpu().numpy().astype("<f4").tobytes()).decode("ascii")


def _decode_array(text: str, shape: Sequence[int]) -> Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype="<f4").copy().reshape(shape))


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a torn last line (a crash while writing) is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def check_run_config(out_dir: Path, config: dict, overwrite: bool) -> None:
    """Write the run's settings, or check them against a run being resumed in the same folder."""
    path = out_dir / CONFIG_JSON
    if path.is_file() and not overwrite:
        previous = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in sorted(set(config) | set(previous)) if config.get(k) != previous.get(k)]
        if changed:
            key = changed[0]
            raise UserError(
                f"{out_dir} holds an evaluation with other settings ({key}: {previous.get(key)!r} there, "
                f"{config.get(key)!r} now); use another --out, or --overwrite to start over"
            )
        return
    if overwrite:
        for name in (PROGRESS_JSONL, GENERATED_JSONL):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / RENDERS_DIR, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _consecutive_batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Split sorted indices into runs of consecutive numbers, each cut into batches of `batch_size`."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1 and len(runs[-1]) < batch_size:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def generate_missing_meshes(
    args: argparse.Namespace, prompts: Sequence[str], out_dir: Path, progress: bool
) -> list[Path]:
    """Generate one mesh per prompt with the student into OUT/meshes/ (resumable).

    Prompt i is generated from noise seeded with `seed + i`, as `prd generate` does for the same prompt
    list, so a resumed run makes the same meshes. Finished prompts are listed in generated.jsonl.
    """
    from tqdm import tqdm

    records = {
        (r["index"], r["prompt"]): Path(r["mesh"])
        for r in read_jsonl(out_dir / GENERATED_JSONL)
        if Path(r["mesh"]).is_file()
    }
    todo = [i for i, p in enumerate(prompts) if (i, p) not in records]
    representation = getattr(args, "representation", "mesh")
    if todo:
        from lightning_modules.student import TriplaneStudent
        from lightning_modules.student.generation import generate_meshes

        mesh_dir = (out_dir / MESHES_DIR).resolve()
        partial = mesh_dir / ".partial"
        student = TriplaneStudent.from_pretrained(args.base, args.weights, device=resolve_device(args.device))
        bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="generate", unit="mesh", disable=not progress)
        for batch in _consecutive_batches(todo, args.batch_size):
            made = generate_meshes(
                student,
                [prompts[i] for i in batch],
                partial,
                seed=args.seed + batch[0],
                file_format=args.mesh_format,
                resolution=args.mesh_resolution,
                batch_size=args.batch_size,
                progress=False,
            )
            for i, record in zip(batch, made, strict=True):
                stem = f"{i:04d}_{slugify(prompts[i])[:60]}"
                if representation == "gaussians":
                    if "gaussians_file" not in record:
                        raise UserError(f"the student {args.weights} makes no 3D Gaussians (its representation is "
                                        "the mesh); score its meshes with --representation mesh")
                    path = mesh_dir / f"{stem}{GAUSSIANS_SUFFIX}.ply"
                    os.replace(partial / record["gaussians_file"], path)
                else:
                    path = mesh_dir / f"{stem}.{args.mesh_format}"
                    os.replace(partial / record["file"], path)
                records[(i, prompts[i])] = path
                append_jsonl(out_dir / GENERATED_JSONL, {"index": i, "prompt": prompts[i], "mesh": str(path)})
            bar.update(len(batch))
        bar.close()
        shutil.rmtree(partial, ignore_errors=True)
        del student
    return [records[(i, p)] for i, p in enumerate(prompts)]


def embed_renders(
    prompts: Sequence[str],
    meshes: Sequence[Path | None],
    out_dir: Path,
    protocol: RenderProtocol,
    metric,
    device: torch.device,
    progress: bool = True,
    backend: str = "auto",
    unreadable: list[dict] | None = None,
) -> dict[int, dict]:
    """Render and CLIP-embed every prompt's mesh, resumably. Returns index -> progress record.

    A mesh file that cannot be read is a one-line `UserError`, or, when `unreadable` is a list, skipped and
    appended to it as {"index", "prompt", "mesh", "error"} (`prd eval --allow-missing`)."""
    from tqdm import tqdm

    done = {}
    for record in read_jsonl(out_dir / PROGRESS_JSONL):
        i = record["index"]
        if i < len(prompts) and record["prompt"] == prompts[i] and meshes[i] is not None and record["mesh"] == str(meshes[i]):
            done[i] = record
    todo = [i for i, mesh in enumerate(meshes) if mesh is not None and i not in done]
    total = sum(m is not None for m in meshes)
    bar = tqdm(total=total, initial=total - len(todo), desc="render + CLIP", unit="mesh", disable=not progress)
    for i in todo:
        paths = view_paths(out_dir, i, prompts[i], protocol)
        if not all(p.is_file() for p in paths):
            try:
                loaded = load_object(meshes[i], protocol.mesh_frame)
            except UserError as err:
                if unreadable is None:
                    raise UserError(f"{err}; fix or remove the file, or pass --allow-missing to skip it") from None
                unreadable.append({"index": i, "prompt": prompts[i], "mesh": str(meshes[i]), "error": str(err)})
                bar.update(1)
                continue
            mesh = normalize_object(loaded, protocol.normalize, protocol.bound)
            save_views(render_views(mesh, protocol, device, backend), paths[0].parent, protocol.azimuths)
        embeds = metric.encode_images(load_views(paths)[None].to(device))[0]  # [V, D]
        record = {
            "index": i,
            "prompt": prompts[i],
            "mesh": str(meshes[i]),
            "renders": [str(p.relative_to(out_dir)) for p in paths],
            "azimuths": protocol.azimuths,
            "image_embeds": _encode_array(embeds),
            "shape": list(embeds.shape),
        }
        append_jsonl(out_dir / PROGRESS_JSONL, record)
        done[i] = record
        bar.update(1)
    bar.close()
    return done


def load_object(path: Path, mesh_frame: str) -> MeshData | Gaussians:
    """A mesh file, or a 3D Gaussian Splatting PLY, in the world frame."""
    if is_gaussian_file(path):
        return load_gaussians(path, mesh_frame)
    return load_mesh(path, mesh_frame)


def normalize_object(loaded: MeshData | Gaussians, mode: str, bound: float) -> MeshData | Gaussians:
    if isinstance(loaded, Gaussians):
        return normalize_gaussians(loaded, mode, bound)
    return normalize_mesh(loaded, mode, bound)


def score(records: dict[int, dict], metric, device: torch.device) -> tuple[dict, list[dict]]:
    """Overall metric values and per-prompt rows from the embedded renders."""
    from lightning_modules.evaluation.clip_score import (
        clip_scores,
        prompt_keys,
        retrieve_top1,
        unique_prompt_index,
    )

    order = sorted(records)
    prompts = [records[i]["prompt"] for i in order]
    image_embeds = torch.stack([_decode_array(records[i]["image_embeds"], records[i]["shape"]) for i in order]).to(device)
    text_embeds = metric.encode_prompts(prompts, device)
    metric.reset()
    metric.update_embeddings(image_embeds, text_embeds, prompts)
    overall = {k: float(v) for k, v in metric.compute().items()}

    per_view = clip_scores(image_embeds, text_embeds, metric.weight).cpu()  # [N, V]
    first, target = unique_prompt_index(prompt_keys(prompts))
    top1 = retrieve_top1(image_embeds, text_embeds[first.to(device)]).cpu()  # [N, V]
    hits = top1 == target[:, None]
    rows = []
    for n, i in enumerate(order):
        retrieved = torch.bincount(top1[n], minlength=len(first)).argmax()  # most frequent over views
        rows.append(
            {
                "index": i,
                "prompt": prompts[n],
                "clip_score": float(per_view[n].mean()),
                "recall_at_1": float(hits[n].float().mean()),
                "retrieved_prompt": prompts[int(first[retrieved])],
                **{f"clip_score_az{round(a) % 360:03d}": float(s) for a, s in zip(records[i]["azimuths"], per_view[n], strict=True)},
                "mesh": records[i]["mesh"],
                "renders": records[i]["renders"],
            }
        )
    return overall, rows
