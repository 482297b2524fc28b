"""Runs under several ranks (2 CPU processes joined by gloo, as ``torchrun`` starts them) give what one process gives:
the distilled set of DM and DC, the evaluation's gathered results, the experts and the generator; a killed rank
leaves a checkpoint that a run with another number of ranks resumes from; an error on one rank is reported with
that rank."""

import json

import pytest
import torch
import torch.multiprocessing as mp
from helpers import distil_tiny, distributed_scenarios, run_ranks, write_medmnist_npz

from monai_pld import distributed
from monai_pld.networks.generators import AutoencoderKLGenerator, default_autoencoder_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same scenarios in this process and under 2 ranks."""
    root = tmp_path_factory.mktemp("distributed")
    write_medmnist_npz(root / "data" / "pathmnist.npz", n_per_split={"train": 72, "val": 18, "test": 18})
    torch.manual_seed(0)
    AutoencoderKLGenerator(**default_autoencoder_config(28, 3)).save(root / "g.pt")
    with torch.random.fork_rng():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as each rank does, so that the two differ only in the split
        try:
            distributed_scenarios(root / "data", root / "one", root / "g.pt")
        finally:
            torch.set_num_threads(threads)
    run_ranks(2, distributed_scenarios, root / "data", root / "two", root / "g.pt")
    return root


def _close(a, b, rtol, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=f"{key} differs")


@pytest.mark.parametrize(
    "name,rtol,atol",
    [
        ("dm_pixel", 1e-5, 1e-6),  # Adam; pixel codes
        ("dm_pixel_std", 1e-5, 1e-6),  # the spread term: second moments summed over ranks with the means
        ("dm_pixel_mmd", 1e-5, 1e-6),  # the Gaussian kernel: not split, every rank computes the whole loss
        ("dm_slfd", 1e-4, 1e-6),  # SGD through the generator, the KL counted once, 2 samples per slot + the means
        ("dc_pixel", 1e-4, 1e-6),  # DC: a split of the per-class terms; the inner network stays whole
    ],
)
def test_distilled_set_of_two_ranks_is_the_single_process_one(runs, name, rtol, atol):
    one, two = torch.load(runs / "one" / f"{name}.pt"), torch.load(runs / "two" / f"{name}.pt")
    split = "terms" if name.startswith("dc") else None if name.endswith("mmd") else "samples"
    assert one["split"] is None and two["split"] == split
    if name.startswith("dc"):
        assert two["classes"].tolist() == [0, 2, 4, 6, 8]  # rank 0's share of 9 classes
    _close(one["state"], two["state"], rtol, atol)
    for key in ("loss", "match_loss", "kl"):  # rank 0 logs the sum over ranks, not its own share
        assert two["output"][key] == pytest.approx(one["output"][key], rel=1e-4, abs=1e-6)
    assert two["output"]["match_loss"] > 0


def test_evaluation_pairs_are_spread_and_gathered(runs):
    one = json.loads((runs / "one" / "evaluation" / "results.json").read_text())
    two = json.loads((runs / "two" / "evaluation" / "results.json").read_text())
    assert [(r["backbone"], r["run"]) for r in two["runs"]] == [(r["backbone"], r["run"]) for r in one["runs"]]
    assert len(two["runs"]) == 4 and two["header"]["ranks"] == 2
    for a, b in zip(one["runs"], two["runs"], strict=True):
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-6)
    assert not list((runs / "two" / "evaluation").glob("results.rank*.json"))  # only rank 0's files remain


def test_experts_are_trained_once_each_into_one_folder(runs):
    index = json.loads((runs / "two" / "experts" / "experts.json").read_text())
    assert sorted(index["files"]) == ["expert_000.pt", "expert_001.pt", "expert_002.pt"]
    for name in index["files"]:  # the same expert whichever rank trained it
        a = torch.load(runs / "one" / "experts" / name, weights_only=True)
        b = torch.load(runs / "two" / "experts" / name, weights_only=True)
        torch.testing.assert_close(a["trajectory"], b["trajectory"], rtol=1e-4, atol=1e-6)


def test_generator_pretraining_splits_the_batch(runs):
    one = torch.load(runs / "one" / "generator_state.pt")
    two = torch.load(runs / "two" / "generator_state.pt")
    start = AutoencoderKLGenerator.load(runs / "g.pt").state_dict()  # another init: only to see the steps moved
    _close(one, two, rtol=1e-3, atol=1e-5)
    assert any(not torch.equal(one[k], start[k]) for k in one if k in start)


@pytest.mark.slow
def test_a_killed_rank_leaves_a_checkpoint_that_one_process_resumes(tmp_path):
    write_medmnist_npz(tmp_path / "data" / "pathmnist.npz", n_per_split={"train": 72, "val": 18, "test": 18})
    with pytest.raises(mp.ProcessExitedException):  # rank 1 is killed at iteration 3 of 5
        run_ranks(
            2, distil_tiny, tmp_path / "data", None, "pixel", "dm", 5, "adam", None, 0.0, tmp_path / "ck", False, 3
        )
    assert list((tmp_path / "ck").glob("*.pt"))
    distil_tiny(
        tmp_path / "data", tmp_path / "resumed.pt", "pixel", "dm", 5, checkpoint_dir=tmp_path / "ck", resume=True
    )
    distil_tiny(tmp_path / "data", tmp_path / "whole.pt", "pixel", "dm", 5)
    resumed, whole = torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "whole.pt")
    _close(resumed["state"], whole["state"], rtol=1e-5, atol=1e-6)


def test_an_error_on_one_rank_stops_every_rank_and_names_it(tmp_path, capfd):
    write_medmnist_npz(tmp_path / "data" / "pathmnist.npz", n_per_split={"train": 72, "val": 18, "test": 18})
    with pytest.raises(mp.ProcessRaisedException) as raised:
        run_ranks(2, distil_tiny, tmp_path / "data", None, "pixel", "dm", 4, "adam", None, 0.0, None, False, None, 2)
    # whichever rank is reported first (rank 1's own error, or rank 0's lost connection to it) names its rank, and
    # the failing rank's error is in the log with its rank
    assert "distillation failed on rank" in str(raised.value) and "of 2" in str(raised.value)
    assert "rank 1 of 2: ValueError: this rank's real images are unreadable" in capfd.readouterr().err


def test_one_process_is_rank_0_of_1():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard(list(range(5))) == [0, 1, 2, 3, 4]
    assert distributed.shard(list(range(5)), of_rank=1, ranks=2) == [1, 3]
    assert distributed.gather({"a": 1}) == [{"a": 1}]
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert distributed.all_reduce_gradients([p], [1.5]) == [1.5] and torch.equal(p.grad, torch.full((3,), 2.0))
    assert distributed.rank_device(torch.device("cuda")) == torch.device("cuda", 0)  # one process: the first GPU
    assert distributed.rank_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # an index is kept
    assert distributed.init_distributed("cpu") == torch.device("cpu")  # no WORLD_SIZE: no group, nothing changes
