"""Seconds per DM iteration, side by side with the public reference implementation, and where the time goes.

Run (quiet machine only: check /proc/loadavg):

    python benchmarks/dm_speed.py                                  # batch 64 and 256, 28 and 32 px
    python benchmarks/dm_speed.py --batch-real 64 --sizes 28 --phases
    python benchmarks/dm_speed.py --memory                         # peak RSS of each variant, one process each
    python benchmarks/dm_speed.py --arithmetic                     # multiply-adds of the parts (no timing)

The reference is DatasetCondensation's unmodified ``utils.py``/``networks.py`` (``--ref``, default
``../shared/reference/DatasetCondensation`` beside the checkout); its DM iteration is re-enacted as its
``main_DM.py`` runs it: a new ConvNet per iteration, per class ``batch_real`` random real images and the class's
synthetic images, the same DSA transform on both, ``embed`` of each, squared distance of the means, SGD step.
monai_pld's variants run its ``DistillationTrainer`` on the same data, sizes and batch (``ipc`` slots per class,
``batch_real`` real images per class). Every variant runs in a process of its own (kept for the whole run, so its
warm-up carries over) and they are timed round by round, interleaved, so that machine noise touches them alike;
the table gives medians and the ratio to the reference (and to ``pixel``). Separate processes keep process-wide
settings apart: monai_pld's trainer tunes glibc's allocator (``cpu_allocator``), the reference runs with the
allocator as a user's process has it. ``<variant>@default`` runs a monai_pld variant with ``cpu_allocator:
default`` (e.g. ``--variants ref,pixel,pixel@default``), and ``ref@tuned`` the reference with the allocator tuned.

``--phases`` times the parts of one monai_pld iteration separately (the same work as the engine, called step by
step). ``--matcher-args`` passes DM settings (e.g. ``'{"compile": true}'``).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from monai_pld.data import ImageSet
from monai_pld.engines import DistillationTrainer
from monai_pld.matching import DistributionMatcher
from monai_pld.networks.generators import AutoencoderKLGenerator, PixelGenerator, at_layer, default_autoencoder_config
from monai_pld.parameterizations import SLFDistribution
from monai_pld.utils import configure_cpu_allocator, derive_seed
from monai_pld.workflows import build_trainer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REF = ROOT.parent / "shared" / "reference" / "DatasetCondensation"
# name -> (parameterisation, include_mean)
PROJECT = {"pixel": ("pixel", False), "latent": ("latent", False), "slfd": ("slfd", False), "slfd+mean": ("slfd", True)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Workload:
    """One dataset shape and batch: real uint8 data, and a runner per variant that returns seconds per iteration."""

    def __init__(self, args: argparse.Namespace, size: int, batch_real: int) -> None:
        self.args, self.size, self.batch_real, self.device = args, size, batch_real, args.device
        k, c = args.classes, 3
        u8 = np.random.default_rng(0).integers(0, 256, (k * args.per_class, c, size, size), dtype=np.uint8)
        labels = np.repeat(np.arange(k), args.per_class)
        self.data = ImageSet(torch.from_numpy(u8), torch.from_numpy(labels).long(), [f"c{i}" for i in range(k)], "b")
        self.u8, self.labels = u8, labels
        self.pixel_gen = PixelGenerator((c, size, size)).freeze()
        # split where the bundles distil (``latent_layer``; 0: the bottleneck)
        self.autoencoder = at_layer(
            AutoencoderKLGenerator(**default_autoencoder_config(size, c)).freeze(), args.latent_layer
        )
        self._ref = None

    # the reference ------------------------------------------------------------------------------------------------
    def _reference_state(self):
        if self._ref is None:
            sys.path.insert(0, str(self.args.ref))
            from utils import DiffAugment, ParamDiffAug, get_network  # noqa: PLC0415  (reference, unmodified)

            k, c, s = self.args.classes, 3, self.size
            # as main_DM.py: the whole training split as normalised float32, per-class index lists
            images = ((torch.from_numpy(self.u8).float() / 255 - 0.5) / 0.5).to(self.device)
            indices = [np.where(self.labels == i)[0] for i in range(k)]
            syn = torch.randn(k * self.args.ipc, c, s, s, device=self.device, requires_grad=True)
            opt = torch.optim.SGD([syn], lr=1.0, momentum=0.5)
            self._ref = (DiffAugment, ParamDiffAug(), get_network, images, indices, syn, opt)
        return self._ref

    def reference(self, iters: int) -> float:
        diff_augment, dsa, get_network, images, indices, syn, opt = self._reference_state()
        k, c, s, ipc = self.args.classes, 3, self.size, self.args.ipc
        sync(self.device)
        start = time.perf_counter()
        for _ in range(iters):
            net = get_network("ConvNet", c, k, (s, s)).to(self.device)
            net.train()
            for p in net.parameters():
                p.requires_grad = False
            loss = torch.tensor(0.0, device=self.device)
            for i in range(k):
                real = images[np.random.permutation(indices[i])[: self.batch_real]]
                fake = syn[i * ipc : (i + 1) * ipc]
                seed = int(time.time() * 1000) % 100000
                real = diff_augment(real, "color_crop_cutout_flip_scale_rotate", seed=seed, param=dsa)
                fake = diff_augment(fake, "color_crop_cutout_flip_scale_rotate", seed=seed, param=dsa)
                loss = loss + torch.sum((net.embed(real).detach().mean(0) - net.embed(fake).mean(0)) ** 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()
        sync(self.device)
        return (time.perf_counter() - start) / iters

    # monai_pld ----------------------------------------------------------------------------------------------------
    def trainer(self, name: str, iters: int) -> DistillationTrainer:
        name, _, allocator = name.partition("@")
        kind, include_mean = PROJECT[name]
        trainer_args = {"cpu_allocator": allocator or "tuned", **self.args.trainer_args}
        gen = self.pixel_gen if kind == "pixel" else self.autoencoder
        return build_trainer(
            self.data,
            kind,
            "dm",
            ipc=self.args.ipc,
            iterations=iters,
            generator=gen,
            batch_real_per_class=self.batch_real,
            include_mean=include_mean,
            lr_codes=0.01,  # one value for every space: the work per iteration does not depend on it
            lr_network=0.001,
            device=self.device,
            matcher_args=self.args.matcher_args,
            **trainer_args,
        )

    def project(self, name: str, iters: int) -> float:
        trainer = self.trainer(name, iters)
        sync(self.device)
        start = time.perf_counter()
        trainer.run()
        sync(self.device)
        return (time.perf_counter() - start) / iters

    def run(self, name: str, iters: int) -> float:
        if name == "ref@tuned":  # the reference with the allocator monai_pld's trainer sets
            configure_cpu_allocator("tuned")
        return self.reference(iters) if name.startswith("ref") else self.project(name, iters)

    def phases(self, name: str, steps: int = 4) -> dict[str, float]:
        """Median milliseconds of each part of a monai_pld iteration, called one by one as the engine does."""
        trainer = self.trainer(name, steps)
        matcher, param, batches = trainer.matcher, trainer.parameterization, trainer.data_loader
        times: dict[str, list[float]] = {}

        def lap(label: str, t0: float) -> float:
            sync(self.device)
            t = time.perf_counter()
            times.setdefault(label, []).append(1000 * (t - t0))
            return t

        for step in range(1, steps + 2):
            sync(self.device)
            t = time.perf_counter()
            batch = batches.batch(step)
            real, real_labels = batch["image"].to(self.device), batch["label"].to(self.device)
            t = lap("real batch: sampling, uint8 -> float", t)
            net = matcher.build_embedder(step, self.device)
            t = lap("random embedder: build and seed", t)
            seed = derive_seed(matcher.seed, step, 1)
            with torch.no_grad():
                x = matcher.normalize(real)
                t = lap("real: normalise", t)
                x = matcher.augment(x, seed, groups=real_labels)
                t = lap("real: DSA", t)
                real_mean, _ = matcher._class_sums(matcher._embed(net, x), real_labels)
                t = lap("real: embed (no grad)", t)
            latents, syn_labels = param.sample(1, with_mean=trainer.include_mean)
            t = lap("synthetic: sample latents", t)
            images = trainer.decode(latents)
            t = lap("synthetic: decode", t)
            y = matcher.augment(matcher.normalize(images), seed, groups=syn_labels)
            t = lap("synthetic: normalise + DSA", t)
            syn_mean, _ = matcher._class_sums(matcher._embed(net, y), syn_labels)
            loss = (real_mean - syn_mean).pow(2).sum()
            t = lap("synthetic: embed", t)
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t = lap("backward (embedder, decoder, parameterisation)", t)
            trainer.optimizer.step()
            lap("optimiser step", t)
        medians = {label: statistics.median(v[1:]) for label, v in times.items()}  # the first step warms up
        engine = self.project(name, steps) * 1000
        medians["engine, handlers and the rest (whole iteration minus the parts)"] = engine - sum(medians.values())
        medians["whole iteration (DistillationTrainer.run)"] = engine
        return medians


def _variant_worker(conn, args: argparse.Namespace, size: int, batch_real: int) -> None:
    """One variant's process: builds the workload once, then times ``(name, iters)`` requests until ``None``."""
    torch.set_num_threads(args.threads)
    work = Workload(args, size, batch_real)
    while (request := conn.recv()) is not None:
        conn.send(work.run(*request))


