"""saejax.cli: a user error ends a command with one line on stderr, a bug with its traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from saejax import cli
from saejax.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/saejax-test-path"


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**os.environ, "SAEJAX_DEBUG": "", **env})


@pytest.mark.parametrize("args, says", [
    (("saejax.hub.convert", "hf-to-saejax", MISSING, "out"),
     f"model directory {MISSING} does not exist"),
    (("saejax.eval", "--model", MISSING, "--beir", MISSING, "--out", "out"),
     f"{MISSING} is neither a saejax training workdir"),
    # saejax.train.aot checks --config and its overrides as saejax.train does
    # (cli.check_command_line), before absl parses them: ml_collections alone would say only AttributeError: "'kk'".
    (("saejax.train.aot", f"--config={MISSING}.py"),
     f"--config {MISSING}.py: no such config file (e.g. configs/quickstart.py)"),
    (("saejax.train.aot", "--config=configs/base.py", "--config.sae.kk=3"),
     "--config.sae.kk: config.sae has no key 'kk'; did you mean k? its keys are b_pre_init, "
     "b_pre_init_batches, dead_after_tokens, enabled, k, k_aux, normalize_codes, num_latents"),
    (("saejax.train.aot", "--config", "configs/base.py", "--config.sea.k=3"),
     "--config.sea.k: config has no key 'sea'; did you mean sae? its keys are data, eval, loss, "),
])
def test_a_missing_path_is_one_line_and_exit_2(args, says):
  out = _run(*args)
  assert out.returncode == 2, out.stderr
  assert "Traceback" not in out.stderr
  lines = out.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: {says}"), lines


# One user error per command (`python -m <module>` for every module with a __main__ block): each
# ends with status 2 and one line, whether argparse, absl or the command itself saw it.
USER_ERRORS = [
    (("saejax.train",), "bad command line: flag --config=None: Flag --config must have a value"),
    (("saejax.train", "--config=configs/quickstart.py", "--no_such_flag"),
     "bad command line: Unknown command line flag 'no_such_flag'"),
    (("saejax.train", "--config=configs/quickstart.py", "extra"),  # app.UsageError in main
     "unexpected arguments ['extra']"),
    (("saejax.train.aot", "--config=configs/base.py", "--devices=many"),
     "bad command line: flag --devices=many: invalid literal for int()"),
    (("saejax.eval", "--beir", MISSING), "the following arguments are required: --out (see "),
    (("saejax.hub.export", "--out", "out"), "the following arguments are required: --ckpt"),
    (("saejax.hub.convert", "sideways", "a", "b"),
     "argument direction: invalid choice: 'sideways'"),
    (("saejax.interpret.explorer", "--run", MISSING, "--beir", MISSING, "--out", "x.html"),
     f"{MISSING} is not a saejax training workdir"),
    (("saejax.hub.demo", "--pairs", "many"), "argument --pairs: invalid int value: 'many'"),
    (("saejax.hub.corpus", "--run", MISSING, "--corpus", MISSING, "--out", "out"),
     f"corpus {MISSING} does not exist"),
    (("saejax.train.curves",), "the following arguments are required: workdir"),
    (("saejax.train.curves", MISSING), f"No such file or directory: {MISSING}/metrics.jsonl"),
]


@pytest.mark.parametrize("args, says", USER_ERRORS)
def test_every_command_ends_a_user_error_with_one_line_and_exit_2(args, says):
  out = _run(*args)
  assert out.returncode == 2, (out.returncode, out.stderr)
  lines = out.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: {says}"), lines


def test_every_command_is_checked():
  package = REPO / "saejax"
  commands = {".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__main__")
              for f in package.rglob("*.py") if 'if __name__ == "__main__":' in f.read_text()}
  assert commands == {args[0] for args, _ in USER_ERRORS}


@pytest.mark.parametrize("args, shows", [
    (("saejax.train", "--helpshort"), "--config"),
    (("saejax.train", "--help"), "--workdir"),
    (("saejax.train.aot", "--helpfull"), "--budget_gib"),
    (("saejax.eval", "--help"), "--quiet"),
    (("saejax.train.curves", "--help"), "WORKDIR/curves.png"),
])
def test_help_exits_0(args, shows):
  out = _run(*args)
  assert out.returncode == 0, (out.returncode, out.stderr)
  assert shows in out.stdout


def test_debug_shows_the_traceback():
  args = ("saejax.hub.convert", "hf-to-saejax", MISSING, "out")
  for out in (_run(*args, "--debug"), _run(*args, SAEJAX_DEBUG="1")):
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "CheckpointError: model directory" in out.stderr


def test_a_file_where_a_directory_goes_is_one_line(tmp_path, capsys):
  """mkdir(exist_ok=True) on a path that is a file (e.g. an --out directory) raises
  FileExistsError: the user's to fix, so one line and exit 2."""
  afile = tmp_path / "afile"
  afile.write_text("")
  with pytest.raises(SystemExit) as exit_info:
    cli.run(lambda argv: Path(argv[0]).mkdir(parents=True, exist_ok=True), [str(afile)])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == f"error: File exists: {afile}\n"


def test_user_errors_exit_2_and_bugs_keep_their_traceback(capsys):
  def missing_file(argv):
    open(MISSING)  # noqa: SIM115 - raises FileNotFoundError

  def bad_checkpoint(argv):
    raise CheckpointError(f"{argv[0]} has no config.json")

  def bug(argv):
    raise KeyError("internal")

  with pytest.raises(SystemExit) as exit_info:
    cli.run(missing_file, [])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == f"error: No such file or directory: {MISSING}\n"
  with pytest.raises(SystemExit) as exit_info:
    cli.run(bad_checkpoint, ["run1"])
  assert exit_info.value.code == 2 and capsys.readouterr().err == "error: run1 has no config.json\n"
  with pytest.raises(CheckpointError):
    cli.run(bad_checkpoint, ["run1", "--debug"])  # --debug: the traceback, and main never sees it
  with pytest.raises(KeyError):
    cli.run(bug, [])
  assert cli.run(lambda argv: argv, ["a", "--debug", "b"]) == ["a", "b"]
