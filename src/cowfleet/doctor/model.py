"""What a doctor check found, and what the whole run says."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

Verdict = Literal["ok", "warn", "fail", "skip"]
VERDICTS: tuple[Verdict, ...] = ("ok", "warn", "fail", "skip")

# `cowfleet doctor` exit codes (docs/exit-codes.md): warnings alone do not fail a node.
EXIT_OK = 0
EXIT_FAILED = 11


@dataclass(frozen=True)
class Finding:
    """One check's verdict: what it saw (``message``) and, unless ok, what to do (``fix``)."""

    check: str
    verdict: Verdict
    message: str
    fix: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def ok(check: str, message: str, **detail: Any) -> Finding:
    return Finding(check, "ok", message, None, detail)


def warn(check: str, message: str, fix: str, **detail: Any) -> Finding:
    return Finding(check, "warn", message, fix, detail)


def fail(check: str, message: str, fix: str, **detail: Any) -> Finding:
    return Finding(check, "fail", message, fix, detail)


def skip(check: str, message: str, **detail: Any) -> Finding:
    return Finding(check, "skip", message, None, detail)


def exit_code(findings: Iterable[Finding]) -> int:
    return EXIT_FAILED if any(f.verdict == "fail" for f in findings) else EXIT_OK
