"""Fused local merge (design §4): one kernel from patch tokens to the packed vision prefix.

Maths. Per view v, tokens x[v] (H*W, C_in) in raster order form a grid X[v, iy, ix, c]. With
Ho = ceil(H/2), Wo = ceil(W/2), P = Ho*Wo and taps (dy, dx) in {0,1,2}^2:

    Y[v, oy, ox, n] = sum_{dy,dx,c} X[v, 2oy+dy-1, 2ox+dx-1, c] * Wt[n, c, dy, dx]   (zero outside)
                      + X[v, 2oy, 2ox, n]   (residual, needs C_in == C_out)
                      + b[n]
    out[v, oy*Wo+ox, n] = Y[v, oy, ox, n];   out[v, P, n] = lf[n]

i.e. conv2d(kernel 3, stride 2, padding 1) + nearest-downsampled residual + bias, flattened,
with one LF token appended: out is (V, P + 1, C_out).

Forward (Triton): an implicit GEMM. Rows are the V*(P+1) output tokens of all views, columns
the output channels; the reduction runs over 9 taps x C_in, gathering x rows straight from the
token layout (masked at the borders), so there is no permute, im2col or concatenation. The
epilogue adds residual and bias and writes the LF rows, all into the packed output.

Backward (Triton), with G = d out:
    dX[v, iy, ix, c] = sum over taps with (iy+1-dy) and (ix+1-dx) even of
                       G[v, (iy+1-dy)/2, (ix+1-dx)/2, :] @ Wt[:, c, dy, dx]
                       + G[v, iy/2, ix/2, c] at even (iy, ix) (residual)
    A pixel's row and column parity fix its taps (even: the centre tap only, odd: both outer
    taps), so the dX kernel runs one implicit GEMM per parity class with no masked-out taps.
    dWt[n, c, dy, dx] = sum_{v, oy, ox} X[v, 2oy+dy-1, 2ox+dx-1, c] * G[v, oy, ox, n]:
    one GEMM per tap reducing over all V*P output pixels.
    dlf = sum_v G[v, P];  db = sum_{v, p<P} G[v, p]  (plain torch reductions).

Precision: fp32 accumulation everywhere. fp16/bf16 tiles feed tl.dot directly on GPU; under the
Triton interpreter (no bf16 arithmetic) bf16 tiles are upcast to fp32 right after the load.
fp32 inputs use TF32 exactly when ``torch.backends.cudnn.allow_tf32`` lets F.conv2d use it.

C++ path (CPU, csrc/local_merge.inc): fp32 maths for every dtype (fp16/bf16 are upcast once and
rounded once when stored), in one of two forms picked by size (``winograd_form`` there;
``FUSEDVLM_MERGE_FORM=direct|winograd`` forces one): a direct
im2col block and one SGEMM, or the polyphase Winograd F(2, 2) form below with its transforms in
C++ and its 16 GEMMs split across threads by channel range. The epilogue adds residual and bias
and writes the LF rows straight into the packed output. Backward: dX (the im2col gradient
gathered back per pixel, or the Winograd adjoints), dW, dlf and db in one call.

Torch path (FUSEDVLM_BACKEND=torch, or where the C++ kernels cannot be built): the convolution
result is written once into the packed output (or the caller's ``out``), the residual and bias
are added there in place and the LF row filled, with no grid transpose and no concatenation.
Small problems and half precision run one F.conv2d on x.view(V, H, W, C).permute(0, 3, 1, 2),
which is already a channels-last grid (no copy). Large fp32 problems, where the CPU time is all
GEMM at near peak FLOP rate, use a polyphase Winograd F(2, 2) form of the same convolution
(``_WinogradConv``) that needs 6.25/9 of the multiplies, forward and backward.

Op: ``torch.ops.fusedvlm.local_merge`` (Triton on CUDA or under the interpreter, the C++ kernel
on CPU, as its last argument says) with ``fusedvlm::local_merge_backward``, fake kernels and
FLOP formulas. The torch path is called directly, never through the op (design §10).

Shapes: x (V, H*W, C_in); weight (C_out, C_in, 3, 3); lf_token (C_out,); bias (C_out,) or None;
out (optional, written in place) (V, P+1, C_out) or (V*(P+1), C_out).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from fusedvlm import native
from fusedvlm.backend import autocast_enabled, compute_dtype, forced_tiles, implementation, interpreter_enabled
from fusedvlm.kernels._library import LIB, kernel_backend
from fusedvlm.kernels.common import flag, grid_shape, merged_tokens_per_view

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _kernels(interpret: bool):
    """The jitted kernels, built on first launch. ``interpret`` keys the cache: triton.jit picks
    the interpreter when it decorates, and tests switch TRITON_INTERPRET per test. Importing
    triton only here keeps the package importable without it, and lets the interpreter be
    switched on after this module is imported."""
    import triton
    import triton.language as tl

    @triton.jit
    def _local_merge_fwd_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        lf_ptr,
        out_ptr,
        H,
        W,
        Wo,
        P,
        ROWS,
        C_in,
        C_out,
        sxv,
        sxt,
        sxc,
        sov,
        som,
        son,
        HAS_BIAS: tl.constexpr,
        RESIDUAL: tl.constexpr,
        UPCAST: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # Rows run over all views' packed tokens so that no tile is wasted on a view's tail.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        row_ok = rows < ROWS
        n_ok = offs_n < C_out
        view = rows // (P + 1)
        m = rows % (P + 1)
        oy = m // Wo
        ox = m % Wo
        pix = row_ok & (m < P)
        x_rows = x_ptr + view.to(tl.int64) * sxv

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for tap in tl.static_range(9):
            iy = 2 * oy + (tap // 3 - 1)
            ix = 2 * ox + (tap % 3 - 1)
            a_ok = pix & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            a_ptrs = x_rows + (iy * W + ix) * sxt
            w_tap = w_ptr + tap * C_in * C_out
            for k0 in range(0, C_in, BLOCK_K):
                kk = k0 + offs_k
                k_ok = kk < C_in
                a = tl.load(a_ptrs[:, None] + kk[None, :] * sxc, mask=a_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(
                    w_tap + kk[:, None] * C_out + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0
                )
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

        if RESIDUAL:
            r_ptrs = x_rows + (2 * oy * W + 2 * ox) * sxt
            r = tl.load(r_ptrs[:, None] + offs_n[None, :] * sxc, mask=pix[:, None] & n_ok[None, :], other=0.0)
            acc += r.to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        lf = tl.load(lf_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc = tl.where((m == P)[:, None], lf[None, :], acc)
        o_ptrs = out_ptr + view.to(tl.int64) * sov + m * som
        tl.store(
            o_ptrs[:, None] + offs_n[None, :] * son,
            acc.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & n_ok[None, :],
        )

    @triton.jit
    def _local_merge_dx_kernel(
        g_ptr,
        w_ptr,
        dx_ptr,
        V,
        H,
        W,
        Ho,
        Wo,
        C_in,
        C_out,
        M_BLOCKS,
        sgv,
        sgm,
        sgn,
        sdv,
        sdt,
        sdc,
        RESIDUAL: tl.constexpr,
        UPCAST: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # Program axis 0 = parity class (py, px) x row block; rows are (view, pixel of the class).
        pid = tl.program_id(0)
        pid_n = tl.program_id(1)
        parity = pid // M_BLOCKS
        pid_m = pid % M_BLOCKS
        py = parity // 2
        px = parity % 2
        hp = (H - py + 1) // 2
        wp = (W - px + 1) // 2
        class_px = hp * wp
        wp_safe = tl.maximum(wp, 1)
        class_safe = tl.maximum(class_px, 1)

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        row_ok = rows < V * class_px
        n_ok = offs_n < C_in
        view = rows // class_safe
        q = rows % class_safe
        j = q // wp_safe
        i = q % wp_safe
        iy = 2 * j + py
        ix = 2 * i + px
        g_rows = g_ptr + view.to(tl.int64) * sgv

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ty in range(0, 1 + py):
            dy = 1 - py + 2 * ty
            oy = (iy + 1 - dy) // 2
            for tx in range(0, 1 + px):
                dx = 1 - px + 2 * tx
                ox = (ix + 1 - dx) // 2
                a_ok = row_ok & (oy < Ho) & (ox < Wo)
                a_ptrs = g_rows + (oy * Wo + ox) * sgm
                w_tap = w_ptr + (dy * 3 + dx) * C_out * C_in
                for k0 in range(0, C_out, BLOCK_K):
                    kk = k0 + offs_k
                    k_ok = kk < C_out
                    a = tl.load(a_ptrs[:, None] + kk[None, :] * sgn, mask=a_ok[:, None] & k_ok[None, :], other=0.0)
                    b = tl.load(
                        w_tap + kk[:, None] * C_in + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0
                    )
                    if UPCAST:
                        a = a.to(tl.float32)
                        b = b.to(tl.float32)
                    acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

        if RESIDUAL:
            r_ok = row_ok & (parity == 0)
            r_ptrs = g_rows + (j * Wo + i) * sgm
            r = tl.load(r_ptrs[:, None] + offs_n[None, :] * sgn, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc += r.to(tl.float32)
        d_ptrs = dx_ptr + view.to(tl.int64) * sdv + (iy * W + ix) * sdt
        tl.store(
            d_ptrs[:, None] + offs_n[None, :] * sdc,
            acc.to(dx_ptr.dtype.element_ty),
            mask=row_ok[:, None] & n_ok[None, :],
        )

    @triton.jit
    def _local_merge_dw_kernel(
        x_ptr,
        g_ptr,
        dw_ptr,
        H,
        W,
        Wo,
        P,
        R,
        C_in,
        C_out,
        sxv,
        sxt,
        sxc,
        sgv,
        sgm,
        sgn,
        UPCAST: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # One (C_in x C_out) GEMM per tap, reducing over the R = V*P output pixels.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        tap = tl.program_id(2)
        dy = tap // 3
        dx = tap % 3
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < C_in
        n_ok = offs_n < C_out

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_K):
            r = r0 + offs_k
            r_ok = r < R
            view = (r // P).to(tl.int64)
            o = r % P
            iy = 2 * (o // Wo) + dy - 1
            ix = 2 * (o % Wo) + dx - 1
            a_ok = r_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            a_cols = x_ptr + view * sxv + (iy * W + ix) * sxt
            a = tl.load(a_cols[None, :] + offs_m[:, None] * sxc, mask=m_ok[:, None] & a_ok[None, :], other=0.0)
            b_rows = g_ptr + view * sgv + o * sgm
            b = tl.load(b_rows[:, None] + offs_n[None, :] * sgn, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        d_ptrs = dw_ptr + (tap * C_in + offs_m)[:, None] * C_out + offs_n[None, :]
        tl.store(d_ptrs, acc, mask=m_ok[:, None] & n_ok[None, :])

    return _local_merge_fwd_kernel, _local_merge_dx_kernel, _local_merge_dw_kernel


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) on a GPU, shared by the forward, dX and dW
# launches: fp32 operands, and fp16/bf16 ones (twice the K depth per byte of shared memory).
_GPU_FP32 = (64, 64, 32, 4, 3)
_GPU_HALF = (64, 128, 64, 4, 3)
# Every configuration a GPU launch can run (fusedvlm.backend.force_tiles names).
TILE_CONFIGS = {"local_merge": (_GPU_FP32, _GPU_HALF)}


def _config(dtype: torch.dtype) -> dict:
    """Fixed tile sizes: small under the interpreter (cost is per program step), GEMM-sized on GPU."""
    forced = forced_tiles("local_merge")
    if forced is None and interpreter_enabled():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)
    bm, bn, bk, warps, stages = forced or (_GPU_FP32 if dtype == torch.float32 else _GPU_HALF)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)


def _dot_flags(dtype: torch.dtype) -> dict:
    interp = interpreter_enabled()
    upcast = interp and dtype == torch.bfloat16
    # Only fp32 operands have a precision to choose; half-precision dots keep Triton's default.
    exact = (dtype == torch.float32 and (interp or not torch.backends.cudnn.allow_tf32)) or upcast
    return dict(UPCAST=upcast, DOT_PRECISION="ieee" if exact else "tf32")


def _triton_forward(x, w9, lf_token, bias, residual, h, w, out):
    """w9: (9, C_in, C_out) contiguous; out: (V, P+1, C_out) view, any strides."""
    v, _, c_in = x.shape
    c_out = w9.shape[2]
    ho, wo = (h + 1) // 2, (w + 1) // 2
    p = ho * wo
    rows = v * (p + 1)
    cfg = _config(x.dtype)
    launch = (_cdiv(rows, cfg["BLOCK_M"]), _cdiv(c_out, cfg["BLOCK_N"]))
    _kernels(interpreter_enabled())[0][launch](
        x,
        w9,
        bias if bias is not None else lf_token,
        lf_token,
        out,
        h,
        w,
        wo,
        p,
        rows,
        c_in,
        c_out,
        *x.stride(),
        *out.stride(),
        HAS_BIAS=bias is not None,
        RESIDUAL=residual,
        **_dot_flags(x.dtype),
        **cfg,
    )


def _triton_grad_x(g, w9t, residual, h, w, c_in):
    """g: (V, P+1, C_out) output grad; w9t: (9, C_out, C_in) contiguous -> dx (V, H*W, C_in)."""
    v, _, c_out = g.shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    dx = torch.empty(v, h * w, c_in, device=g.device, dtype=g.dtype)
    cfg = _config(g.dtype)
    m_blocks = _cdiv(v * ho * wo, cfg["BLOCK_M"])
    launch = (4 * m_blocks, _cdiv(c_in, cfg["BLOCK_N"]))
    _kernels(interpreter_enabled())[1][launch](
        g,
        w9t,
        dx,
        v,
        h,
        w,
        ho,
        wo,
        c_in,
        c_out,
        m_blocks,
        *g.stride(),
        *dx.stride(),
        RESIDUAL=residual,
        **_dot_flags(g.dtype),
        **cfg,
    )
    return dx


def _triton_grad_weight(x, g, h, w, c_out):
    """-> dW (C_out, C_in, 3, 3) fp32."""
    v, _, c_in = x.shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    p = ho * wo
    dw9 = torch.empty(9, c_in, c_out, device=x.device, dtype=torch.float32)
    cfg = _config(x.dtype)
    launch = (_cdiv(c_in, cfg["BLOCK_M"]), _cdiv(c_out, cfg["BLOCK_N"]), 9)
    _kernels(interpreter_enabled())[2][launch](
        x,
        g,
        dw9,
        h,
        w,
        wo,
        p,
        v * p,
        c_in,
        c_out,
        *x.stride(),
        *g.stride(),
        **_dot_flags(x.dtype),
        **cfg,
    )
    return dw9.view(3, 3, c_in, c_out).permute(3, 2, 0, 1)


def _triton_local_merge(x, weight, lf_token, bias, residual, h, w, out):
    v, _, c_in = x.shape
    c_out = weight.shape[0]
    w9 = weight.permute(2, 3, 1, 0).reshape(9, c_in, c_out).contiguous()
    lf_token = lf_token.contiguous()  # read without strides, as is the bias
    bias = None if bias is None else bias.contiguous()
    if out is None:
        out = x.new_empty(v, merged_tokens_per_view(h, w), c_out)
    _triton_forward(x, w9, lf_token, bias, residual, h, w, out.view(v, -1, c_out))
    return out


# C_in * C_out from which the Winograd form beats one F.conv2d on CPU (fp32, 24x24 and 14x14
# grids, 1 to 10 views). Its transforms cost O(C) per pixel against O(C^2) of GEMM, so the
# channel count decides; with a backward the bar is lower, the convolution's weight gradient
# being slow on CPU. Half precision always takes the convolution: the transforms would round
# in 8 or 11 bits.
_WINOGRAD_MIN_CHANNELS = 512 * 512
_WINOGRAD_MIN_CHANNELS_TRAINING = 256 * 256


def _use_winograd(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.dtype != torch.float32:
        return False
    training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    bar = _WINOGRAD_MIN_CHANNELS_TRAINING if training else _WINOGRAD_MIN_CHANNELS
    return weight.shape[0] * weight.shape[1] >= bar


def _take(t: torch.Tensor, dim: int, start: int, step: int, count: int) -> torch.Tensor:
    """Entries start, start + step, ... of ``dim``, exactly ``count`` of them (zeros past the end)."""
    idx = [slice(None)] * t.dim()
    idx[dim] = slice(start, None, step)
    got = t[tuple(idx)]
    if got.shape[dim] >= count:
        return got.narrow(dim, 0, count)
    return F.pad(got, [0, 0] * (t.dim() - 1 - dim) + [0, count - got.shape[dim]])


def _axis_inputs(t: torch.Tensor, dim: int, centre: bool, pairs: int) -> list[torch.Tensor]:
    """Winograd input components along one grid axis, for 2 * ``pairs`` outputs.

    Output o reads input 2o - 1 (tap 0), 2o (tap 1) and 2o + 1 (tap 2). The centre tap needs no
    transform. The outer taps of the output pair (2q, 2q + 1) read d0 = t[4q - 1], d1 = t[4q + 1],
    d2 = t[4q + 3], and F(2, 2) computes their two outputs with three products:
    (d0 - d1) w0, d1 (w0 + w2), (d2 - d1) w2."""
    if centre:
        return [_take(t, dim, 0, 2, 2 * pairs)]
    d1 = _take(t, dim, 1, 4, pairs)
    d2 = _take(t, dim, 3, 4, pairs)
    # d0[q] = t[4q - 1] = d2[q - 1], with the zero padding row in front.
    d0 = F.pad(d2.narrow(dim, 0, pairs - 1), [0, 0] * (t.dim() - 1 - dim) + [1, 0])
    return [d0 - d1, d1, d2 - d1]


def _axis_inputs_grad(parts: list[torch.Tensor], dim: int, centre: bool, size: int) -> torch.Tensor:
    """Transpose of :func:`_axis_inputs`: component grads -> grad of an axis of ``size``."""
    shape = list(parts[0].shape)
    shape[dim] = size
    out = parts[0].new_zeros(shape)
    if centre:
        _put(out, dim, 0, 2, parts[0])
        return out
    du0, du1, du2 = parts
    pairs = du0.shape[dim]
    dd2 = du2.clone()
    dd2.narrow(dim, 0, pairs - 1).add_(du0.narrow(dim, 1, pairs - 1))
    _put(out, dim, 1, 4, du1 - du0 - du2)
    _put(out, dim, 3, 4, dd2)
    return out


def _put(out: torch.Tensor, dim: int, start: int, step: int, src: torch.Tensor) -> None:
    idx = [slice(None)] * out.dim()
    idx[dim] = slice(start, None, step)
    dst = out[tuple(idx)]
    dst.copy_(src.narrow(dim, 0, dst.shape[dim]))


def _axis_outputs(parts: list[torch.Tensor], dim: int, centre: bool, out: torch.Tensor, accumulate: bool) -> None:
    """Write or add one axis's outputs into ``out`` (2 * pairs entries along ``dim``): the
    centre component as is, the outer ones as (m0 + m1) at even and (m1 + m2) at odd positions."""
    if centre:
        (out.add_ if accumulate else out.copy_)(parts[0])
        return
    for parity, (a, b) in enumerate((parts[0:2], parts[1:3])):
        idx = [slice(None)] * out.dim()
        idx[dim] = slice(parity, None, 2)
        if accumulate:
            out[tuple(idx)].add_(a).add_(b)
        else:
            torch.add(a, b, out=out[tuple(idx)])


def _axis_outputs_grad(g: torch.Tensor, dim: int, centre: bool) -> list[torch.Tensor]:
    """Transpose of :func:`_axis_outputs`: output grad -> grads of the axis's components."""
    if centre:
        return [g]
    idx = [slice(None)] * g.dim()
    idx[dim] = slice(0, None, 2)
    even = g[tuple(idx)]
    idx[dim] = slice(1, None, 2)
    odd = g[tuple(idx)]
    return [even, even + odd, odd]


