"""MC dropout on a tiny Hugging Face BERT: cost relative to one deterministic forward (interleaved medians).

Model: ``BertForSequenceClassification`` from a config (4 layers, hidden 128, 4 heads, intermediate 512,
sdpa attention, random weights, no download), a batch of 8 sequences of 32 token ids, T = 32. Methods:

* ``deterministic``: one eval-mode forward, the unit of the ratios;
* ``engine, sites="last"``: ``MCEngine(model, x, "last")``, only the dropout before the classifier is
  stochastic; transformers 5.x is not fx-traceable, so the split comes from the ``torch.export`` front-end and
  the encoder (the trunk) runs once;
* ``naive loop, last``: T forwards with that same dropout module in train mode;
* ``engine, sites="all"``: every hidden and attention dropout keyed (the tail starts at the embeddings).

Each repetition runs every method once in a rotated order; a measurement is the mean over enough back-to-back
calls to last >= 20 ms; medians over repetitions. Run: ``python -m bench.bert_mc`` (``--repeats 11``).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from dropwise.surgery import MCEngine

from bench.thirdparty import bert


def _measure(fn: Callable[[], object]) -> float:
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= 0.02:
            return elapsed / calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    model, x = bert("sdpa", layers=4, hidden=128, seq=32, batch=8)
    T = args.samples
    last = MCEngine(model, x, "last")
    every = MCEngine(model, x, "all")
    naive = MCEngine(model, x, "last").model  # a private copy; its classifier dropout switched on below
    naive.dropout.train()

    def deterministic() -> object:
        with torch.inference_mode():
            return model(x)

    def naive_last() -> object:
        with torch.inference_mode():
            return [naive(x).logits for _ in range(T)]

    methods: dict[str, Callable[[], object]] = {
        "deterministic": deterministic,
        'engine, sites="last"': lambda: last(x, samples=T),
        "naive loop, last": naive_last,
        'engine, sites="all"': lambda: every(x, samples=T),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for rep in range(args.repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            times[name].append(_measure(methods[name]))
    unit = statistics.median(times["deterministic"])
    print(
        f"tiny BERT (4 x 128, seq 32, batch 8), T = {T}; split: last={last.split.frontend}, all={every.split.frontend}"
    )
    print(f"{'method':<24} {'ms':>8} {'x deterministic':>16}")
    for name in names:
        median = statistics.median(times[name])
        print(f"{name:<24} {median * 1e3:>8.2f} {median / unit:>16.2f}")


if __name__ == "__main__":
    main()
