"""PRDModule on tiny models (CPU): the reference PRD loop, determinism, accumulation and clipping, schedules,
non-finite step skipping, checkpoint contents / strict loading, and fine-tuning from trained weights."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from lightning_modules.student import TriplaneStudent
from lightning_modules.student.config import StudentConfig
from lightning_modules.training.checkpoints import CheckpointMismatchError, export_student_weights
from renderers.errors import UserError
from tests.prd_helpers import (  # noqa: F401  (single_thread: fixture)
    PRD_WARNING_FILTERS,
    ColorTeacher,
    fast_trainer,
    single_thread,
    tiny_data,
    tiny_module,
    trainable_copy,
)

BATCH = {"prompts": ["a red ball", "a blue cube"], "seed": 1234}

pytestmark = [*PRD_WARNING_FILTERS, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def module(tiny_sd_dir):
    torch.manual_seed(0)
    module = tiny_module(tiny_sd_dir)
    module.configure_model()
    return module


def _grads(module) -> dict[str, torch.Tensor]:
    return {
        name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for name, p in module.trainable_named_parameters().items()
    }


def _zero_grads(module) -> None:
    for p in module.trainable_parameters():
        p.grad = None


def test_prd_batch_is_the_reference_loop(module):
    """4 steps at 999/749/499/249 from pure noise; each re-noises the DETACHED previous x0 with fresh noise,
    renders with new cameras through every renderer, and backpropagates at once with weight 1 / steps."""
    student = module.student
    teacher = module.teachers.teachers["color"]
    teacher.calls.clear()
    inputs, outputs = [], []
    original = student.predict_x0

    def spy(noisy, t, text, **kw):
        inputs.append((noisy.detach().clone(), int(t), noisy.requires_grad))
        x0 = original(noisy, t, text, **kw)
        outputs.append(x0.detach().clone())
        return x0

    backwards = []

    def backward(loss, sync):
        backwards.append((float(loss.detach()), sync))
        loss.backward()

    student.predict_x0 = spy
    try:
        _zero_grads(module)
        result = module.run_prd_batch(BATCH, step=0, backward=backward)
    finally:
        del student.predict_x0
    abar = student.alphas_cumprod
    assert [t for _, t, _ in inputs] == [999, 749, 499, 249]
    assert not any(requires_grad for _, _, requires_grad in inputs)  # latent = x0.detach(), noise has no grad
    assert abs(float(inputs[0][0].std()) - 1.0) < 0.15  # step 1 starts from (almost) pure noise
    noises = []
    for k in range(1, 4):
        noisy, t, _ = inputs[k]
        a = abar[t]
        noise = (noisy - a.sqrt() * outputs[k - 1]) / (1 - a).sqrt()
        assert abs(float(noise.std()) - 1.0) < 0.2 and abs(float(noise.mean())) < 0.2
        noises.append(noise)
    # fresh noise: independent unit draws differ by about sqrt(2) in std (re-used ones by rounding only)
    for a, b in [(inputs[0][0], noises[0]), (noises[0], noises[1]), (noises[0], noises[2]), (noises[1], noises[2])]:
        assert float((a - b).std()) > 1.0

    assert len(teacher.calls) == 4  # one teacher call per step, with the renders of BOTH renderers
    for call in teacher.calls:
        assert call["renderers"] == ["mesh", "volume"]
        assert call["shapes"] == [(2, 2, 3, 24, 24), (2, 2, 3, 16, 16)]
    for a, b in zip(teacher.calls, teacher.calls[1:], strict=False):
        assert not torch.allclose(a["c2w"], b["c2w"])  # new cameras every step

    assert [sync for _, sync in backwards] == [False, False, False, True]
    assert sum(loss for loss, _ in backwards) == pytest.approx(result.total, rel=1e-5)  # weight pinned below
    assert set(result.terms) == {"color/mesh", "color/volume", "reg/volume/eikonal", "reg/volume/sparsity"}
    assert result.terms["reg/volume/eikonal"] == pytest.approx(0.5 * result.raw_regularizers["volume/eikonal"], rel=1e-5)
    assert result.nonfinite == [] and set(result.seconds) == {"student", "render", "teacher", "backward"}

    grads = _grads(module)
    norm = {family: 0.0 for family in ("unet", "conv_out", "sdf_network", "feature_network", "deformation_network")}
    for name, g in grads.items():
        for family in norm:
            if family in name:
                norm[family] += float(g.norm())
    assert all(v > 0 for v in norm.values()), norm  # the gradient reaches every trainable part
    frozen = [n for n, p in module.student.named_parameters() if not p.requires_grad and p.grad is not None]
    assert frozen == []


@pytest.mark.parametrize("num_steps, loss_scale", [(None, 1.0), (2, 0.5)])
def test_each_prd_step_backpropagates_its_loss_times_one_over_steps(module, num_steps, loss_scale):
    """Pinned without the module's own `step_weight`: the gradient arriving at every render of step k is
    the analytic gradient of ColorTeacher's loss, 2 (rgb - target) / numel, times 1 / steps (4 or 2
    PRD steps, counted by hand) times the loss scale (1 / accumulate_grad_batches in training)."""
    teacher = module.teachers.teachers["color"]
    target = torch.tensor(teacher.target).view(1, 1, 3, 1, 1)
    original = teacher.compute_losses
    seen = []  # per teacher call (= PRD step): [(rgb values, gradients arriving at rgb)] per render

    def probe(renders, prompts, step, generator):
        entries = []
        for render in renders:
            rgb, arrived = render["rgb"], []
            rgb.register_hook(lambda grad, arrived=arrived: arrived.append(grad.detach().clone()))
            entries.append((rgb.detach().clone(), arrived))
        seen.append(entries)
        return original(renders, prompts, step, generator)

    teacher.compute_losses = probe
    saved_steps, module.num_steps = module.num_steps, num_steps
    try:
        _zero_grads(module)
        module.run_prd_batch(BATCH, step=0, backward=lambda loss, sync: loss.backward(), loss_scale=loss_scale)
    finally:
        del teacher.compute_losses
        module.num_steps = saved_steps
        _zero_grads(module)
    steps = 4 if num_steps is None else 2
    assert len(seen) == steps
    for entries in seen:
        assert len(entries) == 2  # mesh and volume render
        for rgb, arrived in entries:
            assert len(arrived) == 1  # one backward per step reaches this step's renders, once
            expected = 2 * (rgb - target) / rgb.numel() * (loss_scale / steps)
            assert expected.abs().max() > 0
            torch.testing.assert_close(arrived[0], expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_no_gradient_crosses_from_a_prd_step_to_the_previous_ones(module):
    """The detach between PRD steps, asserted directly: step k's loss has a gradient w.r.t. step k's x0
    and none (not even a zero one) w.r.t. the x0 of any earlier step. Every graph is retained, so a
    missing detach shows here as a gradient, not as a "backward through the graph a second time" error."""
    student = module.student
    original = student.predict_x0
    predictions = []

    def spy(noisy, t, text, **kw):
        x0 = original(noisy, t, text, **kw)
        predictions.append(x0)
        return x0

    reached = []

    def backward(loss, sync):
        grads = torch.autograd.grad(loss, predictions, allow_unused=True, retain_graph=True)
        reached.append([g is not None and bool(g.abs().sum() > 0) for g in grads])
        loss.backward(retain_graph=True)

    student.predict_x0 = spy
    try:
        _zero_grads(module)
        module.run_prd_batch(BATCH, step=0, backward=backward)
    finally:
        del student.predict_x0
        _zero_grads(module)
    assert reached == [[False] * k + [True] for k in range(4)]


def test_prd_batch_is_determined_by_the_batch_seed(module):
    _zero_grads(module)
    first = module.run_prd_batch(BATCH, step=0, backward=lambda loss, sync: loss.backward())
    g1 = _grads(module)
    _zero_grads(module)
    torch.manual_seed(999)  # the global RNG plays no part
    again = module.run_prd_batch(BATCH, step=0, backward=lambda loss, sync: loss.backward())
    g2 = _grads(module)
    _zero_grads(module)
    other = module.run_prd_batch({**BATCH, "seed": 1235}, step=0, backward=lambda loss, sync: loss.backward())
    g3 = _grads(module)
    _zero_grads(module)
    assert first.terms == again.terms
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
    assert first.terms != other.terms
    assert any(not torch.equal(g1[k], g3[k]) for k in g1)


def test_accumulation_and_clipping_give_one_step_on_the_mean_gradient(tiny_sd_dir, tmp_path):
    """accumulate_grad_batches=2 with SGD(lr=1): one optimizer step after 2 batches, the update is minus the
    mean of the two batches' gradients; with clipping, its norm is the clip value."""
    torch.manual_seed(0)
    sgd = lambda params: torch.optim.SGD(params, lr=1.0)  # noqa: E731
    data = tiny_data()
    data.setup("fit")
    batches = list(data.train_dataloader())[:2]

    reference = tiny_module(tiny_sd_dir, optimizer=sgd)
    reference.configure_model()
    start = trainable_copy(reference)
    expected = {k: torch.zeros_like(v) for k, v in start.items()}
    for batch in batches:
        _zero_grads(reference)
        reference.run_prd_batch(batch, step=0, backward=lambda loss, sync: loss.backward())
        for k, g in _grads(reference).items():
            expected[k] += g / 2

    for clip in (None, 1e-3):
        torch.manual_seed(0)
        module = tiny_module(tiny_sd_dir, optimizer=sgd, accumulate_grad_batches=2, gradient_clip_val=clip)
        module.configure_model()
        module.load_state_dict(start)
        trainer = fast_trainer(tmp_path, max_steps=1)
        trainer.fit(module, tiny_data())
        assert trainer.global_step == 1 and trainer.fit_loop.epoch_loop.batch_progress.total.completed == 2
        update = {k: start[k] - p.detach() for k, p in module.trainable_named_parameters().items()}
        if clip is None:
            for k in update:
                torch.testing.assert_close(update[k], expected[k], rtol=1e-4, atol=1e-7)
        else:
            norm = torch.linalg.vector_norm(torch.stack([u.norm() for u in update.values()]))
            assert float(norm) == pytest.approx(clip, rel=1e-3)
            full = torch.linalg.vector_norm(torch.stack([e.norm() for e in expected.values()]))
            cosine = sum(float((update[k] * expected[k]).sum()) for k in update) / (float(norm) * float(full))
            assert cosine == pytest.approx(1.0, abs=1e-4)


