"""Time export's marching cubes (grid SDF + topology + vertices), dense vs coarse to fine, at 160^3.

    .venv/bin/python benchmarks/bench_marching_cubes.py [--resolution 160] [--repeats 3] [--device cpu|cuda]
                                                        [--demo-student outputs/demo/student]

Fields (one object each, the released sizes: planes 6 x 32 x 256 x 256, 64-wide MLPs with 2 hidden layers):
- "smooth": `bench_asset.full_size_like_field(sdf_scale=0.03)`, the sphere prior with gentle bumps;
- "bumpy": `full_size_like_field()` (sdf_scale 0.12), the asset benchmark's field: ~290k faces in 41 parts;
- "demo student": the trained `make demo` student's red ball (its own small sizes), when `--demo-student`
  points at one (default `outputs/demo/student`, skipped when absent).
Printed per field: seconds (best of `--repeats`) for `extract_mesh(..., coarse_to_fine=False)` (every grid
vertex through `TriplaneField.sdf`) and `coarse_to_fine=True` (`lightning_modules/student/triplane_grid.py`), the
share of grid vertices evaluated exactly, the face count and whether both meshes are identical.
Target (issue 11): marching cubes + grid SDF <= 1 s on 2 CPU cores at 160^3, <= 20 ms on an H100 / H200.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_marching_cubes(field, resolution: int = 160, repeats: int = 3) -> dict:
    """Best seconds of dense and coarse-to-fine `extract_mesh` on `field` (B = 1), the share of exact grid
    vertices, the face count and whether the two meshes are identical."""
    from renderers.marching_cubes import extract_mesh

    device = field.device
    result = {}
    for coarse_to_fine in (False, True):
        extract_mesh(field, resolution=resolution, coarse_to_fine=coarse_to_fine)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            mesh = extract_mesh(field, resolution=resolution, coarse_to_fine=coarse_to_fine)[0]
            sync(device)
            best = min(best, time.perf_counter() - start)
        result["coarse_to_fine" if coarse_to_fine else "dense"] = (best, mesh)
    grid = field.grid_sdf(resolution, device, field.planes.dtype)
    (dense_s, dense), (fast_s, fast) = result["dense"], result["coarse_to_fine"]
    return {
        "dense_s": dense_s,
        "coarse_to_fine_s": fast_s,
        "exact_share": float(grid.exact.float().mean()) if grid is not None else 1.0,
        "faces": int(dense.faces.shape[0]),
        "identical": bool(torch.equal(dense.faces, fast.faces) and torch.equal(dense.vertices, fast.vertices)),
    }


def demo_student_field(path: Path):
    from lightning_modules.student import TriplaneStudent
    from lightning_modules.student.generation import sample_fields

    config = (path / "config.json").read_text()
    import json

    base = json.loads(config)["base_model_name_or_path"]
    student = TriplaneStudent.from_pretrained(base, path).eval()
    with torch.no_grad():
        return sample_fields(student, ["a large red ball"], [0])


def main() -> None:
    from benchmarks.bench_asset import full_size_like_field

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--demo-student", type=Path, default=ROOT / "outputs" / "demo" / "student")
    args = parser.parse_args()
    device = torch.device(args.device)

    fields = {"smooth": lambda: full_size_like_field(sdf_scale=0.03), "bumpy": full_size_like_field}
    if (args.demo_student / "config.json").is_file():
        fields["demo student (red ball)"] = lambda: demo_student_field(args.demo_student)
    print(f"marching cubes at {args.resolution}^3 on {device} ({torch.get_num_threads()} threads), best of {args.repeats}")
    print(f"{'field':26s} {'dense s':>8s} {'c2f s':>8s} {'speed-up':>8s} {'exact':>7s} {'faces':>8s}  identical")
    for name, make in fields.items():
        field = make()
        field.planes = field.planes.to(device)
        for net in (field.sdf_network, field.feature_network, field.deformation_network):
            if net is not None:
                net.to(device)
        r = time_marching_cubes(field, args.resolution, args.repeats)
        print(f"{name:26s} {r['dense_s']:8.3f} {r['coarse_to_fine_s']:8.3f} {r['dense_s'] / r['coarse_to_fine_s']:7.1f}x "
              f"{r['exact_share']:7.1%} {r['faces']:8d}  {r['identical']}")


if __name__ == "__main__":
    main()
