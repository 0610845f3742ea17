r"""One JSON object per log line (``{"ts", "level", "logger", "event", ...fields}``) on stderr.

The per-RPC ``call`` lines are the hot path (one per request, thousands per second): they go
through :class:`CallLog`, which keeps each call's fields and formats and writes them in batches,
instead of a ``logging`` record, handler lock, formatter and flushed write per line.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

LOGGER_NAME = "loss_service"
# One encoder for every line: json.dumps(..., default=str) would build a new one per call.
_ENCODER = json.JSONEncoder(default=str)


def json_line(created: float, level: str, logger: str, name: str, fields: Dict[str, Any]) -> Dict[str, Any]:
    r"""The object of one log line: ``{"ts", "level", "logger", "event", ...fields}``."""
    entry: Dict[str, Any] = {"ts": round(created, 6), "level": level, "logger": logger, "event": name}
    entry.update(fields)
    return entry


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        entry = json_line(record.created, record.levelname, record.name, record.getMessage(), fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _ENCODER.encode(entry)


# The handler configure() installed: CallLog writes its batches to its stream (under its lock).
_json_handler: Optional[logging.StreamHandler] = None


def configure(level: str = "INFO") -> None:
    r"""Route the ``loss_service`` loggers to stderr as JSON lines at ``level``."""
    global _json_handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    _json_handler = handler


class CallLog:
    r"""The ``call`` lines of one server, written in batches from its event loop.

    :meth:`write` buffers the call's fields with the time the call ended; :meth:`flush` formats
    them (the same JSON as :class:`JsonFormatter`) and writes them to the stream of the handler
    :func:`configure` installed, within :data:`FLUSH_SECONDS` (a callback on the running event
    loop), when :data:`MAX_BUFFERED` lines are waiting, and at server stop. Formatting in the
    flush takes the encoding off each call's latency (a client waiting for the answer) and runs
    it in one loop, where it costs a third of what it costs between two requests. Without
    that handler (a library user's own logging setup, tests' ``caplog``) each line is an ordinary
    ``logging`` record. Call it from the event loop thread only.
    """

    FLUSH_SECONDS = 0.05
    MAX_BUFFERED = 512

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._pending: List[Tuple[float, Dict[str, Any]]] = []
        self._flush_scheduled = False

    def write(self, **fields: Any) -> None:
        handler = _json_handler
        if handler is None or not self._logger.isEnabledFor(logging.INFO):
            event(self._logger, "call", **fields)
            return
        self._pending.append((time.time(), fields))
        if len(self._pending) >= self.MAX_BUFFERED:
            self.flush()
        elif not self._flush_scheduled:
            try:
                asyncio.get_running_loop().call_later(self.FLUSH_SECONDS, self.flush)
                self._flush_scheduled = True
            except RuntimeError:  # no event loop: write now
                self.flush()

    def flush(self) -> None:
        self._flush_scheduled = False
        handler = _json_handler
        if not self._pending or handler is None:
            return
        name = self._logger.name
        text = "".join(
            _ENCODER.encode(json_line(created, "INFO", name, "call", fields)) + "\n" for created, fields in self._pending
        )
        self._pending.clear()
        with handler.lock:
            handler.stream.write(text)
            handler.stream.flush()


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    r"""Log ``name`` with structured ``fields`` (cheap when the level is disabled).

    The record is handed to the logger directly: ``Logger.log`` would first walk the stack to find
    the caller's file and line (``findCaller``), which the JSON lines do not show and which costs
    more than formatting the line -- this runs once per RPC.
    """
    if logger.isEnabledFor(level):
        logger.handle(logger.makeRecord(logger.name, level, "", 0, name, (), None, extra={"fields": fields}))


def monotonic_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)