def test_schedules_follow_the_global_step(tiny_sd_dir, tmp_path):
    torch.manual_seed(0)
    teacher = ColorTeacher(weight=[0, 1.0, 3.0, 2])
    module = tiny_module(
        tiny_sd_dir,
        teachers={"color": teacher},
        renderer_schedules={"volume.rgb_grad_shrink": [0, 1.0, 0.0, 4], "mesh.sdf_grad_shrink": [0.5, 0.1, 2]},
        accumulate_grad_batches=2,
    )
    seen = []
    original = module.apply_schedules

    def record(step):
        original(step)
        seen.append((step, module.renderers["volume"].rgb_grad_shrink, module.renderers["mesh"].sdf_grad_shrink))

    module.apply_schedules = record
    trainer = fast_trainer(tmp_path, max_steps=3)
    trainer.fit(module, tiny_data(prompts=["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"]))
    # 2 batches per optimizer step: schedules advance with the optimizer step, not the batch
    assert [s for s, _, _ in seen] == [0, 0, 1, 1, 2, 2]
    assert [v for _, v, _ in seen] == pytest.approx([1.0, 1.0, 0.75, 0.75, 0.5, 0.5])
    assert [v for _, _, v in seen] == pytest.approx([0.5, 0.5, 0.3, 0.3, 0.1, 0.1])
    assert [call["step"] for call in teacher.calls] == [0] * 8 + [1] * 8 + [2] * 8
    assert module.teachers.last_weights == {"color": 3.0}


