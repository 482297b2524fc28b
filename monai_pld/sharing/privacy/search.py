"""Nearest training image of each query, in pixels and in the features of a network trained on the real training
split, in chunks of bounded memory."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from monai_pld.data import ImageSet, ImageSource
from monai_pld.evaluation.training import train_classifier
from monai_pld.utils import derive_seed

logger = logging.getLogger("monai_pld")

# Chunk sizes of the nearest-neighbour search: a QUERY_CHUNK x REFERENCE_CHUNK float32 distance block (32 MB) plus
# one reference chunk as float is all the search holds beyond the queries, whatever the size of the training split.
QUERY_CHUNK = 1024
REFERENCE_CHUNK = 8192
EMBED_BATCH = 512


def _subset(n: int, limit: int | None, seed: int, stream: int) -> torch.Tensor:
    """Sorted indices of a seeded random subset of ``range(n)`` of size ``min(n, limit)`` (all when None)."""
    if limit is None or limit >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(derive_seed(seed, stream))
    return torch.sort(torch.randperm(n, generator=generator)[:limit]).values


def _nearest(
    queries: torch.Tensor, reference_chunks: Iterator[tuple[int, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to and position of the nearest reference vector of every query, streaming over reference chunks.

    Only the running minimum is kept, so memory is bounded by the chunk sizes, not by the size of the reference.

    Args:
        queries: ``(N, D)`` float vectors.
        reference_chunks: ``(offset, (m, D) vectors)`` pairs covering the reference in order.
        device: where the distances are computed.

    Returns:
        ``(N,)`` float32 Euclidean distances and ``(N,)`` int64 positions in the reference (first of ties).
    """
    best = torch.full((len(queries),), float("inf"))
    where = torch.zeros(len(queries), dtype=torch.long)
    for offset, chunk in reference_chunks:
        chunk = chunk.to(device)
        for start in range(0, len(queries), QUERY_CHUNK):
            q = queries[start : start + QUERY_CHUNK].to(device)
            distance, position = torch.cdist(q, chunk).min(1)
            distance, position = distance.cpu(), position.cpu()
            better = distance < best[start : start + QUERY_CHUNK]  # strict: an earlier chunk wins a tie
            best[start : start + QUERY_CHUNK][better] = distance[better]
            where[start : start + QUERY_CHUNK][better] = position[better] + offset
    return best, where


def _pixel_chunks(images: ImageSet, index: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    # converted to float one chunk at a time: the uint8 split is four times smaller than its float copy
    for start in range(0, len(index), REFERENCE_CHUNK):
        yield start, images.float_images(index[start : start + REFERENCE_CHUNK]).flatten(1)


def _tensor_chunks(vectors: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, len(vectors), REFERENCE_CHUNK):
        yield start, vectors[start : start + REFERENCE_CHUNK]


def _exact_pixel_distance(queries: torch.Tensor, train: ImageSet, train_index: torch.Tensor) -> torch.Tensor:
    """RMS distance of every query to the given training image, computed directly in float64.

    ``torch.cdist`` on large blocks expands ``|x - y|^2`` into ``|x|^2 + |y|^2 - 2 x.y``, whose float32 cancellation
    leaves an exact copy at a small non-zero distance; the nearest pairs found are re-measured without it.
    """
    out = torch.empty(len(queries), dtype=torch.float64)
    for start in range(0, len(queries), QUERY_CHUNK):
        q = queries[start : start + QUERY_CHUNK].double()
        r = train.float_images(train_index[start : start + QUERY_CHUNK]).flatten(1).double()
        out[start : start + QUERY_CHUNK] = (q - r).pow(2).mean(1).sqrt()
    return out


def _pixel_nearest(
    queries: torch.Tensor, train: ImageSet, reference: torch.Tensor, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """RMS distance to, and index into ``train`` of, the nearest reference training image of every query."""
    _, position = _nearest(queries, _pixel_chunks(train, reference), device)
    train_index = reference[position]
    return _exact_pixel_distance(queries, train, train_index).numpy(), train_index.numpy()


def _embedder(
    train: ImageSet,
    subset: torch.Tensor,
    backbone: str,
    epochs: int,
    seed: int,
    device: torch.device,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """Train ``backbone`` on the training images ``subset`` and return ``f(float images) -> unit feature vectors``."""
    mean, std = train.normalization()
    source = ImageSource(
        train.float_images(subset),
        train.labels[subset],
        {"kind": "privacy_audit_features", "images": len(subset)},
    )
    net, record = train_classifier(
        backbone,
        source,
        train.num_classes,
        mean,
        std,
        epochs=epochs,
        dsa_strategy=None,
        seed=derive_seed(seed, 3),
        device=device,
    )
    if not callable(getattr(net, "embed", None)):
        raise ValueError(
            f"feature_backbone {backbone!r} has no embed() method to take features from; use 'convnet' (or "
            "another backbone with embed), or feature_epochs=0 to audit in pixel space only"
        )
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)

    @torch.no_grad()
    def embed(images: torch.Tensor) -> torch.Tensor:
        parts = []
        for start in range(0, len(images), EMBED_BATCH):
            x = (images[start : start + EMBED_BATCH].to(device) - mean_t) / std_t
            parts.append(torch.nn.functional.normalize(net.embed(x).flatten(1).float(), dim=1).cpu())
        return torch.cat(parts)

    return embed, record


def _feature_chunks(
    train: ImageSet, reference: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, len(reference), REFERENCE_CHUNK):
        yield start, embed(train.float_images(reference[start : start + REFERENCE_CHUNK]))
