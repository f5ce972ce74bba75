"""Compile the Triton kernels ahead of time for a Hopper GPU (sm_90), with no GPU present.

    python tests/triton_aot.py   ->  one JSON line per flag set: kernel -> (shared bytes, cubin bytes)
    python tests/triton_aot.py --hashes   ->  kernel -> ptx_hash (compare before / after a refactor)
    python tests/triton_aot.py --tuned-hashes   ->  the same for the split kernel of every TUNED config
    python tests/triton_aot.py --report [flags ...]   ->  registers, spills, programs per SM per config

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
from kernels import itc_backward, itc_configs, itc_convert, itc_merge, itc_split, launch  # noqa: E402

SCALARS = {"B", "Q", "D", "N", "NUM_SPLITS", "NUM_DBLOCKS", "KC_STRIDE", "T0", "T1", "NT"}
FEATURE_PTRS = {"grad_image_ptr", "grad_text_ptr", "out_image_ptr", "out_text_ptr"}  # the backward's [B, D]


def _signature(fn, constexprs, feature_type):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("idx_ptr", "idx_queue_ptr"):
            sig[name] = "*i64"
        elif name in ("kc_ptr", "qc_ptr"):  # the converted operands (PRESCALED), else unused fp32 pointers
            sig[name] = "*fp16" if constexprs.get("PRESCALED", True) else "*fp32"
        elif name.endswith("_ptr"):
            feature = name.split("_")[0] in ("img", "txt", "sim", "dq") or name in FEATURE_PTRS
            sig[name] = feature_type if feature else "*fp32"
        elif name.startswith("stride") or name in SCALARS:
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig


UNIT_STRIDES = {"stride_fd": 1, "stride_qj": 1, "stride_idx": 1, "stride_idq": 1}  # == 1: constexpr at run time
DIVISIBLE = {"B", "Q", "D", "stride_fb", "stride_qd", "KC_STRIDE"}  # multiples of 16 at ALBEF's shapes


def _compile(kernel, constexprs, feature_type, num_warps, num_stages=2, maxnreg=None):
    """Compile as Triton specializes at run time for ALBEF's shapes (B, Q, D multiples of 16,
    contiguous features and queue): pointers and those ints marked divisible by 16 (what lets
    loads vectorize and pipeline), unit strides folded in as constants."""
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):  # through autotune / heuristics
        fn = fn.fn
    constexprs = dict(constexprs, **{k: v for k, v in UNIT_STRIDES.items() if k in fn.arg_names})
    sig = _signature(fn, constexprs, feature_type)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in constexprs and (name.endswith("_ptr") or name in DIVISIBLE)}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages, **launch.FIXED_OPTIONS,
                   **({"maxnreg": maxnreg} if maxnreg else {}))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


FLAGS = {  # KIND_AXIS: student and teacher states in one program (0) or one program each (1)
    "bf16": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=False, DOT=tl.bfloat16, PREC="ieee", TYPE="*bf16"),
    "bf16-kind-axis": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=True, DOT=tl.bfloat16, PREC="ieee", TYPE="*bf16",
                           KIND_AXIS=1, KT_LOAD=1),
    "tf32-retrieval": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=True, DOT=tl.float32, PREC="tf32rn", TYPE="*fp32"),
    "tf32-logits-t": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=True, DOT=tl.float32, PREC="tf32rn", TYPE="*fp32",
                          KIND_AXIS=1, KT_LOAD=1, LOGITS_T=1),
    "fp32-nograd": dict(GRAD=False, HAS_TEACHER=False, RETRIEVAL=False, DOT=tl.float32, PREC="ieee", TYPE="*fp32"),
    # fp32 features and queues, fp16 products (ALBEF_FAST_TF32=f16s)
    "f16s-retrieval": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=True, DOT=tl.float16, PREC="f16s", TYPE="*fp32"),
    "f16s-kind-axis": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=False, DOT=tl.float16, PREC="f16s", TYPE="*fp32",
                           KIND_AXIS=1),
    # the key tiles converted before their max is known (ALBEF_FAST_KEYS_AS_IS=1)
    "f16s-as-is": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=True, DOT=tl.float16, PREC="f16s", TYPE="*fp32",
                       KIND_AXIS=1, KEYS_AS_IS=True),
    # fp32 "highest" through 3 fp16 products (f16x3, the default), key sums rounded per tile
    "f16x3-retrieval": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=True, DOT=tl.float16, PREC="f16x3", TYPE="*fp32",
                            KIND_AXIS=1, LOGITS_T=1, TILE_SUMS=True),
    # f16s with the key tiles converted once per call (ALBEF_FAST_TF32=f16p): + the conversion kernel
    "f16p-retrieval": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=True, DOT=tl.float16, PREC="f16s", TYPE="*fp32",
                           KIND_AXIS=1, PRESCALED=True, RESUME=True, BLOCK_D=256),
    "f16x3p-retrieval": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=True, DOT=tl.float16, PREC="f16x3",
                             TYPE="*fp32", KIND_AXIS=1, PRESCALED=True, RESUME=True, BLOCK_D=256, LOGITS_T=1,
                             TILE_SUMS=True),
}
REPORT = {  # --report: every autotune config of these
    "bf16": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=False, DOT=tl.bfloat16, PREC="ieee", TYPE="*bf16"),
    "tf32": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=False, DOT=tl.float32, PREC="tf32rn", TYPE="*fp32"),
    "f16s": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=False, DOT=tl.float16, PREC="f16s", TYPE="*fp32"),
    # the query rows kept in registers (ALBEF_FAST_STAGE_ROWS=0; kernels/itc_split.py:_staged_rows)
    "f16s-registers": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=False, DOT=tl.float16, PREC="f16s",
                           TYPE="*fp32", STAGE_ROWS=False),
    # the key tiles converted before their max is known (ALBEF_FAST_KEYS_AS_IS=1)
    "f16s-as-is": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=False, DOT=tl.float16, PREC="f16s", TYPE="*fp32",
                       KEYS_AS_IS=True),
    # split s takes the tiles s, s + S, ... (ALBEF_FAST_INTERLEAVE=1)
    "f16s-interleaved": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=False, DOT=tl.float16, PREC="f16s",
                             TYPE="*fp32", INTERLEAVE=True),
    "f16x3": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=False, DOT=tl.float16, PREC="f16x3", TYPE="*fp32"),
    "f16p": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=False, DOT=tl.float16, PREC="f16s", TYPE="*fp32",
                 PRESCALED=True, RESUME=True),  # a chunk after the first (the states loaded first)
    "f16x3p": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=False, DOT=tl.float16, PREC="f16x3", TYPE="*fp32",
                   PRESCALED=True, RESUME=True),
    # the key sums rounded once per tile (kernels/itc_split.py:_key_sum), f16x3's default
    "f16x3-tile": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=False, DOT=tl.float16, PREC="f16x3", TYPE="*fp32",
                       TILE_SUMS=True),
    "f16x3p-tile": dict(GRAD=True, HAS_TEACHER=True, RETRIEVAL=False, DOT=tl.float16, PREC="f16x3", TYPE="*fp32",
                        PRESCALED=True, RESUME=True, TILE_SUMS=True),
}


def _split_constexprs(flags, config):
    kw = dict(config.kwargs)
    args = dict(kw, HAS_TEACHER=flags["HAS_TEACHER"], D=256)
    heur = itc_split._kind_heuristics(args)
    return dict(GRAD=flags["GRAD"], HAS_TEACHER=flags["HAS_TEACHER"], RETRIEVAL=flags["RETRIEVAL"], TEMP_FROM_PTR=True,
                DOT_DTYPE=flags["DOT"], INPUT_PRECISION=flags["PREC"], PRESCALED=flags.get("PRESCALED", False),
                RESUME=flags.get("RESUME", False), TILE_SUMS=flags.get("TILE_SUMS", False),
                STAGE_ROWS=flags.get("STAGE_ROWS", flags["PREC"] == "f16s"), INTERLEAVE=flags.get("INTERLEAVE", False),
                KEYS_AS_IS=flags.get("KEYS_AS_IS", False),
                NUM_DK=-(-256 // kw["BLOCK_D"]), **kw, **heur)


def compile_all(flags, summary=None):
    common = dict(GRAD=flags["GRAD"], HAS_TEACHER=flags["HAS_TEACHER"], RETRIEVAL=flags["RETRIEVAL"], TEMP_FROM_PTR=True)
    config = itc_configs.make_config(64, 64, flags.get("BLOCK_D", 64), flags.get("KIND_AXIS", 0), flags.get("KT_LOAD", 0),
                                     8, logits_t=flags.get("LOGITS_T", 0))
    split = _compile(itc_split._itc_split_fwd_kernel, _split_constexprs(flags, config), flags["TYPE"], num_warps=8)
    # the merge's rounding of fp32 features as the products round them (kernels/itc.py:_merge_rounding)
    rounding = {"f16s": "f16", "tf32rn": "tf32rn"}.get(flags["PREC"], "none") if flags["TYPE"] == "*fp32" else "none"
    merge = _compile(itc_merge._itc_merge_fwd_kernel, dict(common, BLOCK_M=16, BLOCK_D=64, CHUNK=4, FINISH=True, BLOCK_B=64,
                                                                   DBLOCKS=4, MERGE_STAGES=1, ROUND=rounding),
                     flags["TYPE"], num_warps=4)
    merge_stages = _compile(itc_merge._itc_merge_fwd_kernel, dict(common, BLOCK_M=16, BLOCK_D=16, CHUNK=16, FINISH=True,
                                                                  BLOCK_B=64, DBLOCKS=16, MERGE_STAGES=3, ROUND=rounding),
                            flags["TYPE"], num_warps=4, num_stages=3)  # ALBEF_FAST_MERGE=16,16,16,3
    merge_warps = _compile(itc_merge._itc_merge_fwd_kernel, dict(common, BLOCK_M=16, BLOCK_D=16, CHUNK=16, FINISH=True,
                                                                 BLOCK_B=64, DBLOCKS=16, MERGE_STAGES=1, ROUND=rounding),
                           flags["TYPE"], num_warps=8)  # ALBEF_FAST_MERGE=16,16,16,1,8
    finish = _compile(itc_merge._itc_finish_fwd_kernel, dict(HAS_TEACHER=flags["HAS_TEACHER"], TEMP_FROM_PTR=True,
                                                       BLOCK_B=64, DBLOCKS=16), flags["TYPE"], num_warps=4)
    scale = _compile(itc_backward._itc_scale_bwd_kernel, dict(BLOCK=1024, HAS_TEMP=True), flags["TYPE"], num_warps=4)
    kernels = [("split", split), ("merge", merge), ("merge-stages", merge_stages), ("merge-warps", merge_warps),
               ("finish", finish), ("scale", scale)]
    if flags.get("PRESCALED"):
        keys_meta = dict(BLOCK_N=64, BLOCK_D=256, NUM_DK=1, ROWS=16, PAIRS=flags["PREC"] == "f16x3")
        kernels.append(("keys", _compile(itc_convert._itc_keys_fwd_kernel, keys_meta, flags["TYPE"], num_warps=4)))
    return {name: (summary or _sizes)(k) for name, k in kernels}


def _sizes(kernel):
    return kernel.metadata.shared, len(kernel.asm["cubin"])


def ptx_hash(kernel):
    """A fingerprint of the kernel's code: its PTX without the debug lines (.loc / .file name the
    source file and line, which moving code changes; the $L__tmp labels mark inlined helpers'
    scopes for the debug sections, which a new helper adds). Equal before and after a refactor:
    the same code for the GPU."""
    import hashlib
    import re
    ptx = kernel.asm["ptx"].split(".section\t.debug")[0]
    code = [line for line in ptx.split("\n") if not re.match(r"\s*(\.loc|\.file|//|\$L__tmp\d+:)", line)]
    return hashlib.sha1("\n".join(code).encode()).hexdigest()[:12]


def _ptxas_report(kernel):
    """(registers, spill store bytes, spill load bytes) from ptxas -v on the kernel's PTX."""
    import re
    import subprocess
    import tempfile
    from triton.backends.nvidia.compiler import get_ptxas  # the one Triton compiles sm_90 with (3.9: ptxas-blackwell)
    ptxas = get_ptxas(90).path
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    out = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True,
                         text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return regs, int(spills.group(1)), int(spills.group(2))


