"""The speed settings of DM and of the distillation engine compute the same thing as the plain path."""

import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from monai_pld.data import ImageSet
from monai_pld.matching import DistributionMatcher
from monai_pld.networks.classifiers import AvgPool2x2, get_classifier
from monai_pld.networks.generators import AutoencoderKLGenerator, default_autoencoder_config
from monai_pld.workflows import build_trainer


def _sets(size=16, classes=3, real_per_class=9, syn_per_class=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    real_labels = torch.arange(classes).repeat_interleave(real_per_class)
    syn_labels = torch.arange(classes).repeat_interleave(syn_per_class)
    real = torch.rand(len(real_labels), 3, size, size, generator=gen)
    syn = torch.rand(len(syn_labels), 3, size, size, generator=gen).requires_grad_()
    return syn, syn_labels, real, real_labels


def _loss_and_grad(matcher, step=3):
    syn, syn_labels, real, real_labels = _sets()
    loss = matcher.loss(syn, syn_labels, real, real_labels, step)
    (grad,) = torch.autograd.grad(loss, syn)
    return loss.detach(), grad


@pytest.mark.parametrize("shape", [(3, 5, 28, 28), (2, 4, 7, 7), (2, 3, 9, 6), (1, 2, 2, 3)])
def test_fast_average_pool_equals_torch_bit_for_bit(shape):
    x = torch.randn(*shape, requires_grad=True)
    fast = AvgPool2x2()(x)
    upstream = torch.randn_like(fast)
    (grad_fast,) = torch.autograd.grad(fast, x, upstream)
    stock = F.avg_pool2d(x, 2, 2)
    (grad_stock,) = torch.autograd.grad(stock, x, upstream)
    assert torch.equal(fast, stock) and torch.equal(grad_fast, grad_stock)


def test_fast_average_pool_falls_back_for_channels_last():
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(AvgPool2x2()(x), F.avg_pool2d(x, 2, 2))


@pytest.mark.parametrize("chunk", [1, 4, 7, "auto"])
def test_chunked_embedding_gives_the_loss_and_gradient_of_one_call(chunk):
    kwargs = {"embedder_kwargs": {"width": 16}, "seed": 5}
    loss_one, grad_one = _loss_and_grad(DistributionMatcher(3, 3, 16, embed_chunk=0, **kwargs))
    loss, grad = _loss_and_grad(DistributionMatcher(3, 3, 16, embed_chunk=chunk, **kwargs))
    torch.testing.assert_close(loss, loss_one, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, grad_one, rtol=1e-5, atol=1e-6)


def test_auto_chunk_follows_the_first_activation_map():
    # 128 channels x 28 x 28 float32 = 392 KiB per image -> 20 images per 8 MiB; 64 px -> the floor of 4
    assert DistributionMatcher(3, 9, 28).embed_chunk == 20
    assert DistributionMatcher(3, 9, 64).embed_chunk == 4
    assert DistributionMatcher(3, 9, 28, embedder_kwargs={"width": 8}).embed_chunk == 256


def test_batch_norm_embedder_always_sees_the_whole_set():
    m = DistributionMatcher(3, 3, 16, embedder_kwargs={"width": 8, "norm": "batchnorm"}, embed_chunk=4)
    assert m.embed_chunk == 0 and m.batch_dependent


def test_speed_settings_are_recorded():
    m = DistributionMatcher(3, 3, 16, embedder_kwargs={"width": 8}, embed_chunk=6)
    assert m.hyper_parameters() == {
        "seed": 0,
        "embed_chunk": 6,
        "real_dtype": "float32",
        "channels_last": False,
        "compile": False,
        "estimator": "pooled",
        "std_weight": 0.0,
        "kernel": "linear",
    }


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"embed_chunk": -1}, "embed_chunk"),
        ({"embed_chunk": "many"}, "embed_chunk"),
        ({"embed_chunk": 2.5}, "embed_chunk"),
        ({"real_dtype": "float16"}, "real_dtype"),
    ],
)
def test_bad_speed_settings_are_named(kwargs, words):
    with pytest.raises(ValueError, match=words):
        DistributionMatcher(3, 3, 16, embedder_kwargs={"width": 8}, **kwargs)


