"""GPU measurements: the cuDNN attention path, ModernBERT parity on the card, and bf16 training
speed + MFU of ModernBERT-base + SAE against PyTorch (sentence-transformers CSR) on the same card.

One script, one device call: every section is independent (a failure is recorded and the next one
runs), each result is written to ``$OUT/gpu_results.json`` as soon as it exists, and a markdown
summary is printed last.

Sections:
  env        versions, device kind.
  ceiling    the card's bf16 matmul rate (8192^3, JAX), the MFU denominator next to the datasheet.
  attention  saejax's cuDNN backend vs an fp32 XLA reference on bf16 inputs with padding, global
             and ModernBERT-windowed, T = 512 .. 8192: max error on valid rows; fwd+bwd time of the
             cudnn and xla backends.
  parity     a random ModernBERT-base written by transformers, read by `saejax.hub.convert.load_hf`;
             last hidden states on the GPU: saejax fp32 (xla) vs transformers fp32 (sdpa), and
             saejax bf16 (cudnn) vs the same reference (relative Frobenius error on valid tokens).
  variants   one layer's attention fwd+bwd computed each way saejax could (cuDNN with a mask, with
             lengths, block-local; XLA with a mask, block-local) at the training shapes and at
             2k / 8k tokens.
  train      one full training step (ModernBERT-base + TopK SAE S=16,384 k=64, InfoNCE with one hard
             negative + FVU + AuxK, AdamW) in bf16 compute / fp32 master weights:
               saejax   `saejax.train.step.train_step` jitted, donated, attention cudnn (and xla);
                        `--backends cudnn:old` etc. trace it with earlier code (STEP_VARIANTS), and
                        `--profile` adds each step's GPU kernel time and HLO to $OUT (read them
                        with results/gpu_h200_2026-12-04/attribute.py)
               PyTorch  sentence-transformers SparseEncoder([Transformer, Pooling(mean),
                        SparseAutoEncoder]) + CSRLoss(SparseMultipleNegativesRankingLoss), autocast
                        bf16 (what SparseEncoderTrainer(bf16=True) does), fused AdamW, grad clipping;
                        with `--torch-compile` also its ModernBERT under torch.compile
             Same weights, same token ids (random, no padding: both sides do the same work).
             Reports step time, tokens/s, ratio and MFU (model FLOPs = 6 x non-embedding params per
             token + attention 12 x L x T_eff x D per token, T_eff = window for local layers),
             each step waited for (`timed`) and, as a training loop runs them, steps back to back
             with one wait at the end (`pipelined`; both sides alike).
  encode     corpus encoding in bf16 of real Debian texts: saejax `encode_sparse` (cudnn, length
             buckets) against the same model exported by `saejax.hub.export` and run by
             `SparseEncoder.encode`; texts/s and the overlap of the active latent sets.

The GPU image lacks ml_collections (imported by saejax.hub.export): carry its wheel in .gpu/whl and
install it with `pip install --target` before the run (see RESULTS.md for the exact commands).

    python benchmarks/bench_gpu.py --budget-s 420

Session 35's step comparison (RESULTS.md "GPU", 2026-12-04, run 5), about 7 minutes on an H200:

    python3 benchmarks/bench_gpu.py --budget-s 400 --backends cudnn cudnn:no_fused_add \
      cudnn:no_cmdbuf --profile --torch-compile --skip attention encode parity variants

Prepared in session 36 for the next GPU (no device was lent then), about 9 minutes: session 36's
cuDNN changes against the old code, the trials, and the shipped step at 128 and 256 records:

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD python3 benchmarks/bench_gpu.py \
      --budget-s 520 --backends cudnn cudnn:no_skip_dbias cudnn:try_carry cudnn:try_cudnn_gemm \
      cudnn:try_gemm_any cudnn:try_ln_bwd cudnn:try_triton_ws cudnn:try_band_lengths \
      --sweep-records 128 256 \
      --profile --torch-compile --skip tests attention encode parity variants

then, in a second call, the GPU tests and the fp32 tests on the card (the suite's precision pin,
`tests/conftest.py`):

    python3 -m pytest -q -p no:cacheprovider -rf tests/test_modernbert.py tests/test_losses.py \
      tests/test_sae.py tests/test_bert.py tests/test_attention.py tests/test_fused_norm.py

A CPU smoke run of the script (~2 min on 2 cores): the cuDNN backend needs a GPU, so the step is
timed with `--backends xla`, and parity's bf16 cuDNN half records an error after its fp32 half:

    OUT=/tmp/smoke python benchmarks/bench_gpu.py --small --torch-device cpu --records 8 --steps 2 \
      --latents 1024 --k 16 --doc-len 64 --encode-texts 64 --encode-batch 32 --backends xla \
      --torch-compile --skip tests attention \
      --tokenizer ../shared/data/modernbert-tokenizer/tokenizer.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))



def _modernbert_base() -> dict:
  """configs/base.py's MODERNBERT_BASE, read without importing the config (and ml_collections,
  which the GPU image lacks)."""
  import ast
  tree = ast.parse((REPO / "configs" / "base.py").read_text())
  node = next(n for n in tree.body if isinstance(n, ast.Assign)
              and getattr(n.targets[0], "id", "") == "MODERNBERT_BASE")
  return {kw.arg: ast.literal_eval(kw.value) for kw in node.value.keywords}


ARCH = _modernbert_base()         # --small shrinks it for a CPU smoke run of this script
DEVICE = "cuda"                   # torch device; --torch-device cpu for the smoke run
RESULTS: dict = {}
START = time.time()
OUT = Path(os.environ.get("OUT", "/tmp/bench_gpu"))


def record(name: str, value) -> None:
  RESULTS[name] = value
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / "gpu_results.json").write_text(json.dumps(RESULTS, indent=2, default=str) + "\n")
  print(f"[{time.time() - START:6.1f}s] {name}: {json.dumps(value, default=str)[:1500]}", flush=True)


def section(fn):
  @functools.wraps(fn)
  def run(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - record and go on to the next section
      record(f"{fn.__name__}_error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
  return run


def timed(fn, reps: int, warmup: int = 2, sync=None) -> list[float]:
  """Wall times of `reps` calls after `warmup`; `sync` waits for the device."""
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t)
  return times


def pipelined(fn, steps: int, rounds: int = 3, sync=None) -> list[float]:
  """Seconds a step of `rounds` runs of `steps` back-to-back calls, each run waited for once at
  its end: how a training loop runs them (`saejax.train` reads a step's metrics one step late, so
  the host never waits for the step it has just dispatched). `timed` waits after every call,
  which leaves the GPU idle while the host returns, syncs and dispatches the next step."""
  per_step = []
  for _ in range(rounds):
    t = time.perf_counter()
    for _ in range(steps):
      out = fn()
    sync(out)
    per_step.append((time.perf_counter() - t) / steps)
  return per_step


@section
def env():
  import flax
  import jax
  import torch
  import transformers
  try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
  except OSError as e:
    smi = str(e)
  record("env", {"jax": jax.__version__, "flax": flax.__version__, "torch": torch.__version__,
                 "transformers": transformers.__version__,
                 "device": jax.devices()[0].device_kind, "nvidia_smi": smi})


@section
def ceiling():
  import jax
  import jax.numpy as jnp
  n = 8192
  keys = jax.random.split(jax.random.key(0), 4)
  pairs = [(jax.random.normal(keys[i], (n, n), jnp.bfloat16),
            jax.random.normal(keys[i + 1], (n, n), jnp.bfloat16)) for i in (0, 2)]
  mm = jax.jit(lambda a, b: a @ b)
  i = iter(range(10**9))
  times = timed(lambda: mm(*pairs[next(i) % 2]), reps=20, warmup=3, sync=jax.block_until_ready)
  record("ceiling", {"bf16_matmul_tflops": 2 * n**3 / statistics.median(times) / 1e12})


@section
def attention_check(budget_end: float):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from saejax.models import attention as attn
  rows = []
  for t, window, b in ((512, None, 16), (512, 64, 16), (2048, 64, 4), (8192, 64, 1), (8192, None, 1)):
    if time.time() > budget_end:
      break
    n, h = 12, 64
    ks = jax.random.split(jax.random.key(t + (window or 0)), 3)
    q, k, v = (jax.random.normal(key, (b, t, n, h), jnp.bfloat16) for key in ks)
    lengths = np.full(b, t)
    lengths[-1] = t // 3  # one padded row
    valid = jnp.asarray(np.arange(t)[None, :] < lengths[:, None])
    ref = attn.attention(*(x.astype(jnp.float32) for x in (q, k, v)), valid=valid, window=window,
                         backend="xla")
    out = jax.jit(functools.partial(attn.attention, window=window, backend="cudnn"))(
        q, k, v, valid=valid)
    vm = np.asarray(valid)[:, :, None, None]
    err = float(np.max(np.abs(np.asarray(out, np.float32) - np.asarray(ref)) * vm))
    rel = float(np.linalg.norm((np.asarray(out, np.float32) - np.asarray(ref)) * vm)
                / np.linalg.norm(np.asarray(ref) * vm))
    row = {"T": t, "window": window, "batch": b, "max_abs_err": err, "rel_err": rel}
    for backend in ("cudnn", "xla"):
      loss = jax.jit(jax.grad(lambda q, k, v: attn.attention(
          q, k, v, valid=valid, window=window, backend=backend).astype(jnp.float32).sum(),
          argnums=(0, 1, 2)))
      try:
        ts = timed(lambda: loss(q, k, v), reps=10, sync=jax.block_until_ready)
        row[f"{backend}_fwd_bwd_ms"] = 1e3 * statistics.median(ts)
      except Exception as e:  # noqa: BLE001 - e.g. out of memory for xla at 8k
        row[f"{backend}_fwd_bwd_ms"] = f"{type(e).__name__}: {str(e)[:200]}"
    rows.append(row)
    record("attention", rows)


ATTENTION_VARIANTS = ("cudnn_mask", "cudnn_lengths", "cudnn_lengths_raw", "cudnn_blocks",
                      "xla_mask", "xla_blocks")


def attention_variant(name: str, window: int | None):
  """(q, k, v, valid) -> out for one way of computing the same attention (ATTENTION_VARIANTS)."""
  from saejax.models import attention as attn
  if name == "cudnn_mask":       # what saejax did before: padding and window as one boolean mask
    return lambda q, k, v, valid: attn._cudnn_attention(q, k, v, attn.window_mask(valid, window))
  if name == "cudnn_lengths":    # global layers now: lengths, non-prefix rows made NaN
    return lambda q, k, v, valid: attn._cudnn_padded(q, k, v, valid)
  if name == "cudnn_lengths_raw":   # the same without that guard: the guard's cost
    return lambda q, k, v, valid: attn._cudnn_attention(
        q, k, v, lengths=valid.sum(-1, dtype="int32"))
  if name in ("cudnn_blocks", "xla_blocks"):
    masked = attn._cudnn_attention if name.startswith("cudnn") else attn._xla_attention
    return lambda q, k, v, valid: attn._local_blocks(q, k, v, valid, window, masked)
  if name == "xla_mask":
    return lambda q, k, v, valid: attn._xla_attention(q, k, v, attn.window_mask(valid, window))
  raise ValueError(name)


@section
def attention_variants(budget_end: float):
  """fwd+bwd time of each way to compute one layer's attention at the training shapes (and long
  windowed rows), bf16, no padding (as the train section); each output's relative error against
  the row's first variant (cuDNN with a mask)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  rows = []
  n, h = ARCH["num_attention_heads"], ARCH["hidden_size"] // ARCH["num_attention_heads"]
  w = ARCH["local_attention"] // 2
  shapes = [(128, 256, None), (128, 256, w), (64, 32, None), (64, 32, w), (4, 2048, w),
            (1, 8192, w), (1, 8192, None)][:4 if DEVICE == "cpu" else None]  # smoke: short rows
  for b, t, window in shapes:
    ks = jax.random.split(jax.random.key(t + b), 4)
    q, k, v, cot = (jax.random.normal(key, (b, t, n, h), jnp.bfloat16) for key in ks)
    valid = jnp.ones((b, t), bool)
    row = {"batch": b, "T": t, "window": window}
    ref = None
    for name in ATTENTION_VARIANTS:
      if time.time() > budget_end:
        break
      if (window is None) != (name in ("cudnn_lengths", "cudnn_lengths_raw")) and \
          name not in ("cudnn_mask", "xla_mask"):
        continue
      if "blocks" in name and not (window and 3 * window < t):
        continue
      if name == "xla_mask" and t > 2048:
        continue                 # T x T fp32 logits of 8k tokens: slow and not a contender
      fn = attention_variant(name, window)
      step = jax.jit(jax.value_and_grad(
          lambda q, k, v: jnp.sum(fn(q, k, v, valid).astype(jnp.float32) * cot), argnums=(0, 1, 2)))
      try:
        out = np.asarray(jax.jit(fn)(q, k, v, valid), np.float32)
        ref = out if ref is None else ref
        ts = timed(lambda: step(q, k, v), reps=10, sync=jax.block_until_ready)
        row[name] = {"fwd_bwd_ms": 1e3 * statistics.median(ts),
                     "rel_err_vs_first": float(np.linalg.norm(out - ref) / np.linalg.norm(ref))}
      except Exception as e:  # noqa: BLE001
        row[name] = f"{type(e).__name__}: {str(e)[:300]}"
    rows.append(row)
    record("attention_variants", rows)


