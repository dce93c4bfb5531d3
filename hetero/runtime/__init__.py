"""Runtime: Session (a compiled plan, one or many requests in flight), ReplicaPool, the measured
policies and tracing."""

from hetero.runtime.api import compile, plan
from hetero.runtime.replicas import ReplicaPool
from hetero.runtime.session import RunStats, Session, compile_plan
from hetero.runtime.trace import Trace

__all__ = ["ReplicaPool", "RunStats", "Session", "Trace", "compile", "compile_plan", "plan"]
