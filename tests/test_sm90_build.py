"""The decode step's main Triton kernels built for the H100/H200 (sm_90) on any machine: Triton's own
compiler and the ptxas it ships, in a subprocess with the interpreter off (this suite otherwise runs
kernels under the interpreter).

The subprocess installs a build-only driver: every launch the library makes compiles its kernel for
sm_90 and returns without running it (the outputs are left as allocated). So the library's own
launchers pick every setting, at Qwen3-8B's shapes, and nothing is restated here. One difference from
a GPU: off a GPU the attention counts 4 SMs and launches no splits, so one case asks for 4 to build
its merge kernel. Every kernel of a decode step is built but the step's bookkeeping (``advance``).

The interpreter runs a kernel as Python: it accepts code the compiler rejects (a loop-carried variable
whose type changes inside the loop) and tells nothing of what a program needs on the GPU. The build
catches the first. For the top-k it also bounds the second where the design fixes it: the only large
shared-memory user is step 6's sort of K_PAD composites (8 bytes each), so more than that means the
compiler moved some other tensor through shared memory (a 3-D broadcast in its searches once took
128 KB).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
    pytest.skip("this Triton build has no CUDA back end (ptxas)", allow_module_level=True)

SRC = Path(__file__).resolve().parent.parent / "src"

BUILD = r"""
import json
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction


class BuildOnly:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


driver.set_active(BuildOnly())
built = []
compile_and_run = JITFunction.run


def build(self, *args, grid, warmup, **kwargs):
    kernel = compile_and_run(self, *args, grid=grid, warmup=True, **kwargs)
    built[-1]["kernels"].append({"name": self.fn.__name__, "shared": kernel.metadata.shared,
                                 "cubin": len(kernel.asm["cubin"])})
    return kernel


JITFunction.run = build

from lessismore.engine import kernels, sampling  # noqa: E402
from lessismore.methods.lessismore.triton import union_selection  # noqa: E402
from lessismore.ops import quest, skinny, topk, triton_decode  # noqa: E402


def case(name, call, **info):
    built.append({"case": name, "kernels": [], **info})
    call()


bf16 = torch.bfloat16
# The top-k: LessIsMore's prefix (k = 1,024 over 32K), a full k = 1,536 list, TidalDecode's k = 2,047 positions.
for k, length, positions in [(1024, 32768, False), (1536, 32768, False), (2047, 16384, True)]:
    s, lens = torch.empty(2, 32, length), torch.full((2,), length, dtype=torch.int32)
    fn = topk.topk_positions if positions else topk.topk_desc
    case(f"topk k={k} L={length}", lambda: fn(s, k, lens), k_pad=triton.next_power_of_2(k))
# The GEMMs at Qwen3-8B's shapes, M = 8 and 32.
for n, kdim in [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)]:
    w = torch.empty(n, kdim, dtype=bf16)
    for m in (8, 32):
        case(f"skinny {m}x{n}x{kdim}", lambda: skinny.skinny_linear(torch.empty(m, kdim, dtype=bf16), w))
# Decode attention (32 query / 8 KV heads, head dim 128): full rows with scores, a shared set, per-head sets.
q, kc, vc = torch.empty(8, 32, 128, dtype=bf16), torch.empty(8, 8, 16384, 128, dtype=bf16), torch.empty(8, 8, 16384, 128, dtype=bf16)
lens = torch.full((8,), 16384, dtype=torch.int32)
case("dense + scores", lambda: triton_decode.split_decode(q, kc, vc, None, lens, dense=True, scores=torch.empty(8, 32, 16384)))
case("dense, 4 splits", lambda: triton_decode.split_decode(q[:1], kc[:1], vc[:1], None, lens[:1], dense=True, num_splits=4))
idx = torch.zeros(8, 2048, dtype=torch.int64)
case("sparse", lambda: triton_decode.sparse_decode_attention(q, kc, vc, idx, torch.full((8,), 2048, dtype=torch.int32)))
case("per-head", lambda: triton_decode.sparse_decode_attention_per_head(
    q, kc, vc, torch.zeros(8, 32, 2048, dtype=torch.int64), torch.full((8, 32), 2048, dtype=torch.int32)))
# LessIsMore's union of 32 heads' lists (K = 2,048: 512 recent, 1,536 ranked); Quest's top 128 of 1,024 pages.
case("union", lambda: union_selection(torch.zeros(8, 32, 1536, dtype=torch.int64), torch.empty(8, 32, 1536), lens, 16384,
                                      2048, 512, 4))
lo, hi = torch.empty(8, 8, 1024, 128, dtype=bf16), torch.empty(8, 8, 1024, 128, dtype=bf16)
case("quest fold", lambda: quest.quest_fold(lo, hi, kc, lens, 16))
case("quest page scores", lambda: quest.quest_page_scores(q, lo, hi, lens, 16))
case("quest select", lambda: quest.quest_select(torch.empty(8, 32, 1024), lens, 16, 128, 2048))
# The small kernels around the GEMMs.
x = torch.empty(8, 4096, dtype=bf16)
pos = torch.zeros(8, dtype=torch.int64)
case("qk_norm_rope_store", lambda: kernels.qk_norm_rope_store(
    torch.empty(8, 6144, dtype=bf16), 32, 8, 128, pos, pos, torch.empty(16384, 64), torch.empty(16384, 64), kc, vc,
    torch.empty(2, 128, dtype=bf16), 1e-6, impl="triton"))
case("add_rmsnorm", lambda: kernels.add_rmsnorm(x, x.clone(), torch.empty(4096, dtype=bf16), 1e-6, impl="triton"))
case("silu_mul", lambda: kernels.silu_mul(torch.empty(8, 24576, dtype=bf16), impl="triton"))
# Sampling over Qwen's vocabulary.
rows = 8
case("sampling", lambda: sampling._sample_triton(
    torch.empty(rows, 151936), torch.full((rows,), 0.6), torch.full((rows,), 0.95), torch.zeros(rows, dtype=torch.int64),
    torch.zeros(rows, dtype=torch.int64), torch.zeros(rows, dtype=torch.int64)))
print(json.dumps(built))
"""


@pytest.fixture(scope="module")
def built():
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", BUILD], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_launch_builds(built):
    assert len(built) == 3 + 8 + 4 + 4 + 3 + 1
    for entry in built:
        assert entry["kernels"], f"{entry['case']}: launched no Triton kernel"
        assert all(kernel["cubin"] > 0 for kernel in entry["kernels"]), entry


def test_topk_shared_memory_is_the_sorts(built):
    for entry in (e for e in built if e["case"].startswith("topk")):
        (kernel,) = entry["kernels"]
        assert kernel["shared"] <= 8 * entry["k_pad"], f"{entry['case']}: {kernel['shared']} bytes of shared memory"
