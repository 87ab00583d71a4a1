"""The Triton top-k built for the H100/H200 (sm_90) on any machine, with Triton's own compiler and the
ptxas it ships, in a subprocess with the interpreter off (this suite runs kernels under the interpreter).

The interpreter runs a kernel as Python: it accepts code the compiler rejects (a loop-carried variable
whose type changes inside the loop) and tells nothing of what a program needs on the GPU. The build
catches the first, and bounds the second where the design fixes it: the only large shared-memory user
is step 6's sort of K_PAD composites (8 bytes each), so more than that means the compiler moved some
other tensor through shared memory (a 3-D broadcast in the searches once took 128 KB).
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

# (k, L, by_position, lengths given): LessIsMore's prefix top-k, a full k = 1,536 list, TidalDecode's
# per-head sets (k = 2,047 positions).
CASES = [(1024, 32768, False, True), (1536, 32768, False, False), (2047, 16384, True, True)]

BUILD = """
import json, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from lessismore.ops import topk
out = []
for k, length, by_pos, has_len in json.loads(sys.argv[1]):
    cap, meta = topk.launch_settings(k, length, by_pos, has_len, False)
    options = {"num_warps": meta.pop("num_warps")}
    sig = {"S": "*fp32", "LEN": "*i32" if has_len else "*fp32", "ACTIVE": "*fp32", "CC": "*i64", "COMP": "*i64",
           "VAL": "*i64" if by_pos else "*fp32", "IDX": "*i64", "L": "i32", "row_len": "i32", "K": "i32",
           "rows_per_len": "i32", "cap": "i32", **{name: "constexpr" for name in meta}}
    kernel = compile(ASTSource(fn=topk._topk_kernel, signature=sig, constexprs=meta),
                     target=GPUTarget("cuda", 90, 32), options=options)
    out.append({"shared": kernel.metadata.shared, "k_pad": meta["K_PAD"], "cubin": len(kernel.asm["cubin"])})
print(json.dumps(out))
"""


def test_topk_builds_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", BUILD, json.dumps(CASES)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(built) == len(CASES)
    for case, kernel in zip(CASES, built):
        assert kernel["cubin"] > 0, case
        assert kernel["shared"] <= 8 * kernel["k_pad"], f"{case}: {kernel['shared']} bytes of shared memory"
