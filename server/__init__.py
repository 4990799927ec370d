"""Chorus: one LLM answer, streamed live to any number of viewers over Server-Sent Events."""

__version__ = "0.1.0"
