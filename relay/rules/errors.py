"""The rules package's own errors."""

from __future__ import annotations


class RuleError(Exception):
    """A rule file, block template, follow-up template or catalog that cannot be used.

    Carries the file and line to fix (line 0: the whole file).
    """

    def __init__(self, file: str, line: int, message: str) -> None:
        self.file = str(file)
        self.line = int(line)
        self.message = message
        super().__init__(f"{self.file}:{self.line}: {message}")