def _fit_with_teacher(tiny_sd_dir, tmp_path, teacher, max_steps, **overrides):
    torch.manual_seed(0)
    module = tiny_module(tiny_sd_dir, teachers={"color": teacher}, **overrides)
    snapshots = []

    class Snapshot(__import__("lightning").pytorch.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append((trainer.global_step, trainable_copy(pl_module)))

    trainer = fast_trainer(tmp_path, max_steps=max_steps, callbacks=[Snapshot()])
    module.configure_model()
    initial = trainable_copy(module)
    trainer.fit(module, tiny_data())
    return module, trainer, initial, snapshots


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["nan_at_calls", "inf_at_calls", "nan_grad_at_calls"])
def test_nonfinite_loss_or_gradient_skips_the_step_and_training_continues(tiny_sd_dir, tmp_path, kind, caplog):
    # calls 5-8 are the 2nd batch; a non-finite value at its 3rd PRD step
    teacher = ColorTeacher(**{kind: [7]})
    with caplog.at_level(logging.WARNING, logger="lightning_modules.training.optimization"):
        module, trainer, initial, snapshots = _fit_with_teacher(tiny_sd_dir, tmp_path, teacher, max_steps=2)
    assert module.nonfinite_skips == 1
    assert [step for step, _ in snapshots] == [1, 1, 2]  # batch 2 did not step; training went on
    assert _same(snapshots[0][1], snapshots[1][1])  # the skipped step left the weights untouched
    assert not _same(initial, snapshots[0][1]) and not _same(snapshots[1][1], snapshots[2][1])
    assert all(torch.isfinite(p).all() for p in module.trainable_parameters())
    assert all(p.grad is None for p in module.trainable_parameters())
    assert trainer.callback_metrics["train/nonfinite_skips"] == 1.0
    reason = "gradient" if kind == "nan_grad_at_calls" else "color/"
    assert any("non-finite" in r.message and reason in r.message and "skipped" in r.message for r in caplog.records)


