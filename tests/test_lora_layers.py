"""LoRALinear and Linear4bit: y = base(x) + dropout(x) Aᵀ Bᵀ · α/r, gradients to A, B and x only."""
import math

import bitsandbytes as bnb
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora.layers import Linear4bit, LoRALinear
from lora.nf4 import quantize_nf4


def rand(*shape, seed=0, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def dense(W):
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
    return lin


def with_random_adapter(layer, seed=1):
    with torch.no_grad():
        layer.lora_A.weight.copy_(rand(*layer.lora_A.weight.shape, seed=seed, scale=0.1))
        layer.lora_B.weight.copy_(rand(*layer.lora_B.weight.shape, seed=seed + 1, scale=0.1))
    return layer


def reference(x, W, A, B, scaling):
    """The formula, written out: y = x Wᵀ + (x Aᵀ) Bᵀ · scaling."""
    return x @ W.t() + (x @ A.t()) @ B.t() * scaling


@pytest.mark.parametrize("base_kind", ["dense", "nf4"])
def test_gradients_reach_A_B_and_the_input_and_equal_a_dense_reference(base_kind):
    W = rand(48, 128, scale=0.05)
    base = dense(W) if base_kind == "dense" else Linear4bit(W)
    W_used = W if base_kind == "dense" else base.dequantized_weight()
    layer = with_random_adapter(LoRALinear(base, r=4, alpha=8, dropout=0.0))
    x = rand(2, 5, 128, seed=3).requires_grad_()
    g = rand(2, 5, 48, seed=4)
    layer(x).backward(g)

    A = layer.lora_A.weight.detach().clone().requires_grad_()
    B = layer.lora_B.weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = reference(x_ref, W_used, A, B, 8 / 4)
    y_ref.backward(g)
    torch.testing.assert_close(layer(x), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.weight.grad, A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.weight.grad, B.grad, rtol=1e-5, atol=1e-5)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]


def test_gradcheck_in_float64_through_the_nf4_matmul_and_the_adapter():
    base = Linear4bit(rand(12, 64, scale=0.1), compute_dtype=torch.float64)
    layer = with_random_adapter(LoRALinear(base, r=3, alpha=6, dropout=0.0, lora_dtype=torch.float64))
    x = rand(4, 64, seed=5, dtype=torch.float64).requires_grad_()
    A = layer.lora_A.weight.detach().clone().requires_grad_()
    B = layer.lora_B.weight.detach().clone().requires_grad_()

    def f(x, A, B):
        return torch.func.functional_call(layer, {"lora_A.weight": A, "lora_B.weight": B}, (x,))

    assert f(x, A, B).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (x, A, B))


def test_base_gets_no_gradient_and_no_optimizer_state():
    W = rand(32, 64, scale=0.05)
    for base in (dense(W), Linear4bit(W)):
        layer = with_random_adapter(LoRALinear(base, r=2, alpha=2))
        before = [t.clone() for t in (base.weight.packed, base.weight.absmax)] if isinstance(base, Linear4bit) \
            else [base.weight.detach().clone()]
        opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1)
        layer(rand(3, 64, seed=6)).square().sum().backward()
        opt.step()
        assert set(opt.state) == {layer.lora_A.weight, layer.lora_B.weight}
        if isinstance(base, Linear4bit):
            assert list(base.parameters()) == [] and "weight" not in base.state_dict()
            assert all(torch.equal(a, b) for a, b in zip(before, (base.weight.packed, base.weight.absmax)))
        else:
            assert base.weight.grad is None and not base.weight.requires_grad
            assert torch.equal(before[0], base.weight)


def test_a_fresh_adapter_is_the_identity_change_with_peft_initialisation():
    torch.manual_seed(0)
    base = dense(rand(40, 300, scale=0.05))
    layer = LoRALinear(base, r=16, alpha=16, dropout=0.05).train()
    x = rand(7, 300, seed=7)
    assert torch.equal(layer(x), base(x))                     # B = 0, whatever the dropout mask
    assert torch.equal(layer.lora_B.weight, torch.zeros(40, 16))
    # kaiming_uniform(a=√5) on [r, in]: U(-b, b), b = gain·√(3 / in) with gain = √(2 / (1 + 5)) → b = 1/√in
    bound = 1 / math.sqrt(300)
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.9 * bound
    assert layer.scaling == 1.0 and LoRALinear(dense(rand(4, 8)), r=4, alpha=16).scaling == 4.0


