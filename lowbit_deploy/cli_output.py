"""What every ``lowbit-deploy`` command prints and how it exits: the contract CI scripts rely on (docs/ci.md).

Exit codes (:class:`ExitCode`)::

    0    passed
    1    failed: the command ran and a check did not pass (a validation tolerance, a sampling gate)
    2    bad input: a usage error (unknown option, missing argument) or a UserError (missing file, invalid recipe)
    70   internal error: an unexpected exception, i.e. a bug (sysexits' EX_SOFTWARE); --debug shows the traceback
    130  interrupted by Ctrl-C (128 + SIGINT, what shells report for it)

Every run that reaches the command line parser ends with one line ``PASSED|FAILED | Runtime: Ns | Command: ...``;
every error prints one ``error: <problem and fix>`` line before it, without a traceback unless ``--debug``.
``--help`` and ``--version`` print only what they were asked for.

With ``--json`` stdout holds exactly one JSON object (:data:`RESULT_FORMAT`, see :meth:`CommandSession.document`)
and every human line -- results, the error line, the closing line -- goes to stderr, so ``stdout`` always parses.
``--quiet`` drops the result lines (errors and the closing line stay); ``-v``/``-vv`` show the library's log.

The output options are read from the raw arguments (:meth:`OutputSettings.from_args`) rather than from click's
parse, because a usage error is raised before click has parsed anything and must still be reported in the form
the caller asked for. They are accepted before or after the subcommand.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from .errors import UserError

RESULT_FORMAT = "lowbit-deploy/cli-result/1"
LOGGER_NAME = "lowbit_deploy"
_MAX_INTERNAL_MESSAGE = 400


class ExitCode(IntEnum):
    PASSED = 0
    FAILED = 1
    BAD_INPUT = 2
    INTERNAL_ERROR = 70
    INTERRUPTED = 130

    @property
    def status(self) -> str:
        """The JSON ``status``: passed, failed (a check did not pass) or error (the command could not finish)."""
        return {ExitCode.PASSED: "passed", ExitCode.FAILED: "failed"}.get(self, "error")

    @property
    def error_kind(self) -> str | None:
        return {ExitCode.BAD_INPUT: "bad_input", ExitCode.INTERNAL_ERROR: "internal",
                ExitCode.INTERRUPTED: "interrupted"}.get(self)


@dataclass
class OutputSettings:
    json: bool = False
    debug: bool = False
    quiet: bool = False
    verbosity: int = 0

    @classmethod
    def from_args(cls, args: list[str]) -> "OutputSettings":
        settings = cls()
        for token in args:
            if token == "--":  # what follows is operands, never options
                break
            if token == "--json":
                settings.json = True
            elif token == "--debug":
                settings.debug = True
            elif token == "--quiet":
                settings.quiet = True
            elif token == "--verbose":
                settings.verbosity += 1
            elif re.fullmatch(r"-[qv]+", token):  # -q, -v, -vv, -qv: click's combined short flags
                settings.quiet |= "q" in token
                settings.verbosity += token.count("v")
        return settings


def output_params() -> list[click.Option]:
    """The output options, attached to the group and to every subcommand (values come from the raw arguments)."""
    return [
        click.Option(["--json", "json_output"], is_flag=True, expose_value=False,
                     help="Print one JSON object (status, exit_code, result, runtime_s, error) on stdout; human "
                          "lines go to stderr. See docs/ci.md."),
        click.Option(["--debug"], is_flag=True, expose_value=False,
                     help="Show the traceback of errors (internal errors and bad input)."),
        click.Option(["-q", "--quiet"], is_flag=True, expose_value=False,
                     help="Only the error and closing lines (and the JSON object with --json); no progress bars."),
        click.Option(["-v", "--verbose"], count=True, expose_value=False,
                     help="Show the library's log: -v info, -vv debug."),
    ]


@dataclass
class CommandSession:
    """One invocation: its settings, timer, the subcommand that ran, and the result data it reported."""

    settings: OutputSettings
    args: list[str]
    started: float = field(default_factory=time.perf_counter)
    command: str | None = None
    ran: bool = False
    passed: bool = False
    result: Any = None

    @property
    def command_line(self) -> str:
        return shlex.join(["lowbit-deploy", *self.args])

    def run(self, invoke: Callable[[], Any]) -> int:
        """Call ``invoke`` (click's non-standalone main) and turn every way it can end into an exit code."""
        try:
            with self._human_output():
                returned = invoke()
        except click.exceptions.NoArgsIsHelpError as error:
            click.echo(error.format_message(), err=self.settings.json)
            return self.finish(ExitCode.BAD_INPUT, "no command given; pick one of the commands listed above")
        except click.UsageError as error:
            return self.finish(ExitCode.BAD_INPUT, _usage_message(error))
        except click.ClickException as error:  # FileError and friends: the input is at fault
            return self.finish(ExitCode.BAD_INPUT, error.format_message())
        except UserError as error:
            return self.finish(ExitCode.BAD_INPUT, str(error))
        except (click.Abort, KeyboardInterrupt):
            return self.finish(ExitCode.INTERRUPTED, "interrupted (Ctrl-C); files written so far stay in place; "
                                                     "re-run the command to finish (`train --resume` continues "
                                                     "from the last checkpoint)")
        except Exception as error:  # noqa: BLE001 - the last resort that keeps the closing line and exit code
            return self.finish(ExitCode.INTERNAL_ERROR, _internal_message(error, self.settings.debug))
        if not self.ran:  # --help / --version: only what was asked for
            return int(returned or 0)
        return self.finish(ExitCode.PASSED if self.passed else ExitCode.FAILED)

    @contextlib.contextmanager
    def _human_output(self) -> Iterator[None]:
        """Route what the command prints: to stderr under --json (stdout is the JSON object's), nowhere under
        --quiet. Redirecting sys.stdout catches every print, including ones added to a command later."""
        if self.settings.quiet:
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                yield
        elif self.settings.json:
            with contextlib.redirect_stdout(sys.stderr):
                yield
        else:
            yield

    def finish(self, code: ExitCode, error: str | None = None) -> int:
        runtime = time.perf_counter() - self.started
        if error is not None:
            if self.settings.debug and sys.exc_info()[0] is not None:
                traceback.print_exc(file=sys.stderr)
            click.echo(f"error: {error}", err=True)
        verdict = "PASSED" if code is ExitCode.PASSED else "FAILED"
        click.echo(f"{verdict} | Runtime: {runtime:.1f}s | Command: {self.command_line}", err=self.settings.json)
        if self.settings.json:
            click.echo(json.dumps(self.document(code, error, runtime), allow_nan=False, sort_keys=True))
        return int(code)

    def document(self, code: ExitCode, error: str | None, runtime: float) -> dict:
        """The ``--json`` object (format :data:`RESULT_FORMAT`)::

            {"format": "lowbit-deploy/cli-result/1", "command": "validate" | null, "command_line": "...",
             "status": "passed" | "failed" | "error", "exit_code": 0, "runtime_s": 1.234,
             "result": {...the command's report...} | null,
             "error": null | {"kind": "bad_input" | "internal" | "interrupted", "message": "..."}}
        """
        return {"format": RESULT_FORMAT, "command": self.command, "command_line": self.command_line,
                "status": code.status, "exit_code": int(code), "runtime_s": round(runtime, 3),
                "result": json_safe(self.result),
                "error": None if error is None else {"kind": code.error_kind, "message": error}}


def _usage_message(error: click.UsageError) -> str:
    message = error.format_message().rstrip(".")
    if error.ctx is None:
        return message
    usage = error.ctx.get_usage().replace("Usage: ", "", 1)
    return f"{message} (usage: {usage}; see `{error.ctx.command_path} --help`)"


def _internal_message(error: BaseException, debug: bool) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())  # one line, whatever the exception holds
    if len(text) > _MAX_INTERNAL_MESSAGE:
        text = text[:_MAX_INTERNAL_MESSAGE] + "..."
    fix = "report it with the traceback above" if debug else "rerun with --debug for the traceback and report it"
    return f"internal error: {text}; {fix}"


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON: paths and other objects as strings, inf/nan as "inf"/"nan" (as report.json)."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "to_dict"):
        return json_safe(value.to_dict())
    if hasattr(value, "item"):  # numpy and torch scalars
        return json_safe(value.item())
    return str(value)  # paths, enums, anything else a report may hold


