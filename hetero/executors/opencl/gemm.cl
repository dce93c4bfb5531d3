// Packed, register-blocked SGEMM: C[z] = act(ALPHA * A[z] @ B[z] + BETA * bias).
//
// A comes packed in MR-row panels ([batch][MB][K][MR]), B in NR-column panels
// ([batch][NB][K][NR]; NR = 16, two float8), zero-padded at the edges. Each work-item
// computes one MR x 16 tile with MR * 2 float8 accumulators in registers: every k step
// broadcasts MR values of A against two contiguous vectors of B. Packing makes both
// streams contiguous, so CPU caches and prefetchers (PoCL) and GPU loads see unit-stride
// reads. `bmap` gives the (A panel batch, B panel batch) of each output batch z, which
// covers MatMul broadcasting and grouped convolution alike.
//
// Defines: M N K MR MB NB ALPHA, ACTIVATE(v), BIAS (0 none, else BETA BG BGS BSM BSN).

#define NR 16

// Unaligned float8 access without vload8/vstore8, which PoCL may not inline (see the gemm kernel).
typedef struct __attribute__((packed, aligned(4))) { float8 v; } float8_u;
#define LOAD8(p) (((const __global float8_u*)(p))->v)
#define STORE8(p, x) (((__global float8_u*)(p))->v = (x))

#ifdef WANT_pack_a
// One work-item per (k, row panel): MR contiguous values of the packed panel.
__kernel void pack_a(__global const float* restrict a, __global float* restrict ap)
{
    // Defines: SAB SAM SAK (element strides of A's batch, row and k).
    const int k = get_global_id(0), ib = get_global_id(1), z = get_global_id(2);
    const __global float* src = a + (size_t)z * SAB + (size_t)k * SAK;
    __global float* out = ap + (((size_t)z * MB + ib) * K + k) * MR;
    for (int r = 0; r < MR; r++) {
        const int m = ib * MR + r;
        out[r] = m < M ? src[(size_t)m * SAM] : 0.0f;
    }
}
#endif

#ifdef WANT_pack_b
// One work-item per (column panel, k): the 16 values of one (64-byte aligned) panel row.
__kernel void pack_b(__global const float* restrict b, __global float* restrict bp)
{
    // Defines: SBB SBK SBN (element strides of B's batch, k and column).
    const int jb = get_global_id(0), k = get_global_id(1), z = get_global_id(2);
    const __global float* src = b + (size_t)z * SBB + (size_t)k * SBK + (size_t)jb * NR * SBN;
    __global float* out = bp + (((size_t)z * NB + jb) * K + k) * NR;
    if (SBN == 1 && (jb + 1) * NR <= N) {
        ((__global float8*)out)[0] = LOAD8(src);
        ((__global float8*)out)[1] = LOAD8(src + 8);
        return;
    }
    for (int j = 0; j < NR; j++)
        out[j] = jb * NR + j < N ? src[(size_t)j * SBN] : 0.0f;
}
#endif

#ifdef WANT_gemm
__kernel void gemm(__global const float* restrict ap, __global const float* restrict bp,
                   __global float* restrict c,
#if BIAS
                   __global const float* restrict bias,
#endif
                   __global const int* restrict bmap)
{
    const int ib = get_global_id(0), jb = get_global_id(1), z = get_global_id(2);
    const __global float* a = ap + ((size_t)bmap[2 * z] * MB + ib) * (K * MR);
    // Panels are 64-byte aligned: plain vector loads, no vload8 (a call where PoCL's builtin
    // library was built for other CPU features than the kernel, which spills every register).
    const __global float8* b = (const __global float8*)(bp + ((size_t)bmap[2 * z + 1] * NB + jb) * (K * NR));
    float8 acc0[MR], acc1[MR];
#pragma unroll
    for (int r = 0; r < MR; r++) {
        acc0[r] = 0.0f;
        acc1[r] = 0.0f;
    }
    for (int k = 0; k < K; k++) {
        const float8 b0 = b[0], b1 = b[1];
#pragma unroll
        for (int r = 0; r < MR; r++) {
            const float ar = a[r];
            acc0[r] += ar * b0;
            acc1[r] += ar * b1;
        }
        a += MR;
        b += 2;
    }
    const int n = jb * NR;
    __global float* out = c + (size_t)z * M * N + n;
#pragma unroll
    for (int r = 0; r < MR; r++) {
        const int m = ib * MR + r;
        if (m >= M)
            break;
        __global float* row = out + (size_t)m * N;
#if BIAS
        const __global float* bs = bias + (z % BG) * BGS + m * BSM + n * BSN;
#endif
        if (n + NR <= N) {
            float8 v0 = ALPHA * acc0[r], v1 = ALPHA * acc1[r];
#if BIAS && BSN
            v0 += BETA * LOAD8(bs);
            v1 += BETA * LOAD8(bs + 8);
#elif BIAS
            v0 += BETA * bs[0];
            v1 += BETA * bs[0];
#endif
            STORE8(row, ACTIVATE(v0));
            STORE8(row + 8, ACTIVATE(v1));
        } else {
            const float8 tile[2] = {acc0[r], acc1[r]};
            for (int j = 0; j < N - n; j++) {
                float v = ALPHA * ((const float*)tile)[j];
#if BIAS
                v += BETA * bs[j * BSN];
#endif
                row[j] = ACTIVATE(v);
            }
        }
    }
}
#endif
