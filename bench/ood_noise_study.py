"""Why does ``resnet_mnist`` answer "8" with near certainty on Gaussian noise? (issue 11, OOD detection)

``dropwise evaluate`` scores its Gaussian-noise OOD set (per-pixel mean and std of the test images) with an
AUROC below 0.5 on ``resnet_mnist`` for every score: noise looks MORE familiar than test digits. This study
separates the candidate causes on trained MNIST packages (deterministic forward passes, eval mode):

1. the noise set: the same network on other kinds of noise (clipped to the valid pixel range, i.i.d.
   N(0, 1) in standardised units, uniform pixels, binary pixels at the data's ink density) and on a blank
   image; if only the evaluation's noise fooled it, the set would be built wrongly;
2. the noise amplitude: ``mean + alpha * std * eps`` for alpha in 0..2 (alpha = 1 is the evaluation's set),
   with the norm of the features entering the classifier (the last ``nn.Linear``) and the AUROC that norm
   would give as an OOD score;
3. BatchNorm: the same noise with every BatchNorm using the batch's own statistics (train-mode BN, dropout
   off), and the test accuracy that costs;
4. the direction: the cosine between the mean noise feature and each class's weight vector.

Nothing is asserted. Run (packages from ``dropwise train resnet_mnist cnn_mnist fractal_mnist -r DIR``):
``python -m bench.ood_noise_study DIR --networks resnet_mnist,cnn_mnist,fractal_mnist``.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from dropwise.models.data import load_dataset
from dropwise.package import load_package
from dropwise.surgery.evaluate_metrics import ood_scores
from scipy.special import softmax
from torch import nn

ALPHAS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)


def noise_sets(x: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Kinds of noise shaped like the standardised MNIST test images ``x`` (see the module docstring)."""
    norm = load_dataset("mnist").normalisation
    mu, sd = float(norm["mean"]), float(norm["std"])  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    mean, std = x.mean(axis=0), x.std(axis=0)
    eps = rng.standard_normal(x.shape)
    ink = float((x * sd + mu).mean())

    def standardised(raw01: np.ndarray) -> np.ndarray:
        return ((raw01 - mu) / sd).astype(np.float32)

    return {
        "per-pixel Gaussian (the evaluation's set)": (mean + std * eps).astype(np.float32),
        "per-pixel Gaussian clipped to [0, 1] pixels": standardised(np.clip((mean + std * eps) * sd + mu, 0, 1)),
        "i.i.d. N(0, 1) (standardised units)": rng.standard_normal(x.shape).astype(np.float32),
        "uniform pixels in [0, 1]": standardised(rng.uniform(0, 1, x.shape)),
        f"binary pixels, ink density {ink:.2f}": standardised((rng.uniform(0, 1, x.shape) < ink).astype(float)),
        "blank (all pixels 0)": standardised(np.zeros(x.shape)),
    }


class Probe:
    """Logits and the features entering the last ``nn.Linear`` of a model, in batches."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.head = [mod for mod in model.modules() if isinstance(mod, nn.Linear)][-1]
        self._features: list[torch.Tensor] = []
        self.head.register_forward_hook(lambda _m, inputs, _o: self._features.append(inputs[0].detach()))

    @torch.inference_mode()
    def __call__(self, x: np.ndarray, model: nn.Module | None = None) -> tuple[np.ndarray, np.ndarray]:
        self._features.clear()
        net = model if model is not None else self.model
        logits = torch.cat([net(torch.from_numpy(x[i : i + 250])) for i in range(0, len(x), 250)])
        return logits.numpy(), torch.cat(self._features).numpy()


def _batch_stat_bn(model: nn.Module) -> nn.Module:
    """A copy whose BatchNorms normalise with the batch's own statistics (running stats left unchanged)."""
    twin = copy.deepcopy(model).eval()
    for mod in twin.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.train()
            mod.momentum = 0.0
    return twin


def study(package: Path, x: np.ndarray, y: np.ndarray, seed: int, out: Callable[[str], None]) -> None:
    """Print the four tables of the module docstring for one package."""
    model = load_package(package).model.eval()
    probe = Probe(model)
    z_test, f_test = probe(x)
    p_test = softmax(z_test, axis=1)
    u_test, n_test = 1.0 - p_test.max(axis=1), np.linalg.norm(f_test, axis=1)
    out(f"\n### {package}  (test: accuracy {(p_test.argmax(1) == y).mean():.3f}, mean max probability "
        f"{p_test.max(1).mean():.3f}, feature norm {n_test.mean():.1f})\n")  # fmt: skip
    out("| input | mean max probability | top class (share) | AUROC, deterministic max probability |")
    out("|---|---|---|---|")
    for name, noise in noise_sets(x, seed).items():
        z, _ = probe(noise)
        p = softmax(z, axis=1)
        share = np.bincount(p.argmax(1), minlength=p.shape[1]) / len(p)
        auroc = ood_scores(u_test, 1.0 - p.max(axis=1))["auroc"]
        out(f"| {name} | {p.max(1).mean():.3f} | {share.argmax()} ({share.max():.2f}) | {auroc:.3f} |")

    rng = np.random.default_rng(seed)
    mean, std, eps = x.mean(axis=0), x.std(axis=0), rng.standard_normal(x.shape)
    out("\n| alpha | mean max probability | top class (share) | feature norm | AUROC max prob | AUROC feature norm |")
    out("|---|---|---|---|---|---|")
    for alpha in ALPHAS:
        z, f = probe((mean + alpha * std * eps).astype(np.float32))
        p = softmax(z, axis=1)
        share = np.bincount(p.argmax(1), minlength=p.shape[1]) / len(p)
        norm = np.linalg.norm(f, axis=1)
        out(
            f"| {alpha} | {p.max(1).mean():.3f} | {share.argmax()} ({share.max():.2f}) | {norm.mean():.1f} | "
            f"{ood_scores(u_test, 1.0 - p.max(axis=1))['auroc']:.3f} | {ood_scores(n_test, norm)['auroc']:.3f} |"
        )

    noise = (mean + std * eps).astype(np.float32)
    if any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in model.modules()):
        twin = _batch_stat_bn(model)
        z_noise, _ = probe(noise, twin)
        z_bn_test, _ = probe(x, twin)
        p = softmax(z_noise, axis=1)
        share = np.bincount(p.argmax(1), minlength=p.shape[1]) / len(p)
        out(
            f"\nBatchNorm with batch statistics: noise mean max probability {p.max(1).mean():.3f}, top class "
            f"{share.argmax()} ({share.max():.2f}); test accuracy {(z_bn_test.argmax(1) == y).mean():.3f}"
        )
    _, f_noise = probe(noise)
    weight = probe.head.weight.detach().numpy()
    centre = f_noise.mean(axis=0)
    cosine = weight @ centre / (np.linalg.norm(weight, axis=1) * np.linalg.norm(centre) + 1e-12)
    out(f"cosine(class weight, mean noise feature) by class 0..9: {' '.join(f'{c:+.2f}' for c in cosine)}")


def main() -> None:
    """Parse arguments and print the study as markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("repository", type=Path, help="model repository holding trained MNIST packages")
    parser.add_argument("--networks", default="resnet_mnist,cnn_mnist,fractal_mnist")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = (t.numpy() for t in load_dataset("mnist").test)
    for name in args.networks.split(","):
        study(args.repository / name, x, y, args.seed, print)


if __name__ == "__main__":
    main()
