"""The compiled small-step GEMM: torch's results to fp32 rounding, and bit-identical rows whatever the
row count (what makes verifying drafts give exactly the logits of decoding one token)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from worker.serving import cpu_kernels


@pytest.fixture(scope="module")
def kernel() -> cpu_kernels.SmallGemm:
    if {"avx2", "fma"} - cpu_kernels._cpu_flags():
        pytest.skip("this CPU has no AVX2/FMA: the engine uses torch's GEMM (tested elsewhere)")
    built = cpu_kernels.small_gemm()
    assert built is not None, "the kernel should build here (gcc and AVX2 are present): see the log"
    return built


# K = 67 and N = 13 exercise the scalar tail and the leftover weight rows of every block shape.
@pytest.mark.parametrize(("out_features", "in_features"), [(40, 64), (13, 67), (300, 576)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_torch_for_every_row_count(
    kernel: cpu_kernels.SmallGemm, out_features: int, in_features: int, with_bias: bool
) -> None:
    torch.manual_seed(out_features)
    weight = torch.randn(out_features, in_features)
    bias = torch.randn(out_features) if with_bias else None
    wide = torch.randn(8, in_features + 5)
    x = wide[:, 2 : 2 + in_features]  # rows with a stride: how the runner passes views
    for rows in range(1, cpu_kernels.MAX_ROWS + 1):
        assert kernel.supports(x[:rows], weight)
        got = kernel(x[:rows], weight, bias)
        # Sums of up to 576 unit-variance products: summation order alone moves them by ~1e-5.
        torch.testing.assert_close(got, F.linear(x[:rows], weight, bias), rtol=1e-5, atol=1e-4)


def test_each_row_is_bit_identical_whatever_the_batch_it_is_in(kernel: cpu_kernels.SmallGemm) -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(517, 200), torch.randn(517)
    x = torch.randn(8, 200)
    alone = torch.cat([kernel(x[i : i + 1], weight, bias) for i in range(8)])
    for rows in range(1, 9):
        for start in range(0, 9 - rows):
            assert torch.equal(kernel(x[start : start + rows], weight, bias), alone[start : start + rows])


def test_a_second_thread_changes_no_bit(kernel: cpu_kernels.SmallGemm) -> None:
    torch.manual_seed(1)
    weight, bias, x = torch.randn(3000, 576), torch.randn(3000), torch.randn(5, 576)
    try:
        kernel.threads = 1
        alone = kernel(x, weight, bias)
        kernel.threads = 2
        for _ in range(3):  # the helper thread is started by the first call and reused
            assert torch.equal(kernel(x, weight, bias), alone)
    finally:
        kernel.threads = 1


def test_declines_what_it_does_not_compute(kernel: cpu_kernels.SmallGemm) -> None:
    weight = torch.randn(16, 32)
    assert not kernel.supports(torch.randn(9, 32), weight)  # more rows than the kernel's blocks
    assert not kernel.supports(torch.randn(2, 32, dtype=torch.bfloat16), weight.bfloat16())
    assert not kernel.supports(torch.randn(32, 2).T, weight)  # columns not contiguous
    with pytest.raises(ValueError, match="features"):
        kernel(torch.randn(2, 31), weight, None)


def test_builds_into_the_cache_once_and_can_be_switched_off(
    kernel: cpu_kernels.SmallGemm, tmp_path: Path
) -> None:
    config = cpu_kernels.KernelConfig(cache_dir=tmp_path)
    built = cpu_kernels._compiled(config)
    assert built.parent == tmp_path and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    assert cpu_kernels._compiled(config) == built and built.stat().st_mtime_ns == stamp  # reused, not rebuilt
    off = cpu_kernels.KernelConfig(enabled=False)
    assert cpu_kernels._unsupported_reason(off) == "switched off (KernelConfig.enabled is False)"
    assert cpu_kernels.small_gemm(off) is None


def test_the_serve_entry_point_takes_the_kernel_settings_from_settings_and_cc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.settings import Settings
    from worker.serve_main import kernel_config

    assert kernel_config(Settings(data_dir=tmp_path), {}) == cpu_kernels.KernelConfig()
    monkeypatch.setenv("TUNEFORGE_CPU_KERNELS", "0")
    monkeypatch.setenv("TUNEFORGE_KERNEL_CACHE", str(tmp_path))
    expected = cpu_kernels.KernelConfig(enabled=False, cache_dir=tmp_path, compiler="clang")
    assert kernel_config(Settings(data_dir=tmp_path), {"CC": "clang"}) == expected
