"""Typed messages between the deployments: what the ingress, the PriorityRouter and the engine replicas
send each other. Every message is a frozen dataclass, pickled by Ray as is; no side reads a dict by key.
No torch here: the ingress and the router import this module.
"""

from __future__ import annotations

# ---- ingress <-> PriorityRouter: admission, and replica -> router: load reports ----------------------

# ---- ingress <-> EngineReplica: the request, its stream items and errors ------------------------------
