"""Frozen linear weights kept in 4 or 8 bits and dequantized where a layer computes (QLoRA's recipe).

* ``nf4``: QLoRA's 4-bit NormalFloat (Dettmers et al., 2023, arXiv 2305.14314): the weight, flattened row by row,
  in blocks of 64; each block divided by its largest magnitude (`absmax`, float32) and every value replaced by
  the nearest of the 16 NF4 levels (the paper's Appendix E), two 4-bit codes per byte, the first in the high
  half. 0.5625 bytes per weight. The codes and scales are those of bitsandbytes' `quantize_4bit(...,
  blocksize=64, quant_type="nf4")` without its double quantization (the tests compare them where it is installed).
* ``nf4-dq``: NF4 with QLoRA's double quantization of the scales (bitsandbytes' `compress_statistics=True`, PEFT's
  `bnb_4bit_use_double_quant`, litgpt's `bnb.nf4-dq`): the absmax values, less their mean, in blocks of 256, each
  block divided by its largest magnitude and stored as the nearest value of the 8-bit dynamic map of Dettmers
  (2015, arXiv 1511.04561; signed, 7 exponent bits), with a float32 scale per 256 blocks. 0.5158 bytes per weight.
* ``int8``: one int8 per weight and a float32 scale per output row, `round(127 w / absmax_row)`, bitsandbytes'
  `int8_vectorwise_quant`. 1 byte per weight plus 4 per row.

A layer dequantizes its weight into the model's dtype for its forward pass. Autograd would then keep that full
weight until backward (`F.linear` keeps it for the input's gradient): every layer's, which is as much memory as the
unquantized model. So each layer's forward runs under `Quantized.unkept()`, a saved-tensor hook that keeps, for
any saved tensor that is (a view of) the dequantized weight, only where it lies, and dequantizes those elements
again in backward: between forward and backward only the codes and scales stay in memory.

The quantized layers are a run-time form of the checkpoint, not a file format: their codes are not in the model's
`state_dict` (adapters and fully trained modules are saved without the frozen weights anyway).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("nf4", "nf4-dq", "int8")
BLOCK = 64  # nf4 elements per absmax
BLOCK2 = 256  # nf4-dq absmax values per second-level scale

# the 16 NF4 levels, as float32: QLoRA (Dettmers et al., 2023), Appendix E
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# rows quantized at a time: the float32 temporaries of a 7B model's widest layer stay near 100 MB
_ROWS_AT_A_TIME = 2048


def check_kind(kind: Optional[str], flag: str = "--quantize") -> Optional[str]:
    """`kind` if it is one of `KINDS` (or None), else a ValueError naming `flag` and the choices."""
    if kind is None or kind in KINDS:
        return kind
    hint = ""
    if isinstance(kind, str) and kind.startswith("bnb.") and kind[4:] in KINDS:
        hint = (f" (litgpt's {kind} runs bitsandbytes; here the same format is written in torch: {kind[4:]!r} is "
                "its name)")
    raise ValueError(f"{flag} {kind!r} is not a quantization here{hint}: pass one of {', '.join(KINDS)}, or leave it "
                     "unset to keep the weights unquantized.")


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _levels(device: torch.device) -> torch.Tensor:
    key = ("levels", device)
    if key not in _TABLES:
        _TABLES[key] = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
    return _TABLES[key]


def _byte_pairs(device: torch.device) -> torch.Tensor:
    """`(256,)` int64: the two float32 levels a byte of codes stands for (high half first), as one 8-byte item, so
    that one lookup per byte decodes it (a third of the time of looking up `(256, 2)` rows on a CPU)."""
    key = ("pairs", device)
    if key not in _TABLES:
        levels = _levels(device)
        pairs = torch.stack((levels.repeat_interleave(16), levels.repeat(16)), dim=1).contiguous()
        _TABLES[key] = pairs.view(torch.int64).view(-1)
    return _TABLES[key]


def _dynamic_map(device: torch.device) -> torch.Tensor:
    """`(256,)` float32, sorted: the signed 8-bit dynamic data type (Dettmers 2015): for each exponent `e` from -6
    to 0, the `2^(e+6)` midpoints of `2^(e+6) + 1` steps from 0.1 to 1, times `10^e`, with both signs; and 0, 1."""
    key = ("dynamic", device)
    if key not in _TABLES:
        values = [0.0, 1.0]
        for i in range(7):
            steps = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
            mids = (steps[:-1] + steps[1:]) / 2.0
            values += (10 ** (i - 6) * mids).tolist() + (-(10 ** (i - 6)) * mids).tolist()
        _TABLES[key] = torch.tensor(sorted(values), dtype=torch.float32, device=device)
    return _TABLES[key]


def _blockwise_nearest(x: torch.Tensor, levels: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` (float32, flat) in blocks of `block` (a ragged last one too): each block scaled by the reciprocal of its
    absmax, every value the index of the nearest of the sorted `levels`. Returns (uint8 indices, absmax)."""
    n = x.numel()
    pad = -n % block
    blocks = F.pad(x, (0, pad)).view(-1, block) if pad else x.view(-1, block)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]
    codes = torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)
    return codes.view(-1)[:n], absmax


