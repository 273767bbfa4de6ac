"""NF4: the 4-bit NormalFloat storage of QLoRA (Dettmers et al. 2023), bit for bit as bitsandbytes stores it.

The whole algorithm, top to bottom:

1. Levels. NF4 has 16 levels, quantiles of the standard normal N(0, 1) scaled to [-1, 1]. Eight positive
   quantiles Φ⁻¹(p) at p evenly spaced from `offset` down to 1/2 (the 1/2 itself left out), seven negative
   ones mirrored from seven p evenly spaced over the same range, and an exact zero: 8 + 7 + 1 = 16. The
   type is asymmetric (one more positive level) so that zero is a level; `offset` = 0.9677083 is the
   mean of 1 - 1/(2·15) and 1 - 1/(2·16), the QLoRA paper's choice. The levels are divided by the
   largest, so they run from -1 to 1, and sorted: code 0 is -1, code 7 is 0, code 15 is 1.

2. Blocks. The weight is flattened (row-major, as reshape(-1) does) and cut into blocks of `block_size`
   = 64 values; the last block may be short. Each block keeps its absolute maximum `absmax` in fp32.

3. Codes. Each value x of a block becomes x / absmax, clamped to [-1, 1], and is rounded to the nearest
   level: its code is the number of midpoints between adjacent levels that lie strictly below it (a
   value exactly on a midpoint takes the lower level). bitsandbytes divides by multiplying with
   1 / absmax in fp32 for full blocks, and divides directly in the short last block; a block of
   zeros uses absmax 1e-38 for the division (every code 7); the short last block also stores its
   absmax clamped to 1e-38. We do the same, so every code matches.

4. Packing. Two codes per byte, the first value in the high nibble: byte = (code[2i] << 4) | code[2i+1].
   An odd count is padded with one zero value (code 7). `packed` has shape [ceil(n / 2), 1], uint8.

5. Double quantisation (optional, on by default). The fp32 absmax values cost 32 bits per 64 weights
   (0.5 bit each). QLoRA quantises them too: subtract their mean, `offset`, then store absmax - offset
   with bitsandbytes' 8-bit blockwise scheme in blocks of 256: per block a fp32 `nested_absmax`, per
   value an 8-bit index into the signed "dynamic" code (`nested_code`, Dettmers 2015: 256 values,
   exponent and fraction sharing the bits, dense near zero). bitsandbytes' CPU kernel picks that index
   without a search: x / nested_absmax is clamped to [-1, 1], mapped to one of 65,536 evenly spaced grid
   points, idx = trunc((x + 1) · 0.5 · 65535 + 0.5), and a table gives, for each grid point, the code
   whose midpoint interval holds it. That is the nearest code up to the grid's resolution (2 / 65535),
   not always the nearest: near zero the dynamic code is finer than the grid. We use the same table.
   Cost: 8 bits per 64 weights plus 32 bits per 16,384 weights, about 0.127 bit per weight.

6. Dequantisation: w = level[code] · absmax in fp32, with absmax = nested_code[q] · nested_absmax +
   offset (each step rounded to fp32) under double quantisation; the fp32 product is rounded once to
   the requested dtype. This is bitsandbytes' dequantize_4bit, value for value.

Shapes: n values, nb = ceil(n / block_size) blocks, nb2 = ceil(nb / 256) nested blocks.
"""
import math
from dataclasses import dataclass, replace

import torch

import cpu

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)   # those bitsandbytes accepts
NESTED_BLOCK_SIZE = 256                                      # double quantisation, as in bitsandbytes
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHUNK = 1 << 20      # values handled per step: temporaries stay small (4 MiB in fp32); a multiple of 4096


# --- 1. the codes ----------------------------------------------------------------------------------------

