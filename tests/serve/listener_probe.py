"""What a stranger on the network finds listening on a running main job, and whether any of it lets
them in without the cluster's token.

Every listening TCP socket of the job's process tree (the driver, Ray's GCS, raylet, agents,
workers, Serve's replicas, HAProxy) on an address other than loopback is probed from outside:
- a gRPC call of a real method of each of Ray's services (GCS, raylet, object manager, core
  worker, agent, Serve's replica data plane) with no token. A Ray server that knows the method
  answers UNAUTHENTICATED (and, as a control, not so with the token); one that does not know it
  answers UNIMPLEMENTED. A server that knows none of them is unknown, and the probe says so.
- what is not gRPC is asked over HTTP: Ray's agents answer 401 without the token; what else
  answers is a read-only metrics page (Prometheus text; HAProxy's stats and metrics), named so.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

RAY_METHODS = (
    "/ray.rpc.NodeInfoGcsService/GetClusterId",  # GCS: where every Ray client connects first
    "/ray.rpc.NodeManagerService/GetNodeStats",  # raylet
    "/ray.rpc.ObjectManagerService/Pull",  # raylet's object manager
    "/ray.rpc.CoreWorkerService/GetCoreWorkerStats",  # every worker and driver
    "/ray.rpc.ReporterService/GetTraceback",  # dashboard agent
    "/ray.serve.ASGIService/HandleRequest",  # Serve replicas' gRPC data plane (throughput mode)
)
REFUSED = "UNAUTHENTICATED"


@dataclass
class Listener:
    process: str
    ip: str
    port: int
    verdict: str  # "token required", "metrics page", or what let the probe in / left it unsure
    detail: str = ""


def node_address() -> str:
    """An address of this machine other than loopback: what a stranger on the network would dial."""
    import psutil

    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return a.address
    raise RuntimeError("this machine has no non-loopback IPv4 address to probe from")


def listeners(pid: int) -> list[tuple[str, str, int, int]]:
    """(process name, ip, port, process id) of every listening TCP socket of a process tree."""
    import psutil

    root = psutil.Process(pid)
    found = []
    for p in [root, *root.children(recursive=True)]:
        try:
            found += [(p.name(), c.laddr.ip, c.laddr.port, p.pid) for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def grpc_status(address: str, method: str, token: str | None) -> str:
    import grpc

    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        try:
            channel.unary_unary(method)(b"", timeout=3, metadata=metadata)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name


def probe(process: str, ip: str, port: int, host: str, token: str) -> Listener:
    import httpx

    address = f"{host}:{port}"
    statuses = {m: grpc_status(address, m, None) for m in RAY_METHODS}
    known = [m for m, s in statuses.items() if s != "UNIMPLEMENTED"]
    grpc_server = all(s in ("UNIMPLEMENTED", REFUSED) for s in statuses.values()) or any(s == REFUSED for s in statuses.values())
    if grpc_server:
        if not known:
            return Listener(process, ip, port, "unknown gRPC server", "none of Ray's services")
        let_in = {m: s for m, s in statuses.items() if s not in ("UNIMPLEMENTED", REFUSED)}
        if let_in:
            return Listener(process, ip, port, "answers without the token", str(let_in))
        with_token = {m: grpc_status(address, m, token) for m in known}
        if all(s == REFUSED for s in with_token.values()):  # the control: the token must open it
            return Listener(process, ip, port, "refuses the token too", str(with_token))
        return Listener(process, ip, port, "token required", ", ".join(m.rsplit("/", 2)[1] for m in known))
    for path in ("/", "/metrics", "/stats"):
        try:
            r = httpx.get(f"http://{address}{path}", timeout=3)
        except httpx.HTTPError as e:
            return Listener(process, ip, port, "unknown", type(e).__name__)
        if r.status_code == 401:
            return Listener(process, ip, port, "token required", f"HTTP {path}: 401")
        if r.status_code == 200 and (r.text.startswith("# HELP") or "Statistics Report" in r.text):
            return Listener(process, ip, port, "metrics page", f"HTTP {path}")
    return Listener(process, ip, port, "unknown", f"HTTP: {r.status_code}")


def exposed(pid: int, token: str) -> list[Listener]:
    """Every non-loopback listener of the process tree, probed."""
    host = node_address()
    found = []
    for process, ip, port, _ in listeners(pid):
        if not ipaddress.ip_address(ip).is_loopback:
            found.append(probe(process, ip, port, host if ip in ("0.0.0.0", "::") else ip, token))
    return found