def configure_logging(settings: OutputSettings) -> None:
    """The library logs to the ``lowbit_deploy`` logger; the CLI shows warnings, or more with -v, less with -q."""
    level = (logging.ERROR if settings.quiet else logging.WARNING if settings.verbosity == 0
             else logging.INFO if settings.verbosity == 1 else logging.DEBUG)
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        logger.addHandler(_StderrHandler())


class _StderrHandler(logging.Handler):
    """Resolves sys.stderr at each record (a StreamHandler keeps the stream it was made with, which tests swap)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


class LowbitGroup(click.Group):
    """A click group that owns the output contract: output options everywhere, one closing line, exit codes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(output_params())

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.extend(output_params())  # `lowbit-deploy validate RUN --json` works as well as `--json validate`
        super().add_command(cmd, name)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ARG002
        """Always non-standalone underneath: click's own handling would print "Aborted!" or a usage block and exit
        without the closing line. The program name is fixed so usage hints match the closing line."""
        args = list(sys.argv[1:] if args is None else args)
        session = CommandSession(OutputSettings.from_args(args), args)
        configure_logging(session.settings)
        code = session.run(lambda: super(LowbitGroup, self).main(args, "lowbit-deploy", complete_var,
                                                                   standalone_mode=False, obj=session, **extra))
        sys.exit(code)


