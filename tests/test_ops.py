"""The sf_sdk:: custom ops (csrc/): opcheck, parity with the PyTorch references (float32, bfloat16,
float16, odd head dims, batches, single queries), ring writes at every wrap-around position of a
sink + ring cache, kv_len edge cases, argument errors, torch.export / torch.compile tracing, the
dispatch rule, the build / fallback machinery and the CUDA compile check.

The CPU kernels are built once (cached under ~/.cache/sf_sdk, or $SF_SDK_KERNEL_CACHE) by the first
test that needs them; `python -m sf_sdk.ops build` does it up front.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sf_sdk import attention, ops
from sf_sdk.attention import reference_cache_attention

REPO = Path(__file__).resolve().parents[1]
# Largest allowed |kernel - float64 reference| per dtype: float32 rounding, and one rounding of the
# output (plus the inputs' own rounding in the reference's SDPA) for the 16-bit types.
ATOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@pytest.fixture
def restore_backend():
    previous = attention.get_backend()
    yield
    attention.set_backend(previous)


def rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


def attention_inputs(batch: int, q_len: int, heads: int, head_dim: int, capacity: int,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (rand(batch, q_len, heads, head_dim, dtype=dtype), rand(batch, capacity, heads, head_dim, dtype=dtype),
            rand(batch, capacity, heads, head_dim, dtype=dtype))


def oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int) -> torch.Tensor:
    """The reference in float64 on the same (already rounded) inputs."""
    return reference_cache_attention(q.double(), k.double(), v.double(), kv_len)


def assert_close_to_oracle(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int) -> None:
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), oracle(q, k, v, kv_len), atol=ATOL[q.dtype], rtol=RTOL[q.dtype])


def kv(n: int) -> torch.Tensor:
    return torch.tensor(n, dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cache_attention(cpu_kernels: str, dtype: torch.dtype) -> None:
    for batch, q_len, heads, head_dim, capacity, n in [(2, 5, 3, 40, 50, 37), (1, 1, 2, 24, 30, 30),
                                                       (1, 19, 2, 72, 20, 0)]:
        q, k, v = attention_inputs(batch, q_len, heads, head_dim, capacity, dtype)
        torch.library.opcheck(torch.ops.sf_sdk.cache_attention.default, (q, k, v, kv(n)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cache_writes(cpu_kernels: str, dtype: torch.dtype) -> None:
    k_cache, v_cache = rand(2, 12, 3, 8, dtype=dtype), rand(2, 12, 3, 8, dtype=dtype)
    k, v = rand(2, 5, 3, 8, dtype=dtype), rand(2, 5, 3, 8, dtype=dtype)
    slots = torch.tensor([10, 11, 0, 1, 2])
    torch.library.opcheck(torch.ops.sf_sdk.cache_write.default, (k_cache, v_cache, k, v, slots))
    angles = torch.rand(5, 4) * 6.0
    torch.library.opcheck(torch.ops.sf_sdk.cache_write_rope.default,
                          (k_cache, v_cache, k, v, slots, angles.cos(), angles.sin()))


# --------------------------------------------------------------------------------------------
# Parity with the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [24, 40, 72, 128])
@pytest.mark.parametrize(("batch", "q_len", "kv_len"), [(1, 1, 45), (2, 37, 61), (3, 9, 17)])
def test_cache_attention_matches_reference(cpu_kernels: str, dtype: torch.dtype, head_dim: int, batch: int,
                                           q_len: int, kv_len: int) -> None:
    q, k, v = attention_inputs(batch, q_len, 3, head_dim, 61, dtype)
    assert_close_to_oracle(ops.cache_attention(q, k, v, kv_len), q, k, v, kv_len)


@pytest.mark.parametrize(("q_len", "kv_len", "head_dim"), [
    (8, 128, 6),       # the narrow (decode) path at its widest, one full key block, head_dim % 8 != 0
    (600, 700, 128),   # several query blocks with a ragged tail, key blocks with a ragged tail
    (16, 129, 10),     # one key past a block, head_dim % 6 != 0
    (33, 1, 16),       # a single key
])
def test_cache_attention_block_edges(cpu_kernels: str, q_len: int, kv_len: int, head_dim: int) -> None:
    q, k, v = attention_inputs(1, q_len, 2, head_dim, kv_len + 3)
    assert_close_to_oracle(ops.cache_attention(q, k, v, kv_len), q, k, v, kv_len)


def test_cache_attention_float16(cpu_kernels: str) -> None:
    q, k, v = attention_inputs(2, 21, 2, 40, 50, torch.float16)
    assert_close_to_oracle(ops.cache_attention(q, k, v, 44), q, k, v, 44)


def test_cache_attention_reads_strided_views(cpu_kernels: str) -> None:
    """q sliced out of a packed qkv tensor, caches as per-layer views of a stacked buffer."""
    qkv = rand(2, 13, 3, 4, 24)  # [B, L, 3, H, D]
    q = qkv[:, :, 0]  # [B, L, H, D], token stride 3 * H * D
    stacked_k, stacked_v = rand(3, 2, 40, 4, 24), rand(3, 2, 40, 4, 24)  # [layers, B, cap, H, D]
    k, v = stacked_k[1], stacked_v[2]
    assert not q.is_contiguous()
    assert_close_to_oracle(ops.cache_attention(q, k, v, 33), q, k, v, 33)
    # A prefix view of the cache (as the cache-relative rotary path passes it).
    assert_close_to_oracle(ops.cache_attention(q, k[:, :30], v[:, :30], 30), q, k[:, :30], v[:, :30], 30)


@pytest.mark.parametrize("threads", [1, 2])
def test_cache_attention_same_result_for_any_thread_count(cpu_kernels: str, threads: int) -> None:
    q, k, v = attention_inputs(1, 300, 3, 64, 400)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = ops.cache_attention(q, k, v, 390)
    finally:
        torch.set_num_threads(previous)
    assert_close_to_oracle(out, q, k, v, 390)


# --------------------------------------------------------------------------------------------
# kv_len
# --------------------------------------------------------------------------------------------


def test_kv_len_edge_cases(cpu_kernels: str) -> None:
    q, k, v = attention_inputs(2, 7, 2, 16, 20)
    assert torch.equal(ops.cache_attention(q, k, v, 0), torch.zeros_like(q))  # nothing to attend: zeros
    assert torch.equal(reference_cache_attention(q, k, v, 0), torch.zeros_like(q))  # the reference agrees
    for n in (1, 19, 20):
        assert_close_to_oracle(ops.cache_attention(q, k, v, n), q, k, v, n)
    as_int32 = torch.ops.sf_sdk.cache_attention(q, k, v, torch.tensor(11, dtype=torch.int32))
    torch.testing.assert_close(as_int32, ops.cache_attention(q, k, v, 11), atol=0, rtol=0)


@pytest.mark.parametrize(("kv_len", "match"), [
    (kv(21), r"kv_len must lie in \[0, capacity = 20\]"),
    (kv(-1), r"kv_len must lie in \[0, capacity = 20\]"),
    (torch.tensor([5]), "kv_len must be a 0-dim integer tensor"),
    (torch.tensor(5.0), "kv_len must be an int64"),
])
def test_kv_len_errors(cpu_kernels: str, kv_len: torch.Tensor, match: str) -> None:
    q, k, v = attention_inputs(1, 3, 2, 16, 20)
    with pytest.raises(ValueError, match=match):
        torch.ops.sf_sdk.cache_attention(q, k, v, kv_len)


# --------------------------------------------------------------------------------------------
# Bad inputs: the C++ kernel and the fake implementation give the same ValueError
# --------------------------------------------------------------------------------------------

BAD_ATTENTION_INPUTS = {
    "dtype mix": (lambda q, k, v: (q, k.bfloat16(), v), "must have the same dtype"),
    "heads mismatch": (lambda q, k, v: (q[:, :, :1], k, v), "does not match the cache"),
    "head_dim mismatch": (lambda q, k, v: (q[..., :8].contiguous(), k, v), "does not match the cache"),
    "batch mismatch": (lambda q, k, v: (q[:1], k, v), "does not match the cache"),
    "k/v shapes differ": (lambda q, k, v: (q, k, v[:, :10]), "must have the same shape"),
    "non-contiguous last dim": (lambda q, k, v: (q.transpose(2, 3).contiguous().transpose(2, 3), k, v),
                                "contiguous in its last"),
    "3-D q": (lambda q, k, v: (q[0], k, v), "must be a 4-D tensor"),
}


@pytest.mark.parametrize("case", sorted(BAD_ATTENTION_INPUTS))
def test_cache_attention_rejects_bad_inputs(cpu_kernels: str, case: str) -> None:
    mutate, match = BAD_ATTENTION_INPUTS[case]
    q, k, v = mutate(*attention_inputs(2, 5, 2, 16, 20))
    with pytest.raises(ValueError, match=match):  # the C++ CPU kernel
        torch.ops.sf_sdk.cache_attention(q, k, v, kv(10))
    with pytest.raises(ValueError, match=match):  # the fake implementation (torch.compile / export)
        torch.ops.sf_sdk.cache_attention(q.to("meta"), k.to("meta"), v.to("meta"), kv(10))


def test_cpu_kernel_rejects_float64_but_the_wrapper_falls_back(cpu_kernels: str) -> None:
    q, k, v = attention_inputs(1, 4, 2, 8, 10, torch.float64)
    with pytest.raises(ValueError, match="do not support"):
        torch.ops.sf_sdk.cache_attention(q, k, v, kv(10))
    torch.testing.assert_close(ops.cache_attention(q, k, v, 10), reference_cache_attention(q, k, v, 10))


BAD_WRITE_INPUTS = {
    "slot out of range": (lambda kc, vc, k, v, s: (kc, vc, k, v, s + 10), "outside the cache"),
    "negative slot": (lambda kc, vc, k, v, s: (kc, vc, k, v, s - 10), "outside the cache"),
    "float slots": (lambda kc, vc, k, v, s: (kc, vc, k, v, s.float()), "slots must be an int64"),
    "slots length": (lambda kc, vc, k, v, s: (kc, vc, k, v, s[:2]), "one cache slot per token"),
    "dtype mix": (lambda kc, vc, k, v, s: (kc, vc, k.bfloat16(), v, s), "must have the same dtype"),
    "heads mismatch": (lambda kc, vc, k, v, s: (kc, vc, k[:, :, :1], v[:, :, :1], s), "does not match the cache"),
    "k/v shapes differ": (lambda kc, vc, k, v, s: (kc, vc, k, v[:, :2], s), "must have the same shape"),
}


@pytest.mark.parametrize("case", sorted(BAD_WRITE_INPUTS))
def test_cache_write_rejects_bad_inputs(cpu_kernels: str, case: str) -> None:
    mutate, match = BAD_WRITE_INPUTS[case]
    k_cache, v_cache = torch.zeros(1, 12, 2, 8), torch.zeros(1, 12, 2, 8)
    args = mutate(k_cache, v_cache, rand(1, 3, 2, 8), rand(1, 3, 2, 8), torch.tensor([9, 10, 11]))
    with pytest.raises(ValueError, match=match):
        ops.cache_write(*args)
    assert not k_cache.any() and not v_cache.any()  # nothing was written


def test_cache_write_rope_rejects_bad_tables(cpu_kernels: str) -> None:
    k_cache, v_cache = torch.zeros(1, 12, 2, 8), torch.zeros(1, 12, 2, 8)
    k, v, slots = rand(1, 3, 2, 8), rand(1, 3, 2, 8), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"cos must have shape \[n, D/2\] = \[3, 4\]"):
        ops.cache_write_rope(k_cache, v_cache, k, v, slots, torch.ones(3, 8), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="float32 or float64"):
        ops.cache_write_rope(k_cache, v_cache, k, v, slots, torch.ones(3, 4).half(), torch.zeros(3, 4).half())
    odd_cache = torch.zeros(1, 12, 2, 7)
    with pytest.raises(ValueError, match="even head_dim"):
        ops.cache_write_rope(odd_cache, odd_cache.clone(), rand(1, 3, 2, 7), rand(1, 3, 2, 7), slots,
                             torch.ones(3, 3), torch.zeros(3, 3))


# --------------------------------------------------------------------------------------------
# Sink + ring cache: every wrap-around position
# --------------------------------------------------------------------------------------------

SINK, RING, CHUNK, TOKENS = 1, 4, 3, 3  # frames, frames, frames, tokens per frame


def ring_slots(start_frame: int, frames: int) -> torch.Tensor:
    """Token slots of frames [start, start + frames): sinks first, then a ring of whole frames."""
    f = torch.arange(start_frame, start_frame + frames)
    frame_slot = torch.where(f < SINK, f, SINK + (f - SINK) % RING)  # [F]
    return (frame_slot[:, None] * TOKENS + torch.arange(TOKENS)).reshape(-1)  # [F * T]


def window_frames(end_frame: int) -> list[int]:
    """Frames cached after writing a chunk that ends at end_frame (sinks + the last ring frames)."""
    return list(range(min(SINK, end_frame))) + list(range(max(SINK, end_frame - RING), end_frame))


@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ring_stream_every_wrap_position(cpu_kernels: str, rope: bool, dtype: torch.dtype) -> None:
    """A stream of chunks starting at every frame: the ring write (wrapping or not) equals the
    reference write, and attention over the ring in place equals attention over the window's
    frames concatenated in time order (the official layout)."""
    batch, heads, head_dim = 2, 3, 24
    capacity = (SINK + RING) * TOKENS
    frames = SINK + 2 * RING + CHUNK
    keys, values = rand(batch, frames * TOKENS, heads, head_dim), rand(batch, frames * TOKENS, heads, head_dim)
    angles = torch.rand(frames * TOKENS, head_dim // 2, dtype=torch.float64) * 2 * math.pi
    k_cache, v_cache = torch.zeros(batch, capacity, heads, head_dim, dtype=dtype), None
    v_cache = torch.zeros_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    # What the cache should hold for every frame of the stream, in time order: [B, frames * T, H, D].
    stored_k = keys.to(dtype)
    if rope:
        stored_k = ops._rotate_pairs(stored_k, angles.cos(), angles.sin()).to(dtype)
    stored_v = values.to(dtype)
    wrap_positions = set()
    for start in range(frames - CHUNK + 1):
        tokens = slice(start * TOKENS, (start + CHUNK) * TOKENS)
        slots = ring_slots(start, CHUNK)
        k_new, v_new = keys[:, tokens].to(dtype), values[:, tokens].to(dtype)
        if rope:
            cos, sin = angles[tokens].cos(), angles[tokens].sin()
            ops.cache_write_rope(k_cache, v_cache, k_new, v_new, slots, cos, sin)
            ops.reference_cache_write_rope(k_ref, v_ref, k_new, v_new, slots, cos, sin)
        else:
            ops.cache_write(k_cache, v_cache, k_new, v_new, slots)
            ops.reference_cache_write(k_ref, v_ref, k_new, v_new, slots)
        torch.testing.assert_close(k_cache, k_ref, atol=0, rtol=0)
        assert torch.equal(v_cache, v_ref)
        if start >= SINK:
            wrap_positions.add((start - SINK) % RING)

        end = start + CHUNK
        window = torch.tensor([f * TOKENS + t for f in window_frames(end) for t in range(TOKENS)])
        kv_len = len(window)
        assert kv_len == min(end, SINK + RING) * TOKENS  # the valid slots are a prefix
        q = rand(batch, CHUNK * TOKENS, heads, head_dim, dtype=dtype)
        out = ops.cache_attention(q, k_cache, v_cache, kv_len)
        assert_close_to_oracle(out, q, stored_k[:, window], stored_v[:, window], kv_len)  # time order
    assert wrap_positions == set(range(RING))


def test_cache_write_rope_is_wans_complex_rotation(cpu_kernels: str) -> None:
    """Channels (2p, 2p + 1) are the real and imaginary parts of a complex number multiplied by
    exp(i * angle[token, p]), as in Wan's rope_apply."""
    k = rand(2, 5, 3, 16, dtype=torch.float64)
    angles = torch.rand(5, 8, dtype=torch.float64) * 6.0
    k_cache, v_cache = torch.zeros(2, 9, 3, 16, dtype=torch.float64), torch.zeros(2, 9, 3, 16, dtype=torch.float64)
    slots = torch.tensor([4, 5, 6, 7, 8])
    ops.cache_write_rope(k_cache, v_cache, k, k, slots, angles.cos(), angles.sin())
    expected = torch.view_as_real(torch.view_as_complex(k.reshape(2, 5, 3, 8, 2))
                                  * torch.polar(torch.ones_like(angles), angles)[None, :, None]).reshape(2, 5, 3, 16)
    torch.testing.assert_close(k_cache[:, 4:], expected, atol=1e-12, rtol=1e-12)
    assert torch.equal(v_cache[:, 4:], k) and not k_cache[:, :4].any()


