"""Speed of runs split among ranks: 2 ranks x 1 thread (gloo, as ``torchrun --nproc_per_node 2`` starts them) against
one process with 1 and with 2 threads, for DM distillation and for the evaluation of a distilled set.

Run (quiet machine only: check /proc/loadavg):

    python benchmarks/distributed.py                          # DM at 28 px / 9 classes and 32 px / 10 classes
    python benchmarks/distributed.py --parts dm --sizes 28 --kinds pixel --rounds 1
    python benchmarks/distributed.py --ranks 4 --threads 4    # on a machine with more cores
    python benchmarks/distributed.py --parts dm --alone --breakdown   # where the ranks' time goes

DM: the trainer of :func:`monai_pld.workflows.build_trainer` (``ipc`` slots per class, ``batch_real`` real images
per class, random uint8 images of the shape, an untrained generator of the default architecture, whose speed is
that of a trained one); the median seconds per iteration after ``--warmup`` iterations. Under several ranks each
rank embeds every N-th synthetic and real image, and the ranks sum their per-class features and then their
gradients; the communication is timed separately: the all-reduces of one iteration (their sizes recorded during
the run) repeated ``--comm-repeats`` times inside the ranks, without the waiting for the slower rank that the
iteration itself includes.

``--alone`` adds a fourth configuration for DM: N independent one-thread processes, each doing the whole
single-process work at the same time, without a process group (N x alone). Its seconds per iteration over N is the
best that N ranks can reach on the machine's shared cache and memory, whatever the split costs; set beside
N x 1, it tells the split's own overhead from what the cores take from each other. ``--breakdown`` times the parts
of a DM iteration (sampling, decoding, real and synthetic embedding, backward, the all-reduces with their waiting,
the optimiser step) in every process and rank, by wrapping the trainer's methods from outside for the run.

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
        matcher_args=args.get("matcher_args"),
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
    parts = _time_parts(trainer, args["warmup"]) if args.get("breakdown") else None
    try:
        trainer.run()
    finally:
        torch.distributed.all_reduce = all_reduce
        if parts is not None:
            parts.restore()
    comm = []
    if distributed.world_size() > 1:  # the same collectives again, alone: their cost without waiting for a peer
        buffers = [torch.zeros(n) for n in sizes]
        for _ in range(args["comm_repeats"]):
            distributed.barrier()
            start = time.perf_counter()
            for b in buffers:
                torch.distributed.all_reduce(b)
            comm.append(time.perf_counter() - start)
    if parts is not None:  # every rank its own: an imbalance shows as one rank waiting in the all-reduces
        timed = len(times) - args["warmup"]
        seconds = {name: 1000 * t / timed for name, t in parts.seconds.items()}
        seconds["iteration (mean)"] = 1000 * statistics.fmean(times[args["warmup"] :])
        Path(f"{out}.parts{distributed.rank()}").write_text(json.dumps(seconds))
    if distributed.is_main():
        result = {
            "s_per_it": statistics.median(times[args["warmup"] :]),
            "comm_bytes": 4 * sum(sizes) if comm else 0,
            "comm_calls": len(sizes) if comm else 0,
            "comm_s": statistics.median(comm) if comm else 0.0,
        }
        Path(out).write_text(json.dumps(result))


class _Parts:
    """Wall time spent in the parts of an iteration, summed over the iterations after ``warmup``: the trainer's
    methods (and torch's backward and all-reduce) are wrapped from outside for the run, then put back."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.on = False
        self._undo: list = []

    def wrap(self, owner, attribute: str, name) -> None:
        original = getattr(owner, attribute)

        def timed(*a, **k):
            if not self.on:
                return original(*a, **k)
            key = name() if callable(name) else name
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

        setattr(owner, attribute, timed)
        self._undo.append((owner, attribute, original))

    def restore(self) -> None:
        for owner, attribute, original in reversed(self._undo):
            setattr(owner, attribute, original)


def _time_parts(trainer, warmup: int) -> _Parts:
    from ignite.engine import Events

    from monai_pld import distributed

    parts = _Parts()
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: setattr(parts, "on", e.state.iteration > warmup))
    matcher = trainer.matcher
    parts.wrap(trainer.parameterization, "sample", "sample latents (incl. the slots' network)")
    parts.wrap(trainer, "decode", "decode")
    parts.wrap(matcher, "build_embedder", "build the random embedder")
    parts.wrap(matcher, "_embed", lambda: "embed, synthetic" if torch.is_grad_enabled() else "embed, real (no grad)")
    if hasattr(matcher, "_over_ranks"):
        parts.wrap(matcher, "_over_ranks", "feature sums all-reduce (incl. waiting for the other rank)")
    parts.wrap(torch.autograd, "backward", "backward")
    parts.wrap(distributed, "all_reduce_gradients", "gradient all-reduce (incl. waiting)")
    parts.wrap(trainer.optimizer, "step", "optimiser step")
    return parts


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


