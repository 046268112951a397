"""A researcher's own network and data: ``model = "module:function"`` and ``dataset =
"module:function"`` from a module outside the repository, checked before the start; and the
story of issue 30: run it, compare it with FedPM from another folder, read the plot."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import fedmask
from fedmask import cli, report
from fedmask.config import ConfigError, resolve
from fedmask.core.data import DataError
from fedmask.preflight import check_before_start

LAB = '''
import torch
from torch import nn


def two_layer(input_shape, num_classes):
    """A two-layer network of layers fedmask masks."""
    width = int(torch.tensor(input_shape).prod())
    return nn.Sequential(nn.Flatten(), nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, num_classes))


def tensors():
    """Three Gaussian blobs in 12 dimensions: 480 train and 120 test samples."""
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(3, 12, generator=g)
    y = torch.randint(0, 3, (600,), generator=g)
    x = centers[y] + torch.randn(600, 12, generator=g)
    return x[:480], y[:480], x[480:], y[480:]
'''


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """A folder outside the repository with the researcher's module; the module is forgotten after."""
    folder = tmp_path / "lab"
    folder.mkdir()
    names: list[str] = []

    def write(name: str, source: str) -> Path:
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return folder

    monkeypatch.setattr(sys, "path", list(sys.path))  # plug-in loading adds the working directory
    monkeypatch.chdir(folder)
    yield write
    for name in names:
        sys.modules.pop(name, None)


def test_own_model_on_own_tensors_then_compare_with_fedpm_from_another_folder(lab, tmp_path, monkeypatch, capsys):
    """The 'done when' of issue 30: a 2-round federation of a two-layer model on the user's own
    tensors, from a module outside the repository; FedPM's own MLP on the same tensors; then
    `fedmask compare` of both from a folder where the module cannot be imported, and the plot
    of accuracy against total bytes (uplink + downlink) written."""
    lab("ownlab", LAB)
    base = {"dataset": "ownlab:tensors", "num-clients": 4, "clients-per-round": 4, "num-rounds": 2}
    mine = fedmask.simulate({**base, "model": "ownlab:two_layer", "tracker": "tensorboard"}, engine="inprocess",
                            out=tmp_path / "runs" / "mine")
    fedpm = fedmask.simulate(base, engine="inprocess", out=tmp_path / "runs" / "fedpm-mlp")
    assert mine.finished and fedpm.finished and mine.accuracy[-1] > 0.5
    assert mine.rounds[0]["num_params"] == 12 * 32 + 32 + 32 * 3 + 3  # the two layers, masked
    sys.modules.pop("ownlab")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "lab" not in p and p not in ("", ".")])
    plot = elsewhere / "compare.png"
    assert cli.main(["compare", str(tmp_path / "runs"), "--format", "md", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "model=ownlab:two_layer" in out and "model=mlp" in out and "ownlab" not in sys.modules
    settings = report.group_runs(report.find_runs([tmp_path / "runs"]))
    fig = report.plot(settings, plot)
    _, by_bytes = fig.axes
    for line, setting in zip(by_bytes.get_lines(), settings):
        (run,) = setting.runs
        sent = np.cumsum([r["uplink_payload_bytes"] + r["downlink_payload_bytes"] for r in run.rounds])
        assert np.allclose(line.get_xdata(), sent) and np.allclose(line.get_ydata(), run.accuracy)
    assert plot.stat().st_size > 0
    # and in TensorBoard: accuracy whose steps are the cumulative bytes both ways
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "mine" / "tensorboard"))
    events.Reload()
    sent = np.cumsum([r["uplink_payload_bytes"] + r["downlink_payload_bytes"] for r in mine.rounds])
    logged = events.Scalars("vs_total_bytes/accuracy")
    assert [e.step for e in logged] == sent.tolist()
    assert [e.value for e in logged] == pytest.approx(mine.accuracy, rel=1e-6)


