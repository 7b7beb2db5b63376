"""Composite models: two networks behind one ``RobustModel`` face (pixel images in, logits out).

Both are built-in nets of ``MODELS`` so that ``save`` / ``load`` rebuild them from ``model.json``
(the sub-networks' architectures are ``arch_kwargs``); ``certify`` and ``defenses`` read their parts.
They live in the core because ``load`` (core) must rebuild them and the core imports nothing above it;
``robustkit/__init__.py`` imports this module (after the zoo) so that they are always registered.

- ``dual-subimage`` (``DualSubimageNet``): the model side of dual randomized smoothing (Xia et al.,
  "Mitigating the Curse of Dimensionality for Certified Robustness via Dual Randomized Smoothing",
  ICLR 2024). The image is split by pixel index into two sub-images (``checkerboard_split``), each
  classified by its own ``RobustModel`` (``.left``, ``.right``) at half the dimension; the composite
  returns the log of the two softmaxes' mean. ``certify/dual_smoothing.py`` smooths each branch in
  its own lower dimension. Build one from two trained sub-image classifiers with ``dual_model``.
- ``denoised`` (``DenoisedNet``): denoised smoothing (Salman et al., "Denoised Smoothing: A Provable
  Defense for Pretrained Classifiers", NeurIPS 2020): a DnCNN denoiser (``.denoiser``, Zhang et al.
  2017) in front of an off-the-shelf classifier (``.classifier``, a ``RobustModel`` with its own
  normalization). ``denoised_model(classifier)`` wraps a trained one; ``defenses/denoiser.py``
  trains the denoiser with the classifier frozen; plain ``smoothing`` certifies the composite.

The composite's own ``Normalize`` should stay the identity (the default for built-in nets): each
part normalizes its own input. (A non-identity per-channel one is still consistent: it commutes
with the pixel split.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.errors import InputError
from robustkit.registry import MODELS
from robustkit.zoo import RobustModel, create, unwrap

Shape = tuple[int, int, int]


# -- the pixel-index split of dual randomized smoothing -------------------------------------------
def checkerboard_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (..., H, W)`` -> ``(left, right)``, each ``(..., H, W / 2)``: a checkerboard partition of the
    pixels. Row ``i`` of ``left`` holds columns ``2j + (i mod 2)``, of ``right`` columns ``2j + 1 - (i mod 2)``
    (every channel alike). A permutation of the coordinates, so ``||d||^2 = ||d_left||^2 + ||d_right||^2``.

    Xia et al.'s official code (``core1_lowres_2.py``, ``get_res_index``) builds the same checkerboard
    with the first pixel pair of every row swapped (an off-by-one in its row counter); any fixed
    partition gives a valid certificate, we take the plain checkerboard."""
    if x.dim() < 2 or x.shape[-1] % 2:
        raise InputError(f"dual smoothing splits each row into two halves: the width must be even, got shape "
                         f"{tuple(x.shape)}")
    pairs = x.unflatten(-1, (x.shape[-1] // 2, 2))               # (..., H, W/2, 2)
    left, right = pairs[..., 0].clone(), pairs[..., 1].clone()    # (..., H, W/2) each
    left[..., 1::2, :] = pairs[..., 1::2, :, 1]
    right[..., 1::2, :] = pairs[..., 1::2, :, 0]
    return left, right


def checkerboard_merge(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The inverse of ``checkerboard_split``: ``(..., H, W/2)`` twice -> ``(..., H, W)``."""
    pairs = torch.stack([left, right], dim=-1)                    # (..., H, W/2, 2)
    pairs[..., 1::2, :, :] = pairs[..., 1::2, :, :].flip(-1)
    return pairs.flatten(-2)


def _sub_model(arch: str, num_classes: int, shape: Shape, kwargs: dict[str, Any] | None,
               mean: Sequence[float] | None, std: Sequence[float] | None, resize: Any = None) -> nn.Module:
    if not isinstance(arch, str) or not arch:
        raise InputError(f"a composite's sub-network needs an architecture name, got {arch!r}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise InputError(f"sub-network kwargs must be a mapping, got {kwargs!r}")
    return create(arch, num_classes, shape, mean, std, resize=resize, **(kwargs or {}))


# -- dual randomized smoothing's model --------------------------------------------------------------
class DualSubimageNet(nn.Module):
    """Two sub-image classifiers; ``forward`` of a full image ``(B, C, H, W)`` returns
    ``log((softmax(left(x_l)) + softmax(right(x_r))) / 2)`` ``(B, K)``: its argmax is the combined
    prediction, the mean of the two branches' probabilities (the rule dual smoothing certifies)."""

    def __init__(self, left: nn.Module, right: nn.Module) -> None:
        super().__init__()
        self.left, self.right = left, right

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, K)
        xl, xr = checkerboard_split(x)                                     # (B, C, H, W/2) each
        p = (F.softmax(self.left(xl).float(), 1) + F.softmax(self.right(xr).float(), 1)) / 2   # (B, K)
        return torch.log(p.clamp_min(1e-30)).to(x.dtype)


@MODELS.register("dual-subimage", help="dual randomized smoothing's two sub-image classifiers (Xia et al. 2024); "
                                       "kwargs sub_arch, sub_kwargs")
def dual_subimage(num_classes: int = 10, input_shape: Shape = (1, 28, 28), sub_arch: str = "ibp-small",
                  sub_kwargs: dict[str, Any] | None = None, sub_mean: Sequence[float] | None = None,
                  sub_std: Sequence[float] | None = None) -> nn.Module:
    """Two ``sub_arch`` classifiers of ``(C, H, W / 2)`` sub-images (same architecture, own weights)."""
    c, h, w = input_shape
    if w % 2:
        raise InputError(f"dual-subimage needs an even image width (two halves per row), got input_shape "
                         f"{tuple(input_shape)}")
    sub = (c, h, w // 2)
    return DualSubimageNet(*(_sub_model(sub_arch, num_classes, sub, sub_kwargs, sub_mean, sub_std) for _ in "lr"))


def dual_model(left: nn.Module, right: nn.Module) -> nn.Module:
    """The ``dual-subimage`` composite of two trained sub-image classifiers (``RobustModel``s of the same
    architecture, inputs ``(C, H, W / 2)``); their weights are copied. Returns a ``RobustModel`` of
    inputs ``(C, H, W)``."""
    left, right = unwrap(left), unwrap(right)
    if not (isinstance(left, RobustModel) and isinstance(right, RobustModel)):
        raise InputError("dual_model takes two RobustModels (the sub-image classifiers)")
    spec = {k: v for k, v in left.spec().items()}
    if spec != right.spec():
        raise InputError(f"dual_model: the two sub-image classifiers must share arch, classes, input shape and "
                         f"normalization, got {left.spec()} and {right.spec()}")
    if left.resize is not None:
        raise InputError("dual_model: sub-image classifiers with resize= are not supported")
    c, h, w = left.input_shape
    model = create("dual-subimage", left.num_classes, (c, h, 2 * w), sub_arch=left.arch,
                   sub_kwargs=left.arch_kwargs or None, sub_mean=list(left.mean), sub_std=list(left.std))
    model.net.left.load_state_dict(left.state_dict())
    model.net.right.load_state_dict(right.state_dict())
    return model.to(next(left.parameters()).device)


# -- denoised smoothing's model ---------------------------------------------------------------------
class DnCNN(nn.Module):
    """DnCNN (Zhang et al. 2017, "Beyond a Gaussian Denoiser: Residual Learning of Deep CNN for Image
    Denoising"), the denoiser of Salman et al. 2020: conv-ReLU, ``depth - 2`` x conv-BN-ReLU, conv, all 3x3
    with ``width`` channels; residual learning (the net predicts the noise, the output is ``x - noise``).
    Paper / Salman et al. defaults: ``depth=17``, ``width=64``. ``(B, C, H, W) -> (B, C, H, W)``."""

    def __init__(self, channels: int = 1, depth: int = 17, width: int = 64) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
            raise InputError(f"DnCNN depth must be an integer >= 2, got {depth!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise InputError(f"DnCNN width must be an integer >= 1, got {width!r}")
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return x - self.body(x)


class DenoisedNet(nn.Module):
    """``classifier(denoiser(x))``: pixel image -> denoised pixel image -> logits ``(B, K)``."""

    def __init__(self, denoiser: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.denoiser, self.classifier = denoiser, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, K)
        return self.classifier(self.denoiser(x))


@MODELS.register("denoised", help="denoised smoothing (Salman et al. 2020): DnCNN denoiser -> classifier; "
                                  "kwargs classifier, depth, width")
def denoised(num_classes: int = 10, input_shape: Shape = (1, 28, 28), classifier: str = "ibp-small",
             classifier_kwargs: dict[str, Any] | None = None, classifier_mean: Sequence[float] | None = None,
             classifier_std: Sequence[float] | None = None, classifier_resize: Any = None, depth: int = 17,
             width: int = 64) -> nn.Module:
    """A ``DnCNN(depth, width)`` in front of a ``classifier`` ``RobustModel`` of the same input shape."""
    clf = _sub_model(classifier, num_classes, tuple(input_shape), classifier_kwargs, classifier_mean,
                     classifier_std, classifier_resize)
    return DenoisedNet(DnCNN(input_shape[0], depth, width), clf)


def denoised_model(classifier: nn.Module, *, depth: int = 17, width: int = 64) -> nn.Module:
    """The ``denoised`` composite of a trained ``classifier`` (a ``RobustModel``; its weights are copied)
    and a fresh DnCNN denoiser. Train the denoiser with ``denoiser-mse`` / ``denoiser-stab``."""
    clf = unwrap(classifier)
    if not isinstance(clf, RobustModel):
        raise InputError(f"denoised_model takes a RobustModel classifier, got {type(classifier).__name__}")
    model = create("denoised", clf.num_classes, clf.input_shape, classifier=clf.arch,
                   classifier_kwargs=clf.arch_kwargs or None, classifier_mean=list(clf.mean),
                   classifier_std=list(clf.std), classifier_resize=list(clf.resize.size) if clf.resize else None,
                   depth=depth, width=width)
    model.net.classifier.load_state_dict(clf.state_dict())
    return model.to(next(clf.parameters()).device)


def parts(model: nn.Module, kind: type[nn.Module]) -> nn.Module | None:
    """The composite net of type ``kind`` inside ``model`` (a ``RobustModel``, maybe DDP-wrapped), or None."""
    net = getattr(unwrap(model), "net", None)
    return net if isinstance(net, kind) else None
