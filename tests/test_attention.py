"""Attention backends against an explicit-softmax reference, with padding and ModernBERT's window.

The reference is float64 numpy: logits, a boolean mask (key is real and ``|i - j| <= window``), softmax,
weighted sum. Only valid query rows are compared: padded rows are unspecified by contract. Splash runs
in Pallas interpret mode here (CPU); cuDNN runs only on a GPU.
"""

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.models import attention as attn
from saejax.models import splash

REPO = Path(__file__).resolve().parents[1]


def reference_mask(valid: np.ndarray, window: int | None) -> np.ndarray:
  """[B, 1, Tq, Tk] True where the key is a real token inside the query's window."""
  t = valid.shape[1]
  pos = np.arange(t)
  near = np.ones((t, t), bool) if window is None else np.abs(pos[:, None] - pos[None, :]) <= window
  return valid[:, None, None, :] & near[None, None]


def reference_attention(q, k, v, valid, window):
  """Explicit softmax attention in float64; returns [B, T, N, H]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(reference_mask(np.asarray(valid), window), logits, -np.inf)
  # A padded query whose window holds no real key has an all -inf row: NaN there, never compared.
  with np.errstate(invalid="ignore"):
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", weights, v)


def make_inputs(seed: int, lengths: tuple[int, ...], t: int, n: int, h: int):
  """Random q, k, v [B, T, N, H] (fp32) and valid [B, T] with a real prefix of each given length."""
  q, k, v = jax.random.normal(jax.random.key(seed), (3, len(lengths), t, n, h), jnp.float32)
  valid = jnp.arange(t)[None, :] < jnp.asarray(lengths)[:, None]
  return q, k, v, valid


def max_error_on_valid_rows(out, ref, valid) -> float:
  """Largest |out - ref| over real query positions."""
  diff = np.abs(np.asarray(out, np.float64) - np.asarray(ref, np.float64))
  return float(diff[np.asarray(valid)].max())


@pytest.mark.parametrize("window", [None, 4, 0, 40])
def test_xla_matches_reference(window):
  q, k, v, valid = make_inputs(0, lengths=(24, 17, 5), t=24, n=2, h=8)
  out = attn.attention(q, k, v, valid=valid, window=window, backend="xla")
  assert out.shape == q.shape and out.dtype == jnp.float32
  ref = reference_attention(q, k, v, valid, window)
  assert max_error_on_valid_rows(out, ref, valid) < 1e-5


@pytest.mark.parametrize("window", [None, 4])
def test_xla_gradients_match_jax_dot_product_attention(window):
  """The hand-written xla path's q, k, v gradients (only real query rows in the loss) against
  `jax.nn.dot_product_attention`, an independent implementation of the same function."""
  q, k, v, valid = make_inputs(2, lengths=(24, 17, 5), t=24, n=2, h=8)
  weight = jax.random.normal(jax.random.key(3), q.shape) * valid[:, :, None, None]

  def lib(q, k, v):
    return jax.nn.dot_product_attention(
        q, k, v, mask=valid[:, None, None, :],
        local_window_size=None if window is None else (window, window), implementation="xla")

  def ours(q, k, v):
    return attn.attention(q, k, v, valid=valid, window=window, backend="xla")

  for want, got in zip(jax.grad(lambda *a: jnp.sum(lib(*a) * weight), argnums=(0, 1, 2))(q, k, v),
                       jax.grad(lambda *a: jnp.sum(ours(*a) * weight), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
  q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out16 = attn.attention(q16, k16, v16, valid=valid, window=window, backend="xla")
  assert out16.dtype == jnp.bfloat16
  ref = reference_attention(q16.astype(jnp.float32), k16.astype(jnp.float32),
                            v16.astype(jnp.float32), valid, window)
  assert max_error_on_valid_rows(out16.astype(jnp.float32), ref, valid) < 3e-2


def test_xla_window_changes_the_output():
  # Guards the comparison above against a window that is silently ignored.
  q, k, v, valid = make_inputs(1, lengths=(24,), t=24, n=1, h=8)
  local = attn.attention(q, k, v, valid=valid, window=4, backend="xla")
  full = attn.attention(q, k, v, valid=valid, window=None, backend="xla")
  assert max_error_on_valid_rows(local, full, valid) > 1e-2


@pytest.mark.parametrize("window", [None, 0, 4, 30])
def test_window_mask_matches_reference(window):
  valid = jnp.arange(12)[None, :] < jnp.asarray([12, 7])[:, None]
  mask = attn.window_mask(valid, window)
  np.testing.assert_array_equal(np.asarray(mask), reference_mask(np.asarray(valid), window))


@pytest.mark.parametrize("t, window, lengths", [
    (128, None, (128, 70)),
    (128, 8, (128, 70)),
    (200, 16, (200, 33)),  # runs padded to 256 with one 256-wide tile
])
def test_splash_matches_xla(t, window, lengths):
  q, k, v, valid = make_inputs(2, lengths=lengths, t=t, n=2, h=32)
  out = attn.attention(q, k, v, valid=valid, window=window, backend="splash")
  assert out.shape == q.shape and out.dtype == q.dtype
  want = attn.attention(q, k, v, valid=valid, window=window, backend="xla")
  assert max_error_on_valid_rows(out, want, valid) < 1e-4


def test_splash_gradients_match_xla():
  q, k, v, valid = make_inputs(3, lengths=(128, 50), t=128, n=2, h=32)
  cotangent = jax.random.normal(jax.random.key(4), q.shape) * valid[:, :, None, None]

  def loss(backend, q, k, v):
    # Padded query rows are unspecified, so the cotangent is zero there.
    return jnp.sum(attn.attention(q, k, v, valid=valid, window=8, backend=backend) * cotangent)

  got = jax.grad(lambda *x: loss("splash", *x), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(lambda *x: loss("xla", *x), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, err_msg=f"d{name}")


SPLASH_ON_AUTO_MESH = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from saejax import sharding
from saejax.models import attention as attn, splash
mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=1, tensor=2))
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.normal(size=(4, 128, 2, 32)), jnp.float32) for _ in range(3))
valid = jnp.arange(128)[None] < jnp.array([[128], [70], [128], [9]])
f = lambda q, k, v, valid, interpret=None: splash.attention(q, k, v, valid=valid, window=8,
                                                             interpret=interpret)
qs = NamedSharding(mesh, P(("data", "fsdp"), None, None, None))
with jax.set_mesh(mesh):
  # For a TPU (lowered here, on the CPU): the kernel sits in one shard_map region.
  text = jax.jit(lambda *x: f(*x, interpret=False)).trace(*(jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=qs)
                             for x in (q, k, v)),
                          jax.ShapeDtypeStruct(valid.shape, bool)).lower(
      lowering_platforms=("tpu",)).as_text()
  print("tpu", text.count("tpu_custom_call"), text.count("sdy.manual_computation"))
  sharded = jax.jit(f)(q, k, v, valid)  # interpret mode on the CPU, per shard
want = attn.attention(q, k, v, valid=valid, window=8, backend="xla")
err = float(jnp.max(jnp.abs(jnp.where(valid[:, :, None, None], sharded - want, 0))))
print("error", err)
"""


