"""Runtime: Session (one request through a plan)."""

from hetero.runtime.session import RunStats, Session, compile

__all__ = ["RunStats", "Session", "compile"]
