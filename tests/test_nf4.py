"""NF4 storage against bitsandbytes, the oracle: codes and statistics bit for bit, dequantisation value for value."""
import bitsandbytes.functional as bnbF
import pytest
import torch

from lora.nf4 import (DYNAMIC_CODE, NF4_CODE, NF4_MIDPOINTS, dequantize_blockwise_8bit, nf4_levels,
                      quantize_blockwise_8bit, quantize_nf4, to_bnb_quant_state)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Sizes that divide by 64 and 256, that don't (77,100 values: 1,205 blocks), odd sizes (63; 524,799, also
# past the 2^18-value chunk), 1-D and 3-D weights.
SHAPES = [(64, 64), (300, 257), (7, 9), (1000,), (3, 5, 64), (513, 1023)]


@pytest.fixture(autouse=True)
def eager_bitsandbytes():
    """bitsandbytes' fallback for odd shapes is wrapped in torch.compile, which compiles for seconds per
    shape; the same Python code runs eagerly when dynamo is off."""
    with torch._dynamo.config.patch(disable=True):
        yield


def weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def bnb_quantize(w, block_size=64, double_quant=True):
    return bnbF.quantize_4bit(w, blocksize=block_size, quant_type="nf4", compress_statistics=double_quant)


def assert_same_storage(q, packed, state):
    assert q.packed.dtype == packed.dtype == torch.uint8
    assert q.packed.shape == packed.shape
    assert torch.equal(q.packed, packed)
    assert torch.equal(q.absmax, state.absmax) and q.absmax.dtype == state.absmax.dtype
    assert torch.equal(q.code, state.code)
    assert (q.shape, q.dtype, q.block_size) == (state.shape, state.dtype, state.blocksize)
    assert q.double_quant == state.nested
    if state.nested:
        assert torch.equal(q.offset, state.offset)
        assert torch.equal(q.nested_absmax, state.state2.absmax)
        assert torch.equal(q.nested_code, state.state2.code)
        assert q.nested_block_size == state.state2.blocksize == 256


def test_nf4_levels_are_the_normal_quantiles_of_bitsandbytes_table():
    """Recomputed from Φ⁻¹ in the module, the levels equal bitsandbytes' hard-coded table exactly."""
    assert torch.equal(nf4_levels(), bnbF.get_4bit_type("nf4", device="cpu"))
    assert NF4_CODE[0] == -1 and NF4_CODE[7] == 0 and NF4_CODE[15] == 1
    assert (NF4_CODE[1:] > NF4_CODE[:-1]).all()
    # Asymmetric: 7 negative and 8 positive levels; the positive ones are Φ⁻¹(p)/Φ⁻¹(offset).
    p = torch.linspace(0.9677083, 0.5, 9)[:-1].double()
    expected = torch.special.ndtri(p) / torch.special.ndtri(p[:1])
    torch.testing.assert_close(NF4_CODE[8:].double().flip(0), expected, rtol=1e-6, atol=0)


def test_dynamic_code_equals_bitsandbytes_dynamic_map():
    assert torch.equal(DYNAMIC_CODE, bnbF.create_dynamic_map())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_codes_and_statistics_equal_bitsandbytes_bit_for_bit(shape, dtype, double_quant):
    w = weight(shape, dtype)
    packed, state = bnb_quantize(w, double_quant=double_quant)
    assert_same_storage(quantize_nf4(w, double_quant=double_quant), packed, state)


@pytest.mark.parametrize("block_size", [32, 128, 256, 4096])
def test_other_block_sizes_equal_bitsandbytes_bit_for_bit(block_size):
    w = weight((96, 200), torch.bfloat16, seed=block_size)
    packed, state = bnb_quantize(w, block_size)
    assert_same_storage(quantize_nf4(w, block_size), packed, state)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_equals_bitsandbytes_dequantize_4bit(shape, dtype, double_quant):
    w = weight(shape, dtype, seed=1)
    packed, state = bnb_quantize(w, double_quant=double_quant)
    ours = quantize_nf4(w, double_quant=double_quant).dequantize()
    theirs = bnbF.dequantize_4bit(packed, state)
    assert ours.shape == w.shape and ours.dtype == dtype
    assert torch.equal(ours, theirs.reshape(w.shape))   # bitsandbytes returns a 1-D weight as [1, n]


def test_dequantize_follows_the_formula_level_times_absmax():
    """Written out again here: unpack nibbles (high first), look up levels, scale by block absmax; one
    rounding of the fp32 product to bf16. (The CPU path's tiles of W: tests/cpu/test_nf4_cpu.py.)"""
    w = weight((40, 192), torch.float32, seed=2)
    q = quantize_nf4(w, double_quant=True)
    codes = torch.stack([q.packed.view(-1) >> 4, q.packed.view(-1) & 15], dim=1).view(-1)   # [n]
    nb = q.absmax.numel()                                           # absmax j is in nested block j // 256
    absmax = q.nested_code[q.absmax.long()] * q.nested_absmax.repeat_interleave(256)[:nb] + q.offset
    expected = (NF4_CODE[codes.long()].view(-1, 64) * absmax[:, None]).view(w.shape)
    assert torch.equal(q.dequantize(), expected)
    assert torch.equal(q.dequantize(torch.bfloat16), expected.bfloat16())


