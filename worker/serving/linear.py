"""A weight and how a step multiplies by it: few-row steps through the compiled small-step kernel
(worker/serving/cpu_kernels) or a transposed copy, larger ones through torch. Used by the model runner
for the base model and by eagle draft layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.serving.cpu_kernels import MAX_ROWS, SmallGemm

# Steps of up to this many tokens (a single stream, or one verifying a few drafts) multiply with the
# compiled small-step kernel (worker/serving/cpu_kernels): every weight is read once for all rows, and
# each row's result is bit-identical whatever the row count, so verifying drafts gives exactly the
# logits decoding one token would. A few-row pass through the kernel costs little more than a one-row
# pass, where MKL's cost grows with the rows (bench/ has the figures).
KERNEL_TOKENS = MAX_ROWS
# Without the kernel (no compiler, no AVX2): up to this many tokens a step multiplies by a [in, out]
# copy of each weight, the faster layout for MKL's GEMV.
SMALL_STEP_TOKENS = 4


class Linear:
    """A weight (and bias) and how small steps multiply by it: the compiled kernel, or a transposed copy."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        kernel: SmallGemm | None = None,
        transposed_copy: bool = False,
    ) -> None:
        self.weight = weight  # [out, in]
        self.bias = bias
        self.kernel = kernel if kernel is not None and kernel.takes_weight(weight) else None
        # [in, out]: only where there is no kernel to use.
        self.weight_t = weight.T.contiguous() if transposed_copy and self.kernel is None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.shape[0] <= KERNEL_TOKENS and self.kernel.takes_rows(x):
            return self.kernel(x, self.weight, self.bias)
        if self.weight_t is not None and x.shape[0] <= SMALL_STEP_TOKENS:
            return x @ self.weight_t if self.bias is None else torch.addmm(self.bias, x, self.weight_t)
        return F.linear(x, self.weight, self.bias)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (self.weight_t.nbytes if self.weight_t is not None else 0)
