"""Compile the Triton kernels ahead of time for a Hopper GPU (sm_90), with no GPU present.

    python tests/triton_aot.py   ->  one JSON line per flag set: kernel -> (shared bytes, cubin bytes)

Run by tests/test_triton_compile.py in a process without TRITON_INTERPRET (under the
interpreter, @triton.jit builds no compiler path).
"""
import json
import os
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kernels import itc  # noqa: E402

SCALARS = {"B", "Q", "D", "NUM_SPLITS", "NUM_DBLOCKS"}


def _signature(fn, constexprs, feature_type):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("idx_ptr", "idx_queue_ptr"):
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            feature = name.split("_")[0] in ("img", "txt", "sim", "dq")
            sig[name] = feature_type if feature else "*fp32"
        elif name.startswith("stride") or name in SCALARS:
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig


def _compile(kernel, constexprs, feature_type, num_warps):
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):  # through autotune / heuristics
        fn = fn.fn
    src = ASTSource(fn=fn, signature=_signature(fn, constexprs, feature_type), constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


FLAGS = {  # STUDENT / TEACHER: which states the split launch keeps (both, or one launch each)
    "bf16": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=False, DOT=tl.bfloat16, PREC="ieee", TYPE="*bf16"),
    "bf16-student-only": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=True, DOT=tl.bfloat16, PREC="ieee", TYPE="*bf16",
                              TEACHER=False),
    "bf16-teacher-only": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=True, DOT=tl.bfloat16, PREC="ieee", TYPE="*bf16",
                              STUDENT=False),
    "tf32-retrieval": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=True, DOT=tl.float32, PREC="tf32", TYPE="*fp32"),
    "fp32-nograd": dict(GRAD=False, HAS_TEACHER=False, RETRIEVAL=False, DOT=tl.float32, PREC="ieee", TYPE="*fp32"),
}


def compile_all(flags):
    common = dict(GRAD=flags["GRAD"], HAS_TEACHER=flags["HAS_TEACHER"], RETRIEVAL=flags["RETRIEVAL"], TEMP_FROM_PTR=True)
    roles = dict(STUDENT=flags.get("STUDENT", True), TEACHER=flags.get("TEACHER", flags["HAS_TEACHER"]))
    split = _compile(itc._itc_split_fwd_kernel, dict(common, **roles, DOT_DTYPE=flags["DOT"],
                                                     INPUT_PRECISION=flags["PREC"], BLOCK_M=64, BLOCK_N=64,
                                                     BLOCK_D=64, NUM_DK=4),
                     flags["TYPE"], num_warps=8)
    merge = _compile(itc._itc_merge_fwd_kernel, dict(common, BLOCK_M=32, BLOCK_D=64), flags["TYPE"], num_warps=4)
    finish = _compile(itc._itc_finish_fwd_kernel, dict(HAS_TEACHER=flags["HAS_TEACHER"], TEMP_FROM_PTR=True,
                                                       BLOCK_B=64), flags["TYPE"], num_warps=4)
    return {name: (k.metadata.shared, len(k.asm["cubin"])) for name, k in
            (("split", split), ("merge", merge), ("finish", finish))}


if __name__ == "__main__":
    names = sys.argv[1:] or list(FLAGS)
    for name in names:
        print(json.dumps({"flags": name, **compile_all(FLAGS[name])}), flush=True)
