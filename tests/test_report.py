"""Tests for comparing runs (fedmask.report, `fedmask compare`), the Python API, trackers and `fedmask list`."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tomli_w

import fedmask
from fedmask import cli, report
from fedmask.config import ConfigError, resolve

ROOT = Path(__file__).resolve().parents[1]
TINY = {"num-clients": 3, "clients-per-round": 3, "num-rounds": 2}


def fake_run(path: Path, accuracy: list[float], uplink: list[int], **config) -> Path:
    """A run directory written by hand: config.toml, rounds.jsonl and summary.json with known numbers."""
    path.mkdir(parents=True)
    resolved = resolve({"num-rounds": len(accuracy), **config}, check_plugin=False)
    (path / "config.toml").write_text(tomli_w.dumps(resolved.to_dict()))
    rows = [{"round": i + 1, "accuracy": a, "loss": 1.0 - a, "clients": 3, "failures": 0, "num_params": 1000,
             "uplink_payload_bytes": u, "uplink_message_bytes": u + 50, "downlink_payload_bytes": 10 * u,
             "downlink_message_bytes": 10 * u + 50, "uplink_bpp": u / 1000, "downlink_bpp": u / 100,
             "elapsed_s": float(i + 1)} for i, (a, u) in enumerate(zip(accuracy, uplink))]
    (path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"rounds": len(rows), "wall_s": float(len(rows))}))
    return path


@pytest.fixture
def two_settings(tmp_path):
    """fedpm over seeds 0, 1 and edge-popup over seed 0, in one folder tree."""
    fake_run(tmp_path / "a" / "s0", [0.5, 0.8, 0.9], [100, 100, 100], seed=0)
    fake_run(tmp_path / "a" / "s1", [0.7, 0.85, 0.95], [200, 100, 100], seed=1)
    fake_run(tmp_path / "b", [0.6, 0.7, 0.75], [50, 50, 50], method="edge-popup", seed=0)
    return tmp_path


def test_runs_are_grouped_by_config_without_the_seed(two_settings):
    """Two fedpm seeds form one setting, edge-popup another; labels name method and codecs."""
    settings = report.group_runs(report.find_runs([two_settings]))
    assert [len(s.runs) for s in settings] == [2, 1]
    assert settings[0].seeds == [0, 1]
    # the default codecs: uplink-codec 'auto' is relative-entropy for FedPM, entropy for edge-popup
    assert settings[0].label.startswith("fedpm (relative-entropy up, lossless down)")
    assert settings[1].label.startswith("edge-popup (entropy up, lossless down)")


def test_summary_means_stds_and_targets(two_settings):
    """Mean and sample std over seeds; rounds and uplink bytes to the target; unreached is None."""
    rows = report.summarise(report.group_runs(report.find_runs([two_settings])), target=0.9)
    fedpm, popup = rows
    assert fedpm["final_accuracy"]["mean"] == pytest.approx(0.925)
    assert fedpm["final_accuracy"]["std"] == pytest.approx(np.std([0.9, 0.95], ddof=1))
    assert fedpm["rounds_to_target"]["mean"] == pytest.approx(3.0)  # both reach 0.9 in round 3
    assert fedpm["uplink_to_target"]["mean"] == pytest.approx((300 + 400) / 2)
    assert fedpm["downlink_bytes"]["mean"] == pytest.approx(10 * 350)
    assert popup["rounds_to_target"] == {"mean": None, "std": None, "n": 0}
    assert popup["final_accuracy"]["std"] is None  # one seed: no spread


def test_formats_carry_the_numbers(two_settings):
    """Markdown shows mean ± std in percent and '–' for an unreached target; CSV has the raw columns."""
    rows = report.summarise(report.group_runs(report.find_runs([two_settings])), target=0.9)
    md = report.format_rows(rows, "md", 0.9)
    assert "92.50 ± 3.54" in md and "| –" in md
    header, *records = list(csv.reader(io.StringIO(report.format_rows(rows, "csv", 0.9))))
    first = dict(zip(header, records[0]))
    assert float(first["final_accuracy_mean"]) == pytest.approx(0.925) and first["seeds"] == "0 1"
    with pytest.raises(ValueError, match="format"):
        report.format_rows(rows, "html", 0.9)


def test_plot_lines_are_the_seed_means(two_settings, tmp_path):
    """The plotted lines hold the mean accuracy per round and against the mean cumulative uplink bytes."""
    settings = report.group_runs(report.find_runs([two_settings]))
    fig = report.plot(settings, tmp_path / "out" / "cmp.png")
    assert (tmp_path / "out" / "cmp.png").stat().st_size > 0
    by_round, by_bytes = fig.axes
    line = by_round.get_lines()[0]
    assert list(line.get_xdata()) == [1, 2, 3]
    assert np.allclose(line.get_ydata(), [0.6, 0.825, 0.925])
    assert np.allclose(by_bytes.get_lines()[0].get_xdata(), [1650, 2750, 3850])  # up + down (10x up), summed
    assert "uplink + downlink" in by_bytes.get_xlabel()
    assert by_bytes.get_xscale() == "log"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [s.label for s in settings]


def test_a_seed_run_twice_in_one_setting_is_flagged_and_counted_once(tmp_path, capsys):
    """A Ray run and an in-process run of seed 0 (same config) are one seed: the mean is over
    seeds 0 and 1, not three runs; the table and a warning name the duplicate."""
    fake_run(tmp_path / "ray" / "s0", [0.5, 0.8], [100, 100], seed=0)
    fake_run(tmp_path / "inprocess" / "s0", [0.5, 0.8], [100, 100], seed=0)
    fake_run(tmp_path / "ray" / "s1", [0.6, 0.9], [100, 100], seed=1)
    (setting,) = report.group_runs(report.find_runs([tmp_path]))
    assert setting.seeds == [0, 1] and len(setting.duplicates) == 1
    (row,) = report.summarise([setting], target=0.9)
    assert row["final_accuracy"]["n"] == 2 and row["final_accuracy"]["std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert "| 2 (+1 duplicate run) |" in report.format_rows([row], "md", 0.9)
    assert cli.main(["compare", str(tmp_path), "--format", "csv"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "seed 0 is in 2 runs" in err and "counted once" in err


def test_labels_say_what_the_lossless_downlink_sent(tmp_path):
    """A lossless run that sent the float32 state to some nodes is labelled with the share;
    one that never did is 'lossless down'; the float32 codec is named as such."""
    def with_kinds(path: Path, kinds: list[dict[str, int]]) -> None:
        rows = [json.loads(line) for line in (path / "rounds.jsonl").read_text().splitlines()]
        (path / "rounds.jsonl").write_text("".join(json.dumps({**r, "downlink_kinds": k}) + "\n"
                                                   for r, k in zip(rows, kinds)))

    with_kinds(fake_run(tmp_path / "plug", [0.5, 0.6, 0.7], [1, 1, 1], lr=0.2), [{"replay": 4}, {"full": 4},
                                                                                  {"full": 3, "replay": 1}])
    with_kinds(fake_run(tmp_path / "fedpm", [0.5, 0.6, 0.7], [1, 1, 1]), [{"replay": 4}, {"standalone": 4},
                                                                           {"standalone": 4}])
    fake_run(tmp_path / "f32", [0.5, 0.6, 0.7], [1, 1, 1], **{"downlink-codec": "float32"})
    labels = [s.label for s in report.group_runs(report.find_runs([tmp_path]))]
    assert any(label.startswith("fedpm (relative-entropy up, float32 down)") for label in labels)
    assert any(label.startswith("fedpm (relative-entropy up, lossless down, 58% of broadcasts float32)")
               for label in labels)
    assert any(label.startswith("fedpm (relative-entropy up, lossless down) ") for label in labels)


def test_plugin_parameters_label_settings_beside_builtin_runs(tmp_path):
    """A plug-in's plugin.<field> keys, which FedPM's config lacks, name the settings they differ in."""
    fake_run(tmp_path / "fedpm", [0.5, 0.6], [1, 1])
    for lr in (0.1, 0.2):
        fake_run(tmp_path / f"plug-{lr}", [0.5, 0.6], [1, 1], method="somewhere:Rule", **{"plugin.server-lr": lr})
    labels = sorted(s.label for s in report.group_runs(report.find_runs([tmp_path])))
    assert labels[0].startswith("fedpm") and "plugin" not in labels[0]
    assert labels[1].startswith("somewhere:Rule") and labels[1].endswith("plugin.server-lr=0.1")
    assert labels[2].endswith("plugin.server-lr=0.2")


def test_compare_cli_prints_a_table_and_writes_a_plot(two_settings, tmp_path, capsys):
    """`fedmask compare DIR --format md --plot F` exits 0, prints the table and writes the plot."""
    code = cli.main(["compare", str(two_settings), "--format", "md", "--target", "0.9",
                     "--plot", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert code == 0 and "92.50 ± 3.54" in out and (tmp_path / "p.png").exists()
    assert cli.main(["compare", str(tmp_path / "nothing-here")]) == 2


def test_reading_a_plugin_run_never_imports_the_plugin(tmp_path, monkeypatch, capsys):
    """load_run and `fedmask compare`, from a folder where the plug-in is not importable, read a
    plug-in run; a module that would raise on import, put on the path, is never imported."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "tripwire_rule.py").write_text("raise RuntimeError('reading results imported the plug-in')\n")
    monkeypatch.syspath_prepend(str(plugins))
    fake_run(tmp_path / "runs" / "plug", [0.5, 0.6], [100, 100], method="tripwire_rule:Rule")
    fake_run(tmp_path / "runs" / "gone", [0.5, 0.7], [100, 100], method="no_such_module_anywhere:Rule")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert fedmask.load_run(tmp_path / "runs" / "plug").config.method == "tripwire_rule:Rule"
    code = cli.main(["compare", str(tmp_path / "runs"), "--format", "md", "--plot", str(elsewhere / "p.png")])
    out = capsys.readouterr().out
    assert code == 0 and "tripwire_rule:Rule" in out and "no_such_module_anywhere:Rule" in out
    assert "tripwire_rule" not in sys.modules and (elsewhere / "p.png").exists()