def gpu_kernel_profile(fn, steps: int, name: str) -> dict:
  """Run `fn` `steps` times under jax.profiler; GPU kernel time by kernel name from the perfetto
  trace (busy time, the share of each kernel, and how much of the wall time the GPU was idle)."""
  import glob
  import gzip
  import shutil
  logdir = Path(tempfile.mkdtemp())
  import jax
  jax.block_until_ready(fn())
  start = time.perf_counter()
  with jax.profiler.trace(str(logdir), create_perfetto_trace=True):
    for _ in range(steps):
      jax.block_until_ready(fn())
  wall = time.perf_counter() - start
  path = glob.glob(str(logdir / "**/perfetto_trace.json.gz"), recursive=True)[0]
  OUT.mkdir(parents=True, exist_ok=True)
  shutil.copy(path, OUT / f"trace_{name}.json.gz")
  data = json.load(gzip.open(path))
  events = data["traceEvents"] if isinstance(data, dict) else data
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu = {pid for pid, pname in procs.items() if "GPU" in pname or "gpu" in pname}
  kernels: dict[str, list[float]] = {}
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in gpu:
      kernels.setdefault(e["name"], []).append(e.get("dur", 0.0))
  busy = sum(sum(v) for v in kernels.values())
  top = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:40]
  return {"steps": steps, "wall_ms_per_step": 1e3 * wall / steps,
          "gpu_busy_ms_per_step": busy / 1e3 / steps, "processes": sorted(procs.values()),
          "kernels": [{"name": k[:160], "ms_per_step": sum(v) / 1e3 / steps, "calls": len(v) // steps,
                       "share": sum(v) / busy if busy else 0} for k, v in top]}


