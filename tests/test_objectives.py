"""Each objective's gradient equals its formula on an analytic toy denoiser.

The expected gradients are written out here independently of teachers/objectives.py, from the
timesteps and noise the objective reports, and compared with autograd's d loss / d x.
"""

import pytest
import torch

from teachers.objectives import ScoreDistillation


def toy_alphas_cumprod(num_timesteps: int = 1000) -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).float()


class ToyDenoiser:
    """eps(x_t, t, cond) = tanh(x_t (1 + t / 1000)) + 0.3 cond_mean + 0.1 x_t^2 (analytic, nonlinear)."""

    def __init__(self):
        self.calls = []

    def __call__(self, x_t, t, cond):
        self.calls.append((x_t.shape[0], t.clone(), cond.clone()))
        return eps_formula(x_t, t, cond)


def eps_formula(x_t, t, cond):
    scale = (1 + t.float() / 1000).view(-1, 1, 1, 1)
    return torch.tanh(x_t * scale) + 0.3 * cond.mean(dim=(1, 2)).view(-1, 1, 1, 1) + 0.1 * x_t**2


def expected_grad(
    x, cond, uncond, abar, t, t_plus, noise, objective, weighting, g, dmd_eps=0.1, csd_scale=1.0
):
    a = abar[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
    x_t = a * x + s * noise
    eps_c = eps_formula(x_t, t, cond)
    eps_u = eps_formula(x_t, t, uncond)
    eps_cfg = eps_u + g * (eps_c - eps_u)
    if objective == "sds":
        first, second = eps_cfg, noise
    elif objective == "asd":
        if t_plus is None:
            second = eps_c
        else:
            ap = abar[t_plus].sqrt().view(-1, 1, 1, 1)
            sp = (1 - abar[t_plus]).sqrt().view(-1, 1, 1, 1)
            second = eps_formula(ap * x + sp * noise, t_plus, cond)
        first = eps_cfg
    else:
        first, second = eps_u + csd_scale * (eps_c - eps_u), eps_u
    if weighting == "uniform":
        return first - second
    if weighting == "sds":
        return (1 - abar[t]).view(-1, 1, 1, 1) * (first - second)
    x0_first = (x - s * first) / a
    x0_second = (x - s * second) / a
    x0_cfg = (x - s * eps_cfg) / a
    w = (x - x0_cfg).abs().mean(dim=(1, 2, 3), keepdim=True)
    return (x0_second - x0_first) / (w + dmd_eps)


def make_inputs(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 6, 6, generator=g).requires_grad_(True)
    cond = torch.randn(n, 5, 7, generator=g)
    uncond = torch.randn(n, 5, 7, generator=g)
    return x, cond, uncond


@pytest.mark.parametrize("objective, plus_ratio", [("sds", 0.0), ("asd", 0.0), ("asd", 0.1), ("csd", 0.0)])
@pytest.mark.parametrize("weighting", ["dmd", "sds", "uniform"])
def test_gradient_equals_formula(objective, weighting, plus_ratio):
    x, cond, uncond = make_inputs()
    abar = toy_alphas_cumprod()
    sd = ScoreDistillation(
        objective=objective,
        weighting=weighting,
        cfg_scale=[0, 20.0, 10.0, 100],
        t_min=0.3,
        t_max=0.9,
        plus_ratio=plus_ratio,
        csd_scale=1.7,
    )
    out = sd(
        x,
        ToyDenoiser(),
        cond,
        uncond,
        abar,
        step=50,
        generator=torch.Generator().manual_seed(1),
        group_size=4,
    )
    out.loss.sum().backward()
    assert (out.timesteps_plus is not None) == (objective == "asd" and plus_ratio > 0)
    expected = expected_grad(
        x.detach(),
        cond,
        uncond,
        abar,
        out.timesteps,
        out.timesteps_plus,
        out.noise,
        objective,
        weighting,
        g=15.0,
        csd_scale=1.7,
    )
    assert expected.abs().max() > 1e-3  # non-vacuous
    torch.testing.assert_close(x.grad, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.grad, expected, atol=1e-5, rtol=1e-5)
    # loss = 0.5 ||x - stopgrad(x - grad)||^2 per image
    torch.testing.assert_close(out.loss, 0.5 * expected.square().flatten(1).sum(1), atol=1e-4, rtol=1e-5)


def test_asd_without_second_timestep_is_a_classifier_score():
    x, cond, uncond = make_inputs()
    abar = toy_alphas_cumprod()
    sd = ScoreDistillation("asd", "uniform", cfg_scale=7.5)
    out = sd(x, ToyDenoiser(), cond, uncond, abar, step=0, generator=torch.Generator().manual_seed(3))
    a = abar[out.timesteps].sqrt().view(-1, 1, 1, 1)
    s = (1 - abar[out.timesteps]).sqrt().view(-1, 1, 1, 1)
    x_t = a * x.detach() + s * out.noise
    classifier = eps_formula(x_t, out.timesteps, cond) - eps_formula(x_t, out.timesteps, uncond)
    torch.testing.assert_close(out.grad, 6.5 * classifier, atol=1e-5, rtol=1e-5)


def test_one_batched_cfg_call_in_block_order():
    x, cond, uncond = make_inputs(n=4)
    denoiser = ToyDenoiser()
    sd = ScoreDistillation("asd", "dmd", plus_ratio=0.5, plus_random=False, t_min=0.5)
    out = sd(
        x, denoiser, cond, uncond, toy_alphas_cumprod(), step=0, generator=torch.Generator().manual_seed(0)
    )
    assert len(denoiser.calls) == 1
    rows, t, c = denoiser.calls[0]
    assert rows == 12
    torch.testing.assert_close(c, torch.cat([cond, uncond, cond]))
    torch.testing.assert_close(t, torch.cat([out.timesteps, out.timesteps, out.timesteps_plus]))
    denoiser = ToyDenoiser()
    ScoreDistillation("sds")(x, denoiser, cond, uncond, toy_alphas_cumprod(), step=0)
    assert denoiser.calls[0][0] == 8


def test_timesteps_range_groups_and_second_timestep():
    sd = ScoreDistillation("asd", t_min=[0, 0.5, 0.02, 20000], t_max=0.98, plus_ratio=0.1, plus_random=False)
    assert sd.timestep_range(0, 1000) == (500, 980)
    assert sd.timestep_range(20000, 1000) == (20, 980)
    t, t_plus = sd.sample_timesteps(64, 4, 0, 1000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert t.shape == (256,) and ((t >= 500) & (t < 980)).all()
    groups = t.view(64, 4)
    assert (groups == groups[:, :1]).all() and groups[:, 0].unique().numel() > 10
    # t+ = t + floor(min(0.1 (t - t_min), 999 - t)), clamped to [1, 999]
    expected = (t + torch.minimum(0.1 * (t - 500).float(), (999 - t).float()).long()).clamp(1, 999)
    torch.testing.assert_close(t_plus, expected)
    random_sd = ScoreDistillation("asd", t_min=0.5, plus_ratio=0.1)
    t, t_plus = random_sd.sample_timesteps(
        256, 1, 0, 1000, torch.Generator().manual_seed(0), torch.device("cpu")
    )
    assert ((t_plus >= t) & (t_plus <= t + 0.1 * (t - 500))).all() and (t_plus > t).any()


def test_non_finite_gradients_are_zeroed():
    x, cond, uncond = make_inputs(n=4)

    def broken(x_t, t, c):
        eps = eps_formula(x_t, t, c)
        eps[0] = float("nan")
        eps[1, 0, 0, 0] = float("inf")
        return eps

    out = ScoreDistillation("asd", "dmd")(x, broken, cond, uncond, toy_alphas_cumprod(), step=0)
    out.loss.sum().backward()
    assert torch.isfinite(out.loss).all() and torch.isfinite(x.grad).all()
    assert (x.grad[0] == 0).all() and (x.grad[2].abs() > 0).any()


def test_grad_clip_and_fp16_latent():
    x, cond, uncond = make_inputs(n=4)
    out = ScoreDistillation("sds", "uniform", grad_clip=0.05)(
        x, ToyDenoiser(), cond, uncond, toy_alphas_cumprod(), 0
    )
    assert out.grad.abs().max() <= 0.05 + 1e-7 and out.grad.abs().max() > 0.04
    half = x.detach().half().requires_grad_(True)
    out = ScoreDistillation("asd")(half, ToyDenoiser(), cond, uncond, toy_alphas_cumprod(), 0)
    assert out.loss.dtype == torch.float32
    out.loss.sum().backward()
    assert half.grad.dtype == torch.float16 and torch.isfinite(half.grad).all()


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="objective"):
        ScoreDistillation("vsd")
    with pytest.raises(ValueError, match="weighting"):
        ScoreDistillation("asd", weighting="fantasia")
    x, cond, uncond = make_inputs(n=6)
    with pytest.raises(ValueError, match="groups of 4"):
        ScoreDistillation()(x, ToyDenoiser(), cond, uncond, toy_alphas_cumprod(), 0, group_size=4)
