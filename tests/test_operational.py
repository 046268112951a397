"""Operational faults end in a clean stop that loses nothing (issue 29): poisoned dense
updates, a disk that cannot be written, a failing plug-in, hand-edited run files, a corrupt
sweep, a resumed run's downlink."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from fedmask import cli
from fedmask.config import resolve
from fedmask.faults import POISON, poisoned
from fedmask.methods.dense import aggregate_updates, state_problem
from fedmask.methods.votes import VoteRule
from fedmask.record.checkpoint import FILENAME, Checkpoint

BASE = 'dataset = "digits"\nnum-clients = 4\nclients-per-round = 4\nnum-rounds = 2\n'


def _config(tmp_path: Path, text: str = "") -> Path:
    """BASE with the keys of ``text`` set (a TOML key can be given once)."""
    given = {line.split("=")[0].strip() for line in text.splitlines() if "=" in line}
    base = "".join(line + "\n" for line in BASE.splitlines() if line.split("=")[0].strip() not in given)
    path = tmp_path / "c.toml"
    path.write_text(base + text)
    return path


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]


def _one_line(capsys, code: int, expected: int, *words: str) -> str:
    err = capsys.readouterr().err
    assert code == expected, err
    lines = [line for line in err.splitlines() if line.startswith("fedmask:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _run(tmp_path: Path, text: str, out: str = "o", *more: str) -> int:
    return cli.main(["run", str(_config(tmp_path, text)), "--engine", "inprocess", "--out", str(tmp_path / out),
                     *more])


# ---------------------------------------------------------------- item 1: poisoned dense updates


def test_a_poisoned_update_is_finite_and_blows_up_the_mean():
    """The attack is a valid upload (finite, one coordinate per tensor), and only the state check stops it."""
    update = {"w": np.array([0.1, -0.5, 0.2], np.float32), "b": np.zeros(2, np.float32)}
    crafted = poisoned(update)
    assert np.isfinite(crafted["w"]).all() and crafted["w"][1] == -POISON and np.count_nonzero(crafted["w"]) == 1
    state = {"w": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}
    mean = aggregate_updates("qsgd", state, [crafted, crafted, update, update], [1.0] * 4, 0.002)
    assert abs(mean["w"][1]) > 1e37 and state_problem(mean, state) is not None
    assert state_problem(aggregate_updates("qsgd", state, [update] * 4, [1.0] * 4, 0.002), state) is None


@pytest.mark.parametrize("kind", ["qsgd", "sign"])
def test_the_median_of_updates_holds_off_a_minority_of_poisoned_ones(kind):
    state = {"w": np.zeros(4, np.float32)}
    honest = [{"w": np.array([0.1, 0.2, -0.1, 0.3], np.float32)} for _ in range(3)]
    crafted = poisoned(honest[0])
    robust = aggregate_updates(kind, state, [*honest, crafted], [1.0] * 4, 0.5, VoteRule("median"))
    plain = aggregate_updates(kind, state, [*honest, crafted], [1.0] * 4, 0.5)
    assert np.abs(robust["w"]).max() <= 0.5
    assert kind == "sign" or np.abs(plain["w"]).max() > 1e37


@pytest.mark.parametrize("method", ["qsgd", "ef-signsgd", "fedavg"])
def test_poisoned_rounds_are_skipped_and_a_run_of_only_skipped_rounds_fails(tmp_path, capsys, method):
    code = _run(tmp_path, f'method = "{method}"\nattack = "poison"\nattack-fraction = 0.5\nlr = 0.05\n'
                          'optimizer = "sgd"\n')
    _one_line(capsys, code, 1, "every round was skipped")
    rows = _rounds(tmp_path / "o")
    assert all("more than" in row["skipped"] for row in rows)
    assert all(np.isfinite(row["loss"]) for row in rows)


def test_a_robust_rule_lets_a_compressed_baseline_learn_through_a_poisoning_client(tmp_path, capsys):
    code = _run(tmp_path, 'method = "qsgd"\nattack = "poison"\nattack-fraction = 0.25\noptimizer = "sgd"\n'
                          'lr = 0.05\nrobust-aggregation = "median"\nnum-rounds = 3\n')
    assert code == 0, capsys.readouterr().err
    rows = _rounds(tmp_path / "o")
    assert not any(row["skipped"] for row in rows) and rows[-1]["accuracy"] > 0.3


# ---------------------------------------------------------------- item 2: disks

def test_an_out_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = cli.main(["run", str(_config(tmp_path)), "--engine", "inprocess", "--out", str(blocker / "run")])
    _one_line(capsys, code, 2, "--out", "cannot write")


def test_a_disk_that_fills_mid_run_stops_cleanly_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    real_save = Checkpoint.save

    def full_at_round_2(self, run_dir):
        if self.round == 2:
            (Path(run_dir) / (FILENAME + ".tmp")).write_bytes(b"partial")  # as a write cut short would leave it
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(run_dir) / (FILENAME + ".tmp")))
        return real_save(self, run_dir)

    monkeypatch.setattr(Checkpoint, "save", full_at_round_2)
    code = _run(tmp_path, "num-rounds = 3\n")
    line = _one_line(capsys, code, 1, "round 2", "No space left on device", "--resume", str(tmp_path / "o"))
    assert FILENAME in line
    assert Checkpoint.round_of(tmp_path / "o") == 1
    monkeypatch.setattr(Checkpoint, "save", real_save)
    assert cli.main(["run", "--resume", str(tmp_path / "o"), "--engine", "inprocess"]) == 0
    assert [row["round"] for row in _rounds(tmp_path / "o")] == [1, 2, 3]
    assert not list((tmp_path / "o").glob("*.tmp*"))


# ---------------------------------------------------------------- item 3: a failing plug-in

PLUGIN = '''
import numpy as np
from fedmask import MaskAggregator, weighted_vote


class FailsInRound2(MaskAggregator):
    mask_mode = "bernoulli"

    def aggregate(self, server_round, state, masks, weights):
        if server_round == 2:
            raise RuntimeError("out of ideas")
        return {k: np.clip(v, 0.02, 0.98).astype(np.float32) for k, v in weighted_vote(masks, weights).items()}


class NaNInRound2(MaskAggregator):
    mask_mode = "bernoulli"

    def aggregate(self, server_round, state, masks, weights):
        value = np.nan if server_round == 2 else 0.5
        return {k: np.full(v.shape, value, np.float32) for k, v in state.items()}
'''


@pytest.mark.parametrize("name, words", [("FailsInRound2", ("out of ideas", "RuntimeError")),
                                         ("NaNInRound2", ("NaN",))])
def test_a_plugin_that_fails_in_round_2_stops_with_one_line_and_round_1_kept(tmp_path, capsys, monkeypatch, name,
                                                                             words):
    (tmp_path / "failing_rules.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = _run(tmp_path, f'method = "failing_rules:{name}"\nnum-rounds = 3\n')
    _one_line(capsys, code, 1, "round 2", name, "--resume", *words)
    assert [row["round"] for row in _rounds(tmp_path / "o")] == [1]
    assert Checkpoint.round_of(tmp_path / "o") == 1


# ---------------------------------------------------------------- item 4: hand-edited files


def _finished(tmp_path: Path) -> Path:
    assert _run(tmp_path, "num-rounds = 3\n") == 0
    run_dir = tmp_path / "o"
    # as if stopped after round 2: rounds.jsonl holds rounds 1-2, the checkpoint is round 2's
    rows = _rounds(run_dir)
    (run_dir / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    checkpoint = Checkpoint.load(run_dir)
    checkpoint.round = 2
    checkpoint.save(run_dir)
    (run_dir / "summary.json").unlink()
    return run_dir


def _edit_rounds(run_dir: Path, change) -> None:
    rows = _rounds(run_dir)
    change(rows[0])
    (run_dir / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _edit_checkpoint(run_dir: Path, change) -> None:
    checkpoint = Checkpoint.load(run_dir)
    change(checkpoint)
    checkpoint.save(run_dir)


EDITS = {
    "a line without elapsed_s": (lambda d: _edit_rounds(d, lambda r: r.pop("elapsed_s")), "elapsed_s"),
    "a string accuracy": (lambda d: _edit_rounds(d, lambda r: r.update(accuracy="0.9")), "accuracy"),
    "a round given as a string": (lambda d: _edit_checkpoint(d, lambda c: setattr(c, "round", "2")), "round"),
    "a round of 1.5": (lambda d: _edit_checkpoint(d, lambda c: setattr(c, "round", 1.5)), "round"),
    "an unknown outcome key": (lambda d: _edit_checkpoint(d, lambda c: c.records["outcomes"]["1"].update(
        bogus=1)), "bogus"),
    "a state of the wrong shape": (lambda d: _edit_checkpoint(d, lambda c: c.state.update(
        {"1.weight": c.state["1.weight"][:3]})), "1.weight"),
    "a missing tensor": (lambda d: _edit_checkpoint(d, lambda c: c.state.pop("1.bias")), "1.bias"),
    "a NaN state": (lambda d: _edit_checkpoint(d, lambda c: c.state["1.weight"].__setitem__((0, 0), np.nan)),
                    "NaN"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_resume_refuses_hand_edited_files_with_one_line(tmp_path, capsys, edit):
    run_dir = _finished(tmp_path)
    change, word = EDITS[edit]
    change(run_dir)
    code = cli.main(["run", "--resume", str(run_dir), "--engine", "inprocess"])
    _one_line(capsys, code, 2, word)


def test_resume_still_accepts_the_files_it_wrote(tmp_path):
    run_dir = _finished(tmp_path)
    assert cli.main(["run", "--resume", str(run_dir), "--engine", "inprocess"]) == 0
    assert [row["round"] for row in _rounds(run_dir)] == [1, 2, 3]


# ---------------------------------------------------------------- item 5: sweeps


@pytest.mark.parametrize("broken", ["sweep.json", "summary.json"])
def test_a_sweep_with_a_corrupt_json_file_stops_with_one_line(tmp_path, capsys, broken):
    config, out = _config(tmp_path), tmp_path / "sweep"
    argv = ["sweep", str(config), "--seeds", "0", "--engine", "inprocess", "--out", str(out)]
    assert cli.main(argv) == 0
    capsys.readouterr()
    target = out / "sweep.json" if broken == "sweep.json" else next(out.rglob("seed-0")) / "summary.json"
    target.write_text('{"rounds": 2, "truncated')
    _one_line(capsys, cli.main(argv), 2, str(target))


def test_compare_refuses_a_corrupt_rounds_file_with_one_line(tmp_path, capsys):
    assert _run(tmp_path, "") == 0
    capsys.readouterr()
    with (tmp_path / "o" / "rounds.jsonl").open("a") as handle:
        handle.write('{"round": 3, "accuracy": "high"}\n')
    _one_line(capsys, cli.main(["compare", str(tmp_path / "o")]), 2, "rounds.jsonl", "line 3")


# ---------------------------------------------------------------- item 8: a resumed run's downlink


def test_a_resumed_run_sends_the_state_not_float32_and_ends_where_the_whole_run_does(tmp_path):
    import server.server_app as server_app
    from clients.client_app import app
    from engines.inprocess import InProcessGrid

    config = resolve({"dataset": "digits", "num-clients": 4, "clients-per-round": 4, "num-rounds": 4})
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    server_app.run_server(InProcessGrid(app, 4), config, whole)
    real = server_app.end_round

    def stop_before_round_3(run, server_round):
        if server_round == 3:
            raise KeyboardInterrupt
        return real(run, server_round)

    server_app.end_round = stop_before_round_3
    try:
        with pytest.raises(KeyboardInterrupt):
            server_app.run_server(InProcessGrid(app, 4), config, stopped)
    finally:
        server_app.end_round = real
    server_app.run_server(InProcessGrid(app, 4), config, stopped, resume=True)
    a, b = _rounds(whole), _rounds(stopped)
    assert [r["accuracy"] for r in a] == [r["accuracy"] for r in b]
    assert b[2]["downlink_kinds"] == {"state": 4}  # nodes hold nothing after the restart: the few-valued theta
    full = 4 * 4 * b[0]["num_params"]  # what the float32 state would have cost the 4 nodes
    assert b[2]["downlink_payload_bytes"] < full / 2
    assert [r["downlink_payload_bytes"] for r in a[3:]] == [r["downlink_payload_bytes"] for r in b[3:]]
    np.testing.assert_array_equal(Checkpoint.load(whole).state["1.weight"], Checkpoint.load(stopped).state["1.weight"])


# ---------------------------------------------------------------- item 6: replayed uploads


def _replaying_app(sent: dict, partition: int = 1):
    """The real ClientApp, but the client of ``partition`` sends its first reply's arrays again
    in every later round (a replay: a valid upload, of another round)."""
    from flwr.app import Message

    from clients.client_app import app
    from fedmask.protocol.instruction import TrainInstruction

    def replaying(msg: Message, context) -> Message:
        reply = app(msg, context)
        instruction = TrainInstruction.from_flat(msg.content["config"])
        if instruction.partition_id == partition and reply.has_content():
            if "arrays" in sent:
                reply.content["arrays"] = sent["arrays"]
            else:
                sent["arrays"] = reply.content["arrays"]
        return reply

    return replaying


@pytest.mark.parametrize("settings", [{"uplink-codec": "packbits"}, {"uplink-codec": "entropy"},
                                      {"uplink-codec": "relative-entropy"}, {"method": "qsgd"},
                                      {"method": "laperm", "init": "kaiming-uniform"}])
def test_an_upload_replayed_in_a_later_round_is_refused_whatever_the_codec(tmp_path, settings):
    from engines.inprocess import InProcessGrid
    from server.server_app import run_server

    config = resolve({"dataset": "digits", "num-clients": 3, "clients-per-round": 3, "num-rounds": 3, **settings})
    run_server(InProcessGrid(_replaying_app({}), 3), config, tmp_path / "run")
    rows = _rounds(tmp_path / "run")
    assert rows[0]["failures"] == 0 and rows[0]["clients"] == 3
    for row in rows[1:]:
        assert [(f["kind"], f["partition_id"]) for f in row["failure_details"]] == [("rejected", 1)]
        assert "crc32" in row["failure_details"][0]["reason"] and row["clients"] == 2


def test_another_clients_upload_is_refused():
    """An upload bound to client 1 is refused as client 2's, in the same round."""
    from fedmask.wire.frame import Layout, WireError
    from fedmask.wire.masks import decode_masks, encode_masks

    layout = Layout((("w", (40,)),))
    masks = {"w": np.arange(40) % 3 == 0}
    blob = encode_masks(masks, layout, b"12345678", "packbits", bind=(5, 1))
    assert np.array_equal(decode_masks(blob, layout, b"12345678", bind=(5, 1))["w"], masks["w"])
    with pytest.raises(WireError, match="another round or client"):
        decode_masks(blob, layout, b"12345678", bind=(5, 2))