def modernbert_base_dir(tmp: Path, tokenizer: Path) -> Path:
  """A random ModernBERT-base saved by transformers, with the real tokenizer beside it."""
  import torch
  import transformers

  torch.manual_seed(0)
  cfg = transformers.ModernBertConfig(**{k: v for k, v in ARCH.items() if k != "model_type"})
  model = transformers.ModernBertModel(cfg)
  path = tmp / "modernbert-base-random"
  model.save_pretrained(path)
  tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer), pad_token="[PAD]",
                                             cls_token="[CLS]", sep_token="[SEP]",
                                             mask_token="[MASK]", unk_token="[UNK]")
  tok.save_pretrained(path)
  return path


@section
def parity(model_dir: Path):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers

  from saejax.hub import convert
  rng = np.random.default_rng(0)
  b, t = 4, 1024
  ids = rng.integers(5, 50000, size=(b, t))
  lengths = np.array([t, t, 700, 130])
  valid = np.arange(t)[None, :] < lengths[:, None]
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  ref_model = transformers.ModernBertModel.from_pretrained(
      model_dir, attn_implementation="sdpa", dtype=torch.float32).to(DEVICE).eval()
  with torch.no_grad():
    ref = ref_model(input_ids=torch.tensor(ids).to(DEVICE),
                    attention_mask=torch.tensor(valid.astype(np.int64)).to(DEVICE)
                    ).last_hidden_state
  ref = ref.float().cpu().numpy()
  del ref_model
  vm = valid[:, :, None]
  out = {}
  for name, dtype, backend in (("fp32_xla", "float32", "xla"), ("bf16_cudnn", "bfloat16", "cudnn"),
                               ("bf16_xla", "bfloat16", "xla")):
    _, enc = convert.load_hf(model_dir, head=False, dtype=dtype, attention_backend=backend)
    from flax import nnx
    fwd = nnx.jit(lambda m, i, v: m(i, v))
    with jax.default_matmul_precision("highest"):
      h = np.asarray(fwd(enc, jnp.asarray(ids), jnp.asarray(valid)), np.float32)
    out[name] = float(np.linalg.norm((h - ref) * vm) / np.linalg.norm(ref * vm))
    record("parity_rel_err_vs_torch_fp32", out)


# The step's model as saejax had it before sessions 34 and 35, feature by feature, for A/B rows:
#   ln       LayerNorm's backward written out (`params._layer_norm_bwd`); before: autodiff
#   split    Wqkv and Wi as GEMMs on column slices of the weight; before: one GEMM and a split
#   lengths  global cuDNN attention with padding as lengths; before: a [B, 1, T, T] mask
#   blocks   windowed attention block-local from T >= 8w; before: always the full T x T
# and since session 35:
#   fused_ln  LayerNorm as Triton kernels (`fused_norm`) on the cudnn path; before: params.layer_norm
#   fused_add the residual add before each block's MLP norm inside that kernel; before: an XLA add
# and since session 36:
#   skip_dbias   cuDNN's backward no longer writes the gradient of a mask given as a bias
#                (`attention._mask_without_gradient`); before: a [B, 1, T, T] dbias per layer
#   short_window a window covering every pair (the 32-token queries' local layers) is no window:
#                lengths, no mask; before: an all-True band mask
FEATURES = ("ln", "split", "lengths", "blocks", "fused_ln", "fused_add", "skip_dbias",
            "short_window")
