"""`python -m server.cluster wait`: wait until a deployed cluster answers, from as many replicas as expected (what
`make serve-cluster` runs after `serve run --non-blocking`, which returns before the replicas are up)."""

from __future__ import annotations

import argparse
import sys
import time

import httpx

from .relay import REPLICA_HEADER


def wait(url: str, replicas: int, timeout_s: float) -> set[str]:
    """Poll GET /readyz until `replicas` different replicas have answered 200; return their names."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/readyz", timeout=5)
            if response.status_code == 200 and response.headers.get(REPLICA_HEADER.decode()):
                seen.add(response.headers[REPLICA_HEADER.decode()])
                if len(seen) >= replicas:
                    return seen
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url}: {len(seen)} of {replicas} replicas ready after {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.cluster", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    waiting = commands.add_parser("wait", help="wait until the cluster's replicas answer")
    waiting.add_argument("--url", default="http://127.0.0.1:8000")
    waiting.add_argument("--replicas", type=int, default=2)
    waiting.add_argument("--timeout", type=float, default=300.0, help="seconds")
    args = parser.parse_args(argv)
    try:
        names = wait(args.url, args.replicas, args.timeout)
    except TimeoutError as exc:
        sys.exit(str(exc))
    print(f"{args.url}: {len(names)} replicas ready ({', '.join(sorted(names))})")


if __name__ == "__main__":
    main()