def test_dropout_applies_to_the_adapter_input_only(monkeypatch):
    """In training, y - base(x) = dropout(x) Aᵀ Bᵀ · s with nn.Dropout's mask (torch's generator: the same
    mask after the same torch.manual_seed); in eval mode no dropout. The plain composition: the CPU's "lora"
    path draws its own mask (tests/cpu/test_fast_paths.py), so it is off here."""
    monkeypatch.setenv("BEZOAR_C_KERNELS", "-lora")
    base = dense(rand(20, 32, scale=0.1))
    layer = with_random_adapter(LoRALinear(base, r=4, alpha=4, dropout=0.5)).train()
    x = rand(6, 32, seed=8)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    x_dropped = F.dropout(x, 0.5, training=True)
    assert set((x_dropped / x).unique().tolist()) == {0.0, 2.0}             # m / (1 - p), some of each
    torch.testing.assert_close(y, reference(x_dropped, torch.zeros(20, 32), layer.lora_A.weight,
                                            layer.lora_B.weight, 1.0) + base(x))
    layer.eval()
    torch.testing.assert_close(layer(x), reference(x, base.weight, layer.lora_A.weight, layer.lora_B.weight, 1.0))


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear4bit_equals_the_dequantized_weight_in_the_compute_dtype(compute_dtype):
    """y = x W'ᵀ and ∂x = ∂y W' with W' the NF4 weight dequantised to the compute dtype (the CPU's "nf4"
    path, tiles of W or a kept W, against the plain code: tests/cpu/test_fast_paths.py)."""
    W = rand(200, 256, scale=0.05)
    layer = Linear4bit(W, compute_dtype=compute_dtype)
    Wq = quantize_nf4(W).dequantize(compute_dtype)
    x = rand(3, 9, 256, seed=9, dtype=compute_dtype).requires_grad_()
    g = rand(3, 9, 200, seed=10, dtype=compute_dtype)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, Wq)
    y_ref.backward(g)
    y = layer(x)
    y.backward(g)
    assert y.dtype == compute_dtype
    # fp32: only the matmul's blocking may differ; half precision: one rounding of each output
    tol = dict(rtol=1e-5, atol=1e-5) if compute_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)


def test_linear4bit_output_matches_bitsandbytes_linear4bit():
    W = rand(96, 128, scale=0.05)
    theirs = bnb.nn.Linear4bit(128, 96, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    theirs.weight = bnb.nn.Params4bit(W.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                      compress_statistics=True)._quantize("cpu")
    x = rand(4, 128, seed=11)
    torch.testing.assert_close(Linear4bit(W)(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_linear4bit_moves_devices_but_keeps_its_statistics_under_dtype_casts():
    layer = Linear4bit(rand(16, 64, dtype=torch.bfloat16, scale=0.1))
    absmax = layer.weight.absmax.clone()
    layer.half()
    layer.to("cpu")
    assert layer.weight.absmax.dtype == torch.uint8 and torch.equal(layer.weight.absmax, absmax)
    assert layer.weight.nested_absmax.dtype == torch.float32 and layer.compute_dtype == torch.bfloat16
    assert layer(rand(2, 64, dtype=torch.float32)).dtype == torch.float32     # back to the input's dtype


def test_merged_linear_holds_W_plus_BA_times_scaling():
    W = rand(24, 64, scale=0.05)
    layer = with_random_adapter(LoRALinear(dense(W), r=4, alpha=12))
    expected = W + layer.lora_B.weight @ layer.lora_A.weight * 3.0
    torch.testing.assert_close(layer.merged_linear().weight, expected, rtol=1e-6, atol=1e-7)
    x = rand(5, 64, seed=12)
    torch.testing.assert_close(layer.merged_linear()(x), layer(x), rtol=1e-5, atol=1e-5)


def test_bad_settings_give_one_line_errors():
    base = dense(rand(8, 8))
    for kwargs, message in [(dict(r=0, alpha=8), "rank r is 0, expected a positive integer"),
                            (dict(r=-2, alpha=8), "rank r is -2"),
                            (dict(r=2.5, alpha=8), "rank r is 2.5"),
                            (dict(r=4, alpha=0), "alpha is 0, expected a positive number"),
                            (dict(r=4, alpha=-1.0), "alpha is -1.0"),
                            (dict(r=4, alpha=4, dropout=1.0), "dropout is 1.0, expected a probability")]:
        with pytest.raises(ValueError, match=message):
            LoRALinear(base, **kwargs)
    with pytest.raises(ValueError, match="expected a bias-free nn.Linear or Linear4bit"):
        LoRALinear(nn.Linear(8, 8), r=2, alpha=2)
    with pytest.raises(ValueError, match="expected a 2-D"):
        Linear4bit(torch.randn(64))
    with pytest.raises(ValueError, match="input has 32 features, expected 64"):
        Linear4bit(torch.randn(8, 64))(torch.randn(2, 32))
    with pytest.raises(ValueError, match="LoRALinear: input has 4 features, expected 8"):
        LoRALinear(base, r=2, alpha=2)(torch.randn(2, 4))
