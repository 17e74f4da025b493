"""The NF4 quantization state: everything needed to dequantize a packed 4-bit tensor.

A tensor quantized by :func:`qlora.nf4.quantize_nf4` is two things: the packed 4-bit codes (a uint8
tensor of shape ``((n + 1) // 2, 1)``) and this state. The state mirrors bitsandbytes'
``functional.QuantState`` for ``quant_type="nf4"`` field by field, so that :meth:`NF4QuantState.to_dict`
produces exactly the tensors bitsandbytes writes next to a 4-bit ``weight`` in a state dict:

=============================================  ===========================================================
key (bitsandbytes ``QuantState.as_dict``)      content
=============================================  ===========================================================
``absmax``                                     fp32 per-block absmax, or uint8 8-bit codes with double quant
``quant_map``                                  fp32 (16,) the NF4 table
``nested_absmax``                              fp32 one absmax per 256 blocks (double quant only)
``nested_quant_map``                           fp32 (256,) signed dynamic 8-bit map (double quant only)
``quant_state.bitsandbytes__nf4``              uint8 bytes of a JSON object: quant_type, blocksize, dtype,
                                               shape, and with double quant nested_blocksize, nested_dtype,
                                               nested_offset
=============================================  ===========================================================

Bits per parameter (QLoRA paper, section 3, "Double Quantization"): 4 bits of code plus 32/blocksize
bits of fp32 absmax = 4.5 at blocksize 64; with double quantization the absmax costs 8/64 + 32/(64*256),
i.e. 4.127 bits in all.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from finetune_ref.models.checkpoint import DTYPE_NAMES, SUPPORTED_DTYPES

QUANT_TYPE = "nf4"
PACKED_STATE_KEY = "quant_state.bitsandbytes__nf4"  # bitsandbytes QuantState.as_dict(packed=True)
NESTED_BLOCKSIZE = 256  # bitsandbytes quantize_4bit(compress_statistics=True) always uses 256
SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes quantize_4bit

# JSON dtype names as bitsandbytes writes them (str(torch.bfloat16) without the "torch." prefix).
_NAME_DTYPES = {name: dt for dt, name in DTYPE_NAMES.items()}

_TENSOR_KEYS_PLAIN = ("absmax", "quant_map")
_TENSOR_KEYS_NESTED = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def check_blocksize(blocksize: Any, where: str) -> None:
    """Raise ValueError unless ``blocksize`` is an int in :data:`SUPPORTED_BLOCKSIZES`; the message says which.

    A float such as ``64.0`` (a YAML or JSON value, an ``int / 1``) compares equal to 64 and would pass a plain
    ``in`` test, then fail later as a slice index; a bool is an int to Python but not a blocksize.
    """
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        fix = f"; pass {int(blocksize)}" if isinstance(blocksize, float) and blocksize in SUPPORTED_BLOCKSIZES else ""
        raise ValueError(f"{where}: blocksize must be an int, one of {SUPPORTED_BLOCKSIZES}; got {blocksize!r} "
                         f"({type(blocksize).__name__}){fix}")
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"{where}: blocksize must be one of {SUPPORTED_BLOCKSIZES} (bitsandbytes' blocksizes), "
                         f"got {blocksize}")


def num_blocks(numel: int, blocksize: int) -> int:
    """Number of blocks of ``blocksize`` consecutive flat elements covering ``numel`` (last may be partial)."""
    return -(-numel // blocksize)


@dataclass(frozen=True, eq=False)
class NF4QuantState:
    """State of one NF4-quantized tensor, bitsandbytes' ``QuantState`` layout.

    Attributes:
        shape: the original tensor shape (any rank, at least one element).
        dtype: the original dtype (float32, bfloat16 or float16); dequantization returns it by default.
        blocksize: elements per absmax block, one of 32..4096 (powers of two), as bitsandbytes allows.
        absmax: without double quant, fp32 ``(num_blocks,)`` block absmax values; with it, uint8
            ``(num_blocks,)`` 8-bit codes of ``absmax - offset``.
        quant_map: fp32 ``(16,)`` the NF4 table (``qlora.nf4.nf4_code()``).
        offset: fp32 0-dim tensor, the mean of the block absmax values (double quant only). A bf16/fp16 or
            one-element value is read as ``float32(offset)``, as bitsandbytes reads it (``offset_fp32``).
        nested_absmax: fp32 ``(ceil(num_blocks / 256),)``, absmax of each group of 256 centred absmax
            values (double quant only).
        nested_quant_map: fp32 ``(256,)``, the signed dynamic 8-bit map (double quant only).
        nested_blocksize: blocks per nested group, 256 (the only value bitsandbytes writes).

    The one representation of an NF4 weight's state in the project: ``kernels`` (which imports nothing
    of ours) reads it duck-typed, by these attribute names, next to the packed codes.

    Raises:
        TypeError / ValueError (at construction): a field has the wrong type, dtype or length, the
        double-quant fields are only partly given, or the tensors are on several devices.
    """

    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    absmax: torch.Tensor
    quant_map: torch.Tensor
    offset: Optional[torch.Tensor] = None
    nested_absmax: Optional[torch.Tensor] = None
    nested_quant_map: Optional[torch.Tensor] = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    quant_type: str = field(default=QUANT_TYPE)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", torch.Size(self.shape))
        if self.quant_type != QUANT_TYPE:
            raise ValueError(f"NF4QuantState: quant_type must be 'nf4', got {self.quant_type!r} (fp4 is not supported)")
        if self.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"NF4QuantState: dtype must be one of {SUPPORTED_DTYPES}, got {self.dtype}")
        check_blocksize(self.blocksize, "NF4QuantState")
        if self.numel < 1:
            raise ValueError(f"NF4QuantState: shape {tuple(self.shape)} has no elements")
        _check_tensor("quant_map", self.quant_map, torch.float32, (16,))
        nb = self.num_blocks
        nested_fields = (self.offset, self.nested_absmax, self.nested_quant_map)
        if all(t is None for t in nested_fields):
            _check_tensor("absmax", self.absmax, torch.float32, (nb,))
            _check_one_device(self.tensors())
            return
        if any(t is None for t in nested_fields):
            raise ValueError("NF4QuantState: double quantization needs offset, nested_absmax and nested_quant_map "
                             "together")
        if isinstance(self.nested_blocksize, bool) or not isinstance(self.nested_blocksize, int) or \
                self.nested_blocksize != NESTED_BLOCKSIZE:
            raise ValueError(f"NF4QuantState: nested_blocksize must be {NESTED_BLOCKSIZE}, "
                             f"got {self.nested_blocksize!r}")
        _check_tensor("absmax", self.absmax, torch.uint8, (nb,))
        object.__setattr__(self, "offset", offset_fp32(self.offset, "NF4QuantState: offset", check_finite=False))
        _check_tensor("offset", self.offset, torch.float32, ())
        _check_tensor("nested_absmax", self.nested_absmax, torch.float32, (num_blocks(nb, self.nested_blocksize),))
        _check_tensor("nested_quant_map", self.nested_quant_map, torch.float32, (256,))
        _check_one_device(self.tensors())

    # ----------------------------------------------------------------------------------- properties
    @property
    def nested(self) -> bool:
        """True when the absmax values are themselves 8-bit quantized (double quantization)."""
        return self.offset is not None

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        """Number of absmax blocks, ``ceil(numel / blocksize)``."""
        return num_blocks(self.numel, self.blocksize)

    @property
    def packed_shape(self) -> tuple[int, int]:
        """Shape of the packed uint8 codes, ``((numel + 1) // 2, 1)`` (two 4-bit codes per byte)."""
        return ((self.numel + 1) // 2, 1)

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state's tensors by bitsandbytes name (``offset`` included as a 0-dim tensor when nested)."""
        out = {"absmax": self.absmax, "quant_map": self.quant_map}
        if self.nested:
            out.update(offset=self.offset, nested_absmax=self.nested_absmax, nested_quant_map=self.nested_quant_map)
        return out

    def to(self, device: torch.device | str) -> "NF4QuantState":
        """A copy of this state with every tensor on ``device`` (the state itself is immutable)."""
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return NF4QuantState(shape=self.shape, dtype=self.dtype, blocksize=self.blocksize,
                             nested_blocksize=self.nested_blocksize, **moved)

    # ----------------------------------------------------------------------------------- size
    def bits_per_parameter(self) -> float:
        """Nominal storage rate of the format in bits per weight (QLoRA paper, section 3).

        ``4 + 32 / blocksize`` without double quantization (4.5 at blocksize 64), and
        ``4 + 8 / blocksize + 32 / (blocksize * 256)`` with it (4.127 at blocksize 64). This is the
        rate for a tensor whose size is a multiple of ``blocksize * 256``; see :meth:`storage_nbytes`
        for the exact bytes of this tensor (partial blocks, the offset and the quant maps).
        """
        if not self.nested:
            return 4.0 + 32.0 / self.blocksize
        return 4.0 + 8.0 / self.blocksize + 32.0 / (self.blocksize * self.nested_blocksize)

    def storage_nbytes(self, include_quant_maps: bool = False) -> int:
        """Exact bytes of this quantized tensor: packed codes + absmax (+ offset and nested absmax).

        Args:
            include_quant_maps: also count the 16-entry NF4 table and the 256-entry nested map
                (64 + 1024 bytes), which bitsandbytes stores once per tensor.
        """
        total = self.packed_shape[0] + self.absmax.numel() * self.absmax.element_size()
        if self.nested:
            total += self.offset.element_size() + self.nested_absmax.numel() * self.nested_absmax.element_size()
        if include_quant_maps:
            total += self.quant_map.numel() * 4 + (self.nested_quant_map.numel() * 4 if self.nested else 0)
        return total

    # ----------------------------------------------------------------------------------- (de)serialisation
    def metadata(self) -> dict[str, Any]:
        """The non-tensor fields, in bitsandbytes' JSON order and spelling."""
        meta: dict[str, Any] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
        }
        if self.nested:
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                        nested_offset=self.offset.item())  # python float: exact for an fp32 value
        return meta

    def to_dict(self, packed: bool = True) -> dict[str, Any]:
        """The state as bitsandbytes writes it next to a 4-bit ``weight`` (keys without the ``weight.`` prefix).

        Args:
            packed: True (default) -> only tensors, the metadata packed into the uint8 tensor
                ``quant_state.bitsandbytes__nf4`` (UTF-8 JSON, byte-identical to bitsandbytes'
                ``pack_dict_to_tensor``); ready for safetensors. False -> tensors plus the metadata
                as plain Python values (``quant_type``, ``blocksize``, ``dtype``, ``shape``, ...).
        """
        out: dict[str, Any] = {"absmax": self.absmax, "quant_map": self.quant_map}
        if self.nested:
            out.update(nested_absmax=self.nested_absmax, nested_quant_map=self.nested_quant_map)
        meta = self.metadata()
        if not packed:
            out.update(meta)
            return out
        # json.dumps with default separators, as bitsandbytes.utils.pack_dict_to_tensor does.
        out[PACKED_STATE_KEY] = torch.frombuffer(bytearray(json.dumps(meta).encode("utf-8")), dtype=torch.uint8).clone()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NF4QuantState":
        """Rebuild a state from :meth:`to_dict` output (packed or not) or a bitsandbytes state-dict slice.

        Strict: every key the format requires must be present and no unknown key may be; the metadata
        must be self-consistent (e.g. the nested fields come together).

        Raises:
            ValueError: a missing, unknown or inconsistent entry, or a non-nf4 quant type.
            TypeError: an entry has the wrong type or dtype.
        """
        if not isinstance(d, dict):
            raise TypeError(f"NF4QuantState.from_dict: expected a dict, got {type(d).__name__}")
        d = dict(d)
        other_packed = [k for k in d if k.startswith("quant_state.bitsandbytes__") and k != PACKED_STATE_KEY]
        if other_packed:
            raise ValueError(f"NF4QuantState.from_dict: only nf4 is supported, found {other_packed}")
        if PACKED_STATE_KEY in d:
            blob = d.pop(PACKED_STATE_KEY)
            if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
                raise TypeError(f"NF4QuantState.from_dict: {PACKED_STATE_KEY!r} must be a 1-D uint8 tensor "
                                f"of JSON bytes")
            try:
                meta = json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"NF4QuantState.from_dict: {PACKED_STATE_KEY!r} is not UTF-8 JSON: {e}") from e
            if not isinstance(meta, dict):
                raise ValueError(f"NF4QuantState.from_dict: {PACKED_STATE_KEY!r} must hold a JSON object")
            clash = set(meta) & set(d)
            if clash:
                raise ValueError(f"NF4QuantState.from_dict: keys {sorted(clash)} given both packed and unpacked")
            d.update(meta)
        nested = "nested_absmax" in d or "nested_offset" in d or "nested_quant_map" in d
        meta_keys = ["quant_type", "blocksize", "dtype", "shape"]
        if nested:
            meta_keys += ["nested_blocksize", "nested_dtype", "nested_offset"]
        required = list(_TENSOR_KEYS_NESTED if nested else _TENSOR_KEYS_PLAIN) + meta_keys
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"NF4QuantState.from_dict: missing entries {missing} (a 4-bit checkpoint must carry "
                             f"all of {required}; it may be truncated or not NF4)")
        unknown = sorted(set(d) - set(required))
        if unknown:
            raise ValueError(f"NF4QuantState.from_dict: unknown entries {unknown}")
        for k in (_TENSOR_KEYS_NESTED if nested else _TENSOR_KEYS_PLAIN):
            if not isinstance(d[k], torch.Tensor):
                raise TypeError(f"NF4QuantState.from_dict: {k!r} must be a tensor, got {type(d[k]).__name__}")
        if d["dtype"] not in _NAME_DTYPES:
            raise ValueError(f"NF4QuantState.from_dict: dtype must be one of {list(_NAME_DTYPES)}, got {d['dtype']!r}")
        shape = d["shape"]
        if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ValueError(f"NF4QuantState.from_dict: shape must be a list of non-negative ints, got {shape!r}")
        kwargs: dict[str, Any] = dict(shape=torch.Size(shape), dtype=_NAME_DTYPES[d["dtype"]], blocksize=d["blocksize"],
                                      absmax=d["absmax"], quant_map=d["quant_map"], quant_type=d["quant_type"])
        if nested:
            if d["nested_dtype"] != "float32":
                raise ValueError(f"NF4QuantState.from_dict: nested_dtype must be 'float32', got {d['nested_dtype']!r}")
            offset = offset_fp32(d["nested_offset"], "NF4QuantState.from_dict: nested_offset")
            kwargs.update(offset=offset.to(d["absmax"].device),
                          nested_absmax=d["nested_absmax"], nested_quant_map=d["nested_quant_map"],
                          nested_blocksize=d["nested_blocksize"])
        return cls(**kwargs)


