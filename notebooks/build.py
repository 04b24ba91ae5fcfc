"""Regenerate notebooks/X.ipynb from notebooks/X.py (the jupytext source), with its outputs.

    python notebooks/build.py                  # every notebook, on runs/quickstart
    python notebooks/build.py steering         # only notebooks/steering.py
    python notebooks/build.py --run DIR --beir DIR --max-docs N
    python notebooks/build.py --tiny           # a 2-step tiny run, as tests/test_notebooks.py

Each source runs top to bottom in a fresh kernel (nbclient) from the repository root, its
parameters passed as the SAEJAX_* environment variables the notebooks read. The .ipynb gets a
header cell naming its source and this command, the source's SHA-256 in its metadata, and no
timings, stderr or kernel details, so that rebuilding an unchanged notebook changes no bytes
beyond what the run computes. `tests/test_notebooks.py::test_ipynb_in_sync` fails when an .ipynb
is missing or its cells or recorded hash differ from its source. The plots each notebook saves
go to a temporary folder, not into the repository.
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "notebooks"
COMMAND = "python notebooks/build.py"
HEADER_TAG = "generated-from-source"


def sources() -> list[Path]:
  """The jupytext notebooks: every .py here but this script."""
  return sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name)


def source_sha256(py: Path) -> str:
  return hashlib.sha256(py.read_bytes()).hexdigest()


def header_cell(py: Path):
  import nbformat
  cell = nbformat.v4.new_markdown_cell(
      f"*Generated from [`{py.name}`]({py.name}) by `{COMMAND}`, with the outputs of that run. "
      f"Edit `{py.name}`, not this file, and rerun the command; `tests/test_notebooks.py` fails "
      "when the two differ.*")
  cell.metadata["tags"] = [HEADER_TAG]
  return cell


def build(py: Path, env: dict[str, str | None], timeout: int) -> Path:
  """Executes `py` with `env` (None: unset) and writes its .ipynb beside it."""
  import jupytext
  import nbclient
  import nbformat
  nb = jupytext.read(py)
  nb.cells.insert(0, header_cell(py))
  for i, cell in enumerate(nb.cells):  # stable ids: no churn between builds
    cell.id = f"cell-{i}"
  old = {k: os.environ.get(k) for k in env}
  for k, v in env.items():  # the kernel inherits this process' environment
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  try:
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(REPO)}}).execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  for cell in nb.cells:
    cell.metadata.pop("execution", None)
    if cell.cell_type == "code":
      cell.outputs = [o for o in cell.outputs
                      if not (o.output_type == "stream" and o.name == "stderr")]
  nb.metadata = nbformat.from_dict({
      "kernelspec": nb.metadata.get("kernelspec", {"display_name": "Python 3",
                                                   "language": "python", "name": "python3"}),
      "language_info": {"name": "python"},
      "saejax": {"source": py.name, "source_sha256": source_sha256(py), "built_by": COMMAND}})
  out = py.with_suffix(".ipynb")
  nbformat.validate(nb)
  nbformat.write(nb, out)
  return out


def tiny_run(workdir: Path) -> Path:
  """A 2-step random-init run (tests/tiny_config.py), as tests/conftest.py's `tiny_run`."""
  subprocess.run([sys.executable, "-m", "saejax.train", "--config=tests/tiny_config.py:2",
                  f"--workdir={workdir}"], cwd=REPO, check=True, capture_output=True)
  return workdir


def _shown(path: Path) -> str:
  """`path` relative to the repository (where the kernel runs) when inside it, as outputs print."""
  return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("names", nargs="*", help="notebooks to build (default: all), e.g. steering")
  p.add_argument("--run", type=Path, default=REPO / "runs/quickstart",
                 help="training workdir the notebooks read (default: runs/quickstart)")
  p.add_argument("--beir", type=Path, default=REPO / "data/debian-quickstart/beir-dev",
                 help="BEIR folder (default: data/debian-quickstart/beir-dev)")
  p.add_argument("--split", default="dev")
  p.add_argument("--max-docs", type=int, default=1000)
  p.add_argument("--ks", default="", help="sparsity_tradeoff's k values, e.g. 8,16,32")
  p.add_argument("--tiny", action="store_true",
                 help="train a tiny 2-step run in a temporary folder and use it (60 documents)")
  p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
  args = p.parse_args(argv)

  known = {py.stem: py for py in sources()}
  unknown = [n for n in args.names if Path(n).stem not in known]
  if unknown:
    print(f"error: no notebook {unknown} in {HERE} (have: {', '.join(known)})", file=sys.stderr)
    return 2
  todo = [known[Path(n).stem] for n in args.names] or list(known.values())

  with tempfile.TemporaryDirectory(prefix="saejax-notebooks-") as tmp:
    run, max_docs, ks = args.run.resolve(), args.max_docs, args.ks
    if args.tiny:
      print("training a tiny run ...", flush=True)
      run, max_docs, ks = tiny_run(Path(tmp) / "run"), 60, ks or "4,8"
    elif not (run / "config.json").is_file():
      print(f"error: {args.run} is not a training workdir (no config.json): run the quickstart "
            "first (python -m saejax.train --config configs/quickstart.py --workdir "
            "runs/quickstart), or pass --run DIR, or --tiny for a tiny run", file=sys.stderr)
      return 2
    if not (args.beir / "corpus.jsonl").is_file():
      print(f"error: {args.beir} has no corpus.jsonl: pass --beir DIR (a BEIR folder)",
            file=sys.stderr)
      return 2
    env = {"SAEJAX_RUN": _shown(run), "SAEJAX_RUNS": None,
           "SAEJAX_BEIR": _shown(args.beir.resolve()), "SAEJAX_SPLIT": args.split,
           "SAEJAX_MAX_DOCS": str(max_docs), "SAEJAX_KS": ks or None,
           "SAEJAX_OUT": str(Path(tmp) / "plots")}
    for py in todo:
      print(f"{py.relative_to(REPO)} ...", flush=True)
      out = build(py, env, args.timeout)
      print(f"  wrote {out.relative_to(REPO)} ({out.stat().st_size / 1024:.0f} KB)", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