def test_nonfinite_batch_drops_its_whole_accumulation_window(tiny_sd_dir, tmp_path):
    teacher = ColorTeacher(nan_at_calls=[7])  # in batch 2 = the 2nd batch of window 1
    module, trainer, initial, snapshots = _fit_with_teacher(
        tiny_sd_dir, tmp_path, teacher, max_steps=1, accumulate_grad_batches=2
    )
    assert [step for step, _ in snapshots] == [0, 0, 0, 1]
    assert _same(initial, snapshots[1][1])  # window 1 (batches 1 and 2) dropped entirely
    assert module.nonfinite_skips == 1 and not _same(snapshots[2][1], snapshots[3][1])  # window 2 stepped


def test_training_stops_with_an_error_when_every_step_is_nonfinite(tiny_sd_dir, tmp_path):
    teacher = ColorTeacher(nan_at_calls=list(range(1, 100)))
    with pytest.raises(RuntimeError, match="2 optimizer steps in a row .* diverged"):
        _fit_with_teacher(tiny_sd_dir, tmp_path, teacher, max_steps=5, max_consecutive_skips=2)


def test_checkpoint_holds_only_trainable_state_and_loads_back_identically(tiny_sd_dir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    module = tiny_module(tiny_sd_dir)
    trainer = fast_trainer(
        tmp_path,
        max_steps=2,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=0, save_last=True)],
    )
    trainer.fit(module, tiny_data(prompts=["a", "b", "c", "d", "e", "f"]))
    path = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # plain data only

    trainable = module.trainable_named_parameters()
    assert set(checkpoint["state_dict"]) == set(trainable)
    assert all(k.startswith("student.") for k in checkpoint["state_dict"])
    trainable_numel = sum(p.numel() for p in trainable.values())
    total_numel = sum(p.numel() for p in module.parameters())
    assert trainable_numel < 0.2 * total_numel
    optimizer_numel = sum(
        v.numel() for state in checkpoint["optimizer_states"][0]["state"].values() for v in state.values() if torch.is_tensor(v) and v.ndim
    )
    assert optimizer_numel <= 4 * trainable_numel  # Adan: 4 moment buffers at most, only for the trainable
    num_tensors = len(checkpoint["state_dict"]) * 5
    assert path.stat().st_size < 4 * trainable_numel * 5 + 2_000 * num_tensors + 100_000  # weights + Adan + pickling
    assert path.stat().st_size < 4 * total_numel  # far below what the frozen base alone would take
    assert checkpoint["PromptDataModule"]["batches_consumed"] == 2  # data position saved
    assert checkpoint["prd"]["window_batches"] == 0 and checkpoint["prd"]["nonfinite_skips"] == 0
    assert StudentConfig.from_dict(checkpoint["prd"]["student_config"]).output_dim == 8

    torch.manual_seed(123)  # a different random init of the MLPs
    fresh = tiny_module(tiny_sd_dir)
    fresh.configure_model()
    assert not _same(trainable_copy(fresh), trainable_copy(module))
    fresh.load_state_dict(checkpoint["state_dict"])
    assert _same(trainable_copy(fresh), trainable_copy(module))
    points = torch.rand(1, 64, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        a, _ = module.generate(["a red ball"], [0])
        b, _ = fresh.generate(["a red ball"], [0])
    torch.testing.assert_close(a.sdf(points), b.sdf(points), rtol=0, atol=0)

    broken = dict(checkpoint["state_dict"])
    broken.pop(next(iter(broken)))
    with pytest.raises(CheckpointMismatchError, match="1 trainable weight.* missing"):
        fresh.load_state_dict(broken)
    reshaped = dict(checkpoint["state_dict"])
    key = next(k for k in reshaped if "sdf_network" in k)
    reshaped[key] = torch.zeros(3, 3)
    with pytest.raises(CheckpointMismatchError, match="wrong shape"):
        fresh.load_state_dict(reshaped)
    with pytest.raises(CheckpointMismatchError, match="unknown key"):
        fresh.load_state_dict({**checkpoint["state_dict"], "student.not_a_weight": torch.zeros(1)})
    fresh.load_state_dict({**checkpoint["state_dict"], "student.unet.conv_in.weight": torch.zeros(1)}, strict=True)
    assert float(fresh.student.unet.conv_in.weight.abs().sum()) > 0  # frozen base keys are ignored

    # the student weights of a training checkpoint export without building anything
    exported = export_student_weights(path, tmp_path / "export")
    student = TriplaneStudent.from_pretrained(tiny_sd_dir, weights=exported)
    for name, value in student.trainable_state_dict().items():
        torch.testing.assert_close(value, module.student.trainable_state_dict()[name], rtol=0, atol=0)


def test_mid_window_checkpoint_keeps_the_accumulated_gradient(tiny_sd_dir, tmp_path):
    torch.manual_seed(0)
    module = tiny_module(tiny_sd_dir, accumulate_grad_batches=2)
    module.configure_model()
    module._window_batches = 1
    for p in module.trainable_parameters():
        p.grad = torch.full_like(p, 0.5)
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["prd"]["window_batches"] == 1
    assert set(checkpoint["prd"]["window_grads"]) == set(module.trainable_named_parameters())
    fresh = tiny_module(tiny_sd_dir, accumulate_grad_batches=2)
    fresh.configure_model()
    fresh.on_load_checkpoint(checkpoint)
    fresh.on_train_start()
    assert fresh._window_batches == 1
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in fresh.trainable_parameters())


