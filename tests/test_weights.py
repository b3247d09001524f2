"""Checkpoint I/O: the full-size official key layout, config.json, hub resolution, one-line errors."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from lightning_modules.student import TriplaneStudent
from lightning_modules.student.config import BASE_HUB_ID, StudentConfig, StudentWeightsError
from lightning_modules.student.weights import (
    WEIGHTS_FILENAME,
    WEIGHTS_HUB_ID,
    official_key_shapes,
    official_state_dict,
)
from renderers.errors import UserError
from tests.threads import single_thread  # noqa: F401  (fixture)

FIXTURE = "triplaneturbo_ref_A"


pytestmark = pytest.mark.usefixtures("single_thread")


def _read_official_keys(path):
    header, keys = [], {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            header.append(line)
        elif line.strip():
            key, shape, dtype = line.split("\t")
            assert dtype == "float32"
            keys[key] = tuple(int(s) for s in re.findall(r"\d+", shape))
    return "\n".join(header), keys


@pytest.fixture(scope="module")
def full_size_student():
    """The full-size SD 2.1-base architecture with adapters, on the meta device (no weights, no download)."""
    from lightning_modules.student.sd_configs import build_sd21_base

    with torch.device("meta"):
        unet, vae, _ = build_sd21_base(text_encoder=False)
        base_counts = (
            sum(p.numel() for p in unet.parameters()),
            sum(p.numel() for p in vae.decoder.parameters()),
        )
        student = TriplaneStudent(unet, vae)  # full-size defaults: ranks 16, output_dim 64, MLPs 64 x 2
    return student, base_counts


@pytest.mark.slow
def test_full_size_official_key_list_maps_onto_the_modules(full_size_student, fixtures_dir):
    student, _ = full_size_student
    _, official = _read_official_keys(fixtures_dir / "triplaneturbo_official_keys.txt")
    ours = official_key_shapes(student)
    assert sorted(set(official) - set(ours)) == []  # no missing key
    assert sorted(set(ours) - set(official)) == []  # no unexpected key
    assert list(ours) == list(official)  # same order, so saving writes the official file order
    wrong = {k: (ours[k], official[k]) for k in official if ours[k] != official[k]}
    assert wrong == {}


@pytest.mark.slow
def test_full_size_trainable_share(full_size_student, fixtures_dir):
    student, (n_unet, n_decoder) = full_size_student
    header, _ = _read_official_keys(fixtures_dir / "triplaneturbo_official_keys.txt")
    numbers = lambda pattern: [int(x) for x in re.search(pattern, header).groups()]  # noqa: E731
    peft, mlps, total = numbers(r"peft_layers (\d+) \+ MLPs (\d+) = (\d+)")
    ref_unet, ref_decoder = numbers(r"UNet (\d+), VAE decoder (\d+)")
    assert (n_unet, n_decoder) == (ref_unet, ref_decoder)  # the SD 2.1-base configs are right

    trainable = sum(p.numel() for p in student.trainable_parameters())
    mlp_count = sum(
        p.numel() for net in (student.sdf_network, student.feature_network, student.deformation_network)
        for p in net.parameters()
    )  # fmt: skip
    assert (trainable - mlp_count, mlp_count, trainable) == (peft, mlps, total)
    share = 100 * trainable / (n_unet + n_decoder)
    assert share == pytest.approx(2.48, abs=0.1)
    # only the adapters, conv_out and the MLPs train; the base is frozen
    requires_grad = sum(p.numel() for p in student.parameters() if p.requires_grad)
    assert requires_grad == trainable


def test_fixture_config_json_round_trips_with_the_reference_field_names(fixtures_dir):
    path = fixtures_dir / FIXTURE / "config.json"
    cfg = StudentConfig.from_json(path)
    assert (cfg.ranks.self_attn, cfg.ranks.cross_attn, cfg.ranks.locon) == (4, 4, 4)
    assert (cfg.output_dim, cfg.mlp_neurons, cfg.mlp_hidden_layers) == (8, 16, 2)
    assert cfg.to_dict() == json.loads(path.read_text())


def test_defaults_are_the_full_size_model():
    cfg = StudentConfig()
    assert (cfg.ranks.self_attn, cfg.ranks.cross_attn, cfg.ranks.locon) == (16, 16, 16)
    assert (cfg.output_dim, cfg.mlp_neurons, cfg.mlp_hidden_layers) == (64, 64, 2)
    assert cfg.base_model_name_or_path == BASE_HUB_ID


@pytest.mark.parametrize(
    "change, match",
    [
        ({"colour": 1}, "unknown field"),
        ({"space_generator_config": {"self_lora_type": "vanilla"}}, "self_lora_type"),
        ({"space_generator_config": {"training_type": "self_lora_rank_4-locon_rank_4"}}, "cross_lora_rank"),
        ({"rotate_planes": "v7"}, "rotate_planes"),
        ({"mlp_network_config": {"activation": "SiLU"}}, "activation"),
    ],
)
def test_unsupported_config_is_a_one_line_error(tmp_path, fixtures_dir, change, match):
    data = json.loads((fixtures_dir / FIXTURE / "config.json").read_text())
    for key, value in change.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(StudentWeightsError, match=match) as err:
        StudentConfig.from_json(path)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ errors at the API level


@pytest.fixture
def fixture_copy(tmp_path, fixtures_dir):
    """The fixture's checkpoint and config.json in a scratch folder (the base stays in the fixture)."""
    src = fixtures_dir / FIXTURE
    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(src / "triplane_turbo.pth", folder / "triplane_turbo.pth")
    shutil.copy(src / "config.json", folder / "config.json")
    return src / "base", folder


