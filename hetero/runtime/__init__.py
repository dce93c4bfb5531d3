"""Runtime: Session (a compiled plan, one or many requests in flight) and ReplicaPool."""

from hetero.runtime.replicas import ReplicaPool
from hetero.runtime.session import RunStats, Session, compile

__all__ = ["ReplicaPool", "RunStats", "Session", "compile"]
