"""Host memory for XLA:CPU: a step's large temporaries on transparent huge pages.

XLA:CPU allocates a step's temporaries with malloc: at the recipe's stage 1 (S = 16,384 latents,
2,048 texts per step) several GB per step. glibc serves a block that large with a fresh ``mmap``
and unmaps it when it is freed, so every step faults every page of its temporaries in again, one
4 KiB page at a time: ~960,000 page faults and ~2.4 s of system time per stage-1 step on the 2-core
CPU, 29% of its CPU time (benchmarks/RESULTS.md, "Host memory").

The glibc tunable ``glibc.malloc.hugetlb=1`` has malloc ask for transparent huge pages
(``madvise(MADV_HUGEPAGE)``) on what it maps: one fault per 2 MiB instead of per 4 KiB, 167x fewer
faults, stage-1 head training 1.24x faster, and the same memory use (freed blocks still go back to
the system). Keeping freed blocks instead (``arena_max=1``, ``mmap_max=0``, no trimming) was faster
still but let the heap grow to 4x the working set through fragmentation, so it is not used.

glibc reads tunables once, when the process starts, so `reexec_with_tunables` starts the command
again, in place (same PID, arguments and file descriptors), with the tunable added to
``GLIBC_TUNABLES``. It does nothing where it would not apply or the allocator is the user's choice:
not Linux with glibc, ``GLIBC_TUNABLES`` already sets a ``glibc.malloc`` tunable, another allocator
is preloaded (``LD_PRELOAD`` of tcmalloc, jemalloc or mimalloc, as some TPU images do), or
``SAEJAX_MALLOC=system``. Where transparent huge pages are off (``never``) the tunable is harmless.
"""

import os
import platform
import sys

from saejax.errors import ConfigError

TUNABLES = ("glibc.malloc.hugetlb=1",)
OPT_OUT = "SAEJAX_MALLOC"  # "system": leave glibc's defaults


def tunables_env(environ: dict[str, str]) -> dict[str, str] | None:
  """The environment to re-execute with, or None where nothing should change (see module doc)."""
  choice = environ.get(OPT_OUT, "")
  if choice not in ("", "system"):
    raise ConfigError(f"{OPT_OUT}={choice!r}: expected 'system' (glibc's own malloc settings) or "
                      "unset (XLA:CPU's temporaries on huge pages)")
  current = environ.get("GLIBC_TUNABLES", "")
  if (choice == "system" or "glibc.malloc." in current
      or any(name in environ.get("LD_PRELOAD", "") for name in ("tcmalloc", "jemalloc", "mimalloc"))
      or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"):
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [current, *TUNABLES]))}


def reexec_with_tunables() -> None:
  """Re-execute this command with the malloc tunable, once (the new process finds it set).

  Call it first thing in a command's ``__main__`` block, before anything else runs: the process is
  replaced, so whatever ran before is done twice."""
  env = tunables_env(dict(os.environ))
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