def test_splash_runs_per_shard_on_an_auto_mesh():
  """On the meshes saejax builds (Auto axes), the Pallas kernel runs in a shard_map over the
  batch and heads: lowered for a TPU it compiles (a Mosaic kernel cannot be partitioned by the
  compiler), and per shard it gives xla's numbers."""
  out = subprocess.run([sys.executable, "-c", SPLASH_ON_AUTO_MESH], cwd=REPO, capture_output=True,
                       text=True, timeout=600,
                       env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert out.returncode == 0, out.stderr[-3000:]
  lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
  calls, regions = map(int, lines["tpu"].split())
  assert calls >= 1 and regions >= 1
  assert float(lines["error"]) < 1e-4


def test_splash_kernel_is_cached_and_reusable_outside_jit():
  splash._kernel.cache_clear()
  q, k, v, valid = make_inputs(5, lengths=(128,), t=128, n=2, h=16)
  # First build happens inside a trace; a leaked tracer would fail the eager call after it.
  jitted = jax.jit(lambda q, k, v: splash.attention(q, k, v, valid=valid, window=4))(q, k, v)
  eager = splash.attention(q, k, v, valid=valid, window=4)
  info = splash._kernel.cache_info()
  assert (info.misses, info.hits) == (1, 1)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-6)


@pytest.mark.parametrize("t, padded, block", [(1, 128, 128), (128, 128, 128), (129, 256, 256),
                                              (384, 384, 128), (1024, 1024, 512)])
def test_splash_padded_length_and_block(t, padded, block):
  assert splash.padded_length(t) == padded
  assert splash.block_size(padded) == block


