"""Load check of `prd serve` (not a test): N concurrent `POST /generate` requests to a running server; prints
completed / failed and the p50 / p95 latency, exits 1 if any failed.

    .venv/bin/prd serve --weights tests/fixtures/reference/triplaneturbo_ref_A/triplane_turbo.pth --port 7861 &
    .venv/bin/python scripts/serve_load.py --url http://127.0.0.1:7861 --requests 20
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import time

import httpx
import numpy as np


def one_request(url: str, index: int, resolution: int, timeout: float) -> tuple[bool, float, str]:
    """(succeeded, seconds, error) of one request (prompt and seed vary with `index`)."""
    start = time.perf_counter()
    try:
        reply = httpx.post(f"{url}/generate?response=json", timeout=timeout,
                           json={"prompt": f"a large red ball number {index}", "seed": index, "resolution": resolution})
        ok, error = reply.status_code == 200, "" if reply.status_code == 200 else f"{reply.status_code} {reply.text[:200]}"
    except httpx.HTTPError as err:
        ok, error = False, f"{type(err).__name__}: {err}"
    return ok, time.perf_counter() - start, error


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=48)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    args = parser.parse_args()
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.requests) as pool:
        results = list(pool.map(lambda i: one_request(args.url, i, args.resolution, args.timeout), range(args.requests)))
    wall = time.perf_counter() - start
    latencies = np.array([seconds for ok, seconds, _ in results if ok])
    failed = [error for ok, _, error in results if not ok]
    print(f"{len(latencies)} completed, {len(failed)} failed of {args.requests} concurrent requests in {wall:.1f} s")
    if len(latencies):
        print(f"latency p50 {np.percentile(latencies, 50):.2f} s, p95 {np.percentile(latencies, 95):.2f} s")
    for error in failed[:5]:
        print("  failed:", error)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
