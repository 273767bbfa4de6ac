"""The CPU fast path of batch-1 decoding's projections in bf16: model/decode_kernel.c, through ctypes.

Used by model/llama.py's Linear for one row of input (a decoding step's token) without gradients; F.linear
is the reference and the path everywhere else (more rows, fp32, gradients, another device,
BEZOAR_C_KERNELS=0, no compiler).
"""
import ctypes
import os

import torch

import c_build

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_kernel.c")
_P, _I = ctypes.c_void_p, ctypes.c_int64
KERNEL = c_build.Kernel(SOURCE, {"linear_row_bf16": [_P, _P, _P, _I, _I, ctypes.c_int32]})


def usable(x, weight) -> bool:
    """x [..., K] holding one row and W [N, K], both bf16 on the CPU, and no gradient to track."""
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == weight.dtype == torch.bfloat16
            and x.dim() >= 1 and x.numel() == x.shape[-1] == weight.shape[1]
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and KERNEL.lib is not None)


def linear_row(x, weight):
    """W x as [..., N] (x's leading dims, all 1) for x [..., K] with one row and W [N, K], bf16."""
    K, N = x.shape[-1], weight.shape[0]
    x1, weight = x.reshape(K).contiguous(), weight.contiguous()
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    KERNEL.lib.linear_row_bf16(x1.data_ptr(), weight.data_ptr(), y.data_ptr(), N, K, c_build.threads(N * K))
    return y.view(*x.shape[:-1], N)