# Changes not in saejax, measured as A/B rows and not adopted (RESULTS.md "GPU", session 35):
#   rope_lowp   RoPE in the compute dtype (bf16) instead of fp32 (-0.4 ms of 78.6, within noise)
#   xla_short   XLA's attention instead of cuDNN's for sequences of at most 64 tokens (queries) (0)
#   ln_wide     the LayerNorm kernels on tiles of 8 rows (8,192 elements) with 8 warps, not 4 and 4
#               (+2.1 ms)
# and for a next GPU run:
#   carry       the end-of-block residual add moved into the next norm's kernel: each block hands
#               (x, mlp output) on and the next attn_norm (or final_norm) adds them (2.4 ms of
#               standalone adds in run 5); the A/B row is prepared here, off the shipped path
#   band_lengths windowed cuDNN layers (T < 8w) with padding as lengths and the band alone as a
#               [1, 1, T, T] mask shared by the batch, not a [B, 1, T, T] one
#   ln_bwd      the LayerNorm backward kernel with at least 1,024 programs (one tile each for the
#               query pass, 64 programs of 8 now) and its tile loop pipelined by Triton (3 stages):
#               run 5's backward kernels moved ~2.1-2.8 TB/s against ~4 for XLA's elementwise ones
TRIALS = ("rope_lowp", "xla_short", "ln_wide", "carry", "band_lengths", "ln_bwd")
# --backends BACKEND:VARIANT -> (FEATURES switched back to the old code or TRIALS switched on, XLA
# compiler options; None: the options saejax trains with, `step.compiler_options()`, which turn
# XLA's DotMerger off)
STEP_VARIANTS = {
    "new": ((), None),
    "old": (FEATURES, {}),
    "no_ln": (("ln",), None),
    "no_split": (("split",), None),
    "no_lengths": (("lengths",), None),
    "no_fused_ln": (("fused_ln",), None),
    "no_fused_add": (("fused_add",), None),
    # cuBLAS for every matmul instead of XLA's Triton GEMM fusions (casts fused into the GEMM)
    "cublas": ((), {"xla_gpu_enable_triton_gemm": False, "xla_gpu_dot_merger_threshold_mb": 0}),
    # XLA's default DotMerger: GEMMs sharing a weight (the query and document passes) run as one
    # over a concatenation of their inputs
    "dot_merger": ((), {}),
    # XLA's command buffers (CUDA graphs) off: how much of the step's launch gaps they close
    "no_cmdbuf": ((), {"xla_gpu_dot_merger_threshold_mb": 0, "xla_gpu_enable_command_buffer": ""}),
    "try_rope_lowp": (("rope_lowp",), None),
    "try_xla_short": (("xla_short",), None),
    "try_ln_wide": (("ln_wide",), None),
    "try_carry": (("carry",), None),
    "try_band_lengths": (("band_lengths",), None),
    "try_ln_bwd": (("ln_bwd",), None),
    # XLA's Triton GEMMs wherever they apply, so elementwise producers (GeGLU's gelu(h) * gate,
    # casts) can be fused into the GEMM that reads them instead of being written out first
    "try_gemm_any": ((), {"xla_gpu_dot_merger_threshold_mb": 0, "xla_gpu_triton_gemm_any": True}),
    # cuDNN's GEMM fusions as a third candidate for XLA's GEMM autotuner (level 3: elementwise
    # prologues and epilogues, what GeGLU and the residual adds would need)
    "try_cudnn_gemm": ((), {"xla_gpu_dot_merger_threshold_mb": 0,
                            "xla_gpu_cudnn_gemm_fusion_level": 3}),
    # XLA's Triton GEMMs with Hopper warp specialisation (its Triton GEMM fusions took 4.8 ms of
    # run 5's GPU time, the split-K weight gradients among them)
    "try_triton_ws": ((), {"xla_gpu_dot_merger_threshold_mb": 0,
                           "xla_gpu_experimental_enable_triton_warp_specialization": True}),
    "no_skip_dbias": (("skip_dbias",), None),
    "no_short_window": (("short_window",), None),
}


def _old_layer_norm(x, scale, bias, eps):
  import jax
  import jax.numpy as jnp
  dtype = x.dtype
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(dtype)


def _old_attention_call(self, x, valid):
  from saejax.models import modernbert as mb
  b, t, d = x.shape
  qkv = mb.linear(x, self.wqkv[...]).reshape(b, t, 3, self.num_heads, self.head_dim)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  cos, sin = mb.rope_tables(mb.jnp.arange(t), self.head_dim, self.theta)
  q, k = mb.apply_rope(q, cos, sin), mb.apply_rope(k, cos, sin)
  out = mb.attention(q, k, v, valid=valid, window=self.window, backend=self.backend)
  return mb.linear(out.reshape(b, t, d), self.wo[...])


def _old_geglu_call(self, x):
  from saejax.models import modernbert as mb
  h, gate = mb.jnp.split(mb.linear(x, self.wi[...]), 2, axis=-1)
  return mb.linear(mb.gelu(h) * gate, self.wo[...])


def _rope_lowp(x, cos, sin):
  from saejax.models import modernbert as mb
  x1, x2 = mb.jnp.split(x, 2, axis=-1)
  rotated = mb.jnp.concatenate([-x2, x1], axis=-1)
  return x * cos[None, :, None, :].astype(x.dtype) + rotated * sin[None, :, None, :].astype(x.dtype)


def _carry_model_call(self, input_ids, valid=None):
  """ModernBert.__call__ (no remat, no mesh: as this benchmark runs it) with every residual add
  inside a norm kernel: block i's MLP output is added to x by block i + 1's attn_norm."""
  x = self.emb_norm(self.tok_embeddings[...][input_ids].astype(self.cfg.dtype))
  pending = None
  for block in self.layers:
    if pending is None:
      h = block.attn_norm(x) if block.attn_norm is not None else x
    else:
      x, h = block.attn_norm.add(x, pending)
    x, h = block.mlp_norm.add(x, block.attn(h, valid))
    pending = block.mlp(h)
  return self.final_norm.add(x, pending)[1]


def _xla_when_short(attention):
  def call(q, k, v, *, valid, window=None, backend="xla"):
    short = backend == "cudnn" and q.shape[1] <= 64
    return attention(q, k, v, valid=valid, window=window, backend="xla" if short else backend)
  return call


def _mask_short_windows(attention):
  """Session 35's routing: a window covering every pair still went to cuDNN as a band mask."""
  from saejax.models import attention as attn

  def call(q, k, v, *, valid, window=None, backend="xla"):
    if backend == "cudnn" and window is not None and window >= q.shape[1] - 1:
      return attn._cudnn_attention(q, k, v, attn.window_mask(valid, window))
    return attention(q, k, v, valid=valid, window=window, backend=backend)
  return call


