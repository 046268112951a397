"""What a run shows while it runs: one printed line per round, a live progress line on a
terminal, and none of the third-party notices that say nothing about the run.

Every round prints one line of the table (:class:`fedmask.record.results.RunRecorder`),
terminal or not, so a log file holds the same table as the screen. On a terminal a live
line below the table says what the run is doing: the start-up stages (starting Ray,
loading the data, starting the workers: 20-40 s before round 1 under Ray on a loaded
2-core machine), then the round with a bar, the time per round and an ETA. When the output
is not a terminal (a pipe, a file, ``fedmask sweep``'s logs) nothing is drawn and no line is
wrapped, so a long run directory stays one path.

The live line is shown by a :class:`RunDisplay` opened around a run
(:func:`fedmask.api.execute`); the server, which runs in the same process (in a thread
under Ray's engine), reaches it through :func:`current`. Without an open display, or with
one that is quiet, stages and rounds show nothing.

The notices hidden, each exactly (a logging filter that matches the one message, a warning
filter that matches the one warning), never a whole logger or category:

- Flower's ``run_simulation`` deprecation notice (:data:`RUN_SIMULATION_NOTICE`), which
  recommends ``flwr run``. ``fedmask run`` keeps ``run_simulation`` on purpose, with Flower
  pinned below 1.42 (pyproject.toml). Measured on the quickstart (20 rounds, 10 clients,
  2 shared cores), ``flwr run . --stream`` against Flower's local simulation SuperLink
  against ``fedmask run``, five and six runs alternated: the same time per round (0.61-1.09 s against
  0.48-1.18 s, the spread is the machine's load) but 10-90 s more before the first round
  (42-138 s against 21-77 s), for the app's packaging and the SuperLink's separate
  simulation process. ``flwr run`` also prints Flower's log instead of the table, writes
  the run where the SuperLink started, leaves that SuperLink running, and has no
  ``--resume``, ``--engine`` or ``--ray-address``. docs/console-and-trackers.md has the numbers.
- Flower's "fraction_evaluate is set to 0.0" (:data:`FRACTION_EVALUATE_NOTICE`): fedmask
  evaluates the global model on the server after every round; clients never evaluate.
- Ray's FutureWarning about accelerator variables (:data:`RAY_ACCELERATOR_TIP`). Setting
  ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0`` would silence it too, but would let workers with
  ``num-gpus = 0`` see the GPU; fedmask keeps Ray's current behaviour (they do not).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

RUN_SIMULATION_NOTICE = "The `run_simulation` function is deprecated"
FRACTION_EVALUATE_NOTICE = "fraction_evaluate is set to 0.0. Federated evaluation will be skipped."
RAY_ACCELERATOR_TIP = r"Tip: In future versions of Ray, Ray will no longer override accelerator visible devices"


class _DropMessages(logging.Filter):
    """Drops the log records whose message contains one of ``needles``; lets every other through."""

    def __init__(self, needles: tuple[str, ...]):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(needle in message for needle in self.needles)


@contextlib.contextmanager
def flower_notices_hidden(*notices: str) -> Iterator[None]:
    """While inside, Flower's log drops the records that contain one of ``notices``."""
    logger = logging.getLogger("flwr")
    dropping = _DropMessages(notices)
    logger.addFilter(dropping)
    try:
        yield
    finally:
        logger.removeFilter(dropping)


def hide_ray_accelerator_tip() -> None:
    """Ray's one FutureWarning about accelerator variables is not shown (a process-wide
    filter: ``warnings.catch_warnings`` is not thread-safe, and Ray starts in a thread)."""
    warnings.filterwarnings("ignore", message=RAY_ACCELERATOR_TIP, category=FutureWarning)


def make_console(quiet: bool = False) -> Console:
    """The run's console: at least 80 columns, and on anything that is not a terminal, lines
    as long as they are (rich would otherwise wrap them at 80 columns, paths included)."""
    probe = Console()
    return Console(highlight=False, quiet=quiet, width=max(probe.width, 80), soft_wrap=not probe.is_terminal)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RunDisplay:
    """The live line under a run's table, on a terminal; elsewhere (or quiet) it shows nothing.

    Use it as a context manager around a run: inside, :func:`current` returns it, and
    :meth:`stage`, :meth:`rounds` and :meth:`round_done` update the line.
    """

    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or make_console(quiet)
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._previous: RunDisplay | None = None
        self._first: int = 0  # rounds done when the rounds began (a resumed run's earlier ones)
        self._total: int = 0
        self._began: float = 0.0
        self._done: int = 0

    @property
    def live(self) -> bool:
        """Whether a live line is drawn (a terminal, not quiet, inside the ``with``)."""
        return self._progress is not None

    def __enter__(self) -> RunDisplay:
        global _ACTIVE
        self._previous, _ACTIVE = _ACTIVE, self
        if self.console.is_terminal and not self.console.quiet:
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24),
                                      TextColumn("{task.fields[eta]}"), TimeElapsedColumn(),
                                      console=self.console, transient=True)
            self._task = self._progress.add_task("starting", total=None, eta="")
            self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        global _ACTIVE
        self.stop()
        _ACTIVE = self._previous

    def stop(self) -> None:
        """Remove the live line (and give the terminal its cursor back); printing goes on."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def stage(self, text: str) -> None:
        """A start-up (or wind-down) stage, shown with a spinner and no bar."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=text, total=None, completed=0, eta="")

    def rounds(self, done: int, total: int) -> None:
        """The rounds begin now: ``done`` of ``total`` are finished already (a resumed run)."""
        self._first, self._done, self._total, self._began = done, done, total, time.monotonic()
        self._show_round()

    def round_done(self, server_round: int) -> None:
        """Round ``server_round`` is finished (its line printed)."""
        self._done = max(self._done, server_round)
        self._show_round()

    def eta(self) -> str:
        """Time per round and time left, from the rounds run so far ('' before the first ends)."""
        ran = self._done - self._first
        if ran <= 0 or self._done >= self._total:
            return ""
        per_round = (time.monotonic() - self._began) / ran
        return f"{per_round:.1f} s/round · ETA {_clock(per_round * (self._total - self._done))}"

    def _show_round(self) -> None:
        if self._progress is None or self._task is None:
            return
        if self._done >= self._total:
            self.stage("finishing")
            return
        self._progress.update(self._task, description=f"round {self._done + 1}/{self._total}", total=self._total,
                              completed=self._done, eta=self.eta())


_ACTIVE: RunDisplay | None = None


def current() -> RunDisplay:
    """The display of the run in progress in this process, or one that shows nothing."""
    return _ACTIVE if _ACTIVE is not None else RunDisplay()


def stop_display() -> None:
    """Remove the live line of the run in progress, if any (before leaving on a Ctrl-C)."""
    if _ACTIVE is not None:
        _ACTIVE.stop()
