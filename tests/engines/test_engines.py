"""DistillationTrainer and generator pretraining, run for real on tiny synthetic data."""

import contextlib
import math
import os

import numpy as np
import pytest
import torch
from helpers import write_medmnist_npz

from monai_pld.data import load_medmnist
from monai_pld.defaults import DEFAULT_LEARNING_RATES
from monai_pld.engines import ensure_generator, pretrain_generator, reconstruction_metrics
from monai_pld.engines.generator import random_flips, warn_if_blurry
from monai_pld.evaluation import load_image_source
from monai_pld.formats import export_distilled_set
from monai_pld.networks.generators import AutoencoderKLGenerator, GeneratorCheckpointError, default_autoencoder_config
from monai_pld.workflows import build_optimizer, build_trainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_medmnist_npz(folder / "pathmnist.npz", n_per_split={"train": 72, "val": 18, "test": 18}, size=28)
    return folder, load_medmnist("pathmnist", "train", folder, download=False)


def _trainer(
    data, kind="slfd", iterations=3, seed=0, kl_weight=0.0, rank=4, include_mean=False, matcher_args=None, ipc=2, **kw
):
    torch.manual_seed(0)  # the untrained generator's weights
    generator = AutoencoderKLGenerator(**default_autoencoder_config(28, 3)).freeze()
    return build_trainer(
        data,
        kind,
        "dm",
        ipc=ipc,
        iterations=iterations,
        generator=generator,
        rank=rank,
        seed=seed,
        kl_weight=kl_weight,
        include_mean=include_mean,
        lr_codes=0.01,
        lr_network=0.001,
        batch_real_per_class=4,
        matcher_args={"embedder_kwargs": {"width": 16}, **(matcher_args or {})},
        device="cpu",
        **kw,
    )


def test_iterations_update_codes_and_network(tiny):
    trainer = _trainer(tiny[1])
    before = {k: v.clone() for k, v in trainer.parameterization.state_dict().items()}
    trainer.run()
    after = trainer.parameterization.state_dict()
    assert trainer.state.iteration == 3 and trainer.state.epoch == 3
    assert set(trainer.state.output[0]) == {"loss", "match_loss", "kl"}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "codes" in changed and any(k.startswith("head_") for k in changed)


def test_same_seed_same_result_other_seed_differs(tiny):
    runs = []
    for seed in (0, 0, 1):
        trainer = _trainer(tiny[1], seed=seed)
        trainer.run()
        runs.append(trainer.parameterization.mean().detach())
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])


def test_kl_term_is_used(tiny):
    trainer = _trainer(tiny[1], kl_weight=0.5, iterations=1)
    trainer.run()
    out = trainer.state.output[0]
    assert out["kl"] > 0 and out["loss"] == pytest.approx(out["match_loss"] + 0.5 * out["kl"], rel=1e-5)


@pytest.mark.parametrize("kind", ["latent", "pixel"])
def test_baseline_parameterizations_run(tiny, kind):
    data = tiny[1]
    if kind == "pixel":
        from monai_pld.networks.generators import PixelGenerator

        generator = PixelGenerator((3, 28, 28))
        trainer = build_trainer(
            data,
            "pixel",
            ipc=2,
            iterations=2,
            generator=generator,
            batch_real_per_class=4,
            matcher_args={"embedder_kwargs": {"width": 16}},
            device="cpu",
        )
        param = trainer.parameterization
        assert torch.allclose(param.mean()[0], data.float_images(torch.tensor([0]))[0]) or param.mean().max() <= 1
    else:
        trainer = _trainer(data, kind=kind, iterations=2)
    start = trainer.parameterization.mean().detach().clone()
    trainer.run()
    assert not torch.equal(start, trainer.parameterization.mean().detach())


def test_non_finite_loss_stops_with_a_clear_error(tiny):
    trainer = _trainer(tiny[1], iterations=1)
    with torch.no_grad():
        trainer.parameterization.codes.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="lr_codes"):
        trainer.run()


def test_interrupt_writes_a_final_checkpoint(tiny, tmp_path):
    trainer = _trainer(tiny[1], iterations=5, checkpoint_dir=tmp_path, checkpoint_interval=100)

    def stop(engine):
        if engine.state.iteration == 2:
            raise KeyboardInterrupt

    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED, stop)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    files = [p.name for p in tmp_path.glob("*.pt")]
    assert any("final_iteration=2" in f for f in files), files
    resumed = _trainer(tiny[1], iterations=5, checkpoint_dir=tmp_path, resume=True)
    resumed.run()
    whole = _trainer(tiny[1], iterations=5)
    whole.run()
    assert torch.allclose(resumed.parameterization.mean(), whole.parameterization.mean(), atol=1e-6)


