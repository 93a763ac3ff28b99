"""The errors of building and checking engines (shared by pid_export.engine and its profiles)."""

from __future__ import annotations

class EngineError(RuntimeError):
    """A problem building or checking an engine that the user can act on."""


class MissingSizeRange(EngineError):
    """The export has no size range and none was given: there is no profile to build."""
