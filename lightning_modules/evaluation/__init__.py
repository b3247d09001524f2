"""Evaluation of text-to-3D meshes. `clip_score.CLIPScore3D` is the CLIP score / Recall@1 metric (a torchmetrics
Metric, also logged in PRD validation); `meshes.py` reads OBJ / GLB / glTF / PLY files and matches them to
prompts; `gaussians.py` reads 3D Gaussian Splatting PLYs, scored like meshes; `protocol.py` is the rendering
protocol every mesh (or splat) is seen under; `run.py` one resumable evaluation
run in an output folder (generate, render, embed, score); `report.py` writes results.json, per_prompt.csv and
report.md. The command line is `prd eval` (`lightning_modules.cli.evaluate`).
"""
