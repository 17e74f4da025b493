"""Blockwise 8-bit quantization with Dettmers' dynamic map, byte-for-byte with bitsandbytes' CPU kernel.

Used here for the second level of QLoRA's double quantization (the block absmax values are
8-bit quantized in groups of 256), and written as plain tensor functions so that an 8-bit optimizer
(Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization") can reuse it for its states.

The map. ``create_dynamic_map`` builds the 256-value "dynamic tree" data type of Dettmers 2015
("8-Bit Approximations for Parallelism in Deep Learning", section 3): a sign bit, a run of zero bits
that acts as a decimal exponent (10^-6 .. 10^0), an indicator bit, and the remaining bits as a linear
fraction in [0.1, 1]. Each code's value is the midpoint of its fraction bin times its power of ten.
The values agree bit for bit with ``bitsandbytes.functional.create_dynamic_map``.

The rounding rule. bitsandbytes' CPU kernel does NOT pick the nearest map value. Its source
(``csrc/cpu_ops.cpp``: ``build_quantize_lut``, ``norm_to_lut_index``, ``quantize_cpu_impl``; the installed
``libbitsandbytes_cpu.so`` 0.50.2 exports ``quantize_cpu_impl<float/bf16_t/fp16_t>``) replaced the older
binary search with a lookup table, and we confirmed the rule below bit for bit against the installed
library (``tests/test_blockwise8.py``). It first builds a 65536-entry table over [-1, 1]::

    grid[i] = -1 + (2 * i) / 65535                       (fp32, i = 0..65535)
    lut[i]  = number of midpoints (code[j] + code[j+1]) / 2 that are < grid[i]

and then, per element, with ``inv = 1 / absmax`` (fp32 reciprocal) and ``v = clamp(x * inv, -1, 1)``::

    code index = lut[ trunc( ((v + 1) * 0.5) * 65535 + 0.5 ) ]        (each step rounded to fp32)

i.e. ``v`` is first snapped to the nearest of 65536 evenly spaced points, and the point's nearest
map value is used. Wherever a midpoint between two map values falls between ``v`` and its grid point
(|v - grid point| <= 1/65535), the code differs from the true nearest by one index. For map values
closer together than the grid step (the map is dense near 0: neighbours 1e-6 apart) the lookup can
also skip codes. On normally distributed data about 0.1-0.2% of codes differ from nearest rounding.
A block whose absmax is 0 gets code index 0 for every element (the kernel's early exit), which
dequantizes to (-0.99...) * 0 = -0.0.

``rounding="nearest"`` gives the plain nearest-value rule instead (ties to the lower index, like
``torch.bucketize`` on the midpoints, as bitsandbytes' pure-PyTorch backend does). What we do not
match: bitsandbytes' CUDA kernel, which uses its own search; the default ``"lut"`` rule matches its CPU
build only.
"""

from __future__ import annotations

from typing import Optional

import torch