def test_init_weights_fine_tunes_the_released_checkpoint(fixtures_dir, tmp_path):
    fixture = fixtures_dir / "triplaneturbo_ref_A"
    released = TriplaneStudent.from_pretrained(fixture / "base", weights=fixture / "triplane_turbo.pth")
    module = tiny_module(fixture / "base", student_config=None, init_weights=str(fixture / "triplane_turbo.pth"))
    module.configure_model()  # student_config None: the config.json beside the weights
    own = module.student.trainable_state_dict()
    assert set(own) == set(released.trainable_state_dict())
    for name, value in released.trainable_state_dict().items():
        torch.testing.assert_close(own[name], value, rtol=0, atol=0)
    assert any(float(v.detach().abs().sum()) > 0 for k, v in own.items() if "lora_B" in k or "_up" in k)  # trained, not fresh

    module.save_student(tmp_path / "own")
    again = tiny_module(fixture / "base", student_config=None, init_weights=str(tmp_path / "own"))
    again.configure_model()
    for name, value in again.student.trainable_state_dict().items():
        torch.testing.assert_close(value, own[name], rtol=0, atol=0)


def test_configuration_errors_are_one_line(tiny_sd_dir):
    from renderers import TextConditionedBackground

    with pytest.raises(ValueError, match="student_config: unknown key.*mlp_width"):
        tiny_module(tiny_sd_dir, student_config={"mlp_width": 3})
    with pytest.raises(ValueError, match="render_resolution must give a size for every renderer.*missing: \\['volume'\\]"):
        tiny_module(tiny_sd_dir, render_resolution={"mesh": 24})
    with pytest.raises(ValueError, match="renderer_schedules: renderer 'mesh' .* no attribute 'rgb_grad_shrink'"):
        tiny_module(tiny_sd_dir, renderer_schedules={"mesh.rgb_grad_shrink": 0.5})
    module = tiny_module(tiny_sd_dir, background=TextConditionedBackground(text_dim=1024))
    with pytest.raises(UserError, match="background text_dim 1024 does not match .* width 32"):
        module.configure_model()
    typo = tiny_module(tiny_sd_dir, regularizers={"eikonall": 1.0})
    with pytest.raises(ValueError, match="regularizer 'eikonall' is returned by no renderer .*volume/eikonal"):
        typo.run_prd_batch(BATCH, step=0)
    assert "\n" not in str(pytest.raises(ValueError, tiny_module, tiny_sd_dir, student_config={"ranks": "x"}).value)


