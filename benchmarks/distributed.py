"""Speed of runs split among ranks: 2 ranks x 1 thread (gloo, as ``torchrun --nproc_per_node 2`` starts them) against
one process with 1 and with 2 threads, for DM distillation and for the evaluation of a distilled set.

Run (quiet machine only: check /proc/loadavg):

    python benchmarks/distributed.py                          # DM at 28 px / 9 classes and 32 px / 10 classes
    python benchmarks/distributed.py --parts dm --sizes 28 --kinds pixel --rounds 1
    python benchmarks/distributed.py --ranks 4 --threads 4    # on a machine with more cores

DM: the trainer of :func:`monai_pld.workflows.build_trainer` (``ipc`` slots per class, ``batch_real`` real images
per class, random uint8 images of the shape, an untrained generator of the default architecture, whose speed is
that of a trained one); the median seconds per iteration after ``--warmup`` iterations. Under several ranks each
rank embeds every N-th synthetic and real image, and the ranks sum their per-class features and then their
gradients; the communication is timed separately: the all-reduces of one iteration (their sizes recorded during
the run) repeated ``--comm-repeats`` times inside the ranks, without the waiting for the slower rank that the
iteration itself includes.

Evaluation: :func:`monai_pld.evaluation.evaluate_image_set` of a random-real-image set (IPC 10) with
``--eval-backbones`` x ``--eval-runs`` classifiers of ``--eval-epochs`` epochs each, wall time of the call; the
ranks share the (backbone, run) pairs. Every configuration is run once per round, in turn, so that machine noise
touches them alike; the tables give medians over rounds. Every configuration runs in fresh processes
(``spawn``); their start (about 10 s) is not counted, in either part.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

SHAPES = {28: 9, 32: 10}  # image size -> classes: PathMNIST's shape, CIFAR-10's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dataset(size: int, per_class: int):
    from monai_pld.data import ImageSet

    k = SHAPES[size]
    u8 = np.random.default_rng(0).integers(0, 256, (k * per_class, 3, size, size), dtype=np.uint8)
    labels = np.repeat(np.arange(k), per_class)
    return ImageSet(torch.from_numpy(u8), torch.from_numpy(labels).long(), [f"c{i}" for i in range(k)], f"s{size}")


def dm_job(args: dict, out: str) -> None:
    """One DM timing in this process (any rank); rank 0 writes ``{"s_per_it", "comm_bytes", "comm_s"}`` to ``out``."""
    from ignite.engine import Events

    from monai_pld import distributed
    from monai_pld.workflows import build_trainer

    data = _dataset(args["size"], args["per_class"])
    trainer = build_trainer(
        data,
        args["kind"],
        "dm",
        ipc=args["ipc"],
        iterations=args["warmup"] + args["iterations"],
        generator_path=args["generator"],
        generator_policy="any",
        batch_real_per_class=args["batch_real"],
        seed=0,
        device="cpu",
    )
    times: list[float] = []
    sizes: list[int] = []  # elements of every all-reduce of the latest iteration
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda: (times.append(-time.perf_counter()), sizes.clear()))
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda: times.__setitem__(-1, times[-1] + time.perf_counter())
    )
    all_reduce = torch.distributed.all_reduce

    def counted(tensor, *a, **k):
        sizes.append(tensor.numel())
        return all_reduce(tensor, *a, **k)

    torch.distributed.all_reduce = counted
    try:
        trainer.run()
    finally:
        torch.distributed.all_reduce = all_reduce
    comm = []
    if distributed.world_size() > 1:  # the same collectives again, alone: their cost without waiting for a peer
        buffers = [torch.zeros(n) for n in sizes]
        for _ in range(args["comm_repeats"]):
            distributed.barrier()
            start = time.perf_counter()
            for b in buffers:
                torch.distributed.all_reduce(b)
            comm.append(time.perf_counter() - start)
    if distributed.is_main():
        result = {
            "s_per_it": statistics.median(times[args["warmup"] :]),
            "comm_bytes": 4 * sum(sizes) if comm else 0,
            "comm_calls": len(sizes) if comm else 0,
            "comm_s": statistics.median(comm) if comm else 0.0,
        }
        Path(out).write_text(json.dumps(result))


def eval_job(args: dict, out: str) -> None:
    """One evaluation in this process (any rank); rank 0 writes ``{"seconds"}`` to ``out``."""
    from monai_pld import distributed
    from monai_pld.evaluation import evaluate_image_set, load_image_source

    train = _dataset(28, args["per_class"])
    test = _dataset(28, max(args["per_class"] // 5, 10))
    source = load_image_source("random", train, ipc=10, seed=0)
    distributed.barrier()
    start = time.perf_counter()
    evaluate_image_set(
        source,
        train,
        test,
        Path(out).with_suffix(".evaluation"),
        backbones=args["backbones"],
        runs=args["runs"],
        epochs=args["epochs"],
        device="cpu",
    )
    if distributed.is_main():
        Path(out).write_text(json.dumps({"seconds": time.perf_counter() - start}))


def _rank_main(rank: int, world: int, port: int, threads: int, job, args: dict, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(threads)
    from monai_pld import distributed

    distributed.init_distributed("cpu")
    try:
        job(args, out)
    finally:
        distributed.shutdown()


def run(job, args: dict, ranks: int, threads: int, folder: Path) -> dict:
    """``job`` in ``ranks`` fresh processes of ``threads`` threads each (one process is spawned too, so that both
    start alike); the result rank 0 wrote."""
    out = folder / f"result_{time.monotonic_ns()}.json"
    context = mp.start_processes(
        _rank_main,
        args=(ranks, _free_port(), threads, job, args, str(out)),
        nprocs=ranks,
        join=False,
        start_method="spawn",
    )
    try:
        while not context.join():
            pass
    finally:  # stopped (Ctrl-C, SIGTERM) or failed: no rank outlives the benchmark
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return json.loads(out.read_text())


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed benchmark stops its ranks too (see run)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["dm", "evaluation"], choices=["dm", "evaluation"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[28, 32], choices=sorted(SHAPES))
    parser.add_argument("--kinds", nargs="+", default=["pixel", "slfd"], help="parameterisations timed under DM")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads of the one-process comparison")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--batch-real", type=int, default=256, help="real images per class and iteration")
    parser.add_argument("--per-class", type=int, default=1000, help="real images per class in the data")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=5, help="timed DM iterations per run")
    parser.add_argument("--comm-repeats", type=int, default=20)
    parser.add_argument("--eval-backbones", nargs="+", default=["convnet", "alexnet"])
    parser.add_argument("--eval-runs", type=int, default=2)
    parser.add_argument("--eval-epochs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    configs = [("1 x 1", 1, 1), (f"1 x {args.threads}", 1, args.threads), (f"{args.ranks} x 1", args.ranks, 1)]
    header = (
        f"{datetime.date.today()}, {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"load before {open('/proc/loadavg').read().split()[0] if os.path.exists('/proc/loadavg') else '?'}"
    )
    print(header, flush=True)
    results: dict = {"header": header, "args": {k: str(v) for k, v in vars(args).items()}, "dm": {}, "evaluation": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        from monai_pld.networks.generators import AutoencoderKLGenerator, default_autoencoder_config

        generators = {}
        for size in args.sizes:
            torch.manual_seed(0)
            generators[size] = str(folder / f"g{size}.pt")
            AutoencoderKLGenerator(**default_autoencoder_config(size, 3)).save(generators[size])
        for round_ in range(args.rounds):
            if "dm" in args.parts:
                for size in args.sizes:
                    for kind in args.kinds:
                        job = {
                            "size": size,
                            "kind": kind,
                            "ipc": args.ipc,
                            "batch_real": args.batch_real,
                            "per_class": args.per_class,
                            "warmup": args.warmup,
                            "iterations": args.iterations,
                            "generator": generators[size],
                            "comm_repeats": args.comm_repeats,
                        }
                        for name, ranks, threads in configs:
                            r = run(dm_job, job, ranks, threads, folder)
                            results["dm"].setdefault(f"{size}|{kind}|{name}", []).append(r)
                            line = f"round {round_ + 1} DM {size} px {kind} {name}: {r['s_per_it']:.2f} s/it"
                            print(line, flush=True)
            if "evaluation" in args.parts:
                job = {
                    "per_class": 100,
                    "backbones": args.eval_backbones,
                    "runs": args.eval_runs,
                    "epochs": args.eval_epochs,
                }
                for name, ranks, threads in configs:
                    r = run(eval_job, job, ranks, threads, folder)
                    results["evaluation"].setdefault(name, []).append(r)
                    print(f"round {round_ + 1} evaluation {name}: {r['seconds']:.1f} s", flush=True)

    names = [c[0] for c in configs]
    if results["dm"]:
        print(
            f"\nDM, IPC {args.ipc}, {args.batch_real} real images per class, median s/it over {args.rounds} round(s)"
            f" x {args.iterations} iterations\n"
        )
        print(
            f"| shape | parameterisation | {' | '.join(names)} | speed-up of {names[2]} over {names[0]} | "
            f"over {names[1]} | all-reduce per iteration |"
        )
        print("| --- " * 8 + "|")
        for size in args.sizes:
            for kind in args.kinds:
                med = [statistics.median(r["s_per_it"] for r in results["dm"][f"{size}|{kind}|{n}"]) for n in names]
                comm = results["dm"][f"{size}|{kind}|{names[2]}"]
                kib = comm[0]["comm_bytes"] / 1024
                comm_ms = 1000 * statistics.median(r["comm_s"] for r in comm)
                print(
                    f"| {size} px, {SHAPES[size]} classes | {kind} | {' | '.join(f'{m:.2f}' for m in med)} | "
                    f"{med[0] / med[2]:.2f}x | {med[1] / med[2]:.2f}x | "
                    f"{comm[0]['comm_calls']} calls, {kib:.0f} KiB, {comm_ms:.1f} ms |"
                )
    if results["evaluation"]:
        med = [statistics.median(r["seconds"] for r in results["evaluation"][n]) for n in names]
        print(
            f"\nEvaluation: {len(args.eval_backbones)} backbones x {args.eval_runs} runs x {args.eval_epochs} epochs "
            f"(IPC 10 random real images, 28 px, 9 classes), wall seconds, median over {args.rounds} round(s)\n"
        )
        print(f"| {' | '.join(names)} | speed-up over {names[0]} | over {names[1]} |\n" + "| --- " * 5 + "|")
        print(f"| {' | '.join(f'{m:.1f}' for m in med)} | {med[0] / med[2]:.2f}x | {med[1] / med[2]:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
