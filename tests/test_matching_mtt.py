"""MTT: expert trajectories written and read back safely, and the trajectory-matching loss."""

import hashlib

import pytest
import torch

from monai_pld.data import ImageSet
from monai_pld.engines.experts import ExpertBuffer, ExpertFileError, train_experts
from monai_pld.matching import TrajectoryMatcher
from monai_pld.matching.trajectory import UnrollMemoryError
from monai_pld.networks.classifiers import get_classifier
from monai_pld.utils import derive_seed

SMALL = {"width": 16, "depth": 2}


def toy_set(per_class=20, size=16):
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(per_class)
    colours = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200]]).view(3, 3, 1, 1)
    noise = torch.randint(-30, 30, (len(labels), 3, size, size), generator=gen)
    return ImageSet((colours[labels] + noise).clamp(0, 255).to(torch.uint8), labels, ["r", "g", "b"], "toy")


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("experts")
    data = toy_set()
    files = train_experts(data, folder, num_experts=2, epochs=4, batch_size=16, model_kwargs=SMALL, device="cpu")
    return data, folder, files


def test_experts_are_written_and_read_back(experts):
    data, folder, files = experts
    assert [f.name for f in files] == ["expert_000.pt", "expert_001.pt"] and (folder / "experts.json").is_file()
    record = torch.load(files[0], weights_only=True)
    net = get_classifier("convnet", 3, 3, 16, **SMALL)
    count = sum(p.numel() for p in net.parameters())
    assert record["trajectory"].shape == (5, count) and record["trajectory"].dtype == torch.float32
    # row 0 is the seeded initialisation, the later rows move away from it
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(derive_seed(0, 0))
        init = get_classifier("convnet", 3, 3, 16, **SMALL)
    assert torch.equal(record["trajectory"][0], torch.cat([p.detach().reshape(-1) for p in init.parameters()]))
    steps = (record["trajectory"][1:] - record["trajectory"][:-1]).norm(dim=1)
    assert (steps > 0).all()
    buffer = ExpertBuffer(folder)
    assert len(buffer) == 2 and buffer.epochs == 4
    assert torch.equal(buffer.trajectory(1), torch.load(files[1], weights_only=True)["trajectory"])
    assert record["final_train_accuracy"] > 0.5  # three well-separated colours are easy


def test_finished_experts_are_kept(experts):
    data, folder, files = experts
    before = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    mtimes = [f.stat().st_mtime_ns for f in files]
    train_experts(data, folder, num_experts=3, epochs=4, batch_size=16, model_kwargs=SMALL, device="cpu")
    assert [hashlib.sha256(f.read_bytes()).hexdigest() for f in files] == before
    assert [f.stat().st_mtime_ns for f in files] == mtimes and (folder / "expert_002.pt").is_file()
    with pytest.raises(ExpertFileError, match="other settings"):
        train_experts(data, folder, num_experts=1, epochs=5, batch_size=16, model_kwargs=SMALL, device="cpu")


def test_bad_expert_files_are_named(tmp_path, experts):
    _, folder, files = experts
    with pytest.raises(ExpertFileError, match="train_experts"):
        ExpertBuffer(tmp_path / "none")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "expert_000.pt").write_bytes(files[0].read_bytes()[:200])  # truncated
    with pytest.raises(ExpertFileError, match="expert_000.pt"):
        ExpertBuffer(bad)
    torch.save({"format": "something else", "trajectory": torch.zeros(2, 2)}, bad / "expert_000.pt")
    with pytest.raises(ExpertFileError, match="expert_000.pt"):
        ExpertBuffer(bad)


def test_loss_gradients_and_determinism(experts):
    data, folder, _ = experts
    m = TrajectoryMatcher(3, 3, 16, expert_dir=folder, syn_steps=3, expert_epochs=2, max_start_epoch=2)
    syn = data.float_images()[::10].clone().requires_grad_(True)
    syn_y = data.labels[::10]
    loss = m.loss(syn, syn_y, syn.detach(), syn_y, step=1)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert m.syn_lr.grad is not None and m.syn_lr.grad.abs() > 0
    assert syn.grad.abs().sum() > 0
    again = TrajectoryMatcher(3, 3, 16, expert_dir=folder, syn_steps=3, expert_epochs=2, max_start_epoch=2)
    assert again.loss(syn.detach(), syn_y, syn.detach(), syn_y, step=1).item() == pytest.approx(loss.item(), rel=1e-6)
    assert m.metrics() == {"syn_lr": pytest.approx(0.01)}
    m.syn_lr.data.fill_(0.02)
    again.load_state_dict(m.state_dict())
    assert again.syn_lr.item() == pytest.approx(0.02)


def test_loss_decreases_when_optimising_the_images(experts):
    data, folder, _ = experts
    m = TrajectoryMatcher(
        3, 3, 16, expert_dir=folder, syn_steps=4, expert_epochs=2, max_start_epoch=0, dsa_strategy=None
    )
    syn = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    syn_y = torch.arange(3).repeat_interleave(2)
    opt = torch.optim.Adam([syn], lr=0.05)
    losses = []
    for step in range(1, 31):
        loss = m.loss(syn.clamp(0, 1), syn_y, syn.detach(), syn_y, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_memory_guard_and_shape_checks(experts):
    data, folder, _ = experts
    m = TrajectoryMatcher(3, 3, 16, expert_dir=folder, syn_steps=3, expert_epochs=1, max_memory_gb=1e-6)
    syn, syn_y = data.float_images()[:6], data.labels[:6]
    with pytest.raises(UnrollMemoryError, match="mtt_syn_steps"):
        m.loss(syn, syn_y, syn, syn_y, 1)
    with pytest.raises(ValueError, match="do not fit"):
        TrajectoryMatcher(3, 5, 16, expert_dir=folder)
    with pytest.raises(ValueError, match="mtt_expert_epochs"):
        TrajectoryMatcher(3, 3, 16, expert_dir=folder, expert_epochs=9)
