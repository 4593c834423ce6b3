"""lmforge.cpu_kernels: the C softmax against torch's, the C keep masks' distribution and seeding,
the library's build/cache/fallback, and the fast paths that use them against their torch paths."""
import os

import pytest
import torch

from lmforge import cpu_kernels
from lmforge.cpu_kernels import keep_mask, library, softmax_

needs_cc = pytest.mark.skipif(library() is None, reason="no C compiler here: the torch fallback is all there is")
MIN = torch.finfo(torch.bfloat16).min


@pytest.fixture
def torch_only():
    """Run a block on the torch fallback (the library slot emptied, then restored)."""
    saved = list(cpu_kernels._LIB)
    cpu_kernels._LIB[:] = [None]
    yield
    cpu_kernels._LIB[:] = saved


@needs_cc
@pytest.mark.parametrize("cols", [1, 3, 17, 32, 33, 64, 100, 256])
def test_softmax_matches_torch_within_one_bf16_step_and_masked_keys_weigh_zero(cols):
    torch.manual_seed(cols)
    x = (torch.randn(3, 7, cols) * 8).to(torch.bfloat16)  # logits up to ~+-40
    if cols > 2:
        x[..., -2:] = MIN  # padded keys, as fast_encode's bias makes them
    ref = torch.softmax(x.float(), -1)  # (3, 7, cols) fp32
    y = x.clone()
    assert softmax_(y) is y  # in place
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    # one bf16 rounding of the fp32 result: |err| <= half a bf16 step of the value (2^-9 relative)
    assert ((y.float() - ref).abs() <= ref * 2 ** -8 + 1e-30).all()
    assert (y.float() - torch.softmax(x, -1).float()).abs().max() <= 2 ** -8  # torch's own bf16 softmax
    if cols > 2:
        assert (y[..., -2:] == 0).all()
    torch.testing.assert_close(y.float().sum(-1), torch.ones(3, 7), atol=cols * 2 ** -8, rtol=0)


@needs_cc
def test_softmax_edge_rows():
    x = torch.tensor([[5.0, 5.0, 5.0, 5.0], [-1e4, -1e4 + 64, -1e4, -1e4], [0.0, MIN, MIN, MIN]]).bfloat16()
    y = softmax_(x.clone()).float()
    torch.testing.assert_close(y[0], torch.full((4,), 0.25))  # equal logits: uniform
    torch.testing.assert_close(y[1], torch.tensor([0.0, 1.0, 0.0, 0.0]))  # exp(-64) underflows in bf16 steps
    assert torch.equal(y[2], torch.tensor([1.0, 0.0, 0.0, 0.0]))  # only one key unmasked


def test_softmax_falls_back_to_torch_for_other_inputs(torch_only):
    x = torch.randn(4, 9)
    for t in (x.clone(), x.clone().bfloat16(), x.clone().t().contiguous().t()):
        torch.testing.assert_close(softmax_(t.clone()), torch.softmax(t, -1))


@needs_cc
def test_non_contiguous_and_fp64_inputs_take_torch_even_with_the_library():
    x = torch.randn(6, 5).bfloat16().t()  # non-contiguous: the kernel would read the wrong rows
    assert torch.equal(softmax_(x.clone()), torch.softmax(x, -1))
    f = torch.randn(6, 5).t()
    assert torch.equal(softmax_(f.clone()), torch.softmax(f, -1))
    d = torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(softmax_(d.clone()), torch.softmax(d, -1))


@needs_cc
@pytest.mark.parametrize("cols", [1, 3, 17, 32, 100, 256])
def test_fp32_softmax_matches_torch_and_masked_keys_weigh_zero(cols):
    torch.manual_seed(cols)
    x = torch.randn(3, 7, cols) * 8
    if cols > 2:
        x[..., -2:] = torch.finfo(torch.float32).min  # padded keys, as fast_encode's fp32 bias makes them
    y = x.clone()
    assert softmax_(y) is y
    torch.testing.assert_close(y, torch.softmax(x, -1), atol=2e-7, rtol=2e-6)  # polynomial 2^f: 2.3e-7 relative
    if cols > 2:
        assert (y[..., -2:] == 0).all()
    e = softmax_(torch.tensor([[5.0, 5.0, 5.0, 5.0], [-1e4, -1e4 + 120, -1e4, -1e4]]))
    torch.testing.assert_close(e, torch.tensor([[0.25] * 4, [0.0, 1.0, 0.0, 0.0]]))


@needs_cc
@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_keep_mask_drops_at_k_over_2_15_in_every_lane(itemsize):
    torch.manual_seed(0)
    k = round(0.1 * 2 ** 15)
    m = keep_mask(400_003, itemsize, k)
    assert m.numel() == 400_003 and m.element_size() == itemsize
    assert set(m.unique().tolist()) == {0, -1}
    lanes = 8 // itemsize
    for lane in range(lanes):
        rate = (m[lane::lanes] == 0).float().mean().item()
        assert abs(rate - k / 2 ** 15) < 0.004, (itemsize, lane, rate)
    half = keep_mask(200_000, itemsize, 2 ** 14)
    assert abs((half == 0).float().mean().item() - 0.5) < 0.005
    assert (keep_mask(1000, itemsize, 0) != 0).all() and (keep_mask(1000, itemsize, 2 ** 15) == 0).all()


@needs_cc
def test_keep_mask_is_seeded_by_torch_and_neighbours_are_independent():
    torch.manual_seed(7)
    a = keep_mask(100_000, 2, 2 ** 14)
    torch.manual_seed(7)
    b = keep_mask(100_000, 2, 2 ** 14)
    c = keep_mask(100_000, 2, 2 ** 14)  # the generator moved on: another mask
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = (a == 0).float()
    for lag in (1, 4, 5):  # neighbours in a word (1), the same lane of the next word (4), across (5)
        r = torch.corrcoef(torch.stack([d[:-lag], d[lag:]]))[0, 1].item()
        assert abs(r) < 0.02, (lag, r)