# Kernel kinds an axis uses: the centre tap alone, or the three Winograd kernels of the outer taps.
_KINDS = {True: (0,), False: (1, 2, 3)}


def _winograd_kernels(weight: torch.Tensor) -> list[list[torch.Tensor]]:
    """(C_out, C_in) kernels by [row kind][column kind]; kinds: centre tap, w0, w0 + w2, w2."""
    # Channels-last makes every tap a (C_out, C_in) block with unit stride in C_in, which the
    # GEMMs read in place.
    wcl = weight.contiguous(memory_format=torch.channels_last)

    def kinds(t):
        a, b = t.select(2, 0), t.select(2, 2)
        return [t.select(2, 1), a, a + b, b]

    return [kinds(r) for r in kinds(wcl)]


def _winograd_kernels_grad(dk: list[list[torch.Tensor]]) -> torch.Tensor:
    """Transpose of :func:`_winograd_kernels`: kernel grads -> (C_out, C_in, 3, 3) weight grad."""
    c_out, c_in = dk[0][0].shape
    dw = dk[0][0].new_empty(c_out, 3, 3, c_in).permute(0, 3, 1, 2)

    def taps(parts):
        return [parts[1] + parts[2], parts[0], parts[2] + parts[3]]

    by_row_kind = [taps(dk[kr]) for kr in range(4)]
    for tx in range(3):
        for ty, t in enumerate(taps([by_row_kind[kr][tx] for kr in range(4)])):
            dw[:, :, ty, tx].copy_(t)
    return dw


