"""bench/fair.py chooses on the validation split only (issue 28: nothing reported is selected
on the test split), gives every method the same number of trials, and counts bytes both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import fair


def _fake_run(path: Path, validation: list[float], test: float, total: float = 1000.0, rounds: int = 6) -> None:
    path.mkdir(parents=True)
    rows = [{"round": r + 1, "accuracy": validation[r], "clients": 10, "num_params": 100,
             "uplink_payload_bytes": 100, "total_payload_bytes_per_client": total, "skipped": False}
            for r in range(rounds)]
    (path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({
        "rounds": rounds, "test_accuracy": test, "evaluated_on": "validation", "num_params": 100,
        "mean_total_payload_bytes_per_client_round": total, "fedavg_payload_bytes_per_client_round": 800.0}))


def test_every_method_gets_the_same_number_of_trials_on_every_task():
    sizes = {len(candidates) for task in fair.TASKS for _, candidates in fair.grids(task).values()}
    assert len(sizes) == 1 and all(set(fair.grids(task)) == set(fair.GRIDS) for task in fair.TASKS)


def test_every_run_holds_out_a_validation_split():
    assert "validation-fraction=0.1" in fair.cell_sets("mnist", "iid", 5, 0)


def test_tuning_picks_the_best_validation_score_not_the_best_test_score(tmp_path, monkeypatch):
    def no_new_runs(*args, **kwargs):
        raise AssertionError("every trial was already on disk")

    monkeypatch.setattr(fair, "run_fedmask", no_new_runs)
    _, candidates = fair.GRIDS["fedavg"]
    for i, (name, _) in enumerate(candidates):
        best_on_validation = i == 2
        validation = [0.9 if best_on_validation else 0.5] * 6
        test = 0.1 if best_on_validation else 0.99  # the test split would pick any other
        path = fair.run_path(tmp_path, "mnist", "iid", "5ep", "fedavg", "tune", fair.slug(name), "seed-0")
        _fake_run(path, validation, test)
    chosen, sets, trials = fair.tune(tmp_path, "mnist", "iid", 5, "fedavg", 0, 6)
    assert chosen == candidates[2][0] and sets == candidates[2][1]
    assert len(trials) == len(candidates)


def test_the_score_is_the_mean_of_the_last_five_validation_rounds(tmp_path):
    _fake_run(tmp_path / "r", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], 0.7)
    run = fair.read_run(tmp_path / "r")
    assert run["score"] == pytest.approx(0.3) and run["test"] == 0.7
    assert run["total_bits_per_param"][-1] == pytest.approx(6 * 8 * 1000 / 100)


def test_final_runs_are_kept_per_chosen_candidate(tmp_path, monkeypatch):
    """A rerun whose tuning picks another candidate (a widened grid) must not reuse the final
    runs of the earlier winner: each candidate's finals live in their own folders."""
    paths: list[Path] = []
    monkeypatch.setattr(fair, "ensure", lambda path, *args: paths.append(path) or None)
    (first, first_sets), (second, second_sets) = fair.GRIDS["fedavg"][1][:2]
    for sets in (first_sets, second_sets):
        fair.finals(tmp_path, "mnist", "iid", 1, "fedavg", sets, seeds=[0, 1, 2], tune_seed=0, rounds=3)
    finals_first, finals_second = paths[1:3], paths[4:6]
    assert all(fair.slug(first) in str(p) for p in finals_first)
    assert not set(finals_first) & set(finals_second)


def test_target_is_a_miss_when_no_mask_configuration_reaches_30x():
    """The target needs both: within 1 point and 30x fewer bytes. Masks that are close in
    accuracy but all below 30x are a miss, named as such, never left 'not judged'."""
    def row(method, test, below):
        return {"method": method, "test": (test, 0.1), "validation": (test, 0.1), "below_fedavg": below,
                "width": 1.0, "candidate": "c"}

    close_but_costly = {"rows": [row("fedavg", 91.5, 1.0), row("fedpm", 91.4, 19.7), row("edge-popup", 92.0, 22.1)]}
    assert fair.target(close_but_costly).startswith("**MISS**") and "22.1x" in fair.target(close_but_costly)
    cheap_and_close = {"rows": [row("fedavg", 91.5, 1.0), row("fedpm", 91.0, 50.0)]}
    assert fair.target(cheap_and_close).startswith("**PASS**")


