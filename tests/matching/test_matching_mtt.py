"""MTT: expert trajectories written and read back safely, and the trajectory-matching loss."""

import hashlib
import json
import logging
import shutil

import pytest
import torch
from ignite.engine import Engine

from monai_pld.data import ImageSet
from monai_pld.engines.experts import (
    EXPERT_FORMAT,
    ExpertBuffer,
    ExpertFileError,
    TrajectoryRecorder,
    read_expert,
    train_experts,
)
from monai_pld.matching.trajectory import TrajectoryMatcher, UnrollMemoryError
from monai_pld.networks.classifiers import get_classifier
from monai_pld.utils import derive_seed

SMALL = {"width": 16, "depth": 2}
TRAIN = {"epochs": 4, "batch_size": 16, "model_kwargs": SMALL, "device": "cpu"}


def toy_set(per_class=20, size=16):
    """Three classes of noisy red, green and blue images."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(per_class)
    colours = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200]]).view(3, 3, 1, 1)
    noise = torch.randint(-30, 30, (len(labels), 3, size, size), generator=gen)
    return ImageSet((colours[labels] + noise).clamp(0, 255).to(torch.uint8), labels, ["r", "g", "b"], "toy")


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("experts")
    data = toy_set()
    files = train_experts(data, folder, num_experts=2, **TRAIN)
    return data, folder, files


def matcher(folder, **kwargs):
    settings = {"expert_dir": folder, "syn_steps": 3, "expert_epochs": 2, "max_start_epoch": 2, **kwargs}
    return TrajectoryMatcher(3, 3, 16, **settings)


def test_experts_are_written_and_read_back(experts, tmp_path):
    data, folder, files = experts
    assert [f.name for f in files] == ["expert_000.pt", "expert_001.pt"]
    record = torch.load(files[0], weights_only=True)
    assert record["format"] == EXPERT_FORMAT and record["model"] == "convnet" and record["model_kwargs"] == SMALL
    assert (record["in_channels"], record["num_classes"], record["image_size"], record["epochs"]) == (3, 3, 16, 4)
    assert (record["mean"], record["std"]) == tuple(data.normalization())
    net = get_classifier("convnet", 3, 3, 16, **SMALL)
    assert record["param_names"] == [n for n, _ in net.named_parameters()]
    assert record["param_shapes"] == [list(p.shape) for p in net.parameters()]
    count = sum(p.numel() for p in net.parameters())
    assert record["trajectory"].shape == (5, count) and record["trajectory"].dtype == torch.float32
    # row 0 is the seeded initialisation; every epoch moves the parameters
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(derive_seed(0, 0))
        init = get_classifier("convnet", 3, 3, 16, **SMALL)
    assert torch.equal(record["trajectory"][0], torch.cat([p.detach().reshape(-1) for p in init.parameters()]))
    assert ((record["trajectory"][1:] - record["trajectory"][:-1]).norm(dim=1) > 0).all()
    assert record["final_train_accuracy"] > 0.5  # three well-separated colours are easy
    index = json.loads((folder / "experts.json").read_text())
    assert index["files"] == {f.name: digest(f) for f in files} and index["format"] == EXPERT_FORMAT
    # the buffer reads back what was written, and a second run with the same seed writes the same trajectories
    buffer = ExpertBuffer(folder)
    assert len(buffer) == 2 and buffer.epochs == 4 and buffer.num_parameters == count
    again = train_experts(data, tmp_path / "again", num_experts=2, **TRAIN)
    for i in range(2):
        written = torch.load(files[i], weights_only=True)["trajectory"]
        assert torch.equal(buffer.trajectory(i), written)
        assert torch.equal(read_expert(again[i])["trajectory"], written)


def test_recorder_snapshots_the_start_and_every_epoch():
    net = torch.nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.fill_(0.5)  # exact in binary, so the sums below are exact
        net.bias.fill_(-0.25)

    def step(engine, batch):
        with torch.no_grad():
            net.weight.add_(1.0)

    engine = Engine(step)
    recorder = TrajectoryRecorder(net)
    recorder.attach(engine)
    first = torch.cat([net.weight.detach().reshape(-1), net.bias.detach()])
    engine.run([0, 0], max_epochs=3)  # two iterations per epoch
    trajectory = recorder.trajectory()
    assert trajectory.shape == (4, 3) and torch.equal(trajectory[0], first)
    assert torch.equal(trajectory[3, :2], first[:2] + 6) and torch.equal(trajectory[:, 2], first[2].expand(4))


def test_finished_experts_are_kept(experts, tmp_path):
    data, shared, _ = experts
    folder = tmp_path / "experts"  # a copy, so the shared folder keeps its two experts
    shutil.copytree(shared, folder)
    files = [folder / "expert_000.pt", folder / "expert_001.pt"]
    before = [digest(f) for f in files]
    mtimes = [f.stat().st_mtime_ns for f in files]
    train_experts(data, folder, num_experts=3, **TRAIN)
    assert [digest(f) for f in files] == before and [f.stat().st_mtime_ns for f in files] == mtimes
    assert (folder / "expert_002.pt").is_file() and len(ExpertBuffer(folder)) == 3
    with pytest.raises(ExpertFileError, match=r"expert_000\.pt was trained with other settings.*delete it"):
        train_experts(data, folder, num_experts=1, **{**TRAIN, "epochs": 5})


def test_bad_expert_files_are_named(tmp_path, experts):
    data, folder, files = experts
    with pytest.raises(ExpertFileError, match="does not exist.*train_experts"):
        ExpertBuffer(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExpertFileError, match="is empty.*train_experts"):
        ExpertBuffer(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "expert_000.pt").write_bytes(files[0].read_bytes()[:200])  # truncated, as by a crash without atomic write
    with pytest.raises(ExpertFileError, match=r"expert_000\.pt cannot be read.*delete it"):
        ExpertBuffer(bad)
    with pytest.raises(ExpertFileError, match=r"expert_000\.pt cannot be read"):
        train_experts(data, bad, num_experts=1, **TRAIN)  # a broken file is not silently overwritten
    torch.save({"format": "something else", "trajectory": torch.zeros(2, 2)}, bad / "expert_000.pt")
    with pytest.raises(ExpertFileError, match=r"expert_000\.pt is not a monai_pld\.expert/1"):
        ExpertBuffer(bad)
    record = torch.load(files[0], weights_only=True)
    torch.save({**record, "trajectory": record["trajectory"][:, :10]}, bad / "expert_000.pt")
    with pytest.raises(ExpertFileError, match=r"expert_000\.pt: trajectory"):
        ExpertBuffer(bad)
    # two experts of different normalisations in one folder
    torch.save(record, bad / "expert_000.pt")
    torch.save({**record, "mean": [0.0, 0.0, 0.0]}, bad / "expert_001.pt")
    with pytest.raises(ExpertFileError, match=r"expert_001\.pt differs from expert_000\.pt in 'mean'"):
        ExpertBuffer(bad)


def test_loss_gradients_determinism_and_state(experts):
    data, folder, _ = experts
    m = matcher(folder)
    syn = data.float_images()[::10].clone().requires_grad_(True)
    syn_y = data.labels[::10]
    loss = m.loss(syn, syn_y, syn.detach(), syn_y, step=1)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert m.syn_lr.grad is not None and m.syn_lr.grad.abs() > 0
    assert syn.grad is not None and syn.grad.abs().sum() > 0
    again = matcher(folder)
    assert again.loss(syn.detach(), syn_y, syn.detach(), syn_y, step=1).item() == pytest.approx(loss.item(), rel=1e-6)
    assert m.metrics() == {"syn_lr": pytest.approx(0.01)}
    assert [n for n, _ in m.named_parameters()] == ["syn_lr"] and list(m.state_dict()) == ["syn_lr"]
    hyper = m.hyper_parameters()
    assert hyper["num_experts"] == len(ExpertBuffer(folder)) and hyper["syn_steps"] == 3
    json.dumps(hyper)  # recorded in the manifest
    m.syn_lr.data.fill_(0.02)
    again.load_state_dict(m.state_dict())
    assert again.syn_lr.item() == pytest.approx(0.02)
    again.load_state_dict({**m.state_dict(), "student.head.weight": torch.zeros(1)})  # older checkpoints
    assert again.syn_lr.item() == pytest.approx(0.02)


def test_loss_decreases_when_optimising_the_images(experts):
    data, folder, _ = experts
    m = matcher(folder, syn_steps=4, max_start_epoch=0)
    gen = torch.Generator().manual_seed(1)
    index = torch.cat([torch.randperm(20, generator=gen)[:2] + 20 * c for c in range(3)])
    syn = data.float_images(index).requires_grad_(True)  # initialised from real images, 2 per class
    syn_y = data.labels[index]
    opt = torch.optim.Adam([syn], lr=0.01)
    losses = []
    for _ in range(15):
        # the same step: the same expert, start epoch, batches and augmentation, so only the images change
        loss = m.loss(syn, syn_y, syn.detach(), syn_y, step=7)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_memory_guard_stops_before_any_work(experts, monkeypatch):
    data, folder, _ = experts
    m = matcher(folder, max_memory_gb=1e-6)
    monkeypatch.setattr(m.experts, "trajectory", lambda i: pytest.fail("the guard must act before loading"))
    syn, syn_y = data.float_images()[:6], data.labels[:6]
    with pytest.raises(UnrollMemoryError, match=r"mtt_syn_steps 3 x mtt_batch_syn 6.*GB.*lower mtt_syn_steps"):
        m.loss(syn, syn_y, syn, syn_y, 1)
    # the estimate grows linearly with the steps and the batch
    assert matcher(folder, syn_steps=6).estimate_memory(6) == 2 * m.estimate_memory(6)
    assert m.estimate_memory(12) > m.estimate_memory(6) > 0
    with pytest.raises(ValueError, match="max_memory_gb"):
        matcher(folder, max_memory_gb=0)


def test_experts_must_fit_the_matcher(experts, caplog):
    data, folder, _ = experts
    with pytest.raises(ValueError, match="num_classes"):
        TrajectoryMatcher(3, 5, 16, expert_dir=folder)
    with pytest.raises(ValueError, match="image_size"):
        TrajectoryMatcher(3, 3, 32, expert_dir=folder)
    with pytest.raises(ValueError, match="mtt_expert_epochs"):
        matcher(folder, expert_epochs=9)
    with pytest.raises(ValueError, match="expert_dir"):
        TrajectoryMatcher(3, 3, 16)
    # the experts' statistics win; different ones given to the matcher are reported
    mean, std = data.normalization()
    with caplog.at_level(logging.WARNING, logger="monai_pld"):
        m = matcher(folder, mean=[0.5, 0.5, 0.5], std=std)
    assert "differs from the experts'" in caplog.text
    assert torch.allclose(m.mean.flatten(), torch.tensor(mean))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="monai_pld"):
        matcher(folder, mean=mean, std=std)
    assert "differs" not in caplog.text
