"""Progress reports that fit where they run: a live bar on a terminal, a few plain lines in a log.

A tqdm bar redraws itself with carriage returns; written to a file (CI, ``nohup``, a cluster job)
every redraw stays, thousands of them. ``track`` decides once for every caller: on a terminal a
tqdm bar, elsewhere one line per tenth of the work or per ``EVERY_SECONDS`` (whichever comes
first) and a final line; nothing when disabled (``-q``, ``progress=False``). ``EngineProgress``
does the same for ignite engines (MONAI's trainers and evaluators), in place of ignite's
``ProgressBar``.

Examples:
    >>> import io
    >>> log = io.StringIO()
    >>> for _ in track(range(1000), desc="preprocess", unit="case", file=log):
    ...     pass
    >>> len(log.getvalue().splitlines())
    10
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TextIO

from ignite.engine import Engine, Events
from tqdm import tqdm

#: a log line at least this often (seconds) while work goes on
EVERY_SECONDS = 30.0
#: and at least at every this fraction of a known total
EVERY_FRACTION = 0.1


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (a closed or file-less stream is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class Lines:
    """A progress report as plain periodic lines (the part of tqdm's interface medtl uses:
    iteration, ``update``, ``set_postfix``, ``set_description``, ``close``, ``with``)."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        desc: str = "",
        total: float | None = None,
        unit: str = "it",
        initial: int = 0,
        file: TextIO | None = None,
    ) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.file = sys.stderr if file is None else file
        self.n = initial
        self.postfix: dict[str, Any] = {}
        self._start = self._last_time = time.monotonic()
        self._last_n = initial
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("Lines made without an iterable cannot be iterated")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """Values shown after the count (a running loss); ``refresh`` is accepted for tqdm's sake."""
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def update(self, n: float = 1) -> None:
        """Count ``n`` more; write a line when a tenth of the total or ``EVERY_SECONDS`` has passed."""
        self.n += n
        now = time.monotonic()
        step = EVERY_FRACTION * self.total if self.total else None
        due_by_count = step is not None and self.n - self._last_n >= step and self.n < self.total
        if due_by_count or now - self._last_time >= EVERY_SECONDS:
            self._write(now)

    def close(self) -> None:
        """Write the final line (once), unless the last line already says it."""
        if not self._closed:
            self._closed = True
            if self.n != self._last_n:
                self._write(time.monotonic())

    def _write(self, now: float) -> None:
        self._last_n, self._last_time = self.n, now
        count = f"{_number(self.n)}/{_number(self.total)}" if self.total else _number(self.n)
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = "".join(f", {k}={_number(v)}" for k, v in self.postfix.items())
        head = f"{self.desc}: " if self.desc else ""
        print(
            f"{head}{count} {self.unit}{share}, {tqdm.format_interval(now - self._start)} elapsed{extra}",
            file=self.file,
            flush=True,
        )


def _number(value: Any) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return str(int(value)) if isinstance(value, float) else str(value)


def track(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str = "",
    total: float | None = None,
    unit: str = "it",
    disable: bool = False,
    leave: bool = True,
    initial: int = 0,
    file: TextIO | None = None,
) -> tqdm | Lines:
    """Report progress over ``iterable`` (or ``update`` calls up to ``total``) on ``file`` (standard
    error): a tqdm bar on a terminal, periodic lines elsewhere, nothing with ``disable``.

    ``leave``: whether a terminal bar stays on screen when done (log lines always stay).
    """
    file = sys.stderr if file is None else file
    if not disable and not is_terminal(file):
        return Lines(iterable, desc=desc, total=total, unit=unit, initial=initial, file=file)
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, leave=leave, initial=initial, file=file)


class EngineProgress:
    """Progress of an ignite engine over its whole run (``track`` decides how it shows), with the
    output's values (the loss) as postfix; in place of ignite's ``ProgressBar``.

    Args:
        desc: what runs ("train", "inference"); with several epochs the current one is added.
        leave: whether a terminal bar stays on screen when the run ends.
        file: where to write (standard error).
    """

    def __init__(self, *, desc: str = "", leave: bool = False, file: TextIO | None = None) -> None:
        self.desc, self.leave, self.file = desc, leave, file
        self._bar: tqdm | Lines | None = None
        self._transform: Callable[[Any], Any] | None = None

    def attach(self, engine: Engine, output_transform: Callable[[Any], Any] | None = None) -> None:
        """Report ``engine``'s iterations; ``output_transform`` turns its output into a number or a
        dict of numbers to show."""
        self._transform = output_transform
        engine.add_event_handler(Events.STARTED, self._open)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._step)
        # not on EXCEPTION_RAISED: an engine with a handler for it no longer raises
        for event in (Events.COMPLETED, Events.TERMINATE):
            engine.add_event_handler(event, self._close)

    def log_message(self, message: str) -> None:
        """A line that stays (an epoch's summary), written without breaking a terminal bar."""
        if isinstance(self._bar, tqdm):
            tqdm.write(message, file=self._bar.fp)
        else:
            print(message, file=sys.stderr if self.file is None else self.file, flush=True)

    def _open(self, engine: Engine) -> None:
        self._close(engine)
        state = engine.state
        total = state.epoch_length * state.max_epochs if state.epoch_length and state.max_epochs else None
        self._bar = track(desc=self.desc, total=total, leave=self.leave, initial=state.iteration, file=self.file)

    def _epoch(self, engine: Engine) -> None:
        if self._bar is not None and (engine.state.max_epochs or 1) > 1:
            self._bar.set_description(f"{self.desc} epoch {engine.state.epoch}/{engine.state.max_epochs}")

    def _step(self, engine: Engine) -> None:
        if self._bar is None:
            return
        if self._transform is not None:
            shown = self._transform(engine.state.output)
            if isinstance(shown, Mapping):
                self._bar.set_postfix({k: _scalar(v) for k, v in shown.items()}, refresh=False)
            else:
                self._bar.set_postfix(output=_scalar(shown), refresh=False)
        self._bar.update(1)

    def _close(self, _engine: Engine) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


__all__ = ["EVERY_FRACTION", "EVERY_SECONDS", "EngineProgress", "Lines", "is_terminal", "track"]
