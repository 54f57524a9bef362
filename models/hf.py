"""Hugging Face transformers classifiers as plain networks: named tensors in, logits out.

A model directory written by ``save_pretrained`` (``config.json`` + ``model.safetensors``) becomes a dropwise
model through :func:`from_config`: the factory rebuilds the transformers model from its configuration (no
download, no remote code) and wraps it so that its ``forward`` takes the model's inputs positionally, in the
order a package manifest lists them, and returns the logits tensor ``[B, num_labels]`` instead of a
``ModelOutput``. Every stochastic site (``nn.Dropout`` modules, attention dropout inside
``scaled_dot_product_attention`` or the eager attention, ``drop_path``) stays where transformers put it, gated by
the usual ``training`` flags, so ``find_sites`` / ``fold`` / ``to_mc`` treat it like any other network
(train: dropout active; eval: deterministic; MC: the sites' own flags set, everything else eval).

transformers is an optional dependency (``pip install dropwise[hf]``); importing this module does not import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor, nn

Head = Literal["sequence_classification", "image_classification"]

#: the positional inputs of each head, in manifest order
HEAD_INPUTS: dict[str, tuple[str, ...]] = {
    "sequence_classification": ("input_ids", "attention_mask"),
    "image_classification": ("pixel_values",),
}

#: transformers' class-name suffix of each head
_HEAD_SUFFIX = {
    "sequence_classification": "ForSequenceClassification",
    "image_classification": "ForImageClassification",
}


class SequenceClassifier(nn.Module):
    """``model(input_ids=..., attention_mask=...).logits`` with the inputs taken positionally."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class ImageClassifier(nn.Module):
    """``model(pixel_values=...).logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values=pixel_values).logits


def head_of(config: Mapping[str, Any]) -> Head:
    """The head a configuration's ``architectures`` names (``BertForSequenceClassification`` -> sequence)."""
    for arch in config.get("architectures") or []:
        for head, suffix in _HEAD_SUFFIX.items():
            if str(arch).endswith(suffix):
                return head  # type: ignore[return-value]
    raise ValueError(
        f"config.json names architectures {config.get('architectures')}: dropwise loads "
        f"*{_HEAD_SUFFIX['sequence_classification']} and *{_HEAD_SUFFIX['image_classification']} models"
    )


def _wrap(model: nn.Module, head: Head) -> SequenceClassifier | ImageClassifier:
    if head == "sequence_classification":
        return SequenceClassifier(model).eval()
    if head == "image_classification":
        return ImageClassifier(model).eval()
    raise ValueError(f"unknown head {head!r}; choose from {sorted(HEAD_INPUTS)}")


def _auto_class(head: Head) -> Any:
    import transformers

    if head == "sequence_classification":
        return transformers.AutoModelForSequenceClassification
    if head == "image_classification":
        return transformers.AutoModelForImageClassification
    raise ValueError(f"unknown head {head!r}; choose from {sorted(HEAD_INPUTS)}")


def from_pretrained(
    directory: str, head: Head, attn_implementation: str | None = None
) -> SequenceClassifier | ImageClassifier:
    """Load a local ``save_pretrained`` directory: safetensors only, no download, no remote code.

    transformers maps the checkpoint's parameter names to the current ones on the way (names change between
    transformers versions), so the wrapped model's ``state_dict`` is what :func:`from_config` rebuilds.
    """
    model = _auto_class(head).from_pretrained(
        directory,
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=False,
        attn_implementation=attn_implementation,
    )
    return _wrap(model, head)


def from_config(
    config: Mapping[str, Any], head: Head, attn_implementation: str | None = None
) -> SequenceClassifier | ImageClassifier:
    """Build the wrapped transformers classifier described by ``config`` (a ``config.json`` dict), untrained.

    Args:
        config: the configuration as ``save_pretrained`` writes it (``model_type`` required).
        head: ``"sequence_classification"`` or ``"image_classification"``.
        attn_implementation: ``"sdpa"`` or ``"eager"`` (None: transformers' default).
    """
    import transformers

    data = dict(config)
    model_type = data.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ValueError("config.json has no model_type")
    cfg = transformers.AutoConfig.for_model(model_type, **data)
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    return _wrap(_auto_class(head).from_config(cfg), head)


__all__ = [
    "HEAD_INPUTS",
    "ImageClassifier",
    "SequenceClassifier",
    "from_config",
    "from_pretrained",
    "head_of",
]
