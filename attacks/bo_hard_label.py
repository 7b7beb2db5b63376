"""Hard-label black-box attack by Bayesian optimization (Bayes-Attack), batched across images.

Shukla, Sahu, Willmott, Kolter, "Simple and Efficient Hard Label Black-box Adversarial
Attacks in Low Query Budget Regimes", KDD 2021; official code ``satyanshukla/bayes_attack``.

The attack sees only a label oracle (``attacks._oracle.LabelOracle``). Per image it searches a
low-dimensional latent ``z`` (``attacks._subspace``); ``delta = project(map(z))`` is the
perturbation. Defaults follow the official code:

- objective ``f(z) = 0`` if the label is adversarial, else ``-1`` (a margin-free 0/1
  indicator, maximized; ``f >= 0`` is success). The GP therefore sees ``-1`` until the first
  success, which stops the image: the acquisition is driven by the posterior variance;
- ``n_init=5`` initial points uniform in ``[-1, 1]^d'``; the acquisition is maximized over
  the box ``[-2, 2]^d'``; for L2, ``z`` is rescaled to ``||z||_2 = eps`` before it is used;
- ``subspace="fft"``, ``dim=12`` (the README command: ``--dim 12 --cos --sin``): cosine and
  sine coefficients of the 12 x 12 lowest frequencies per channel, ``d' = 2 * C * 144``.
  ``subspace="upsample"`` (nearest-neighbour, ``C x dim x dim`` tile) defaults to ``dim=12``
  too (our choice; the official code has no upsampling map);
- exact GP (``SingleTaskGP``, Matern-5/2 ARD, the BoTorch-0.2 Gamma priors the official code
  ran with) refit every iteration (warm-started L-BFGS, at most ``fit_maxiter`` steps);
  acquisition EI (BoTorch ``LogExpectedImprovement``: same maximizer) or UCB (``beta=1``).

Batched: one BO iteration fits one batched GP (``batch_shape = [A]`` active images),
maximizes all ``A`` acquisitions at once (``raw_samples`` screened in one posterior call,
then ``acq_steps`` Adam steps from the best of them, BoTorch ``gen_candidates_torch``) and
asks the oracle one batch of ``A`` queries. Fooled images leave the batch.
``acquisition="random"`` is the random-search baseline: ``z`` uniform in the same box.

Args: norm ("linf" | "l2"), eps, max_queries (per image), subspace, dim, n_init, acquisition
("ei" | "ucb" | "random"), beta (UCB), targeted, seed (each image draws from its own stream
seeded with ``seed``, so results do not depend on the batch), raw_samples, acq_steps, fit_maxiter.
Shapes: x (B, C, H, W) in [0, 1], y (B,). Returns AttackResult with queries (B,) = oracle
calls to first success (or the budget); info: ``oracle_calls`` (batched), ``seconds``.
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn

from attacks._oracle import LabelOracle
from attacks._subspace import SUBSPACES, check_subspace, latent_dim, to_image
from attacks.base import Attack, AttackResult
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel, parse_eps

ACQUISITIONS = ("ei", "ucb", "random")
INIT_BOX, SEARCH_BOX = 1.0, 2.0  # official code: init uniform in [-1, 1]^d', acquisition bounds [-2, 2]^d'


@ATTACKS.register("bo-hard-label", help="hard-label Bayesian-optimization attack (Shukla et al. 2021), query budget")
class BOHardLabel(Attack):
    """Bayes-Attack (Shukla et al., KDD 2021): hard-label, low query budget, batched over images."""

    name = "bo-hard-label"

    def __init__(self, *, norm: str = "linf", eps: float | str, max_queries: int = 1000, subspace: str = "fft",
                 dim: int | None = None, n_init: int = 5, acquisition: str = "ei", beta: float = 1.0,
                 targeted: bool = False, seed: int | None = None, raw_samples: int = 100, acq_steps: int = 10,
                 fit_maxiter: int = 25) -> None:
        self.norm = ThreatModel(norm, 0.0).norm
        self.eps = parse_eps(eps)
        for key, val, low in (("max_queries", max_queries, 1), ("n_init", n_init, 1), ("raw_samples", raw_samples, 1),
                              ("acq_steps", acq_steps, 0), ("fit_maxiter", fit_maxiter, 1)):
            if isinstance(val, bool) or not isinstance(val, int) or val < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {val!r}")
        if max_queries < n_init:
            raise ValueError(f"max_queries ({max_queries}) must be >= n_init ({n_init})")
        if subspace not in SUBSPACES:
            raise ValueError(f"unknown subspace {subspace!r}; allowed: {', '.join(SUBSPACES)}")
        if acquisition not in ACQUISITIONS:
            raise ValueError(f"unknown acquisition {acquisition!r}; allowed: {', '.join(ACQUISITIONS)}")
        if dim is not None:
            check_subspace(subspace, dim, (1, 10**6, 10**6))  # sizes are checked again against the images
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        self.max_queries, self.n_init, self.subspace, self.dim = max_queries, n_init, subspace, dim
        self.acquisition, self.beta, self.targeted, self.seed = acquisition, float(beta), bool(targeted), seed
        self.raw_samples, self.acq_steps, self.fit_maxiter = raw_samples, acq_steps, fit_maxiter

    def _dim(self, shape: tuple[int, ...]) -> int:
        if self.dim is not None:
            check_subspace(self.subspace, self.dim, shape)
            return self.dim
        _, h, w = shape  # default 12, shrunk only for images too small for it
        return min(12, h, w // 2 + 1) if self.subspace == "fft" else min(12, h, w)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        t0 = time.perf_counter()
        b, shape = x.shape[0], tuple(x.shape[1:])
        dim = self._dim(shape)
        d = latent_dim(self.subspace, dim, shape[0])
        tm = ThreatModel(self.norm, self.eps)
        oracle = LabelOracle(model, b, self.max_queries, x.device)
        seed = int(torch.randint(2**31 - 1, (1,)).item()) if self.seed is None else int(self.seed)
        gens = [torch.Generator().manual_seed(seed) for _ in range(b)]  # one stream per image, same seed
        x_adv, success = x.clone(), torch.zeros(b, dtype=torch.bool, device=x.device)
        dd = {"dtype": torch.float64, "device": x.device}  # the GP works in double
        z_init = torch.stack([_uniform(g, (self.n_init, d), INIT_BOX) for g in gens]).to(**dd)  # (B, n_init, d)
        act = torch.arange(b, device=x.device)                                   # (A,) active images
        tx, ty = torch.zeros(b, 0, d, **dd), torch.zeros(b, 0, 1, **dd)          # (A, n, d), (A, n, 1)
        state: dict[str, torch.Tensor] = {}                                      # GP hyperparameters, warm start
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BoTorch numerics / input-scaling / optimizer chatter
            for it in range(self.max_queries):
                if act.numel() == 0:
                    break
                if it < self.n_init:
                    z = z_init[act, it]                                          # (A, d)
                elif self.acquisition == "random":
                    z = torch.stack([_uniform(gens[i], (d,), SEARCH_BOX) for i in act.tolist()]).to(**dd)
                else:
                    z, state = self._propose(tx, ty, state, [gens[i] for i in act.tolist()])
                if self.norm == "l2":                                            # official latent_proj
                    z = z * (self.eps / z.norm(dim=1, keepdim=True).clamp_min(1e-12))
                xa = tm.project(x[act] + to_image(z, self.subspace, dim, shape).to(x.dtype), x[act])  # (A, C, H, W)
                labels = oracle(xa, act)                                         # (A,)
                ok = labels.eq(y[act]) if self.targeted else labels.ne(y[act])
                x_adv[act[ok]], success[act[ok]] = xa[ok], True
                tx = torch.cat([tx, z.unsqueeze(1)], 1)
                ty = torch.cat([ty, ok.to(**dd).sub(1.0).view(-1, 1, 1)], 1)  # f = 0 fooled, -1 not
                keep = ~ok
                act, tx, ty = act[keep], tx[keep], ty[keep]
                state = {k: v[keep] for k, v in state.items()}
        info = {"oracle_calls": oracle.calls, "seconds": time.perf_counter() - t0, "latent_dim": d, "dim": dim}
        return AttackResult(x_adv, success, oracle.counts.clone(), info)

    # -- one batched BO step ------------------------------------------------------------------
    def _propose(self, tx: torch.Tensor, ty: torch.Tensor, state: dict[str, torch.Tensor],
                 gens: list[torch.Generator]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Fit the batched GP on ``tx`` (A, n, d), ``ty`` (A, n, 1); return the next ``z`` (A, d)."""
        from botorch.acquisition import LogExpectedImprovement, UpperConfidenceBound
        from botorch.generation.gen import gen_candidates_torch

        a, _, d = tx.shape
        gp = _fit_gp(tx, ty, state, self.fit_maxiter)
        state = {k: v.detach().clone() for k, v in gp.named_parameters()}
        best_f = ty.amax(1)                                                      # (A, 1)
        raw = torch.stack([_uniform(g, (self.raw_samples, d), SEARCH_BOX) for g in gens]).to(tx)  # (A, R, d)
        with torch.no_grad():                                                    # screen: one posterior call
            post = gp.posterior(raw)
            mu, sd = post.mean.squeeze(-1), post.variance.clamp_min(1e-12).sqrt().squeeze(-1)  # (A, R)
        if self.acquisition == "ei":
            u = (mu - best_f) / sd
            normal = torch.distributions.Normal(torch.zeros_like(u), torch.ones_like(u))
            score = sd * (normal.log_prob(u).exp() + u * normal.cdf(u))         # EI, as in BoTorch
            acqf = LogExpectedImprovement(gp, best_f=best_f)
        else:
            score = mu + self.beta ** 0.5 * sd                                   # UCB, as in BoTorch
            acqf = UpperConfidenceBound(gp, beta=self.beta)
        start = raw[torch.arange(a), score.argmax(1)].unsqueeze(1)               # (A, 1, d)
        if self.acq_steps == 0:
            return start.squeeze(1), state
        opts = {"stopping_criterion_options": {"maxiter": self.acq_steps, "n_window": 10**6}}
        z, _ = gen_candidates_torch(start, acqf, -SEARCH_BOX, SEARCH_BOX, options=opts)  # Adam: per-image steps
        return z.detach().squeeze(1), state


def _uniform(g: torch.Generator, size: tuple[int, ...], half_width: float) -> torch.Tensor:
    """Uniform in ``[-half_width, half_width]^size`` from generator ``g`` (CPU, float64)."""
    return (2 * torch.rand(size, generator=g, dtype=torch.float64) - 1) * half_width


def _fit_gp(tx: torch.Tensor, ty: torch.Tensor, state: dict[str, torch.Tensor], maxiter: int) -> nn.Module:
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
