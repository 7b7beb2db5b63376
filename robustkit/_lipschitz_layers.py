"""1-Lipschitz (L2) layers. Every module here has ``lipschitz_bound(self) -> float``: a sound upper
bound of its L2 Lipschitz constant (``certify/lipschitz.py`` trusts it), and
``lipschitz_estimate(self) -> Tensor``: the differentiable value the EMMA loss uses in training.

- ``SLLConv`` / ``SLLLinear``: the SDP-based Lipschitz layer of Araujo, Havens, Delattre,
  Allauzen, Hu, "A Unified Algebraic Perspective on Lipschitz Neural Networks", ICLR 2023
  (Thm. 3; code ``araujoalexandre/Lipschitz-SLL-Networks``): ``x - 2 W T^{-1} relu(W^T x + b)``
  with ``T = diag(sum_j |W^T W|_ij q_j / q_i)``; 1-Lipschitz for any ``W``, ``q`` (``q = exp(q')``
  as in the official code). The convolutional ``W^T W`` row sums come from the kernel's
  self-correlation (``conv2d(kernel, kernel, padding=k-1)``), as in the official code.
- ``OrthoPatchConv``: a non-overlapping ``s x s`` stride-``s`` convolution whose
  ``(cout, cin*s*s)`` kernel matrix is orthogonalised by Cholesky (rows or columns orthonormal),
  the ``Map2Vec`` neck of Hu et al. 2023 (``hukkai/liresnet``); the input is zero-padded to a
  multiple of ``s`` (an isometry). Its norm is the kernel matrix's, computed exactly (~1).
- ``OrthoLinear``: the same Cholesky orthogonalisation for a dense layer (LiResNet's ``LiResMLP``).
- ``LLNHead``: the last-layer normalisation of Singla et al. 2022 used by LiResNet: rows of the
  weight normalised to unit norm; ``pairwise()`` gives ``||W_i - W_j||`` for EMMA.
- ``MinMax``: the MaxMin / GroupSort-2 activation (Anil et al. 2019), 1-Lipschitz, norm-preserving.
- ``LiResConv``: the LiResNet block of Hu, Zou, Wang, Fredrikson, "Unlocking Deterministic
  Robustness Certification on ImageNet", NeurIPS 2023: ``act(x + conv(x) + b)`` with the linear
  residual folded into one kernel ``I + depth^-1/2 * gamma * W``; its constant is ``||I + K||``:
  estimated by power iteration in training (as the official code does) and bounded soundly by the
  DFT bound of ``robustkit._lipschitz_bounds.conv_bound`` on the block's input size (its forward refuses
  larger images, on which that bound would not hold).

Differences from the official code, and which we follow: LiResConv has no batch centering (the
official block subtracts the batch mean of the branch in training, a running mean in eval: a shift
that does not change the constant; left out for simplicity, so eval and train compute the same
function); SLL uses ``q = exp(q')`` as Araujo et al. (the LiResNet repository's SLL copy uses
``|q'| + 1e-6``); ``OrthoPatchConv`` / ``OrthoLinear`` report the exact spectral norm of their
orthogonalised matrix (slightly below 1 because of the Cholesky regulariser) where the official
``Map2Vec`` computes the same quantity by SVD only at evaluation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from robustkit._lipschitz_bounds import conv_bound, matrix_bound, power_norm
from robustkit.errors import InputError


def _safe_inv(t: torch.Tensor) -> torch.Tensor:
    inv = 1.0 / t
    return torch.where(torch.isfinite(inv), inv, torch.zeros_like(inv))


class SLLConv(nn.Module):
    """SLL convolution: ``(B, C, H, W) -> (B, C, H, W)``, ``x - 2 conv^T(T^{-1} relu(conv(x) + b))``."""

    def __init__(self, channels: int, inner: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"SLLConv needs an odd kernel size (same padding), got {kernel_size}")
        self.kernel = nn.Parameter(torch.empty(inner, channels, kernel_size, kernel_size))
        nn.init.xavier_normal_(self.kernel)
        self.bias = nn.Parameter(torch.empty(inner).uniform_(-1 / math.sqrt(inner), 1 / math.sqrt(inner)))
        self.q = nn.Parameter(torch.randn(inner))
        self.padding = kernel_size // 2

    def t_inv(self) -> torch.Tensor:
        """``T^{-1}`` ``(inner,)``: ``1 / sum_j |K K^T|_ij q_j / q_i`` (Araujo et al., Thm. 3)."""
        q = torch.exp(self.q)
        ktk = F.conv2d(self.kernel, self.kernel, padding=self.kernel.shape[-1] - 1)  # (inner, inner, 2k-1, 2k-1)
        t = (ktk.abs() * q.view(1, -1, 1, 1) / q.view(-1, 1, 1, 1)).sum((1, 2, 3))  # (inner,)
        return _safe_inv(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = F.conv2d(x, self.kernel, self.bias, padding=self.padding)           # (B, inner, H, W)
        res = self.t_inv().view(1, -1, 1, 1) * F.relu(res)
        return x - 2 * F.conv_transpose2d(res, self.kernel, padding=self.padding)  # (B, C, H, W)

    def lipschitz_bound(self) -> float:
        return 1.0

    def lipschitz_estimate(self) -> torch.Tensor:
        return self.q.new_ones(())


class SLLLinear(nn.Module):
    """SLL dense layer: ``(B, d) -> (B, d)``, ``x - 2 W^T T^{-1} relu(W x + b)`` (W: ``(inner, d)``)."""

    def __init__(self, features: int, inner: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(inner, features))
        nn.init.xavier_normal_(self.weight)
        self.bias = nn.Parameter(torch.empty(inner).uniform_(-1 / math.sqrt(features), 1 / math.sqrt(features)))
        self.q = nn.Parameter(torch.randn(inner))

    def t_inv(self) -> torch.Tensor:
        q = torch.exp(self.q)
        t = ((self.weight @ self.weight.T).abs() * q.view(1, -1) / q.view(-1, 1)).sum(1)  # (inner,)
        return _safe_inv(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.t_inv() * F.relu(F.linear(x, self.weight, self.bias))    # (B, inner)
        return x - 2 * res @ self.weight                                     # (B, d)

    def lipschitz_bound(self) -> float:
        return 1.0

    def lipschitz_estimate(self) -> torch.Tensor:
        return self.q.new_ones(())


def cholesky_orth(w: torch.Tensor, rel_eps: float = 1e-3) -> torch.Tensor:
    """``(m, n)`` -> rows (m <= n) or columns (m > n) near-orthonormal: ``L^{-1} W`` with
    ``L L^T = W W^T + eps I``, ``eps = rel_eps * mean(diag)`` (the LiResNet code's 1/1000)."""
    if w.shape[0] > w.shape[1]:
        return cholesky_orth(w.T, rel_eps).T
    gram = w @ w.T
    eps = gram.diagonal().mean().detach() * rel_eps
    chol = torch.linalg.cholesky(gram + eps * torch.eye(gram.shape[0], dtype=w.dtype, device=w.device))
    return torch.linalg.solve_triangular(chol, w, upper=False)


class OrthoPatchConv(nn.Module):
    """``(B, cin, H, W) -> (B, cout, ceil(H/s), ceil(W/s))``: zero-pad to a multiple of ``s``, then a
    ``s x s`` stride-``s`` convolution with an orthogonalised kernel matrix (non-overlapping patches:
    the operator norm is exactly the kernel matrix's)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride
        self.weight = nn.Parameter(torch.randn(cout, cin * stride * stride) / math.sqrt(cin * stride * stride))
        self.bias = nn.Parameter(torch.zeros(cout))

    def kernel(self) -> torch.Tensor:  # (cout, cin, s, s)
        return cholesky_orth(self.weight).view(self.cout, self.cin, self.stride, self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        x = F.pad(x, (0, -x.shape[-1] % s, 0, -x.shape[-2] % s))         # (B, cin, s*ceil(H/s), s*ceil(W/s))
        return F.conv2d(x, self.kernel(), self.bias, stride=s)

    def lipschitz_bound(self) -> float:
        return matrix_bound(cholesky_orth(self.weight))

    def lipschitz_estimate(self) -> torch.Tensor:
        return torch.linalg.matrix_norm(cholesky_orth(self.weight), ord=2)


class OrthoLinear(nn.Module):
    """``(B, din) -> (B, dout)`` with a Cholesky-orthogonalised weight (rows or columns orthonormal)."""

    def __init__(self, din: int, dout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dout, din) / math.sqrt(din))
        self.bias = nn.Parameter(torch.zeros(dout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, cholesky_orth(self.weight), self.bias)

    def lipschitz_bound(self) -> float:
        return matrix_bound(cholesky_orth(self.weight))

    def lipschitz_estimate(self) -> torch.Tensor:
        return torch.linalg.matrix_norm(cholesky_orth(self.weight), ord=2)


class LLNHead(nn.Module):
    """Last-layer normalisation: ``(B, d) -> (B, K)`` with unit-norm weight rows ``W_k``. Its global
    constant is ``||W||_2``; the margin between classes i and j is ``||W_i - W_j||``-Lipschitz."""

    def __init__(self, features: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, features) / math.sqrt(features))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def get_weight(self) -> torch.Tensor:  # (K, d)
        return F.normalize(self.weight, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.get_weight(), self.bias)

    def pairwise(self) -> torch.Tensor:
        """``(K, K)``: ``||W_i - W_j||_2`` (differentiable)."""
        w = self.get_weight()
        return (w.unsqueeze(1) - w.unsqueeze(0)).norm(dim=-1)

    def lipschitz_bound(self) -> float:
        return matrix_bound(self.get_weight())


class MinMax(nn.Module):
    """MaxMin over the two channel halves: ``[max(a, b), min(a, b)]`` (needs an even channel count)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)

    def lipschitz_bound(self) -> float:
        return 1.0


