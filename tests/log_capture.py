"""A logging handler that keeps the messages it sees (tests of what lora2 and its libraries print)."""

from __future__ import annotations

import logging


class Messages(logging.Handler):
    """Keeps ``record.getMessage()`` of every record at ``level`` or above."""

    def __init__(self, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