def _band_with_lengths(attention):
  """Windowed cuDNN layers below the block threshold: padding as lengths, the band as one
  [1, 1, T, T] mask (the benchmark's rows are all full, so no prefix check is needed here)."""
  import jax.numpy as jnp

  from saejax.models import attention as attn

  def call(q, k, v, *, valid, window=None, backend="xla"):
    t = q.shape[1]
    if (backend != "cudnn" or window is None or window >= t - 1
        or attn.blocks_pay(t, window)):
      return attention(q, k, v, valid=valid, window=window, backend=backend)
    band = attn.window_mask(jnp.ones((1, t), bool), window)
    out = attn._cudnn_attention(q, k, v, band, jnp.maximum(valid.sum(-1, dtype=jnp.int32), 1))
    return jnp.where(valid[:, :, None, None], out, jnp.zeros((), out.dtype))
  return call


def _unfused_add(norm):
  def add_layer_norm(x, residual, scale, bias, eps):
    s = x + residual
    return s, norm(s, scale, bias, eps)
  return add_layer_norm


@contextlib.contextmanager
def model_as(patches: tuple[str, ...]):
  """Trace the step with the listed FEATURES switched back to the code saejax had before sessions
  34 and 35, or the listed TRIALS switched on (patched module attributes, restored on exit; the patch
  lasts while the step is traced)."""
  import types

  from saejax.models import attention as attn
  from saejax.models import fused_norm
  from saejax.models import modernbert as mb
  saved = (mb.layer_norm, mb.Attention.__call__, mb.GeGLU.__call__, attn._cudnn_padded,
           attn.blocks_pay, mb.apply_rope, mb.attention, mb.fused_norm, fused_norm.TILE,
           fused_norm.WARPS, mb.add_layer_norm, mb.ModernBert.__call__,
           attn._mask_without_gradient, fused_norm.MIN_PROGRAMS, fused_norm.BWD_STAGES)
  if "ln_bwd" in patches:
    fused_norm.MIN_PROGRAMS, fused_norm.BWD_STAGES = 1024, 3
  if "skip_dbias" in patches:
    attn._mask_without_gradient = contextlib.nullcontext
  if "short_window" in patches:
    mb.attention = _mask_short_windows(mb.attention)
  if "band_lengths" in patches:
    mb.attention = _band_with_lengths(mb.attention)
  if "carry" in patches:
    mb.ModernBert.__call__ = _carry_model_call
  if "ln" in patches:  # the add-and-norm pair's norm too
    mb.add_layer_norm = _unfused_add(lambda *a: mb.layer_norm(*a))
  if "fused_ln" in patches or "fused_add" in patches:
    # Norm calls mb.layer_norm (or the old one, with "ln") instead of the kernels; or the kernel
    # for the norm and an XLA add before it
    norm = (lambda *a: mb.layer_norm(*a)) if "fused_ln" in patches else fused_norm.layer_norm
    mb.fused_norm = types.SimpleNamespace(layer_norm=norm, add_layer_norm=_unfused_add(norm),
                                          wanted=fused_norm.wanted)
  if "ln_wide" in patches:
    fused_norm.TILE, fused_norm.WARPS = 8192, 8
  if "rope_lowp" in patches:
    mb.apply_rope = _rope_lowp
  if "xla_short" in patches:
    mb.attention = _xla_when_short(mb.attention)
  if "ln" in patches:
    mb.layer_norm = _old_layer_norm
  if "split" in patches:
    mb.Attention.__call__, mb.GeGLU.__call__ = _old_attention_call, _old_geglu_call
  if "lengths" in patches:
    attn._cudnn_padded = lambda q, k, v, valid: attn._cudnn_attention(
        q, k, v, attn.window_mask(valid, None))
  if "blocks" in patches:
    attn.blocks_pay = lambda t, window: False
  try:
    yield
  finally:
    (mb.layer_norm, mb.Attention.__call__, mb.GeGLU.__call__, attn._cudnn_padded,
     attn.blocks_pay, mb.apply_rope, mb.attention, mb.fused_norm, fused_norm.TILE,
     fused_norm.WARPS, mb.add_layer_norm, mb.ModernBert.__call__,
     attn._mask_without_gradient, fused_norm.MIN_PROGRAMS, fused_norm.BWD_STAGES) = saved


class SaejaxTrain:
  """The real saejax train step on ModernBERT-base + SAE, bf16 compute, fp32 master weights."""

  def __init__(self, model_dir: Path, backend: str, args, records: int):
    import jax
    from flax import nnx

    from saejax.hub import convert
    from saejax.hub.state import OptimConfig, init_state, make_optimizer
    from saejax.sae import topk as sae_lib
    from saejax.sae.embedder import Embedder
    from saejax.train import step as step_lib
    runtime = {"remat": True} if args.remat else {}
    enc_cfg, encoder = convert.load_hf(model_dir, head=False, dtype="bfloat16",
                                       attention_backend=backend, **runtime)
    self.d_model = enc_cfg.hidden_size
    texts = records * (2 + args.negatives)
    sae_cfg = sae_lib.SAEConfig(d_model=self.d_model, num_latents=args.latents, k=args.k,
                                k_aux=512, dead_after_tokens=30 * texts)
    model = Embedder(encoder, sae_lib.SAE(sae_cfg, rngs=nnx.Rngs(0)))
    self.loss_cfg = step_lib.LossConfig(temperature=1.0, w_multi_k=1 / 8, multi_k_factor=4,
                                        w_auxk=1 / 32)
    optim_cfg = OptimConfig(lr_encoder=2e-5, lr_sae=1e-3, warmup_steps=20, total_steps=1000)
    graphdef, params = nnx.split(model, nnx.Param)
    self.n_nonembed = step_lib.non_embedding_params(params["encoder"])  # Kaplan's N
    tx = make_optimizer(optim_cfg, params)
    self.state = init_state(model, tx)
    jitted = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx,
                                       loss_cfg=self.loss_cfg, optim_cfg=optim_cfg),
                     donate_argnums=0)
    self.jitted = jitted
    self.compiled = None

  def compile(self, batch, options: dict | None = None) -> float:
    from saejax.train import step as step_lib
    t = time.perf_counter()
    options = step_lib.compiler_options() if options is None else options
    self.compiled = self.jitted.lower(self.state, batch, False).compile(compiler_options=options)
    return time.perf_counter() - t

  def step(self, batch):
    # A step whose metrics are not logged, as most of `saejax.train`'s (the baseline logs none).
    self.state, metrics = self.compiled(self.state, batch, False)
    return metrics["loss"]