def test_an_error_inside_a_step_leaves_the_checkpoint_of_the_last_whole_step(tiny, tmp_path):
    """Ctrl-C or a failure (e.g. a lost peer under torchrun) in the middle of iteration 3, before its optimiser
    step: the final checkpoint is that of iteration 2, and a resumed run equals an uninterrupted one."""
    trainer = _trainer(tiny[1], iterations=5, checkpoint_dir=tmp_path, checkpoint_interval=100)
    step = trainer._matching_step

    def failing(batchdata):
        if trainer.state.iteration == 3:
            raise KeyboardInterrupt
        return step(batchdata)

    trainer._matching_step = failing
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert [p.name for p in tmp_path.glob("*final*.pt")] == ["checkpoint_final_iteration=2.pt"]
    resumed = _trainer(tiny[1], iterations=5, checkpoint_dir=tmp_path, resume=True)
    resumed.run()
    whole = _trainer(tiny[1], iterations=5)
    whole.run()
    assert torch.allclose(resumed.parameterization.mean(), whole.parameterization.mean(), atol=1e-6)


@pytest.fixture(scope="module")
def pretrained(tiny, tmp_path_factory):
    folder, _ = tiny
    path = tmp_path_factory.mktemp("gen") / "g.pt"
    generator = pretrain_generator(
        path,
        "pathmnist",
        str(folder),
        download=False,
        steps=60,
        batch_size=8,
        lr=2e-3,
        val_interval=30,
        tracking_uri=f"sqlite:///{path.parent / 'mlruns.db'}",
    )
    return path, generator


def test_pretraining_improves_reconstruction_and_records_its_settings(tiny, pretrained):
    folder, _ = tiny
    path, generator = pretrained
    val = load_medmnist("pathmnist", "val", folder, download=False)
    torch.manual_seed(0)
    untrained = reconstruction_metrics(AutoencoderKLGenerator(**default_autoencoder_config(28, 3)), val)
    assert generator.metadata["val_mae"] < 0.5 * untrained["mae"]
    assert generator.metadata["val_ssim"] > untrained["ssim"]
    assert generator.metadata["train_images"] == 72 and generator.metadata["steps"] == 60
    settings = generator.metadata["settings"]
    assert settings["steps"] == 60 and settings["batch_size"] == 8 and settings["augment"] == "flip"
    assert settings["network"] == default_autoencoder_config(28, 3)


def test_existing_generator_is_reused_only_when_its_settings_match(tiny, pretrained, tmp_path):
    folder, _ = tiny
    path, generator = pretrained
    same = {"dataset_flag": "pathmnist", "dataset_dir": str(folder), "download": False, "steps": 60, "batch_size": 8}
    stamp = os.stat(path).st_mtime_ns
    again = ensure_generator(path, **same)
    assert os.stat(path).st_mtime_ns == stamp and again.checkpoint_sha256 == generator.checkpoint_sha256
    other = {**same, "steps": 90, "network": {"latent_channels": 8}}
    with pytest.raises(GeneratorCheckpointError, match=r"generator_steps: 60 -> 90; network.latent_channels: 4 -> 8"):
        ensure_generator(path, **other)
    assert ensure_generator(path, policy="any", **other).checkpoint_sha256 == generator.checkpoint_sha256
    copy = tmp_path / "copy.pt"
    copy.write_bytes(path.read_bytes())
    retrained = ensure_generator(copy, policy="retrain", **{**same, "steps": 2})
    assert retrained.metadata["settings"]["steps"] == 2 and retrained.latent_shape == generator.latent_shape
    assert ensure_generator(copy, **{**same, "steps": 2}).checkpoint_sha256 == retrained.checkpoint_sha256
    with pytest.raises(ValueError, match="'generator_policy' must be one of"):
        ensure_generator(path, policy="maybe", **same)


def test_a_blurry_generator_is_reported(caplog):
    with caplog.at_level("WARNING", logger="monai_pld"):
        assert warn_if_blurry(18.0, 22.0, 600, "g.pt")
        assert not warn_if_blurry(25.0, 22.0, 600, "g.pt")
    assert len(caplog.records) == 1 and "18.0 dB PSNR, below the quality floor of 22 dB" in caplog.text


