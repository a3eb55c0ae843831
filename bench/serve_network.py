"""``sbx serve``: what an allowlist (``network={"allow_out": [...]}``) costs a sandbox, against a
sandbox without a network in the same run (the baseline).

One command::

    .venv/bin/python bench/serve_network.py [-n 5] [--json PATH]

Each round, through the unmodified ``e2b`` SDK on 127.0.0.1:

- ``create``: ``Sandbox.create()`` up to the answer (an allowlisted one also starts its egress
  gateway and sends the VM its network config);
- ``first fetch``: the first ``commands.run`` of a ``python3`` urllib GET of a server the bench runs
  on 127.0.0.1, by an allowlisted name mapped there by the server's ``host_overrides`` (baseline: the
  same command, ``print(1)`` instead of the GET: no network to use);
- ``kill``.

Prints medians / p95 (ms) and the ratios against the baseline. The host is shared: the load average
is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench.percentile import p95
from tests.integration.egress_support import local_server
from tests.integration.serve_server import KEY_A, running_server, sdk_env

from exec_sandbox.server.logs import configure_logging


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": round(statistics.median(ordered), 1), "p95_ms": round(p95(ordered), 1)}


def _round(port: int, networked: bool) -> dict[str, float]:
    from e2b import ALL_TRAFFIC, Sandbox

    fetch = f"urllib.request.urlopen('http://web.test:{port}/say/x', timeout=20).read()"
    code = f"import urllib.request; print({fetch if networked else 1})"
    network: Any = {"allow_out": ["web.test"], "deny_out": [ALL_TRAFFIC]} if networked else None
    t0 = time.perf_counter()
    sbx = Sandbox.create(network=network, timeout=120) if networked else Sandbox.create(timeout=120)
    t1 = time.perf_counter()
    out = sbx.commands.run(f'python3 -c "{code}"', timeout=60)
    t2 = time.perf_counter()
    sbx.kill()
    t3 = time.perf_counter()
    expected = "b'x'\n" if networked else "1\n"
    if out.stdout != expected:
        raise RuntimeError(f"unexpected output {out.stdout!r} (networked={networked})")
    return {"create": (t1 - t0) * 1000, "first fetch": (t2 - t1) * 1000, "kill": (t3 - t2) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=5, help="rounds of each kind")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    configure_logging("json", "warning")  # as `sbx serve --log-level warning` would
    samples: dict[str, dict[str, list[float]]] = {"allowlisted": {}, "baseline": {}}
    with local_server() as web, running_server(
        host_overrides={"web.test": "127.0.0.1"}, egress_allow_private=True
    ) as srv, sdk_env(srv.url, KEY_A):
        _round(web.port, False)  # warm: the L1 snapshot of the base image
        for _ in range(args.n):
            for kind, networked in (("baseline", False), ("allowlisted", True)):  # interleaved
                for step, ms in _round(web.port, networked).items():
                    samples[kind].setdefault(step, []).append(ms)
    report: dict[str, Any] = {
        kind: {s: _stats(v) for s, v in steps.items()} for kind, steps in samples.items()
    }
    report["ratio_median"] = {
        s: round(report["allowlisted"][s]["median_ms"] / report["baseline"][s]["median_ms"], 2)
        for s in samples["baseline"]
    }
    report["rounds"] = args.n
    report["loadavg"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
