"""``python -m saejax.train --config configs/X.py --workdir DIR``: train, then evaluate if the
config asks for it (`saejax.train.loop.main`). DIR may be a bucket, ``gs://BUCKET/PATH``."""

from absl import flags

from saejax import cli
from saejax.train import loop

if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  cli.run(cli.check_command_line)  # a misspelt override or a missing file: one line, nothing made
  cli.run(loop.main, absl=True)
