"""One generation request of `prd serve`, checked: the page and `POST /generate` share these rules.

    request, notices = check_request(prompt, seed=0, resolution=64, file_format="glb", tokenizer=tok)

Every problem is a one-line `RequestError` (what is wrong, what to do); fixes that keep the request usable
(control characters replaced by spaces, a prompt cut to the text encoder's tokens) come back as notices.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from renderers.errors import UserError
from renderers.export import EXPORT_FORMATS

MIN_RESOLUTION, MAX_RESOLUTION = 16, 256
MAX_SEED = 2**63 - 1
MAX_INPUT_CHARS = 20_000  # longer input is refused before it is tokenised
EXAMPLES = (  # DreamFusion-style prompts (datamodules/prompt_sets/dreamfusion415.json)
    "a DSLR photo of a corgi wearing a red party hat",
    "a zoomed out DSLR photo of a wooden rocking chair",
    "a DSLR photo of a red apple on a white plate",
    "a large red ball",
)
FORMATS = (*EXPORT_FORMATS, "asset")  # asset: the textured PBR GLB of `prd generate --asset`
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class RequestError(UserError, ValueError):
    """A request `prd serve` cannot generate from (one-line message; HTTP status 422 or 400)."""


@dataclass(frozen=True)
class MeshRequest:
    prompt: str
    seed: int = 0
    resolution: int = 64
    file_format: str = "glb"  # glb, obj, ply, or asset (decimated, unwrapped, baked PBR GLB)
    uv_texture: bool = False  # xatlas unwrap and a baked texture (GLB, OBJ)


def clean_prompt(prompt: object) -> tuple[str, list[str]]:
    """The prompt as text without control characters (replaced by spaces, with a notice), NFC-normalised and
    stripped; bytes must be UTF-8. Raises `RequestError` for empty, non-text or too long input."""
    notices: list[str] = []
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("the prompt is not valid UTF-8 text: send it UTF-8 encoded") from None
    if not isinstance(prompt, str):
        raise RequestError(f"the prompt must be text, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. bytes decoded with surrogateescape
        raise RequestError("the prompt is not valid UTF-8 text (it holds lone surrogates): send it UTF-8 encoded") from None
    if len(prompt) > MAX_INPUT_CHARS:
        raise RequestError(f"the prompt has {len(prompt)} characters: the limit is {MAX_INPUT_CHARS}; shorten it")
    cleaned, count = _CONTROL.subn(" ", prompt)
    if count:
        notices.append(f"{count} control character(s) in the prompt were replaced by spaces")
    cleaned = " ".join(unicodedata.normalize("NFC", cleaned).split())
    if not cleaned:
        raise RequestError("the prompt is empty: type a description of an object, e.g. 'a wooden chair'")
    return cleaned, notices


def truncate_to_tokens(prompt: str, tokenizer) -> tuple[str, list[str]]:
    """`prompt` cut to what the text encoder reads (`tokenizer.model_max_length` tokens with BOS / EOS, 77 for
    CLIP), with a notice when it was cut; unchanged without a tokenizer."""
    if tokenizer is None:
        return prompt, []
    limit = int(tokenizer.model_max_length) - 2
    ids = tokenizer(prompt, add_special_tokens=False, truncation=False, verbose=False).input_ids
    if len(ids) <= limit:
        return prompt, []
    cut = tokenizer.decode(ids[:limit], skip_special_tokens=True).strip()
    notice = (f"the prompt has {len(ids)} tokens: the text encoder reads {limit + 2} (with start / end), "
              f"so it was cut to {cut[:60]!r}{'...' if len(cut) > 60 else ''}")
    return cut or prompt[:limit], [notice]


def _integer(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RequestError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    try:
        number = int(value) if not isinstance(value, float) or value.is_integer() else None
    except (ValueError, OverflowError):
        number = None
    if number is None:
        raise RequestError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    if not low <= number <= high:
        raise RequestError(f"{name} must be in [{low}, {high}], got {number}")
    return number


def check_request(
    prompt: object, seed: object = 0, resolution: object = 64, file_format: object = "glb", tokenizer=None,
    uv_texture: object = False,
) -> tuple[MeshRequest, list[str]]:
    """The checked request and its notices, or a one-line `RequestError`."""
    text, notices = clean_prompt(prompt)
    text, cut = truncate_to_tokens(text, tokenizer)
    fmt = str(file_format).strip().lower().lstrip(".") if isinstance(file_format, str) else file_format
    if fmt not in FORMATS:
        raise RequestError(f"unknown format {file_format!r}: use one of {', '.join(FORMATS)}")
    if not isinstance(uv_texture, bool):
        raise RequestError(f"uv_texture must be true or false, got {uv_texture!r}")
    if uv_texture and fmt == "ply":
        raise RequestError("a UV texture needs format glb or obj: PLY stores vertex colours only")
    if uv_texture and fmt == "asset":
        raise RequestError("format asset bakes its own albedo and normal maps: leave the UV texture off")
    request = MeshRequest(
        prompt=text,
        seed=_integer(seed, "seed", 0, MAX_SEED),
        resolution=_integer(resolution, "resolution", MIN_RESOLUTION, MAX_RESOLUTION),
        file_format=fmt,
        uv_texture=uv_texture,
    )
    return request, notices + cut
