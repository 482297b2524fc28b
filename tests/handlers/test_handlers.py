import logging

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from monai_pld.data import ImageSet
from monai_pld.handlers import (
    CheckpointError,
    DistilledSetExporter,
    ProgressLogger,
    ResumeFromCheckpoint,
    SyntheticImageGrid,
    format_duration,
    image_grid,
    latest_checkpoint,
    save_png,
)
from monai_pld.networks.generators import PixelGenerator
from monai_pld.workflows import build_trainer


def test_format_duration():
    assert format_duration(4.24) == "4.2s"
    assert format_duration(125) == "2m05s"
    assert format_duration(3725) == "1h02m05s"


def test_progress_logger_lines(caplog):
    engine = Engine(lambda e, b: {"loss": 1.5})
    ProgressLogger(interval=2, name="progress_test", prefix="distillation").attach(engine)
    with caplog.at_level(logging.INFO, logger="progress_test"):
        engine.run([0] * 5, max_epochs=1)
    lines = [r.getMessage() for r in caplog.records]
    steps = [line for line in lines if line.startswith("distillation ") and "s/it" in line]
    assert [s.split()[1] for s in steps] == ["2/5", "4/5", "5/5"]  # every interval and the last iteration
    assert "loss 1.5" in steps[0] and "ETA" in steps[0]
    assert engine.state.seconds_per_iteration >= 0
    assert "distillation: starting, 5 iterations" in lines  # an engine without an optimiser: no learning rates