DYNAMIC_MAP_SIZE = 256
LUT_SIZE = 65536  # grid points over [-1, 1] in bitsandbytes' CPU quantizer (kLUTSize)
ROUNDING_RULES = ("lut", "nearest")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 256-entry dynamic (tree) quantization map of Dettmers 2015, sorted ascending, fp32.

    For exponent ``e`` in 0..max_exponent_bits-1 the fraction has ``e + 7 - max_exponent_bits`` bits
    (one more when unsigned, which has no sign bit); its ``2**bits`` bins split [0.1, 1] evenly and each
    code takes its bin's midpoint times ``10**(e - (max_exponent_bits - 1))``. When the exponent field
    is shorter than 7 bits the all-zero-exponent pattern adds ``2**(7 - max_exponent_bits) - 1`` more
    codes at the top scale. Then 0 and 1.0 are added, which makes 256 values. Values match
    ``bitsandbytes.functional.create_dynamic_map`` exactly.

    Args:
        signed: include the negative half (the map for signed data, e.g. centred absmax values).
        max_exponent_bits: 1..7, the longest exponent run.
        total_bits: must be 8.

    Returns:
        fp32 tensor of shape (256,), ascending, min -0.99297 (signed) or 0, max 1.0.

    Raises:
        ValueError: unsupported ``total_bits`` or ``max_exponent_bits``, or a combination that does not
            give 256 values (unsigned with ``max_exponent_bits < 7``; bitsandbytes asserts there too).
    """
    if total_bits != 8:
        raise ValueError(f"create_dynamic_map: only total_bits=8 is supported, got {total_bits}")
    if not 1 <= max_exponent_bits <= 7:
        raise ValueError(f"create_dynamic_map: max_exponent_bits must be in 1..7, got {max_exponent_bits}")
    non_sign_bits = total_bits - 1
    values: list[float] = []

    def add_bins(n_bins: int, scale: float) -> None:
        # n_bins even bins of [0.1, 1]: their fp32 midpoints, scaled by a power of ten (in fp32).
        edges = torch.linspace(0.1, 1.0, n_bins + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values.extend((scale * mids).tolist())
        if signed:
            values.extend((-scale * mids).tolist())

    for e in range(max_exponent_bits):
        fraction_bits = e + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        add_bins(2**fraction_bits, 10.0 ** (e - (max_exponent_bits - 1)))
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if extra > 0:
        add_bins(extra, 1.0)  # the top scale, 10^0
    values += [0.0, 1.0]
    if len(values) != DYNAMIC_MAP_SIZE:  # unsigned maps with a short exponent do not fill 8 bits
        raise ValueError(f"create_dynamic_map(signed={signed}, max_exponent_bits={max_exponent_bits}) has "
                         f"{len(values)} values, not 256; use max_exponent_bits=7 for an unsigned map")
    return torch.tensor(sorted(values), dtype=torch.float32)


def build_quantize_lut(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU lookup table: for each of 65536 grid points in [-1, 1], its nearest code index.

    Args:
        code: fp32 (256,) ascending map.

    Returns:
        uint8 tensor (65536,) on ``code``'s device: ``lut[i]`` = number of midpoints strictly below
        ``-1 + 2 i / 65535`` (a grid point exactly on a midpoint takes the lower index).
    """
    _check_code(code)
    grid = torch.arange(LUT_SIZE, dtype=torch.float32, device=code.device)
    grid = (2.0 * grid) / float(LUT_SIZE - 1) + (-1.0)  # fp32, same operation order as the C++ kernel
    mids = 0.5 * (code[:-1] + code[1:])  # (255,)
    # bucketize(right=False) returns the count of boundaries < value, the kernel's "advance while mid < val".
    return torch.bucketize(grid, mids, out_int32=True, right=False).to(torch.uint8)


