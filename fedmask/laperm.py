"""LaPerm (Qiu & Suda, "Train-by-Reconnect", NeurIPS 2020), centrally and federated.

LaPerm never changes a weight's value, only where it sits. Every party regenerates the
seeded values; each *row* of a tensor (the incoming weights of one output unit: a row of a
Linear weight, one output channel of a Conv2d weight; a bias is one row) keeps its
multiset of values for good, as the reference code permutes each weight vector.

Training (the paper's, :class:`LaPermTrainer`): an inner Adam (``laperm-lr``) updates a
shadow copy of the weights, which the forward pass uses; every ``laperm-sync`` steps (k)
each row is rewired: its sorted seed values are assigned in the rank order of the shadow
row, and the shadow is reset to the result (Adam's moments are kept, as in the
reference). A client rewires once more at the end of its local round, so what it holds is
a pure arrangement of the seed's values.

Federated protocol:

- **state** (broadcast): per tensor, the rank of every weight inside its row
  (``weight = sorted_row[rank]``), as float32 (exact below 2**24). Downlink: 32 bits per
  weight, as FedAvg's.
- **upload**: the client's final ranks, coded against the broadcast ranks both ends hold
  (:func:`encode_ranks`): per tensor the displacements ``d = rank_client - rank_global``
  range-coded under a quantized Laplace(0, b) with ``b`` (float32) in the section header,
  or the ranks bit-packed with ``ceil(log2 m)`` bits each (m the row length) when that is
  shorter. 28-byte header (magic ``FMPR``, fingerprint of seed/model/init/layout, CRC32
  over the payload and a digest of the broadcast ranks), 11 bytes per tensor. With
  ``laperm-rank-step`` s > 1 the displacements are sent as ``d / s`` stochastically
  rounded (lossy, unbiased; about log2(s) bits per weight fewer): the server then holds
  approximate ranks ``prior + s * q``, which the Borda count sums as it sums exact ones.
- **merge** (:func:`borda_merge`): per weight the sum of the clients' ranks (integers: the
  sum is exact, so independent of arrival order); each row is re-ranked by that sum (a
  Borda count), ties broken by the previous global rank (unique per row). The new state is
  again a permutation of each row, so the multiset invariant holds by construction.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import TYPE_CHECKING, Any, cast

import constriction
import numpy as np
import torch
from torch import nn

from fedmask import masking
from fedmask.aggregators import MaskAggregator, Masks, State
from fedmask.codec import HEADER_FIELDS, MaskCodecError, MaskLayout, check_header, check_payload_crc

if TYPE_CHECKING:
    from fedmask.config import RunConfig

MAGIC = b"FMPR"
FORMAT_VERSION = 1
CODEC_PACKED, CODEC_ENTROPY = 1, 2
CODECS = {"packbits": CODEC_PACKED, "entropy": CODEC_ENTROPY}
MODEL_PACKED, MODEL_LAPLACE = 0, 1
_HEADER = struct.Struct("<" + "".join(fmt for _, fmt in HEADER_FIELDS))  # the mask header's layout
HEADER_BYTES = _HEADER.size
_SECTION = struct.Struct("<BHfI")  # model u8 | rank step u16 | Laplace scale f32 | coded bytes u32
SECTION_BYTES = _SECTION.size
_MIN_SCALE = 0.05


# ---------------------------------------------------------------------------- ranks


def row_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, row length): a weight's output units by their inputs; a bias is one row."""
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def ranks_of(values: np.ndarray) -> np.ndarray:
    """Each entry's rank inside its row (0 = smallest; equal values by index), int64."""
    rows = values.reshape(row_shape(values.shape))
    order = np.argsort(rows, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(rows.shape[1])[None, :].repeat(rows.shape[0], 0), axis=1)
    return ranks.reshape(values.shape)


