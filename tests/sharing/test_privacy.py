"""Privacy audit: copies are flagged and refused, unrelated images pass, distances and thresholds match a brute-force
computation, membership AUC, feature space, bad input, and the written report."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from monai_pld.data import ImageSet
from monai_pld.sharing import privacy
from monai_pld.sharing.privacy import PrivacyAuditError, audit_privacy, audit_summary, check_audit, search, write_audit

SIZE = 16


def textures(n_per_class, seed):
    """Three classes, each a fixed random base texture plus per-image noise of +-40 grey levels (values 20..235,
    so +-3 added below never clips)."""
    bases = torch.randint(60, 196, (3, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(123))
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    noise = torch.randint(-40, 41, (len(labels), 3, SIZE, SIZE), generator=gen)
    return ImageSet((bases[labels] + noise).to(torch.uint8), labels, ["a", "b", "c"], "toy")


def checkerboards(n, seed=5):
    """Images far from the textures: black/white checkerboards with a random phase and a little noise."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    phase = torch.randint(0, 2, (n, 1, 1), generator=gen)
    board = ((yy + xx + phase) % 2 * 255).unsqueeze(1).expand(n, 3, SIZE, SIZE)
    noise = torch.randint(0, 10, (n, 3, SIZE, SIZE), generator=gen)
    return (board - noise).clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def splits():
    return textures(30, seed=1), textures(20, seed=2)  # 90 training, 60 held-out images


def audit(synthetic, train, heldout, **kwargs):
    kwargs.setdefault("feature_epochs", 0)
    return audit_privacy(synthetic, torch.zeros(len(synthetic), dtype=torch.long), train, heldout, **kwargs)


def test_copies_are_flagged_and_refused(splits, caplog):
    train, heldout = splits
    gen = torch.Generator().manual_seed(9)
    signs = torch.randint(0, 2, (3, 3, SIZE, SIZE), generator=gen) * 2 - 1
    noisy = (train.images[[10, 40, 70]].int() + 3 * signs).to(torch.uint8)  # RMS exactly 3/255 from the original
    synthetic = torch.cat([train.images[[0, 31, 62]], noisy, checkerboards(4)])
    result = audit(synthetic, train, heldout)
    assert result["near_copies"] == 6
    assert result["exact_copies"] == 3
    assert result["pixel"]["flagged"] == [True] * 6 + [False] * 4
    assert result["pixel"]["flagged_fraction"] == pytest.approx(0.6)
    assert not result["passed"]
    assert result["pixel"]["synthetic_nn_distance"][3:6] == pytest.approx([3 / 255] * 3, rel=1e-6)
    assert [e["flagged"] for e in result["per_image"]] == result["pixel"]["flagged"]
    with pytest.raises(PrivacyAuditError, match=r"6 of 10 synthetic images.*--force true"):
        check_audit(result)
    with caplog.at_level(logging.WARNING, logger="monai_pld"):
        check_audit(result, force=True)
    assert "forced" in caplog.text


def test_unrelated_images_pass(splits):
    train, heldout = splits
    result = audit(checkerboards(12), train, heldout)
    assert result["near_copies"] == 0 and result["exact_copies"] == 0
    assert result["passed"] is True
    assert result["pixel"]["min_distance"] > result["pixel"]["threshold"]
    assert all(e["pixel_percentile"] == 100.0 for e in result["per_image"])
    check_audit(result)  # does not raise


def test_nearest_index_of_a_copy(splits):
    train, heldout = splits
    synthetic = checkerboards(6)
    synthetic[4] = train.images[57]
    result = audit(synthetic, train, heldout)
    assert result["pixel"]["nearest_train_index"][4] == 57
    assert result["per_image"][4]["nearest_train_index"] == 57
    assert result["pixel"]["synthetic_nn_distance"][4] == pytest.approx(0.0, abs=1e-9)
    assert result["near_copies"] == 1 and result["exact_copies"] == 1


