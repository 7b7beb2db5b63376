"""Spectral-norm upper bounds by Gram iteration (Delattre et al., ICML 2023, arXiv:2305.16173).

Gram iteration: ``G_1 = A``, ``G_{t+1} = G_t^H G_t``. Since the singular values of ``G_{t+1}`` are
those of ``G_t`` squared, ``||G_{t+1}||_F^{2^-t} = (sum_i sigma_i^{2^(t+1)})^{2^-(t+1)}`` -- an
upper bound on ``sigma_1(A)`` for every ``t`` (t = 0 is the Frobenius norm) that converges
super-linearly: it is within a factor ``rank^(2^-(t+1))`` of ``sigma_1``. Each step is rescaled to
unit Frobenius norm and the scale kept in log space (as in the paper's algorithm), so nothing
overflows. We compute in float64.

A 2-D convolution is handled in the Fourier domain (as in the paper, after Sedghi et al., "The
Singular Values of Convolutional Layers", ICLR 2019): a *circular* multi-channel convolution on
an ``M_h x M_w`` grid is block-diagonalized by the 2-D DFT, so its spectral norm is the max over
the ``M_h * M_w`` frequencies of the spectral norm of the ``c_out x c_in`` matrix ``K_hat(w)``;
Gram iteration runs batched over frequencies (only half of them, ``rfft2``: ``K_hat(-w) =
conj(K_hat(w))`` for a real kernel, same singular values). The paper bounds the circular
operator; PyTorch's layers differ, so ``conv2d_bound`` reduces the layer actually used to a
circular one it is a restriction of:

- zero padding ``p``, stride 1: the output is a crop of the circular convolution, on a grid of the
  padded size ``N = n + p_left + p_right``, of the input embedded in zeros. No output the layer
  keeps wraps around (its last one reads input ``N - 1``), and cropping / zero-embedding never
  increase norms, so ``||conv x|| <= ||circ_N|| ||x||``.
- dilation ``d``: the kernel with ``d - 1`` zeros between taps (exactly the same operator).
- stride ``s``: the polyphase (space-to-depth) identity. With ``k = s q + r``, output ``i`` reads
  padded input ``s i + k = s (i + q) + r``, i.e. a *stride-1* convolution of the ``s^2`` phase
  images ``x_r[j] = x_pad[s j + r]`` (an orthogonal re-indexing of the padded input, extended by
  zeros to a multiple of ``s``) with the kernel ``K'[o, (c, r), q] = K[o, c, s q + r]``, on the grid
  ``M = ceil(N / s)``; again no kept output wraps (``i + q <= (N - 1) / s < M``). This is tight, unlike
  bounding the strided layer by its stride-1 version.
- groups: block-diagonal over groups, so the max over groups (batched with the frequencies).
- non-zero ``padding_mode`` (reflect / replicate / circular): the padding is a 0/1 selection
  ``P`` with ``||P|| = sqrt(max copies of one pixel)`` (``P^T P`` is diagonal), counted exactly by
  one backward pass; the valid convolution on the padded image is bounded as above (loose, ~2x).
  Exception: ``circular`` padding by exactly ``k_eff - 1`` in total with the stride dividing the
  input size (and the kernel no larger than the input) *is* the circular convolution on the input's
  own grid (shifted), bounded directly.

Floating point: every bound is multiplied by ``1 + 1e-9`` (``ROUNDING``), far above the float64
rounding of the FFT and the products (~1e-15 relative, measured against exact SVDs), so a bound
computed here is never below the true norm because of rounding.

The official code (``blaisedelattre/lip4conv``, ``bounds.py: compute_delattre2023``) bounds the
circular operator for one grid size ``n`` (default ``n_iter=4``; its training example uses 6) and
has no stride, dilation, groups or padding handling; the reductions above are ours (the authors'
later paper, arXiv:2402.00240, bounds zero-padded layers differently). We default to 10
iterations (``certify.lipschitz``): certification runs once per model and affords them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MATRIX_ITERS", "ROUNDING", "conv2d_bound", "gram_bound", "matrix_bound"]
ROUNDING = 1.0 + 1e-9
MATRIX_ITERS = 20


def _log_bound(a: torch.Tensor, log_scale: torch.Tensor, k: int) -> torch.Tensor:
    """``log`` of the bound after ``k`` iterations: ``(log_scale + log ||a||_F) / 2^k`` (``-inf`` for 0)."""
    return (log_scale + torch.linalg.matrix_norm(a).log()) / 2 ** k


def gram_bound(a: torch.Tensor, n_iter: int, reduce_max: bool = False) -> torch.Tensor:
    """Upper bounds on the spectral norm of each matrix of ``a (..., m, n)`` (real or complex):
    ``||G_{n_iter+1}||_F^{2^-n_iter}`` per matrix, shape ``(...)``, float64.

    ``reduce_max=True`` returns only the max over all matrices (a 0-d tensor) and prunes on the way:
    after ``k`` steps the bound ``b`` of a matrix of rank ``<= r`` satisfies
    ``b / r^(2^-(k+1)) <= sigma_1 <= b``, so a matrix whose bound is below another's lower bound
    cannot hold the max and is dropped (for convolutions most frequencies go after 2-3 steps)."""
    a = a.to(torch.complex128 if a.is_complex() else torch.float64)
    if a.shape[-1] > a.shape[-2]:                  # the Gram matrix on the smaller side
        a = a.transpose(-1, -2)
    rank = min(a.shape[-2:])
    if reduce_max:
        a = a.reshape(-1, *a.shape[-2:])                                                  # (N, m, n)
    log_scale = torch.zeros(a.shape[:-2], dtype=torch.float64, device=a.device)
    for k in range(n_iter):
        if reduce_max and a.shape[0] > 1:
            log_b = _log_bound(a, log_scale, k)                                          # (N,)
            keep = log_b >= (log_b - math.log(rank) / 2 ** (k + 1)).max()
            a, log_scale = a[keep], log_scale[keep]
        f = torch.linalg.matrix_norm(a).clamp_min(torch.finfo(torch.float64).tiny)       # (...)
        a = a / f[..., None, None].to(a.dtype)
        log_scale = 2 * (log_scale + f.log())
        a = a.mH @ a                                                                       # (..., n, n)
    bound = _log_bound(a, log_scale, n_iter).exp()                                        # 0 stays 0
    return bound.max() if reduce_max else bound


def matrix_bound(w: torch.Tensor, n_iter: int) -> float:
    """Gram-iteration upper bound on ``sigma_1(w)`` of a ``(m, n)`` matrix (a Linear layer's weight), with
    at least ``MATRIX_ITERS`` steps: one matrix is cheap, and the worst case (equal singular values,
    ``rank^(2^-(t+1))``) is then below ``1 + 1e-6`` for any realistic rank."""
    return ROUNDING * float(gram_bound(w.detach(), max(n_iter, MATRIX_ITERS)))


def _pads(conv: nn.Conv2d) -> tuple[int, int]:
    """Total padding per spatial dim ``(p_h, p_w)`` (``padding='same'`` may be asymmetric)."""
    r = conv._reversed_padding_repeated_twice                   # [w_left, w_right, h_left, h_right]
    return int(r[2] + r[3]), int(r[0] + r[1])


def _padding_gain(conv: nn.Conv2d, hw: tuple[int, int]) -> float:
    """``||P||`` of a non-zero padding mode: sqrt of the most copies of one input pixel in the padded
    image, ``max(P^T 1)`` (one backward pass)."""
    r = [int(v) for v in conv._reversed_padding_repeated_twice]
    x = torch.zeros(1, 1, *hw, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        (copies,) = torch.autograd.grad(F.pad(x, r, mode=conv.padding_mode).sum(), x)
    return math.sqrt(float(copies.max()))


def _polyphase(k: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """``(O, C, kh, kw)`` -> ``(O, C * s_h * s_w, ceil(kh / s_h), ceil(kw / s_w))``:
    ``K'[o, (c, r), q] = K[o, c, s q + r]``."""
    (sh, sw), (o, c, kh, kw) = stride, k.shape
    qh, qw = -(-kh // sh), -(-kw // sw)
    k = F.pad(k, (0, qw * sw - kw, 0, qh * sh - kh))                          # zero taps up to a multiple of s
    k = k.view(o, c, qh, sh, qw, sw).permute(0, 1, 3, 5, 2, 4)                 # (O, C, s_h, s_w, q_h, q_w)
    return k.reshape(o, c * sh * sw, qh, qw)


def conv2d_bound(conv: nn.Conv2d, hw: tuple[int, int], n_iter: int, weight: torch.Tensor | None = None) -> float:
    """Upper bound on the L2 operator norm of ``conv`` (bias ignored: it does not change Lipschitz
    constants) acting on ``(C_in, H, W)`` inputs with ``hw = (H, W)``, for any stride, zero padding,
    dilation and groups (see the module docstring). ``weight`` overrides ``conv.weight`` (e.g. with a
    BatchNorm or an input scale folded in); shape ``(C_out, C_in / groups, kh, kw)``."""
    w = (conv.weight if weight is None else weight).detach().to(torch.float64)
    (dh, dw), (sh, sw), g = conv.dilation, conv.stride, conv.groups
    o, c, kh, kw = w.shape
    if (dh, dw) != (1, 1):                                                    # dilation: zeros between taps
        wd = w.new_zeros(o, c, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
        wd[:, :, ::dh, ::dw] = w
        w = wd
    gain, (ph, pw) = 1.0, _pads(conv)
    n_h, n_w = hw[0] + ph, hw[1] + pw                                         # the padded input size N
    if (conv.padding_mode == "circular" and (ph, pw) == (w.shape[-2] - 1, w.shape[-1] - 1)
            and hw[0] % sh == 0 and hw[1] % sw == 0 and w.shape[-2] <= hw[0] and w.shape[-1] <= hw[1]):
        n_h, n_w = hw                                  # exactly the circular convolution on the input's own grid
    elif conv.padding_mode != "zeros":                 # pad (a 0/1 selection), then the valid convolution
        gain = _padding_gain(conv, hw)
    w = _polyphase(w, (sh, sw))                                               # stride 1 on the phase images
    m_h, m_w = -(-n_h // sh), -(-n_w // sw)                                   # the circular grid M = ceil(N / s)
    if w.shape[-2] > m_h or w.shape[-1] > m_w:                                # cannot happen for a valid layer
        raise ValueError(f"kernel {tuple(w.shape[-2:])} larger than the grid {(m_h, m_w)}")
    w = w.view(g, o // g, *w.shape[1:])                                       # (G, O/G, C', q_h, q_w)
    k_hat = torch.fft.rfft2(w, s=(m_h, m_w))                                  # (G, O/G, C', M_h, M_w//2+1)
    k_hat = k_hat.permute(0, 3, 4, 1, 2)                                      # (G, M_h, M_w//2+1, O/G, C')
    return ROUNDING * gain * float(gram_bound(k_hat, n_iter, reduce_max=True))