def _torch_ranks(rows: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(rows, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(rows.shape[1], device=rows.device).expand_as(order).contiguous())
    return ranks


def is_permutation(ranks: np.ndarray) -> bool:
    """Every row holds each of 0..m-1 exactly once."""
    rows = ranks.reshape(row_shape(ranks.shape))
    return bool((np.sort(rows, axis=1) == np.arange(rows.shape[1])[None, :]).all())


def sorted_rows(values: np.ndarray) -> np.ndarray:
    """Each row's values in ascending order: what a rank indexes."""
    return np.sort(values.reshape(row_shape(values.shape)), axis=1)


def arrange(sorted_values: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """The weights ``sorted_row[rank]``, in the ranks' shape."""
    rows = np.take_along_axis(sorted_values, ranks.reshape(sorted_values.shape).astype(np.int64), axis=1)
    return rows.reshape(ranks.shape)


def state_ranks(state: State) -> dict[str, np.ndarray]:
    """The broadcast state (float32 ranks) as int64 ranks, checked to be permutations."""
    out = {}
    for name, value in state.items():
        ranks = np.rint(np.asarray(value, dtype=np.float64)).astype(np.int64)
        if not np.array_equal(ranks, value) or not is_permutation(ranks):
            raise ValueError(f"laperm state '{name}': expected a permutation of 0..m-1 in every row")
        out[name] = ranks
    return out


# ---------------------------------------------------------------------------- the model


class Rewired(nn.Module):
    """A LaPerm tensor as a parametrization: the weight is the shadow copy (``scores``,
    trained by the inner optimizer); :meth:`rewire` snaps it to the arrangement of the
    sorted seed values (``sorted``, per row) in the shadow's rank order."""

    def __init__(self, frozen: torch.Tensor):
        super().__init__()
        self.mode = "laperm"
        rows = row_shape(tuple(frozen.shape))
        self.register_buffer("sorted", torch.sort(frozen.detach().reshape(rows), dim=1).values.clone())
        self.scores = nn.Parameter(frozen.detach().clone())

    def forward(self, unused: torch.Tensor) -> torch.Tensor:
        return self.scores

    @torch.no_grad()
    def rewire(self) -> None:
        """Synchronization: reset the shadow to the sorted values in its own rank order."""
        srt = cast(torch.Tensor, self.sorted)
        ranks = _torch_ranks(self.scores.reshape(srt.shape))
        self.scores.copy_(srt.gather(1, ranks).reshape(self.scores.shape))


def rewired_modules(model: nn.Module) -> dict[str, Rewired]:
    return {n: m for n, m in masking.score_masks(model).items() if isinstance(m, Rewired)}


def is_laperm(model: nn.Module) -> bool:
    found = masking.score_masks(model)
    return bool(found) and all(isinstance(m, Rewired) for m in found.values())


def rewire(model: nn.Module) -> None:
    for module in rewired_modules(model).values():
        module.rewire()


@torch.no_grad()
def arrangement(model: nn.Module) -> dict[str, np.ndarray]:
    """The current rank of every weight in its row (what a client uploads, after a rewire)."""
    return {name: ranks_of(module.scores.detach().cpu().numpy()) for name, module in rewired_modules(model).items()}


def load_ranks(model: nn.Module, state: State) -> None:
    """Put a broadcast arrangement (ranks) into the model: shadow = sorted[rank]."""
    ranks = state_ranks(state)
    values = {}
    for name, module in rewired_modules(model).items():
        if name not in ranks:
            raise ValueError(f"laperm state: expected tensor '{name}'")
        srt = cast(torch.Tensor, module.sorted).cpu().numpy()
        values[name] = arrange(srt, ranks[name]).astype(np.float32)
    masking.set_scores(model, values)


class LaPermTrainer:
    """The paper's loop: Adam on the shadow weights, a rewire every ``sync`` steps.

    One trainer keeps its optimizer and step count across :meth:`epoch` calls (the central
    variant trains with one trainer throughout; a client builds one per round).
    """

    def __init__(self, model: nn.Module, lr: float, sync: int, device: torch.device):
        self.model, self.sync, self.device, self.steps = model, sync, device, 0
        model.to(device).train()
        self.optimizer = torch.optim.Adam([m.scores for m in rewired_modules(model).values()], lr=lr)

    def epoch(self, x: torch.Tensor, y: torch.Tensor, batch_size: int,
              generator: torch.Generator) -> tuple[float, int, int]:
        """One pass over ``x, y``; returns (summed loss, correct, seen)."""
        self.model.train()
        total_loss, correct, seen = 0.0, 0, 0
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx].to(self.device), y[idx].to(self.device)
            self.optimizer.zero_grad()
            out = self.model(xb)
            loss = nn.functional.cross_entropy(out, yb)
            loss.backward()
            self.optimizer.step()
            self.steps += 1
            if self.steps % self.sync == 0:
                rewire(self.model)
            total_loss += loss.item() * len(idx)
            correct += int((out.argmax(1) == yb).sum())
            seen += len(idx)
        return total_loss, correct, seen


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: RunConfig, device: torch.device,
          seed: int) -> dict[str, float]:
    """A client's local round: ``local-epochs`` of LaPerm, then a final rewire."""
    torch.manual_seed(seed)
    trainer = LaPermTrainer(model, config.laperm_lr, config.laperm_sync, device)
    generator = torch.Generator().manual_seed(seed)
    total_loss, correct, seen = 0.0, 0, 0
    for _ in range(config.local_epochs):
        loss, right, n = trainer.epoch(x, y, config.batch_size, generator)
        total_loss, correct, seen = total_loss + loss, correct + right, seen + n
    rewire(model)
    return {"train-loss": total_loss / max(seen, 1), "train-accuracy": correct / max(seen, 1)}