BAD_MODELS = {
    "missing": ("", "nowhere_lab:build", "cannot load plug-in 'nowhere_lab:build': ModuleNotFoundError"),
    "not-callable": ("build = 3\n", "badlab:build", "is a int; expected a function"),
    "raises": ("def build(shape, classes):\n    raise RuntimeError('no GPU')\n", "badlab:build",
               "raised RuntimeError: no GPU"),
    "not-a-module": ("def build(shape, classes):\n    return 'net'\n", "badlab:build",
                     "returned a str; expected a torch.nn.Module"),
    "nothing-to-mask": ("from torch import nn\ndef build(shape, classes):\n    return nn.Sequential(nn.Flatten())\n",
                        "badlab:build", "without Linear or Conv2d layers"),
    "unmaskable": ("from torch import nn\ndef build(shape, classes):\n"
                   "    return nn.Sequential(nn.Flatten(), nn.LayerNorm(64), nn.Linear(64, classes))\n",
                   "badlab:build", "trainable tensors that masks cannot carry: 1.weight"),
    "wrong-output": ("from torch import nn\ndef build(shape, classes):\n"
                     "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))\n",
                     "badlab:build", "two test samples gave (2, 3)"),
}


@pytest.mark.parametrize("case", BAD_MODELS, ids=list(BAD_MODELS))
def test_a_model_plugin_that_cannot_work_is_refused_before_the_start(lab, case):
    """Each problem with a model plug-in is a ConfigError naming 'model' and the plug-in, from
    the checks before any round (on digits: 64 inputs, 10 classes)."""
    source, name, message = BAD_MODELS[case]
    if source:
        lab("badlab", source)
    with pytest.raises(ConfigError, match="config key 'model'") as info:
        check_before_start(resolve({"model": name}))
    assert message in str(info.value) and "\n" not in str(info.value)


BAD_DATA = {
    "raises": ("def load():\n    raise OSError('disk')\n", "raised OSError: disk"),
    "three-parts": ("import numpy as np\ndef load():\n"
                    "    return np.zeros((4, 2)), np.zeros(4, int), np.zeros((2, 2))\n",
                    "expected a tuple (x_train, y_train, x_test, y_test)"),
    "float-labels": ("import numpy as np\ndef load():\n    x = np.zeros((4, 2))\n"
                     "    return x, np.zeros(4), x, np.zeros(4, int)\n", "y_train must hold class labels"),
    "lengths": ("import numpy as np\ndef load():\n    x = np.zeros((4, 2))\n"
                "    return x, np.zeros(3, int), x, np.zeros(4, int)\n", "with N > 0; got shapes (4, 2) and (3,)"),
    "shapes": ("import numpy as np\ndef load():\n    return np.zeros((4, 2)), np.zeros(4, int), np.zeros((4, 3)), "
               "np.zeros(4, int)\n", "train samples are (2,) but test samples (3,)"),
    "nan": ("import numpy as np\ndef load():\n    x = np.full((4, 2), np.nan)\n"
            "    return x, np.zeros(4, int), x, np.zeros(4, int)\n", "x_train holds NaN or inf"),
}


@pytest.mark.parametrize("case", BAD_DATA, ids=list(BAD_DATA))
def test_a_dataset_plugin_that_cannot_work_is_refused_before_the_start(lab, case):
    source, message = BAD_DATA[case]
    lab(f"data_{case.replace('-', '_')}", source)
    with pytest.raises(DataError, match="config key 'dataset'") as info:
        check_before_start(resolve({"dataset": f"data_{case.replace('-', '_')}:load", "num-clients": 2,
                                    "clients-per-round": 2}))
    assert message in str(info.value)


def test_a_missing_model_module_stops_the_command_with_exit_2(lab, capsys):
    """`fedmask run` with a model plug-in that does not import: one line naming the key, exit 2."""
    config = Path("c.toml")
    config.write_text('model = "no_such_lab_module:net"\n')
    assert cli.main(["run", str(config), "--engine", "inprocess", "--out", "out"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedmask: error: config key 'model': cannot load plug-in 'no_such_lab_module:net'")
    assert len(err.splitlines()) == 1 and not Path("out").exists()


def test_own_tensors_are_used_as_given(lab):
    """No scaling or standardising: the splits hold the function's values as float32, labels as int64."""
    from fedmask.core.data import load_dataset

    lab("given_lab", "import numpy as np\ndef load():\n    x = np.arange(24, dtype=np.uint8).reshape(6, 4) * 10\n"
                     "    return x, np.array([0, 1, 2, 0, 1, 2]), x[:2], np.array([2, 1])\n")
    splits = load_dataset.__wrapped__("given_lab:load")
    assert splits.x_train.dtype.is_floating_point and splits.x_train[1].tolist() == [40.0, 50.0, 60.0, 70.0]
    assert splits.num_classes == 3 and splits.input_shape == (4,) and splits.y_test.tolist() == [2, 1]