class _WinogradConv(torch.autograd.Function):
    """conv2d(kernel 3, stride 2, padding 1) of a (V, H, W, C_in) grid -> (V, ho, wo, C_out).

    Split by tap parity, a stride-2 3x3 convolution is four stride-1 ones: centre x centre
    (1 tap), centre x outer and outer x centre (1 x 2 and 2 x 1 taps) and outer x outer (2 x 2
    taps). Winograd F(2, 2) on every outer axis turns the 9 (M x C_in x C_out) GEMMs of the
    direct form into GEMMs worth 6.25 of them (1 + 1.5 + 1.5 + 2.25), forward and backward. The
    backward is written out because autograd through the ~60 slicing ops of the forward spends
    more time zero-filling full-size gradients than in the GEMMs."""

    @staticmethod
    def forward(ctx, grid, weight, ho, wo):
        v, h, w, c_in = grid.shape
        c_out = weight.shape[0]
        pr, pc = (ho + 1) // 2, (wo + 1) // 2
        kernels = _winograd_kernels(weight)
        y = None
        inputs = []
        for row_centre in (True, False):
            rows = _axis_inputs(grid, 1, row_centre, pr)
            for col_centre in (True, False):
                per_row = []
                for r, kr in zip(rows, _KINDS[row_centre]):
                    products = []
                    for a, kc in zip(_axis_inputs(r, 2, col_centre, pc), _KINDS[col_centre]):
                        a2 = a.reshape(-1, c_in)
                        inputs.append(a2)
                        products.append((a2 @ kernels[kr][kc].t()).view(*a.shape[:3], c_out))
                    if col_centre:
                        per_row.append(products[0])
                    else:
                        per_row.append(products[0].new_empty(v, r.shape[1], 2 * pc, c_out))
                        _axis_outputs(products, 2, False, per_row[-1], accumulate=False)
                if y is None:  # centre x centre comes first and covers every output
                    y = per_row[0]
                else:
                    _axis_outputs(per_row, 1, row_centre, y, accumulate=True)
        ctx.save_for_backward(*[k for row in kernels for k in row], *inputs)
        ctx.dims = (h, w, ho, wo)
        return y[:, :ho, :wo]

    @staticmethod
    def backward(ctx, gy):
        saved = ctx.saved_tensors
        kernels = [list(saved[4 * i : 4 * i + 4]) for i in range(4)]
        inputs = iter(saved[16:])
        h, w, ho, wo = ctx.dims
        c_out, c_in = kernels[0][0].shape
        pr, pc = (ho + 1) // 2, (wo + 1) // 2
        need_x, need_w = ctx.needs_input_grad[:2]
        gpad = F.pad(gy, (0, 0, 0, 2 * pc - wo, 0, 2 * pr - ho))
        dgrid = None
        dk = [[None] * 4 for _ in range(4)]
        for row_centre in (True, False):
            g_rows = _axis_outputs_grad(gpad, 1, row_centre)
            d_rows = [None] * len(g_rows)
            for col_centre in (True, False):
                for i, (g_row, kr) in enumerate(zip(g_rows, _KINDS[row_centre])):
                    d_cols = []
                    for g_m, kc in zip(_axis_outputs_grad(g_row, 2, col_centre), _KINDS[col_centre]):
                        a2 = next(inputs)
                        g2 = g_m.reshape(-1, c_out)
                        if need_w:
                            dk[kr][kc] = g2.t() @ a2
                        if need_x:
                            d_cols.append((g2 @ kernels[kr][kc]).view(*g_m.shape[:3], c_in))
                    if need_x:
                        d = _axis_inputs_grad(d_cols, 2, col_centre, w)
                        d_rows[i] = d if d_rows[i] is None else d_rows[i].add_(d)
            if need_x:
                d = _axis_inputs_grad(d_rows, 1, row_centre, h)
                dgrid = d if dgrid is None else dgrid.add_(d)
        dw = _winograd_kernels_grad(dk) if need_w else None
        return dgrid, dw, None, None