def test_random_flips_only_flip():
    x = torch.arange(2 * 16, dtype=torch.float).view(2, 1, 4, 4)
    torch.manual_seed(0)
    flipped = random_flips(x.repeat(8, 1, 1, 1))
    variants = [x[:1], x[:1].flip(-1), x[:1].flip(-2), x[:1].flip(-1).flip(-2)]
    for image in flipped[::2]:
        assert any(torch.equal(image[None], v) for v in variants)
    assert len({tuple(i.flatten().tolist()) for i in flipped[::2]}) > 1


@pytest.mark.parametrize("kind", ["slfd", "latent"])
def test_exported_distribution_reloads(tiny, tmp_path, kind):
    from monai_pld.formats import export_distilled_set, load_distribution

    trainer = _trainer(tiny[1], kind=kind, iterations=2)
    trainer.run()
    manifest = export_distilled_set(tmp_path, trainer.parameterization, trainer.generator, tiny[1].class_names)
    loaded = load_distribution(tmp_path / "distribution.pt")
    assert type(loaded) is type(trainer.parameterization)
    assert torch.equal(loaded.mean(), trainer.parameterization.mean())
    images, _ = loaded.render(trainer.generator, mode="sample", seed=3)
    again, _ = trainer.parameterization.render(trainer.generator, mode="sample", seed=3)
    assert torch.allclose(images, again)
    with np.load(tmp_path / "images.npz", allow_pickle=False) as npz:
        expected = (trainer.parameterization.render(trainer.generator)[0].clamp(0, 1) * 255).round()
        assert np.array_equal(npz["images"], expected.to(torch.uint8).permute(0, 2, 3, 1).numpy())
    assert manifest["images"]["shape"] == [18, 28, 28, 3]
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.pt cannot be read"):
        load_distribution(tmp_path / "bad.pt")


def test_include_mean_matches_each_slot_mean_besides_its_samples(tiny):
    seen = []

    class Recording(torch.nn.Module):
        """Wraps the real DM matcher and keeps the synthetic images it was given."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def loss(self, syn_images, syn_labels, real_images, real_labels, step):
            seen.append((syn_images.detach().clone(), syn_labels.clone()))
            return self.inner.loss(syn_images, syn_labels, real_images, real_labels, step)

    trainer = _trainer(tiny[1], iterations=1, include_mean=True)
    generator, param = trainer.generator, trainer.parameterization
    expected, labels = param.render(generator, "mean")
    trainer.matcher = Recording(trainer.matcher)
    trainer.run()
    images, syn_labels = seen[0]
    n = param.num_slots
    assert len(images) == 2 * n and torch.equal(syn_labels[:n], labels) and torch.equal(syn_labels[n:], labels)
    torch.testing.assert_close(images[:n].clamp(0, 1), expected)
    assert not torch.allclose(images[n:], images[:n])  # the second half are samples around the means
    # deterministic codes are their own mean: nothing is added
    seen.clear()
    trainer = _trainer(tiny[1], kind="latent", iterations=1, include_mean=True)
    trainer.matcher = Recording(trainer.matcher)
    trainer.run()
    assert len(seen[0][0]) == trainer.parameterization.num_slots


def test_unbiased_estimator_gets_two_independent_halves_of_the_samples(tiny):
    seen = []

    class Recording(torch.nn.Module):
        """Wraps the real DM matcher and keeps the groups it was given."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def loss(self, syn_images, syn_labels, real_images, real_labels, step, syn_groups=None):
            seen.append((syn_images.detach().clone(), syn_groups))
            return self.inner.loss(syn_images, syn_labels, real_images, real_labels, step, syn_groups=syn_groups)

    unbiased = {"estimator": "unbiased"}
    trainer = _trainer(tiny[1], iterations=2, include_mean=True, samples_per_slot=2, matcher_args=unbiased)
    before = trainer.parameterization.codes.detach().clone()
    trainer.matcher = Recording(trainer.matcher)
    trainer.run()
    n = trainer.parameterization.num_slots
    images, groups = seen[0]
    assert groups.tolist() == [2] * n + [0] * n + [1] * n  # the means in both halves, then sample 0, sample 1
    assert not torch.allclose(images[n : 2 * n], images[2 * n :])  # two draws, not one
    assert math.isfinite(trainer.state.output[0]["loss"])
    assert not torch.equal(trainer.parameterization.codes, before)
    # an odd number of samples, or antithetic pairs (which are not independent), cannot be split in two halves
    for bad in ({"samples_per_slot": 1}, {"samples_per_slot": 2, "antithetic": True}):
        with pytest.raises(ValueError, match="two independent halves"):
            _trainer(tiny[1], iterations=1, matcher_args=unbiased, **bad)
    # deterministic codes have no samples to split: the pooled loss, one image per slot
    seen.clear()
    trainer = _trainer(tiny[1], kind="latent", iterations=1, matcher_args=unbiased)
    trainer.matcher = Recording(trainer.matcher)
    trainer.run()
    assert seen[0][1] is None and len(seen[0][0]) == trainer.parameterization.num_slots