def test_splash_rejects_mismatched_inputs():
  q, k, v, valid = make_inputs(6, lengths=(8,), t=8, n=2, h=4)
  with pytest.raises(splash.AttentionInputError, match=r"k shape \(1, 7, 2, 4\).*\(1, 8, 2, 4\)"):
    splash.attention(q, k[:, :7], v, valid=valid, window=None)
  with pytest.raises(splash.AttentionInputError, match=r"valid shape \(1, 7\).*\(1, 8\)"):
    splash.attention(q, k, v, valid=valid[:, :7], window=None)
  with pytest.raises(splash.AttentionInputError, match="window must be None or an int >= 0"):
    splash.attention(q, k, v, valid=valid, window=-1)


_SHARDED_SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    from saejax.models import attention as attn

    q, k, v = jax.random.normal(jax.random.key(0), (3, 4, 128, 2, 16))
    valid = jnp.arange(128)[None, :] < jnp.asarray([128, 90, 40, 1])[:, None]
    cot = jax.random.normal(jax.random.key(1), q.shape) * valid[:, :, None, None]
    mesh = jax.make_mesh((2, 2), ("data", "model"))  # Explicit axes, as the trainer sets them

    def loss(backend, q, k, v, valid, cot):
      out = attn.attention(q, k, v, valid=valid, window=8, backend=backend)
      return jnp.sum(out * cot), out

    with jax.set_mesh(mesh):
      qkv = [jax.device_put(x, P("data", None, "model", None)) for x in (q, k, v, cot)]
      valid = jax.device_put(valid, P("data", None))
      results = {}
      for backend in ("splash", "xla"):
        grad = jax.jit(jax.grad(lambda *a: loss(backend, *a), argnums=(0, 1, 2), has_aux=True))
        results[backend] = grad(qkv[0], qkv[1], qkv[2], valid, qkv[3])
    (g_s, out_s), (g_x, out_x) = results["splash"], results["xla"]
    print("SPEC", tuple(out_s.sharding.spec))
    print("OUT", float(jnp.max(jnp.abs(out_s - out_x) * valid[:, :, None, None])))
    print("GRAD", max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(g_s, g_x)))
