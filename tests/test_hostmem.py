"""saejax.hostmem: commands re-execute once with the glibc malloc tunable that puts large blocks on
transparent huge pages, so a block allocated, touched and freed again and again (as XLA:CPU's
temporaries each step) takes one page fault per 2 MiB instead of one per 4 KiB."""

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from saejax import hostmem
from saejax.errors import ConfigError

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="the tunables are glibc's (Linux)")
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
needs_thp = pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(),
                               reason="transparent huge pages are off on this kernel")


@needs_glibc
def test_tunables_env_adds_malloc_tunables_and_keeps_the_users():
  env = hostmem.tunables_env({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.cpu.x86_ibt=off"})
  assert hostmem.TUNABLES == ("glibc.malloc.hugetlb=1",)
  assert env["PATH"] == "/bin"
  assert env["GLIBC_TUNABLES"].split(":") == ["glibc.cpu.x86_ibt=off", *hostmem.TUNABLES]
  assert hostmem.tunables_env({})["GLIBC_TUNABLES"] == ":".join(hostmem.TUNABLES)


@pytest.mark.parametrize("environ", [
    {"SAEJAX_MALLOC": "system"},
    {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"},  # the user's own malloc setting
    {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"},
    {"LD_PRELOAD": "/opt/libjemalloc.so.2"},
])
def test_tunables_env_leaves_a_chosen_allocator_alone(environ):
  assert hostmem.tunables_env(environ) is None


def test_a_misspelt_opt_out_is_one_error_line(tmp_path):
  with pytest.raises(ConfigError, match="SAEJAX_MALLOC='off': expected 'system'"):
    hostmem.tunables_env({"SAEJAX_MALLOC": "off"})
  out = subprocess.run([sys.executable, "-m", "saejax.train", "--config=tests/tiny_config.py:1",
                        f"--workdir={tmp_path / 'run'}"],
                       env={**os.environ, "SAEJAX_MALLOC": "off"}, cwd=Path(__file__).parents[1],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and out.stdout == "" and not (tmp_path / "run").exists()
  assert out.stderr.strip().splitlines() == [
      "error: SAEJAX_MALLOC='off': expected 'system' (glibc's own malloc settings) or unset "
      "(XLA:CPU's temporaries on huge pages)"]


# A worker thread allocates, touches and frees 256 MiB three times with glibc's malloc (as XLA:CPU
# does with a step's temporaries); the page faults per 4 KiB page of the last two rounds.
CHILD = textwrap.dedent("""
    import ctypes, os, resource, sys, threading
    from saejax import hostmem
    print("started", flush=True)
    hostmem.reexec_with_tunables()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    size, faults = 256 << 20, []

    def rounds():
      for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(ctypes.c_void_p(p))
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

    t = threading.Thread(target=rounds)
    t.start()
    t.join()
    pages = size // os.sysconf("SC_PAGE_SIZE")
    print("argv", sys.argv[1:], "tunables", os.environ.get("GLIBC_TUNABLES", ""))
    print("refault", max(faults[1:]) / pages)
""")


def run_child(extra_env: dict) -> str:
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "SAEJAX_MALLOC")}
  out = subprocess.run([sys.executable, "-c", CHILD, "a", "--b=1"], env={**env, **extra_env},
                       capture_output=True, text=True, timeout=120, check=True).stdout
  return out


@needs_glibc
@needs_thp
def test_reexec_puts_large_blocks_on_huge_pages_and_keeps_the_command_line():
  out = run_child({})
  assert out.count("started") == 2  # ran once, then re-executed once (not again)
  assert "argv ['a', '--b=1']" in out
  assert ":".join(hostmem.TUNABLES) in out
  refault = float(out.split("refault")[1])
  assert refault < 0.05, out  # ~1 / 512: one fault per 2 MiB page (with margin for a few 4 KiB)

  # The control, so the check above can fail: with glibc's defaults every 4 KiB page faults.
  out = run_child({"SAEJAX_MALLOC": "system"})
  assert out.count("started") == 1
  assert float(out.split("refault")[1]) > 0.5, out


@needs_glibc
def test_the_training_command_runs_with_the_tunable(tiny_run):
  """`python -m saejax.train` re-executes itself with it (summary.json records the setting)."""
  summary = json.loads((tiny_run / "summary.json").read_text())
  assert summary["glibc_tunables"].split(":")[-len(hostmem.TUNABLES):] == list(hostmem.TUNABLES)