class TorchTrain:
  """sentence-transformers SparseEncoder + CSRLoss, autocast bf16, fused AdamW."""

  def __init__(self, model_dir: Path, args, compiled: bool = False):
    import torch
    try:
      from sentence_transformers.sparse_encoder.modules import SparseAutoEncoder, Transformer
    except ImportError:
      from sentence_transformers.sparse_encoder.models import SparseAutoEncoder, Transformer
    try:
      from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:
      from sentence_transformers.models import Pooling
    from sentence_transformers.sparse_encoder import SparseEncoder
    from sentence_transformers.sparse_encoder.losses import (CSRLoss,
                                                             SparseMultipleNegativesRankingLoss)
    torch.manual_seed(0)
    transformer = Transformer(str(model_dir), model_kwargs={"attn_implementation": "sdpa"})
    d = transformer.get_word_embedding_dimension()
    sae = SparseAutoEncoder(d, args.latents, k=args.k, k_aux=512)
    self.model = SparseEncoder(modules=[transformer, Pooling(d, "mean"), sae], device=DEVICE)
    self.model.train()
    self.loss = CSRLoss(self.model, loss=SparseMultipleNegativesRankingLoss(self.model, scale=1.0))
    groups = [{"params": list(transformer.parameters()), "lr": 2e-5, "weight_decay": 0.01},
              {"params": list(sae.parameters()), "lr": 1e-3, "weight_decay": 0.0}]
    self.optimizer = torch.optim.AdamW(groups, fused=True)
    self.torch = torch
    if compiled:
      # torch.compile of the transformers model (inductor, default mode; the loss and optimiser
      # stay eager). sentence-transformers calls `model.forward` itself, not `model(...)`, which
      # bypasses an in-place `nn.Module.compile()` (the 2026-11-26 row compiled nothing), so the
      # compiled callable replaces `forward` on the instance. Queries and documents are two static
      # shapes: two graphs, both compiled in the first step.
      inner = transformer.auto_model
      inner.forward = torch.compile(inner.forward, dynamic=False)

  def step(self, features):
    torch = self.torch
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
      losses = self.loss([dict(f) for f in features], None)
      total = sum(losses.values())
    total.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    return total


def model_flops(n_nonembed: int, layers_local: int, layers_global: int, d: int, window: int,
                lengths_counts: list[tuple[int, int]], latents: int, texts: int) -> float:
  """Training FLOPs of one step (see the module docstring)."""
  total = 0.0
  for length, count in lengths_counts:
    tokens = length * count
    att = 12 * d * (layers_global * length + layers_local * min(length, 2 * window + 1))
    total += (6 * n_nonembed + att) * tokens
  return total + 6.0 * d * latents * texts


def torch_row(rows: dict, name: str, model_dir: Path, args, compiled: bool, tbatch) -> None:
  import torch
  pt = TorchTrain(model_dir, args, compiled)
  torch.cuda.reset_peak_memory_stats() if DEVICE == "cuda" else None
  start = time.perf_counter()
  loss0 = float(pt.step(tbatch))
  first_step_s = time.perf_counter() - start
  sync = lambda _: torch.cuda.synchronize() if DEVICE == "cuda" else None  # noqa: E731
  ts = timed(lambda: pt.step(tbatch), reps=args.steps, warmup=2, sync=sync)
  piped = pipelined(lambda: pt.step(tbatch), args.steps, sync=sync)
  rows[name] = {"step_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts),
                "pipelined_ms": 1e3 * statistics.median(piped),
                "first_loss": loss0, "first_step_s": first_step_s,
                "peak_gib": (torch.cuda.max_memory_allocated() / 2**30
                             if DEVICE == "cuda" else 0)}
  del pt
  if DEVICE == "cuda":
    torch.cuda.empty_cache()