def offset_fp32(value: Any, name: str = "offset", check_finite: bool = True) -> torch.Tensor:
    """The double-quantization offset as a 0-dim fp32 tensor: ``float32(value)``, as bitsandbytes reads it
    (``QuantState.from_dict``: ``torch.tensor(float(qs_dict["nested_offset"]))``).

    Accepts a finite Python number (the JSON ``nested_offset``) or a one-element floating tensor of any float
    dtype: some third-party checkpoints store it in bf16 or fp16, and a 16-bit value is exactly representable
    in fp32, so nothing is lost. Refuses what is malformed: bools, strings, non-finite values, integer tensors,
    tensors of more than one element. ``check_finite=False`` (the constructor, which may run on a device or the
    meta device) skips the finiteness check, which would read the value back.
    """
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.numel() != 1:
            raise TypeError(f"{name} must be one floating-point number, got a {value.dtype} tensor of shape "
                            f"{tuple(value.shape)}")
        out = value if value.dtype == torch.float32 and value.dim() == 0 else value.detach().reshape(()).float()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out = torch.tensor(float(value), dtype=torch.float32)
    else:
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if check_finite and not bool(torch.isfinite(out)):
        raise ValueError(f"{name} must be a finite number, got {out.item()!r}")
    return out


def _check_tensor(name: str, t: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """Raise TypeError/ValueError unless ``t`` is a tensor of ``dtype`` and ``shape``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"NF4QuantState: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"NF4QuantState: {name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"NF4QuantState: {name} must have shape {shape}, got {tuple(t.shape)}")


def _check_one_device(tensors: dict[str, torch.Tensor]) -> None:
    """Raise ValueError unless the state's tensors share one device (a kernel reads them together)."""
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"NF4QuantState: tensors must all be on one device, got "
                         f"{ {name: str(t.device) for name, t in tensors.items()} }; move the state with .to(device)")