def nf4_levels(offset: float = 0.9677083) -> torch.Tensor:
    """The 16 NF4 levels [16], sorted, fp32. p is spaced in fp32 and Φ⁻¹ taken in fp64, then rounded to
    fp32 and normalised in fp32: the steps that reproduce bitsandbytes' table exactly."""
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, device="cpu")[:-1].double())     # [8] > 0
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, device="cpu")[:-1].double())    # [7] < 0
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64, device="cpu"), positive]).float().sort().values
    return levels / levels.max()


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code [256], sorted, fp32: for e = 0..6, the midpoints of
    2^e + 1 points evenly spaced over [0.1, 1], times ±10^(e-6); plus 0 and 1."""
    values = [torch.tensor([0.0, 1.0], device="cpu")]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, device="cpu")                           # fp32
        means = (edges[:-1] + edges[1:]) / 2.0                             # [2^e]
        values += [(10 ** (e - 6)) * means, (-(10 ** (e - 6))) * means]
    return torch.cat(values).sort().values                                 # 2 + 2·(1+2+...+64) = 256


NF4_CODE = nf4_levels()                                                      # [16]
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2                           # [15]
DYNAMIC_CODE = dynamic_code()                                                # [256]
# bitsandbytes' CPU grid table (point 5): grid point i ↦ code whose midpoint interval holds it.
_GRID = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device="cpu")) / 65535.0   # [65536]
DYNAMIC_GRID_TABLE = torch.searchsorted(0.5 * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]), _GRID).to(torch.uint8)


# --- 5. 8-bit blockwise quantisation (for the absmax values) ------------------------------------------

def quantize_blockwise_8bit(x: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE):
    """x [n] fp32 → (codes [n] uint8, absmax [ceil(n / block_size)] fp32), bitsandbytes' CPU rule:
        a = max |x| over the block;  v = clamp(x · (1/a), -1, 1)
        idx = trunc((v + 1) · 0.5 · 65535 + 0.5);  code = DYNAMIC_GRID_TABLE[idx]
    A block of zeros gets absmax 0 and codes 0."""
    n = x.numel()
    nb = -(-n // block_size)
    blocks = torch.nn.functional.pad(x.reshape(-1).float(), (0, nb * block_size - n)).view(nb, block_size)
    absmax = blocks.abs().amax(dim=1)                                          # [nb]
    v = (blocks * (1.0 / absmax)[:, None]).clamp(-1, 1)                        # [nb, block_size]
    idx = ((v + 1.0) * 0.5 * 65535.0 + 0.5).nan_to_num(0.0).to(torch.int32)    # zero blocks: 0·inf = nan
    codes = DYNAMIC_GRID_TABLE.to(x.device)[idx]                              # [nb, block_size] uint8
    codes[absmax == 0] = 0
    return codes.view(-1)[:n], absmax


def dequantize_blockwise_8bit(codes, absmax, block_size: int = NESTED_BLOCK_SIZE, code=None):
    """codes [n] uint8, absmax [nb] fp32 → code[codes] · absmax[block], fp32 [n]."""
    code = (DYNAMIC_CODE if code is None else code).to(codes.device)
    n = codes.numel()
    nb = absmax.numel()
    values = torch.index_select(code, 0, codes.reshape(-1).int())                   # [n] code[codes]
    values = torch.nn.functional.pad(values, (0, nb * block_size - n)).view(nb, block_size)
    return (values * absmax[:, None]).view(-1)[:n]


# --- the quantised weight ----------------------------------------------------------------------------

@dataclass
class NF4Tensor:
    """A weight in NF4. Field names follow bitsandbytes' QuantState (absmax, code, offset, blocksize →
    block_size, state2.absmax → nested_absmax, state2.code → nested_code)."""
    packed: torch.Tensor                  # [ceil(n / 2), 1] uint8, two codes a byte, first in the high nibble
    absmax: torch.Tensor                  # [nb] fp32, or uint8 codes of absmax - offset under double quant
    shape: torch.Size                     # the original weight's shape
    dtype: torch.dtype                    # the original weight's dtype: dequantize()'s default
    block_size: int = 64
    code: torch.Tensor = None             # [16] the NF4 levels
    offset: torch.Tensor = None           # [] fp32 mean of the absmax values (double quant only)
    nested_absmax: torch.Tensor = None    # [nb2] fp32 (double quant only)
    nested_code: torch.Tensor = None      # [256] the dynamic code (double quant only)
    nested_block_size: int = NESTED_BLOCK_SIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Storage in bytes: codes plus statistics."""
        tensors = [self.packed, self.absmax, self.offset, self.nested_absmax]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device) -> "NF4Tensor":
        move = lambda t: None if t is None else t.to(device)                   # noqa: E731
        return replace(self, packed=move(self.packed), absmax=move(self.absmax), code=move(self.code),
                       offset=move(self.offset), nested_absmax=move(self.nested_absmax),
                       nested_code=move(self.nested_code))

    def block_absmax(self) -> torch.Tensor:
        """[nb] fp32 absmax per block; under double quant nested_code[q] · nested_absmax + offset."""
        if not self.double_quant:
            return self.absmax
        return dequantize_blockwise_8bit(self.absmax, self.nested_absmax, self.nested_block_size,
                                         self.nested_code) + self.offset

    def dequantize(self, dtype=None) -> torch.Tensor:
        """The weight in its original shape, in `dtype` (default: the original dtype); point 6:
            w = level[code] · absmax      the product in fp32, rounded once to dtype
        A CHUNK of values at a time, so that the temporaries (codes, levels) stay small."""
        dtype = dtype or self.dtype
        n, bs = self.numel, self.block_size
        nb = -(-n // bs)
        out = torch.empty(nb, bs, dtype=dtype, device=self.device)                # [nb, bs]
        if cpu.enabled("nf4", out):
            return cpu.dequantize_nf4(self, out)             # the same values in one C pass (cpu/nf4.py)
        packed = self.packed.view(-1)                                             # [ceil(n / 2)] uint8
        if packed.numel() * 2 != nb * bs:                    # a short last block: pad it to a whole one
            packed = torch.nn.functional.pad(packed, (0, nb * bs // 2 - packed.numel()))
        levels, absmax = self.code, self.block_absmax()                           # [16], [nb] fp32
        step = max(1, CHUNK // bs)                                                # blocks per chunk
        for b in range(0, nb, step):
            byte = packed[b * bs // 2:(b + step) * bs // 2]                       # [c/2] two codes each
            code = torch.stack([byte >> 4, byte & 15], dim=1).view(-1)            # [c] high nibble first
            w = levels[code.long()].view(-1, bs) * absmax[b:b + step, None]       # [c/bs, bs] fp32
            out[b:b + step] = w                                                   # rounded once to dtype
        return out.view(-1)[:n].view(self.shape)


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantise a fp32/fp16/bf16 weight of any shape to NF4 (points 2-5 of the module docstring).
    Equal, tensor for tensor, to bitsandbytes.functional.quantize_4bit(weight, blocksize=block_size,
    quant_type="nf4", compress_statistics=double_quant) on the CPU."""
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES:
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"quantize_nf4: weight is {got}, expected a float32, float16 or bfloat16 tensor")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"quantize_nf4: block_size is {block_size}, expected one of {BLOCK_SIZES}")
    if weight.numel() == 0:
        raise ValueError(f"quantize_nf4: weight of shape {list(weight.shape)} is empty")
    device = weight.device
    flat = weight.detach().reshape(-1)                                           # [n]
    n, bs = flat.numel(), block_size
    midpoints = NF4_MIDPOINTS.to(device)
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=device)
    absmax = torch.empty(-(-n // bs), dtype=torch.float32, device=device)
    for start in range(0, n, CHUNK):                        # CHUNK is a multiple of bs: blocks stay whole
        x = flat[start:start + CHUNK].float()                                    # [c]
        full = x.numel() // bs * bs
        blocks = x[:full].view(-1, bs)                                           # [c/bs, bs]
        a = blocks.abs().amax(dim=1)                                             # [c/bs]
        scaled = [(blocks * (1.0 / a.clamp(min=1e-38))[:, None]).clamp(-1, 1).view(-1)]
        if full < x.numel():                                 # the short last block of the weight
            a_last = x[full:].abs().max().clamp(min=1e-38)
            a = torch.cat([a, a_last[None]])
            scaled.append((x[full:] / a_last).clamp(-1, 1))
        scaled = torch.cat(scaled) if len(scaled) > 1 else scaled[0]
        if scaled.numel() % 2:                               # odd n: one zero value pads the last byte
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        codes = torch.searchsorted(midpoints, scaled, out_int32=True).to(torch.uint8)   # [c] in 0..15
        packed[start // 2:start // 2 + codes.numel() // 2, 0] = (codes[0::2] << 4) | codes[1::2]
        absmax[start // bs:start // bs + a.numel()] = a

    q = NF4Tensor(packed=packed, absmax=absmax, shape=weight.shape, dtype=weight.dtype,
                  block_size=block_size, code=NF4_CODE.to(device))
    if double_quant:
        offset = absmax.mean()                                                   # []
        codes, nested_absmax = quantize_blockwise_8bit(absmax - offset)
        q = replace(q, absmax=codes, offset=offset, nested_absmax=nested_absmax,
                    nested_code=DYNAMIC_CODE.to(device))
    return q


def to_bnb_quant_state(q: NF4Tensor, dtype=None):
    """The same statistics as a bitsandbytes QuantState (for its CUDA kernels and the parity tests);
    dtype: the dtype dequantize_4bit returns (default: the original weight's)."""
    import bitsandbytes.functional as bnbF
    state2 = None
    if q.double_quant:
        state2 = bnbF.QuantState(absmax=q.nested_absmax, code=q.nested_code,
                                 blocksize=q.nested_block_size, dtype=torch.float32)
    return bnbF.QuantState(absmax=q.absmax, shape=q.shape, code=q.code, blocksize=q.block_size,
                           quant_type="nf4", dtype=dtype or q.dtype, offset=q.offset, state2=state2)


# --- bitsandbytes' CUDA kernel ---------------------------------------------------------------------------

_bitsandbytes_cuda = {}     # device → None (usable) or why not: checked once per device and process


def bitsandbytes_cuda_problem(device):
    """None if bitsandbytes' CUDA dequantize_4bit gives, on a small weight on `device`, exactly the values
    of NF4Tensor.dequantize (the torch code of point 6); else one line saying why not. Checked once per device.

    Why check: bitsandbytes is the fast path for NF4 on CUDA (one kernel per weight), but a wheel without a
    CUDA binary for this GPU, or a version that stores its statistics differently, fails only at the first
    training step after minutes of loading, or gives other weights. Where this says no, the torch code
    dequantises instead (same values, more memory traffic)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"{device} is not a CUDA device"
    if str(device) not in _bitsandbytes_cuda:
        _bitsandbytes_cuda[str(device)] = _check_bitsandbytes_cuda(device)
    return _bitsandbytes_cuda[str(device)]


def _check_bitsandbytes_cuda(device):
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbF
    except Exception as e:                       # missing, or an install that fails at import
        return f"bitsandbytes cannot be imported ({type(e).__name__}: {e})"
    weight = torch.randn(96, 320, generator=torch.Generator(device="cpu").manual_seed(0), device="cpu")
    q = quantize_nf4(weight.to(device, torch.bfloat16))            # 96 × 320: 480 blocks, 2 nested blocks
    try:
        got = bnbF.dequantize_4bit(q.packed, to_bnb_quant_state(q, torch.bfloat16))
        if device.type == "cuda":
            torch.cuda.synchronize(device)                       # a kernel's launch error shows here
    except Exception as e:                       # e.g. no CUDA binary in the wheel for this GPU
        return f"bitsandbytes {bitsandbytes.__version__} cannot dequantise on {device} ({type(e).__name__}: {e})"
    want = q.dequantize(torch.bfloat16)
    if got.shape != want.shape or not torch.equal(got, want):
        diff = (got.float() - want.float()).abs().max().item() if got.shape == want.shape else "shape"
        return f"bitsandbytes {bitsandbytes.__version__}'s dequantize_4bit differs from bezoar's NF4 (max |Δ| {diff})"
    return None
