"""The gradio page and the HTTP API of `prd serve`, on one FastAPI app.

    app = create_app(model, max_batch=4, batch_wait=0.05, max_queue=32)   # model: a `ServeModel`
    uvicorn.run(app, host="127.0.0.1", port=7860)

The page (`/`): prompt (with DreamFusion-style examples), seed, grid resolution, format and UV texture in; a 3D view of the
GLB, a turntable strip, the file to download and the seconds per stage out. Requests go through gradio's queue
(`concurrency` at once, default `max_batch`; at most `max_queue` waiting); a failed request shows its one-line
message in the page and the server keeps serving.

Batching: page and API requests alike go to one `Batcher`, which runs the student's networks once for up to
`max_batch` requests that arrived within `batch_wait` seconds of the first (`ServeModel.sample_batch`); each
request then writes its own files in its own thread (`ServeModel.write_result`). Bad input is refused before it
joins a batch, and a request that fails inside one fails alone.

The API: `POST /generate` with a JSON body `{"prompt": ..., "seed": 0, "resolution": 64, "format": "glb",
"uv_texture": false}`
returns the mesh file (timings and notices in the `X-PRD-Timings` / `X-PRD-Notices` headers, JSON), or with
`?response=json` a JSON summary with `url`, `glb_url` and `turntable_url` (`GET /files/<id>/<name>`). Bad input
is a 4xx with `{"error": "<one line>"}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

from fastapi import APIRouter, Request  # at module level: FastAPI resolves the route's annotations here

from lightning_modules.cli.main import one_line
from lightning_modules.serve.batcher import Batcher
from lightning_modules.serve.model import MeshResult, PathOutsideError, ServeModel, path_inside
from lightning_modules.serve.requests import EXAMPLES, FORMATS, MAX_RESOLUTION, MIN_RESOLUTION, RequestError
from renderers.errors import UserError

log = logging.getLogger(__name__)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local server does not report to gradio's servers
MEDIA_TYPES = {".glb": "model/gltf-binary", ".obj": "model/obj", ".ply": "application/octet-stream", ".zip": "application/zip"}
FORMAT_LABELS = {"glb": "GLB", "obj": "OBJ", "ply": "PLY", "asset": "asset: textured PBR GLB (albedo + normal map)"}
FAILED = "generation failed ({}): the server keeps serving; try again, or a lower resolution"


def timings_markdown(result: MeshResult) -> str:
    """The seconds per stage of one request, and its notices, as a Markdown table."""
    rows = ["| stage | seconds |", "|---|---:|"]
    rows += [f"| {stage} | {seconds:.3f} |" for stage, seconds in result.timings.items()]
    notes = [f"- {n}" for n in result.notices]
    head = (f"**{result.request.prompt[:200]}** · seed {result.request.seed} · {result.vertices} vertices, {result.faces} faces"
            f" · batch of {result.batch_size}")
    return "\n".join([head, "", *rows, *([""] + notes if notes else [])])


def generate_one(model: ServeModel, batcher: Batcher | None, request, notices) -> MeshResult:
    """A checked request generated through `batcher` (waiting for its batch's networks, then writing its own
    files in this thread), or alone without one."""
    if batcher is None:
        return model.generate(request, notices)
    return model.write_result(request, notices, batcher.submit((request, notices)).result())


def page_outputs(model: ServeModel, prompt, seed, resolution, file_format, uv_texture=False,
                 batcher: Batcher | None = None) -> tuple[str, str | None, str, str]:
    """What the page shows for one request: (GLB for the 3D view, turntable PNG, file to download, timings
    Markdown); a `UserError` for bad input."""
    request, notices = model.check(prompt, seed, resolution, file_format, uv_texture)
    result = generate_one(model, batcher, request, notices)
    turntable = str(result.turntable_file) if result.turntable_file else None
    return str(result.glb_file), turntable, str(result.mesh_file), timings_markdown(result)


def page_handler(model: ServeModel, batcher: Batcher | None = None):
    """`page_outputs` with every failure as a `gr.Error` (shown in the page; the server keeps serving)."""
    import gradio as gr

    def generate(prompt, seed, resolution, file_format, uv_texture=False):
        try:
            return page_outputs(model, prompt, seed, resolution, file_format, uv_texture, batcher)
        except UserError as err:
            raise gr.Error(one_line(err)) from None
        except Exception as err:  # out of memory, a bug: logged, and the page says so in one line
            log.exception("generation failed")
            raise gr.Error(FAILED.format(type(err).__name__)) from None

    return generate


def build_page(model: ServeModel, concurrency: int = 1, max_queue: int = 32, batcher: Batcher | None = None):
    """The gradio Blocks page, its Generate button queued (`concurrency` at once, `max_queue` waiting), its
    requests generated through `batcher` (batched with the API's) when given."""
    import gradio as gr

    with gr.Blocks(title="PRD / TriplaneTurbo: text to mesh") as page:
        gr.Markdown("# PRD / TriplaneTurbo: text to mesh\nType a description, press **Generate**.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder=EXAMPLES[0], elem_id="prompt")
                seed = gr.Number(label="Seed", value=0, precision=0, minimum=0)
                resolution = gr.Slider(MIN_RESOLUTION, MAX_RESOLUTION, value=64, step=1, label="Grid resolution")
                file_format = gr.Radio([(FORMAT_LABELS[f], f) for f in FORMATS], value="glb", label="Format",
                                       elem_id="format")
                uv_texture = gr.Checkbox(False, label="UV texture (GLB, OBJ: unwrapped and baked; OBJ comes zipped)")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                gr.Examples([[e] for e in EXAMPLES], inputs=[prompt])
            with gr.Column():
                view = gr.Model3D(label="3D view (GLB)", elem_id="view")
                turntable = gr.Image(label="Turntable", type="filepath", elem_id="turntable")
                download = gr.File(label="Download", elem_id="download")
                timings = gr.Markdown(elem_id="timings")
        button.click(page_handler(model, batcher), [prompt, seed, resolution, file_format, uv_texture], [view, turntable, download, timings],
                     api_name="generate", concurrency_limit=concurrency)
    page.queue(max_size=max_queue, default_concurrency_limit=concurrency)
    return page


def _error(status: int, err: BaseException | str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": err if isinstance(err, str) else one_line(err)}, status_code=status)


async def _parse_body(request) -> dict:
    """The JSON object of a request body; a `RequestError` for non-UTF-8 bytes, bad JSON or not an object."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("the request body is not valid UTF-8: send UTF-8 encoded JSON") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(f"the request body is not JSON ({err.msg} at character {err.pos}): send "
                           '{"prompt": "...", "seed": 0, "resolution": 64, "format": "glb"}') from None
    if not isinstance(body, dict):
        raise RequestError('the request body must be a JSON object: {"prompt": "...", ...}')
    unknown = sorted(set(body) - {"prompt", "seed", "resolution", "format", "uv_texture"})
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}: use prompt, seed, resolution, format, uv_texture")
    if "prompt" not in body:
        raise RequestError('no "prompt" in the request body: send {"prompt": "a wooden chair"}')
    return body


def api_router(model: ServeModel, batcher: Batcher | None = None):
    """`POST /generate` and `GET /files/<request id>/<name>` (files of earlier requests)."""
    from fastapi.responses import FileResponse
    from starlette.concurrency import run_in_threadpool

    router = APIRouter()

    @router.post("/generate")
    async def generate(request: Request, response: str = "file"):
        if response not in ("file", "json"):
            return _error(400, f"response={response!r}: use response=file (the mesh) or response=json")
        try:
            body = await _parse_body(request)
            checked, notices = model.check(body["prompt"], body.get("seed", 0), body.get("resolution", 64),
                                           body.get("format", "glb"), body.get("uv_texture", False))
            if batcher is not None:
                sampled = await asyncio.wrap_future(batcher.submit((checked, notices)))
                result = await run_in_threadpool(model.write_result, checked, notices, sampled)
            else:
                result = await run_in_threadpool(model.generate, checked, notices)
        except RequestError as err:
            return _error(422, err)
        except UserError as err:
            return _error(422, err)
        except Exception as err:
            log.exception("generation failed")
            return _error(500, FAILED.format(type(err).__name__))
        if response == "json":
            urls = {key: f"/files/{result.request_id}/{path.name}" for key, path in
                    (("url", result.mesh_file), ("glb_url", result.glb_file), ("turntable_url", result.turntable_file))
                    if path is not None}
            return {**result.summary(), **urls}
        headers = {"X-PRD-Timings": json.dumps(result.timings), "X-PRD-Notices": json.dumps(result.notices)}
        return FileResponse(result.mesh_file, media_type=MEDIA_TYPES[result.mesh_file.suffix],
                            filename=result.mesh_file.name, headers=headers)

    @router.get("/files/{request_id}/{name}")
    def files(request_id: str, name: str):
        try:
            path = path_inside(model.out_dir, request_id, name)
        except PathOutsideError as err:
            return _error(404, err)
        if not path.is_file():
            return _error(404, f"no file {request_id}/{name}: use the URL a generation returned")
        return FileResponse(path, filename=name)

    return router


def create_app(model: ServeModel, concurrency: int | None = None, max_queue: int = 32, page: bool = True,
               max_batch: int = 4, batch_wait: float = 0.05):
    """The FastAPI app: the API routes, and the gradio page mounted at `/` (unless `page=False`); both send their
    requests to one `Batcher` (`max_batch` requests per student call, gathered for `batch_wait` seconds; the
    batcher is `app.state.batcher`). concurrency: page requests taken from gradio's queue at once (default
    `max_batch`, so that a batch can fill from the page alone)."""
    import fastapi

    batcher = Batcher(model.sample_batch, max_batch=max_batch, wait=batch_wait)
    app = fastapi.FastAPI(title="PRD / TriplaneTurbo")
    app.include_router(api_router(model, batcher))
    if page:
        import gradio as gr

        app = gr.mount_gradio_app(app, build_page(model, concurrency or max_batch, max_queue, batcher), path="/",
                                  allowed_paths=[str(model.out_dir.resolve())])
    app.state.batcher = batcher
    return app
