// Convolution: im2col straight into the GEMM's packed B panels, and a direct kernel for
// depthwise (one input channel per group) convolution, where a GEMM has nothing to reuse.
//
// Shapes, strides, dilations and pads are baked in; a 1-D convolution runs with H = KH = 1.

#define NR 16

// Unaligned float8 loads without vload8, which PoCL may not inline (see gemm.cl).
typedef struct __attribute__((packed, aligned(4))) { float8 v; } float8_u;
#define LOAD8(p) (((const __global float8_u*)(p))->v)

#ifdef WANT_im2col
// Bp[z][NB][K][NR] for z = n * GROUPS + g: the (ci, kh, kw) x (oh, ow) patch matrix of
// sample n, group g, zero outside the (padded) input and past the last output position.
// One work-item fills the 16 columns of one (64-byte aligned) panel row.
// Defines: CG H W OH OW KH KW SH SW DH DW PT PL K N NB.
__kernel void im2col(__global const float* restrict x, __global float* restrict bp)
{
    const int jb = get_global_id(0), k = get_global_id(1), z = get_global_id(2);
    const int ci = k / (KH * KW), t = k % (KH * KW);
    const int dy = (t / KW) * DH - PT, dx = (t % KW) * DW - PL;
    const __global float* xc = x + ((size_t)z * CG + ci) * (H * W);
    __global float* out = bp + (((size_t)z * NB + jb) * K + k) * NR;
    const int p = jb * NR;
    int oh = p / OW, ow = p % OW;
    if (ow + NR <= OW) {  // the panel lies in one output row: no wrapping, simple loops
        const int ih = oh * SH + dy, iw0 = ow * SW + dx;
        if (ih < 0 || ih >= H) {
            ((__global float8*)out)[0] = 0.0f;
            ((__global float8*)out)[1] = 0.0f;
        } else if (SW == 1 && iw0 >= 0 && iw0 + NR <= W) {
            ((__global float8*)out)[0] = LOAD8(xc + ih * W + iw0);
            ((__global float8*)out)[1] = LOAD8(xc + ih * W + iw0 + 8);
        } else {
            for (int j = 0; j < NR; j++) {
                const int iw = iw0 + j * SW;
                out[j] = (uint)iw < (uint)W ? xc[ih * W + iw] : 0.0f;
            }
        }
        return;
    }
    for (int j = 0; j < NR; j++) {
        const int ih = oh * SH + dy, iw = ow * SW + dx;
        out[j] = p + j < N && ih >= 0 && ih < H && iw >= 0 && iw < W ? xc[ih * W + iw] : 0.0f;
        if (++ow == OW) {
            ow = 0;
            oh++;
        }
    }
}
#endif

#ifdef WANT_depthwise
// y[n][co] from input channel co / MG (MG output channels per group), bias and activation
// fused. Defines: C M MG H W OH OW KH KW SH SW DH DW PT PL BIAS ACTIVATE(v).
__kernel void depthwise(__global const float* restrict x, __global const float* restrict w,
#if BIAS
                        __global const float* restrict bias,
#endif
                        __global float* restrict y)
{
    const int ow = get_global_id(0), oh = get_global_id(1), z = get_global_id(2);
    const int co = z % M;
    const __global float* xc = x + ((size_t)(z / M) * C + co / MG) * (H * W);
    const __global float* wc = w + co * (KH * KW);
    float acc = 0.0f;
    for (int kh = 0; kh < KH; kh++) {
        const int ih = oh * SH - PT + kh * DH;
        if (ih < 0 || ih >= H)
            continue;
        for (int kw = 0; kw < KW; kw++) {
            const int iw = ow * SW - PL + kw * DW;
            if (iw >= 0 && iw < W)
                acc += wc[kh * KW + kw] * xc[ih * W + iw];
        }
    }
#if BIAS
    acc += bias[co];
#endif
    y[((size_t)z * OH + oh) * OW + ow] = ACTIVATE(acc);
}
#endif
