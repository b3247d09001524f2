"""TriplaneStudent on a second tiny configuration (other widths, depths, ranks, output_dim and MLP sizes).

Nothing here depends on the fixture's sizes: the base is built by tests/tiny_sd.py, the adapter weights are
random, and they travel through our own official-layout writer and the own safetensors format.
"""

from __future__ import annotations

import pytest
import torch

from lightning_modules.student import TriplaneStudent
from lightning_modules.student.adapters import AdapterRanks, HexaPlaneSelfAttnProcessor
from lightning_modules.student.config import StudentConfig
from lightning_modules.student.weights import official_module_order
from renderers.types import Field
from tests.threads import single_thread  # noqa: F401  (fixture)
from tests.tiny_sd import make_tiny_sd

PROMPTS = ["a wooden chair", "a small red car"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_tiny_sd(
        tmp_path_factory.mktemp("tiny_sd_b"),
        seed=7,
        unet=dict(
            block_out_channels=(16, 24, 32),
            layers_per_block=2,
            heads=(2, 4, 4),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        ),
        vae=dict(block_out_channels=(8, 16, 16), layers_per_block=2),
        text_encoder=dict(hidden_size=48, layers=2, heads=4),
    )


@pytest.fixture(scope="module")
def config(base_dir):
    return StudentConfig(
        base_model_name_or_path=str(base_dir),
        ranks=AdapterRanks(self_attn=3, cross_attn=5, locon=2),
        output_dim=6,
        mlp_neurons=12,
        mlp_hidden_layers=3,
        latent_height=8,
        latent_width=8,
    )


def _randomize_trainable(student: TriplaneStudent, seed: int) -> None:
    """Non-zero values for every trainable tensor (fresh up-projections are zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(student.trainable_state_dict().items()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 / max(1, p[0].numel()) ** 0.5)


@pytest.fixture(scope="module")
def student(base_dir, config):
    student = TriplaneStudent.from_pretrained(base_dir, config=config)
    _randomize_trainable(student, seed=11)
    return student


@pytest.fixture(scope="module")
def inputs(student):
    emb = student.encode_prompt(PROMPTS)
    noise = student.make_noise(len(PROMPTS), seed=5)
    points = torch.rand(len(PROMPTS), 300, 3, generator=torch.Generator().manual_seed(3)) * 2 - 1
    return emb, noise, points


def _outputs(student, inputs):
    emb, noise, points = inputs
    field, trace = student.sample(emb, noise=noise, return_intermediates=True)
    return dict(
        latents=trace.latents,
        planes=field.planes,
        sdf=field.sdf(points),
        deformation=field.deformation(points),
        color=field.color(points),
    )


def test_shapes_follow_the_configs(student, inputs, base_dir):
    emb, noise, points = inputs
    assert emb.shape == (2, 77, 48)
    assert noise.shape == (2, 6, 4, 8, 8)
    field = student.sample(emb, noise=noise)
    assert isinstance(field, Field)
    # 3 VAE blocks upsample x4; output_dim 6 -> 3 channels per plane
    assert field.triplane_raw.shape == (2, 6, 6, 32, 32)
    assert field.planes.shape == (2, 6, 3, 32, 32)
    assert field.sdf(points).shape == (2, 300)
    assert field.deformation(points).shape == (2, 300, 3)
    rgb = field.color(points)
    assert rgb.shape == (2, 300, 3) and rgb.min() >= -0.001 and rgb.max() <= 1.001


def test_adapters_sit_on_every_resnet_and_sampler_conv(student):
    """Independent of the name patterns: count the convs by diffusers class."""
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
    from peft.tuners.lora import LoraLayer

    for root in (student.unet, student.vae.decoder):
        expected = set()
        for name, m in root.named_modules():
            if isinstance(m, ResnetBlock2D):
                expected |= {f"{name}.conv1", f"{name}.conv2"}
                if m.conv_shortcut is not None:
                    expected.add(f"{name}.conv_shortcut")
            elif isinstance(m, (Downsample2D, Upsample2D)) and m.conv is not None:
                expected.add(f"{name}.conv")
        wrapped = {
            name
            for name, m in root.named_modules()
            if isinstance(m, LoraLayer) and "Conv" in type(m).__name__
        }
        assert wrapped == expected
    hexa = [m for m in student.unet.modules() if isinstance(m, HexaPlaneSelfAttnProcessor)]
    n_transformer_blocks = sum(1 for n, _ in student.unet.named_modules() if n.endswith("attn1"))
    assert len(hexa) == n_transformer_blocks == 2 * 2 + 3 * 2 + 1  # 2 down, 2 up blocks with attention + mid
    assert all(h.rank == 3 for h in hexa)
    order = official_module_order(student)
    assert [e.kind for e in order].count("hexa") == len(hexa)
    assert order[-1].path == "vae.decoder.conv_out"


def test_every_lora_layer_is_w_plus_b_a_at_scale_one_whatever_its_rank(student):
    """Ranks 3 / 5 / 2 (self-attention incl. VAE attention / cross-attention / LoCon): each module is wrapped
    with one default rank, the others differ from it (peft rank_pattern / alpha_pattern). The reference
    uses alpha = rank everywhere, so every layer must compute W x + B A x: checked against the layer's own
    weights combined by hand (Linear: x A^T B^T; Conv2d: k x k down conv with the base conv's stride and
    padding, then the 1 x 1 up conv), for every layer, whatever its rank."""
    import torch.nn.functional as F
    from peft.tuners.lora import LoraLayer

    from lightning_modules.student.adapters import ADAPTER_NAME

    g = torch.Generator().manual_seed(0)
    for root, attention_rank in ((student.unet, 5), (student.vae.decoder, 3)):
        ranks = set()
        for name, layer in root.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            assert not layer.merged, name
            base, down, up = layer.base_layer, layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]
            rank = down.weight.shape[0]
            is_attention = any(name.endswith(p) for p in (".to_q", ".to_k", ".to_v", ".to_out.0"))
            assert rank == (attention_rank if is_attention else 2), name
            ranks.add(rank)
            assert up.weight.abs().max() > 0, name  # randomised: the LoRA term is not zero
            with torch.no_grad():
                if isinstance(base, torch.nn.Linear):
                    x = torch.randn(3, base.in_features, generator=g)
                    plain = F.linear(x, base.weight, base.bias)
                    lora = x @ down.weight.T @ up.weight.T
                else:
                    x = torch.randn(2, base.in_channels, 6, 6, generator=g)
                    conv = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
                    plain = F.conv2d(x, base.weight, base.bias, **conv)
                    lora = F.conv2d(F.conv2d(x, down.weight, **conv), up.weight)
                got = layer(x)
            scale = float((plain + lora).abs().max())
            assert lora.abs().max() > 1e-2 * scale, name  # a wrong LoRA scale would show far above the tolerance
            torch.testing.assert_close(got, plain + lora, rtol=1e-5, atol=1e-6 * scale, msg=name)
        assert ranks == {attention_rank, 2}  # mixed ranks in both modules: the pattern case is exercised


def test_official_layout_round_trip(student, inputs, base_dir, tmp_path):
    path = tmp_path / "ckpt" / "triplane_turbo.pth"
    path.parent.mkdir()
    student.save_official(path)
    student.config.to_json(path.parent / "config.json")
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["epoch", "global_step", "pytorch-lightning_version", "state_dict"]
    assert all(k.startswith("geometry.") and v.dtype == torch.float32 for k, v in raw["state_dict"].items())

    loaded = TriplaneStudent.from_pretrained(base_dir, weights=path)
    assert loaded.config == student.config
    expected, got = _outputs(student, inputs), _outputs(loaded, inputs)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_own_format_round_trip_and_base_from_config(student, inputs, tmp_path):
    directory = student.save_pretrained(tmp_path / "own")
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    loaded = TriplaneStudent.from_pretrained(weights=directory)  # base from config.json
    expected, got = _outputs(student, inputs), _outputs(loaded, inputs)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_adapters_change_the_output(student, base_dir, config, inputs):
    fresh = TriplaneStudent.from_pretrained(base_dir, config=config)
    assert (_outputs(fresh, inputs)["latents"] - _outputs(student, inputs)["latents"]).abs().max() > 1e-2


def test_objects_are_independent_and_embeddings_interleaved(student, inputs):
    """Object b in a batch of 2 equals object b sampled alone: planes attend only within their object,
    and all 6 planes of object b see prompt b."""
    emb, noise, points = inputs
    both = student.sample(emb, noise=noise)
    for b in range(2):
        alone = student.sample(emb[b : b + 1], noise=noise[b : b + 1])
        torch.testing.assert_close(alone.planes[0], both.planes[b], atol=1e-5, rtol=1e-5)
    swapped = student.sample(emb.flip(0), noise=noise)
    assert (swapped.planes - both.planes).abs().max() > 1e-3


def test_self_attention_is_joint_over_the_six_planes(student, inputs):
    emb, noise, _ = inputs
    changed = noise.clone()
    changed[:, 5] = torch.randn_like(changed[:, 5])
    with torch.no_grad():
        eps, eps_changed = student.predict_eps(noise, 999, emb), student.predict_eps(changed, 999, emb)
        assert (eps[:, 0] - eps_changed[:, 0]).abs().max() > 1e-4  # plane 0 sees plane 5
        with student.adapters_disabled():  # the base UNet treats planes as separate images
            eps, eps_changed = student.predict_eps(noise, 999, emb), student.predict_eps(changed, 999, emb)
        torch.testing.assert_close(eps[:, :5], eps_changed[:, :5], rtol=0, atol=1e-6)


def test_seeded_noise(student, inputs):
    emb = inputs[0]
    a = student.sample(emb, seed=3).planes
    b = student.sample(emb, generator=torch.Generator().manual_seed(3)).planes
    c = student.sample(emb, seed=4).planes
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3


def test_training_interface_gradients_reach_only_the_trainable_parts(student, inputs):
    emb, noise, points = inputs
    timesteps = student.sampling_timesteps(4)
    assert timesteps.tolist() == [999, 749, 499, 249]
    assert type(student.noise_scheduler).__name__ == "DDPMScheduler"

    names = set(student.trainable_state_dict())
    assert all(p.requires_grad == (n in names) for n, p in student.named_parameters())
    assert names and all(
        n.startswith(("sdf_network.", "feature_network.", "deformation_network.", "vae.decoder.conv_out."))
        or ".lora_A." in n
        or ".lora_B." in n
        or ".processor." in n
        for n in names
    )

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        student.zero_grad(set_to_none=True)
        student.enable_gradient_checkpointing(checkpointing)
        student.train()
        try:
            clean = noise.flip(1)  # any fixed latents
            noisy = student.add_noise(clean, noise, timesteps[[1, 2]])
            x0 = student.predict_x0(noisy, timesteps[[1, 2]], emb)
            field = student.decode(x0)
            loss = (
                field.sdf(points).square().mean()
                + field.color(points).mean()
                + field.deformation(points).mean()
            )
            loss.backward()
        finally:
            student.enable_gradient_checkpointing(False)
            student.eval()
        return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    plain = grads(False)
    assert set(plain) == names  # every trainable tensor gets a gradient, no frozen one does
    assert all(g.abs().sum() > 0 for g in plain.values())
    checkpointed = grads(True)
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)
    student.zero_grad(set_to_none=True)


def test_trainable_state_dict_round_trip(student, base_dir, config, inputs):
    other = TriplaneStudent.from_pretrained(base_dir, config=config, load_text_encoder=False)
    state = {k: v.detach().clone() for k, v in student.trainable_state_dict().items()}
    other.load_trainable_state_dict(state)
    emb, noise, points = inputs
    torch.testing.assert_close(
        other.sample(emb, noise=noise).sdf(points), student.sample(emb, noise=noise).sdf(points)
    )
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="missing"):
        other.load_trainable_state_dict(state)


def test_bad_inputs(student, inputs):
    emb, noise, _ = inputs
    with pytest.raises(ValueError, match="empty prompt"):
        student.encode_prompt(["a chair", "  "])
    with pytest.raises(ValueError, match="no prompt"):
        student.encode_prompt([])
    with pytest.raises(ValueError, match=r"noise must be \[B, 6, 4, h, w\]"):
        student.sample(emb, noise=noise.flatten(0, 1))
    with pytest.raises(ValueError, match="objects"):
        student.sample(emb[:1], noise=noise)


def test_checkpoint_of_a_module_holding_the_student(student, base_dir, config, inputs, tmp_path):
    """A Lightning-style checkpoint: full state dict (frozen base included) under a `student.` prefix."""
    holder = torch.nn.Module()
    holder.student = student
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "state_dict": holder.state_dict()}, path)
    loaded = TriplaneStudent.from_pretrained(base_dir, weights=path, config=config)
    emb, noise, points = inputs
    torch.testing.assert_close(
        loaded.sample(emb, noise=noise).sdf(points), student.sample(emb, noise=noise).sdf(points)
    )
