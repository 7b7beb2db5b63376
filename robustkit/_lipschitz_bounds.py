"""Sound numeric L2 operator-norm bounds for the Lipschitz-by-construction layers.

- ``matrix_bound(W)``: the largest singular value of a dense matrix, computed in float64 and
  inflated by ``SAFETY`` (relative) to cover the SVD's round-off: an upper bound.
- ``conv_bound(weight, input_size, stride, padding, dilation, groups)``: an upper bound of the
  operator norm of a zero-padded ``F.conv2d`` on inputs of spatial size ``input_size``. A
  zero-padded convolution is a restriction of the *circular* convolution on the padded grid
  ``(H + 2p_h, W + 2p_w)`` (no output reads across the wrap once the input sits inside the
  padding), and a stride only drops outputs; so its norm is at most the circular one, which the
  2-D DFT block-diagonalises exactly: ``max_w ||K_hat(w)||_2`` over the grid's frequencies
  (Sedghi et al., "The Singular Values of Convolutional Layers", ICLR 2019; the zero-padding
  argument as in Delattre et al., ICML 2023, Sec. 3). One batched SVD of ``(H', W', cout, cin)``.
- ``power_norm(apply, adjoint, u, n_iter)``: the differentiable power-iteration *estimate*
  (a lower bound that converges to the norm) used during training, as the LiResNet code does;
  certificates never use it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

SAFETY = 1e-6  # relative slack on float64 singular values (their error is ~1e-15 * ||A||)


def matrix_bound(w: torch.Tensor) -> float:
    """Upper bound of ``||w||_2`` for a ``(m, n)`` matrix."""
    s = torch.linalg.matrix_norm(w.detach().double(), ord=2)
    return float(s) * (1 + SAFETY)


def conv_bound(weight: torch.Tensor, input_size: tuple[int, int], stride: int | tuple[int, int] = 1,
               padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1, groups: int = 1) -> float:
    """Upper bound of the L2 operator norm of ``F.conv2d(x, weight, stride=, padding=, dilation=,
    groups=)`` on inputs ``(B, cin, *input_size)`` (zero padding). ``stride`` does not enter: a
    strided convolution is the stride-1 one followed by a subsampling (norm <= 1)."""
    del stride
    with torch.no_grad():
        return float(conv_norm(weight, input_size, padding, dilation, groups)) * (1 + SAFETY)


def conv_norm(weight: torch.Tensor, input_size: tuple[int, int], padding: int | tuple[int, int] = 0,
              dilation: int | tuple[int, int] = 1, groups: int = 1) -> torch.Tensor:
    """The circular-convolution norm behind ``conv_bound`` as a differentiable float64 scalar (no
    slack): ``max`` over the padded grid's frequencies of ``||K_hat(w)||_2``."""
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    w = weight.double()                                                # (cout, cin / groups, kh, kw)
    cout, cin_g, kh, kw = w.shape
    if dh > 1 or dw > 1:                                               # insert the dilation's zeros
        full = w.new_zeros(cout, cin_g, (kh - 1) * dh + 1, (kw - 1) * dw + 1)
        full[:, :, ::dh, ::dw] = w
        w = full
    grid = (max(input_size[0] + 2 * ph, w.shape[2]), max(input_size[1] + 2 * pw, w.shape[3]))
    k_hat = torch.fft.fft2(w, s=grid).permute(2, 3, 0, 1)             # (H', W', cout, cin_g) complex
    per_group = cout // groups                                         # groups: a block-diagonal operator
    norms = [torch.linalg.matrix_norm(k_hat[:, :, g * per_group:(g + 1) * per_group], ord=2).max()
             for g in range(groups)]
    return torch.stack(norms).max()


def power_norm(apply: Callable[[torch.Tensor], torch.Tensor], adjoint: Callable[[torch.Tensor], torch.Tensor],
               u: torch.Tensor, n_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||apply(u*)||, u*)``: ``n_iter`` power iterations on ``adjoint o apply`` from ``u`` (no
    gradient), then one differentiable application. ``u*`` is unit-norm, for a warm restart."""
    with torch.no_grad():
        for _ in range(n_iter):
            u = F.normalize(adjoint(apply(u)).flatten(), dim=0).view_as(u)
    return apply(u).norm(), u.detach()


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))
