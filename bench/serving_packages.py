"""The packages the serving benchmark serves: untrained zoo CNN and MLP 64-256-256-10 (`bench.serving`)."""

from __future__ import annotations

from pathlib import Path

from bench.serving_config import CNN_NAME, MLP_NAME


def build_repository(root: Path, cnn_name: str = CNN_NAME) -> tuple[Path, tuple[int, ...]]:
    """Untrained packages of a zoo CNN and the MLP 64-256-256-10 (p=0.5 after each hidden layer).

    Returns the repository and the CNN's input shape (without the batch dimension).
    """
    import torch
    from dropwise.models.data import load_dataset
    from dropwise.models.zoo import ZOO, build
    from dropwise.package import save_package

    torch.manual_seed(0)
    cnn = ZOO[cnn_name]
    data = load_dataset(cnn.dataset)
    save_package(
        root,
        cnn_name,
        build(cnn_name).eval(),
        task=cnn.task,
        input_shape=list(data.input_shape),
        input_dtype=data.input_dtype,
        architecture={"factory": cnn.factory, "kwargs": cnn.kwargs},
        labels=data.labels,
        preprocessing="untrained weights: serving benchmark only",
    )
    from dropwise.models.zoo.mlp import dropout_mlp

    kwargs = {"in_features": 64, "hidden": [256, 256], "out_features": 10, "p_input": 0.0, "p_hidden": 0.5}
    save_package(
        root,
        MLP_NAME,
        dropout_mlp(**kwargs).eval(),
        task="classification",
        input_shape=[64],
        input_dtype="float32",
        architecture={"factory": "dropwise.models.zoo.mlp:dropout_mlp", "kwargs": kwargs},
        labels=[str(i) for i in range(10)],
        preprocessing="untrained weights: serving benchmark only",
    )
    return root, tuple(data.input_shape)