def _one_line_error(excinfo, *kinds) -> str:
    err = excinfo.value
    assert isinstance(err, UserError) and isinstance(err, kinds)
    text = str(err)
    assert text and "\n" not in text
    return text


def test_missing_base_directory(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        TriplaneStudent.from_pretrained(tmp_path / "no_such_model")
    text = _one_line_error(excinfo, FileNotFoundError)
    assert "no_such_model" in text and "does not exist" in text and BASE_HUB_ID in text


def test_base_directory_without_a_diffusers_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as excinfo:
        TriplaneStudent.from_pretrained(tmp_path / "empty")
    assert "unet/config.json" in _one_line_error(excinfo, FileNotFoundError)


def test_missing_weights_file_says_which_file_and_how_to_fetch(fixture_copy, tmp_path):
    base, _ = fixture_copy
    with pytest.raises(FileNotFoundError) as excinfo:
        TriplaneStudent.from_pretrained(base, weights=tmp_path / "nope" / "model.pth")
    text = _one_line_error(excinfo, FileNotFoundError)
    assert "model.pth" in text and WEIGHTS_HUB_ID in text and WEIGHTS_FILENAME in text
    assert f"hf download {WEIGHTS_HUB_ID}" in text


@pytest.mark.parametrize(
    "name, content", [("broken.pth", b"\x00garbage" * 50), ("broken.safetensors", b"xyz" * 9)]
)
def test_corrupt_weights_file(fixture_copy, name, content):
    base, folder = fixture_copy
    (folder / "triplane_turbo.pth").unlink()
    (folder / name).write_bytes(content)
    with pytest.raises(ValueError) as excinfo:
        TriplaneStudent.from_pretrained(base, weights=folder / name)
    text = _one_line_error(excinfo, ValueError)
    assert name in text and ("not a readable PyTorch checkpoint" in text or "not a valid safetensors" in text)


def test_file_that_is_not_a_checkpoint(fixture_copy):
    base, folder = fixture_copy
    torch.save([1, 2, 3], folder / "triplane_turbo.pth")
    with pytest.raises(ValueError) as excinfo:
        TriplaneStudent.from_pretrained(base, weights=folder / "triplane_turbo.pth")
    assert "no state dict" in _one_line_error(excinfo, ValueError)


def test_wrong_keys_are_listed(fixture_copy):
    base, folder = fixture_copy
    path = folder / "triplane_turbo.pth"
    ckpt = torch.load(path, weights_only=True)
    state = ckpt["state_dict"]
    dropped = "geometry.space_generator.peft_layers.layers.3.to_k_lora.up.weight"
    del state[dropped]
    state["geometry.space_generator.peft_layers.layers.99.down.weight"] = torch.zeros(1)
    torch.save(ckpt, path)
    with pytest.raises(ValueError) as excinfo:
        TriplaneStudent.from_pretrained(base, weights=path)
    text = _one_line_error(excinfo, ValueError)
    assert "1 missing key(s): " + dropped in text
    assert "1 unexpected key(s): geometry.space_generator.peft_layers.layers.99.down.weight" in text


def test_wrong_shapes_are_listed(fixture_copy):
    """The fixture checkpoint (ranks 4) with a config.json that says LoCon rank 6."""
    base, folder = fixture_copy
    cfg = json.loads((folder / "config.json").read_text())
    cfg["space_generator_config"]["training_type"] = "self_lora_rank_4-cross_lora_rank_4-locon_rank_6"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as excinfo:
        TriplaneStudent.from_pretrained(base, weights=folder / "triplane_turbo.pth")
    text = _one_line_error(excinfo, ValueError)
    assert "wrong shape(s)" in text
    assert "geometry.space_generator.peft_layers.layers.9.down.weight (4, 16, 3, 3) vs (6, 16, 3, 3)" in text


# ----------------------------------------------------------------------------------- hub resolution


def test_hub_ids_resolve_through_huggingface_hub(monkeypatch, fixture_copy, fixtures_dir):
    """Hub ids go to snapshot_download / hf_hub_download (faked here: tests never touch the network)."""
    import huggingface_hub

    base, folder = fixture_copy
    calls = []

    def fake_snapshot(repo_id, **kwargs):
        calls.append(("snapshot", repo_id))
        return str(base)

    def fake_file(repo_id, filename, **kwargs):
        calls.append(("file", repo_id, filename))
        path = folder / ("triplane_turbo.pth" if filename == WEIGHTS_FILENAME else filename)
        if not path.exists():
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_file)
    student = TriplaneStudent.from_pretrained(BASE_HUB_ID, weights=WEIGHTS_HUB_ID, load_text_encoder=False)
    assert ("snapshot", BASE_HUB_ID) in calls
    assert ("file", WEIGHTS_HUB_ID, WEIGHTS_FILENAME) in calls
    assert student.config.output_dim == 8  # config.json fetched beside the weights
    reference = torch.load(fixtures_dir / FIXTURE / "triplane_turbo.pth", weights_only=True)["state_dict"]
    loaded = official_state_dict(student)
    assert all(torch.equal(loaded[k], v) for k, v in reference.items())