# ---------------------------------------------------------------------------- merge


def borda_merge(state: State, uploads: list[Masks]) -> State:
    """Borda count per row: re-rank by the sum of the clients' ranks (ties: previous rank).

    Integer sums make the result independent of the order of ``uploads``.
    """
    if not uploads:
        raise ValueError("borda_merge: expected at least one upload")
    current = state_ranks(state)
    out = {}
    for name, ranks in current.items():
        shape = row_shape(ranks.shape)
        total = np.zeros(shape, dtype=np.int64)
        for upload in uploads:
            total += np.asarray(upload[name], dtype=np.int64).reshape(shape)
        order = np.lexsort((ranks.reshape(shape), total), axis=1)  # by total, then previous rank
        merged = np.empty(shape, dtype=np.int64)
        np.put_along_axis(merged, order, np.arange(shape[1])[None, :].repeat(shape[0], 0), axis=1)
        out[name] = merged.reshape(ranks.shape).astype(np.float32)
    return out


class LaPermAggregator(MaskAggregator):
    """Federated LaPerm: clients upload arrangements (ranks), the server merges them by a
    Borda count per row (:func:`borda_merge`); the state is the global ranks."""

    mask_mode = "laperm"

    def initial_state(self, scores: State) -> State:
        """The seed's own arrangement: the rank of every seeded value in its row."""
        return {name: ranks_of(v).astype(np.float32) for name, v in scores.items()}

    def aggregate(self, server_round: int, state: State, masks: list[Masks], weights: list[float]) -> State:
        return borda_merge(state, masks)


# ---------------------------------------------------------------------------- codec


def _bits_for(length: int) -> int:
    return max(1, math.ceil(math.log2(length))) if length > 1 else 1


def packed_section_bytes(shape: tuple[int, ...]) -> int:
    rows, length = row_shape(shape)
    return (rows * length * _bits_for(length) + 7) // 8


def _pack(ranks: np.ndarray, length: int) -> bytes:
    width = _bits_for(length)
    planes = (ranks.reshape(-1, 1).astype(np.int64) >> np.arange(width)[None, :]) & 1
    return np.packbits(planes.astype(np.uint8).ravel()).tobytes()


def _unpack(data: bytes, size: int, length: int) -> np.ndarray:
    width = _bits_for(length)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=size * width).reshape(size, width)
    return (bits.astype(np.int64) << np.arange(width)[None, :]).sum(axis=1)


def _laplace(length: int) -> Any:
    return constriction.stream.model.QuantizedLaplace(-(length - 1), length - 1)


def laplace_scale(displacement: np.ndarray) -> float:
    """The maximum-likelihood Laplace scale (mean |d|), as the float32 the header carries."""
    return float(np.float32(max(float(np.abs(displacement).mean()) if displacement.size else 0.0, _MIN_SCALE)))


def laplace_bits(displacement: np.ndarray, scale: float) -> float:
    """Ideal code length of ``displacement`` under the quantized Laplace(0, scale)."""
    d = np.abs(displacement.astype(np.float64))
    upper = np.exp(-np.maximum(d - 0.5, 0.0) / scale)
    lower = np.exp(-(d + 0.5) / scale)
    prob = np.where(d == 0, 1.0 - np.exp(-0.5 / scale), 0.5 * (upper - lower))
    return float(-np.log2(np.maximum(prob, 1e-300)).sum())


def quantize_displacement(d: np.ndarray, step: int, rng: np.random.Generator | None) -> np.ndarray:
    """``d / step`` rounded stochastically (unbiased: ``E[step * q] = d``); exact for step 1."""
    if step == 1:
        return d.astype(np.int64)
    if rng is None:
        raise ValueError("laperm-rank-step > 1 needs a random generator for the stochastic rounding")
    return np.floor(d / step + rng.random(d.shape)).astype(np.int64)


