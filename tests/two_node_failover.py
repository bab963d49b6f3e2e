"""Worker-failure recovery on a two-node Ray cluster (run by tests/test_train_scale.py).

Runs in its own process so it gets its own Ray instance (the pytest session may already hold one):

    python tests/two_node_failover.py DATA_ROOT WORK_DIR

starts ``ray.cluster_utils.Cluster`` with a head node (1 CPU) and a second node (1 CPU), trains two
Ray Train workers (1 CPU each, so one per node) for 3 epochs with a checkpoint after every epoch and
``max_failures=1``. A driver thread waits for the first committed checkpoint, then SIGKILLs one
``RayTrainWorker`` process. Writes ``WORK_DIR/result.json`` = {"meta": bundle.json, "killed": {...}}.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

RUN_NAME = "failover"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_one_worker_after_first_checkpoint(run_dir: str, killed: dict, stop: threading.Event) -> None:
    """Look the two training workers up while they start (the state API takes ~1 s), then SIGKILL
    one of them as soon as the first checkpoint is committed (the snapshot file appears)."""
    from ray.util.state import list_actors

    workers = []
    while len(workers) < 2:
        if stop.wait(0.2):
            return
        try:
            workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        except Exception:  # noqa: BLE001 - the dashboard's state API may still be starting: ask again
            workers = []
    killed["worker_nodes"] = sorted({w.node_id for w in workers})
    snapshot = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
    while not os.path.exists(snapshot):
        if stop.wait(0.02):
            return
    victim = max(workers, key=lambda a: a.pid)
    os.kill(victim.pid, signal.SIGKILL)
    killed.update(pid=victim.pid,
                  checkpoints_seen=sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_")))


def main(data_root: str, work: str) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.cluster_utils import Cluster

    from onenip_ray.config import ModelConfig, TrainConfig
    from onenip_ray.train import run_training

    temp_dir = tempfile.mkdtemp(prefix="rayc", dir="/tmp")  # short: unix sockets live here
    cluster = None
    try:
        # the dashboard serves the state API (list_actors)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "temp_dir": temp_dir, "include_dashboard": True, "dashboard_port": _free_port(),
            "object_store_memory": 128 * 2**20,
        })
        cluster.add_node(num_cpus=1, object_store_memory=128 * 2**20)
        ray.init(address=cluster.address, configure_logging=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        storage_path = os.path.join(work, "ray")
        killed: dict = {}
        stop = threading.Event()
        killer = threading.Thread(target=_kill_one_worker_after_first_checkpoint,
                                  args=(os.path.join(storage_path, RUN_NAME), killed, stop), daemon=True)
        killer.start()
        cfg = TrainConfig(data=(data_root,), out=os.path.join(work, "bundle"), num_workers=2, epochs=3, batch_size=4,
                          steps_per_epoch=0, checkpoint_every=1, max_failures=1, model=ModelConfig(image_size=64))
        t0 = time.time()
        meta = run_training(cfg, storage_path=storage_path, run_name=RUN_NAME)
        stop.set()
        killer.join(30)
        killed["train_wall_seconds"] = time.time() - t0
        with open(os.path.join(work, "result.json"), "w") as f:
            json.dump({"meta": meta, "killed": killed}, f)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
