"""`python -m server.loadtest`: a load-test tool for a running Chorus server.

It starts conversations (or attaches to existing ones), attaches many SSE subscribers to
each, and checks what a Chorus user cares about: every subscriber gets every event once
and in order, and every subscriber assembles the same answer as the server's own state.

The pieces: `stats` (pure: percentiles, the event-id sequence check, answer digests),
`subscriber` (one SSE reader and what it measured), `runner` (owns the session and every
task, enforces the time bound), `report` (numbers and verdict, as a table or JSON) and
`cli` (arguments, the loopback guard, the file-descriptor limit, `main`).
"""

from __future__ import annotations