def test_rows_that_straddle_blocks_dequantize_with_the_flat_block_index():
    """Rows of 1376 values (21.5 blocks; the small SFT bench's MLP width): value (i, j) belongs to block
    (i · 1376 + j) // 64, as bitsandbytes' quantize_4bit stores it (its codes equal ours). Its CPU
    dequantize_4bit kernel (0.50.2) takes block i · 21 + j // 64 instead for even rows like these, so it
    is not the oracle here; the formula is."""
    w = weight((24, 1376), torch.float32, seed=8)
    q = quantize_nf4(w)
    assert_same_storage(q, *bnb_quantize(w))
    codes = torch.stack([q.packed.view(-1) >> 4, q.packed.view(-1) & 15], dim=1).view(-1)   # [n]
    block = torch.arange(w.numel()) // 64
    expected = (NF4_CODE[codes.long()] * q.block_absmax()[block]).view(w.shape)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(q.dequantize(dtype), expected.to(dtype))


def test_values_on_a_midpoint_take_the_lower_level_as_bitsandbytes_does():
    """absmax 1 (the first value), every other value exactly on a midpoint between two levels."""
    mids = NF4_MIDPOINTS.repeat(5)[:63]
    w = torch.cat([torch.ones(1), mids]).view(1, 64)
    packed, state = bnb_quantize(w, double_quant=False)
    q = quantize_nf4(w, double_quant=False)
    assert_same_storage(q, packed, state)
    codes = torch.stack([q.packed.view(-1) >> 4, q.packed.view(-1) & 15], dim=1).view(-1)[1:]
    assert torch.equal(codes.long(), torch.arange(15).repeat(5)[:63])          # midpoint i ↦ level i


def test_zero_blocks_and_extremes_equal_bitsandbytes():
    """A block of zeros (absmax 0 → all codes 7), a short zero last block (absmax stored as 1e-38), huge
    and subnormal magnitudes, and a block of zeros among the 256 absmax values of double quantisation."""
    w = weight((70, 64), torch.float32, seed=3)
    w[5] = 0
    w[6] *= 1e30
    w[7] *= 1e-40
    w = torch.cat([w.view(-1), torch.zeros(10)])                                  # short last block
    for double_quant in (False, True):
        packed, state = bnb_quantize(w, double_quant=double_quant)
        q = quantize_nf4(w, double_quant=double_quant)
        assert_same_storage(q, packed, state)
        assert torch.equal(q.dequantize(), bnbF.dequantize_4bit(packed, state).view(-1))


def test_absmax_8bit_codes_equal_bitsandbytes_quantize_blockwise():
    """The grid rule on values spanning 12 decades, where it differs from the nearest code."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5000, generator=g) * 10 ** torch.empty(5000).uniform_(-12, 0, generator=g)
    x[256:512] = 0                                                                    # a zero block
    codes, absmax = quantize_blockwise_8bit(x)
    theirs, state = bnbF.quantize_blockwise(x, blocksize=256)
    assert torch.equal(codes, theirs) and torch.equal(absmax, state.absmax)
    assert torch.equal(dequantize_blockwise_8bit(codes, absmax), bnbF.dequantize_blockwise(theirs, state))
    nearest = torch.searchsorted((DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) / 2,
                                 (x.view(-1, 1000) / x.view(-1, 1000).abs().amax(1, keepdim=True)).view(-1))
    assert not torch.equal(codes.long(), nearest)                     # the grid is not a nearest search


def test_dequantisation_error_is_at_most_half_the_widest_level_gap():
    """|w - ŵ| ≤ absmax · (largest gap between adjacent levels) / 2, plus the absmax's own 8-bit error."""
    w = weight((128, 256), torch.float32, seed=5)
    half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2
    blocks = w.view(-1, 64)
    exact = quantize_nf4(w, double_quant=False)
    assert ((blocks - exact.dequantize().view(-1, 64)).abs() <= blocks.abs().amax(1, keepdim=True) * half_gap).all()
    nested = quantize_nf4(w, double_quant=True)
    err_absmax = (nested.block_absmax() - exact.absmax).abs().max()
    assert err_absmax < 0.01 * exact.absmax.max()
    bound = (blocks.abs().amax(1, keepdim=True) + err_absmax) * half_gap + err_absmax
    assert ((blocks - nested.dequantize().view(-1, 64)).abs() <= bound).all()


def test_bitsandbytes_dequantizes_our_statistics_to_our_values():
    w = weight((64, 192), torch.bfloat16, seed=6)
    q = quantize_nf4(w)
    assert torch.equal(bnbF.dequantize_4bit(q.packed, to_bnb_quant_state(q)), q.dequantize())
    for dtype in (torch.float32, torch.float16):        # one rounding of the fp32 product, either way
        assert torch.equal(bnbF.dequantize_4bit(q.packed, to_bnb_quant_state(q, dtype)), q.dequantize(dtype))


def test_storage_is_about_4_127_bits_a_weight_with_double_quantisation():
    q = quantize_nf4(weight((1024, 1024), torch.float16, seed=7))
    bits = 8 * q.nbytes / q.numel
    assert 4.12 < bits < 4.14 and 8 * quantize_nf4(q.dequantize(), double_quant=False).nbytes / q.numel == 4.5


def test_bad_input_gives_one_line_errors():
    with pytest.raises(ValueError, match="block_size is 48, expected one of"):
        quantize_nf4(torch.randn(64, 64), block_size=48)
    with pytest.raises(ValueError, match="weight is torch.int64, expected a float32, float16 or bfloat16"):
        quantize_nf4(torch.ones(64, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="is empty"):
        quantize_nf4(torch.empty(0, 64))