def quantize_blockwise(x: torch.Tensor, code: Optional[torch.Tensor] = None, blocksize: int = 256,
                       rounding: str = "lut") -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization: per block absmax, then each value's index into ``code``.

    Blocks are ``blocksize`` consecutive elements of the row-major flattened tensor; the last may be
    partial. Matches ``bitsandbytes.functional.quantize_blockwise`` on CPU byte for byte with
    ``rounding="lut"`` (see the module docstring for the rule).

    Args:
        x: float32 / bfloat16 / float16 tensor, any shape, finite values. Never modified.
        code: fp32 (256,) ascending map in [-1, 1]; default the signed dynamic map.
        blocksize: positive number of elements per block.
        rounding: ``"lut"`` (bitsandbytes CPU rule, default) or ``"nearest"``.

    Returns:
        ``(codes, absmax)``: uint8 codes with ``x``'s shape, and fp32 absmax of shape
        ``(ceil(numel / blocksize),)``.

    Raises:
        TypeError: ``x`` is not a float32/bfloat16/float16 tensor.
        ValueError: empty or non-finite input, bad blocksize, rounding rule or code.
    """
    flat, n = check_float_input(x, "quantize_blockwise")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"quantize_blockwise: blocksize must be a positive int, got {blocksize!r}")
    if rounding not in ROUNDING_RULES:
        raise ValueError(f"quantize_blockwise: rounding must be one of {ROUNDING_RULES}, got {rounding!r}")
    code = create_dynamic_map(signed=True).to(flat.device) if code is None else code
    _check_code(code)
    code = code.to(flat.device)

    nb = -(-n // blocksize)
    # Zero padding cannot change a block's absmax (absmax >= 0); padded codes are dropped below.
    blocks = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)  # (nb, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (nb,) fp32
    zero = absmax == 0
    inv = torch.where(zero, torch.zeros_like(absmax), 1.0 / absmax)  # fp32 reciprocal, as the kernel
    v = (blocks * inv.view(nb, 1)).clamp(-1.0, 1.0)  # (nb, blocksize)
    if rounding == "lut":
        pos = ((v + 1.0) * 0.5) * float(LUT_SIZE - 1) + 0.5  # fp32, rounded after each step; >= 0.5
        lut_index = pos.view(-1).to(torch.int32)  # (nb * blocksize,); truncation = floor since pos > 0
        q = torch.index_select(build_quantize_lut(code), 0, lut_index).view(nb, blocksize)
        q = q.masked_fill(zero.view(nb, 1), 0)  # the kernel writes code 0 for an all-zero block
    else:
        q = torch.bucketize(v, 0.5 * (code[:-1] + code[1:]), out_int32=True, right=False).to(torch.uint8)
    return q.reshape(-1)[:n].reshape(x.shape), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: Optional[torch.Tensor] = None,
                         blocksize: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[codes] * absmax[block]`` in fp32, then cast to ``dtype``.

    Matches ``bitsandbytes.functional.dequantize_blockwise`` (CPU) bit for bit.

    Args:
        codes: uint8 tensor, any shape.
        absmax: fp32 ``(ceil(codes.numel() / blocksize),)``.
        code: fp32 (256,) map used to quantize; default the signed dynamic map.
        blocksize: elements per block used to quantize.
        dtype: output dtype (float32, bfloat16 or float16).

    Returns:
        Tensor of ``codes``' shape and ``dtype``.

    Raises:
        TypeError / ValueError: wrong dtypes, or ``absmax`` length not matching ``codes`` and ``blocksize``.
    """
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError(f"dequantize_blockwise: codes must be a uint8 tensor, "
                        f"got {getattr(codes, 'dtype', type(codes))}")
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32:
        raise TypeError(f"dequantize_blockwise: absmax must be an fp32 tensor, "
                        f"got {getattr(absmax, 'dtype', type(absmax))}")
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dequantize_blockwise: dtype must be one of {_FLOAT_DTYPES}, got {dtype}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"dequantize_blockwise: blocksize must be a positive int, got {blocksize!r}")
    n = codes.numel()
    nb = -(-n // blocksize)
    if absmax.dim() != 1 or absmax.numel() != nb:
        raise ValueError(f"dequantize_blockwise: {n} codes in blocks of {blocksize} need absmax of shape ({nb},), "
                         f"got {tuple(absmax.shape)}")
    code = create_dynamic_map(signed=True).to(codes.device) if code is None else code
    _check_code(code)
    values = torch.index_select(code.to(codes.device), 0, codes.reshape(-1).to(torch.int32))  # (n,) fp32
    values = torch.nn.functional.pad(values, (0, nb * blocksize - n)).view(nb, blocksize)  # (nb, blocksize)
    out = (values * absmax.view(nb, 1)).reshape(-1)[:n]  # fp32 product, rounded once
    return out.to(dtype).reshape(codes.shape)


def check_float_input(x: torch.Tensor, fn: str) -> tuple[torch.Tensor, int]:
    """Validate a float input and return its fp32 row-major flattening (a copy or a view) and numel."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.uint8:
        # Casting would quantize the bytes themselves as if they were weights: say what to do instead.
        raise TypeError(f"{fn}: the input is uint8, i.e. already-quantized codes (packed 4-bit NF4 bytes or "
                        f"8-bit codes), not weights; quantizing it again would treat the codes as numbers. Pass the "
                        f"original float32/bfloat16/float16 tensor, or dequantize the codes first "
                        f"(kernels.reference.dequantize_nf4(packed, state) for NF4, dequantize_blockwise for 8-bit)")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: input dtype must be float32, bfloat16 or float16, got {x.dtype}; "
                        f"cast it first, e.g. x.float()")
    n = x.numel()
    if n == 0:
        raise ValueError(f"{fn}: input is empty (shape {tuple(x.shape)})")
    flat = x.detach().reshape(-1).float()  # (n,); reshape copies non-contiguous views in row-major order
    bad = ~torch.isfinite(flat)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{fn}: input has a non-finite value ({flat[i].item()}) at flat index {i}; "
                         f"NaN/inf cannot be quantized, fix or mask the tensor first")
    return flat, n


def _check_code(code: torch.Tensor) -> None:
    """Raise unless ``code`` is an ascending fp32 (256,) map within [-1, 1]."""
    if not isinstance(code, torch.Tensor) or code.dtype != torch.float32 or tuple(code.shape) != (DYNAMIC_MAP_SIZE,):
        raise TypeError(f"quantization map must be an fp32 tensor of shape (256,), got "
                        f"{getattr(code, 'dtype', type(code))} {tuple(getattr(code, 'shape', ()))}")
    if not bool(torch.isfinite(code).all()) or bool((code.abs() > 1).any()) or bool((code[1:] < code[:-1]).any()):
        raise ValueError("quantization map must be finite, within [-1, 1] and sorted ascending")