@section
def train_speed(model_dir: Path, args, budget_end: float):
  import jax
  import numpy as np
  import torch
  r, n, tq, td = args.records, args.negatives, args.query_len, args.doc_len

  def token_ids(records):
    rng = np.random.default_rng(1)
    return (rng.integers(5, 50000, size=(records, tq)).astype(np.int32),
            rng.integers(5, 50000, size=(records, 1 + n, td)).astype(np.int32))

  def jax_batch(q_ids, d_ids):
    return jax.device_put({"q_ids": q_ids, "q_valid": np.ones_like(q_ids, bool),
                           "d_ids": d_ids, "d_valid": np.ones_like(d_ids, bool)})
  q_ids, d_ids = token_ids(r)
  jbatch = jax_batch(q_ids, d_ids)

  def feats(x):
    t = torch.tensor(x, dtype=torch.long, device=DEVICE)
    return {"input_ids": t, "attention_mask": torch.ones_like(t)}
  tbatch = [feats(q_ids)] + [feats(d_ids[:, j]) for j in range(1 + n)]
  tokens = q_ids.size + d_ids.size

  rows = {}
  n_nonembed = None

  def saejax_row(name, backend, variant, batch, records):
    """Compile and time one saejax step; False if it failed (recorded in its row)."""
    nonlocal n_nonembed
    patches, options = STEP_VARIANTS[variant or "new"]
    try:
      with model_as(patches):
        runner = SaejaxTrain(model_dir, backend, args, records)
        n_nonembed = runner.n_nonembed
        compile_s = runner.compile(batch, options)
      loss0 = float(runner.step(batch))
    except Exception as e:  # noqa: BLE001 - keep the other rows
      rows[name] = {"error": f"{type(e).__name__}: {str(e)[:800]}"}
      record("train", rows)
      return None
    ts = timed(lambda: runner.step(batch), reps=args.steps, warmup=2, sync=jax.block_until_ready)
    piped = pipelined(lambda: runner.step(batch), args.steps, sync=jax.block_until_ready)
    stats = jax.devices()[0].memory_stats() or {}
    rows[name] = {"step_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts),
                  "pipelined_ms": 1e3 * statistics.median(piped),
                  "compile_s": compile_s, "first_loss": loss0, "records": records,
                  "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30}
    record("train", rows)
    return runner

  for entry in args.backends:
    if time.time() > budget_end - 60 - (150 if args.torch_compile else 0):
      break   # keep the PyTorch rows' time (a compile takes ~2 min)
    backend, _, variant = entry.partition(":")
    name = f"saejax_{backend}" + (f"_{variant}" if variant else "")
    runner = saejax_row(name, backend, variant, jbatch, r)
    if runner is None:
      continue
    if args.profile and (not variant or variant == "new"):
      import gzip
      OUT.mkdir(parents=True, exist_ok=True)
      (OUT / f"hlo_{name}.txt.gz").write_bytes(gzip.compress(runner.compiled.as_text().encode()))
      try:
        record(f"profile_{name}", gpu_kernel_profile(lambda: runner.step(jbatch), 3, name))
      except Exception as e:  # noqa: BLE001 - the timing above stands without it
        record(f"profile_{name}_error", f"{type(e).__name__}: {e}")
    del runner
  for compiled in [False] + ([True] if args.torch_compile else []):
    name = "torch_st_csr_compiled" if compiled else "torch_st_csr"
    if compiled and time.time() > budget_end - 150:
      rows[name] = {"error": "skipped: under 150 s of the budget left for its compile"}
      continue
    try:
      torch_row(rows, name, model_dir, args, compiled, tbatch)
    except Exception as e:  # noqa: BLE001 - keep the other rows
      rows[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    record("train", rows)
  # The shipped step at more records per device (the MFU target allows the largest that fits);
  # no PyTorch rows at these sizes
  backend = args.backends[0].partition(":")[0]
  for records in args.sweep_records:
    name = f"saejax_{backend}_r{records}"
    if time.time() > budget_end - 45:
      rows[name] = {"error": "skipped: budget"}
      break
    runner = saejax_row(name, backend, "", jax_batch(*token_ids(records)), records)
    del runner

  layers = ARCH["num_hidden_layers"]
  every = ARCH["global_attn_every_n_layers"]
  n_global = len(range(0, layers, every))

  def flops(records):
    return model_flops(n_nonembed or 110_000_000, layers - n_global, n_global,
                       ARCH["hidden_size"], ARCH["local_attention"] // 2,
                       [(tq, records), (td, records * (1 + n))], args.latents,
                       records * (2 + n))
  peak_sheet = 989e12
  peak_meas = RESULTS.get("ceiling", {}).get("bf16_matmul_tflops")
  for name, row in rows.items():
    if "step_ms" not in row:
      continue
    s = row["step_ms"] / 1e3
    records = row.get("records", r)
    row["tokens_per_s"] = tokens * records / r / s
    row["mfu_datasheet"] = flops(records) / s / peak_sheet
    if peak_meas:
      row["mfu_measured_peak"] = flops(records) / s / (peak_meas * 1e12)
    if "pipelined_ms" in row:  # the same figures for steps run back to back (`pipelined`)
      row["mfu_datasheet_pipelined"] = flops(records) / (row["pipelined_ms"] / 1e3) / peak_sheet
  rows = {k: v for k, v in rows.items() if "step_ms" in v} | {
      k: v for k, v in rows.items() if "step_ms" not in v}
  if "step_ms" in rows.get("torch_st_csr", {}):
    base = rows["torch_st_csr"]
    for name in [k for k in rows if "step_ms" in rows[k] and rows[k].get("records", r) == r]:
      rows[name]["speedup_vs_torch"] = base["step_ms"] / rows[name]["step_ms"]
      if "pipelined_ms" in rows[name] and "pipelined_ms" in base:
        rows[name]["speedup_vs_torch_pipelined"] = base["pipelined_ms"] / rows[name]["pipelined_ms"]
  record("train", rows)
  record("train_shape", {"records": r, "negatives": n, "query_len": tq, "doc_len": td,
                         "tokens_per_step": tokens, "model_tflops_per_step": flops(r) / 1e12,
                         "non_embedding_params": n_nonembed, "latents": args.latents, "k": args.k,
                         "remat": args.remat})


@section
def encode_speed(model_dir: Path, args):
  """Corpus encoding, bf16: saejax `encode_sparse` (cudnn, length buckets) against the same model
  exported by `saejax.hub.export` and run by `SparseEncoder.encode` (bf16), on real Debian texts."""
  import json as json_lib

  import numpy as np
  import torch
  from flax import nnx

  from saejax.data.tokenizer import load_tokenizer
  from saejax.hub import convert, export
  from saejax.retrieval.encode import EncodeConfig, encode_sparse
  from saejax.sae import topk as sae_lib
  from saejax.sae.embedder import Embedder
  rows = (REPO / "data/debian-quickstart/train.jsonl").read_text().splitlines()
  texts = [json_lib.loads(r)["document"] for r in rows[:args.encode_texts]]
  _, encoder = convert.load_hf(model_dir, head=False, dtype="bfloat16",
                               attention_backend="cudnn" if DEVICE == "cuda" else "xla")
  model = Embedder(encoder, sae_lib.SAE(sae_lib.SAEConfig(
      d_model=ARCH["hidden_size"], num_latents=args.latents, k=args.k, k_aux=512),
      rngs=nnx.Rngs(0)))
  tok = load_tokenizer(model_dir)
  cfg = EncodeConfig(max_len=args.doc_len, batch_size=args.encode_batch, progress=False)
  start = time.perf_counter()
  encode_sparse(model, tok, texts, None, cfg)  # compiles every bucket shape
  first = time.perf_counter() - start
  times, codes = [], None
  for _ in range(2):
    start = time.perf_counter()
    codes = encode_sparse(model, tok, texts, None, cfg)
    times.append(time.perf_counter() - start)
  row = {"texts": len(texts), "max_len": args.doc_len, "batch": args.encode_batch,
         "saejax_texts_per_s": len(texts) / min(times), "saejax_first_call_s": first}
  record("encode", row)

  out = Path(tempfile.mkdtemp()) / "st"
  export.write_sparse_encoder(model, model_dir, out, export.ExportSettings(
      max_seq_length=args.doc_len, k=args.k, k_aux=512))
  from sentence_transformers import SparseEncoder
  st = SparseEncoder(str(out), device=DEVICE).to(torch.bfloat16)
  st.encode(texts[:256], batch_size=args.encode_batch)  # warm-up
  times, got = [], None
  for _ in range(2):
    start = time.perf_counter()
    got = st.encode(texts, batch_size=args.encode_batch, convert_to_tensor=True)
    torch.cuda.synchronize() if DEVICE == "cuda" else None
    times.append(time.perf_counter() - start)
  row["st_texts_per_s"] = len(texts) / min(times)
  row["ratio"] = row["saejax_texts_per_s"] / row["st_texts_per_s"]
  # Same weights, both bf16: the active sets should mostly agree (bf16 rounding moves ties).
  dense = got.to_dense().float().cpu().numpy() if got.is_sparse else got.float().cpu().numpy()
  overlap = [len(set(np.flatnonzero(dense[i])) & set(codes.indices[i][codes.values[i] > 0]))
             / max(1, int((codes.values[i] > 0).sum())) for i in range(min(len(texts), 512))]
  row["active_set_overlap_bf16"] = float(np.mean(overlap))
  record("encode", row)


@section
def cudnn_tests():
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                         *(str(REPO / "tests" / f) for f in ("test_attention.py",
                                                             "test_fused_norm.py")),
                         "-k", "cudnn or gpu"],
                        capture_output=True, text=True, cwd=REPO, timeout=240)
  record("pytest_cudnn", {"rc": proc.returncode, "tail": proc.stdout[-800:] + proc.stderr[-800:]})