def _tiny_pixel_trainer(per_class, **options):
    """A pixel DM trainer of one image per class on three classes of ``per_class`` random 8 x 8 images (CPU);
    ``options`` are further :func:`build_trainer` keywords (``iterations``, ``handlers``...)."""
    images = torch.randint(
        0, 256, (3 * per_class, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    data = ImageSet(images, torch.arange(3).repeat_interleave(per_class), ["a", "b", "c"], "tiny")
    return build_trainer(
        data,
        "pixel",
        ipc=1,
        generator=PixelGenerator((3, 8, 8)),
        batch_real_per_class=2,
        matcher_args={"embedder_kwargs": {"width": 8}},
        device="cpu",
        **options,
    )


def test_progress_logger_names_the_learning_rates_a_run_uses(caplog):
    """The starting line says what each parameter group learns at, so a user sees what ``auto`` resolved to."""
    progress = ProgressLogger(name="progress_lr_test", prefix="distillation")
    trainer = _tiny_pixel_trainer(2, iterations=1, handlers=[progress], lr_codes=0.02, optimizer="sgd")
    with caplog.at_level(logging.INFO, logger="progress_lr_test"):
        trainer.run()
    assert "distillation: starting, 1 iterations; SGD learning rates: codes 0.02" in [
        r.getMessage() for r in caplog.records
    ]


def test_latest_checkpoint_prefers_highest_iteration_then_final(tmp_path):
    assert latest_checkpoint(tmp_path / "none") is None
    for name in ["checkpoint_epoch=50.pt", "checkpoint_epoch=100.pt", "checkpoint_final_iteration=100.pt", "x.txt"]:
        (tmp_path / name).write_bytes(b"0")
    assert latest_checkpoint(tmp_path).name == "checkpoint_final_iteration=100.pt"
    (tmp_path / "checkpoint_epoch=150.pt").write_bytes(b"0")
    assert latest_checkpoint(tmp_path).name == "checkpoint_epoch=150.pt"


def test_resume_rejects_corrupted_checkpoint(tmp_path):
    (tmp_path / "checkpoint_epoch=3.pt").write_bytes(b"not a checkpoint")
    handler = ResumeFromCheckpoint(tmp_path, {"model": torch.nn.Linear(1, 1)})
    with pytest.raises(CheckpointError, match=r"checkpoint_epoch=3.pt cannot be read.*--resume false"):
        handler.attach(Engine(lambda e, b: None))


def test_resume_rejects_checkpoint_of_other_configuration(tmp_path):
    torch.save({"model": torch.nn.Linear(1, 1).state_dict()}, tmp_path / "checkpoint_epoch=3.pt")
    handler = ResumeFromCheckpoint(tmp_path, {"model": torch.nn.Linear(1, 1), "optimizer": torch.nn.Linear(1, 1)})
    with pytest.raises(CheckpointError, match="lacks"):
        handler.attach(Engine(lambda e, b: None))


def test_resume_restores_state(tmp_path):
    source = torch.nn.Linear(2, 2)
    torch.save({"model": source.state_dict()}, tmp_path / "checkpoint_epoch=1.pt")
    target = torch.nn.Linear(2, 2)
    engine = Engine(lambda e, b: None)
    ResumeFromCheckpoint(tmp_path, {"model": target}).attach(engine)
    engine.run([0], max_epochs=1)
    assert torch.equal(target.weight, source.weight)


def test_resume_keeps_the_learning_rates_of_the_resuming_run(tmp_path, caplog):
    """The optimiser's state comes from the checkpoint, its learning rates from the run that resumes (a smaller
    rate after a divergence, or an ``auto`` rate that follows ``iterations``), with a warning naming the change."""
    model = torch.nn.Linear(2, 2)
    saved = torch.optim.Adam(
        [
            {"params": [model.weight], "lr": 0.1, "name": "codes"},
            {"params": [model.bias], "lr": 0.01, "name": "network"},
        ]
    )
    model(torch.ones(1, 2)).sum().backward()
    saved.step()
    torch.save({"model": model.state_dict(), "optimizer": saved.state_dict()}, tmp_path / "checkpoint_epoch=1.pt")
    target = torch.nn.Linear(2, 2)
    resumed = torch.optim.Adam(
        [
            {"params": [target.weight], "lr": 0.1, "name": "codes"},
            {"params": [target.bias], "lr": 0.001, "name": "network"},
        ]
    )
    engine = Engine(lambda e, b: None)
    ResumeFromCheckpoint(tmp_path, {"model": target, "optimizer": resumed}).attach(engine)
    with caplog.at_level(logging.INFO, logger="monai_pld"):
        engine.run([0], max_epochs=1)
    assert [g["lr"] for g in resumed.param_groups] == [0.1, 0.001]
    moments = resumed.state_dict()["state"]
    assert torch.equal(moments[0]["exp_avg"], saved.state_dict()["state"][0]["exp_avg"])  # the state is restored
    assert "not the checkpoint's: network 0.01 -> 0.001" in caplog.text and "codes" not in caplog.text


def test_resume_disabled_or_empty_does_nothing(tmp_path, caplog):
    target = torch.nn.Linear(2, 2)
    before = target.weight.clone()
    engine = Engine(lambda e, b: None)
    ResumeFromCheckpoint(tmp_path, {"model": target}, enabled=True).attach(engine)  # empty folder: warns
    engine.run([0], max_epochs=1)
    assert torch.equal(target.weight, before)
    assert "holds no checkpoint" in caplog.text


def test_image_grid_rows_are_classes(tmp_path):
    images = torch.zeros(6, 3, 4, 4)
    labels = torch.tensor([1, 0, 1, 0, 1, 0])
    images[labels == 1] = 1.0  # class 1 white, class 0 black
    grid = image_grid(images, labels, padding=0)
    assert grid.shape == (8, 12, 3) and grid.dtype == np.uint8
    assert (grid[:4] == 0).all() and (grid[4:] == 255).all()  # row 0 = class 0, row 1 = class 1
    path = save_png(grid, tmp_path / "g.png", upscale=2)
    from PIL import Image

    with Image.open(path) as png:
        assert png.size == (24, 16)


def test_image_handlers_take_the_parts_of_the_trainer_they_are_attached_to(tmp_path):
    """The bundles configure the grid and export handlers before build_trainer makes the parameterisation, so the
    handlers read it (and the generator, and the exporter the matcher) from the trainer when attached."""
    grid = SyntheticImageGrid(tmp_path / "grids", interval=2)
    export = DistilledSetExporter(tmp_path / "distilled", class_names=["a", "b", "c"])
    trainer = _tiny_pixel_trainer(4, iterations=2, handlers=[grid, export])
    assert grid.parameterization is trainer.parameterization and grid.generator is trainer.generator
    assert export.matcher is trainer.matcher
    trainer.run()
    assert (tmp_path / "grids" / "iter_000002.png").is_file()
    with np.load(tmp_path / "distilled" / "images.npz") as npz:
        expected = trainer.parameterization.render(trainer.generator, mode="mean")[0]
        assert np.array_equal(npz["images"], (expected.detach().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="no parameterization"):
        SyntheticImageGrid(tmp_path / "other").attach(Engine(lambda e, b: None))
