"""DistillationTrainer and generator pretraining, run for real on tiny synthetic data."""

import os

import numpy as np
import pytest
import torch
from conftest import write_medmnist_npz

from monai_pld.builders import build_matcher, build_optimizer, build_parameterization
from monai_pld.data import ClassBalancedBatches, load_medmnist
from monai_pld.engines import DistillationTrainer, ensure_generator, pretrain_generator, reconstruction_metrics
from monai_pld.networks.generators import AutoencoderKLGenerator, default_autoencoder_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_medmnist_npz(folder / "pathmnist.npz", n_per_split={"train": 72, "val": 18, "test": 18}, size=28)
    return folder, load_medmnist("pathmnist", "train", folder, download=False)


def _trainer(data, kind="slfd", iterations=3, seed=0, kl_weight=0.0, rank=4, **kwargs):
    torch.manual_seed(0)  # the untrained generator's weights
    generator = AutoencoderKLGenerator(**default_autoencoder_config(28, 3)).freeze()
    param = build_parameterization(kind, generator, data, ipc=2, rank=rank, seed=seed, kl_weight=kl_weight)
    matcher = build_matcher("dm", data, seed=seed, embedder_kwargs={"width": 16})
    return DistillationTrainer(
        "cpu",
        iterations,
        ClassBalancedBatches(data, 4, seed=seed),
        param,
        generator,
        matcher,
        build_optimizer(param),
        kl_weight=kl_weight,
        seed=seed,
        **kwargs,
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
        param = build_parameterization("pixel", generator, data, ipc=2)
        assert torch.allclose(param.mean()[0], data.float_images(torch.tensor([0]))[0]) or param.mean().max() <= 1
        trainer = DistillationTrainer(
            "cpu",
            2,
            ClassBalancedBatches(data, 4),
            param,
            generator,
            build_matcher("dm", data, embedder_kwargs={"width": 16}),
            build_optimizer(param),
        )
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


def test_pretraining_improves_reconstruction_and_is_reused(tiny, tmp_path):
    folder, data = tiny
    val = load_medmnist("pathmnist", "val", folder, download=False)
    torch.manual_seed(0)
    untrained = reconstruction_metrics(AutoencoderKLGenerator(**default_autoencoder_config(28, 3)), val)
    path = tmp_path / "g.pt"
    generator = pretrain_generator(
        path,
        "pathmnist",
        str(folder),
        epochs=20,
        batch_size=8,
        lr=2e-3,
        tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}",
    )
    assert generator.metadata["val_mae"] < 0.5 * untrained["mae"]
    assert generator.metadata["train_images"] == 72 and generator.metadata["epochs"] == 20
    stamp = os.stat(path).st_mtime_ns
    again = ensure_generator(path)
    assert os.stat(path).st_mtime_ns == stamp and again.checkpoint_sha256 == generator.checkpoint_sha256


@pytest.mark.parametrize("kind", ["slfd", "latent"])
def test_exported_distribution_reloads(tiny, tmp_path, kind):
    from monai_pld.builders import load_distribution
    from monai_pld.handlers import export_distilled_set

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
