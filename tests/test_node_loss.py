"""Issue 6: a multi-node Ray cluster on this machine (head + worker nodes, `ray.cluster_utils.Cluster`)
loses worker nodes in the middle of a job.

One node lost: its worker's shard goes to the survivor, whose node finishes the job; the
replacement actor waits for a free CPU that never comes and is dropped at the end. Every node
lost: the job waits `WORKER_WAIT_SECONDS` for a worker, stops with exit 1 and keeps its parts;
a node joins, `--resume` completes it without rewriting them.
"""

from __future__ import annotations

import json

import pytest

from runner.cli.main import main
from runner.job import ray_pool
from runner.job.run import run_job
from runner.job.run_folder import read_rows
from runner.job.spec import DEMO_MODEL, load_spec

from .support import demo_rows, manifest_ids, stamps, write_manifest, write_spec

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    # The head runs the driver only (0 CPUs): every worker actor lives on a worker node.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def test_lost_nodes(cluster, tmp_path, caplog, monkeypatch, reliability):
    cluster, nodes = cluster
    manifest = write_manifest(tmp_path / "manifest.jsonl", demo_rows(2))  # 250 utterances, 9 minutes
    ids = manifest_ids(manifest)
    caplog.set_level("WARNING", logger="runner")

    # One of two worker nodes lost after the first part: the other node finishes the job.
    out = tmp_path / "one-lost"
    spec = write_spec(tmp_path / "one.yaml", model=DEMO_MODEL, manifest=manifest, output=out, shard_seconds=20)
    lost = []

    def lose_one(kind, **data):
        if kind == "shard" and not lost:
            cluster.remove_node(nodes[1], allow_graceful=False)  # raylet and its workers killed: a crash
            lost.append(nodes[1])

    result = run_job(load_spec(spec), on_event=lose_one)
    table_ids = read_rows(out, ["id"])["id"].to_pylist()
    assert lost and sorted(table_ids) == sorted(ids) and result.stats["utterances"] == len(ids)
    resent = [r for r in caplog.records if "lost with its worker" in r.getMessage()]
    assert resent, "no shard was lost with the node: the test did not test anything"
    reliability(
        "node lost",
        "`Cluster.remove_node` (no graceful shutdown) of 1 of 2 worker nodes after the first part",
        ids,
        table_ids,
        f"{len(resent)} shard(s) resent",
        "survivor finished the job, exit 0",
    )

    # Every worker node lost: exit 1 after the wait, parts kept; a new node joins and --resume completes.
    monkeypatch.setattr(ray_pool, "WORKER_WAIT_SECONDS", 20.0)
    spare = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    out = tmp_path / "all-lost"
    spec = write_spec(tmp_path / "all.yaml", model=DEMO_MODEL, manifest=manifest, output=out, shard_seconds=20)
    gone = []

    def lose_all(kind, **data):
        if kind == "shard" and not gone:
            for node in (nodes[0], spare):
                cluster.remove_node(node, allow_graceful=False)
            gone.append(True)

    with pytest.raises(ray_pool.WorkersLost, match="no worker is left"):
        run_job(load_spec(spec), on_event=lose_all)
    kept = stamps(out)
    assert kept and not (out / "_SUCCESS").exists()
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    assert main(["--quiet", "run", str(spec), "--resume"]) == 0
    after = stamps(out)
    assert all(after[name] == stamp for name, stamp in kept.items())
    shards = len(json.loads((out / "job.json").read_text())["plan"])
    table_ids = read_rows(out, ["id"])["id"].to_pylist()
    assert sorted(table_ids) == sorted(ids) and len(after) == shards
    reliability(
        "all worker nodes lost",
        "both worker nodes removed after the first part; a node added; `--resume`",
        ids,
        table_ids,
        f"{shards - len(kept)} (the unfinished ones)",
        f"exit 1 after {ray_pool.WORKER_WAIT_SECONDS:.0f} s without a worker, {len(kept)} parts kept; "
        "resume completed, exit 0",
    )
