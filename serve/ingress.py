"""Which process answers the endpoint's one URL.

* **direct** (a single-node Ray that ``jobs/serve_api.py`` starts itself, the default there):
  Ray Serve 2.60's direct ingress — the one ``FacePipeline`` replica serves HTTP itself on the
  user's host:port (the range ``RAY_SERVE_DIRECT_INGRESS_MIN/MAX_HTTP_PORT`` is that one port), no proxy
  actor and no router hop in the request's path.  Serve still starts its proxy (it also
  routes to the replica), on another free port of the same host, unused.  These variables
  are read by Serve's processes when they start: they are set in this process's environment
  before Ray starts, so a cluster we join (whose processes are running) keeps the proxy.
* **proxy** (multi-node clusters, a cluster we join, or more than one replica asked for):
  Serve's proxy on host:port spreads requests over the replicas.

Measured on 2 cores (benchmarks/README.md, serve_load, 2026-12-04): the one direct replica
189 photos/s at 16 clients and 219 at 64, on 1.25–1.3 cores; two replicas behind the proxy
142 and 138, on 1.9 cores.
"""
from __future__ import annotations

import os
import socket

DIRECT, PROXY = "direct", "proxy"


def direct_ingress_env(port: int) -> dict[str, str]:
    """The environment that makes Serve's processes (started after it is set) hand the
    ingress replica exactly ``port``: one port, so one replica; no port quarantine and no
    drain period (they exist for an external load balancer; there is none here), so a replica
    that Serve replaces gets the port back at once."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # exclusive
            "RAY_SERVE_PORT_QUARANTINE_S": "0",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


def choose(requested: str, local: bool, replicas: int | None) -> str:
    """``requested``: "auto", "direct" or "proxy".  Auto: direct on a Ray started here
    (one node) with one replica, else the proxy.  Direct where it cannot work fails loudly."""
    if requested == PROXY:
        return PROXY
    possible = local and (replicas or 1) == 1
    if requested == DIRECT and not possible:
        from pipeline.contract import UsageError

        raise UsageError("--ingress direct needs a Ray started by this command (no --ray-address / "
                         "RAY_ADDRESS: Serve reads it when its processes start) and one replica")
    return DIRECT if possible else PROXY


def enabled() -> bool:
    """Whether Serve in this process (and so the cluster it started) runs direct ingress."""
    from ray.serve._private import constants

    return bool(constants.RAY_SERVE_ENABLE_DIRECT_INGRESS)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host if host not in ("", "0.0.0.0") else "127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> set[str]:
    """Addresses a TCP socket of this machine listens on at ``port`` (/proc/net/tcp, tcp6)."""
    binds = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, _, p = local.partition(":")
            if state != "0A" or int(p, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            binds.add(socket.inet_ntop(socket.AF_INET6 if v6 else socket.AF_INET, raw))
    return binds


def replica_ports(app_name: str) -> list[tuple[str, int]]:
    """(ip, port) of each direct-ingress replica of ``app_name``, from the Serve controller."""
    import ray
    from ray.serve.context import _get_global_client

    groups = ray.get(_get_global_client()._controller.get_target_groups.remote(app_name))
    return [(t.ip, t.port) for g in groups if g.app_name == app_name for t in g.targets]


def check_direct(app_name: str, host: str, port: int) -> None:
    """The app's one replica answers on host:port and nothing else listens there (else raise)."""
    targets = replica_ports(app_name)
    binds = listening(port)
    if [p for _, p in targets] != [port] or binds != {host}:
        raise RuntimeError(f"direct ingress: expected one replica listening on {host}:{port} only, "
                           f"got replicas {targets} and listeners {sorted(binds)} on port {port}")


def start(serve, host: str, port: int, mode: str) -> None:  # noqa: ANN001
    """``serve.start`` for ``mode``: the proxy on host:port, or (direct) on another free port of
    ``host`` while the replica takes host:port."""
    if mode == DIRECT:
        if not enabled() or os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT") != str(port):
            raise RuntimeError("direct ingress: set serve.ingress.direct_ingress_env(port) in the environment "
                               "before Ray (and ray.serve) start")
        serve.start(http_options={"host": host, "port": free_port(host)})
    else:
        serve.start(http_options={"host": host, "port": port})
