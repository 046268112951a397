"""``fedmask run --ray-address``: a simulation across a Ray cluster of two nodes on 127.0.0.1.

The cluster is started with ``ray start`` (head, then a second node that joins it) and
stopped by stopping exactly the processes this test started (``ray stop`` would stop
every Ray on the machine).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile

import pytest

from tests.deployment import BIN, ROOT, Processes, free_port

pytestmark = pytest.mark.deployment

NODE_IDS = """
import json, ray
from ray._private.state import state
ray.init(address="{address}", logging_level="ERROR", log_to_driver=False)
actors = state.actor_table(None)
print("ACTOR-NODES", json.dumps(sorted({{a["Address"]["NodeID"] for a in actors.values()
                                         if a.get("ActorClassName", "").endswith("ClientAppActor")}})))
print("CLUSTER-NODES", json.dumps(sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])))
"""


def test_fedmask_run_on_a_two_node_ray_cluster(tmp_path):
    """Two rounds, two clients, one CPU per Ray node: clients run on both nodes of the cluster."""
    procs = Processes(tmp_path / "logs")
    ray = str(BIN / "ray")
    temp = tempfile.mkdtemp(prefix="fmray", dir="/tmp")  # Ray's socket paths must stay short
    address = f"127.0.0.1:{free_port()}"
    try:
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp}"]
        procs.run("ray-head", [ray, "start", "--head", f"--port={address.split(':')[1]}",
                               "--include-dashboard=false", *common], timeout=120)
        procs.run("ray-node", [ray, "start", f"--address={address}", *common], timeout=120)
        run_dir = tmp_path / "run"
        procs.run("fedmask", [sys.executable, "-m", "fedmask.cli", "run", str(ROOT / "configs/quickstart.toml"),
                              "--set", "num-clients=2", "--set", "clients-per-round=2", "--set", "num-rounds=2",
                              "--ray-address", address, "--out", str(run_dir)], timeout=240)
        rows = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2]
        assert all(r["clients"] == 2 and r["failures"] == 0 for r in rows)
        out = procs.run("ray-state", [sys.executable, "-c", NODE_IDS.format(address=address)], timeout=60).stdout
        lines = dict(line.split(" ", 1) for line in out.splitlines() if line.startswith(("ACTOR-", "CLUSTER-")))
        cluster, used = json.loads(lines["CLUSTER-NODES"]), json.loads(lines["ACTOR-NODES"])
        assert len(cluster) == 2 and sorted(used) == sorted(cluster), out
    finally:
        left = procs.stop(grace=10)
        shutil.rmtree(temp, ignore_errors=True)
    assert not left, f"processes left running: {left}"
