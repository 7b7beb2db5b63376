"""Peer implementations of PGD and DeepFool (torchattacks, foolbox, ART) behind one call shape:
``peer_pgd(lib, ...)`` / ``peer_deepfool(lib, ...)`` return a function that runs the peer's attack on
the batch and returns its adversarial images ``(B, C, H, W)``. The peers are imported lazily: a
missing one fails its own row of the benchmark, not the benchmark."""

from __future__ import annotations

from collections.abc import Callable

import torch

PGD_PEERS = {"torchattacks": "torchattacks.PGD", "foolbox": "foolbox.attacks.LinfPGD",
             "art": "art ProjectedGradientDescent (PyTorchClassifier)"}
DF_PEERS = {"torchattacks": "torchattacks.DeepFool (all classes, per-sample loop)",
            "foolbox": "foolbox.attacks.L2DeepFoolAttack"}


def peer_pgd(lib: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
             steps: int) -> Callable[[], torch.Tensor]:
    """L-inf PGD of ``lib`` with ``steps`` steps of size ``alpha`` and one random start."""
    if lib == "torchattacks":
        import torchattacks

        atk = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
        return lambda: atk(x, y)
    if lib == "foolbox":
        import foolbox as fb

        fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=x.device)
        fatk = fb.attacks.LinfPGD(abs_stepsize=alpha, steps=steps, random_start=True)
        return lambda: fatk(fmodel, x, y, epsilons=eps)[1]
    if lib == "art":
        import numpy as np
        from art.attacks.evasion import ProjectedGradientDescent
        from art.estimators.classification import PyTorchClassifier

        clf = PyTorchClassifier(model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                nb_classes=int(model.num_classes), clip_values=(0.0, 1.0),
                                device_type="gpu" if x.device.type == "cuda" else "cpu")
        aatk = ProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=alpha, max_iter=steps,
                                        num_random_init=1, batch_size=x.shape[0], verbose=False)
        xn, yn = x.cpu().numpy(), y.cpu().numpy()
        return lambda: torch.from_numpy(aatk.generate(x=xn, y=yn)).to(x.device)
    raise KeyError(f"unknown PGD peer {lib!r}; known: {', '.join(PGD_PEERS)}")


def peer_deepfool(lib: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
                  overshoot: float, candidates: int) -> Callable[[], torch.Tensor]:
    """L2 DeepFool of ``lib`` (torchattacks has no candidates option and uses all classes)."""
    if lib == "torchattacks":
        import torchattacks

        atk = torchattacks.DeepFool(model, steps=steps, overshoot=overshoot)
        return lambda: atk(x, y)
    if lib == "foolbox":
        import foolbox as fb

        fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=x.device)
        fatk = fb.attacks.L2DeepFoolAttack(steps=steps, candidates=candidates, overshoot=overshoot)
        return lambda: fatk(fmodel, x, y, epsilons=None)[0]
    raise KeyError(f"unknown DeepFool peer {lib!r}; known: {', '.join(DF_PEERS)}")