def test_flat_and_reference_student_configs(tiny_sd_dir):
    from lightning_modules.training.settings import resolve_student_config

    flat = resolve_student_config({"ranks": {"self_attn": 3, "cross_attn": 2, "locon": 1}, "latent_size": 12, "output_dim": 6})
    assert (flat.ranks.self_attn, flat.ranks.cross_attn, flat.ranks.locon) == (3, 2, 1)
    assert (flat.latent_height, flat.latent_width, flat.output_dim) == (12, 12, 6)
    reference = resolve_student_config(flat.to_dict())
    assert reference == flat
    assert resolve_student_config(None) is None


def test_learned_background_trains_and_is_checkpointed(tiny_sd_dir):
    from renderers import TextConditionedBackground

    torch.manual_seed(0)
    module = tiny_module(tiny_sd_dir, background=TextConditionedBackground(text_dim=32, hidden_dim=8))
    module.configure_model()
    assert module.renderers["mesh"].background is module.background is module.renderers["volume"].background
    names = list(module.trainable_named_parameters())
    assert [n for n in names if "hypernetwork" in n] == [
        "background.hypernetwork.0.weight",
        "background.hypernetwork.0.bias",
        "background.hypernetwork.2.weight",
        "background.hypernetwork.2.bias",
    ]
    assert set(module.state_dict()) == set(names)
    assert not module.background.default_embedding.requires_grad  # the no-text fallback: PRD always has text
    module.run_prd_batch(BATCH, step=0, backward=lambda loss, sync: loss.backward())
    assert float(module.background.hypernetwork[2].weight.grad.abs().sum()) > 0
    # plain DDP (find_unused_parameters=False) needs a gradient for every trainable parameter at every step
    assert [name for name, p in module.trainable_named_parameters().items() if p.grad is None] == []
    assert math.isfinite(float(module.background.hypernetwork[0].weight.grad.norm()))


def test_validation_logs_clip_score_of_the_evaluation_renders(tiny_sd_dir, tmp_path):
    from lightning_modules.evaluation.clip_score import CLIPScore3D, load_open_clip
    from renderers.cameras import evaluation_cameras
    from tests.tiny_clip import make_tiny_clip

    model, tokenizer = load_open_clip(f"local-dir:{make_tiny_clip(tmp_path / 'clip')}")
    torch.manual_seed(0)
    module = tiny_module(tiny_sd_dir, clip_score=CLIPScore3D(model=model, tokenizer=tokenizer))
    prompts = ["a red ball", "a blue cube", "a green cone"]
    data = tiny_data(val=prompts)
    data.eval_batch_size = 2
    trainer = fast_trainer(tmp_path, max_steps=1, limit_val_batches=None)
    trainer.validate(module, data)
    metrics = trainer.callback_metrics
    assert {"val/color/mesh", "val/color/volume", "val/teacher_loss"} <= set(metrics)

    expected = CLIPScore3D(model=model, tokenizer=tokenizer)
    module.eval()
    with torch.no_grad():
        field, text = module.generate(prompts, range(3))
        cameras = evaluation_cameras(2, batch_size=3, height=24, width=24)
        rgb = module.render_all(field, cameras, text, names=["mesh"], size=24)["mesh"]["rgb"]
    assert torch.allclose(rgb[:, :, :, 0, 0], torch.ones(()))  # evaluation background: white
    expected.update(rgb, prompts)
    values = expected.compute()
    assert float(metrics["val/clip_score"]) == pytest.approx(float(values["clip_score"]), rel=1e-5)
    assert float(metrics["val/clip_recall_at_1"]) == pytest.approx(float(values["recall_at_1"]), rel=1e-5)
    assert module.clip_score.update_count == 0  # reset for the next validation


def test_init_seed_fixes_the_students_starting_weights_whatever_the_global_seed(tiny_sd_dir):
    from tests.prd_helpers import trainable_copy

    def starting_weights(global_seed: int, init_seed: int | None) -> dict[str, torch.Tensor]:
        torch.manual_seed(global_seed)
        module = tiny_module(tiny_sd_dir, init_seed=init_seed)
        module.configure_model()
        after = torch.rand(3)  # the global RNG goes on as if the student had not been built when init_seed is set
        return trainable_copy(module), after

    (a, draw_a), (b, _) = starting_weights(1, init_seed=7), starting_weights(2, init_seed=7)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(1)
    assert torch.equal(draw_a, torch.rand(3))
    (c, _), (d, _) = starting_weights(1, init_seed=None), starting_weights(2, init_seed=None)
    assert any(not torch.equal(c[k], d[k]) for k in c)  # without it the global seed decides
    (e, _) = starting_weights(1, init_seed=8)
    assert any(not torch.equal(a[k], e[k]) for k in a)