def test_channels_last_and_bfloat16_stay_close_to_float32():
    kwargs = {"embedder_kwargs": {"width": 16}, "seed": 2}
    loss, grad = _loss_and_grad(DistributionMatcher(3, 3, 16, **kwargs))
    loss_cl, grad_cl = _loss_and_grad(DistributionMatcher(3, 3, 16, channels_last=True, **kwargs))
    torch.testing.assert_close(loss_cl, loss, rtol=1e-4, atol=0)
    torch.testing.assert_close(grad_cl, grad, rtol=1e-3, atol=1e-6)
    # bfloat16 keeps 8 bits of mantissa: the real means move by about 0.4 %, the loss a little more
    loss_bf, grad_bf = _loss_and_grad(DistributionMatcher(3, 3, 16, real_dtype="bfloat16", **kwargs))
    assert loss_bf.dtype == torch.float32 and grad_bf.dtype == torch.float32
    assert abs(loss_bf.item() - loss.item()) / loss.item() < 0.05
    assert torch.nn.functional.cosine_similarity(grad_bf.flatten(), grad.flatten(), dim=0) > 0.99


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_compiled_embedder_matches_eager_for_every_step():
    kwargs = {"embedder_kwargs": {"width": 8, "depth": 2}, "seed": 4}
    eager = DistributionMatcher(3, 3, 16, **kwargs)
    compiled = DistributionMatcher(3, 3, 16, compile=True, **kwargs)
    assert "net" not in dict(compiled.named_modules())  # the compile template is not part of the state
    for step in (1, 2):  # step 2 draws new weights: the same graph must use them
        loss, grad = _loss_and_grad(eager, step)
        loss_c, grad_c = _loss_and_grad(compiled, step)
        torch.testing.assert_close(loss_c, loss, rtol=1e-4, atol=0)
        torch.testing.assert_close(grad_c, grad, rtol=1e-3, atol=1e-5)


def _tiny_data():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8, generator=gen)
    return ImageSet(images, torch.arange(3).repeat_interleave(8), ["a", "b", "c"], "tiny")


def test_chunked_decoding_gives_the_images_of_one_call():
    generator = AutoencoderKLGenerator(**default_autoencoder_config(16, 3, width=8)).freeze()
    latents = torch.randn(7, *generator.latent_shape)

    def trainer(chunk):
        return build_trainer(_tiny_data(), "latent", ipc=1, iterations=1, generator=generator, decode_chunk=chunk)

    torch.testing.assert_close(trainer(3).decode(latents), trainer(0).decode(latents), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="decode_chunk"):
        trainer(-2)


def test_classifier_pools_are_the_fast_exact_kind():
    net = get_classifier("convnet", 3, 4, 16, width=8)
    assert any(isinstance(m, AvgPool2x2) for m in net.modules())


def test_cpu_allocator_modes_and_a_bad_value():
    from monai_pld.utils import ConfigError, configure_cpu_allocator

    assert configure_cpu_allocator("default") is False  # leaves the allocator alone
    with pytest.raises(ConfigError, match="cpu_allocator.*tuned"):
        configure_cpu_allocator("fast")


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's"
)
def test_cpu_allocator_is_tuned_on_glibc_unless_the_environment_says_otherwise(monkeypatch):
    from monai_pld.utils import configure_cpu_allocator

    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_"):
        monkeypatch.delenv(name, raising=False)
    assert configure_cpu_allocator("tuned") is True
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # a user's own setting wins
    assert configure_cpu_allocator("tuned") is False


_RUN_TINY = """
import hashlib, sys, torch
from monai_pld.data import ImageSet
from monai_pld.workflows import build_trainer
gen = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8, generator=gen)
data = ImageSet(images, torch.arange(3).repeat_interleave(8), ["a", "b", "c"], "tiny")
trainer = build_trainer(data, "pixel", "dm", ipc=2, iterations=3, generator=None, device="cpu",
                        cpu_allocator=sys.argv[1], matcher_args={"embedder_kwargs": {"width": 16}})
trainer.run()
print(hashlib.sha256(trainer.parameterization.codes.detach().numpy().tobytes()).hexdigest())
"""


def test_cpu_allocator_changes_where_memory_comes_from_not_the_result(tmp_path):
    # each mode in a fresh process (the setting is process-wide and cannot be undone), both at once (most of each
    # is the import of torch and MONAI, one core's work): the same bits come out
    procs = {
        mode: subprocess.Popen(
            [sys.executable, "-c", _RUN_TINY, mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for mode in ("default", "tuned")
    }
    runs = {}
    for mode, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{mode}: {err[-2000:]}"
        runs[mode] = out.split()[-1]
    assert len(runs["tuned"]) == 64 and runs["tuned"] == runs["default"]
