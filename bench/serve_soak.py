"""Soak test of the online endpoint: closed-loop clients for minutes, then batched vs unbatched.

    python bench/serve_soak.py --bundle runs/bundle [--minutes 10] [--clients 16] [--max-batch-size 16]

Starts a private local Ray with Serve on a free loopback port and the app with the given
batching and the default overload settings. ``--clients`` threads each post a real image (MVTec AD
``bottle/test`` PNGs by default), wait for the answer and post the next, for ``--minutes``; a
sampler reads the replica's ``/v1/stats`` every ``--sample-s`` seconds. Prints requests/s,
p50/p95/p99 latency, 2xx/4xx/5xx counts (and failed connections), the forward-pass sizes seen, and
the replica's RSS at the start and end with its least-squares slope per minute. Then, unless
``--compare-s 0``, the same clients for ``--compare-s`` seconds against ``max_batch_size`` =
``--max-batch-size`` and = 1 (same ``max_ongoing_requests``), and the batched ÷ unbatched ratio.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import requests
from serve_load import bench_parser, closed_loop, deploy, load_images, local_serve

from onenip_ray.serve import ServeArgs


class Soak:
    """Closed-loop clients that record every answer's latency and status."""

    def __init__(self, url: str, images: list[bytes]) -> None:
        self.url, self.images = url, images
        self.latencies_ms: list[float] = []
        self.statuses: Counter[int] = Counter()  # 0 = no HTTP answer (connection failed)
        self.lock = threading.Lock()

    def client(self, index: int, clients: int, deadline: float) -> None:
        with requests.Session() as session:
            i = index
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    status = session.post(self.url, data=self.images[i % len(self.images)],
                                          headers={"Content-Type": "image/png"}, timeout=120).status_code
                except requests.RequestException:
                    status = 0
                with self.lock:
                    self.statuses[status] += 1
                    if status == 200:
                        self.latencies_ms.append((time.perf_counter() - start) * 1e3)
                i += clients


def sample_stats(base: str, every_s: float, stop: threading.Event, samples: list[tuple[float, dict]]) -> None:
    start = time.perf_counter()
    while True:
        try:
            samples.append((time.perf_counter() - start, requests.get(f"{base}/v1/stats", timeout=30).json()))
        except requests.RequestException:
            pass
        if stop.wait(every_s):
            return


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--minutes", type=float, default=10.0, help="soak duration")
    parser.add_argument("--clients", type=int, default=16, help="closed-loop client threads")
    parser.add_argument("--max-batch-size", type=int, default=ServeArgs.model_fields["max_batch_size"].default)
    parser.add_argument("--batch-wait-ms", type=float,
                        default=ServeArgs.model_fields["batch_wait_timeout_s"].default * 1e3)
    parser.add_argument("--request-timeout-s", type=float, default=ServeArgs.model_fields["request_timeout_s"].default,
                        help="the replica's deadline per request (504 after it)")
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between /v1/stats samples")
    parser.add_argument("--compare-s", type=float, default=60.0, help="seconds per batched / unbatched run (0 = skip)")
    args = parser.parse_args(argv)
    images = load_images(Path(args.images), 64)

    with local_serve() as (base, gpus):

        def deploy_batch(batch_size: int, max_ongoing: int | None = None) -> None:
            settings = ServeArgs(bundle=args.bundle, max_batch_size=batch_size,
                                 batch_wait_timeout_s=args.batch_wait_ms / 1e3,
                                 request_timeout_s=args.request_timeout_s)
            deploy(settings, args.replica_cpus, gpus, max_ongoing)

        deploy_batch(args.max_batch_size)
        closed_loop(f"{base}/v1/score", images, args.clients, 5.0, "warm-up")
        print(f"{len(images)} images, {args.clients} clients, {args.minutes:g} min, max_batch_size "
              f"{args.max_batch_size}, "
              f"deadline {args.request_timeout_s:g} s, {'GPU' if gpus else 'CPU'} replica ({args.replica_cpus:g} CPU)",
              flush=True)
        soak, samples, stop = Soak(f"{base}/v1/score", images), [], threading.Event()
        sampler = threading.Thread(target=sample_stats, args=(base, args.sample_s, stop, samples))
        sampler.start()
        start = time.perf_counter()
        deadline = start + args.minutes * 60
        clients = [threading.Thread(target=soak.client, args=(k, args.clients, deadline)) for k in range(args.clients)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        seconds = time.perf_counter() - start
        stop.set()
        sampler.join()
        report(soak, samples, seconds)

        if args.compare_s > 0:
            same_ongoing = 2 * (2 * args.max_batch_size + ServeArgs.model_fields["max_queued_requests"].default)
            rates = {}
            for batch_size in (args.max_batch_size, 1):
                deploy_batch(batch_size, same_ongoing)
                closed_loop(f"{base}/v1/score", images, args.clients, 5.0, "warm-up")
                run = closed_loop(f"{base}/v1/score", images, args.clients, args.compare_s, f"batch={batch_size}")
                rates[batch_size] = run.requests_per_second
                print(f"max_batch_size {batch_size:>3}: {run.requests_per_second:.2f} req/s, {run.errors} errors",
                      flush=True)
            print(f"batched / unbatched requests/s at {args.clients} clients: "
                  f"{rates[args.max_batch_size] / max(rates[1], 1e-9):.2f}x")
    return 0


def report(soak: Soak, samples: list[tuple[float, dict]], seconds: float) -> None:
    codes = soak.statuses
    p50, p95, p99 = np.percentile(soak.latencies_ms, [50, 95, 99]) if soak.latencies_ms else (float("nan"),) * 3
    total = sum(codes.values())
    print(f"requests {total}  ({total / seconds:.2f} req/s over {seconds:.0f} s)")
    print(f"latency ms (200s): p50 {p50:.0f}  p95 {p95:.0f}  p99 {p99:.0f}")
    print(f"2xx {sum(n for c, n in codes.items() if 200 <= c < 300)}  4xx "
          f"{sum(n for c, n in codes.items() if 400 <= c < 500)}  "
          f"5xx {sum(n for c, n in codes.items() if c >= 500)}  no answer {codes.get(0, 0)}  by status "
          f"{dict(sorted(codes.items()))}")
    rss = [(t, s["rss_bytes"]) for t, s in samples if s.get("rss_bytes")]
    if len(rss) >= 2:
        t, r = np.array([x for x, _ in rss]) / 60.0, np.array([y for _, y in rss]) / 2**20
        slope = np.polyfit(t, r, 1)[0]
        print(f"replica RSS MiB: start {r[0]:.0f}  end {r[-1]:.0f}  min {r.min():.0f}  max {r.max():.0f}  "
              f"slope {slope:+.2f} MiB/min over {len(rss)} samples; peak "
              f"{samples[-1][1]['peak_rss_bytes'] / 2**20:.0f}")
    if samples:
        passes = samples[-1][1]["forward_passes"]
        images = sum(int(k) * v for k, v in passes.items())
        print(f"forward passes: {sum(passes.values())} for {images} images (mean "
              f"{images / max(sum(passes.values()), 1):.2f} per pass); "
              f"sizes {passes}")


if __name__ == "__main__":
    raise SystemExit(main())