# ---------------------------------------------------------------- Python API


def test_simulate_returns_what_the_run_directory_holds(tmp_path):
    """simulate() runs in-process and returns rounds, summary and final state equal to load_run()'s."""
    result = fedmask.simulate(ROOT / "configs" / "quickstart.toml", engine="inprocess", out=tmp_path / "r",
                              **{k.replace("-", "_"): v for k, v in TINY.items()})
    again = fedmask.load_run(tmp_path / "r")
    assert result.finished and len(result.rounds) == 2 and result.config.num_rounds == 2
    assert result.rounds == again.rounds and result.summary == again.summary
    assert result.summary["final_accuracy"] == result.accuracy[-1]
    assert set(result.final_state) == set(again.final_state) and result.final_state
    assert all(np.array_equal(result.final_state[k], again.final_state[k]) for k in result.final_state)
    assert result.cumulative_uplink_bytes[-1] == result.summary["uplink_payload_bytes"]


def test_simulate_checks_before_running(tmp_path):
    """A bad override is a ConfigError naming the key, and nothing is written."""
    with pytest.raises(ConfigError, match="'density'"):
        fedmask.simulate({"method": "edge-popup"}, density=1.5, engine="inprocess", out=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_tensorboard_tracker_mirrors_rounds(tmp_path):
    """tracker = 'tensorboard' writes the rounds' accuracy and bytes as scalars, per round."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = fedmask.simulate({**TINY}, tracker="tensorboard", engine="inprocess", out=tmp_path / "r")
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    events.Reload()
    for field in ("accuracy", "uplink_payload_bytes", "train/train-loss"):
        logged = [(e.step, e.value) for e in events.Scalars(field)]
        expected = [(r["round"], r["train"]["train-loss"] if "/" in field else r[field]) for r in result.rounds]
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert np.allclose([v for _, v in logged], [v for _, v in expected], rtol=1e-6)


def test_mlflow_tracker_mirrors_rounds(tmp_path):
    """tracker = 'mlflow' logs each round's accuracy as a metric history in RUN_DIR/mlflow.db."""
    mlflow = pytest.importorskip("mlflow")
    result = fedmask.simulate({**TINY}, tracker="mlflow", engine="inprocess", out=tmp_path / "r")
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'r' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("fedmask").experiment_id])
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "accuracy")]
    assert history == [(r["round"], r["accuracy"]) for r in result.rounds]


# ---------------------------------------------------------------- fedmask list


def test_list_describes_every_name(capsys):
    """Every method, model, dataset, partitioner, codec and attack has a one-line description."""
    from fedmask.catalog import catalog

    sections = catalog()
    assert {"methods", "models", "datasets", "partitioners", "uplink codecs", "downlink codecs",
            "attacks"} <= set(sections)
    assert all(text.strip() for entries in sections.values() for text in entries.values())
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for entries in sections.values() for name in entries)
