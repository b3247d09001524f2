"""Evaluation outputs of `prd eval`: results JSON, per-prompt CSV, markdown report with pictures.

Pictures are drawn with Pillow only (no plotting dependency):
- a contact sheet: one row per prompt (up to `max_rows`, spread from the best to the worst score),
  its renders side by side and the prompt with its score;
- a histogram of the per-prompt CLIP scores with the mean marked.
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

RESULTS_JSON = "results.json"
PER_PROMPT_CSV = "per_prompt.csv"
REPORT_MD = "report.md"
CONTACT_SHEET_PNG = "contact_sheet.png"
HISTOGRAM_PNG = "score_histogram.png"


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> float:
    return draw.textlength(text, font=font)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: float, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels, at most `max_lines` lines (the last one ellipsised)."""
    chars = max(8, int(width / max(1.0, _text_width(draw, "n", font))))
    lines = textwrap.wrap(text, width=chars) or [""]
    while chars > 8 and any(_text_width(draw, line, font) > width for line in lines):
        chars -= 2
        lines = textwrap.wrap(text, width=chars) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 3)] + "..."
    return lines


# ----------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------


def pick_rows(scores: Sequence[float], max_rows: int) -> list[int]:
    """Indices of up to `max_rows` entries spread evenly over the ranking, best first."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if len(order) <= max_rows:
        return order
    picks = [order[round(k * (len(order) - 1) / (max_rows - 1))] for k in range(max_rows)] if max_rows > 1 else order[:1]
    return list(dict.fromkeys(picks))


def contact_sheet(
    rows: Sequence[tuple[str, Sequence[str | Path | Image.Image]]],
    thumb: int = 160,
    caption_width: int = 300,
    pad: int = 6,
) -> Image.Image:
    """A grid image: each row is (caption, images); images are scaled to `thumb` x `thumb`."""
    if not rows:
        raise ValueError("contact_sheet needs at least one row")
    columns = max(len(images) for _, images in rows)
    font = _font(max(10, thumb // 11))
    width = pad + caption_width + pad + columns * (thumb + pad)
    height = pad + len(rows) * (thumb + pad)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    line_height = font.getbbox("Ag")[3] + 3 if hasattr(font, "getbbox") else 14
    for r, (caption, images) in enumerate(rows):
        top = pad + r * (thumb + pad)
        lines = _wrap(draw, caption, font, caption_width, max_lines=max(1, thumb // line_height))
        for k, line in enumerate(lines):
            draw.text((pad, top + k * line_height), line, fill=(20, 20, 20), font=font)
        for c, item in enumerate(images):
            image = item if isinstance(item, Image.Image) else Image.open(item)
            image = image.convert("RGB").resize((thumb, thumb), Image.Resampling.LANCZOS)
            left = pad + caption_width + pad + c * (thumb + pad)
            sheet.paste(image, (left, top))
            draw.rectangle([left - 1, top - 1, left + thumb, top + thumb], outline=(200, 200, 200))
    return sheet


def _nice_step(span: float, ticks: int) -> float:
    raw = span / max(1, ticks)
    magnitude = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 2.5, 5, 10):
        if raw <= mult * magnitude:
            return mult * magnitude
    return 10 * magnitude


def histogram_counts(values: Sequence[float], bins: int, low: float, high: float) -> list[int]:
    """Counts of `values` in `bins` equal bins over [low, high] (the last bin includes `high`)."""
    counts = [0] * bins
    width = (high - low) / bins
    for v in values:
        k = min(bins - 1, max(0, int((v - low) / width)))
        counts[k] += 1
    return counts


def score_histogram(
    values: Sequence[float],
    bins: int = 20,
    title: str = "CLIP score per prompt",
    size: tuple[int, int] = (720, 420),
) -> Image.Image:
    """A bar histogram of `values` with axes, ticks and the mean as a dashed red line."""
    if not values:
        raise ValueError("score_histogram needs at least one value")
    lo, hi = min(values), max(values)
    step = _nice_step(max(hi - lo, 1e-3), 5)
    low = math.floor(lo / step) * step
    high = max(math.ceil(hi / step) * step, low + step)
    if high <= hi:
        high += step
    counts = histogram_counts(values, bins, low, high)

    width, height = size
    left, right, top, bottom = 64, 24, 40, 56
    plot_w, plot_h = width - left - right, height - top - bottom
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = _font(13)
    draw.text((left, 10), title, fill=(0, 0, 0), font=_font(16))

    peak = max(counts)
    y_step = max(1, math.ceil(_nice_step(peak, 4)))
    y_max = max(y_step, math.ceil(peak / y_step) * y_step)

    def x_of(value: float) -> float:
        return left + (value - low) / (high - low) * plot_w

    def y_of(count: float) -> float:
        return top + plot_h - count / y_max * plot_h

    for k, count in enumerate(counts):
        if count:
            x0 = x_of(low + k * (high - low) / bins)
            x1 = x_of(low + (k + 1) * (high - low) / bins)
            draw.rectangle([x0 + 1, y_of(count), x1 - 1, y_of(0)], fill=(76, 114, 176), outline=(40, 70, 130))
    # axes and ticks
    draw.line([left, top, left, top + plot_h], fill=(0, 0, 0))
    draw.line([left, top + plot_h, left + plot_w, top + plot_h], fill=(0, 0, 0))
    tick = low
    while tick <= high + 1e-9:
        x = x_of(tick)
        draw.line([x, top + plot_h, x, top + plot_h + 4], fill=(0, 0, 0))
        label = f"{tick:.3g}"
        draw.text((x - _text_width(draw, label, font) / 2, top + plot_h + 6), label, fill=(0, 0, 0), font=font)
        tick += step
    for count in range(0, y_max + 1, y_step):
        y = y_of(count)
        draw.line([left - 4, y, left, y], fill=(0, 0, 0))
        label = str(count)
        draw.text((left - 8 - _text_width(draw, label, font), y - 7), label, fill=(0, 0, 0), font=font)
    x_label = "CLIP score (2.5 * max(cos, 0), mean over views)"
    draw.text((left + plot_w / 2 - _text_width(draw, x_label, font) / 2, height - 22), x_label, fill=(0, 0, 0), font=font)
    draw.text((6, top - 18), "prompts", fill=(0, 0, 0), font=font)
    # mean
    mean = sum(values) / len(values)
    xm = x_of(mean)
    for y in range(top, top + plot_h, 8):
        draw.line([xm, y, xm, min(y + 4, top + plot_h)], fill=(200, 30, 30), width=2)
    label = f"mean {mean:.4f} (n={len(values)})"
    draw.text((min(xm + 6, width - right - _text_width(draw, label, font)), top + 2), label, fill=(200, 30, 30), font=font)
    return image


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def write_results_json(path: str | Path, results: dict) -> Path:
    path = Path(path)
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def write_per_prompt_csv(path: str | Path, rows: Sequence[dict]) -> Path:
    """One CSV row per prompt; columns are the keys of the first row (lists are joined with ';')."""
    path = Path(path)
    fields = list(rows[0]) if rows else ["index", "prompt"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ";".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in row.items()})
    return path


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_report(results: dict, rows: Sequence[dict], top_k: int = 5) -> str:
    """The markdown text of report.md (pictures referenced by file name, next to it)."""
    protocol, clip = results["protocol"], results["clip"]
    lines = [
        "# CLIP evaluation",
        "",
        f"Source: `{_md(results['source'])}`; prompts: `{_md(results['prompts'])}` "
        f"({results['num_prompts']} evaluated, {results['num_unique_prompts']} unique"
        + (f", {len(results['missing'])} without a mesh" if results.get("missing") else "")
        + (f", {len(results['unreadable'])} with an unreadable mesh" if results.get("unreadable") else "")
        + ").",
        "",
        "| metric | value |",
        "|---|---|",
        f"| CLIP score (2.5 * max(cos, 0), mean over {results['num_prompts']} x {protocol['num_views']} images) "
        f"| {results['clip_score']:.4f} |",
        f"| CLIP Recall@1 (among {results['num_unique_prompts']} unique prompts) | {results['recall_at_1']:.4f} |",
        f"| CLIP score, std over prompts | {results['clip_score_std']:.4f} |",
        "",
        f"CLIP: `{_md(clip['model'])}`"
        + "".join(f", {k} `{_md(clip[k])}`" for k in ("pretrained", "checkpoint") if clip.get(k))
        + f"; caption = {json.dumps(clip['caption_prefix'])} + prompt.",
        "",
        f"Protocol: {protocol['num_views']} azimuths from {protocol['azimuth_start']:g} deg, elevation "
        f"{protocol['elevation']:g} deg, distance {protocol['distance']:g}, FoV {protocol['fovy']:g} deg, "
        f"{protocol['resolution']} x {protocol['resolution']}, white background, unlit vertex colours, "
        f"mesh normalisation: {protocol['normalize']}"
        + (f" (bounding box to [-{protocol['bound']:g}, {protocol['bound']:g}])" if protocol["normalize"] == "box" else "")
        + ".",
        "",
        f"![contact sheet]({CONTACT_SHEET_PNG})",
        "",
        f"![CLIP score histogram]({HISTOGRAM_PNG})",
        "",
    ]
    ranked = sorted(rows, key=lambda r: (-r["clip_score"], r["index"]))
    top_k = min(top_k, max(1, len(ranked) // 2))  # the two tables do not overlap
    for title, chosen in (("Best", ranked[:top_k]), ("Worst", ranked[::-1][:top_k])):
        lines += [f"## {title} {len(chosen)}", "", "| # | prompt | CLIP score | Recall@1 | retrieved |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['index']} | {_md(r['prompt'])} | {r['clip_score']:.4f} | {r['recall_at_1']:.2f} | {_md(r['retrieved_prompt'])} |"
            for r in chosen
        ]
        lines.append("")
    skipped = [("", prompt, "no mesh") for prompt in results.get("missing") or []]
    skipped += [(item["index"], item["prompt"], item["error"]) for item in results.get("unreadable") or []]
    if skipped:  # prompts that --allow-missing left out, each with its reason
        lines += [f"## Not evaluated ({len(skipped)})", "", "| # | prompt | reason |", "|---|---|---|"]
        lines += [f"| {index} | {_md(prompt)} | {_md(reason)} |" for index, prompt, reason in skipped]
        lines.append("")
    lines.append(f"All prompts: [{PER_PROMPT_CSV}]({PER_PROMPT_CSV}); numbers: [{RESULTS_JSON}]({RESULTS_JSON}).")
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: str | Path,
    results: dict,
    rows: Sequence[dict],
    renders: Sequence[Sequence[str | Path]],
    max_rows: int = 16,
    thumb: int = 160,
) -> dict[str, Path]:
    """Write results.json, per_prompt.csv, contact_sheet.png, score_histogram.png and report.md.

    rows: one dict per prompt (index, prompt, clip_score, recall_at_1, retrieved_prompt, ...);
    renders: the render files of each row, in the same order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = [r["clip_score"] for r in rows]
    picked = pick_rows(scores, max_rows)
    sheet_rows = [
        (f"#{rows[i]['index']}  score {rows[i]['clip_score']:.3f}  R@1 {rows[i]['recall_at_1']:.2f}  {rows[i]['prompt']}", renders[i])
        for i in picked
    ]
    paths = {
        "results": write_results_json(out_dir / RESULTS_JSON, results),
        "per_prompt": write_per_prompt_csv(out_dir / PER_PROMPT_CSV, rows),
        "contact_sheet": out_dir / CONTACT_SHEET_PNG,
        "histogram": out_dir / HISTOGRAM_PNG,
        "report": out_dir / REPORT_MD,
    }
    contact_sheet(sheet_rows, thumb=thumb).save(paths["contact_sheet"])
    score_histogram(scores).save(paths["histogram"])
    paths["report"].write_text(markdown_report(results, rows), encoding="utf-8")
    return paths