# --------------------------------------------------------------------------------------------
# torch.export / torch.compile
# --------------------------------------------------------------------------------------------


class ChunkStep(torch.nn.Module):
    """Writes a chunk into its ring slots, then attends over the cache (a static-shape step)."""

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, slots: torch.Tensor, kv_len: torch.Tensor) -> torch.Tensor:
        ops.cache_write(k_cache, v_cache, k, v, slots)
        return ops.cache_attention(q, k_cache, v_cache, kv_len)


def step_inputs() -> tuple[torch.Tensor, ...]:
    return (rand(1, 6, 2, 24), torch.zeros(1, 15, 2, 24), torch.zeros(1, 15, 2, 24), rand(1, 6, 2, 24),
            rand(1, 6, 2, 24), torch.tensor([12, 13, 14, 3, 4, 5]), kv(15))


def clone_all(args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(a.clone() for a in args)


def test_ops_trace_under_torch_export(cpu_kernels: str) -> None:
    args = step_inputs()
    exported = torch.export.export(ChunkStep(), clone_all(args))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any("sf_sdk.cache_attention" in t for t in targets), targets
    assert any("sf_sdk.cache_write" in t for t in str(exported.graph).split()), exported.graph
    eager_args, exported_args = clone_all(args), clone_all(args)
    expected = ChunkStep()(*eager_args)
    torch.testing.assert_close(exported.module()(*exported_args), expected, atol=0, rtol=0)
    torch.testing.assert_close(exported_args[1], eager_args[1], atol=0, rtol=0)  # the cache write happened


def test_ops_trace_under_torch_compile_fullgraph(cpu_kernels: str, restore_backend: None) -> None:
    step = torch.compile(ChunkStep(), fullgraph=True, backend="aot_eager")
    args = step_inputs()
    eager_args, compiled_args = clone_all(args), clone_all(args)
    torch.testing.assert_close(step(*compiled_args), ChunkStep()(*eager_args), atol=0, rtol=0)
    torch.testing.assert_close(compiled_args[2], eager_args[2], atol=0, rtol=0)

    # The attention seam with an int kv_len and the kernel backend, as the DiT calls it.
    attention.set_backend("kernel")
    seam = torch.compile(lambda q, k, v: attention.cache_attention(q, k, v, 11), fullgraph=True, backend="aot_eager")
    q, k, v = attention_inputs(1, 5, 2, 16, 20)
    torch.testing.assert_close(seam(q, k, v), ops.cache_attention(q, k, v, 11), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# Dispatch (sf_sdk.attention) and the "auto" rule
# --------------------------------------------------------------------------------------------


def test_attention_backends(cpu_kernels: str, restore_backend: None) -> None:
    q, k, v = attention_inputs(1, 9, 2, 16, 20)
    kernel_out = torch.ops.sf_sdk.cache_attention(q, k, v, kv(17))
    attention.set_backend("kernel")
    assert torch.equal(attention.cache_attention(q, k, v, 17), kernel_out)
    attention.set_backend("reference")
    assert torch.equal(attention.cache_attention(q, k, v, 17), reference_cache_attention(q, k, v, 17))
    attention.set_backend("kernel")  # anything that needs gradients takes the reference
    q_grad = q.clone().requires_grad_()
    attention.cache_attention(q_grad, k, v, 17).sum().backward()
    assert q_grad.grad is not None


def test_kernel_available_rule(cpu_kernels: str) -> None:
    small = torch.zeros(1, 72, 4, 24)
    large = torch.zeros(1, 1170, 12, 128)
    # int kv_len: SDPA on the sliced view, small or large, float32 or bfloat16 (AMX)
    for q in (small, large, small.bfloat16(), large.bfloat16()):
        assert not ops.kernel_available(q, False)
    # tensor kv_len: the reference would read and mask the whole capacity
    assert ops.kernel_available(small, False, masked=True)
    assert ops.kernel_available(large.bfloat16(), False, masked=True)
    assert ops.kernel_available(large, True)  # required: always, when loaded
    assert not ops.kernel_available(small.double(), False)
    with pytest.raises(RuntimeError, match="python -m sf_sdk.ops build"):
        ops.kernel_available(small.double(), True)
    with pytest.raises(RuntimeError, match="no kernels for device type 'meta'"):
        ops.kernel_available(small.to("meta"), True)


def test_golden_parity_with_the_kernel_path(cpu_kernels: str, golden_dir: Path, restore_backend: None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The official implementation's rolling cache with sinks (evictions included) in float32,
    with every cache attention of the DiT on the compiled kernel."""
    from sf_sdk.parity import check_file, tolerance

    calls = []
    kernel = ops.cache_attention
    monkeypatch.setattr(ops, "cache_attention", lambda *args: calls.append(1) or kernel(*args))
    attention.set_backend("kernel")
    res = check_file(golden_dir / "dit_causal_rolling_sink.safetensors", torch.float32)
    assert res.status == "ok", (res.status, res.detail, res.errors)
    assert res.max_rel_error <= tolerance(torch.float32)
    assert len(calls) > 0


# --------------------------------------------------------------------------------------------
# Build machinery (subprocesses: fresh import state)
# --------------------------------------------------------------------------------------------


def run_python(code: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


FALLBACK_SCRIPT = """
    import logging, os, torch
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    from sf_sdk import attention, ops
    q, k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 8)
    ref = attention.reference_cache_attention(q, k, v, 7)
    for scenario, env in (("missing", {"SF_SDK_CSRC": os.environ["NO_CSRC"]}), ("disabled", {"SF_SDK_NO_CPU_KERNELS": "1"})):
        print("SCENARIO", scenario, flush=True)
        ops._state.clear()  # a fresh process as far as kernel loading goes
        os.environ.update(env)
        attention.set_backend("auto")
        for _ in range(3):
            assert torch.allclose(ops.cache_attention(q, k, v, 7), ref, atol=1e-6)
            assert torch.allclose(attention.cache_attention(q, k, v, torch.tensor(7)), ref, atol=1e-6)
        attention.set_backend("kernel")
        try:
            attention.cache_attention(q, k, v, 7)
            raise SystemExit("backend 'kernel' did not raise")
        except RuntimeError as exc:
            print("RAISED", exc, flush=True)
        os.environ.pop(next(iter(env)))
"""


def test_missing_or_disabled_build_falls_back(tmp_path: Path) -> None:
    """A build that cannot happen (no sources) falls back to the reference with exactly one
    warning; SF_SDK_NO_CPU_KERNELS=1 falls back with none and builds nothing; backend 'kernel'
    raises, saying how to build, in both cases."""
    result = run_python(FALLBACK_SCRIPT, {"NO_CSRC": str(tmp_path / "no-csrc"), "SF_SDK_NO_CUDA_KERNELS": "1",
                                          "SF_SDK_KERNEL_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    missing, disabled = result.stderr.split("SCENARIO disabled") if "SCENARIO disabled" in result.stderr else (
        result.stderr, "")
    out_missing, out_disabled = result.stdout.split("SCENARIO disabled")
    warnings = [line for line in missing.splitlines() if line.startswith("WARNING sf_sdk.ops")]
    assert len(warnings) == 1, result.stderr
    assert "using the PyTorch reference" in warnings[0]
    assert "WARNING" not in out_disabled and "WARNING" not in disabled
    for out in (out_missing, out_disabled):
        assert "RAISED" in out and "python -m sf_sdk.ops build" in out, result.stdout
    assert "disabled by the environment" in result.stderr
    assert not (tmp_path / "cache").exists()  # nothing was built


def test_build_cli(cpu_kernels: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="sf_sdk.ops"):
        assert ops.main(["build", "--device", "cpu", "--require"]) == 0
    assert f"cpu kernels: {cpu_kernels}" in caplog.text


PROBE_SOURCE = 'extern "C" int sf_sdk_build_probe() { return 42; }\n'
PROBE_BUILD = """
    import logging, sys
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    from sf_sdk import ops
    spec = ops._BuildSpec(name="sf_sdk_probe", sources=(Path(sys.argv[1]),), headers=(), cflags=("-O0",),
                          tag="probe")
    if sys.argv[2] == "dir":
        print(spec.directory())
    else:
        print("LIBRARY", ops._build_and_load(spec, verbose=False))
"""


@pytest.mark.slow
def test_concurrent_builds_are_serialized(tmp_path: Path) -> None:
    """Two processes build the same library at once, over a stale cpp_extension lock file left by
    a killed build: both load it, one compiles it."""
    source = tmp_path / "probe.cpp"
    source.write_text(PROBE_SOURCE)
    env = {**os.environ, "PYTHONPATH": str(REPO), "SF_SDK_KERNEL_CACHE": str(tmp_path / "cache")}
    script = textwrap.dedent(PROBE_BUILD)
    directory = Path(subprocess.run([sys.executable, "-c", script, str(source), "dir"], env=env, capture_output=True,
                                    text=True, check=True, cwd=REPO).stdout.strip())
    directory.mkdir(parents=True)
    (directory / "lock").write_text("")  # the baton a killed cpp_extension build leaves behind
    procs = [subprocess.Popen([sys.executable, "-c", script, str(source), "build"], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in outputs]
    libraries = {line for out, _ in outputs for line in out.splitlines() if line.startswith("LIBRARY")}
    assert len(libraries) == 1, outputs
    builds = sum(err.count("building the sf_sdk_probe kernels") for _, err in outputs)
    assert builds == 1, outputs


# --------------------------------------------------------------------------------------------
# CUDA sources and the benchmark
# --------------------------------------------------------------------------------------------


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    cuda_home = os.environ.get("CUDA_HOME")
    candidates = [Path(cuda_home) / "bin" / "nvcc"] if cuda_home else []
    candidates += sorted(Path("/usr/local").glob("cuda*/bin/nvcc"))
    return next((str(p) for p in candidates if p.is_file()), None)


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.skipif(os.environ.get("SF_SDK_CUDA_CHECKED") == "1",
                    reason=".ci/run already ran csrc/check_cuda.sh and stops on its failure")
def test_cuda_sources_compile_for_sm80_and_sm90() -> None:
    result = subprocess.run(["bash", str(REPO / "csrc" / "check_cuda.sh")], capture_output=True, text=True,
                            timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("  ok  ") >= 7, result.stdout


def test_benchmark_runs_and_reports(cpu_kernels: str, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("attention_benchmark", REPO / "benchmarks" / "attention.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up
    spec.loader.exec_module(bench)
    assert bench.main(["--json", "--presets", "tiny", "--dtypes", "float32", "--tiny-rounds", "3", "--warmup", "1",
                       "--gemm-size", "256"]) == 0
    data = json.loads(capsys.readouterr().out)
    (case,) = data["cases"]
    assert case["shape"]["q_len"] == 72 and case["shape"]["kv_len"] == 144 and case["shape"]["head_dim"] == 24
    assert set(case["methods"]) == {"kernel", "inplace_sdpa", "concat_sdpa", "shift_sdpa"}
    assert case["max_abs_diff_vs_inplace_sdpa"] < 1e-4
    assert data["versions"]["torch"] == torch.__version__
