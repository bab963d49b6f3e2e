"""Online-scoring load test: closed-loop HTTP clients against a local app, batching on and off.

    python bench/serve_load.py --bundle runs/bundle [--duration 10] [--clients 1,4,16] [--batch-size 16]

Starts a private local Ray with Serve on a free port. For each mode (batched forward passes with
``max_batch_size = --batch-size``, then 1 = one image per forward pass; both with the same
``max_ongoing_requests``, so only batching differs) and each client count, every client thread
posts an image, waits for the answer and posts the next, for ``--duration`` seconds. Prints
p50/p99 latency and requests/s per run, then the batched/unbatched requests/s ratio at the
largest client count. The replica uses the GPU when the machine has one.
"""
from __future__ import annotations

import argparse
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import requests

from onenip_ray.serve import ServeArgs, build_app

BOTTLE_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle" / "test"


@dataclass
class LoadResult:
    mode: str
    clients: int
    latencies_ms: list[float]
    errors: int
    seconds: float

    @property
    def requests_per_second(self) -> float:
        return len(self.latencies_ms) / self.seconds

    def row(self) -> str:
        p50, p99 = np.percentile(self.latencies_ms, [50, 99]) if self.latencies_ms else (float("nan"),) * 2
        return (f"{self.mode:<12} {self.clients:>7} {len(self.latencies_ms):>8} {self.requests_per_second:>8.1f} "
                f"{p50:>8.1f} {p99:>8.1f} {self.errors:>6}")


def load_images(folder: Path, limit: int) -> list[bytes]:
    """Up to ``limit`` PNG files under ``folder``; synthetic 256 px noise images when there are none."""
    files = sorted(folder.rglob("*.png"))[:limit] if folder.is_dir() else []
    if files:
        return [p.read_bytes() for p in files]
    rng = np.random.default_rng(0)
    return [cv2.imencode(".png", rng.integers(0, 256, (256, 256, 3),
                                              dtype=np.uint8))[1].tobytes() for _ in range(limit)]


def closed_loop(url: str, images: list[bytes], clients: int, duration: float, mode: str) -> LoadResult:
    """``clients`` threads, each sending its next request as soon as the previous one is answered."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + duration

    def client(index: int) -> None:
        with requests.Session() as session:
            i = index
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                response = session.post(url, data=images[i % len(images)], headers={"Content-Type": "image/png"},
                                        timeout=120)
                elapsed = (time.perf_counter() - start) * 1e3
                with lock:
                    if response.status_code == 200:
                        latencies.append(elapsed)
                    else:
                        errors[0] += 1
                i += clients

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return LoadResult(mode, clients, latencies, errors[0], time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_serve() -> Iterator[tuple[str, int]]:
    """A private local Ray with Serve on a free loopback port; yields (base URL, GPUs per replica: 0 or 1)."""
    import ray
    from ray import serve

    ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}", 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        serve.shutdown()
    finally:
        ray.shutdown()


def deploy(settings: ServeArgs, cpus: float, gpus: int, max_ongoing: int | None = None) -> None:
    """(Re)deploy the application as ``onenip`` at ``/``: one replica with ``cpus`` CPUs and ``gpus`` GPUs."""
    from ray import serve

    options = {"ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus}}
    if max_ongoing:
        options["max_ongoing_requests"] = max_ongoing
    serve.run(build_app(settings, **options), name="onenip", route_prefix="/")


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """The flags every serve bench takes: the bundle, the images sent and the replica's CPUs."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="model bundle (local or s3://)")
    parser.add_argument("--images", default=str(BOTTLE_TEST),
                        help="folder of PNGs to send (default: MVTec AD bottle/test)")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved by the replica")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per (mode, clients) run")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--batch-size", type=int, default=16, help="max_batch_size of the batched mode")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0,
                        help="batch_wait_timeout_s of the batched mode, in ms")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    images = load_images(Path(args.images), 64)

    with local_serve() as (base, gpus):
        url = f"{base}/v1/score"
        results: list[LoadResult] = []
        print(f"{len(images)} images, {args.duration:g} s per run, {'GPU' if gpus else 'CPU'} replica")
        print(f"{'mode':<12} {'clients':>7} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
        for batch_size in (args.batch_size, 1):
            mode = f"batch={batch_size}"
            settings = ServeArgs(bundle=args.bundle, max_batch_size=batch_size,
                                 batch_wait_timeout_s=args.batch_wait_ms / 1e3)
            deploy(settings, args.replica_cpus, gpus, max_ongoing=2 * args.batch_size)
            closed_loop(url, images, max(clients), min(2.0, args.duration), "warm-up")
            for n in clients:
                results.append(closed_loop(url, images, n, args.duration, mode))
                print(results[-1].row(), flush=True)
    at_most = {r.mode: r for r in results if r.clients == max(clients)}
    batched, unbatched = at_most[f"batch={args.batch_size}"], at_most["batch=1"]
    print(f"batched/unbatched requests/s at {max(clients)} clients: "
          f"{batched.requests_per_second / max(unbatched.requests_per_second, 1e-9):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