def _alone_main(index: int, threads: int, job, args: dict, out: str, barrier) -> None:
    """One of several independent single-process jobs started together (no process group)."""
    torch.set_num_threads(threads)
    barrier.wait()
    job(args, f"{out}.{index}")


def run(job, args: dict, ranks: int, threads: int, folder: Path, alone: bool = False) -> dict:
    """``job`` in ``ranks`` fresh processes of ``threads`` threads each (one process is spawned too, so that both
    start alike); the result rank 0 wrote. ``alone``: ``ranks`` independent single-process jobs at once, each
    result in the list ``"alone"`` and their mean seconds per iteration in ``"s_per_it"``."""
    out = folder / f"result_{time.monotonic_ns()}.json"
    if alone:
        barrier = mp.get_context("spawn").Barrier(ranks)
        main_args = (threads, job, args, str(out), barrier)
    else:
        main_args = (ranks, _free_port(), threads, job, args, str(out))
    context = mp.start_processes(
        _alone_main if alone else _rank_main,
        args=main_args,
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
    if alone:
        each = [json.loads(Path(f"{out}.{i}").read_text()) for i in range(ranks)]
        return {"s_per_it": statistics.fmean(r["s_per_it"] for r in each), "alone": each}
    result = json.loads(out.read_text())
    breakdown = [Path(f"{out}.parts{r}") for r in range(ranks)]
    if all(p.is_file() for p in breakdown):
        result["parts_ms"] = [json.loads(p.read_text()) for p in breakdown]
    return result


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
    parser.add_argument("--matcher-args", type=json.loads, default=None, help="DM settings as JSON")
    parser.add_argument(
        "--breakdown", action="store_true", help="DM also: milliseconds per part of an iteration, on every rank"
    )
    parser.add_argument(
        "--alone", action="store_true", help="DM also as --ranks independent one-thread processes at once"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    configs = [("1 x 1", 1, 1), (f"1 x {args.threads}", 1, args.threads), (f"{args.ranks} x 1", args.ranks, 1)]
    alone = [(f"{args.ranks} x alone", args.ranks, 1)] if args.alone else []
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
                            "breakdown": args.breakdown,
                            "matcher_args": args.matcher_args,
                        }
                        for name, ranks, threads in configs + alone:
                            r = run(dm_job, job, ranks, threads, folder, alone=name.endswith("alone"))
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
        extra = (
            f" {alone[0][0]}: s/it of each | its 1/N: the bound for {names[2]} | {names[2]} against that bound |"
            if alone
            else ""
        )
        print(
            f"| shape | parameterisation | {' | '.join(names)} | speed-up of {names[2]} over {names[0]} | "
            f"over {names[1]} | all-reduce per iteration |" + extra
        )
        print("| --- " * (8 + 3 * bool(alone)) + "|")
        for size in args.sizes:
            for kind in args.kinds:
                med = [statistics.median(r["s_per_it"] for r in results["dm"][f"{size}|{kind}|{n}"]) for n in names]
                comm = results["dm"][f"{size}|{kind}|{names[2]}"]
                kib = comm[0]["comm_bytes"] / 1024
                comm_ms = 1000 * statistics.median(r["comm_s"] for r in comm)
                print(
                    f"| {size} px, {SHAPES[size]} classes | {kind} | {' | '.join(f'{m:.2f}' for m in med)} | "
                    f"{med[0] / med[2]:.2f}x | {med[1] / med[2]:.2f}x | "
                    f"{comm[0]['comm_calls']} calls, {kib:.0f} KiB, {comm_ms:.1f} ms |",
                    end="",
                )
                if alone:
                    each = statistics.median(r["s_per_it"] for r in results["dm"][f"{size}|{kind}|{alone[0][0]}"])
                    bound = each / args.ranks
                    print(f" {each:.2f} | {bound:.2f} | {bound / med[2]:.2f}x |", end="")
                print()
    if args.breakdown and results["dm"]:
        print("\nDM, milliseconds per iteration in each part (first round; one column per process / rank)\n")
        for size in args.sizes:
            for kind in args.kinds:
                columns = []
                for n in names:
                    ranks_parts = results["dm"][f"{size}|{kind}|{n}"][0].get("parts_ms", [])
                    columns += [(f"{n}, rank {r}" if len(ranks_parts) > 1 else n, p) for r, p in enumerate(ranks_parts)]
                keys = list(dict.fromkeys(k for _, part in columns for k in part))
                print(f"{size} px, {kind}:\n\n| part | " + " | ".join(c for c, _ in columns) + " |")
                print("| --- " * (len(columns) + 1) + "|")
                for key in keys:
                    print(f"| {key} | " + " | ".join(f"{part.get(key, 0.0):.0f}" for _, part in columns) + " |")
                print()
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
