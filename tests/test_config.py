"""Tests for fedmask.config and the CLI's refusal of bad configs before Ray starts."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedmask.config import SCHEMA, ConfigError, load, parse_override, resolve

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- resolve


def test_defaults_resolve_to_schema_defaults():
    """resolve({}) returns every key with its schema default, and the defaults pass the checks."""
    config = resolve({})
    assert config == {k: s.default for k, s in SCHEMA.items()}
    assert config["method"] == "fedpm" and config["num-rounds"] == 20


def test_given_values_override_defaults():
    """Given keys replace defaults; ints given for float keys become floats."""
    config = resolve({"num-rounds": 3, "lr": 1, "method": "edge-popup"})
    assert config["num-rounds"] == 3 and config["method"] == "edge-popup"
    assert config["lr"] == 1.0 and isinstance(config["lr"], float)


def test_unknown_key_lists_valid_keys_and_suggests_close_match():
    """An unknown key names itself, suggests the close match and lists the valid keys."""
    with pytest.raises(ConfigError) as info:
        resolve({"num-round": 5})
    message = str(info.value)
    assert "'num-round'" in message and "did you mean 'num-rounds'" in message
    assert all(key in message for key in SCHEMA)


def test_unknown_key_without_close_match_has_no_suggestion():
    """A key like nothing in the schema still lists valid keys, without a bogus hint."""
    with pytest.raises(ConfigError, match="valid keys") as info:
        resolve({"zzzzqqq": 1})
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("key, value", [
    ("num-rounds", "5"), ("num-rounds", 5.0), ("num-rounds", True), ("seed", False),
    ("lr", "0.1"), ("lr", True), ("method", 3), ("dataset", ["mnist"]), ("eval-mask", None),
])
def test_wrong_type_names_the_key(key, value):
    """A value of the wrong type (str/float/bool for int, ...) raises ConfigError naming the key."""
    with pytest.raises(ConfigError, match=f"'{key}'.*expected"):
        resolve({key: value})


@pytest.mark.parametrize("key, value", [
    ("density", 0.0), ("density", 1.5), ("density", -0.1), ("lr", -0.1), ("lr", 0.0),
    ("num-clients", 0), ("num-rounds", -1), ("seed", -1), ("momentum", 1.0), ("test-fraction", 1.0),
    ("fedpm-eps", 0.5), ("dataset", "imagenet"), ("model", "vgg"), ("method", "fedprox"),
    ("method", "module:"), ("method", ":Class"), ("partitioner", "random"), ("init", "xavier"),
    ("device", "tpu"), ("lr", float("nan")),
])
def test_impossible_value_names_the_key(key, value):
    """An impossible value raises ConfigError naming the key and what it expects."""
    with pytest.raises(ConfigError, match=f"'{key}'.*expected"):
        resolve({key: value})


def test_more_clients_per_round_than_clients_is_refused():
    """clients-per-round > num-clients raises ConfigError naming clients-per-round."""
    with pytest.raises(ConfigError, match="'clients-per-round'"):
        resolve({"num-clients": 3, "clients-per-round": 4})
    assert resolve({"num-clients": 3, "clients-per-round": 3})["clients-per-round"] == 3


def test_plugin_method_is_accepted():
    """A 'module:Class' method passes the config check (it is loaded later)."""
    assert resolve({"method": "my.module:MyAgg"})["method"] == "my.module:MyAgg"


def test_infinite_learning_rate_is_refused():
    """lr = inf is not a usable learning rate and should be refused."""
    with pytest.raises(ConfigError, match="'lr'"):
        resolve({"lr": float("inf")})


# ---------------------------------------------------------------- overrides and files


@pytest.mark.parametrize("text, expected", [
    ("num-rounds=5", ("num-rounds", 5)),
    ('method="edge-popup"', ("method", "edge-popup")),
    ("dataset=mnist", ("dataset", "mnist")),
    ("lr=1e-3", ("lr", 0.001)),
    ("data-dir=/tmp/x y", ("data-dir", "/tmp/x y")),
    (" num-rounds =7", ("num-rounds", 7)),
    ("method=pkg.mod:Cls", ("method", "pkg.mod:Cls")),
])
def test_parse_override_reads_toml_else_string(text, expected):
    """--set values are TOML when they parse, else the raw string."""
    key, value = parse_override(text)
    assert (key, value) == expected
    assert type(value) is type(expected[1])


@pytest.mark.parametrize("text", ["num-rounds", "=5", "  =5", ""])
def test_parse_override_without_key_or_equals_is_refused(text):
    """--set without '=' or without a key raises ConfigError."""
    with pytest.raises(ConfigError, match="key=value"):
        parse_override(text)


def test_parse_override_strips_bare_string_value():
    """Spaces around '=' are ignored for bare strings as they are for keys and TOML values."""
    assert parse_override("dataset = mnist") == ("dataset", "mnist")


def test_load_applies_overrides_after_file(tmp_path):
    """load() reads the TOML file and --set overrides win over it."""
    path = write(tmp_path, 'method = "fedpm"\nnum-rounds = 3\nlr = 0.5\n')
    config = load(path, ["num-rounds=5", 'method="edge-popup"', "dataset=mnist"])
    assert config["num-rounds"] == 5 and config["method"] == "edge-popup"
    assert config["dataset"] == "mnist" and config["lr"] == 0.5
    assert load(path)["num-rounds"] == 3


def test_load_checks_override_values(tmp_path):
    """A bad --set value is refused like a bad file value, naming the key."""
    path = write(tmp_path, "num-rounds = 3\n")
    with pytest.raises(ConfigError, match="'num-rounds'"):
        load(path, ["num-rounds=many"])
    with pytest.raises(ConfigError, match="num-round"):
        load(path, ["num-round=4"])


@pytest.mark.parametrize("text", ["num-rounds = 3\n[extra]\nlr = 0.1\n", "fedpm = { eps = 0.1 }\n"])
def test_nested_tables_rejected(tmp_path, text):
    """Tables (headers or inline) are refused: the config is one flat table."""
    with pytest.raises(ConfigError, match="flat table"):
        load(write(tmp_path, text))


def test_missing_file_is_config_error(tmp_path):
    """A config path that does not exist raises ConfigError naming it."""
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "nope.toml")


def test_invalid_toml_is_config_error(tmp_path):
    """A file that is not TOML raises ConfigError saying so."""
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "num-rounds = = 3\n"))


def test_directory_path_is_config_error(tmp_path):
    """A config path that is a directory raises ConfigError, not an OSError."""
    with pytest.raises(ConfigError):
        load(tmp_path)


def test_non_utf8_file_is_config_error(tmp_path):
    """A binary (non-UTF-8) config file raises ConfigError."""
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe num-rounds = 3\n")
    with pytest.raises(ConfigError):
        load(path)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_resolve(path):
    """Every configs/*.toml loads and resolves."""
    config = load(path)
    assert config.keys() == SCHEMA.keys()


# ---------------------------------------------------------------- CLI


# Runs the CLI as `python -m fedmask.cli` would, then reports whether Ray was ever imported.
CLI_WRAPPER = """
import runpy, sys
sys.argv = ["fedmask"] + sys.argv[1:]
code = 0
try:
    runpy.run_module("fedmask.cli", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    code = exit.code
print("RAY-IMPORTED" if "ray" in sys.modules else "NO-RAY")
sys.exit(code)
"""


def run_cli(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", CLI_WRAPPER, "run", *args, "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    return out, time.monotonic() - start


def test_cli_bad_config_exits_2_before_ray(tmp_path):
    """A bad key makes `fedmask run` exit 2 and name the key on stderr, without importing Ray."""
    path = write(tmp_path, "num-round = 3\n")
    out, _ = run_cli(tmp_path, str(path))
    assert out.returncode == 2, out.stderr
    assert "num-round" in out.stderr and "num-rounds" in out.stderr
    assert out.stdout.strip() == "NO-RAY"
    assert not re.search(r"\bray\b", out.stderr, re.IGNORECASE)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_cli_gpu_share_without_cuda_exits_2(tmp_path, capsys):
    """num-gpus > 0 on a machine without CUDA exits 2 naming num-gpus, before Ray is imported."""
    from fedmask import cli

    path = write(tmp_path, 'dataset = "digits"\nnum-clients = 2\nclients-per-round = 2\n')
    ray_before = "ray" in sys.modules
    code = cli.main(["run", str(path), "--set", "num-gpus=0.5", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "num-gpus" in capsys.readouterr().err
    assert ray_before or "ray" not in sys.modules
    assert not (tmp_path / "out").exists()
