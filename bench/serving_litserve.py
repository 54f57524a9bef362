"""The LitServe peer of the serving benchmark: MC dropout served the way LitServe users would write it.

The batch is repeated T times through the network in train mode (the usual vectorised MC dropout), then the
same summaries as dropwise. Run as a subprocess by `bench.serving_servers.litserve_server`:
``python -m bench.serving_litserve PACKAGE PORT``. ``pip install litserve`` (not a dependency of dropwise).
"""

from __future__ import annotations

import sys

from bench.serving_config import MAX_BATCH, SAMPLES

try:  # LitServe is optional: only the comparison row needs it.
    import litserve as ls
except ImportError:  # pragma: no cover - depends on the environment
    ls = None


if ls is not None:

    class MCDropoutLitAPI(ls.LitAPI):
        """LitServe serving MC dropout the way its users would: the batch repeated T times in train mode."""

        def __init__(self, package: str, samples: int, max_batch_size: int) -> None:
            super().__init__(max_batch_size=max_batch_size, batch_timeout=0.002)
            self.package = package
            self.samples = samples

        def setup(self, device: str) -> None:
            """Load the same package dropwise serves (weights verified by sha256)."""
            import torch
            from dropwise.package import load_package

            self.torch = torch
            self.model = load_package(self.package).model.to(device).train()

        def decode_request(self, request: dict) -> object:
            """One request: ``{"inputs": [[64 floats]]}`` -> a [64] float tensor."""
            return self.torch.tensor(request["inputs"][0], dtype=self.torch.float32)

        def batch(self, inputs: list) -> object:
            """Stack the decoded rows into one [B, 64] batch."""
            return self.torch.stack(inputs)

        def predict(self, x: object) -> dict[str, object]:
            """T stochastic passes in one batched forward, then the MC summaries per row."""
            torch = self.torch
            with torch.inference_mode():
                rows = x.shape[0]
                logits = self.model(x.repeat(self.samples, 1)).view(self.samples, rows, -1)
                log_p = torch.log_softmax(logits, dim=-1)
                p = log_p.exp()
                mean = p.mean(0)
                predictive = -(mean * mean.clamp_min(1e-12).log()).sum(-1)
                expected = -(p * log_p).sum(-1).mean(0)
                votes = torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).sum(0)
                return {
                    "probabilities": mean,
                    "predictions": mean.argmax(-1),
                    "predictive_entropy": predictive,
                    "expected_entropy": expected,
                    "mutual_information": (predictive - expected).clamp_min(0),
                    "variation_ratio": 1.0 - votes.max(-1).values / self.samples,
                    "std": p.std(0),
                }

        def unbatch(self, output: dict[str, object]) -> list[dict[str, object]]:
            """One dict of Python lists per request."""
            columns = {name: value.tolist() for name, value in output.items()}
            rows = len(columns["predictions"])
            return [{name: values[i] for name, values in columns.items()} for i in range(rows)]

        def encode_response(self, output: dict[str, object]) -> dict[str, object]:
            """Already JSON-ready (annotated loosely: LitServe builds its response model from this)."""
            return output


def _run_litserve(package: str, port: int) -> None:
    """Subprocess entry: LitServe on loopback, CPU, one inference worker, its own batching."""
    if ls is None:
        raise SystemExit("litserve is not installed")
    api = MCDropoutLitAPI(package, SAMPLES, MAX_BATCH)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    _run_litserve(sys.argv[1], int(sys.argv[2]))
