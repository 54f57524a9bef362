"""A token-sequence classifier with embedding dropout (Keras SpatialDropout1D semantics; Tompson et al. 2015,
Gal and Ghahramani 2016 "A theoretically grounded application of dropout in recurrent neural networks").

``EmbeddingDropout`` on ``[B, L, E]``: train drops whole embedding dimensions of a sample across all ``L``
positions (mask ``[B, 1, E] / q``); eval ``x``; MC as train. A dropout head (inverted ``nn.Dropout``) follows.
"""

from __future__ import annotations

from dropwise.models.layers import EmbeddingDropout
from torch import nn


def embedding_classifier(
    vocab_size: int = 17,
    seq_len: int = 64,
    embed_dim: int = 16,
    hidden: int = 128,
    out_features: int = 10,
    p_embed: float = 0.2,
    p_head: float = 0.3,
) -> nn.Sequential:
    """Embedding -> EmbeddingDropout -> flatten -> Linear -> ReLU -> Dropout -> Linear.

    Input ``[B, seq_len]`` int64 tokens in ``[0, vocab_size)``, output ``[B, out_features]`` logits.
    """
    return nn.Sequential(
        nn.Embedding(vocab_size, embed_dim),
        EmbeddingDropout(p_embed),
        nn.Flatten(),
        nn.Linear(seq_len * embed_dim, hidden),
        nn.ReLU(),
        nn.Dropout(p_head),
        nn.Linear(hidden, out_features),
    )