def _session() -> CommandSession | None:
    context = click.get_current_context(silent=True)
    return context.find_object(CommandSession) if context is not None else None


def _refuse_under_torchrun(command: str) -> None:
    """Only ``train`` splits its work between torchrun's processes (lowbit_deploy/qat/distributed.py); N copies of
    any other command would all write the same run's files."""
    if command != "train" and os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1"):
        raise UserError(f"`lowbit-deploy {command}` runs in one process, but torchrun started "
                        f"{os.environ['WORLD_SIZE']} (WORLD_SIZE); only `train` runs under torchrun. Train with "
                        f"`torchrun --nproc_per_node N -m lowbit_deploy train RECIPE --out RUN`, then run "
                        f"`lowbit-deploy {command} ...` without torchrun (docs/training-on-gpus.md)")


def stage(func):
    """Wrap a subcommand: a return value of False means FAILED (exit 1); errors are handled by :class:`LowbitGroup`."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        _refuse_under_torchrun(click.get_current_context().info_name)
        session = _session()
        if session is not None:
            session.command, session.ran = click.get_current_context().info_name, True
        passed = func(*args, **kwargs) is not False
        if session is not None:
            session.passed = passed
        return passed

    return wrapper


def report_result(data: Any) -> None:
    """The command's result data, for the ``result`` field of the ``--json`` object."""
    session = _session()
    if session is not None:
        session.result = data


def _resolve_progress(ctx: click.Context, param: click.Parameter, value: bool | None) -> bool | None:
    session = ctx.find_object(CommandSession)
    if value is None and session is not None and session.settings.quiet:
        return False
    return value


PROGRESS = click.option("--progress/--no-progress", default=None, callback=_resolve_progress,
                        help="Show a progress bar (on stderr). Default: only when stderr is a terminal, never with "
                             "--quiet.")
