"""A served tiny BERT with two named inputs (input_ids, attention_mask), through a real uvicorn process.

The package comes from a ``save_pretrained`` directory through ``dropwise mc`` (no download); tritonclient
calls the Open Inference Protocol routes with both INT64 inputs (binary and JSON), and the native API takes
``{"input_ids": [[...]], "attention_mask": [[...]]}``.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
httpclient = pytest.importorskip("tritonclient.http")

from test_service_fixtures import running_server  # noqa: E402

from dropwise.cli import main  # noqa: E402

SEQ = 8
VOCAB = 50


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("bert")
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        initializer_range=0.5,  # large random weights: answers far from uniform, so the mask visibly matters
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(str(root / "tiny-bert"))
    repository = root / "repo"
    assert main(["mc", str(root / "tiny-bert"), "--input-shape", str(SEQ), "-o", str(repository)]) == 0
    env = {"DROPWISE_BACKEND": "torch", "DROPWISE_LOG_LEVEL": "warning"}
    with running_server(repository, "--device", "cpu", env=env, timeout=180) as url:
        yield url


def _batch(rows: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(rows, SEQ), dtype=np.int64)
    mask = np.ones((rows, SEQ), dtype=np.int64)
    mask[1, SEQ // 2 :] = 0  # a padded sequence
    return ids, mask


def _triton(url: str) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=120.0)


def _infer(client, ids: np.ndarray, mask: np.ndarray, binary: bool, **parameters: object) -> dict:
    inputs = []
    for name, array in (("input_ids", ids), ("attention_mask", mask)):
        tensor = httpclient.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    result = client.infer("tiny-bert", inputs, parameters=parameters or None)
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}


def test_metadata_lists_both_named_inputs(server: str) -> None:
    with _triton(server) as client:
        metadata = client.get_model_metadata("tiny-bert")
    assert [(i["name"], i["datatype"], i["shape"]) for i in metadata["inputs"]] == [
        ("input_ids", "INT64", [-1, SEQ]),
        ("attention_mask", "INT64", [-1, SEQ]),
    ]
    detail = httpx.get(f"{server}/v1/models/tiny-bert").json()
    assert [(i["name"], i["range"]) for i in detail["inputs"]] == [
        ("input_ids", [0, VOCAB]),
        ("attention_mask", [0, 2]),
    ]


def test_deterministic_binary_json_and_native_agree(server: str) -> None:
    ids, mask = _batch()
    with _triton(server) as client:
        binary = _infer(client, ids, mask, binary=True)
        as_json = _infer(client, ids, mask, binary=False)
    np.testing.assert_allclose(binary["probabilities"], as_json["probabilities"], atol=1e-6)
    native = httpx.post(
        f"{server}/v1/models/tiny-bert/predict",
        json={"inputs": {"input_ids": ids.tolist(), "attention_mask": mask.tolist()}},
        timeout=60,
    )
    assert native.status_code == 200, native.text
    np.testing.assert_allclose(np.array(native.json()["probabilities"]), binary["probabilities"], atol=1e-6)
    # the mask matters: unmasking the padded sequence changes its answer, and only its answer
    with _triton(server) as client:
        unmasked = _infer(client, ids, np.ones_like(mask), binary=True)
    assert np.abs(unmasked["probabilities"][1] - binary["probabilities"][1]).max() > 1e-3
    np.testing.assert_allclose(unmasked["probabilities"][[0, 2]], binary["probabilities"][[0, 2]], atol=1e-5)


def test_mc_carries_uncertainty_per_sequence_and_is_seeded(server: str) -> None:
    ids, mask = _batch()
    with _triton(server) as client:
        first = _infer(client, ids, mask, binary=True, mode="mc", num_samples=16, seed=3)
        again = _infer(client, ids, mask, binary=False, mode="mc", num_samples=16, seed=3)
        other = _infer(client, ids, mask, binary=True, mode="mc", num_samples=16, seed=4)
    assert first["mutual_information"].shape == (3,) and first["std"].shape == (3, 3)
    assert (first["std"].max(axis=1) > 0).all()  # every sequence has its own spread
    np.testing.assert_allclose(first["probabilities"], again["probabilities"], atol=1e-6)
    assert not np.allclose(first["probabilities"], other["probabilities"])


def test_missing_or_unknown_input_is_a_clear_400(server: str) -> None:
    ids, mask = _batch()
    only_ids = httpx.post(
        f"{server}/v1/models/tiny-bert/predict", json={"inputs": {"input_ids": ids.tolist()}}, timeout=60
    )
    assert only_ids.status_code == 400 and "missing ['attention_mask']" in only_ids.text
    one_array = httpx.post(f"{server}/v1/models/tiny-bert/predict", json={"inputs": ids.tolist()}, timeout=60)
    assert one_array.status_code == 400 and "several inputs" in one_array.text
    body = {
        "inputs": [
            {"name": "input_ids", "shape": list(ids.shape), "datatype": "INT64", "data": ids.ravel().tolist()},
            {"name": "tokens", "shape": list(mask.shape), "datatype": "INT64", "data": mask.ravel().tolist()},
        ]
    }
    v2 = httpx.post(f"{server}/v2/models/tiny-bert/infer", json=body, timeout=60)
    assert v2.status_code == 400 and "unknown ['tokens']" in v2.text and "missing ['attention_mask']" in v2.text
    big = ids.copy()
    big[0, 0] = VOCAB
    out_of_range = httpx.post(
        f"{server}/v1/models/tiny-bert/predict",
        json={"inputs": {"input_ids": big.tolist(), "attention_mask": mask.tolist()}},
        timeout=60,
    )
    assert out_of_range.status_code == 400 and out_of_range.json()["error"]["field"] == "inputs.input_ids"