def _encode_tensor(ranks: np.ndarray, prior: np.ndarray | None, codec: str, step: int,
                   rng: np.random.Generator | None) -> bytes:
    _, length = row_shape(ranks.shape)
    packed = _pack(ranks, length)
    if codec == "entropy" and prior is not None and length > 1:
        q = quantize_displacement((ranks.astype(np.int64) - prior.astype(np.int64)).ravel(), step, rng)
        q = q.astype(np.int32)
        scale = laplace_scale(q)
        encoder = constriction.stream.queue.RangeEncoder()
        encoder.encode(q, _laplace(_symbols(length, step)), np.zeros(q.size), np.full(q.size, scale))
        coded = encoder.get_compressed().astype("<u4").tobytes()
        if len(coded) < len(packed):
            return _SECTION.pack(MODEL_LAPLACE, step, scale, len(coded)) + coded
    return _SECTION.pack(MODEL_PACKED, 1, 0.0, len(packed)) + packed


def _symbols(length: int, step: int) -> int:
    """The Laplace model's support is [-(n-1), n-1] with n = this: every |d| <= m-1 fits."""
    return -(-(length - 1) // step) + 1


def _prior_digest(prior: dict[str, np.ndarray], layout: MaskLayout) -> int:
    digest = 0
    for name, shape in layout.shapes:
        if name not in prior or prior[name].size != math.prod(shape):
            raise MaskCodecError(f"section '{name}' side information", "the broadcast ranks", "none")
        digest = zlib.crc32(np.ascontiguousarray(prior[name], dtype="<i4").tobytes(), digest)
    return digest


def encode_ranks(ranks: dict[str, np.ndarray], layout: MaskLayout, fingerprint: bytes, codec: str = "entropy",
                 prior: dict[str, np.ndarray] | None = None, step: int = 1,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """A client's arrangement as a uint8 upload; ``prior`` (the broadcast ranks) enables the
    displacement model, without it every tensor is bit-packed (exact ranks). With ``step``
    > 1 (``laperm-rank-step``) displacement-coded tensors carry ``d / step`` stochastically
    rounded with ``rng``: lossy, unbiased, about log2(step) bits per weight cheaper."""
    if sorted(ranks) != [name for name, _ in layout.shapes]:
        raise ValueError(f"ranks: expected tensors {[n for n, _ in layout.shapes]}, got {sorted(ranks)}")
    if codec not in CODECS:
        raise ValueError(f"uplink-codec: expected one of {', '.join(CODECS)}, got {codec!r}")
    if not 1 <= step <= 65535:
        raise ValueError(f"laperm-rank-step: expected 1..65535, got {step}")
    payload = b"".join(_encode_tensor(np.asarray(ranks[name]), None if prior is None else prior[name], codec,
                                      step, rng) for name, _ in layout.shapes)
    uses_prior = _first_laplace_section(payload, layout) is not None
    crc = zlib.crc32(payload, _prior_digest(prior, layout) if uses_prior and prior is not None else 0)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, CODECS[codec], 0, layout.num_params, fingerprint, crc)
    return np.frombuffer(header + payload, dtype=np.uint8).copy()


def max_upload_bytes(layout: MaskLayout) -> int:
    """The longest valid upload: every tensor bit-packed (the coder never sends more)."""
    return HEADER_BYTES + sum(SECTION_BYTES + packed_section_bytes(shape) for _, shape in layout.shapes)


def _first_laplace_section(payload: bytes, layout: MaskLayout) -> str | None:
    offset = 0
    for name, _ in layout.shapes:
        if offset + SECTION_BYTES > len(payload):
            return None
        model, _, _, length = _SECTION.unpack_from(payload, offset)
        if model == MODEL_LAPLACE:
            return name
        offset += SECTION_BYTES + length
    return None


def decode_ranks(blob: object, layout: MaskLayout, fingerprint: bytes,
                 prior: dict[str, np.ndarray] | None = None, step: int = 1) -> dict[str, np.ndarray]:
    """The ranks in ``blob``, or :class:`MaskCodecError` naming the first field that is wrong.

    Refused: anything but a 1-D uint8 array, a wrong magic/format/codec/reserved field, bit
    count or fingerprint, a length past :func:`max_upload_bytes`, a CRC mismatch (a
    truncated or altered payload, or one coded against another broadcast), a bad section
    (a rank step other than ``step``), and exact ranks that are not a permutation of every
    row. With ``step`` > 1, displacement-coded tensors decode to approximate ranks
    ``prior + step * q`` (not a permutation; what the Borda count sums), checked to lie
    within ``[-step, m - 1 + step]``.
    """
    codec, crc = check_header(blob, layout, fingerprint, magic=MAGIC, format_version=FORMAT_VERSION)
    assert isinstance(blob, np.ndarray)
    raw = np.ascontiguousarray(blob).tobytes()
    longest = max_upload_bytes(layout)
    if len(raw) > longest:
        raise MaskCodecError("length", f"at most {longest} bytes (every tensor bit-packed)", f"{len(raw)} bytes")
    payload = raw[HEADER_BYTES:]
    check_payload_crc(payload, crc, _first_laplace_section(payload, layout), prior,
                      lambda ranks: _prior_digest(ranks, layout), "the broadcast ranks")
    out, offset = {}, 0
    for name, shape in layout.shapes:
        size = math.prod(shape)
        _, length = row_shape(shape)
        if offset + SECTION_BYTES > len(payload):
            raise MaskCodecError(f"section '{name}'", f"a {SECTION_BYTES}-byte section header", "end of payload")
        model, got_step, scale, nbytes = _SECTION.unpack_from(payload, offset)
        offset += SECTION_BYTES
        if offset + nbytes > len(payload):
            raise MaskCodecError(f"section '{name}' length", f"<= {len(payload) - offset} bytes", nbytes)
        data = payload[offset : offset + nbytes]
        offset += nbytes
        if model == MODEL_PACKED:
            if nbytes != packed_section_bytes(shape):
                raise MaskCodecError(f"section '{name}' length", packed_section_bytes(shape), nbytes)
            if got_step != 1:
                raise MaskCodecError(f"section '{name}' rank step", "1 (packed ranks are exact)", got_step)
            ranks = _unpack(data, size, length)
        elif model == MODEL_LAPLACE:
            if got_step != step:
                raise MaskCodecError(f"section '{name}' rank step", f"{step} (laperm-rank-step)", got_step)
            if prior is None or not (math.isfinite(scale) and scale >= _MIN_SCALE) or nbytes % 4:
                raise MaskCodecError(f"section '{name}' Laplace scale", f">= {_MIN_SCALE}, finite", scale)
            try:
                decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(data, dtype="<u4").astype(np.uint32))
                q = decoder.decode(_laplace(_symbols(length, step)), np.zeros(size), np.full(size, scale))
            except Exception as err:  # noqa: BLE001 - whatever the coder says, the stream is bad
                raise MaskCodecError(f"section '{name}' stream", "a valid range-coded stream", str(err)) from None
            ranks = np.asarray(prior[name], dtype=np.int64).ravel() + step * q.astype(np.int64)
        else:
            raise MaskCodecError(f"section '{name}' model", "0 (packed) or 1 (Laplace)", model)
        ranks = ranks.reshape(shape)
        if model == MODEL_LAPLACE and step > 1:
            if ranks.size and (int(ranks.min()) < -step or int(ranks.max()) > length - 1 + step):
                raise MaskCodecError(f"section '{name}' ranks", f"within [-{step}, {length - 1 + step}]",
                                     f"[{int(ranks.min())}, {int(ranks.max())}]")
        elif not is_permutation(ranks):
            raise MaskCodecError(f"section '{name}' ranks", f"a permutation of 0..{length - 1} in every row",
                                 "repeated or out-of-range ranks")
        out[name] = ranks
    if offset != len(payload):
        raise MaskCodecError("length", f"{HEADER_BYTES + offset} bytes", f"{len(raw)} bytes")
    return out


def code_lengths(ranks: dict[str, np.ndarray], layout: MaskLayout, codec: str,
                 prior: dict[str, np.ndarray] | None, step: int = 1) -> dict[str, float]:
    """Ideal bits under the chosen models, and ``sum log2(m!)`` over rows: the cost of naming
    each row's permutation with no side information (the 'formula' figure for LaPerm).
    ``ranks`` are the decoded ones (with a rank step, ``prior + step * q``)."""
    ideal, formula = 0.0, 0.0
    for name, shape in layout.shapes:
        rows, length = row_shape(shape)
        packed = 8.0 * packed_section_bytes(shape)
        formula += rows * math.lgamma(length + 1) / math.log(2)
        if codec == "entropy" and prior is not None and length > 1:
            d = np.asarray(ranks[name], dtype=np.int64).ravel() - np.asarray(prior[name], dtype=np.int64).ravel()
            q = d // step if step > 1 and not is_permutation(np.asarray(ranks[name])) else d
            ideal += min(packed, laplace_bits(q, laplace_scale(q)))
        else:
            ideal += packed
    return {"ideal_bits": ideal, "formula_bits": formula}