def test_unreachable_hub_is_a_one_line_error(monkeypatch, fixture_copy):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(FileNotFoundError) as excinfo:
        TriplaneStudent.from_pretrained(BASE_HUB_ID)
    text = _one_line_error(excinfo, FileNotFoundError)
    assert BASE_HUB_ID in text and f"hf download {BASE_HUB_ID}" in text
    base, _ = fixture_copy
    with pytest.raises(FileNotFoundError) as excinfo:
        TriplaneStudent.from_pretrained(base, weights=WEIGHTS_HUB_ID)
    text = _one_line_error(excinfo, FileNotFoundError)
    assert (
        WEIGHTS_FILENAME in text and f"hf download {WEIGHTS_HUB_ID} {WEIGHTS_FILENAME}" in text
    )


def test_a_training_checkpoint_gives_its_student_config_and_base(tmp_path):
    """`--weights last.ckpt` of any configuration: the config `prd fit` stored, and the base it trained on (from
    the module's `base` for checkpoints written before the student recorded it)."""
    from lightning_modules.student.weights import training_checkpoint_config

    small = StudentConfig(output_dim=16, mlp_neurons=32)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "prd": {"student_config": small.to_dict()}, "hyper_parameters": {"base": "local/sd"}}, path)
    config = training_checkpoint_config(path)
    assert (config.output_dim, config.mlp_neurons, config.base_model_name_or_path) == (16, 32, "local/sd")
    recorded = StudentConfig(output_dim=16, base_model_name_or_path="/data/tiny_sd")
    torch.save({"state_dict": {}, "prd": {"student_config": recorded.to_dict()}, "hyper_parameters": {"base": "x"}}, path)
    assert training_checkpoint_config(path).base_model_name_or_path == "/data/tiny_sd"
    torch.save({"state_dict": {}}, path)  # not a `prd fit` checkpoint
    assert training_checkpoint_config(path) is None
