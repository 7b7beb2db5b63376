"""The GP side of the BO attack: one batched BoTorch GP over the still-unbroken images, one batched
acquisition maximization. ``z`` lives in the box ``[-box, box]^d``; everything here is float64."""

from __future__ import annotations

import torch
from torch import nn


def uniform(g: torch.Generator, size: tuple[int, ...], half_width: float) -> torch.Tensor:
    """Uniform in ``[-half_width, half_width]^size`` from generator ``g`` (CPU, float64)."""
    return (2 * torch.rand(size, generator=g, dtype=torch.float64) - 1) * half_width


def window(tx: torch.Tensor, ty: torch.Tensor, points: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``points`` training points per image: the ``points // 2`` most recent ones (they keep the
    acquisition off what was just tried) and the best of the older ones (they keep the incumbent's
    neighbourhood). ``tx`` (A, n, d), ``ty`` (A, n, 1) -> (A, m, d), (A, m, 1)."""
    a, n, d = tx.shape
    if points is None or n <= points:
        return tx, ty
    recent = points // 2
    old = n - recent
    top = ty[:, :old, 0].topk(points - recent, dim=1).indices                      # (A, points - recent)
    idx = torch.cat([top, torch.arange(old, n, device=tx.device).expand(a, -1)], 1)  # (A, points)
    return tx.gather(1, idx.unsqueeze(-1).expand(-1, -1, d)), ty.gather(1, idx.unsqueeze(-1))


def fit_gp(tx: torch.Tensor, ty: torch.Tensor, state: dict[str, torch.Tensor], maxiter: int) -> nn.Module:
    """A batched ``SingleTaskGP`` (batch_shape [A]) with a Matern-5/2 ARD kernel, fitted by BoTorch.

    Priors are BoTorch 0.2's defaults (what the official code ran with): lengthscale Gamma(3, 6),
    outputscale Gamma(2, 0.15), noise Gamma(1.1, 0.05) with noise >= 1e-4. ``state`` holds the
    previous iteration's hyperparameters (warm start, as the official code's refit).
    """
    from botorch.exceptions import ModelFittingError
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Standardize
    from gpytorch.constraints import GreaterThan
    from gpytorch.kernels import MaternKernel, ScaleKernel
    from gpytorch.likelihoods import GaussianLikelihood
    from gpytorch.mlls import ExactMarginalLogLikelihood
    from gpytorch.priors import GammaPrior

    a, _, d = tx.shape
    bs = torch.Size([a])
    kernel = ScaleKernel(MaternKernel(nu=2.5, ard_num_dims=d, batch_shape=bs, lengthscale_prior=GammaPrior(3.0, 6.0)),
                         batch_shape=bs, outputscale_prior=GammaPrior(2.0, 0.15))
    lik = GaussianLikelihood(noise_prior=GammaPrior(1.1, 0.05), batch_shape=bs,
                             noise_constraint=GreaterThan(1e-4, transform=None, initial_value=2.0))
    gp = SingleTaskGP(tx, ty, likelihood=lik, covar_module=kernel,
                      outcome_transform=Standardize(1, batch_shape=bs)).to(tx)
    if state:
        gp.load_state_dict(state, strict=False)
    mll = ExactMarginalLogLikelihood(gp.likelihood, gp)
    try:
        fit_gpytorch_mll(mll, optimizer_kwargs={"options": {"maxiter": maxiter}}, max_attempts=2)
    except ModelFittingError:  # keep the current (warm-started or prior) hyperparameters
        gp.eval()
    return gp


def propose(tx: torch.Tensor, ty: torch.Tensor, state: dict[str, torch.Tensor], gens: list[torch.Generator], *,
            acquisition: str, beta: float, lower: torch.Tensor, upper: torch.Tensor, raw_samples: int,
            acq_steps: int, fit_maxiter: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fit the batched GP on ``tx`` (A, n, d), ``ty`` (A, n, 1); return the next ``z`` (A, d) and the
    fitted hyperparameters (the next warm start).

    Acquisition (maximized per image over its box ``[lower, upper]``, each (A, d)): EI (BoTorch
    ``LogExpectedImprovement``, same maximizer as EI) or UCB. ``raw_samples`` uniform points per
    image are screened in one posterior call; ``acq_steps`` Adam steps (BoTorch
    ``gen_candidates_torch``) refine the best of them.
    """
    from botorch.acquisition import LogExpectedImprovement, UpperConfidenceBound
    from botorch.generation.gen import gen_candidates_torch

    a, _, d = tx.shape
    gp = fit_gp(tx, ty, state, fit_maxiter)
    state = {k: v.detach().clone() for k, v in gp.named_parameters()}
    best_f = ty.amax(1)                                                          # (A, 1)
    unit = torch.stack([torch.rand((raw_samples, d), generator=g, dtype=torch.float64) for g in gens]).to(tx)
    raw = lower.unsqueeze(1) + (upper - lower).unsqueeze(1) * unit               # (A, R, d)
    with torch.no_grad():                                                        # screen: one posterior call
        post = gp.posterior(raw)
        mu, sd = post.mean.squeeze(-1), post.variance.clamp_min(1e-12).sqrt().squeeze(-1)  # (A, R)
    if acquisition == "ei":
        u = (mu - best_f) / sd
        normal = torch.distributions.Normal(torch.zeros_like(u), torch.ones_like(u))
        score = sd * (normal.log_prob(u).exp() + u * normal.cdf(u))             # EI, as in BoTorch
        acqf = LogExpectedImprovement(gp, best_f=best_f)
    else:
        score = mu + beta ** 0.5 * sd                                            # UCB, as in BoTorch
        acqf = UpperConfidenceBound(gp, beta=beta)
    start = raw[torch.arange(a), score.argmax(1)].unsqueeze(1)                   # (A, 1, d)
    if acq_steps == 0:
        return start.squeeze(1), state
    opts = {"stopping_criterion_options": {"maxiter": acq_steps, "n_window": 10**6}}
    z, _ = gen_candidates_torch(start, acqf, lower.unsqueeze(1), upper.unsqueeze(1), options=opts)  # Adam, per image
    return z.detach().squeeze(1), state
