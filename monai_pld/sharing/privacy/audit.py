"""Privacy audit of a synthetic image set before it leaves the hospital: is any synthetic image a near-copy of a
real training image?

A synthetic image is compared with its nearest training image. "Near" is calibrated on real images the distillation
never saw: the held-out split's nearest-training-image distances tell how close an unrelated real image of the same
kind typically comes to the training set, and a synthetic image closer than the ``percentile``-th of those is
flagged. Distances are RMS per-pixel differences in ``[0, 1]`` (so thresholds compare across image sizes) and,
optionally, Euclidean distances between L2-normalised features of a network trained on the real training split.

What a receiving site can draw is audited with the same rule: many samples of a shipped distribution (several per
slot) and decodes of random latents from the shipped generator's prior (a standard normal over its latent), each
against the training images (:func:`shared_model_images`, the ``drawn`` argument of :func:`audit_privacy`).

A membership-inference AUC summarises the whole set: can training images be told from held-out images by how close
they come to the synthetic set? 0.5 means no signal; near 1 means the synthetic set reveals who was in the training
split.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from monai_pld.data import ImageSet
from monai_pld.utils import derive_seed, resolve_device

from .search import _embedder, _feature_chunks, _nearest, _pixel_nearest, _subset, _tensor_chunks

logger = logging.getLogger("monai_pld")

# an RMS difference of at most one grey level: identical after uint8 rounding, up to tiny noise
EXACT_COPY_DISTANCE = 1.0 / 255.0
REPORTED_PERCENTILES = (1, 5, 50)
# closest drawn images kept per source in the audit record (all distances would be thousands of numbers)
DRAWN_CLOSEST = 8


class PrivacyAuditError(ValueError):
    """The audit found synthetic images that are near-copies of training images and export was not forced."""


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
        raise ValueError(f"'{name}' must be a positive integer or None (use all images), got {value!r}")


def _as_unit_float(synthetic: torch.Tensor) -> torch.Tensor:
    """Synthetic images as float32 in ``[0, 1]`` on the CPU."""
    if not isinstance(synthetic, torch.Tensor) or synthetic.ndim != 4:
        got = (getattr(synthetic, "dtype", type(synthetic)), tuple(getattr(synthetic, "shape", ())))
        raise ValueError(f"synthetic images must be a tensor (N, C, H, W), got {got}")
    x = synthetic.detach().cpu()
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.dtype.is_floating_point:
        raise ValueError(
            f"synthetic images must be uint8 (0..255) or float in [0, 1], got dtype {x.dtype}; convert them first"
        )
    x = x.float()
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise ValueError(f"synthetic images contain NaN or infinite values ({bad} images); re-render or re-distil them")
    # a small overshoot is rendering noise that uint8 export clamps away; a large one means another scale
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"float synthetic images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; rescale them (e.g. "
            "(x + 1) / 2 for [-1, 1] images, x / 255 for 0..255) or pass uint8"
        )
    return x.clamp_(0.0, 1.0)


def _check_inputs(
    synthetic: torch.Tensor, synthetic_labels: torch.Tensor, train: ImageSet, heldout: ImageSet, percentile: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x = _as_unit_float(synthetic)
    if len(x) == 0:
        raise ValueError("the synthetic set is empty; there is nothing to audit")
    if len(train) == 0 or len(heldout) == 0:
        raise ValueError(
            f"the audit needs real training and held-out images, got {len(train)} training and {len(heldout)} "
            "held-out images"
        )
    shape = tuple(x.shape[1:])
    train_shape, heldout_shape = tuple(train.images.shape[1:]), tuple(heldout.images.shape[1:])
    if shape != train_shape:
        raise ValueError(
            f"synthetic images have shape (C, H, W) = {shape} but the training images {train_shape}; audit against "
            "the dataset_flag and image_size the set was distilled from"
        )
    if heldout_shape != train_shape:
        raise ValueError(
            f"held-out images have shape (C, H, W) = {heldout_shape} but the training images {train_shape}; load "
            "both splits with the same image_size"
        )
    labels = torch.as_tensor(synthetic_labels).detach().cpu()
    if labels.ndim != 1 or labels.dtype.is_floating_point or len(labels) != len(x):
        raise ValueError(
            f"synthetic labels must be integers of shape ({len(x)},), one per image, got {labels.dtype} "
            f"{tuple(labels.shape)}"
        )
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= train.num_classes:
        raise ValueError(
            f"synthetic labels must lie in [0, {train.num_classes}) for the {train.num_classes} training classes, "
            f"found {int(labels.min())}..{int(labels.max())}; audit against the dataset the set was distilled from"
        )
    ok = isinstance(percentile, (int, float, np.number)) and not isinstance(percentile, bool)
    if not (ok and math.isfinite(percentile) and 0 < percentile < 100):
        raise ValueError(f"'percentile' must be a number strictly between 0 and 100, got {percentile!r}; e.g. 5")
    return x, labels


def _space_report(
    synthetic_distance: np.ndarray, nearest: np.ndarray, heldout_distance: np.ndarray, percentile: float
) -> dict[str, Any]:
    threshold = float(np.percentile(heldout_distance, percentile))
    flagged = synthetic_distance < threshold
    return {
        "threshold": threshold,
        "heldout_percentiles": {str(p): float(np.percentile(heldout_distance, p)) for p in REPORTED_PERCENTILES},
        "synthetic_nn_distance": [float(d) for d in synthetic_distance],
        "nearest_train_index": [int(i) for i in nearest],
        "flagged": [bool(f) for f in flagged],
        "flagged_fraction": float(flagged.mean()),
        "min_distance": float(synthetic_distance.min()),
        "median_distance": float(np.median(synthetic_distance)),
    }


def _percentile_of(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """For every value, the percentage of ``reference`` strictly below it."""
    return 100.0 * np.searchsorted(np.sort(reference), values, side="left") / len(reference)


def _membership_auc(member_distance: np.ndarray, heldout_distance: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    # members are the positives; a closer approach to the synthetic set (a larger -distance) should mean "member"
    truth = np.concatenate([np.ones(len(member_distance)), np.zeros(len(heldout_distance))])
    return float(roc_auc_score(truth, -np.concatenate([member_distance, heldout_distance])))


@torch.no_grad()
def shared_model_images(
    distribution: torch.nn.Module | None = None,
    generator: torch.nn.Module | None = None,
    samples_per_slot: int = 8,
    prior_samples: int = 256,
    seed: int = 0,
    prior_generator: torch.nn.Module | None = None,
    chunk_size: int = 256,
) -> dict[str, dict[str, Any]]:
    """Images a receiving site can draw from what a package ships, for :func:`audit_privacy` ``drawn``.

    * ``distribution_samples``: ``samples_per_slot`` seeded draws of every slot of a stochastic distribution
      (``render(generator, "sample", seed)``); deterministic codes have nothing beyond their images and are skipped.
    * ``generator_prior``: ``prior_samples`` decodes of latents drawn from the generator's prior, a standard normal
      of shape ``latent_shape`` (the AutoencoderKL's KL term pulls its latents towards it), by ``prior_generator``
      when given (the bottleneck generator when the distribution uses an intermediate layer), else ``generator``.
      A generator without a prior to sample (the pixel identity) is skipped.

    Returns:
        ``{name: {"images": float (N, C, H, W) in [0, 1], "source": description}}``.
    """
    _check_limit("samples_per_slot", samples_per_slot)
    _check_limit("prior_samples", prior_samples)
    drawn: dict[str, dict[str, Any]] = {}
    stochastic = distribution is not None and distribution.hyper_parameters.get("kind") == "slfd"
    if stochastic and generator is not None:
        images = [
            distribution.render(generator, "sample", seed=derive_seed(seed, 20, s))[0] for s in range(samples_per_slot)
        ]
        drawn["distribution_samples"] = {
            "images": torch.cat(images).cpu(),
            "source": f"{samples_per_slot} samples of each of the distribution's {len(images[0])} slots",
        }
    decoder = prior_generator if prior_generator is not None else generator
    if decoder is not None and type(decoder).__name__ != "PixelGenerator":
        device = next(iter(decoder.parameters()), torch.empty(0)).device
        rng = torch.Generator().manual_seed(derive_seed(seed, 21))
        latents = torch.randn(int(prior_samples), *decoder.latent_shape, generator=rng)
        images = [decoder.decode(chunk.to(device)).clamp(0.0, 1.0).cpu() for chunk in latents.split(chunk_size)]
        drawn["generator_prior"] = {
            "images": torch.cat(images),
            "source": f"{prior_samples} decodes of standard-normal latents {tuple(decoder.latent_shape)}",
        }
    return drawn


def _drawn_report(distance: np.ndarray, nearest: np.ndarray, threshold: float, source: str) -> dict[str, Any]:
    flagged = distance < threshold
    order = np.argsort(distance, kind="stable")[:DRAWN_CLOSEST]
    return {
        "source": source,
        "images": len(distance),
        "threshold": threshold,
        "near_copies": int(flagged.sum()),
        "exact_copies": int((distance <= EXACT_COPY_DISTANCE).sum()),
        "flagged_fraction": float(flagged.mean()),
        "min_distance": float(distance.min()),
        "median_distance": float(np.median(distance)),
        "closest": [
            {"index": int(i), "pixel_distance": float(distance[i]), "nearest_train_index": int(nearest[i])}
            for i in order
        ],
    }


def audit_privacy(
    synthetic: torch.Tensor,
    synthetic_labels: torch.Tensor,
    train: ImageSet,
    heldout: ImageSet,
    percentile: float = 5.0,
    feature_epochs: int = 1,
    feature_backbone: str = "convnet",
    max_reference: int | None = None,
    max_heldout: int | None = 2000,
    feature_train_images: int | None = 20000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    drawn: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Check that no synthetic image is a near-copy of a real training image.

    Every synthetic image's nearest neighbour among the (sub-sampled) training images is found, in pixel space and,
    with ``feature_epochs > 0``, in the feature space of ``feature_backbone`` trained on the training images. The
    held-out images' nearest-training-image distances calibrate the flagging threshold: a synthetic image closer to a
    training image than the ``percentile``-th held-out image is flagged. Pixel-space flags decide ``passed``.

    Args:
        synthetic: synthetic images, ``uint8`` ``(N, C, H, W)`` or float in ``[0, 1]``.
        synthetic_labels: their ``int64`` labels ``(N,)``.
        train: the real training split, whose images must not leak.
        heldout: a real split the distillation never saw (the test split by default).
        percentile: flag a synthetic image closer to a training image than this percentile of the held-out
            images' nearest-training-image distances; in ``(0, 100)``.
        feature_epochs: epochs of the feature network trained on the training images (0 skips feature space).
        feature_backbone: classifier registry name of the feature network; it needs an ``embed`` method.
        max_reference: at most this many training images (a seeded random subset) serve as nearest-neighbour
            reference; None (the default) searches every training image, so no near-copy can hide outside a sample
            (14 s for PathMNIST's 89,996 images on one CPU thread).
        feature_train_images: the feature network trains on at most this many training images (a seeded subset);
            None uses all.
        max_heldout: at most this many held-out images (a seeded random subset); the membership test uses as many
            training images (another seeded subset). None uses all.
        seed: seed of the subsets and of the feature network.
        device: where distances and features are computed.
        drawn: further images a receiving site can draw (:func:`shared_model_images`), each ``{"images",
            "source"}``; they are held to the same pixel-space threshold, and a near-copy among them fails the audit
            as one among the synthetic images does.

    Returns:
        A JSON-serialisable dict: ``settings``, ``pixel`` (and ``feature``) with the threshold, held-out distance
        percentiles, per-image nearest distances, nearest training indices and flags; ``exact_copies``,
        ``near_copies``, ``passed``, ``membership_auc`` (and ``membership_auc_feature``), ``per_image`` and, with
        ``drawn``, ``drawn`` (per source: counts, distances and the closest images) and ``drawn_near_copies``.

    Raises:
        ValueError: for images of different shapes, labels that do not fit, NaN or out-of-range float images, a
            percentile outside ``(0, 100)``, bad limits, or a feature backbone without ``embed``.
    """
    x, labels = _check_inputs(synthetic, synthetic_labels, train, heldout, percentile)
    _check_limit("max_reference", max_reference)
    _check_limit("max_heldout", max_heldout)
    _check_limit("feature_train_images", feature_train_images)
    if isinstance(feature_epochs, bool) or not isinstance(feature_epochs, (int, np.integer)) or feature_epochs < 0:
        raise ValueError(f"'feature_epochs' must be an integer >= 0 (0 skips feature space), got {feature_epochs!r}")
    dev = resolve_device(device)
    reference = _subset(len(train), max_reference, seed, 0)
    heldout_index = _subset(len(heldout), max_heldout, seed, 1)
    member_index = _subset(len(train), len(heldout_index), seed, 2)

    x_flat = x.flatten(1)
    heldout_flat = heldout.float_images(heldout_index).flatten(1)
    drawn_flat = {}
    for name, entry in (drawn or {}).items():
        images = _as_unit_float(entry["images"])
        if tuple(images.shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(f"drawn images {name!r} have shape {tuple(images.shape[1:])}, not {tuple(x.shape[1:])}")
        drawn_flat[name] = images.flatten(1)
    # one pass over the reference for synthetic, held-out and drawn queries together
    queries = torch.cat([x_flat, heldout_flat, *drawn_flat.values()])
    distance, nearest = _pixel_nearest(queries, train, reference, dev)
    end = len(x) + len(heldout_flat)
    syn_distance, syn_nearest, heldout_distance = distance[: len(x)], nearest[: len(x)], distance[len(x) : end]
    pixel = _space_report(syn_distance, syn_nearest, heldout_distance, percentile)
    drawn_reports = {}
    for name, flat in drawn_flat.items():
        part = slice(end, end + len(flat))
        drawn_reports[name] = _drawn_report(distance[part], nearest[part], pixel["threshold"], drawn[name]["source"])
        end += len(flat)

    # membership: the synthetic set is the reference, training (member) and held-out images are the queries
    scale = math.sqrt(x_flat.shape[1])
    member_flat = train.float_images(member_index).flatten(1)
    member_to_syn, _ = _nearest(member_flat, _tensor_chunks(x_flat), dev)
    heldout_to_syn, _ = _nearest(heldout_flat, _tensor_chunks(x_flat), dev)
    membership_auc = _membership_auc(member_to_syn.numpy() / scale, heldout_to_syn.numpy() / scale)

    audit: dict[str, Any] = {
        "settings": {
            "percentile": float(percentile),
            "feature_epochs": int(feature_epochs),
            "feature_backbone": feature_backbone if feature_epochs > 0 else None,
            "max_reference": None if max_reference is None else int(max_reference),
            "max_heldout": None if max_heldout is None else int(max_heldout),
            "feature_train_images": None if feature_train_images is None else int(feature_train_images),
            "seed": int(seed),
            "device": str(dev),
            "distance": "RMS per-pixel difference of images in [0, 1]",
            "train_name": train.name,
            "heldout_split": heldout.name,
            "synthetic_images": len(x),
            "train_images": len(train),
            "reference_images": len(reference),
            "heldout_images": len(heldout_index),
            "heldout_split_images": len(heldout),
            "member_images": len(member_index),
            "image_shape": [int(s) for s in x.shape[1:]],
        },
        "pixel": pixel,
    }
    feature = None
    if feature_epochs > 0:
        feature_train = _subset(len(train), feature_train_images, seed, 3)
        embed, record = _embedder(train, feature_train, feature_backbone, int(feature_epochs), seed, dev)
        syn_feat, heldout_feat = embed(x), embed(heldout_flat.view(-1, *x.shape[1:]))
        # embedding the reference is the costly part: done once, chunk by chunk, for all queries
        queries = torch.cat([syn_feat, heldout_feat])
        f_distance, f_position = _nearest(queries, _feature_chunks(train, reference, embed), dev)
        f_distance, f_nearest = f_distance.numpy(), reference[f_position].numpy()
        feature = _space_report(f_distance[: len(x)], f_nearest[: len(x)], f_distance[len(x) :], percentile)
        feature["train_seconds"] = record["train_seconds"]
        audit["feature"] = feature
        member_feat = embed(member_flat.view(-1, *x.shape[1:]))
        m_to_syn, _ = _nearest(member_feat, _tensor_chunks(syn_feat), dev)
        h_to_syn, _ = _nearest(heldout_feat, _tensor_chunks(syn_feat), dev)
        audit["membership_auc_feature"] = _membership_auc(m_to_syn.numpy(), h_to_syn.numpy())

    pixel_percentile = _percentile_of(syn_distance, heldout_distance)
    near_copies = int(sum(pixel["flagged"]))
    drawn_near = sum(r["near_copies"] for r in drawn_reports.values())
    audit.update(
        {
            "exact_copies": int((syn_distance <= EXACT_COPY_DISTANCE).sum()),
            "near_copies": near_copies,
            "passed": near_copies == 0 and drawn_near == 0,
            "membership_auc": membership_auc,
        }
    )
    if drawn_reports:
        audit["drawn"] = drawn_reports
        audit["drawn_near_copies"] = drawn_near
    per_image = []
    for i in range(len(x)):
        entry: dict[str, Any] = {
            "index": i,
            "label": int(labels[i]),
            "pixel_distance": float(syn_distance[i]),
            "pixel_percentile": float(pixel_percentile[i]),
            "nearest_train_index": int(syn_nearest[i]),
        }
        if feature is not None:
            entry["feature_distance"] = feature["synthetic_nn_distance"][i]
            entry["feature_nearest_train_index"] = feature["nearest_train_index"][i]
            entry["feature_flagged"] = feature["flagged"][i]
        entry["flagged"] = pixel["flagged"][i]
        per_image.append(entry)
    audit["per_image"] = per_image
    return audit
