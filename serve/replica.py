"""What every Serve replica of this project does first: keep its internal gRPC server off public interfaces.

Its own module because every deployment (the ingress, the vLLM and transformers engines) calls it in its
constructor, and none of them should import another's module for it.
"""

from __future__ import annotations

from typing import Any

from ray import serve


def bind_replica_grpc_to_node_ip() -> None:
    """Keep this replica's internal gRPC server off public interfaces (call in a deployment constructor).

    Ray 2.60 starts an inter-deployment gRPC server in every replica on `[::]:0`, i.e. on every interface,
    whether or not gRPC transport is in use (handles use Ray actor calls unless
    RAY_SERVE_USE_GRPC_BY_DEFAULT=1), and has no setting for its host. We bind it to this node's Ray IP
    instead: 127.0.0.1 on a loopback Ray, the node's cluster address on a cluster, where other nodes still
    reach it. The constructor runs in the replica process before that server starts; outside a replica,
    or if Ray's internals move, this does nothing.
    """
    try:
        serve.get_replica_context()
        from ray.serve._private import replica
    except Exception:  # not in a replica (tests, benchmark) or a Ray without this module
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "inbol_bound", False):
        return
    import ray

    host = ray.util.get_node_ip_address()
    host = f"[{host}]" if ":" in host else host

    def bound(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            address = f"{host}:{address.removeprefix('[::]:')}"
        return original(server, address)

    bound.inbol_bound = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = bound
