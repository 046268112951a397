"""bench.downlink_floor: the entropy it calls a floor, and its reading of a real run."""

from __future__ import annotations

import numpy as np

from bench import downlink_floor


def test_conditional_entropy_is_zero_given_itself_and_order0_without_context() -> None:
    """Symbols equal to their context cost nothing; four equiprobable symbols cost 2 bits
    without context and still 2 bits given an independent context."""
    rng = np.random.default_rng(0)
    symbols = np.tile(np.arange(4), 25_000)
    rng.shuffle(symbols)
    assert downlink_floor.conditional_entropy(symbols, symbols) == 0.0
    assert abs(downlink_floor.conditional_entropy(symbols, None) - 2.0) < 1e-12
    independent = rng.integers(0, 3, symbols.size)
    assert abs(downlink_floor.conditional_entropy(symbols, independent) - 2.0) < 1e-3


def test_floor_of_a_partial_participation_run_is_below_what_was_sent(tmp_path, monkeypatch) -> None:
    """A digits FedPM run, 4 of 10 clients a round: every broadcast from round 6 is read, the
    nodes' states are stale by more than one round on average, the floor (counts given the
    state each node held) lies below the bits sent and above zero, and the restored class
    records nothing afterwards."""
    monkeypatch.setitem(downlink_floor.TASKS, "digits-4", ("configs/quickstart.toml", {"clients-per-round": 4},
                                                           "digits, 4 of 10 clients"))
    row = downlink_floor.measure("digits-4", "iid", seed=0, rounds=9, run_dir=tmp_path / "run")
    assert row["broadcasts"] == 4 * (9 - downlink_floor.AFTER_ROUND)
    assert row["mean_staleness"] is not None and row["mean_staleness"] > 1
    assert 0 < row["floor_bpp"] < row["sent_bpp"]
    assert row["fresh_floor_bpp"] < row["order0_bpp"]
    from fedmask.downlink import LosslessDownlink

    assert LosslessDownlink.record.__name__ == "record"
    assert LosslessDownlink.messages_for.__name__ == "messages_for"