@needs_cc
def test_keep_mask_equals_splitmix64_on_a_counter_by_hand():
    """The documented definition: lane l of word i kept iff 15 bits of splitmix64(seed + (i+1) g)
    at bit 16 l (2-byte lanes) are >= k, with seed the next int64 draw of torch's generator."""
    def splitmix(seed, i):
        z = (seed + (i + 1) * 0x9E3779B97F4A7C15) % 2 ** 64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2 ** 64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2 ** 64
        return z ^ (z >> 31)

    k = 9000
    torch.manual_seed(11)
    seed = int(torch.empty((), dtype=torch.int64).random_())
    torch.manual_seed(11)
    m = keep_mask(4 * 50, 2, k)
    ref = [-1 if (splitmix(seed, i) >> (16 * lane)) & 0x7FFF >= k else 0 for i in range(50) for lane in range(4)]
    assert m.tolist() == ref


def test_keep_mask_is_none_without_the_library(torch_only):
    assert keep_mask(10, 2, 100) is None


def test_library_builds_into_the_cache_once_and_can_be_switched_off(tmp_path, monkeypatch):
    if library() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    lib = cpu_kernels._compile()
    built = list((tmp_path / "kernels").iterdir())
    assert lib is not None and len(built) == 1 and built[0].suffix == ".so"  # no temporary left behind
    stamp = os.stat(built[0]).st_mtime_ns
    assert cpu_kernels._compile() is not None and os.stat(built[0]).st_mtime_ns == stamp  # loaded, not rebuilt
    monkeypatch.setenv("LMFORGE_C_KERNELS", "0")
    assert cpu_kernels._compile() is None
    monkeypatch.delenv("LMFORGE_C_KERNELS")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "other"))
    assert cpu_kernels._compile() is None  # no compiler: the torch paths, nothing half-written
    assert not list((tmp_path / "other" / "kernels").iterdir())


@needs_cc
def test_fast_encode_with_the_kernel_matches_its_torch_softmax_path(tiny_bert_dir):
    from transformers import AutoModel

    from lmforge.fast_encode import FastBert

    torch.manual_seed(0)
    bert = AutoModel.from_pretrained(tiny_bert_dir).eval()
    fast = FastBert(bert, torch.bfloat16, attention="eager")
    ids = torch.randint(5, bert.config.vocab_size, (5, 37))
    mask = (torch.arange(37)[None, :] < torch.tensor([37, 30, 12, 5, 33])[:, None]).long()
    with torch.inference_mode():
        a = fast.mean_pooled(ids, mask)
        saved = list(cpu_kernels._LIB)
        cpu_kernels._LIB[:] = [None]
        try:
            b = fast.mean_pooled(ids, mask)
        finally:
            cpu_kernels._LIB[:] = saved
    cos = torch.nn.functional.cosine_similarity(a, b)
    assert cos.min() > 0.9999, cos


def test_the_library_is_built_once_when_threads_ask_together(monkeypatch):
    """Inference worker threads call the kernels together on a first run: one build, one entry."""
    import threading

    builds = []
    real = cpu_kernels._compile
    monkeypatch.setattr(cpu_kernels, "_LIB", [])
    monkeypatch.setattr(cpu_kernels, "_compile", lambda: builds.append(1) or real())
    threads = [threading.Thread(target=library) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(cpu_kernels._LIB) == 1


@needs_cc
def test_softmax_keys_masks_each_matrix_to_its_real_keys():
    from lmforge.cpu_kernels import softmax_keys_

    torch.manual_seed(0)
    w = torch.randn(6, 5, 40) * 6
    lens = torch.tensor([40, 1, 17, 33, 40, 2], dtype=torch.int32)
    ref = w.masked_fill(torch.arange(40)[None, None, :] >= lens[:, None, None].long(), float("-inf")).softmax(-1)
    y = w.clone()
    assert softmax_keys_(y, lens)
    torch.testing.assert_close(y, ref, atol=2e-7, rtol=2e-6)
    assert (y[1, :, 1:] == 0).all() and (y[1, :, 0] == 1).all()
    assert not softmax_keys_(w.clone().bfloat16(), lens)  # fp32 only: the caller keeps its bias path


@pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler: the kernel is not built")
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 77), (1, 576)])
def test_rms_norm_equals_llama_rmsnorm_in_fp32(shape):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(shape[-1])
    norm = LlamaRMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
    x = torch.randn(shape, generator=g) * 3
    with torch.no_grad():
        torch.testing.assert_close(cpu_kernels.rms_norm(x, norm.weight.detach(), 1e-5), norm(x), rtol=2e-6, atol=2e-6)
    assert cpu_kernels.rms_norm(x.bfloat16(), norm.weight.detach().bfloat16(), 1e-5) is None
    assert cpu_kernels.rms_norm(x, norm.weight, 1e-5) is None  # a weight that needs its gradient: torch's op


@needs_cc
def test_silu_mul_equals_torch():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 2 * 77, generator=g) * 8  # large |g| on both sides: no overflow in the sigmoid
    y[0, 0], y[1, 1] = 100.0, -100.0
    want = torch.nn.functional.silu(y[:, :77]) * y[:, 77:]
    torch.testing.assert_close(cpu_kernels.silu_mul(y, 77), want, rtol=2e-6, atol=2e-6)
    assert cpu_kernels.silu_mul(y.bfloat16(), 77) is None and cpu_kernels.silu_mul(y, 76) is None