def ctas_per_sm(regs, shared, num_warps):
    """Resident programs per SM on sm_90 (H100/H200): 64K registers (allocated per warp in units
    of 256, i.e. per thread in units of 8), 228 KB of shared memory (1 KB reserved per program),
    64 warps, 32 programs."""
    by_regs = 65536 // (-(-regs // 8) * 8 * 32 * num_warps)
    by_shared = (228 * 1024) // (shared + 1024)
    return min(by_regs, by_shared, 64 // num_warps, 32)


def report(names=()):
    """Registers, spills, shared memory and resident programs per SM (ctas_per_sm) of the split
    kernel for every autotune config (sm_90a; ALBEF_FAST_CONFIGS picks others)."""
    for name, flags in ((n, REPORT[n]) for n in (names or REPORT)):
        for config in itc_configs.candidates():
            k = _compile(itc_split._itc_split_fwd_kernel, _split_constexprs(flags, config), flags["TYPE"], config.num_warps,
                         config.num_stages, config.maxnreg)
            regs, st, ld = _ptxas_report(k)
            sass_mma = "HGMMA" if "wgmma" in k.asm["ptx"] else "HMMA" if "mma.sync" in k.asm["ptx"] else "none"
            pipelined = k.asm["ttgir"].count("async_copy_global_to_local") + k.asm["ttgir"].count("async_tma")
            print(json.dumps({"flags": name, "config": {**config.kwargs, "warps": config.num_warps,
                                                        "stages": config.num_stages, "maxnreg": config.maxnreg},
                              "regs": regs, "spill_st": st, "spill_ld": ld, "shared": k.metadata.shared,
                              "ctas_per_sm": ctas_per_sm(regs, k.metadata.shared, config.num_warps),
                              "mma": sass_mma, "async_loads": pipelined}), flush=True)


def tuned_hashes():
    """ptx_hash of the split kernel for the TUNED configs of each REPORT flag set with an entry
    there ("f16x3-tile": f16x3's), plain and with retrieval targets."""
    tuned = {name: itc_configs.TUNED.get(name.replace("-tile", "")) for name in REPORT}
    for name in (n for n in REPORT if tuned[n]):
        for retrieval in (False, True):
            flags = dict(REPORT[name], RETRIEVAL=retrieval)
            for _, spec, _ in tuned[name]:
                config = itc_configs.parse_config(spec)
                k = _compile(itc_split._itc_split_fwd_kernel, _split_constexprs(flags, config), flags["TYPE"],
                             config.num_warps, config.num_stages, config.maxnreg)
                print(json.dumps({"flags": name, "retrieval": retrieval, "config": spec, "split": ptx_hash(k)}),
                      flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--tuned-hashes"]:
        tuned_hashes()
        sys.exit()
    if sys.argv[1:2] == ["--report"]:  # [--report [flags ...]]
        report(sys.argv[2:])
        sys.exit()
    hashes = sys.argv[1:2] == ["--hashes"]  # [--hashes] [flags ...]: ptx_hash of each kernel instead of sizes
    names = sys.argv[1 + hashes:] or list(FLAGS)
    for name in names:
        print(json.dumps({"flags": name, **compile_all(FLAGS[name], ptx_hash if hashes else None)}), flush=True)
