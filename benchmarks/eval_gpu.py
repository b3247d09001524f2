"""GPU benchmark of `prd eval`: backend agreement of the evaluation renders, metric on CUDA, timings.

    .venv/bin/python benchmarks/eval_gpu.py [--device cuda] [--resolution 512] [--meshes 8]

Needs no download (random CLIP weights). Prints JSON lines:
1. "render": per test mesh (face-coloured cube, UV-textured cube, a 20k-face coloured blob), the
   evaluation renders (4 views, reference protocol) with the PyTorch and the nvdiffrast rasterisers:
   max / mean abs difference and the fraction of pixels differing by more than 1/255, seconds per mesh.
2. "metric": CLIPScore3D with a random full-size ViT-B-32 on the GPU vs the CPU on the same images
   (clip_score / recall_at_1 and max embedding difference), and seconds per 4-view object on the GPU.
3. "prd_eval": a whole `prd eval --meshes` run on N blobs at the given resolution on the GPU with a
   tiny CLIP (rendering + CLIP + report), seconds per mesh.
Expected: mean render differences of order 1e-3 or less (edge pixels differ by anti-aliasing details),
metric values equal to about 1e-5.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests/ helpers

import numpy as np
import torch

from lightning_modules.evaluation.clip_score import CLIPScore3D  # noqa: E402
from lightning_modules.evaluation.meshes import load_mesh, normalize_mesh, slugify  # noqa: E402
from lightning_modules.evaluation.protocol import RenderProtocol, render_views  # noqa: E402
from renderers.export import export_mesh  # noqa: E402
from tests.test_eval_protocol import face_coloured_cube  # noqa: E402
from tests.tiny_clip import make_tiny_clip  # noqa: E402


def blob(faces_target: int = 20000, seed: int = 0):
    """A bumpy coloured sphere (trimesh icosphere with radial noise and smooth random colours)."""
    import trimesh

    subdivisions = max(1, int(round(np.log(faces_target / 20) / np.log(4))))
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.7)
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(6, 3))
    v = sphere.vertices
    bumps = sum(0.08 * np.sin(4 * v @ d) for d in directions)
    vertices = v * (1 + bumps)[:, None]
    colors = 0.5 + 0.5 * np.sin(3 * v @ rng.normal(size=(3, 3)))
    return vertices.astype(np.float32), sphere.faces.astype(np.int64), colors.astype(np.float32)


def timed(fn, device: torch.device, repeats: int = 3):
    fn()  # warm-up (nvdiffrast compiles its kernels on first use)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, (time.perf_counter() - start) / repeats


def check_renders(device: torch.device, resolution: int, folder: Path) -> None:
    protocol = RenderProtocol(resolution=resolution)
    cases = {
        "cube": export_mesh(folder / "cube.glb", *face_coloured_cube(0.5)),
        "textured_cube": export_mesh(folder / "tcube.glb", *face_coloured_cube(0.5), uv_texture=True, texture_size=512),
        "blob_20k": export_mesh(folder / "blob.ply", *blob()),
    }
    for name, path in cases.items():
        mesh = normalize_mesh(load_mesh(path), protocol.normalize, protocol.bound)
        images, seconds = {}, {}
        for backend in ("torch", "nvdiffrast"):
            images[backend], seconds[backend] = timed(lambda b=backend, m=mesh: render_views(m, protocol, device, b), device)
        diff = (images["torch"] - images["nvdiffrast"]).abs()
        print(json.dumps({
            "check": "render", "mesh": name, "resolution": resolution,
            "max_abs": round(diff.max().item(), 6), "mean_abs": round(diff.mean().item(), 7),
            "frac_gt_1_255": round((diff.amax(1) > 1 / 255).float().mean().item(), 6),
            "seconds_torch": round(seconds["torch"], 4), "seconds_nvdiffrast": round(seconds["nvdiffrast"], 4),
        }))


def check_metric(device: torch.device) -> None:
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)  # random weights: no download
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    images = torch.rand(6, 4, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat", "a dog", "a red car", "a cat", "a boat", "a tree"]
    results = {}
    embeds = {}
    for dev in (torch.device("cpu"), device):
        metric = CLIPScore3D(model=model, tokenizer=tokenizer).to(dev)
        metric.update(images.to(dev), prompts)
        results[dev.type] = {k: v.item() for k, v in metric.compute().items()}
        embeds[dev.type] = metric.encode_images(images[:1].to(dev)).cpu()
    one = images[:1].to(device)
    _, seconds = timed(lambda: metric.encode_images(one), device)
    print(json.dumps({
        "check": "metric", "cpu": results["cpu"], device.type: results[device.type],
        "max_embed_diff": (embeds["cpu"] - embeds[device.type]).abs().max().item(),
        "seconds_per_object_4_views": round(seconds, 4),
    }))


def check_prd_eval(device: torch.device, resolution: int, count: int, folder: Path) -> None:
    from lightning_modules.cli import main as prd

    prompts = [f"a test blob number {i}" for i in range(count)]
    for i, prompt in enumerate(prompts):
        export_mesh(folder / "meshes" / f"{i:04d}_{slugify(prompt)}.glb", *blob(seed=i))
    (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    clip = make_tiny_clip(folder / "clip")
    start = time.perf_counter()
    code = prd([
        "eval", "--meshes", str(folder / "meshes"), "--prompts", str(folder / "prompts.txt"),
        "--out", str(folder / "out"), "--clip-model", f"local-dir:{clip}", "--resolution", str(resolution),
        "--device", str(device), "--renderer", "nvdiffrast", "--no-progress",
    ])
    seconds = time.perf_counter() - start
    print(json.dumps({"check": "prd_eval", "exit_code": code, "meshes": count, "resolution": resolution,
                      "seconds_per_mesh": round(seconds / count, 4)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--meshes", type=int, default=8)
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        check_renders(device, args.resolution, Path(tmp))
        check_metric(device)
        check_prd_eval(device, args.resolution, args.meshes, Path(tmp))


if __name__ == "__main__":
    main()
