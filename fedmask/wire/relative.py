"""Relative-entropy coding of a sample: about KL(q || theta) bits instead of H(q) + KL.

A FedPM client holds per-weight probabilities ``q`` and must upload one binary sample
``y ~ Bernoulli(q)``; both ends know the broadcast ``theta``. Coding the sample against
``theta`` (:mod:`fedmask.wire.masks`' entropy codec) costs the cross-entropy
``H(q) + KL(q || theta)`` bits per weight, and most of it is the client's own sampling
noise ``H(q)`` (93-97% of a FedPM upload, measured). Here the sampling noise is *shared*:
both ends draw the same candidate samples from ``theta`` and the client only says which one
it picked (minimal random coding, Havasi et al. 2019; per block as in KLMS, Isik et al.,
AISTATS 2024).

The scheme, with ``C = block_bits``, ``t = extra_bits``, ``K = 2**(C + t)`` candidates a block:

1. ``theta`` is quantised to 16 bits, ``theta_hat = m / 2**16`` (m in 1..65535); a
   candidate bit is ``u < m`` for a uniform 16-bit ``u``, so ``theta_hat`` is exactly the
   proposal the importance weights divide by. The weights are put in a keyed pseudo-random
   order and cut into ``B = ceil(KL(q || theta) / C)`` blocks of equal size (sizes differ
   by at most one), each holding about ``C`` bits of KL; only ``B`` is sent.
2. Per block, ``K`` candidates ``Y_k ~ Bernoulli(theta_hat)`` come from a Philox stream
   keyed by the upload's key (the run's fingerprint, the round, the client), with the
   counter at the candidate: the decoder regenerates only the chosen one.
3. The client picks ``k`` with probability proportional to ``w_k = prod q(Y_k)/theta_hat(Y_k)``
   (Gumbel-max on the log weights, ``sum_i Y_ki * logit-ratio_i``; the constant drops out,
   the Gumbel noise from the client's own seed) and sends ``k`` in ``C + t`` bits. Its sample
   is ``Y_k``, bit for bit what the decoder rebuilds. With ``KL == 0`` there is no block: the
   sample is drawn from ``theta_hat`` with the shared stream, and the upload is the header.

Cost: the header and ``ceil(B * (C + t) / 8)`` bytes, about ``(C + t) / C`` times the KL of
what is coded. CPU: the encoder draws ``N * K`` 16-bit uniforms for ``N`` weights whatever
the KL (LeNet-300-100's 266,610 weights at C = 8, t = 0: about 0.12 s on one core; 0.40 s at
t = 2); the decoder about ``N`` (under 20 ms).

Bias: the sample is *not* exactly ``Bernoulli(q)``: every weight's mean moves only a share
``gamma(C, t)`` of the way from theta to q (0.74 at C = 8, t = 0; 0.82 at t = 2; the same
share for small and large moves and in every round measured: :data:`GAMMA`), and the joint
law of a block is further off (exact total variation of 10-weight blocks: 0.47 at C = 8,
t = 0). ``debias`` codes the target ``theta + (q - theta) / gamma`` instead, so that each
weight's mean lands on q (measured slope 1.00-1.01), for about ``1 / gamma**2`` times the
KL and no more CPU. FedPM's server only averages the samples weight by weight, so the mean
is what matters; at C = 8, oversampling (t) buys less than debiasing at t = 0 and doubles
the CPU per bit. Measured on MNIST-10k FedPM uploads (see ``bench/results/uplink.md``).

Bytes (inside the mask upload's frame, codec 3; little-endian): ``index bits u8 | blocks u32``
then the ``B`` indices, ``C + t`` bits each, most significant bit first, zero-padded to a
byte. The frame's CRC is seeded with a digest of the key and of ``theta_hat``: a flipped
bit, or decoding under another key (round, client) or another ``theta``, is refused.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib

import numpy as np
from numpy.random import Philox

from fedmask.wire.frame import Frame

INDEX_BITS_MAX = 24
_HEAD = struct.Struct("<BI")  # index bits, blocks
DOMAIN_CANDIDATES, DOMAIN_ORDER, DOMAIN_PRIOR, DOMAIN_SELECT = 1, 2, 3, 4
KL_FLOOR_BITS = 1e-6  # a whole upload closer to theta than this is sampled from theta, no blocks
Q_CLIP = 1e-12
_CHUNK_UNIFORMS = 1 << 21  # candidate uniforms generated at a time (4 MiB of uint16)

# gamma(C, t): the slope of E[y] - theta on q - theta, measured on real LeNet-300-100 FedPM
# uploads of rounds 1, 5, 10 and 15 (the rounds agree within 0.01; C = 12 within 0.02-0.05,
# from few blocks). ``debias`` codes theta + (q - theta) / gamma.
GAMMA: dict[tuple[int, int], float] = {
    (4, 0): 0.623, (4, 1): 0.712, (4, 2): 0.783, (4, 3): 0.840, (4, 4): 0.884,
    (6, 0): 0.696, (6, 1): 0.755, (6, 2): 0.807, (6, 3): 0.847, (6, 4): 0.882,
    (8, 0): 0.739, (8, 1): 0.783, (8, 2): 0.824, (8, 3): 0.858, (8, 4): 0.888,
    (10, 0): 0.772, (10, 1): 0.806, (10, 2): 0.837,
    (12, 0): 0.797, (12, 1): 0.831, (12, 2): 0.867, (12, 3): 0.898, (12, 4): 0.937,
}


def kl_bits(q: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Per-weight KL(Bernoulli(q) || Bernoulli(theta)) in bits (0 log 0 = 0)."""
    q, t = np.asarray(q, np.float64), np.asarray(theta, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        one = np.where(q > 0, q * np.log2(q / t), 0.0)
        zero = np.where(q < 1, (1 - q) * np.log2((1 - q) / (1 - t)), 0.0)
    return one + zero


def quantised_theta(theta: np.ndarray) -> np.ndarray:
    """The 16-bit thresholds m (theta_hat = m / 65536) both ends derive from theta."""
    return np.clip(np.rint(np.asarray(theta, np.float64) * 65536.0), 1, 65535).astype(np.uint16)


def debiased_target(q: np.ndarray, theta: np.ndarray, gamma: float) -> np.ndarray:
    """``theta + (q - theta) / gamma``, clipped to [1e-3, 1 - 1e-3] (or to q where q is more
    extreme): coded instead of q, its sample's mean lands near q. A clipped weight keeps part
    of its bias."""
    lo, hi = np.minimum(q, 1e-3), np.maximum(q, 1 - 1e-3)
    return np.clip(np.clip(theta + (q - theta) / gamma, lo, hi), Q_CLIP, 1 - Q_CLIP)


def gamma_of(block_bits: int, extra_bits: int) -> float:
    """The measured shrink of (C, t), for debiasing (ValueError for a pair not measured)."""
    if (block_bits, extra_bits) not in GAMMA:
        raise ValueError(f"rec-block-bits, rec-extra-bits: debiasing needs a measured pair {sorted(GAMMA)}, got "
                         f"{(block_bits, extra_bits)}; set rec-debias = false for others")
    return GAMMA[block_bits, extra_bits]


def key_words(parts: tuple[object, ...]) -> np.ndarray:
    """Philox's 128-bit key: a hash of the upload's key (bytes, ints and strings)."""
    text = "|".join(part.hex() if isinstance(part, bytes) else repr(part) for part in parts)
    return np.frombuffer(hashlib.sha256(text.encode()).digest()[:16], dtype="<u8").copy()


def plan(q: np.ndarray, theta: np.ndarray, block_bits: int, extra_bits: int,
         debias: bool) -> tuple[np.ndarray, int]:
    """The target coded (q, or q debiased) and the number of blocks, ceil(KL / C)."""
    if block_bits < 1 or extra_bits < 0 or block_bits + extra_bits > INDEX_BITS_MAX:
        raise ValueError(f"rec-block-bits, rec-extra-bits: expected C >= 1, t >= 0, C + t <= {INDEX_BITS_MAX}, "
                         f"got {(block_bits, extra_bits)}")
    target = debiased_target(q, theta, gamma_of(block_bits, extra_bits)) if debias else np.clip(q, Q_CLIP, 1 - Q_CLIP)
    kl = float(kl_bits(target, np.clip(theta, 2.0 ** -16, 1 - 2.0 ** -16)).sum())
    return target, 0 if kl <= KL_FLOOR_BITS else min(q.size, math.ceil(kl / block_bits))


class Coder:
    """What both ends derive from (theta, key, blocks, index bits): the keyed order, the
    blocks and the candidate streams."""

    def __init__(self, theta: np.ndarray, words: np.ndarray, blocks: int, index_bits: int):
        self.words, self.blocks, self.index_bits, self.K = words, blocks, index_bits, 1 << index_bits
        self.thresholds = quantised_theta(theta)
        self.theta_hat = self.thresholds / 65536.0
        n = theta.size
        if blocks == 0:
            return
        # keyed order: a stable sort of 16-bit keyed values (a radix sort; ties keep index order)
        order = np.argsort(self._raw(DOMAIN_ORDER, 0, n).view(np.uint16)[:n], kind="stable")
        size, longer = divmod(n, blocks)
        self.steps = -(-(size + (longer > 0)) // 16)  # Philox counter steps (16 uint16) a candidate
        index = np.full((blocks, self.steps * 16), n, dtype=np.int64)  # n: padding, never a 1
        if longer:  # the first ``longer`` blocks hold one weight more
            index[:longer, :size + 1] = order[:longer * (size + 1)].reshape(longer, size + 1)
        index[longer:, :size] = order[longer * (size + 1):].reshape(blocks - longer, size)
        self.index = index
        self.block_thresholds = np.append(self.thresholds, np.uint16(0))[index]

    def _raw(self, domain: int, counter: int, uniforms: int) -> np.ndarray:
        return Philox(key=self.words, counter=[counter, 0, domain, 0]).random_raw(-(-uniforms // 4))

    def crc_seed(self) -> int:
        """What the upload's CRC is seeded with: the key and theta_hat."""
        return zlib.crc32(self.thresholds.tobytes(), zlib.crc32(self.words.tobytes()))

    def prior_sample(self) -> np.ndarray:
        n = self.thresholds.size
        return self._raw(DOMAIN_PRIOR, 0, n).view(np.uint16)[:n] < self.thresholds

    def select(self, target: np.ndarray, private_seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(the chosen candidate of each block, the sample): Gumbel-max over the log weights."""
        t = self.theta_hat
        ratio = (np.log(target) - np.log1p(-target) - np.log(t) + np.log1p(-t)).astype(np.float32)
        n, K, width = self.thresholds.size, self.K, self.steps * 16
        ratios = np.append(ratio, np.float32(0))[self.index]
        noise = Philox(key=key_words((self.words.tobytes(), "select", int(private_seed))),
                       counter=[0, 0, DOMAIN_SELECT, 0])
        y = np.zeros(n + 1, dtype=bool)
        indices = np.zeros(self.blocks, np.int64)
        per_chunk = max(1, _CHUNK_UNIFORMS // (K * width))
        for b0 in range(0, self.blocks, per_chunk):
            c = min(per_chunk, self.blocks - b0)
            u = self._raw(DOMAIN_CANDIDATES, b0 * K * self.steps, c * K * width).view(np.uint16)
            z = u.reshape(c, K, width) < self.block_thresholds[b0:b0 + c, None, :]
            logw = np.matmul(z, ratios[b0:b0 + c, :, None])[:, :, 0]
            uniform = ((noise.random_raw(c * K) >> np.uint64(11)) + 0.5) * 2.0 ** -53
            k = np.argmax(logw - np.log(-np.log(uniform.reshape(c, K))), axis=1)
            indices[b0:b0 + c] = k
            y[self.index[b0:b0 + c]] = z[np.arange(c), k]
        return indices, y[:n]

    def rebuild(self, indices: np.ndarray) -> np.ndarray:
        """The chosen candidate of each block, and only that one, from the counter."""
        n, width = self.thresholds.size, self.steps * 16
        y = np.zeros(n + 1, dtype=bool)
        stream = Philox(key=self.words, counter=[0, 0, DOMAIN_CANDIDATES, 0])
        at = 0
        for b, k in enumerate(indices.tolist()):
            start = (b * self.K + k) * self.steps
            stream.advance(start - at)
            y[self.index[b]] = stream.random_raw(width // 4).view(np.uint16) < self.block_thresholds[b]
            at = start + self.steps
        return y[:n]


def encode(q: np.ndarray, theta: np.ndarray, words: np.ndarray, block_bits: int, extra_bits: int, debias: bool,
           private_seed: int) -> tuple[bytes, np.ndarray, int]:
    """(the payload, the sample, the CRC seed) for probabilities ``q`` against ``theta``
    (flat float64), under the key ``words``."""
    target, blocks = plan(q, theta, block_bits, extra_bits, debias)
    index_bits = block_bits + extra_bits
    coder = Coder(theta, words, blocks, index_bits)
    if blocks == 0:
        indices, y = np.zeros(0, np.int64), coder.prior_sample()
    else:
        indices, y = coder.select(target, private_seed)
    bits = (indices[:, None] >> np.arange(index_bits)[::-1]) & 1
    payload = _HEAD.pack(index_bits, blocks) + np.packbits(bits.astype(np.uint8).ravel()).tobytes()
    return payload, y, coder.crc_seed()


def read(payload: bytes, theta: np.ndarray, words: np.ndarray, frame: Frame) -> tuple[Coder, np.ndarray]:
    """The coder and the indices of a payload, checked within bounds (the frame's error
    names the field); the CRC is the caller's, seeded with :meth:`Coder.crc_seed`."""
    if len(payload) < _HEAD.size:
        raise frame.error("relative-entropy header", f"{_HEAD.size} bytes", f"{len(payload)} bytes")
    index_bits, blocks = _HEAD.unpack_from(payload)
    if not 1 <= index_bits <= INDEX_BITS_MAX:
        raise frame.error("index bits", f"1..{INDEX_BITS_MAX}", index_bits)
    if blocks > theta.size:
        raise frame.error("blocks", f"at most {theta.size} (one per weight)", blocks)
    size = (blocks * index_bits + 7) // 8
    if len(payload) != _HEAD.size + size:
        raise frame.error("length", f"{_HEAD.size + size} payload bytes for {blocks} blocks", f"{len(payload)} bytes")
    bits = np.unpackbits(np.frombuffer(payload, np.uint8, offset=_HEAD.size))
    if bits[blocks * index_bits:].any():
        raise frame.error("padding", "zero bits", bits[blocks * index_bits:].tolist())
    indices = bits[:blocks * index_bits].reshape(blocks, index_bits).astype(np.int64) @ \
        (1 << np.arange(index_bits)[::-1])
    return Coder(theta, words, blocks, index_bits), indices


def sample_of(coder: Coder, indices: np.ndarray) -> np.ndarray:
    """The sample a payload stands for (after its CRC was checked)."""
    return coder.rebuild(indices) if coder.blocks else coder.prior_sample()