def _torch_forward(x, weight, lf_token, bias, residual, h, w, out):
    v, _, c_in = x.shape
    c_out = weight.shape[0]
    ho, wo = (h + 1) // 2, (w + 1) // 2
    p = ho * wo
    grid = x.reshape(v, h, w, c_in)
    result = out if out is not None else x.new_empty(v, p + 1, c_out)
    packed = result.view(v, p + 1, c_out)
    dest = packed[:, :p].unflatten(1, (ho, wo))
    if _use_winograd(x, weight):
        dest.copy_(_WinogradConv.apply(grid, weight, ho, wo))
        if bias is not None:
            dest.add_(bias)
        if residual:
            dest.add_(grid[:, ::2, ::2])
    else:
        # grid.permute(0, 3, 1, 2) is already channels-last: the convolution reads x in place,
        # and its output is channels-last too, so the residual add and the copy run contiguous.
        nchw = grid.permute(0, 3, 1, 2)
        y = F.conv2d(nchw, weight, bias, stride=2, padding=1)
        if residual:
            y += nchw[:, :, ::2, ::2]
        dest.copy_(y.permute(0, 2, 3, 1))
    packed[:, p] = lf_token
    return result


def check_args(x, weight, lf_token, bias, residual, grid, out):
    """The one argument check of :func:`local_merge`, run before any backend is picked: shapes,
    dtypes, devices, ``residual``. Returns (H, W, lf_token, bias), those two contiguous: the
    Triton kernel reads them without strides."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"local_merge: x must be (V, H*W, C_in), got shape {tuple(getattr(x, 'shape', ()))}")
    v, n, c_in = x.shape
    if v == 0 or n == 0 or c_in == 0:
        raise ValueError(f"local_merge: x has an empty dimension: {tuple(x.shape)}")
    h, w = grid_shape(n, grid)
    for name, t in (("weight", weight), ("lf_token", lf_token), ("bias", bias), ("out", out)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"local_merge: {name} must be a tensor, got {type(t).__name__}")
    flag(residual, "local_merge: residual")
    if weight.dim() != 4 or weight.shape[1:] != (c_in, 3, 3):
        raise ValueError(f"local_merge: weight must be (C_out, {c_in}, 3, 3), got {tuple(weight.shape)}")
    c_out = weight.shape[0]
    if lf_token.shape != (c_out,):
        raise ValueError(f"local_merge: lf_token must be ({c_out},), got {tuple(lf_token.shape)}")
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"local_merge: bias must be ({c_out},), got {tuple(bias.shape)}")
    if residual and c_in != c_out:
        raise ValueError(f"local_merge: residual needs C_in == C_out, got {c_in} -> {c_out}")
    # The usual call (no bias, no out) skips building the optional ones' list.
    tensors = (
        (x, weight, lf_token)
        if bias is None and out is None
        else [t for t in (x, weight, lf_token, bias, out) if t is not None]
    )
    if x.dtype not in _DTYPES:
        raise TypeError(f"local_merge: x dtype {x.dtype} not supported (fp32, fp16, bf16)")
    on_cpu = True  # is_cpu is a flag read; .device builds a device object per call
    for t in tensors:
        if not t.is_floating_point():
            raise TypeError(f"local_merge: all tensors must be floating point, got {[t.dtype for t in tensors]}")
        on_cpu = on_cpu and t.is_cpu
    if out is not None and out.dtype != x.dtype:
        raise TypeError(f"local_merge: out dtype {out.dtype} must be x's dtype {x.dtype}")
    if not on_cpu and len({t.device for t in tensors}) != 1:
        raise ValueError(f"local_merge: tensors on different devices {[str(t.device) for t in tensors]}")
    if out is not None:
        tpv = merged_tokens_per_view(h, w)
        if tuple(out.shape) not in ((v, tpv, c_out), (v * tpv, c_out)):
            raise ValueError(
                f"local_merge: out must be ({v}, {tpv}, {c_out}) or ({v * tpv}, {c_out}), got {tuple(out.shape)}"
            )
        if out.dim() == 2 and out.stride(0) != c_out * out.stride(1):
            raise ValueError("local_merge: a 2-D out must have contiguous rows to be viewed per view")
    lf_token = lf_token.contiguous()
    return h, w, lf_token, None if bias is None else bias.contiguous()


# --------------------------------------------------------------------------- fusedvlm:: operator

LIB.define(
    "local_merge(Tensor x, Tensor weight, Tensor lf_token, Tensor? bias, bool residual, int h, int w, "
    "str backend) -> Tensor"
)
LIB.define(
    "local_merge_backward(Tensor grad, Tensor x, Tensor weight, bool has_bias, bool residual, int h, int w, "
    "bool[3] output_mask, str backend) -> (Tensor, Tensor, Tensor, Tensor)"
)
# The public function's op, looked up once rather than through torch.ops on every call.
_OP = torch.ops.fusedvlm.local_merge.default


def _merge(x, weight, lf_token, bias, residual, h, w, backend):
    if kernel_backend(backend, x.device) == "cpp":
        return native.load().local_merge_fwd_cpu(x, weight, lf_token, bias, residual, h, w, None)
    return _triton_local_merge(x, weight, lf_token, bias, residual, h, w, None)


def _merge_backward(g, x, weight, has_bias, residual, h, w, output_mask, backend):
    need_x, need_w, _ = output_mask
    if kernel_backend(backend, x.device) == "cpp":
        return native.load().local_merge_bwd_cpu(g, x, weight, has_bias, residual, h, w, need_x, need_w, None)
    c_out = weight.shape[0]
    p = g.shape[1] - 1
    dx = dw = None
    if need_x:
        w9t = weight.permute(2, 3, 0, 1).reshape(9, c_out, x.shape[2]).contiguous()
        dx = _triton_grad_x(g, w9t, residual, h, w, x.shape[2])
    if need_w:
        dw = _triton_grad_weight(x, g, h, w, c_out).to(weight.dtype)
    dlf = g[:, p].sum(0, dtype=torch.float32).to(weight.dtype)
    db = g[:, :p].sum((0, 1), dtype=torch.float32).to(weight.dtype) if has_bias else weight.new_empty(0)
    return (x.new_empty(0) if dx is None else dx), (weight.new_empty(0) if dw is None else dw), dlf, db


for _key in ("CPU", "CUDA"):
    LIB.impl("local_merge", _merge, _key)
    LIB.impl("local_merge_backward", _merge_backward, _key)


@torch.library.register_fake("fusedvlm::local_merge", lib=LIB)
def _merge_fake(x, weight, lf_token, bias, residual, h, w, backend):
    return x.new_empty((x.shape[0], merged_tokens_per_view(h, w), weight.shape[0]))


@torch.library.register_fake("fusedvlm::local_merge_backward", lib=LIB)
def _merge_backward_fake(g, x, weight, has_bias, residual, h, w, output_mask, backend):
    need_x, need_w, _ = output_mask
    return (
        x.new_empty(x.shape if need_x else (0,)),
        weight.new_empty(weight.shape if need_w else (0,)),
        weight.new_empty(weight.shape[0]),
        weight.new_empty(weight.shape[0] if has_bias else 0),
    )


def _merge_setup_context(ctx, inputs, output):
    x, weight, lf_token, bias, residual, h, w, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (bias is not None, residual, h, w, backend)


def _merge_autograd_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    has_bias, residual, h, w, backend = ctx.geometry
    need = ctx.needs_input_grad
    dx, dw, dlf, db = torch.ops.fusedvlm.local_merge_backward(
        grad.contiguous(), x, weight, has_bias, residual, h, w, [need[0], need[1], need[2]], backend
    )
    return (
        dx if need[0] else None,
        dw if need[1] else None,
        dlf if need[2] else None,
        db if has_bias and need[3] else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "fusedvlm::local_merge", _merge_autograd_backward, setup_context=_merge_setup_context, lib=LIB
)


@register_flop_formula(torch.ops.fusedvlm.local_merge)
def _merge_flops(x_shape, weight_shape, lf_shape, bias_shape, residual, h, w, backend, out_shape=None) -> int:
    # The convolution's convention: every 3x3 tap of every output pixel, padding included.
    return 2 * x_shape[0] * ((h + 1) // 2) * ((w + 1) // 2) * weight_shape[0] * weight_shape[1] * 9


@register_flop_formula(torch.ops.fusedvlm.local_merge_backward)
def _merge_backward_flops(
    g_shape, x_shape, weight_shape, has_bias, residual, h, w, output_mask, backend, out_shape=None
) -> int:
    forward = 2 * x_shape[0] * ((h + 1) // 2) * ((w + 1) // 2) * weight_shape[0] * weight_shape[1] * 9
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def local_merge(
    x: torch.Tensor,
    weight: torch.Tensor,
    lf_token: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    residual: bool = True,
    grid: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(V, H*W, C_in) -> (V, ceil(H/2)*ceil(W/2) + 1, C_out) in x's dtype; see the module docstring.

    ``grid=(H, W)`` for non-square grids. ``out`` (written in place and returned) lets the
    caller place the merged views straight into a packed buffer."""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and out is None and autocast_enabled(x):
        # Under autocast compute where F.conv2d would (the autocast dtype, fp32 accumulation);
        # a caller's ``out`` buffer fixes the dtype instead.
        x = x.to(compute_dtype(x))
    h, w, lf_token, bias = check_args(x, weight, lf_token, bias, residual, grid, out)
    # Parameters follow the activations' dtype, as F.conv2d's do under autocast (fp32 master
    # weights with bf16 tokens); the casts are differentiable, so gradients return in theirs.
    if not (weight.dtype == lf_token.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)):
        weight, lf_token, bias = (
            t if t is None or t.dtype == x.dtype else t.to(x.dtype) for t in (weight, lf_token, bias)
        )
    backend = implementation(x)
    if backend == "torch":
        # Differentiates through its own ops (the Winograd form's hand-written backward beats
        # the convolution's weight gradient) and writes ``out`` in place.
        return _torch_forward(x, weight, lf_token, bias, residual, h, w, out)
    y = _OP(x, weight, lf_token, bias, residual, h, w, backend)
    # Autograd cannot rebase an op's write into a view of a buffer that does not itself require
    # grad, so a call with ``out`` pays one copy of the output.
    return y if out is None else out.copy_(y.view_as(out))
