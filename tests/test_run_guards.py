"""The command line under stress (issue 15, items 6, 7, 9, 10, 11): every bad input ends in
one line and exit 2 before any work; the run directory never mixes two runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedmask import cli
from fedmask.config import load
from fedmask.record.checkpoint import Checkpoint, config_digest

ROOT = Path(__file__).resolve().parents[1]
BASE = 'dataset = "digits"\nnum-clients = 2\nclients-per-round = 2\nnum-rounds = 2\n'


def _config(tmp_path: Path, text: str = "", name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(BASE + text)
    return path


def _refused(capsys, argv: list[str], *words: str) -> str:
    """The CLI exits 2 with one line on stderr that holds ``words``, and no traceback."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedmask: error:"), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    return err


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- item 11: ranges


@pytest.mark.parametrize("setting, key", [("num-rounds = 1000000000000", "num-rounds"),
                                          ("fault-slow-delay = 1e308", "fault-slow-delay"),
                                          ("seed = 18446744073709551616", "seed"),
                                          ("seed = 9223372036854775808", "seed"),
                                          ("num-clients = 99999999999999999999", "num-clients")])
def test_absurd_values_are_refused(tmp_path, capsys, setting, key):
    path = tmp_path / "absurd.toml"
    path.write_text(setting + "\n")
    _refused(capsys, ["run", str(path), "--out", str(tmp_path / "o")], key)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("setting, words", [
    ("num-clients = 2000", ("num_clients", "1438")),
    ('num-clients = 200\npartitioner = "dirichlet"\ndirichlet-alpha = 0.05',
     ("no samples in every draw", "200 clients", "dirichlet-alpha")),
])
def test_a_client_without_samples_exits_2_naming_it(tmp_path, capsys, setting, words):
    """More clients than the 1438 training digits, or a Dirichlet setting that leaves a client
    nothing in every draw, is refused before any round with one line naming the cause and
    the keys to change (the check partitions every client at once)."""
    path = tmp_path / "empty.toml"
    path.write_text(f'dataset = "digits"\nnum-rounds = 1\nclients-per-round = 2\n{setting}\n')
    _refused(capsys, ["run", str(path), "--out", str(tmp_path / "o"), "--engine", "inprocess"], *words)
    assert not (tmp_path / "o" / "rounds.jsonl").exists()


# ---------------------------------------------------------------- item 9: cores


def test_more_cpus_than_cores_exits_2_before_ray(tmp_path):
    wrapper = textwrap.dedent("""
        import sys
        from fedmask import cli
        code = cli.main(sys.argv[1:])
        print("RAY-IMPORTED" if "ray" in sys.modules else "NO-RAY")
        sys.exit(code)
    """)
    cores = os.cpu_count() or 1
    out = subprocess.run([sys.executable, "-c", wrapper, "run", str(_config(tmp_path)), "--set",
                          f"num-cpus={cores + 1}", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2, out.stderr
    assert "num-cpus" in out.stderr and "Traceback" not in out.stderr
    assert out.stdout.strip() == "NO-RAY"


# ---------------------------------------------------------------- item 10: data


def _idx(path: Path, array: np.ndarray, magic: int, gz: bool = False) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        import gzip

        raw = gzip.compress(raw)
    path.write_bytes(raw)


def _idx_folder(folder: Path, train_hw: tuple[int, int], test_hw: tuple[int, int], n: int = 40) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, (h, w) in (("train", train_hw), ("t10k", test_hw)):
        _idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, h, w)), 0x803)
        _idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, 0x801)
    return folder


def test_corrupt_gz_idx_file_exits_2(tmp_path, capsys):
    folder = tmp_path / "gz"
    folder.mkdir()
    _idx(folder / "all-images-idx3-ubyte.gz", np.zeros((20, 4, 4)), 0x803, gz=True)
    _idx(folder / "all-labels-idx1-ubyte.gz", np.arange(20) % 10, 0x801, gz=True)
    raw = bytearray((folder / "all-images-idx3-ubyte.gz").read_bytes())
    raw[10:14] = b"\xff" * 4  # the deflate stream, broken (zlib.error, not an OSError)
    (folder / "all-images-idx3-ubyte.gz").write_bytes(bytes(raw))
    config = _config(tmp_path, f'dataset = "idx"\ndata-dir = "{folder}"\n'.replace('dataset = "digits"\n', ""))
    config.write_text(config.read_text().replace('dataset = "digits"\n', ""))
    _refused(capsys, ["run", str(config), "--out", str(tmp_path / "o")], "all-images-idx3-ubyte.gz")


