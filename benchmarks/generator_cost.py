"""Cost of one AutoencoderKL pretraining step (batch 128) and of decoding 90 latents with backward, per size.

Run: python benchmarks/generator_cost.py [--threads 2] [--repeats 5]
Prints a Markdown table; the sizes are measured interleaved in rounds so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from monai_pld.networks.generators import AutoencoderKLGenerator

SIZES = {
    "(16, 32) default, latent 4 x 14 x 14": (16, 32),
    "(16, 32, 32) earlier default, latent 4 x 7 x 7": (16, 32, 32),
    "(32, 64, 64)": (32, 64, 64),
}


def step_seconds(gen: AutoencoderKLGenerator, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    start = time.perf_counter()
    recon, mu, sigma = gen.reconstruct(x)
    loss = F.l1_loss(recon, x) + 1e-3 * (mu.pow(2) + sigma.pow(2) - 2 * sigma.log()).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def decode_seconds(gen: AutoencoderKLGenerator, n: int = 90) -> float:
    f = torch.randn(n, *gen.latent_shape, requires_grad=True)
    start = time.perf_counter()
    gen.decode(f).sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(128, 3, 28, 28)
    models = {}
    for name, channels in SIZES.items():
        gen = AutoencoderKLGenerator(28, 3, channels=channels, norm_num_groups=8)
        models[name] = (gen, torch.optim.Adam(gen.parameters(), 1e-3))
        step_seconds(gen, models[name][1], x)  # warm-up
    steps = {name: [] for name in models}
    decodes = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, (gen, opt) in models.items():
            steps[name].append(step_seconds(gen, opt, x))
            decodes[name].append(decode_seconds(gen))
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}")
    print(
        "| AutoencoderKL channels | params | train step, batch 128 (ms) | min per PathMNIST epoch | "
        "decode 90 latents + backward (ms) |"
    )
    print("| --- | --- | --- | --- | --- |")
    for name, (gen, _) in models.items():
        step = statistics.median(steps[name])
        params = sum(p.numel() for p in gen.parameters())
        print(
            f"| {name} | {params / 1e6:.2f} M | {1000 * step:.0f} | {89996 / 128 * step / 60:.1f} | "
            f"{1000 * statistics.median(decodes[name]):.0f} |"
        )


if __name__ == "__main__":
    main()
