"""Compile every Triton kernel ahead of time for a CUDA target, without a GPU.

The interpreter runs kernels as numpy and accepts code the GPU compiler rejects (non-constexpr globals,
loop-carried values that change type, ...). ``triton.compile`` with an explicit ``GPUTarget`` goes
through the real pipeline down to a cubin (Triton ships ``ptxas``), so this catches those errors on a
CPU-only machine. Run as a script (``TRITON_INTERPRET`` must be unset when the kernels are imported):

    python tests/kernel_ops/cuda_compile.py [--all-configs] [--arch 90]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("cuda_compile")


def _raw(kernel):
    import triton

    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def _configs(kernel, all_configs: bool):
    import triton

    configs = getattr(kernel, "configs", None) or [triton.Config({}, num_warps=4)]
    # the first config is the small one the interpreter uses; the second is a typical GPU tile
    return configs if all_configs else configs[min(1, len(configs) - 1) :][:1]


def compile_kernel(kernel, args: dict, target, all_configs: bool) -> int:
    """Compile ``kernel`` for each config; ``args`` maps argument names to a type string or a constexpr."""
    import triton
    from triton.compiler import ASTSource

    fn = _raw(kernel)
    count = 0
    for cfg in _configs(kernel, all_configs):
        values = {**args, **cfg.kwargs}
        sig, consts = {}, {}
        for name in fn.arg_names:
            v = values[name]
            typed = isinstance(v, str) and (v.startswith("*") or v in ("i32", "i64", "fp32"))
            sig[name] = v if typed else "constexpr"
            if not typed:
                consts[name] = v
        options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        triton.compile(ASTSource(fn, sig, consts), target=target, options=options)
        count += 1
    log.info("compiled %s (%d configs)", fn.__name__, count)
    return count


def kernel_table(dt: str) -> list[tuple[object, dict]]:
    """Every kernel with representative arguments (``dt`` is the activation dtype: bf16 / fp16 / fp32)."""
    from swapformer.kernels.cat import triton as cat
    from swapformer.kernels.elita import triton as elita
    from swapformer.kernels.fastweight import triton as fw
    from swapformer.kernels.window import triton as window
    from swapformer.kernels.worker import triton as worker

    P, F32, I32 = f"*{dt}", "*fp32", "i32"
    prec = "ieee" if dt == "fp32" else "tf32"
    fw_args = dict(q=P, k=P, v=P, f=P, fh=P, h0=F32, o=P, ht=F32, T=I32, H=16, K=128, V=128, BK=128, BV=64, USE_H0=True)
    el = dict(T=I32, NT=I32, clip="fp32", H=16, V=128, BT=32, BV=128)
    el_in = dict(kappa=P, delta=P, rho=P, v=P)
    att = dict(qk_scale="fp32", H=16, HKV=8, D=128, BD=128, PREC=prec)
    cat_in = dict(q=P, k=P, v=P, kc=P, vc=P, sk=P, sv=P, T=I32, N=I32, CHUNK=16, HAS_SINK=True)
    wk_in = dict(q=P, k=P, v=P, idx="*i32", T=I32, W=I32)
    return [
        (fw.fastweight_fwd_chunk_kernel, {**fw_args, "BT": 16, "LOG_MIN": -60.0}),
        (fw.fastweight_fwd_recurrent_kernel, fw_args),
        (elita.elita_chunk_sum_kernel, dict(kappa=P, v=P, cs=F32, cz=F32, **el)),
        (elita.elita_fwd_kernel, dict(**el_in, Sc=F32, Zc=F32, y=P, **el)),
        (elita.elita_bwd_sum_kernel, dict(**el_in, dy=P, Sc=F32, Zc=F32, ddelta=P, drho=P, ds=F32, dz=F32, **el)),
        (elita.elita_bwd_kernel, dict(**el_in, dy=P, Sc=F32, Zc=F32, Rc=F32, rc=F32, dkappa=P, dv=P, **el)),
        (cat.cat_fwd_kernel, dict(**cat_in, o=P, lse=F32, **att)),
        (cat.cat_bwd_dq_kernel, dict(**cat_in, do=P, lse=F32, delta=F32, dq=P, scale="fp32", **att)),
        *[
            (cat.cat_bwd_dkv_kernel, dict(q=P, k=P, v=P, do=P, lse=F32, delta=F32, dk=P, dv=P, T=I32, L=I32,
                                          scale="fp32", CHUNK=16, IS_COMP=comp, **att))
            for comp in (False, True)
        ],
        (window.window_fwd_kernel, dict(q=P, k=P, v=P, o=P, c=F32, den=F32, T=I32, qk_scale="fp32",
                                        **{n: I32 for n in ("sq_b", "sq_h", "sq_t", "sk_b", "sk_h", "sk_t",
                                                            "sv_b", "sv_h", "sv_t")},
                                        WINDOW=512, SINKS=4, BS=16, H=9, HKV=3, D=64, DV=64, BD=64, BDV=64,
                                        PREC=prec)),
        (worker.worker_fwd_kernel, dict(**wk_in, o=P, lse=F32, **att)),
        (worker.worker_bwd_dq_kernel, dict(**wk_in, do=P, lse=F32, delta=F32, dq=P, scale="fp32", **att)),
        (worker.worker_bwd_dkv_kernel, dict(**wk_in, do=P, lse=F32, delta=F32, dk=P, dv=P, scale="fp32", **att)),
        (worker.dwconv_fwd_kernel, dict(x=P, w=P, bias=P, inv="*i32", u=P, uw=P, T=I32, W=I32, d=2048, K=3, BT=32,
                                        HAS_BIAS=True, GATHER=True)),
        (worker.dwconv_bwd_kernel, dict(du=P, x=P, w=P, dx=P, dw_part=F32, T=I32, NTB=I32, d=2048, K=3, BT=32)),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80 or 90")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--all-configs", action="store_true", help="every autotune config, not just one")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        log.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
        return 2
    import triton.backends
    from triton.backends.compiler import GPUTarget

    if "nvidia" not in triton.backends.backends:
        log.error("this triton build has no NVIDIA backend")
        return 3
    target = GPUTarget("cuda", args.arch, 32)
    total = sum(
        compile_kernel(kernel, kargs, target, args.all_configs)
        for dt in args.dtypes.split(",")
        for kernel, kargs in kernel_table(dt)
    )
    log.info("%d kernel variants compiled for sm_%d", total, args.arch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
