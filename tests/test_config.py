"""Tests for fedmask.config and the CLI's refusal of bad configs before Ray starts."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedmask.config import SCHEMA, ConfigError, RunConfig, load, parse_override, resolve

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- resolve


def test_defaults_resolve_to_schema_defaults():
    """resolve({}) returns every key with its schema default, and the defaults pass the checks."""
    config = resolve({})
    assert config.to_dict() == {k: s.default for k, s in SCHEMA.items()}
    assert config.method == "fedpm" and config.num_rounds == 20


def test_given_values_override_defaults():
    """Given keys replace defaults; ints given for float keys become floats."""
    config = resolve({"num-rounds": 3, "lr": 1, "method": "edge-popup"})
    assert config.num_rounds == 3 and config.method == "edge-popup"
    assert config.lr == 1.0 and isinstance(config.lr, float)


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


def test_plugin_method_is_loaded_when_resolved():
    """A 'module:Class' method is imported by resolve(): a working plug-in passes, a missing
    one is a ConfigError naming 'method' and the module; a receiving client (check_plugin=False)
    does not import it."""
    assert resolve({"method": "examples.mean_vote:MeanVote"}).method == "examples.mean_vote:MeanVote"
    with pytest.raises(ConfigError, match="'method'.*no_such_mod"):
        resolve({"method": "no_such_mod:MyAgg"})
    assert resolve({"method": "no_such_mod:MyAgg"}, check_plugin=False).method == "no_such_mod:MyAgg"


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
    assert config.num_rounds == 5 and config.method == "edge-popup"
    assert config.dataset == "mnist" and config.lr == 0.5
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
    assert config.to_dict().keys() == SCHEMA.keys()


# ---------------------------------------------------------------- the typed config


def test_run_config_is_frozen_and_typed():
    """A resolved config cannot be changed in place, and its attributes carry the checked values."""
    config = resolve({"num-rounds": 3, "lr": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_rounds = 4  # type: ignore[misc]
    assert config.num_rounds == 3 and isinstance(config.lr, float)
    assert config["num-rounds"] == 3
    with pytest.raises(KeyError):
        config["num_rounds"]  # snake case is the attribute, not a key


def test_every_schema_key_is_an_attribute():
    """Each kebab-case key maps to the snake-case attribute holding its default."""
    config = RunConfig()
    for key, setting in SCHEMA.items():
        assert getattr(config, key.replace("-", "_")) == setting.default


def test_record_round_trip_gives_the_same_config():
    """to_record() -> from_record() through Flower's ConfigRecord gives an equal config."""
    from flwr.app import ConfigRecord
    from flwr.common.serde import config_record_from_proto, config_record_to_proto

    config = resolve({"method": "edge-popup", "density": 0.3, "seed": 2**62, "secure-aggregation": False})
    wire = config_record_from_proto(config_record_to_proto(config.to_record()))
    assert isinstance(config.to_record(), ConfigRecord)
    assert RunConfig.from_record(wire) == config


def test_record_missing_a_key_names_it():
    """A config record without some key is refused, naming the missing key."""
    record = resolve({}).to_dict()
    del record["density"]
    with pytest.raises(ConfigError, match="density"):
        RunConfig.from_record(record)


def test_replace_checks_the_new_values():
    """replace() returns a checked copy and refuses impossible values by key."""
    config = resolve({})
    assert config.replace(num_rounds=4).num_rounds == 4 and config.num_rounds == 20
    with pytest.raises(ConfigError, match="'density'"):
        config.replace(density=2.0)


@pytest.mark.parametrize("values, key", [
    ({"method": "fedpm", "recycle-every": 2}, "recycle-every"),
    ({"method": "slot-machines"}, "init"),
    ({"method": "fedavg", "attack": "invert"}, "attack"),
    ({"method": "fedavg", "downlink-codec": "float16"}, "downlink-codec"),
    ({"method": "edge-popup", "secure-aggregation": True}, "secure-aggregation"),
])
def test_registry_restrictions_are_enforced_by_name(values, key):
    """The method registry's restrictions refuse a key's value with the method named."""
    with pytest.raises(ConfigError, match=f"'{key}'.*expected"):
        resolve(values)


def test_instruction_keys_are_not_config_keys_and_round_trip():
    """The train instruction's own fields never clash with config keys, and it round-trips."""
    from fedmask.protocol.instruction import INSTRUCTION_KEYS, TrainInstruction

    assert not set(INSTRUCTION_KEYS) & set(SCHEMA)
    instruction = TrainInstruction(resolve({"method": "biprop", "init": "kaiming-normal"}), 3, 7, "biprop")
    assert TrainInstruction.from_flat(instruction.to_flat()) == instruction
    dense = TrainInstruction(resolve({"method": "fedavg"}), 1, 0, None)
    assert TrainInstruction.from_flat(dense.to_flat()).mask_mode is None


@pytest.mark.parametrize("field, value", [("partition-id", 10), ("partition-id", -1), ("server-round", "1"),
                                          ("mask-mode", "magnitude")])