class LiResConv(nn.Module):
    """LiResNet block: ``(B, C, H, W) -> (B, C, H, W)``, ``MinMax(conv(x, I + scale * gamma * W) + b)``,
    the same as ``MinMax(x + conv(x, scale * gamma * W) + b)``. ``input_size`` is ``(H, W)``: the sound
    bound holds for that size (a zero-padded convolution's norm grows with the image)."""

    def __init__(self, width: int, input_size: tuple[int, int], scale: float = 1.0, n_iter: int = 10) -> None:
        super().__init__()
        if width % 2:
            raise ValueError(f"LiResConv needs an even width (MinMax pairs channels), got {width}")
        self.weight = nn.Parameter(torch.randn(width, width, 3, 3) / (width * 9))  # the official init
        self.gamma = nn.Parameter(torch.ones(width, 1, 1, 1))
        self.bias = nn.Parameter(torch.zeros(width))
        identity = torch.zeros(width, width, 3, 3)
        identity[:, :, 1, 1] = torch.eye(width)
        self.register_buffer("identity", identity, persistent=False)
        self.register_buffer("u", F.normalize(torch.ones(width * input_size[0] * input_size[1]), dim=0)
                             .view(1, width, *input_size))            # power-iteration state (warm restarts)
        self.input_size, self.scale, self.n_iter = tuple(input_size), float(scale), int(n_iter)
        self.act = MinMax()

    def kernel(self) -> torch.Tensor:  # (C, C, 3, 3)
        return self.identity + self.scale * self.gamma * self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] > self.input_size[0] or x.shape[-1] > self.input_size[1]:
            # lipschitz_bound() holds up to input_size only (a smaller image is a restriction of it)
            raise InputError(f"LiResConv built for {self.input_size[0]}x{self.input_size[1]} inputs got "
                             f"{x.shape[-2]}x{x.shape[-1]}: its Lipschitz bound would not hold")
        return self.act(F.conv2d(x, self.kernel(), self.bias, padding=1))

    def lipschitz_estimate(self) -> torch.Tensor:
        """Power-iteration estimate of ``||I + K||`` (differentiable in the kernel; not a bound)."""
        k = self.kernel()
        est, u = power_norm(lambda v: F.conv2d(v, k, padding=1), lambda v: F.conv_transpose2d(v, k, padding=1),
                            self.u, self.n_iter if self.training else 0)
        if self.training:
            self.u.copy_(u)
        return est

    def lipschitz_bound(self) -> float:
        return conv_bound(self.kernel(), self.input_size, padding=1)
