import csv
import json

import pytest
from PIL import Image

from lightning_modules.evaluation.report import (
    contact_sheet,
    histogram_counts,
    markdown_report,
    pick_rows,
    score_histogram,
    write_report,
)


def test_pick_rows_spreads_over_the_ranking_best_first():
    scores = [0.1, 0.9, 0.5, 0.7, 0.3]
    assert pick_rows(scores, 10) == [1, 3, 2, 4, 0]
    assert pick_rows(scores, 3) == [1, 2, 0]  # best, median, worst
    assert pick_rows(scores, 1) == [1]


def test_histogram_counts():
    assert histogram_counts([0.0, 0.1, 0.24, 0.25, 0.99, 1.0], bins=4, low=0.0, high=1.0) == [3, 1, 0, 2]
    assert sum(histogram_counts([0.3] * 7, 5, 0.0, 1.0)) == 7


def test_score_histogram_draws_bars_and_mean():
    image = score_histogram([0.6, 0.62, 0.7, 0.71, 0.72, 0.9], bins=10, size=(400, 300))
    assert image.size == (400, 300) and image.mode == "RGB"
    colors = {c for _, c in image.getcolors(maxcolors=1 << 16)}
    assert (76, 114, 176) in colors  # bars
    assert (200, 30, 30) in colors  # mean line
    with pytest.raises(ValueError):
        score_histogram([])


def test_contact_sheet_places_thumbnails():
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    green = Image.new("RGB", (40, 40), (0, 255, 0))
    sheet = contact_sheet([("first prompt", [red, green]), ("second | prompt", [green])], thumb=32, caption_width=100, pad=4)
    assert sheet.size == (4 + 100 + 4 + 2 * (32 + 4), 4 + 2 * (32 + 4))
    # centre of row 0, column 1 is green; row 1, column 0 is green; row 1, column 1 is empty (white)
    assert sheet.getpixel((4 + 100 + 4 + 36 + 16, 4 + 16)) == (0, 255, 0)
    assert sheet.getpixel((4 + 100 + 4 + 16, 4 + 16)) == (255, 0, 0)
    assert sheet.getpixel((4 + 100 + 4 + 36 + 16, 40 + 16)) == (255, 255, 255)


def _results(n_views=2):
    return {
        "clip_score": 0.5,
        "recall_at_1": 0.75,
        "clip_score_std": 0.1,
        "num_prompts": 3,
        "num_unique_prompts": 3,
        "missing": [],
        "prompts": "prompts.txt",
        "source": "meshes/",
        "protocol": {"num_views": n_views, "elevation": 15.0, "distance": 3.0, "fovy": 40.0, "resolution": 64,
                     "azimuth_start": 0.0, "normalize": "box", "bound": 0.9},
        "clip": {"model": "ViT-B-32", "pretrained": "openai", "caption_prefix": "A photo depicts "},
    }


def test_write_report_writes_every_output(tmp_path):
    renders = []
    for i in range(3):
        paths = []
        for k in range(2):
            path = tmp_path / "renders" / f"{i}_{k}.png"
            path.parent.mkdir(exist_ok=True)
            Image.new("RGB", (16, 16), (40 * i, 100, 50 * k)).save(path)
            paths.append(path)
        renders.append(paths)
    rows = [
        {"index": i, "prompt": p, "clip_score": s, "recall_at_1": r, "retrieved_prompt": p, "renders": [str(x) for x in renders[i]]}
        for i, (p, s, r) in enumerate([("a cat", 0.4, 1.0), ("a | pipe", 0.6, 0.5), ("a dog", 0.5, 0.0)])
    ]
    paths = write_report(tmp_path / "out", _results(), rows, renders, thumb=16)
    assert json.loads(paths["results"].read_text())["recall_at_1"] == 0.75
    with paths["per_prompt"].open() as fh:
        table = list(csv.DictReader(fh))
    assert [r["prompt"] for r in table] == ["a cat", "a | pipe", "a dog"] and float(table[1]["clip_score"]) == 0.6
    for key in ("contact_sheet", "histogram"):
        with Image.open(paths[key]) as im:
            assert im.format == "PNG" and im.size[0] > 0
    report = paths["report"].read_text()
    assert "](contact_sheet.png)" in report and "](score_histogram.png)" in report
    assert "a \\| pipe" in report and "0.7500" in report
    # 3 prompts: the best one and the worst one, tables that do not overlap
    best, worst = report.split("## Best 1")[1].split("## Worst 1")
    assert "a \\| pipe" in best and "a cat" not in best and "a dog" not in best
    assert "a cat" in worst.split("All prompts")[0] and "a dog" not in worst


def test_markdown_report_mentions_missing_meshes():
    results = _results() | {"missing": ["a ghost"]}
    rows = [{"index": 0, "prompt": "a", "clip_score": 0.5, "recall_at_1": 1.0, "retrieved_prompt": "a"}]
    assert "1 without a mesh" in markdown_report(results, rows)