def _quantize_nf4(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = W.reshape(-1)
    codes, scales = [], []
    step = _ROWS_AT_A_TIME * BLOCK
    for at in range(0, flat.numel(), step):
        c, absmax = _blockwise_nearest(flat[at:at + step].float(), _levels(W.device), BLOCK)
        if c.numel() % 2:  # (the ragged end: its last byte's low half is the level 0)
            c = F.pad(c, (0, 1), value=7)
        c = c.view(-1, 2)
        codes.append(c[:, 0] << 4 | c[:, 1])
        scales.append(absmax)
    return torch.cat(codes), torch.cat(scales)


def _quantize_int8(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = W.reshape(W.shape[0], -1)
    codes, scales = [], []
    for at in range(0, rows.shape[0], _ROWS_AT_A_TIME):
        part = rows[at:at + _ROWS_AT_A_TIME].float()
        absmax = part.abs().amax(dim=1)
        codes.append(torch.round(part * (127 / absmax.masked_fill(absmax == 0, 1))[:, None]).to(torch.int8))
        scales.append(absmax)
    return torch.cat(codes).reshape(-1), torch.cat(scales)


class Quantized(nn.Module):
    """One frozen weight in `kind`'s codes and float32 scales; `dequantize()` gives it back in the dtype of the
    module's (empty) `probe` buffer, which follows the model's casts (`model.to(torch.bfloat16)`), while the codes
    and scales, integer tensors (the scales' float32 bits), keep theirs."""

    def __init__(self, W: torch.Tensor, kind: str) -> None:
        super().__init__()
        check_kind(kind)
        if W.ndim != 2 or not W.is_floating_point():
            raise ValueError(f"only 2-D floating-point weights are quantized, not a {W.dtype} tensor of shape "
                             f"{tuple(W.shape)}.")
        self.kind = kind
        self.shape = tuple(W.shape)
        with torch.no_grad():
            codes, scales = (_quantize_int8 if kind == "int8" else _quantize_nf4)(W.detach())
            offset = scales2 = None
            if kind == "nf4-dq":  # the scales themselves, less their mean, in 8 bits
                offset = scales.mean()
                scales, scales2 = _blockwise_nearest(scales - offset, _dynamic_map(W.device), BLOCK2)
        self.register_buffer("codes", codes, persistent=False)
        # float32 values are kept as their int32 bits: a model's dtype cast leaves them as they are
        self.register_buffer("scales", scales if kind == "nf4-dq" else scales.view(torch.int32), persistent=False)
        if kind == "nf4-dq":
            self.register_buffer("scales2", scales2.view(torch.int32), persistent=False)
            self.register_buffer("offset", offset.reshape(1).view(torch.int32), persistent=False)
        self.register_buffer("probe", torch.empty(0, dtype=W.dtype, device=W.device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.probe.dtype

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name != "probe")

    def block_scales(self, b0: int, b1: int) -> torch.Tensor:
        """The float32 absmax of NF4 blocks `b0` to `b1` (decoded from their 8 bits with `nf4-dq`)."""
        if self.kind != "nf4-dq":
            return self.scales.view(torch.float32)[b0:b1]
        c0, c1 = b0 // BLOCK2, -(-b1 // BLOCK2)
        values = _dynamic_map(self.codes.device)[self.scales[c0 * BLOCK2:c1 * BLOCK2].long()]
        values = F.pad(values, (0, (c1 - c0) * BLOCK2 - values.numel())).view(c1 - c0, BLOCK2)
        values = values * self.scales2.view(torch.float32)[c0:c1, None]
        return values.view(-1)[b0 - c0 * BLOCK2:b1 - c0 * BLOCK2] + self.offset.view(torch.float32)

    def dequantize(self, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """The weight, or the elements `[start, stop)` of it flattened (whole blocks are decoded, then cut)."""
        n = self.numel()
        stop = n if stop is None else stop
        if self.kind == "int8":
            scales = self.scales.view(torch.float32)
            cols = self.shape[1]
            r0, r1 = start // cols, -(-stop // cols)
            rows = self.codes[r0 * cols:r1 * cols].view(r1 - r0, cols).float().mul_(scales[r0:r1, None]).mul_(1 / 127)
            out = rows.to(self.dtype).reshape(-1)[start - r0 * cols:stop - r0 * cols]
        else:
            b0, b1 = start // BLOCK, -(-stop // BLOCK)
            packed = self.codes[b0 * BLOCK // 2:b1 * BLOCK // 2]
            if packed.numel() < (b1 - b0) * BLOCK // 2:  # the ragged last block
                packed = F.pad(packed, (0, (b1 - b0) * BLOCK // 2 - packed.numel()))
            pairs = _byte_pairs(packed.device).index_select(0, packed.int()).view(torch.float32)
            values = pairs.view(b1 - b0, BLOCK).mul_(self.block_scales(b0, b1)[:, None])
            out = values.to(self.dtype).reshape(-1)[start - b0 * BLOCK:stop - b0 * BLOCK]
        return out.view(self.shape) if (start, stop) == (0, n) else out

    @contextmanager
    def unkept(self) -> Iterator[torch.Tensor]:
        """The dequantized weight, for a forward pass that autograd may record: what the pass saves of it is kept as
        a reference (`_Elements`) and dequantized again by backward, not kept."""
        W = self.dequantize()
        # (autograd keeps the hooks with what they saved: they must not hold W itself)
        device, ptr = W.device, W.untyped_storage().data_ptr()

        def pack(t: torch.Tensor):
            if t.device == device and t.untyped_storage().data_ptr() == ptr:
                return _Elements(self, t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield W

    def extra_repr(self) -> str:
        return f"{self.kind}, shape={self.shape}, dtype={self.dtype}"


class _Elements:
    """A saved view of a dequantized weight: its size, strides and offset, rebuilt from the codes on unpacking."""

    __slots__ = ("owner", "size", "stride", "offset", "span")

    def __init__(self, owner: Quantized, t: torch.Tensor) -> None:
        self.owner = owner
        self.size, self.stride, self.offset = tuple(t.shape), t.stride(), t.storage_offset()
        reach = sum((s - 1) * abs(st) for s, st in zip(self.size, self.stride)) if t.numel() else 0
        self.span = (self.offset, self.offset + reach + 1)

    def rebuild(self) -> torch.Tensor:
        start, stop = self.span
        flat = self.owner.dequantize(start, stop).reshape(-1)
        return flat.as_strided(self.size, self.stride, self.offset - start)


def _unpack(saved):
    return saved.rebuild() if isinstance(saved, _Elements) else saved


class QuantizedLinear(nn.Module):
    """`nn.Linear` with its weight `Quantized`: `F.linear(x, W, b)` with `W` dequantized for the pass only."""

    def __init__(self, base: nn.Linear, kind: str, device: Optional[torch.device] = None) -> None:
        """`base`'s weight quantized on `device` (default: where it is); `base` itself is left as it is."""
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        with torch.no_grad():
            self.quantized = Quantized(base.weight if device is None else base.weight.to(device), kind)
        self.bias = base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.quantized.unkept() as W:
            return F.linear(x, W, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantizable(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """`(parent, name in it, layer)` for each weight `quantize_model` quantizes: the frozen linear weights of
    `model`'s transformer blocks (`model.transformer.h`; of the whole model if it has none), plain `nn.Linear` or
    adapted (`AdaptedLinear`). Left as they are, as QLoRA leaves them: the embeddings, norms and output head, MoE
    routers (their scores pick the experts), the modules trained in full, any weight that trains and any already
    quantized."""
    from lit_gpt.adapters.base import TRAINED_IN_FULL, AdaptedLinear
    from lit_gpt.model import LLaMAMoE

    blocks = getattr(getattr(model, "transformer", None), "h", None)
    root = blocks if isinstance(blocks, nn.Module) else model
    skip: set[int] = set()
    for module in root.modules():
        if isinstance(module, LLaMAMoE):
            skip.update(id(m) for m in (module.gate, module.shared_expert_gate) if m is not None)
        if getattr(module, TRAINED_IN_FULL, False):
            skip.update(id(m) for m in module.modules())
    for name, module in root.named_modules():
        if id(module) in skip:
            continue
        adapted = isinstance(module, AdaptedLinear)
        if (adapted and module.quantized is None) or type(module) is nn.Linear:
            if not module.weight.requires_grad:
                parent_name, _, child = name.rpartition(".")
                yield (root.get_submodule(parent_name) if parent_name else root), child, module


def quantize_model(model: nn.Module, kind: str, device: Optional[torch.device] = None) -> int:
    """Quantize the weights `quantizable` picks, in place, each made on `device` (default: where it is) one at a
    time, so that only the codes and one layer's weight are ever there at once. Returns how many."""
    from lit_gpt.adapters.base import AdaptedLinear

    check_kind(kind)
    done = 0
    for parent, child, module in list(quantizable(model)):
        if isinstance(module, AdaptedLinear):
            module.quantize(kind, device)
        else:  # (the device copy of the weight lives only while it is quantized)
            setattr(parent, child, QuantizedLinear(module, kind, device))
        done += 1
    return done


DESCRIPTIONS = {"nf4": "4-bit NormalFloat (QLoRA's NF4, blocks of 64)",
                "nf4-dq": "4-bit NormalFloat with its scales in 8 bits (QLoRA's NF4 and double quantization)",
                "int8": "int8 (a scale per row)"}


def quantize_note(model: nn.Module, kind: str) -> str:
    """One line on what `quantize_model(model, kind)` will do: how many weights, their memory before and after."""
    from lit_gpt.adapters.plan import format_bytes

    weights = [module.weight for *_, module in quantizable(model)]
    before = sum(w.numel() * w.element_size() for w in weights)
    after = sum(quantized_nbytes(tuple(w.shape), kind) for w in weights)
    dtype = str(weights[0].dtype).removeprefix("torch.") if weights else "as they are"
    return (f"--quantize {kind}: {len(weights)} frozen linear weights ({sum(w.numel() for w in weights):,} "
            f"parameters) kept in {DESCRIPTIONS[kind]}: {format_bytes(after)} in place of {format_bytes(before)}; "
            f"the embeddings, norms, output head and what trains stay {dtype}.")


def quantized_nbytes(shape: tuple[int, int], kind: str) -> int:
    """The bytes `Quantized` keeps for a weight of `shape`: codes and scales."""
    rows, cols = shape
    if kind == "int8":
        return rows * cols + 4 * rows
    blocks = -(-rows * cols // BLOCK)
    if kind == "nf4-dq":
        return -(-rows * cols // 2) + blocks + 4 * -(-blocks // BLOCK2) + 4
    return -(-rows * cols // 2) + 4 * blocks