def interleaved(args: argparse.Namespace, size: int, batch_real: int) -> dict[str, list[float]]:
    """Seconds per iteration of every variant, each in its own process, round by round (round 0 warms up)."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no allocator or thread state inherited
    workers = {}
    for name in args.variants:
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_variant_worker, args=(theirs, args, size, batch_real), daemon=True)
        proc.start()
        workers[name] = (ours, proc)
    times: dict[str, list[float]] = {n: [] for n in args.variants}
    try:
        for r in range(args.rounds + 1):  # round 0 warms up (allocator, caches, first compile)
            line = []
            for name, (conn, _) in workers.items():
                conn.send((name, args.iters))  # one variant at a time: the others wait, idle
                value = conn.recv()
                if r:
                    times[name].append(value)
                    line.append(f"{name} {value:.3f}")
            if r:
                print(f"{size}px batch {batch_real} round {r}: " + ", ".join(line), flush=True)
    finally:
        for conn, proc in workers.values():
            conn.send(None)
            proc.join()
    return times


def parts(args: argparse.Namespace, size: int, batch_real: int, reps: int = 5) -> dict[str, float]:
    """Median seconds of the pieces the speed settings change, each variant interleaved with its alternatives:
    the real embedding (one call, per-class calls, ``auto`` chunks, channels-last, bfloat16), the ConvNet's 2x2
    pooling, and the decoder's forward and backward on ``ipc x classes`` latents in chunks."""
    import torch.nn.functional as F  # noqa: PLC0415

    from monai_pld.networks.classifiers import AvgPool2x2  # noqa: PLC0415

    n = args.classes * batch_real
    real = torch.rand(n, 3, size, size)
    auto = DistributionMatcher(3, args.classes, size).embed_chunk
    net = DistributionMatcher(3, args.classes, size).build_embedder(1, "cpu")
    bf16 = {"real_dtype": "bfloat16"}
    embeds = {
        "real embed: one call": DistributionMatcher(3, args.classes, size, embed_chunk=0),
        f"real embed: per class ({batch_real} images per call, as the reference)": DistributionMatcher(
            3, args.classes, size, embed_chunk=batch_real
        ),
        f"real embed: auto ({auto} images per call, the default)": DistributionMatcher(3, args.classes, size),
        "real embed: auto, channels-last": DistributionMatcher(3, args.classes, size, channels_last=True),
        "real embed: auto, bfloat16 autocast": DistributionMatcher(3, args.classes, size, **bf16),
    }
    nets = {name: m.build_embedder(1, "cpu") for name, m in embeds.items()}

    def embed_real(name: str) -> None:
        m = embeds[name]
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=m.real_dtype == "bfloat16"):
            m._embed(nets[name], real)

    decoder = at_layer(AutoencoderKLGenerator(**default_autoencoder_config(size, 3)).freeze(), args.latent_layer)
    maps = torch.randn(auto, net.features[0].out_channels, size, size)
    latents = torch.randn(args.classes * args.ipc, *decoder.latent_shape, requires_grad=True)

    def decode(chunk: int) -> None:
        parts_ = latents.split(chunk) if chunk else [latents]
        torch.cat([decoder.decode(p) for p in parts_]).sum().backward()

    labels = torch.arange(args.classes).repeat_interleave(args.ipc)
    slfd = SLFDistribution(torch.randn(len(labels), *decoder.latent_shape), labels, args.classes)

    def slot_network(one_pass: bool) -> None:
        # the means and one sample per slot, forward + backward: one pass of the network, or a pass for each
        if one_pass:
            latents_ = slfd.sample(1, with_mean=True)[0]
        else:
            latents_ = torch.cat([slfd.mean(), slfd.sample(1)[0]])
        latents_.square().sum().backward()

    jobs = {name: (lambda name=name: embed_real(name)) for name in embeds}
    jobs[f"SLFD {len(labels)} slots, means + 1 sample, forward + backward: two passes"] = lambda: slot_network(False)
    jobs[f"SLFD {len(labels)} slots, means + 1 sample, forward + backward: one pass"] = lambda: slot_network(True)
    jobs[f"pool 2x2, torch avg_pool2d on {tuple(maps.shape)}"] = lambda: F.avg_pool2d(maps, 2, 2)
    jobs[f"pool 2x2, AvgPool2x2 on {tuple(maps.shape)}"] = lambda: AvgPool2x2()(maps)
    for chunk in (0, 30, 10, 5):
        jobs[f"decode {len(latents)} latents, forward + backward, chunk {chunk or 'none (one call)'}"] = (
            lambda chunk=chunk: decode(chunk)
        )
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for r in range(reps + 1):
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def arithmetic(args: argparse.Namespace, size: int, batch_real: int) -> dict[str, float]:
    """Multiply-adds (GMAC, counted by ``torch.utils.flop_counter``) of the parts of one DM iteration that differ
    between the parameterisations, and the ratio to pixel's that the arithmetic alone implies: a floor on the
    seconds ratio when every part runs at the embedder's efficiency. Machine independent, so free of the noise of
    the timings."""
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    def gmac(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 2e9

    k = args.classes
    net = DistributionMatcher(3, k, size).build_embedder(1, "cpu")
    real = torch.rand(k * batch_real, 3, size, size)
    syn = torch.rand(k * args.ipc, 3, size, size, requires_grad=True)
    decoder = at_layer(AutoencoderKLGenerator(**default_autoencoder_config(size, 3)).freeze(), args.latent_layer)
    latents = torch.randn(k * args.ipc, *decoder.latent_shape, requires_grad=True)
    labels = torch.arange(k).repeat_interleave(args.ipc)
    slfd = SLFDistribution(torch.randn(len(labels), *decoder.latent_shape), labels, k)

    def embed_real() -> None:
        with torch.no_grad():
            net.embed(real)

    out = {
        "real embed (no grad)": gmac(embed_real),
        "synthetic embed, forward + backward": gmac(lambda: net.embed(syn).sum().backward()),
        "decoder, forward + backward": gmac(lambda: decoder.decode(latents).sum().backward()),
        "slot network, one sample per slot, forward + backward": gmac(lambda: slfd.sample(1)[0].sum().backward()),
    }
    pixel = out["real embed (no grad)"] + out["synthetic embed, forward + backward"]
    out["ratio floor: latent / pixel"] = (pixel + out["decoder, forward + backward"]) / pixel
    out["ratio floor: slfd / pixel"] = (
        pixel + out["decoder, forward + backward"] + out["slot network, one sample per slot, forward + backward"]
    ) / pixel
    return out


def peak_memory(args: argparse.Namespace) -> dict[str, float]:
    """Peak RSS (MiB) of one process per variant that builds the data and runs ``iters`` iterations."""
    out = {}
    for size in args.sizes:
        for batch in args.batch_real:
            for name in args.variants:
                cmd = [
                    sys.executable,
                    __file__,
                    "--only",
                    name,
                    "--sizes",
                    str(size),
                    "--batch-real",
                    str(batch),
                    "--iters",
                    "2",
                    "--threads",
                    str(args.threads),
                    "--per-class",
                    str(args.per_class),
                    "--ref",
                    str(args.ref),
                    "--device",
                    args.device,
                ]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                out[f"{name} {size}px batch {batch}"] = float(res.stdout.strip().splitlines()[-1])
                print(f"{name} {size}px batch {batch}: {out[f'{name} {size}px batch {batch}']:.0f} MiB", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", type=Path, default=DEFAULT_REF, help="folder with the reference utils.py/networks.py")
    p.add_argument("--classes", type=int, default=9)
    p.add_argument("--per-class", type=int, default=10000, help="real images per class (PathMNIST: about 10,000)")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[28, 32])
    p.add_argument("--batch-real", type=lambda s: [int(v) for v in s.split(",")], default=[64, 256])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=3, help="iterations per variant and round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", type=lambda s: s.split(","), default=["ref", "pixel", "latent", "slfd", "slfd+mean"])
    p.add_argument(
        "--latent-layer",
        type=int,
        default=inspect.signature(build_trainer).parameters["latent_layer"].default,
        help="decoder block the latent rows distil after (default: build_trainer's, as in the bundles)",
    )
    p.add_argument("--matcher-args", type=json.loads, default={}, help="DM settings as JSON")
    p.add_argument("--trainer-args", type=json.loads, default={}, help="DistillationTrainer settings as JSON")
    p.add_argument("--phases", action="store_true", help="also time the parts of a pixel and a latent iteration")
    p.add_argument("--memory", action="store_true", help="peak RSS per variant (one process each) instead of time")
    p.add_argument("--parts", action="store_true", help="time the pieces each speed setting changes instead")
    p.add_argument("--arithmetic", action="store_true", help="count the multiply-adds of the parts instead")
    p.add_argument("--only", help=argparse.SUPPRESS)  # child process of --memory
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.ref / "utils.py").is_file() and "ref" in args.variants:
        sys.exit(f"no reference utils.py in {args.ref}; pass --ref, or leave 'ref' out of --variants")

    if args.only:
        Workload(args, args.sizes[0], args.batch_real[0]).run(args.only, args.iters)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return
    header = (
        f"# {datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} threads, device {args.device}, load before start "
        f"{open('/proc/loadavg').read().split()[0] if os.path.exists('/proc/loadavg') else '?'}"
    )
    print(header, flush=True)
    results: dict = {"header": header, "args": {k: str(v) for k, v in vars(args).items()}}
    if args.memory:
        results["peak_rss_mib"] = peak_memory(args)
    elif args.arithmetic or args.parts:
        measure, what, unit, digits = (
            (arithmetic, "part", "GMAC (ratios: arithmetic floor)", 3)
            if args.arithmetic
            else (parts, "piece", "s (median of 5)", 4)
        )
        for size in args.sizes:
            for batch in args.batch_real:
                key = f"{size}px batch {batch}"
                results[key] = measure(args, size, batch)
                print(f"| {key}: {what} | {unit} |\n| --- | --- |")
                for name, value in results[key].items():
                    print(f"| {name} | {value:.{digits}f} |", flush=True)
    else:
        for size in args.sizes:
            for batch in args.batch_real:
                times = interleaved(args, size, batch)
                med = {n: statistics.median(v) for n, v in times.items()}
                key = f"{size}px batch {batch}"
                results[key] = {"seconds_per_iteration": times, "median": med}
                print(f"| {key} | s/it | to reference | to pixel |\n| --- | --- | --- | --- |")
                for n, m in med.items():
                    to_ref = f"{m / med['ref']:.2f}" if "ref" in med else ""
                    to_pixel = f"{m / med['pixel']:.2f}" if "pixel" in med else ""
                    print(f"| {n} | {m:.3f} | {to_ref} | {to_pixel} |", flush=True)
                if args.phases:
                    work = Workload(args, size, batch)
                    for name in ("pixel", "latent"):
                        ph = work.phases(name)
                        results[key][f"phases_{name}_ms"] = ph
                        print(f"\n| {name}, {key}: phase | ms |\n| --- | --- |")
                        for label, ms in ph.items():
                            print(f"| {label} | {ms:.1f} |", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