def test_chunked_search_matches_brute_force(splits, monkeypatch):
    train, heldout = splits
    # chunks far smaller than the sets, so the running minimum crosses chunk borders
    monkeypatch.setattr(search, "QUERY_CHUNK", 4)
    monkeypatch.setattr(search, "REFERENCE_CHUNK", 7)
    synthetic = torch.cat([textures(3, seed=7).images, train.images[[5]]])
    result = audit(synthetic, train, heldout, percentile=10.0, max_reference=None, max_heldout=None)

    def brute(queries):
        q = queries.double().flatten(1) / 255
        r = train.images.double().flatten(1) / 255
        full = ((q[:, None, :] - r[None, :, :]) ** 2).mean(-1).sqrt()  # the whole N x M matrix
        return full.min(1).values.numpy(), full.argmin(1).numpy()

    syn_min, syn_arg = brute(synthetic)
    held_min, _ = brute(heldout.images)
    pixel = result["pixel"]
    assert pixel["synthetic_nn_distance"] == pytest.approx(syn_min.tolist(), abs=1e-6)
    assert pixel["nearest_train_index"] == syn_arg.tolist()
    assert pixel["threshold"] == pytest.approx(np.percentile(held_min, 10.0), abs=1e-6)
    assert pixel["heldout_percentiles"]["50"] == pytest.approx(np.median(held_min), abs=1e-6)
    expected_rank = [100.0 * np.mean(held_min < d) for d in syn_min]
    assert [e["pixel_percentile"] for e in result["per_image"]] == pytest.approx(expected_rank)
    assert pixel["flagged"] == (syn_min < np.percentile(held_min, 10.0)).tolist()


def test_subsets_are_seeded_and_bounded(splits):
    train, heldout = splits
    synthetic = checkerboards(3)
    a = audit(synthetic, train, heldout, max_reference=20, max_heldout=15, seed=3)
    b = audit(synthetic, train, heldout, max_reference=20, max_heldout=15, seed=3)
    settings = a["settings"]
    assert (settings["reference_images"], settings["heldout_images"], settings["member_images"]) == (20, 15, 15)
    assert settings["heldout_split"] == "toy" and settings["train_images"] == 90
    assert a == b
    assert all(0 <= i < len(train) for i in a["pixel"]["nearest_train_index"])


def test_membership_auc(splits):
    train, heldout = splits
    leaked = audit(train.images[:60], train, heldout)  # two thirds of the training split, verbatim
    assert leaked["membership_auc"] > 0.75
    assert leaked["near_copies"] == 60 and leaked["exact_copies"] == 60
    unrelated = audit(checkerboards(20), train, heldout)
    assert 0.3 < unrelated["membership_auc"] < 0.7


def test_feature_space(splits):
    train, heldout = splits
    synthetic = torch.cat([checkerboards(4), train.images[[12]]])
    result = audit(synthetic, train, heldout, feature_epochs=1)
    feature = result["feature"]
    assert len(feature["synthetic_nn_distance"]) == 5 and len(feature["flagged"]) == 5
    assert all(np.isfinite(e["feature_distance"]) for e in result["per_image"])
    assert feature["nearest_train_index"][4] == 12
    assert feature["synthetic_nn_distance"][4] < 1e-2  # identical image, identical unit feature vector
    assert 0.0 <= result["membership_auc_feature"] <= 1.0
    assert result["settings"]["feature_backbone"] == "convnet"
    json.dumps(result)  # plain Python types throughout


def test_backbone_without_embed_is_refused(splits, monkeypatch):
    monkeypatch.setattr(search, "train_classifier", lambda *a, **k: (torch.nn.Identity(), {"train_seconds": 0}))
    with pytest.raises(ValueError, match="no embed"):
        audit(checkerboards(2), *splits, feature_epochs=1)