@pytest.mark.parametrize("train_hw, test_hw, word", [((6, 6), (8, 8), "test images"),
                                                     ((0, 0), (0, 0), "non-empty")])
def test_bad_image_sizes_exit_2(tmp_path, capsys, train_hw, test_hw, word):
    folder = _idx_folder(tmp_path / "idx", train_hw, test_hw)
    config = _config(tmp_path, f'data-dir = "{folder}"\n')
    config.write_text(config.read_text().replace('"digits"', '"idx"'))
    _refused(capsys, ["run", str(config), "--out", str(tmp_path / "o")], word)


@pytest.mark.parametrize("method", ["fedpm", "fedavg"])
def test_images_too_small_for_the_conv_model_exit_2(tmp_path, capsys, method):
    folder = _idx_folder(tmp_path / "idx", (3, 3), (3, 3))
    config = _config(tmp_path, f'data-dir = "{folder}"\nmodel = "conv6"\nmethod = "{method}"\n')
    config.write_text(config.read_text().replace('"digits"', '"idx"'))
    _refused(capsys, ["run", str(config), "--out", str(tmp_path / "o")], "'model'")


# ---------------------------------------------------------------- item 10: plug-ins

PLUGINS = {
    "syntax": "def broken(:\n",
    "name": "from fedmask import MaskAggregator\nundefined_name\n",
    "init": ("from fedmask import MaskAggregator\nclass P(MaskAggregator):\n"
             "    def __init__(self, config):\n        raise RuntimeError('no')\n"
             "    def aggregate(self, r, s, m, w):\n        return s\n"),
    **{f"state-{kind}": ("import numpy as np\nfrom fedmask import MaskAggregator\n"
                         "class P(MaskAggregator):\n    def initial_state(self, scores):\n"
                         f"        return {{k: {expr} for k, v in scores.items()}}\n"
                         "    def aggregate(self, r, s, m, w):\n        return s\n")
       for kind, expr in (("nan", "np.full(v.shape, np.nan, np.float32)"), ("object", "v.astype(object)"),
                          ("string", "v.astype(str)"), ("complex", "v.astype(np.complex64)"),
                          ("bool", "v > 0"), ("shape", "v.ravel()"))},
}


@pytest.mark.parametrize("kind", sorted(PLUGINS))
def test_a_broken_plugin_exits_2_naming_it(tmp_path, capsys, monkeypatch, kind):
    module = f"plugin_{kind.replace('-', '_')}_{os.getpid()}"
    (tmp_path / f"{module}.py").write_text(PLUGINS[kind])
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = _config(tmp_path, f'method = "{module}:P"\n')
    _refused(capsys, ["run", str(config), "--out", str(tmp_path / "o")], "'method'", module)


def test_aggregate_returning_bool_state_stops_naming_the_class():
    from fedmask import task
    from fedmask.config import resolve
    from fedmask.core.masking import get_scores
    from fedmask.methods.fedpm import FedPMAggregator
    from fedmask.record.ledger import Ledger
    from server.strategies import MaskStrategy, Start

    class BoolState(FedPMAggregator):
        def aggregate(self, server_round, state, masks, weights):
            return {k: v > 0.5 for k, v in state.items()}

    config = resolve({"num-clients": 2, "clients-per-round": 2})
    mode = task.mode_of(config, "bernoulli")
    model = task.make_model(config, task.splits_of(config), mode)
    agg = BoolState.from_config(config)
    strategy = MaskStrategy(config, Ledger(), Start(agg.initial_state(get_scores(model))), agg, mode,
                            task.ModelSpec.of(config, model, mode))
    with pytest.raises(ValueError, match="BoolState.aggregate returned bool"):
        strategy._check_state(agg.aggregate(1, strategy.state, [], []))


# ---------------------------------------------------------------- item 10: --out


