"""``python -m saejax.train --config configs/X.py --workdir DIR``: train, then evaluate if the
config asks for it (`saejax.train.loop.main`). DIR may be a bucket, ``gs://BUCKET/PATH``."""

from saejax import cli, hostmem

# First, before the heavy imports below: the command restarts here once, with the malloc setting
# that puts XLA:CPU's large temporaries on huge pages (saejax.hostmem); a bad SAEJAX_MALLOC is one
# error line.
cli.run(lambda _argv: hostmem.reexec_with_tunables())

from absl import flags  # noqa: E402  pylint: disable=wrong-import-position

from saejax.train import loop  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  cli.run(cli.check_command_line)  # a misspelt override or a missing file: one line, nothing made
  cli.run(loop.main, absl=True)