@pytest.mark.parametrize("name,cls", [("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_optimizer_groups_and_learning_rates(tiny, name, cls):
    trainer = _trainer(tiny[1], iterations=1)
    optimizer = build_optimizer(trainer.parameterization, 0.3, 0.002, optimizer=name, momentum=0.5)
    assert isinstance(optimizer, cls)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["codes"]["lr"] == 0.3 and groups["network"]["lr"] == 0.002
    assert groups["codes"]["params"][0] is trainer.parameterization.codes
    if name == "sgd":
        assert groups["codes"]["momentum"] == 0.5
    with pytest.raises(ValueError, match="'optimizer' must be one of"):
        build_optimizer(trainer.parameterization, optimizer="lbfgs")


def test_a_feature_layer_run_is_read_back_at_its_layer(tiny, tmp_path):
    """Distil into decoder block 2; the exported distribution, read with the generator checkpoint alone, renders the
    images that images.npz holds."""
    _, data = tiny
    torch.manual_seed(0)
    path = tmp_path / "g.pt"
    AutoencoderKLGenerator(**default_autoencoder_config(28, 3)).save(path)
    trainer = build_trainer(
        data,
        "slfd",
        "dm",
        ipc=2,
        iterations=2,
        generator_path=path,
        generator_policy="any",
        latent_layer=2,
        rank=2,
        batch_real_per_class=4,
        device="cpu",
        matcher_args={"embedder_kwargs": {"width": 16}},
    )
    assert trainer.generator.latent_shape == (32, 14, 14) and trainer.parameterization.latent_shape == (32, 14, 14)
    assert trainer.optimizer.param_groups[0]["lr"] == DEFAULT_LEARNING_RATES[("feature", "dm")][0]
    trainer.run()
    manifest = export_distilled_set(
        tmp_path / "distilled", trainer.parameterization, trainer.generator, data.class_names
    )
    assert manifest["generator"]["latent_layer"] == 2 and manifest["parameterization"]["latent_layer"] == 2
    from_file = load_image_source(tmp_path / "distilled" / "distribution.pt", data, mode="mean")
    with np.load(tmp_path / "distilled" / "images.npz") as npz:
        exported = torch.from_numpy(npz["images"]).permute(0, 3, 1, 2).float() / 255
    assert (from_file.images - exported).abs().max() <= 1 / 255 + 1e-6


def _same_as_uninterrupted(resumed, whole):
    resumed.run()
    whole.run()
    assert torch.allclose(resumed.parameterization.mean(), whole.parameterization.mean(), atol=1e-6)


def test_ctrl_c_during_the_optimiser_step_is_taken_after_it(tiny, tmp_path):
    """A real SIGINT while the optimiser steps: the step completes, then the run stops with a checkpoint of that
    very iteration (not of the one before, which would pair iteration k-1 with parameters already stepped)."""
    import signal

    trainer = _trainer(tiny[1], iterations=5, checkpoint_dir=tmp_path, checkpoint_interval=100)
    real_step = trainer.optimizer.step

    def step(*args, **kwargs):
        if trainer.state.iteration == 3:
            signal.raise_signal(signal.SIGINT)
        return real_step(*args, **kwargs)

    trainer.optimizer.step = step
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    saved = torch.load(tmp_path / "checkpoint_final_iteration=3.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == 3 and saved["optimizer"]["state"][0]["step"] == 3
    _same_as_uninterrupted(
        _trainer(tiny[1], iterations=5, checkpoint_dir=tmp_path, resume=True), _trainer(tiny[1], iterations=5)
    )


def test_dc_interrupted_after_its_inner_update_resumes_exactly(tiny, tmp_path):
    """DC changes its own state (the inner network, its step counter) inside the loss; an interrupt later in the
    same step puts that back with the trainer's counter, so the run resumes and equals an uninterrupted one."""
    dc = {"model_kwargs": {"width": 8, "depth": 1}, "loops": [3, 1], "batch_train": 64}

    def trainer(**kwargs):
        torch.manual_seed(0)
        generator = AutoencoderKLGenerator(**default_autoencoder_config(28, 3)).freeze()
        return build_trainer(
            tiny[1], "slfd", "dc", ipc=2, iterations=4, generator=generator, rank=4, lr_codes=0.01,
            lr_network=0.001, batch_real_per_class=4, device="cpu", matcher_args=dc, **kwargs,
        )  # fmt: skip

    first = trainer(checkpoint_dir=tmp_path, checkpoint_interval=100)
    loss = first.matcher.loss

    def loss_then_interrupt(*args, **kwargs):
        value = loss(*args, **kwargs)
        if first.state.iteration == 2:
            raise KeyboardInterrupt
        return value

    first.matcher.loss = loss_then_interrupt
    with pytest.raises(KeyboardInterrupt):
        first.run()
    saved = torch.load(tmp_path / "checkpoint_final_iteration=1.pt", weights_only=True)
    assert int(saved["matcher"]["last_step"]) == 1
    _same_as_uninterrupted(trainer(checkpoint_dir=tmp_path, resume=True), trainer())


def test_a_checkpoint_write_that_fails_leaves_the_previous_one(tiny, tmp_path, monkeypatch):
    """A disk that fills up (or a kill) while iteration 4's checkpoint is written: the file of iteration 3 is
    still there and whole, no partial file looks like a checkpoint, and the run resumes from iteration 3."""
    import ignite.handlers.checkpoint as ignite_checkpoint

    real_save = torch.save
    trainer = _trainer(tiny[1], iterations=6, checkpoint_dir=tmp_path, checkpoint_interval=1)

    def save(obj, f, *args, **kwargs):
        if obj["trainer"]["iteration"] == 4:
            with open(f, "wb") if isinstance(f, str | os.PathLike) else contextlib.nullcontext(f) as file:
                file.write(b"half a checkpoint")
            raise OSError("No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ignite_checkpoint.torch, "save", save)
    with pytest.raises(OSError, match="No space"):
        trainer.run()
    monkeypatch.setattr(ignite_checkpoint.torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=3.pt"]
    _same_as_uninterrupted(
        _trainer(tiny[1], iterations=6, checkpoint_dir=tmp_path, resume=True), _trainer(tiny[1], iterations=6)
    )


def test_the_two_newest_periodic_checkpoints_are_kept(tiny, tmp_path):
    _trainer(tiny[1], iterations=5, checkpoint_dir=tmp_path, checkpoint_interval=1).run()
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [
        "checkpoint_epoch=4.pt",
        "checkpoint_epoch=5.pt",
        "checkpoint_final_iteration=5.pt",
    ]


def test_resume_refuses_a_checkpoint_of_another_run_and_keeps_it(tiny, tmp_path):
    """Another seed, another IPC, fewer iterations: a clear error before anything runs, and the checkpoint, which
    a failed resume used to overwrite with the new run's initial state, is left as it was."""
    from monai_pld.handlers import CheckpointError

    _trainer(tiny[1], iterations=2, checkpoint_dir=tmp_path, checkpoint_interval=1).run()
    files = {p: p.read_bytes() for p in tmp_path.glob("*.pt")}
    with pytest.raises(CheckpointError, match=r"seed 0 \(this run: 1\).*--resume false"):
        _trainer(tiny[1], iterations=2, seed=1, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match=r"parameterization\.codes is \(18, .*\) there, \(27, .*\) here"):
        _trainer(tiny[1], iterations=2, checkpoint_dir=tmp_path, resume=True, ipc=3).run()
    with pytest.raises(CheckpointError, match=r"at iteration 2, beyond this run's 1 \(set 'iterations' >= 2\)"):
        _trainer(tiny[1], iterations=1, checkpoint_dir=tmp_path, resume=True)
    assert {p: p.read_bytes() for p in tmp_path.glob("*.pt")} == files


def test_starting_anew_moves_the_earlier_checkpoints_aside(tiny, tmp_path):
    from monai_pld.handlers import latest_checkpoint

    _trainer(tiny[1], iterations=2, checkpoint_dir=tmp_path, checkpoint_interval=1).run()
    earlier = {p.name: p.read_bytes() for p in tmp_path.glob("*.pt")}
    _trainer(tiny[1], iterations=1, seed=1, checkpoint_dir=tmp_path, checkpoint_interval=100).run()
    (aside,) = tmp_path.glob("earlier_*")
    assert {p.name: p.read_bytes() for p in aside.glob("*.pt")} == earlier
    assert latest_checkpoint(tmp_path).name == "checkpoint_final_iteration=1.pt"
    _trainer(tiny[1], iterations=2, seed=1, checkpoint_dir=tmp_path, resume=True).run()  # its own: accepted