def test_bad_input(splits):
    train, heldout = splits
    with pytest.raises(ValueError, match=r"shape \(C, H, W\) = \(3, 8, 8\).*\(3, 16, 16\)"):
        audit(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), train, heldout)
    small_heldout = ImageSet(
        torch.zeros(3, 1, 16, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), ["a", "b", "c"], "gray"
    )
    with pytest.raises(ValueError, match="held-out images have shape"):
        audit(train.images[:2], train, small_heldout)
    nan = torch.rand(2, 3, SIZE, SIZE)
    nan[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        audit(nan, train, heldout)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        audit(torch.rand(2, 3, SIZE, SIZE) * 255, train, heldout)
    for bad in (0, 100, -1.0, float("nan")):
        with pytest.raises(ValueError, match="'percentile'"):
            audit(train.images[:2], train, heldout, percentile=bad)
    with pytest.raises(ValueError, match="labels"):
        audit_privacy(train.images[:2], torch.zeros(3, dtype=torch.long), train, heldout, feature_epochs=0)


def test_float_and_uint8_inputs_agree(splits):
    train, heldout = splits
    synthetic = checkerboards(3)
    assert audit(synthetic, train, heldout) == audit(synthetic.float() / 255, train, heldout)


def test_write_audit(splits, tmp_path):
    train, heldout = splits
    synthetic = torch.cat([train.images[[3]], checkerboards(4)])
    result = audit(synthetic, train, heldout)
    paths = write_audit(result, tmp_path / "privacy", synthetic, train, top_k=3)
    assert json.loads(paths["json"].read_text()) == result
    with Image.open(paths["png"]) as png:
        png.load()
        # one 2.4-inch row per pair at 100 dpi, two panels across
        assert png.size == (440, 3 * 240)
    with Image.open(write_audit(result, tmp_path / "all", synthetic, train, top_k=50)["png"]) as png:
        assert png.size == (440, 5 * 240)  # capped at the 5 synthetic images
    summary = audit_summary(result)
    assert summary["near_copies"] == 1 and summary["passed"] is False
    assert summary["pixel_threshold"] == result["pixel"]["threshold"]
    assert summary["heldout_split"] == "toy" and summary["synthetic_images"] == 5
    with pytest.raises(ValueError, match="audit covers 5"):
        write_audit(result, tmp_path / "x", synthetic[:2], train)


# ---------------------------------------------------------------------------------------------------------------
# what a receiving site can draw: samples of the distribution and decodes of the generator's prior


class _FixedDecoder(torch.nn.Module):
    """A generator whose every decode is one of ``images`` (chosen by the latent's sign pattern): a decoder that
    memorised them, or one that draws unrelated images."""

    def __init__(self, images):
        super().__init__()
        self.register_buffer("images", images.float() / 255.0)
        self.latent_shape = (2, 2, 2)

    def decode(self, f):
        pick = (f.flatten(1)[:, 0] > 0).long() % len(self.images)
        return self.images[pick]


def _slfd(codes, labels, log_var):
    from monai_pld.parameterizations import SLFDistribution

    slfd = SLFDistribution(codes, labels, 3, rank=0, diagonal=True, log_var_min=-30.0, init_log_var=log_var)
    slfd.hyper_parameters = {"kind": "slfd"}
    return slfd


def test_distribution_samples_close_to_training_images_fail_the_audit(splits):
    from monai_pld.networks.generators import PixelGenerator

    train, heldout = splits
    index = [0, 1, 30, 31, 60, 61]
    generator = PixelGenerator((3, SIZE, SIZE))
    far = checkerboards(6)
    # slots at training images with a tiny variance: every sample is a near-copy
    copying = _slfd(train.float_images(torch.tensor(index)), train.labels[index], log_var=-25.0)
    drawn = privacy.shared_model_images(copying, generator, samples_per_slot=3, prior_samples=5, seed=1)
    assert set(drawn) == {"distribution_samples"}  # the pixel identity has no prior to sample
    assert drawn["distribution_samples"]["images"].shape == (18, 3, SIZE, SIZE)
    result = audit(far, train, heldout, drawn=drawn)
    assert result["near_copies"] == 0 and result["drawn"]["distribution_samples"]["near_copies"] == 18
    assert not result["passed"] and result["drawn_near_copies"] == 18
    assert audit_summary(result)["drawn"]["distribution_samples"]["near_copies"] == 18
    with pytest.raises(PrivacyAuditError, match=r"18 of 18 distribution samples .*include_distribution false"):
        check_audit(result)
    # slots far from every training image: their samples pass
    unrelated = _slfd(far.float() / 255.0, train.labels[index], log_var=-25.0)
    drawn = privacy.shared_model_images(unrelated, generator, samples_per_slot=3, seed=1)
    result = audit(far, train, heldout, drawn=drawn)
    assert result["passed"] and result["drawn"]["distribution_samples"]["near_copies"] == 0


def test_generator_prior_decodes_are_audited(splits):
    train, heldout = splits
    far = checkerboards(4)
    memorised = privacy.shared_model_images(None, _FixedDecoder(train.images[[5, 50]]), prior_samples=40, seed=0)
    assert memorised["generator_prior"]["images"].shape == (40, 3, SIZE, SIZE)
    result = audit(far, train, heldout, drawn=memorised)
    report = result["drawn"]["generator_prior"]
    assert report["near_copies"] == 40 and report["exact_copies"] == 40
    assert {c["nearest_train_index"] for c in report["closest"]} <= {5, 50}
    assert not result["passed"]
    harmless = privacy.shared_model_images(None, _FixedDecoder(checkerboards(2, seed=8)), prior_samples=40)
    assert audit(far, train, heldout, drawn=harmless)["passed"]
