"""`prd serve`'s batching: concurrent requests (API and page) share one run of the student's networks, each
gets its own file, and a request that fails (bad input, a failure inside the batch) fails alone. Tiny
reference student (tests/fixtures/reference/triplaneturbo_ref_A), FastAPI's TestClient, no network."""

import concurrent.futures
import threading

import numpy as np
import pytest
import trimesh

from lightning_modules.serve import model as serve_model
from lightning_modules.serve.app import create_app, page_outputs
from lightning_modules.serve.batcher import Batcher
from lightning_modules.serve.model import ServeModel
from lightning_modules.student import TriplaneStudent
from lightning_modules.student.generation import generate_meshes
from renderers.errors import UserError


@pytest.fixture(scope="module")
def student(ref_weights):
    return TriplaneStudent.from_pretrained(None, weights=ref_weights)


@pytest.fixture
def model(student, tmp_path):
    return ServeModel(student, tmp_path / "served", turntable_frames=0)


@pytest.fixture
def student_calls(monkeypatch):
    """The prompts of every batched network run (`sample_fields`) of the server."""
    calls: list[list[str]] = []
    real = serve_model.sample_fields

    def counted(student, prompts, seeds, timer=None):
        calls.append(list(prompts))
        return real(student, prompts, seeds, timer)

    monkeypatch.setattr(serve_model, "sample_fields", counted)
    return calls


def _post_all(client, bodies):
    """POST every body at once (one thread each); the replies in order."""
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: client.post("/generate?response=json", json=body), bodies))


def _assert_same_mesh(path, reference_path):
    mesh = trimesh.load(path, process=False, force="mesh")
    expected = trimesh.load(reference_path, process=False, force="mesh")
    np.testing.assert_array_equal(mesh.faces, expected.faces)
    np.testing.assert_allclose(mesh.vertices, expected.vertices, atol=1e-4)  # vertices span about [-1, 1]


def test_batcher_gathers_up_to_max_batch_and_fails_items_alone():
    def run(items):
        return [ValueError(f"bad {i}") if i < 0 else 10 * i for i in items]

    batcher = Batcher(run, max_batch=3, wait=0.5)  # every item below arrives within 0.5 s
    futures = [batcher.submit(i) for i in (1, -2, 3, 4, 5)]
    assert [f.result(timeout=30) for f in futures if f is not futures[1]] == [10, 30, 40, 50]
    with pytest.raises(ValueError, match="bad -2"):
        futures[1].result()
    assert batcher.batch_sizes == [3, 2]


def test_batcher_does_not_wait_for_a_full_batch():
    batcher = Batcher(lambda items: list(items), max_batch=8, wait=0.05)
    assert batcher.submit("x").result(timeout=10) == "x" and batcher.batch_sizes == [1]


def test_concurrent_api_requests_run_as_one_student_batch_each_with_its_own_file(student, model, student_calls,
                                                                                  tmp_path):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(model, page=False, max_batch=4, batch_wait=10.0))  # runs once 4 are in
    bodies = [{"prompt": f"a red car {i}", "seed": 3 + i, "resolution": 16 + 4 * i, "format": ("glb", "ply")[i % 2]}
              for i in range(4)]
    replies = _post_all(client, bodies)
    assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
    assert len(student_calls) == 1 and sorted(student_calls[0]) == sorted(b["prompt"] for b in bodies)
    for body, reply in zip(bodies, replies, strict=True):
        info = reply.json()
        assert info["batch_size"] == 4 and info["prompt"] == body["prompt"] and info["format"] == body["format"]
        alone = generate_meshes(student, [body["prompt"]], tmp_path / str(body["seed"]), seed=body["seed"],
                                resolution=body["resolution"], progress=False)[0]
        (tmp_path / "reply").mkdir(exist_ok=True)
        download = tmp_path / "reply" / info["file"]
        download.write_bytes(client.get(info["url"]).content)
        _assert_same_mesh(download, tmp_path / str(body["seed"]) / alone["file"])


def test_a_failing_request_in_a_batch_fails_alone(model, student_calls, monkeypatch):
    from fastapi.testclient import TestClient

    real = serve_model.export_object

    def broken_for_one(mesh, obj, path, **kwargs):
        if "broken" in str(path):
            raise UserError("the field has no surface: try another seed")
        return real(mesh, obj, path, **kwargs)

    monkeypatch.setattr(serve_model, "export_object", broken_for_one)
    client = TestClient(create_app(model, page=False, max_batch=3, batch_wait=10.0))
    bodies = [{"prompt": "a chair", "resolution": 16}, {"prompt": "a broken chair", "resolution": 16},
              {"prompt": "   ", "resolution": 16},  # bad input: refused before it joins a batch
              {"prompt": "a table", "resolution": 16}]
    replies = _post_all(client, bodies)
    assert [r.status_code for r in replies] == [200, 422, 422, 200]
    assert replies[1].json()["error"] == "the field has no surface: try another seed"
    assert "the prompt is empty" in replies[2].json()["error"]
    assert len(student_calls) == 1 and sorted(student_calls[0]) == ["a broken chair", "a chair", "a table"]
    assert sorted(p.name for p in model.out_dir.iterdir()) == sorted(r.json()["request_id"] for r in (replies[0], replies[3]))


def test_a_failed_batched_network_run_is_retried_request_by_request(model, student_calls, monkeypatch):
    real = serve_model.sample_fields

    def poisoned(student, prompts, seeds, timer=None):
        if "poison" in prompts:
            raise RuntimeError("out of memory")
        return real(student, prompts, seeds, timer)

    monkeypatch.setattr(serve_model, "sample_fields", poisoned)
    items = [model.check(p, 0, 16) for p in ("a chair", "poison", "a table")]
    results = model.generate_batch(items)
    assert [type(r).__name__ for r in results] == ["MeshResult", "RuntimeError", "MeshResult"]
    assert [r.request.prompt for r in (results[0], results[2])] == ["a chair", "a table"]
    assert all(r.batch_size == 1 for r in (results[0], results[2]))


def test_page_requests_join_the_same_batch(model, student_calls):
    batcher = Batcher(model.sample_batch, max_batch=3, wait=10.0)
    barrier = threading.Barrier(3)

    def page(i):
        barrier.wait()
        return page_outputs(model, f"a lamp {i}", i, 16, "obj", batcher=batcher)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        outputs = list(pool.map(page, range(3)))
    assert len(student_calls) == 1 and len(student_calls[0]) == 3
    assert all(download.endswith(".obj") and "batch of 3" in timings for _, _, download, timings in outputs)
    assert len({download for _, _, download, _ in outputs}) == 3
