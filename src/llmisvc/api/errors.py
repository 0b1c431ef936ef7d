"""Validation errors that carry the field path of each problem."""

from __future__ import annotations

from dataclasses import dataclass

# Path used for problems with a whole document rather than one field.
DOCUMENT = "(document)"


@dataclass(frozen=True)
class FieldError:
    """One problem in a document: `path` (`spec.prefill.replicas`) and a plain-language `reason`.

    `document` is the 1-based position of the document in a multi-document YAML stream, or
    None when the stream contains one document.
    """

    path: str
    reason: str
    document: int | None = None

    def __str__(self) -> str:
        prefix = f"document {self.document}: " if self.document is not None else ""
        return f"{prefix}{self.path}: {self.reason}"


class SpecError(ValueError):
    """Raised when a spec is invalid; `errors` lists every problem found, each with its path."""

    def __init__(self, errors: list[FieldError]):
        if not errors:
            raise ValueError("SpecError needs at least one FieldError")
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))

    @classmethod
    def single(cls, path: str, reason: str) -> "SpecError":
        """Build a SpecError holding one FieldError."""
        return cls([FieldError(path, reason)])
