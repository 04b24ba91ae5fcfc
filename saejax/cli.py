"""How every ``python -m saejax.*`` command ends: a user error is one line, a bug a traceback.

One convention for every command:
  * exit 0: done, or help asked for (``--help``; absl commands also ``--helpshort``,
    ``--helpfull``, which absl itself ends with status 1);
  * exit 2 and one line ``error: <message>`` on stderr: an error the user can fix (a
    `SaejaxError`: bad config, bad data, a checkpoint that does not fit; a path that does not
    exist; a bad command line). A class may set ``exit_code`` to tell "the check ran and failed"
    from "the input is wrong";
  * a traceback (exit 1): any other exception, a bug.

Each command's ``__main__`` block calls `run(main)` (absl commands: `run(main, absl=True)`), and
argparse commands build their parser with `ArgumentParser`, whose errors are one line too (plain
argparse prints its usage and then the error). For absl commands, whatever fails while absl
parses the flags (an unknown flag, a missing ``--config``, an unknown ``--config.x`` key, a
``--config`` file that does not load) and an ``app.UsageError`` raised by ``main`` are bad
command lines. Commands that take a ``--config`` file check it first with `check_command_line`: a
missing file, or an override of a key the config lacks, is one line naming the closest keys.
``--debug`` anywhere on the command line, or ``SAEJAX_DEBUG=1`` in the environment, shows the
traceback of user errors too.
"""

import argparse
import difflib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from saejax.errors import ConfigError, SaejaxError

# Errors a user causes and can fix from the message alone; everything else is a bug.
USER_ERRORS = (SaejaxError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError)
DEBUG_FLAG = "--debug"
DEBUG_ENV = "SAEJAX_DEBUG"
EXIT_USER_ERROR = 2  # what argparse uses for a bad command line
# absl's help flags print the help and then exit 1, as if asking for help were an error.
ABSL_HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")


class BadCommandLine(SaejaxError):
  """An argument or flag that is unknown, missing or malformed."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are one `BadCommandLine` line (exit 2 through `run`), not the usage
  followed by the error; ``--help`` still prints the usage."""

  def error(self, message: str):
    raise BadCommandLine(f"{message} (see {self.prog} --help)")


def run(main: Callable[..., Any], argv: Sequence[str] | None = None, *, absl: bool = False) -> Any:
  """Run a command's ``main`` and turn user errors into one line on stderr and exit status 2.

  Args:
    main: the command; argparse commands are called as ``main(argv)``, absl commands through
      ``absl.app.run(main)`` (which parses the flags first).
    argv: the arguments after the program name; None reads ``sys.argv[1:]``. ``--debug`` is taken
      out before ``main`` sees them.
    absl: ``main`` is an absl ``main(argv)`` with flags defined at import.

  Returns:
    What ``main`` returns (absl's ``app.run`` never returns: it exits).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
  argv = [a for a in argv if a != DEBUG_FLAG]
  started = False

  def entered(*args):
    nonlocal started
    started = True
    if not absl:
      return main(*args)
    from absl import app
    try:
      return main(*args)
    except app.UsageError as e:  # absl would print the whole usage and exit 1
      raise BadCommandLine(str(e)) from e

  try:
    if absl:
      from absl import app
      return app.run(entered, argv=[sys.argv[0], *argv], flags_parser=_parse_absl_flags)
    return entered(argv)
  except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs just below
    flags_failed = absl and not started  # main never ran: absl failed to parse the flags
    if debug or not (isinstance(e, USER_ERRORS) or _config_file_error(e) or flags_failed):
      raise
    text = (message(e) if started or isinstance(e, SaejaxError)
            else f"bad command line: {type(e).__name__}: {e}")
    sys.stderr.write(f"error: {text}\n")
    sys.exit(getattr(e, "exit_code", EXIT_USER_ERROR))


def _parse_absl_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with its errors as `BadCommandLine` and its help flags ending in 0."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    text = " ".join(str(e).split())  # absl may wrap a message over several lines
    raise BadCommandLine(f"bad command line: {text} (--helpshort lists the flags)") from e
  except SystemExit as e:
    asked = {a.lstrip("-").split("=")[0] for a in argv[1:] if a.startswith("-")}
    if e.code == 1 and asked & set(ABSL_HELP_FLAGS):
      raise SystemExit(0) from None
    raise


def _config_file_error(e: BaseException) -> bool:
  """ml_collections' config_flags reports a --config file it cannot load as a bare IOError."""
  return isinstance(e, OSError) and "Failed loading config file" in str(e)


def message(e: BaseException) -> str:
  """The user-facing text of an error: OSErrors name their path; others carry their message."""
  if isinstance(e, SaejaxError):
    return str(e)
  if isinstance(e, OSError) and e.filename is not None:
    return f"{e.strerror or type(e).__name__}: {e.filename}"
  if _config_file_error(e):
    # Its last line is the cause, e.g. "[Errno 2] No such file or directory: 'configs/x.py'".
    return f"cannot load the --config file: {str(e).strip().splitlines()[-1].strip()}"
  return str(e) or type(e).__name__


def check_command_line(argv: list[str]) -> None:
  """Check ``--config`` and its ``--config.a.b=v`` overrides before absl parses them or anything
  starts: a config file that does not exist, or an override of a key the config lacks, is a
  `ConfigError` naming the section, the key and the closest valid keys.

  The commands that take a config file (``saejax.train``, ``saejax.train.aot``) call
  ``run(check_command_line)`` before ``run(main, absl=True)``.

  ml_collections would report a misspelt key as a bare ``AttributeError: "'kk'"`` from inside
  absl's flag parsing; a missing file only when the config is first read, after the workdir was
  made. Without ``--config`` on the command line (e.g. ``--help``) there is nothing to check.
  """
  spec, paths = _config_arguments(argv)
  if spec is None:
    return
  file, *arg = spec.split(":", 1)  # "file.py:arg" calls get_config(arg), as config_flags does
  if not Path(file).is_file():
    raise ConfigError(f"--config {file}: no such config file (e.g. configs/quickstart.py)")
  module_spec = importlib.util.spec_from_file_location("saejax_checked_config", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(*arg)
  for path in paths:
    _check_override(config, path)


def _config_arguments(argv: list[str]) -> tuple[str | None, list[str]]:
  """(the --config value or None, the dotted paths of the --config.* overrides), as config_flags
  reads them from the command line."""
  spec, paths = None, []
  for i, arg in enumerate(argv):
    if match := re.match(r"^-{1,2}config(=|$)", arg):  # --config=FILE or --config FILE
      following = argv[i + 1] if i + 1 < len(argv) else None
      spec = arg.split("=", 1)[1] if match.group(1) else following
    elif match := re.match(r"^-{1,2}(?:no)?config\.([^=]+)", arg):
      paths.append(match.group(1))
  return spec, paths


def _check_override(config, path: str) -> None:
  """Raise a `ConfigError` if the dotted `path` names a key that `config` (an
  ``ml_collections.ConfigDict``) does not have."""
  import ml_collections  # only the commands that take a config file need it
  section, where = config, "config"
  for key in path.split("."):
    if not isinstance(section, ml_collections.ConfigDict) or "[" in key:
      return  # a list, tuple or dataclass field: config_flags checks the rest
    keys = sorted(section.keys())
    if key not in keys:
      close = difflib.get_close_matches(key, keys, n=3)
      hint = f"did you mean {' or '.join(close)}? " if close else ""
      raise ConfigError(f"--config.{path}: {where} has no key '{key}'; {hint}"
                        f"its keys are {', '.join(keys) or '(none)'}")
    section, where = section[key], f"{where}.{key}"