def test_out_pointing_to_a_file_exits_2(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("mine")
    _refused(capsys, ["run", str(_config(tmp_path)), "--out", str(target)], "file")
    assert target.read_text() == "mine"


def test_out_holding_other_files_is_refused_without_overwrite(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    (out / "config.toml").write_text("# my own config, not a run's\n")
    _refused(capsys, ["run", str(_config(tmp_path)), "--out", str(out)], "--overwrite")
    assert (out / "config.toml").read_text() == "# my own config, not a run's\n"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    _refused(capsys, ["run", str(_config(tmp_path)), "--out", str(other)], "not empty")


# ---------------------------------------------------------------- items 6, 7: resume


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 2-round FedPM run done in-process (copied by each test that spoils it)."""
    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "run"
    assert cli.main(["run", str(_config(tmp)), "--engine", "inprocess", "--out", str(out)]) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


def _resume(run_dir: Path) -> list[str]:
    return ["run", "--resume", str(run_dir), "--engine", "inprocess"]


def test_checkpoint_names_its_config(finished_run):
    assert Checkpoint.load(finished_run).config_digest == config_digest(load(finished_run / "config.toml"))


def test_resume_refuses_a_config_edited_after_the_start(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    config = run / "config.toml"
    config.write_text(config.read_text().replace("num-rounds = 2", "num-rounds = 3"))
    _refused(capsys, _resume(run), "another config")


def test_resume_refuses_a_checkpoint_of_another_run(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    other = tmp_path / "other"
    assert cli.main(["run", str(_config(tmp_path, "seed = 7\n")), "--engine", "inprocess", "--out", str(other)]) == 0
    shutil.copy(other / "checkpoint.npz", run / "checkpoint.npz")
    capsys.readouterr()
    _refused(capsys, _resume(run), "another config")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_resume_refuses_a_damaged_checkpoint(finished_run, tmp_path, capsys, damage):
    run = _copy(finished_run, tmp_path)
    path = run / "checkpoint.npz"
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": os.urandom(len(raw)), "empty": b""}[damage])
    _refused(capsys, _resume(run), "corrupt")


@pytest.mark.parametrize("damage", ["missing a round", "no file", "wrong rounds"])
def test_resume_refuses_rounds_that_disagree_with_the_checkpoint(finished_run, tmp_path, capsys, damage):
    run = _copy(finished_run, tmp_path)
    lines = (run / "rounds.jsonl").read_text().splitlines()
    if damage == "missing a round":
        (run / "rounds.jsonl").write_text(lines[0] + "\n")
    elif damage == "no file":
        (run / "rounds.jsonl").unlink()
    else:
        (run / "rounds.jsonl").write_text("\n".join([lines[1], lines[0]]) + "\n")
    _refused(capsys, _resume(run), "rounds.jsonl")


def test_resume_before_the_first_checkpoint_starts_from_round_1(tmp_path, capsys):
    """A run stopped in round 1 (config.toml written, no checkpoint) resumes from round 1."""
    run = tmp_path / "early"
    run.mkdir()
    shutil.copy(_config(tmp_path), run / "config.toml")
    (run / "rounds.jsonl").write_text("")
    assert cli.main(_resume(run)) == 0, capsys.readouterr().err
    assert [r["round"] for r in _rounds(run)] == [1, 2]


def test_overwrite_clears_the_old_run_so_a_resume_cannot_mix_them(finished_run, tmp_path, capsys, monkeypatch):
    """--overwrite with another config, stopped in round 1 before its first checkpoint:
    nothing of the old run is left, and --resume runs the new config from round 1."""
    import server.server_app as server_app

    run = _copy(finished_run, tmp_path)
    new = _config(tmp_path, "seed = 3\n", name="new.toml")
    new.write_text(new.read_text().replace("num-rounds = 2", "num-rounds = 3"))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(server_app, "end_round", lambda run_, server_round: killed() if server_round else None)
    assert cli.main(["run", str(new), "--engine", "inprocess", "--out", str(run), "--overwrite"]) == 130
    monkeypatch.undo()
    for name in ("checkpoint.npz", "summary.json", "curves.png"):
        assert not (run / name).exists(), name
    assert load(run / "config.toml").seed == 3
    assert cli.main(_resume(run)) == 0, capsys.readouterr().err
    assert [r["round"] for r in _rounds(run)] == [1, 2, 3]
    assert Checkpoint.load(run).config_digest == config_digest(load(new))