def summary() -> str:
  lines = []
  if "env" in RESULTS:
    lines.append(f"device: {RESULTS['env']['device']} | jax {RESULTS['env']['jax']} | "
                 f"torch {RESULTS['env']['torch']}")
  if "ceiling" in RESULTS:
    lines.append(f"bf16 matmul 8192^3: {RESULTS['ceiling']['bf16_matmul_tflops']:.0f} TFLOP/s")
  for row in RESULTS.get("attention", []):
    lines.append(f"attention T={row['T']} window={row['window']}: max err {row['max_abs_err']:.3g} "
                 f"rel {row['rel_err']:.3g}; fwd+bwd cudnn {row.get('cudnn_fwd_bwd_ms')} ms, "
                 f"xla {row.get('xla_fwd_bwd_ms')} ms")
  for row in RESULTS.get("attention_variants", []):
    cells = [f"{k} {v['fwd_bwd_ms']:.2f} ms (err {v['rel_err_vs_first']:.1e})"
             if isinstance(v, dict) else f"{k} {str(v)[:80]}"
             for k, v in row.items() if k not in ("batch", "T", "window")]
    lines.append(f"attention B={row['batch']} T={row['T']} window={row['window']}: "
                 + "; ".join(cells))
  for key in [k for k in RESULTS if k.startswith("profile_") and not k.endswith("_error")]:
    prof = RESULTS[key]
    lines.append(f"{key}: wall {prof['wall_ms_per_step']:.1f} ms/step, GPU busy "
                 f"{prof['gpu_busy_ms_per_step']:.1f} ms/step")
    lines += [f"  {k['ms_per_step']:7.2f} ms {k['calls']:4d}x {k['name'][:110]}"
              for k in prof["kernels"][:14]]
  if "encode" in RESULTS:
    lines.append(f"encode: {RESULTS['encode']}")
  if "parity_rel_err_vs_torch_fp32" in RESULTS:
    lines.append(f"parity: {RESULTS['parity_rel_err_vs_torch_fp32']}")
  lines.append("| system | step ms | tokens/s | MFU (989 TF) | MFU (measured) | vs torch | "
               "back to back: step ms | MFU (989 TF) | vs torch |")
  lines.append("|---|---|---|---|---|---|---|---|---|")
  for name, row in RESULTS.get("train", {}).items():
    if "step_ms" not in row:
      lines.append(f"| {name} | {row} |")
      continue
    lines.append(f"| {name} | {row['step_ms']:.1f} | {row.get('tokens_per_s', 0):,.0f} | "
                 f"{row.get('mfu_datasheet', 0):.3f} | {row.get('mfu_measured_peak', 0):.3f} | "
                 f"{row.get('speedup_vs_torch', 0):.2f}x | {row.get('pipelined_ms', 0):.1f} | "
                 f"{row.get('mfu_datasheet_pipelined', 0):.3f} | "
                 f"{row.get('speedup_vs_torch_pipelined', 0):.2f}x |")
  errors = [k for k in RESULTS if k.endswith("_error")]
  lines.append(f"errors: {errors}")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--budget-s", type=float, default=420)
  p.add_argument("--records", type=int, default=64)
  p.add_argument("--negatives", type=int, default=1)
  p.add_argument("--query-len", type=int, default=32)
  p.add_argument("--doc-len", type=int, default=256)
  p.add_argument("--latents", type=int, default=16384)
  p.add_argument("--k", type=int, default=64)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--sweep-records", type=int, nargs="*", default=[],
                 help="also time the shipped step (the first --backends entry's backend) at "
                      "these records per step, without PyTorch rows")
  p.add_argument("--backends", nargs="+", default=["cudnn", "xla"],
                 help="attention backends to time the saejax step with (while budget lasts); "
                      "BACKEND:VARIANT picks one of STEP_VARIANTS, e.g. 'cudnn:old', the "
                      "model code saejax had before session 34")
  p.add_argument("--profile", action="store_true",
                 help="per-kernel GPU time of each saejax step (jax.profiler) and its HLO, to $OUT")
  p.add_argument("--small", action="store_true", help="tiny model: a CPU smoke run of the script")
  p.add_argument("--torch-device", default="cuda")
  p.add_argument("--encode-texts", type=int, default=4096, help="texts for the encode section")
  p.add_argument("--encode-batch", type=int, default=128)
  p.add_argument("--remat", action="store_true", help="saejax: recompute blocks in backward")
  p.add_argument("--torch-compile", action="store_true", help="torch.compile the PyTorch encoder")
  p.add_argument("--tokenizer", default=str(REPO / ".gpu/tokenizer.json"))
  p.add_argument("--skip", nargs="*", default=[])
  args = p.parse_args()
  global DEVICE
  DEVICE = args.torch_device
  if args.small:
    ARCH.update(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4)
  end = START + args.budget_s
  env()
  if "ceiling" not in args.skip:
    ceiling()
  if "tests" not in args.skip:
    cudnn_tests()
  if "variants" not in args.skip:
    attention_variants(end)
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = modernbert_base_dir(Path(tmp), Path(args.tokenizer))
    if "train" not in args.skip:
      train_speed(model_dir, args, end)
    if "encode" not in args.skip:
      encode_speed(model_dir, args)
    if "parity" not in args.skip and time.time() < end - 30:
      parity(model_dir)
    if "attention" not in args.skip:
      attention_check(end)
  print("\n" + summary(), flush=True)


if __name__ == "__main__":
  main()