def test_the_target_judges_the_mask_configuration_validation_chose_not_test():
    """Of two mask configurations at 30x, the one with the higher validation score is judged,
    though the other's test score would pass: the verdict is a MISS naming the chosen one."""
    def row(method, test, validation, below, width=1.0):
        return {"method": method, "test": (test, 0.1), "validation": (validation, 0.1), "below_fedavg": below,
                "width": width, "candidate": "c"}

    result = {"rows": [row("fedavg", 91.5, 91.0, 1.0), row("fedpm", 91.4, 85.0, 40.0),
                       row("edge-popup", 88.0, 87.0, 35.0, width=2.0)]}
    verdict = fair.target(result)
    assert verdict.startswith("**MISS**") and "edge-popup width 2" in verdict


def test_render_writes_the_page_again_from_its_json_with_the_recorded_options(tmp_path, monkeypatch):
    """``--render`` rebuilds NAME.md from NAME.json alone, with the seeds and rounds the run's
    command recorded, and says it was rendered again."""
    monkeypatch.setattr(fair, "run_fedmask", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    for name, _ in fair.GRIDS["fedavg"][1]:
        _fake_run(fair.run_path(tmp_path, "mnist", "iid", "1ep", "fedavg", "tune", fair.slug(name), "seed-0"),
                  [0.5] * 6, 0.4)
    assert fair.main(["--tasks", "mnist", "--partitions", "iid", "--epochs", "1", "--methods", "fedavg",
                      "--seeds", "0", "--rounds", "6", "--widths", "", "--out", str(tmp_path), "--name", "wide"]) == 0
    (tmp_path / "wide.md").unlink()
    assert fair.main(["--out", str(tmp_path), "--name", "wide", "--render"]) == 0
    text = (tmp_path / "wide.md").read_text()
    assert "Rendered again from `wide.json`" in text and "100 clients, 10 a round, 6 rounds" in text
    assert "40.00 ± 0.00" in text and "over seeds 0." in text


def test_a_named_report_reuses_the_folder_runs_and_leaves_the_main_table(tmp_path, monkeypatch):
    """``--name`` writes NAME.md beside fair.md from the same kept runs (a second selection of
    cells must neither rerun them nor overwrite the first report)."""
    def no_new_runs(*args, **kwargs):
        raise AssertionError("every trial was already on disk")

    monkeypatch.setattr(fair, "run_fedmask", no_new_runs)
    for name, _ in fair.GRIDS["fedavg"][1]:
        _fake_run(fair.run_path(tmp_path, "mnist", "iid", "1ep", "fedavg", "tune", fair.slug(name), "seed-0"),
                  [0.5] * 6, 0.4)
    (tmp_path / "fair.md").write_text("the main table\n")
    args = ["--tasks", "mnist", "--partitions", "iid", "--epochs", "1", "--methods", "fedavg", "--seeds", "0",
            "--rounds", "6", "--widths", "", "--out", str(tmp_path), "--name", "wide"]
    assert fair.main(args) == 0
    assert (tmp_path / "fair.md").read_text() == "the main table\n"
    assert "40.00 ± 0.00" in (tmp_path / "wide.md").read_text()
    assert (tmp_path / "wide_mnist_iid_1ep.png").exists() and (tmp_path / "wide.json").exists()


def test_the_headline_picks_the_mask_row_by_validation_not_by_test():
    def row(method, test, validation, below, width=1.0):
        return {"method": method, "test": (test, 0.1), "validation": (validation, 0.1), "below_fedavg": below,
                "width": width, "candidate": "c"}

    rows = [row("fedavg", 91.5, 91.0, 1.0), row("qsgd+ef-qsgd-down", 90.0, 89.0, 12.0),
            row("fedpm", 95.0, 80.0, 40.0), row("edge-popup", 90.5, 90.0, 35.0, width=2.0)]
    line = fair.headline([{"task": "mnist", "partition": "iid", "epochs": 1, "rows": rows}]).splitlines()[-1]
    assert "edge-popup x2: 90.50 ± 0.10, 35.0x" in line and "fedpm" not in line
    assert "qsgd+ef-qsgd-down: 90.00" in line and line.endswith("| PASS |")


def test_the_readmes_headline_table_is_the_committed_fair_benchmark():
    """The README's comparison is regenerated, not retyped: its table is bench.fair's
    headline of the committed results."""
    from bench.common import ROOT

    results = json.loads((ROOT / "bench" / "results" / "fair" / "fair.json").read_text())["results"]
    assert len(results) == 4
    assert fair.headline(results) in (ROOT / "README.md").read_text()


def test_choices_from_an_earlier_report_run_only_that_candidates_finals(tmp_path, monkeypatch):
    """``--choices``: the candidate an earlier report chose on validation is rerun with every
    seed, and no other candidate is tried (the tuning is not repeated)."""
    grid = fair.GRIDS["fedavg"][1]
    picked, picked_sets = grid[2]
    trials = [{"candidate": picked, "score": 0.9, "skipped": 0}]
    earlier = {"results": [{"task": "mnist", "partition": "iid", "epochs": 1,
                            "tuning": {"fedavg": {"chosen": picked, "trials": trials}}}],
               "machine": {"source_digest_start": "abc"}}
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    ran: list[list[str]] = []

    def fake(config, sets, path, rounds, engine):
        ran.append(sets)
        _fake_run(path, [0.5] * rounds, 0.4, rounds=rounds)
        return type("Run", (), {"error": None})()

    monkeypatch.setattr(fair, "run_fedmask", fake)
    args = ["--tasks", "mnist", "--partitions", "iid", "--epochs", "1", "--methods", "fedavg", "--seeds", "0,1",
            "--rounds", "6", "--widths", "", "--out", str(tmp_path / "out"), "--choices",
            str(tmp_path / "earlier.json")]
    assert fair.main(args) == 0
    assert len(ran) == 2 and all(set(picked_sets) <= set(sets) for sets in ran)
    report = json.loads((tmp_path / "out" / "fair.json").read_text())
    assert report["results"][0]["tuning"]["fedavg"]["chosen"] == picked
    assert report["machine"]["choices_source"] == "abc"


def test_choices_without_this_cell_stop_with_one_line(tmp_path):
    (tmp_path / "earlier.json").write_text(json.dumps({"results": [], "machine": {}}))
    with pytest.raises(SystemExit, match="no choice for fedavg on mnist iid"):
        fair.main(["--tasks", "mnist", "--partitions", "iid", "--epochs", "1", "--methods", "fedavg",
                   "--out", str(tmp_path / "out"), "--choices", str(tmp_path / "earlier.json")])


def test_the_frontier_counts_a_wider_network_per_width1_parameter():
    """A width-2 run's curve is per parameter of its own (larger) model; on the frontier it
    must be per parameter of the width-1 model, or it would look as cheap as width 1."""
    narrow = {"width": 1.0, "num_params": 100, "curves": [{"bits": [1.0, 2.0]}]}
    wide = {"width": 2.0, "num_params": 220, "curves": [{"bits": [1.0, 2.0]}, {"bits": [0.5, 1.0]}]}
    assert fair.width1_bits(narrow, [narrow, wide]) == [[1.0, 2.0]]
    assert fair.width1_bits(wide, [narrow, wide]) == [[2.2, 4.4], [1.1, 2.2]]


def test_replot_draws_the_figures_from_the_json_alone(tmp_path):
    row = {"method": "fedpm", "width": 1.0, "num_params": 100,
           "curves": [{"validation": [0.5, 0.6], "bits": [1.0, 2.0]}]}
    result = {"task": "mnist", "partition": "iid", "epochs": 1, "rows": [row]}
    (tmp_path / "wide.json").write_text(json.dumps({"results": [result], "machine": {}}))
    assert fair.main(["--out", str(tmp_path), "--name", "wide", "--replot"]) == 0
    assert (tmp_path / "wide_mnist_iid_1ep.png").stat().st_size > 0
