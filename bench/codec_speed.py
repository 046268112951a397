"""How long the uplink codec takes for one LeNet-300-100 upload coded against FedPM's theta.

    python -m bench.codec_speed

For a theta with 11 and with 101 values (FedPM with the prior reset and 10 or 100 clients
a round), it codes 10 sampled masks and decodes them back, 7 times, and prints the fastest
time per upload (the machine is shared: the minimum is the least disturbed) and the mean
upload size. To compare two versions of the library, run this file with each version's
checkout first on the path, in turn, alternating, on a quiet machine
(``PYTHONPATH=<checkout> python bench/codec_speed.py``).
"""

from __future__ import annotations

import time

import numpy as np

from fedmask.wire import masks as codec
from fedmask.wire.frame import Layout

SHAPES = (("1.bias", (300,)), ("1.weight", (300, 784)), ("3.bias", (100,)), ("3.weight", (100, 300)),
          ("5.bias", (10,)), ("5.weight", (10, 100)))
FINGERPRINT = b"codecspd"


def main() -> None:
    rng = np.random.default_rng(0)
    layout = Layout(SHAPES)
    line = [f"format {codec.FORMAT_VERSION}"]
    for clients in (10, 100):
        theta = {name: (rng.integers(0, clients + 1, shape) + 1) / (clients + 2) for name, shape in SHAPES}
        masks = [{name: rng.random(shape) < theta[name] for name, shape in SHAPES} for _ in range(10)]
        codec.encode_masks(masks[0], layout, FINGERPRINT, "entropy", theta)  # per-broadcast tables, built once
        encode_s, decode_s = [], []
        for _ in range(7):
            start = time.perf_counter()
            blobs = [codec.encode_masks(m, layout, FINGERPRINT, "entropy", theta) for m in masks]
            encode_s.append((time.perf_counter() - start) / len(masks))
            start = time.perf_counter()
            decoded = [codec.decode_masks(b, layout, FINGERPRINT, theta) for b in blobs]
            decode_s.append((time.perf_counter() - start) / len(masks))
        assert all(np.array_equal(d[name], m[name]) for d, m in zip(decoded, masks, strict=True) for name, _ in SHAPES)
        line.append(f"{clients + 1} values: encode {min(encode_s) * 1e3:.2f} ms, decode {min(decode_s) * 1e3:.2f} ms, "
                    f"{np.mean([b.size for b in blobs]):,.0f} B")
    print(" | ".join(line))


if __name__ == "__main__":
    main()
