"""Errors of the planning step: spec values that this machine or engine cannot honour."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PlanIssue:
    """One rejected value: the spec field path and why it cannot be honoured."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class PlanError(Exception):
    """A spec that is valid for the API but cannot run here; nothing was started.

    `str(error)` lists one `path: reason` line per issue, like the API's SpecError.
    """

    def __init__(self, issues: list[PlanIssue]):
        self.issues = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))