""")


def test_splash_under_explicit_mesh_matches_xla():
  # A fresh process: the fake CPU device count must be set before the backend starts.
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  run = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  lines = dict(line.split(" ", 1) for line in run.stdout.splitlines() if " " in line)
  assert lines["SPEC"] == "('data', None, 'model', None)"
  assert float(lines["OUT"]) < 1e-4
  assert float(lines["GRAD"]) < 1e-4


@pytest.mark.parametrize("t, window, lengths", [(43, 5, (43, 11, 1, 0)), (32, 4, (32, 17, 5)),
                                                (128, 16, (128, 3))])
def test_local_blocks_match_the_full_window(t, window, lengths):
  """Block-local windowed attention (3w keys a query) against the reference over the full T x T,
  outputs and gradients, with T not a multiple of the block and rows of one and of no real token."""
  assert attn.blocks_pay(t, window)
  q, k, v, valid = make_inputs(11, lengths=lengths, t=t, n=2, h=8)
  weight = jax.random.normal(jax.random.key(12), q.shape) * valid[:, :, None, None]
  out = attn.attention(q, k, v, valid=valid, window=window, backend="xla")
  assert out.shape == q.shape and bool(jnp.all(jnp.isfinite(out)))
  ref = reference_attention(q, k, v, valid, window)
  real = np.asarray(valid) & (np.asarray(lengths) > 0)[:, None]
  assert max_error_on_valid_rows(out, ref, real) < 1e-5

  def full(q, k, v):  # the same function through the whole T x T with the window as a mask
    return attn._xla_attention(q, k, v, attn.window_mask(valid, window))

  def blocked(q, k, v):
    return attn.attention(q, k, v, valid=valid, window=window, backend="xla")

  grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weight), argnums=(0, 1, 2))(q, k, v)
           for f in (full, blocked)]
  for want, got in zip(*grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("t, window, paid", [(512, 64, True), (511, 64, False), (256, 64, False),
                                             (128, None, False), (24, 0, False), (8, 1, True)])
def test_blocks_are_used_only_where_they_save_work(t, window, paid):
  assert attn.blocks_pay(t, window) is paid


def test_cudnn_matches_xla():
  if jax.default_backend() != "gpu":
    pytest.skip(f"cuDNN attention needs a CUDA GPU; this run's backend is {jax.default_backend()!r}")
  # cuDNN fused attention takes fp16/bf16 only: compare against xla on the same rounded inputs.
  # Global layers: right padding as lengths (an all-padding row too). Windowed: block-local (16)
  # and the full T x T (100), with right and left padding (a mask: any padding; its backward
  # without the mask's gradient); a window covering every pair (255) as a global layer.
  q, k, v, valid = make_inputs(7, lengths=(256, 100, 0), t=256, n=4, h=64)
  left = valid[:, ::-1]
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  weight = jax.random.normal(jax.random.key(8), q.shape)
  for window, mask in ((None, valid), (16, valid), (100, valid), (16, left), (100, left),
                       (255, valid)):
    def run(backend, q, k, v, mask=mask, window=window):
      out = attn.attention(q, k, v, valid=mask, window=window, backend=backend)
      return jnp.sum(out.astype(jnp.float32) * weight * mask[:, :, None, None]), out
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    (g_c, out), (g_x, want) = (jax.jit(jax.grad(functools.partial(run, b), argnums=(0, 1, 2),
                                                has_aux=True))(*args)
                               for b, args in (("cudnn", (q, k, v)), ("xla", up)))
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32)))), f"window={window}"
    assert max_error_on_valid_rows(out, want, mask) < 2e-2, f"window={window}"
    for a, b in zip(g_c, g_x):
      rel = float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
      assert rel < 2e-2, f"window={window}: gradient rel err {rel}"
  # Left padding on a global layer cannot be a length: under jit that row is NaN, the others right.
  out = jax.jit(functools.partial(attn.attention, window=None, backend="cudnn"))(q, k, v,
                                                                                 valid=left)
  assert bool(jnp.all(jnp.isnan(out[1].astype(jnp.float32))))
  want = attn.attention(*up, valid=left, window=None, backend="xla")
  assert max_error_on_valid_rows(out[:1], want[:1], left[:1]) < 2e-2


def test_cudnn_lengths_path_under_jit_makes_rows_it_cannot_express_nan(monkeypatch):
  """The wrapper around cuDNN's lengths call, on CPU: cuDNN is replaced by the same attention over
  a prefix of each row's length (what the kernel computes). Right-padded rows come out as the
  reference, padded positions zero, and a row that is not a prefix all NaN, never wrong values."""
  def by_lengths(q, k, v, keep=None, lengths=None):
    assert keep is None
    prefix = jnp.arange(q.shape[1])[None, :] < lengths[:, None]
    return attn._xla_attention(q, k, v, attn.window_mask(prefix, None))

  monkeypatch.setattr(attn, "_cudnn_attention", by_lengths)
  q, k, v, valid = make_inputs(10, lengths=(16, 9, 0, 12), t=16, n=2, h=8)
  valid = valid.at[3].set(valid[3, ::-1])          # row 3: left padding
  out = np.asarray(jax.jit(functools.partial(attn.attention, backend="cudnn"))(q, k, v,
                                                                               valid=valid))
  ref = reference_attention(q, k, v, valid, None)
  good = np.asarray(valid[:3])
  assert np.abs(out[:3] - ref[:3])[good].max() < 1e-5
  assert np.all(out[:3][~good] == 0)
  assert np.all(np.isnan(out[3]))


def cudnn_lowering(monkeypatch, fn, *args) -> str:
  """StableHLO of jit(fn) lowered for CUDA on this (CPU) machine: JAX's cuDNN attention asks the
  runtime for cuDNN's version and the card's compute capability while lowering, so both are
  answered here as an H100 with cuDNN 9.10 would."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
  monkeypatch.setattr(cudnn_fa, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(cudnn_fa, "check_compute_capability", lambda capability: True)
  monkeypatch.setattr(cudnn_fa, "is_cuda_compute_capability_equal", lambda capability: False)
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def dbias_args():
  """Arguments of JAX's `should_export_dbias` for a [B, 1, T, T] mask on BTNH q (B=2, T=64, N=2)."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
  return (2, 1, 64, 64), (2, 64, 2, 64), cudnn_fa.AttentionLayout.BTNH.value


def backward_results(hlo: str) -> list[int]:
  """Number of results of each cuDNN attention backward call: dq, dk, dv (+ dbias) + workspace."""
  calls = [line for line in hlo.splitlines() if "custom_call @__cudnn$fmha" in line
           and "Backward(" in line]
  return [int(line.split("=")[0].split(":")[1]) for line in calls]


def test_cudnn_backward_writes_no_mask_gradient(monkeypatch):
  """A windowed layer gives cuDNN its band as a mask (an additive bias to JAX): the backward
  kernel computes dq, dk, dv and no [B, 1, T, T] bias gradient. JAX's switch is only off while
  saejax's call is traced; a plain JAX call afterwards still gets the gradient (its own choice)."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
  q, k, v, valid = make_inputs(11, lengths=(64, 40), t=64, n=2, h=64)
  q = q.astype(jnp.bfloat16)

  def loss(q, window):
    out = attn.attention(q, q, q, valid=valid, window=window, backend="cudnn")
    return jnp.sum(out.astype(jnp.float32))
  for window in (8, None):      # a band mask (no dbias), and lengths (never a bias)
    hlo = cudnn_lowering(monkeypatch, jax.grad(functools.partial(loss, window=window)), q)
    assert backward_results(hlo) == [4], (window, backward_results(hlo))

  def plain(q):
    out = jax.nn.dot_product_attention(q, q, q, mask=attn.window_mask(valid, 8),
                                       implementation="cudnn")
    return jnp.sum(out.astype(jnp.float32))
  # JAX's own call: with dbias where JAX asks for it (always, in jax 0.10 and 0.11)
  jax_wants = bool(cudnn_fa.should_export_dbias(*dbias_args()))
  assert backward_results(cudnn_lowering(monkeypatch, jax.grad(plain), q)) == [4 + jax_wants]


def test_the_mask_gradient_switch_is_this_threads_only():
  """While saejax traces its cuDNN call, JAX's dbias switch is off for that thread alone: another
  thread (a user's model with a learnable bias) still gets its bias gradient; afterwards JAX's own
  function is back."""
  import threading

  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
  original = cudnn_fa.should_export_dbias
  other = []
  with attn._mask_without_gradient():
    with attn._mask_without_gradient():       # nested (a block-local layer inside a step)
      assert cudnn_fa.should_export_dbias(*dbias_args()) is False
      thread = threading.Thread(target=lambda: other.append(
          cudnn_fa.should_export_dbias(*dbias_args())))
      thread.start()
      thread.join()
  assert other == [original(*dbias_args())]
  assert cudnn_fa.should_export_dbias is original


def test_a_window_covering_every_pair_is_no_window(monkeypatch):
  """Window >= T - 1 (ModernBERT's local layers on 32-token queries) masks nothing: cuDNN gets
  lengths and no mask, and the xla backend gives the same numbers as without the window."""
  q, k, v, valid = make_inputs(12, lengths=(16, 9), t=16, n=2, h=8)
  seen = []

  def by_lengths(q, k, v, keep=None, lengths=None):
    seen.append((keep is None, lengths is not None))
    prefix = jnp.arange(q.shape[1])[None, :] < lengths[:, None]
    return attn._xla_attention(q, k, v, attn.window_mask(prefix, None))

  monkeypatch.setattr(attn, "_cudnn_attention", by_lengths)
  for window in (15, 64):
    attn.attention(q, k, v, valid=valid, window=window, backend="cudnn")
    assert seen.pop() == (True, True)
    np.testing.assert_array_equal(attn.attention(q, k, v, valid=valid, window=window),
                                  attn.attention(q, k, v, valid=valid, window=None))
  ref = reference_attention(q, k, v, valid, 14)       # one pair short of covering: still a band
  out = attn.attention(q, k, v, valid=valid, window=14)
  assert max_error_on_valid_rows(out, ref, valid) < 1e-5
  assert max_error_on_valid_rows(attn.attention(q, k, v, valid=valid), ref, valid) > 1e-3


def test_cudnn_refuses_left_padding_it_cannot_express():
  # Checked before any cuDNN call, so this runs on any platform.
  q, k, v, valid = make_inputs(9, lengths=(8, 3), t=8, n=1, h=8)
  with pytest.raises(ValueError, match=r"rows \[1\] of `valid` are not a real prefix"):
    attn.attention(q, k, v, valid=valid[:, ::-1], backend="cudnn")


@pytest.mark.parametrize("platform, backend", [("cpu", "xla"), ("gpu", "cudnn"), ("cuda", "cudnn"),
                                               ("tpu", "splash"), ("rocm", "xla")])
def test_default_backend_per_platform(platform, backend):
  assert attn.default_backend(platform) == backend


def test_default_backend_follows_this_platform():
  assert attn.default_backend() == attn.default_backend(jax.default_backend())


def test_unknown_backend_names_the_choices():
  q, k, v, valid = make_inputs(8, lengths=(4,), t=4, n=1, h=4)
  with pytest.raises(ValueError, match=r"'flash'.*\('xla', 'cudnn', 'splash'\)"):
    attn.attention(q, k, v, valid=valid, backend="flash")
