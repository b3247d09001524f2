import os

# Tests never reach a model hub: everything is built locally or read from tests/fixtures.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# One pytest-xdist worker per core: more threads than cores makes OpenMP spin and slows everything down.
# PRD_TEST_THREADS sets the count instead (scripts/mutation_check.py runs its tests on one thread).
_THREADS = int(os.environ.get("PRD_TEST_THREADS", "0")) or max(
    1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
)
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))  # also for the subprocesses tests start

import random  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny_sd import FIXTURES, make_tiny_sd  # noqa: E402

torch.set_num_threads(_THREADS)

# Salt of every test's seed: the suite is meant to pass for any value (PRD_TEST_SEED=1 make test checks
# that no tolerance was tuned to one lucky draw); 0 in CI.
_SEED_SALT = int(os.environ.get("PRD_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def seed_everything(request, monkeypatch):
    """Seed torch, numpy and random before every test, from the test's own id: a test draws the same
    numbers alone, in any order, and on any pytest-xdist worker. Lightning's global seed (PL_GLOBAL_SEED,
    set by `seed_everything`, read by PromptDataModule) does not leak from one test into the next."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    seed = (zlib.crc32(request.node.nodeid.encode()) + _SEED_SALT) % 2**32
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return seed


@pytest.fixture(scope="session")
def fixtures_dir():
    """Reference test vectors (a copy of ../shared/fixtures, see tests/fixtures/reference/README.md)."""
    return FIXTURES


@pytest.fixture(scope="session")
def ref_weights(fixtures_dir):
    """The reference TriplaneTurbo checkpoint of the fixtures (tiny, random weights; original .pth format)."""
    return fixtures_dir / "triplaneturbo_ref_A" / "triplane_turbo.pth"


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny random SD 2.x-style pipeline directory, shared by the whole session."""
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"), seed=0)


@pytest.fixture(scope="session")
def gaussian_student(tiny_sd_dir, tmp_path_factory):
    """A Gaussian student (tiny SD, random weights, 300 Gaussians, SH degree 1) saved with save_pretrained."""
    from lightning_modules.student import TriplaneStudent
    from lightning_modules.training.settings import resolve_student_config
    from tests.gaussian_helpers import GAUSSIAN_STUDENT
    from tests.prd_helpers import TINY_STUDENT

    representation = {"num_gaussians": 300, "surface_resolution": 16, "mlp_neurons": 16, "sh_degree": 1}
    config = resolve_student_config({**TINY_STUDENT, "student_class": GAUSSIAN_STUDENT, "representation": representation})
    torch.manual_seed(0)
    student = TriplaneStudent.from_pretrained(tiny_sd_dir, config=config)
    with torch.no_grad():
        for p in student.gaussian_geometry_head.parameters():
            p.normal_(0, 0.2)  # "trained" heads: attributes that differ from Gaussian to Gaussian
        for p in student.gaussian_color_head.parameters():
            p.normal_(0, 0.2)
    return student, student.save_pretrained(tmp_path_factory.mktemp("gaussian_student"))


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 (as the whole suite runs) and an empty Hugging Face cache (returned): a hub id is found
    nowhere unless the test puts a file there (`tests.teacher_helpers.put_in_hub_cache`), whatever this machine's own cache holds."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache

