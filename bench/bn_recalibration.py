"""Variance shift (Li et al., CVPR 2019) on the zoo CNN, and its remedy ``dropwise.surgery.recalibrate_batchnorm``.

Trains ``cnn_mnist`` (BatchNorm, DropBlock, spatial dropout, dropout head) with the zoo's training code, then
for every BatchNorm layer prints the mean of:

- ``running``: the running variance accumulated in training (dropout ON upstream);
- ``on``: the variance of the layer's input over the training set, sites in train form (dropout ON);
- ``off``: the same with every site in eval form (dropout OFF, what the model sees at test time);
- ``recal``: the running variance after ``recalibrate_batchnorm`` (method cumulative with the training
  batch size and with 500, and method population);
- ``off*``: the dropout-OFF input variance of the recalibrated model (upstream BatchNorm layers now use
  their new statistics, so this is what each layer sees at test time); ``recal`` should equal it;

and the test accuracy before and after. Not a test (no assertion); figures vary with the machine's load only
in time, not in value (seeded).

    python -m bench.bn_recalibration            # full recipe (minutes on a CPU)
    python -m bench.bn_recalibration --quick    # one epoch
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from dropwise.models.data import load_dataset
from dropwise.models.training import seed_everything, train_model
from dropwise.models.zoo import ZOO, build
from dropwise.surgery import find_sites, recalibrate_batchnorm
from torch import Tensor, nn

_BN = nn.modules.batchnorm._BatchNorm


@torch.no_grad()
def input_variance(model: nn.Module, x: Tensor, *, sites_on: bool, batch_size: int = 500) -> dict[str, float]:
    """Mean over channels of each BatchNorm input's variance over all of ``x`` (BatchNorm itself in eval)."""
    work = copy.deepcopy(model).eval()
    if sites_on:
        modules = dict(work.named_modules())
        for site in find_sites(work):
            modules[site.name].training = True
    sums: dict[str, list[Tensor]] = {}

    def hook(name: str):
        def fn(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
            t = args[0].transpose(0, 1).reshape(args[0].shape[1], -1).double()
            acc = sums.setdefault(name, [torch.zeros(t.shape[0], dtype=torch.float64)] * 2 + [torch.zeros(())])
            sums[name] = [acc[0] + t.sum(1), acc[1] + (t * t).sum(1), acc[2] + t.shape[1]]

        return fn

    for name, m in work.named_modules():
        if isinstance(m, _BN):
            m.register_forward_pre_hook(hook(name))
    torch.manual_seed(0)
    for chunk in x.split(batch_size):
        work(chunk)
    out = {}
    for name, (s, ss, n) in sums.items():
        mean = s / n
        out[name] = float((ss / n - mean * mean).mean())
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one epoch instead of the full recipe")
    parser.add_argument("--network", default="cnn_mnist", choices=[n for n in ZOO if "cnn" in n or "resnet" in n])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = ZOO[args.network]
    data = load_dataset(spec.dataset)
    seed_everything(spec.train.seed)
    model = build(args.network)
    start = time.perf_counter()
    result = train_model(model, data, spec.train, quick=args.quick, progress=False)
    print(
        f"trained {args.network} ({'quick' if args.quick else 'full'}): {result.epochs} epochs, "
        f"{time.perf_counter() - start:.0f} s, test metrics {result.metrics}"
    )
    x_train = data.train[0]
    x_test, y_test = data.test
    running = {n: float(m.running_var.mean()) for n, m in model.named_modules() if isinstance(m, _BN)}
    on = input_variance(model, x_train, sites_on=True)
    off = input_variance(model, x_train, sites_on=False)
    acc_before = accuracy(model, x_test, y_test)
    runs = [("cumulative", spec.train.batch_size), ("cumulative", 500), ("population", 500)]
    for method, batch_size in runs:
        recalibrated = copy.deepcopy(model)
        report = recalibrate_batchnorm(recalibrated, x_train, batch_size=batch_size, method=method)
        recal = {c.name: c.var_after for c in report.layers}
        off_after = input_variance(recalibrated, x_train, sites_on=False)
        acc_after = accuracy(recalibrated, x_test, y_test)
        print(
            f"\nrecalibration method {method}, batch size {batch_size} "
            f"({report.batches} batches, {report.samples} images)"
        )
        print(
            f"{'BatchNorm':<10} {'running':>10} {'on':>10} {'off':>10} {'recal':>10} {'off*':>10} "
            f"{'|recal-off*|/off*':>18} {'|running-off*|/off*':>20}"
        )
        for name in running:
            print(
                f"{name:<10} {running[name]:>10.4f} {on[name]:>10.4f} {off[name]:>10.4f} "
                f"{recal[name]:>10.4f} "
                f"{off_after[name]:>10.4f} {abs(recal[name] - off_after[name]) / off_after[name]:>18.2%} "
                f"{abs(running[name] - off_after[name]) / off_after[name]:>20.2%}"
            )
        print(f"test accuracy before {acc_before:.4f}, after {acc_after:.4f} ({len(x_test)} test images)")


if __name__ == "__main__":
    main()
