"""`prd serve` as it runs: uvicorn on a free 127.0.0.1 port in this process, driven through gradio's own client
(the page's queue) and over plain HTTP (`POST /generate`), several requests at once; no other network."""

import concurrent.futures
import os
import socket
import threading
import time

import pytest

from lightning_modules.evaluation.meshes import load_mesh
from lightning_modules.serve.app import create_app
from lightning_modules.serve.model import ServeModel
from lightning_modules.student import TriplaneStudent

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="module")
def server(fixtures_dir, tmp_path_factory):
    """(base URL, ServeModel, batcher) of a server running in a thread for this module."""
    import uvicorn

    student = TriplaneStudent.from_pretrained(None, weights=fixtures_dir / "triplaneturbo_ref_A" / "triplane_turbo.pth")
    model = ServeModel(student, tmp_path_factory.mktemp("live") / "served", turntable_frames=2, turntable_size=32)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(model, max_queue=16, max_batch=4, batch_wait=0.5)
    config = uvicorn.Config(app, log_level="warning")
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not runner.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", model, app.state.batcher
    runner.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_gradio_client_gets_the_page_outputs_through_the_queue(server, tmp_path):
    from gradio_client import Client

    url, *_ = server
    client = Client(url, verbose=False, download_files=str(tmp_path), analytics_enabled=False)
    glb, turntable, download, timings = client.predict("a red car", 2, 24, "ply", api_name="/generate")
    mesh = load_mesh(glb)
    assert len(mesh.vertices) > 0 and mesh.colors.shape == mesh.vertices.shape
    assert str(download).endswith(".ply") and str(turntable).endswith(".png") and "| total |" in timings
    with pytest.raises(Exception, match="the prompt is empty"):  # shown as gradio's error, one line
        client.predict("  ", 2, 24, "glb", api_name="/generate")
    assert client.predict("a chair", 0, 16, "glb", api_name="/generate")[0]  # and it keeps serving


def test_concurrent_http_requests_all_complete_in_batches(server):
    import httpx

    url, _, batcher = server
    calls = len(batcher.batch_sizes)

    def post(i):
        with httpx.Client(base_url=url, timeout=120) as http:
            return http.post("/generate?response=json", json={"prompt": f"object {i}", "seed": i, "resolution": 16})

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(post, range(6)))
    assert [r.status_code for r in replies] == [200] * 6
    assert len({r.json()["request_id"] for r in replies}) == 6
    sizes = batcher.batch_sizes[calls:]  # 6 requests within 0.5 s: fewer student calls than requests
    assert sum(sizes) == 6 and len(sizes) < 6 and max(r.json()["batch_size"] for r in replies) == max(sizes) > 1


def _wait_for_colour(element, timeout: float) -> int:
    """Pixels of `element` with a colour (max - min channel > 40, not the white / grey page) once there are
    some, polled until `timeout` seconds."""
    import io

    import numpy as np
    from PIL import Image

    deadline = time.monotonic() + timeout
    while True:
        rgb = np.asarray(Image.open(io.BytesIO(element.screenshot())).convert("RGB")).astype(int)
        coloured = int(((rgb.max(-1) - rgb.min(-1)) > 40).sum())
        if coloured > 200 or time.monotonic() > deadline:
            return coloured
        time.sleep(0.25)


CHROMIUM = "/usr/bin/chromium"  # Debian's chromium package; the test tool downloads no browser


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs Debian's chromium at {CHROMIUM}: `make browser` installs it "
                    "(apt-get install chromium, as root or with sudo)")
def test_browser_types_a_prompt_and_downloads_the_glb(server, tmp_path):
    """Headless Chromium: open the page, type a prompt, press Generate, wait for the 3D view, download the GLB
    (it loads with vertex colours) and save a screenshot."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    url, *_ = server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page.set_default_timeout(45_000)
            page.goto(url)
            page.locator("#prompt textarea").fill("a large red ball")
            page.locator("#generate").click()
            page.locator("#view canvas").wait_for(state="visible")
            drawn = _wait_for_colour(page.locator("#view canvas"), timeout=30)
            link = page.locator("#download a").first
            link.wait_for(state="visible")
            with page.expect_download() as info:
                link.click()
            glb = tmp_path / info.value.suggested_filename
            info.value.save_as(glb)
            page.screenshot(path=tmp_path / "serve_page.png", full_page=True)
        finally:
            browser.close()
    assert drawn > 200, f"the 3D view drew {drawn} coloured pixels"  # WebGL through SwiftShader, on the CPU
    assert glb.suffix == ".glb"
    mesh = load_mesh(glb)
    assert len(mesh.vertices) > 0 and mesh.colors.shape == mesh.vertices.shape
    assert (tmp_path / "serve_page.png").stat().st_size > 10_000