def test_bad_instruction_field_is_named(field, value):
    """An instruction with an out-of-range partition, a non-integer round or an unknown mode names the field."""
    from fedmask.protocol.instruction import TrainInstruction

    flat = TrainInstruction(resolve({}), 1, 0, "bernoulli").to_flat()
    flat[field] = value
    with pytest.raises(ConfigError, match=f"'{field}'"):
        TrainInstruction.from_flat(flat)


@pytest.mark.parametrize("text, named", [
    (None, "'run-config'"),  # missing
    (7, "'run-config'"),  # not a string
    ("{not json", "'run-config'.*not JSON"),
    ("[1, 2]", "'run-config'.*JSON list"),
    ('{"seed": 1}', "missing"),  # an object without the other keys
    ('{"seed": ' + "[" * 5000 + "]" * 5000 + "}", "'run-config'.*nests too deep"),  # RecursionError inside json
    ('{"seed": 1, "seed": 2}', "'run-config'.*twice"),
])
def test_bad_run_config_in_an_instruction_is_named(text, named):
    """The config travels as one JSON string: a missing, non-string, non-JSON, too deeply nested,
    duplicate-keyed or incomplete one raises ConfigError naming 'run-config' (or the missing
    keys), never a JSON, recursion or key error."""
    from fedmask.protocol.instruction import CONFIG_KEY, TrainInstruction

    flat = TrainInstruction(resolve({}), 1, 0, "bernoulli").to_flat()
    if text is None:
        del flat[CONFIG_KEY]
    else:
        flat[CONFIG_KEY] = text
    with pytest.raises(ConfigError, match=named):
        TrainInstruction.from_flat(flat)


def test_a_lone_surrogate_in_an_instruction_string_is_named():
    """JSON can carry a string TOML and protobuf refuse (a lone surrogate): named, not a
    UnicodeEncodeError later."""
    import json

    from fedmask.protocol.instruction import CONFIG_KEY, TrainInstruction

    flat = TrainInstruction(resolve({}), 1, 0, "bernoulli").to_flat()
    flat[CONFIG_KEY] = flat[CONFIG_KEY].replace(json.dumps(resolve({}).data_dir), '"\\ud800"')
    with pytest.raises(ConfigError, match="'data-dir'.*Unicode"):
        TrainInstruction.from_flat(flat)


def test_a_bad_config_value_in_an_instruction_names_its_key():
    """A config key with a value its check refuses is named, as in a config file."""
    import json

    from fedmask.protocol.instruction import CONFIG_KEY, TrainInstruction

    flat = TrainInstruction(resolve({}), 1, 0, "bernoulli").to_flat()
    values = json.loads(flat[CONFIG_KEY])
    values["density"] = 7.5
    flat[CONFIG_KEY] = json.dumps(values)
    with pytest.raises(ConfigError, match="'density'"):
        TrainInstruction.from_flat(flat)


def test_instruction_config_round_trips_floats_exactly():
    """A float that decimal text could round (0.1 + 0.2) comes back bit for bit."""
    from fedmask.protocol.instruction import TrainInstruction

    config = resolve({"lr": 0.1 + 0.2})
    assert TrainInstruction.from_flat(TrainInstruction(config, 1, 0, "bernoulli").to_flat()).config.lr == 0.1 + 0.2


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


# ---------------------------------------------------------------- keys a run never reads


def test_keys_the_method_never_reads_are_named_with_who_reads_them():
    """density and slots with FedPM, momentum with Adam: set, never read; the registry says
    who reads them. Read keys (edge-popup's density, SGD's momentum) are not named."""
    from fedmask.config import ignored_keys, ignored_keys_warning

    fedpm = resolve({"density": 0.3, "slots": 4, "momentum": 0.5, "fedpm-eps": 0.05})
    assert ignored_keys(fedpm) == {"density": "read by edge-popup, biprop only",
                                   "slots": "read by slot-machines only",
                                   "momentum": "read with optimizer = 'sgd' only"}
    warning = ignored_keys_warning(fedpm)
    assert warning is not None and "\n" not in warning and "density (read by edge-popup, biprop only)" in warning
    assert ignored_keys(resolve({"method": "edge-popup", "density": 0.3, "optimizer": "sgd", "momentum": 0.5})) == {}
    assert ignored_keys_warning(resolve({})) is None


def test_a_plugin_reads_the_keys_of_its_mask_mode():
    """A Bernoulli plug-in's clients read FedPM's keys (fedpm-eps is not named), not edge-popup's."""
    from fedmask.config import ignored_keys

    plug = resolve({"method": "examples.majority_momentum:MajorityMomentum", "density": 0.3, "fedpm-eps": 0.05})
    assert set(ignored_keys(plug)) == {"density"}


def test_ignored_keys_are_warned_once_at_the_start_of_a_run(tmp_path, caplog):
    import fedmask

    fedmask.simulate(ROOT / "configs" / "quickstart.toml", engine="inprocess", out=tmp_path / "r", num_rounds=1,
                     num_clients=2, clients_per_round=2, density=0.3)
    lines = [r.getMessage() for r in caplog.records if "not read" in r.getMessage()]
    assert len(lines) == 1 and "density (read by edge-popup, biprop only)" in lines[0]
