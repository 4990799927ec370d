"""Readiness: whether this process should be sent new work (`GET /readyz`).

Liveness (`/healthz`) only says the loop answers. Readiness is narrower: the app's
cleanup contexts have all run (the upstream session is open, the hub and the registry
exist) and shutdown has not begun. From the first shutdown hook on, `/readyz` answers
503 so a load balancer stops routing here while running turns are given their grace.
"""

from __future__ import annotations

STARTING = "starting"
READY = "ready"
SHUTTING_DOWN = "shutting_down"


class Readiness:
    """Where the application is in its life: starting, ready, or shutting down."""

    __slots__ = ("_state",)

    def __init__(self) -> None:
        self._state = STARTING

    @property
    def state(self) -> str:
        return self._state

    @property
    def ready(self) -> bool:
        return self._state == READY

    def set_started(self) -> None:
        """Every cleanup context has started (call from `on_startup`, which runs after
        them). Has no effect once shutdown has begun."""
        if self._state == STARTING:
            self._state = READY

    def set_shutting_down(self) -> None:
        """Shutdown has begun; there is no way back."""
        self._state = SHUTTING_DOWN
