"""Flower's deployment engine for real: a SuperLink and SuperNodes as processes on 127.0.0.1,
the run started with ``flwr run``, as docs/beyond-one-machine.md ("Deployment") does it.

Each test stops every process it started (and every process those started) and asserts
that none is left.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clients.client_app import app as client_app
from engines.inprocess import InProcessGrid
from fedmask.config import resolve
from fedmask.flwr_config import app_config
from server.server_app import run_server
from tests.deployment import (
    BIN,
    ROOT,
    Processes,
    free_port,
    make_certificates,
    make_node_key,
    wait_for_port,
    write_flower_config,
)

pytestmark = pytest.mark.deployment

NODES = 3
RUN = {"num-clients": NODES, "clients-per-round": NODES, "num-rounds": 2, "method": "fedpm", "seed": 3}
RUN_CONFIG = " ".join(f"{k}={json.dumps(v)}" for k, v in RUN.items())
TIMEOUT_S = 150  # for the whole flwr run; two rounds take ~20-40 s on 2 loaded cores


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def _comparable(rows: list[dict]) -> list[dict]:
    """A round's line without what depends on timing or on the random node ids."""
    out = []
    for row in rows:
        row = {k: v for k, v in row.items() if k != "elapsed_s"}
        row["per_client"] = [{k: v for k, v in c.items() if k != "node_id"} for c in row["per_client"]]
        out.append(row)
    return out


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path / "logs", env={"FLWR_HOME": str(tmp_path / "flwr-home"),
                                              "FEDMASK_RUNS_DIR": str(tmp_path / "runs")})
    yield procs
    left = procs.stop()
    assert not left, f"processes left running: {left}"


def _superlink(procs: Processes, port: int, tls: dict[str, Path] | None, auth: bool):
    args = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation"]
    if tls is None:
        args.append("--insecure")
    else:
        args += ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]),
                 "--ssl-keyfile", str(tls["key"])]
    if auth:
        args.append("--enable-supernode-auth")
    proc = procs.start("superlink", args)
    wait_for_port(port, 30, proc)
    return proc


def _supernode(procs: Processes, name: str, link_port: int, partition: int, tls: dict[str, Path] | None,
               key: Path | None = None):
    args = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{link_port}", "--port", str(free_port()),
            "--node-config", f"partition-id={partition} num-partitions={NODES}"]
    args += ["--insecure"] if tls is None else ["--root-certificates", str(tls["ca"])]
    if key is not None:
        args += ["--auth-supernode-private-key", str(key)]
    return procs.start(name, args)


def _flwr_run(procs: Processes) -> Path:
    """``flwr run . deploy --run-config ... --stream`` from the checkout; returns the run directory."""
    before = {p.read_text() for p in (ROOT / "pyproject.toml",)}
    procs.run("flwr-run", [str(BIN / "flwr"), "run", ".", "deploy", "--run-config", RUN_CONFIG, "--stream"],
              timeout=TIMEOUT_S)
    assert {(ROOT / "pyproject.toml").read_text()} == before  # flwr run leaves the checkout as it was
    runs_dir = Path(procs.env["FEDMASK_RUNS_DIR"])
    run_dirs = sorted(runs_dir.glob("fedpm-*"))
    assert len(run_dirs) == 1, f"expected one run directory in {runs_dir}; flwr run said:\n{procs.log('flwr-run')}"
    assert (run_dirs[0] / "summary.json").exists(), procs.log("flwr-run")[-3000:]
    return run_dirs[0]


def _check_run(run_dir: Path, tmp_path: Path) -> list[dict]:
    """Two rounds, every partition trained on the node that holds it, and the ledger's bytes the
    ones an in-process run of the same config (same seed, so the same masks) sends."""
    rows = _rounds(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["clients"] == NODES and row["failures"] == 0, row
        assert sorted(c["partition_id"] for c in row["per_client"]) == list(range(NODES))
        assert len({c["node_id"] for c in row["per_client"]}) == NODES
        assert sum(c["uplink_payload_bytes"] for c in row["per_client"]) == row["uplink_payload_bytes"] > 0
    reference = tmp_path / "inprocess"
    # flwr run starts from pyproject's table (the quickstart's values), then --run-config
    run_server(InProcessGrid(client_app, NODES), resolve({**app_config(), **RUN}), reference)
    assert _comparable(rows) == _comparable(_rounds(reference))
    config = (run_dir / "config.toml").read_text()
    assert 'method = "fedpm"' in config and f"num-clients = {NODES}" in config
    return rows


def test_flwr_run_over_the_deployment_engine(processes, tmp_path):
    """SuperLink + 3 SuperNodes (each holding one partition) on 127.0.0.1; two FedPM rounds via flwr run."""
    port = free_port()
    write_flower_config(tmp_path / "flwr-home", "deploy", {"address": f"127.0.0.1:{port}", "insecure": True})
    _superlink(processes, port, tls=None, auth=False)
    for i in range(NODES):
        _supernode(processes, f"supernode-{i}", port, i, tls=None)
    _check_run(_flwr_run(processes), tmp_path)


def test_flwr_run_with_tls_and_supernode_authentication(processes, tmp_path):
    """TLS with certificates made here; SuperNode authentication: the three registered nodes run,
    a fourth whose key is not registered is refused, and the run finishes without it."""
    tls = make_certificates(tmp_path / "certs")
    port = free_port()
    write_flower_config(tmp_path / "flwr-home", "deploy",
                        {"address": f"127.0.0.1:{port}", "root-certificates": str(tls["ca"])})
    _superlink(processes, port, tls=tls, auth=True)
    keys = [make_node_key(tmp_path / "certs", f"node-{i}") for i in range(NODES + 1)]
    for i in range(NODES):  # register the first three public keys only
        processes.run(f"register-{i}", [str(BIN / "flwr"), "supernode", "register", str(keys[i][1]), "deploy"],
                      timeout=60)
    for i in range(NODES):
        _supernode(processes, f"supernode-{i}", port, i, tls=tls, key=keys[i][0])
    intruder = _supernode(processes, "intruder", port, 0, tls=tls, key=keys[NODES][0])
    _check_run(_flwr_run(processes), tmp_path)
    assert intruder.poll() is not None, "the unregistered SuperNode is still running"
    # Flower 1.41: "Exit Code: 305 ... [code: 2004] Failed to activate SuperNode."
    assert "Failed to activate SuperNode" in processes.log("intruder"), processes.log("intruder")[-2000:]
    assert "Receiving: train message" not in processes.log("intruder")
