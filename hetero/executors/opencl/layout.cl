// Data movement and the small reductions: softmax, transpose, pad, resize, block copies.

#ifdef WANT_softmax
// Softmax over DIM elements INNER apart; one row per work-item. Defines: DIM INNER.
__kernel void softmax(__global const float* restrict x, __global float* restrict y)
{
    const size_t base = (size_t)get_global_id(1) * DIM * INNER + get_global_id(0);
    float m = -INFINITY;
    for (int d = 0; d < DIM; d++)
        m = x[base + (size_t)d * INNER] > m ? x[base + (size_t)d * INNER] : m;
    float sum = 0.0f;
    for (int d = 0; d < DIM; d++) {
        const float e = exp(x[base + (size_t)d * INNER] - m);
        y[base + (size_t)d * INNER] = e;
        sum += e;
    }
    for (int d = 0; d < DIM; d++)
        y[base + (size_t)d * INNER] /= sum;
}
#endif

#ifdef WANT_transpose
// y[i] = x[SOURCE(i)]: a permutation of axes baked into the index arithmetic.
__kernel void transpose(__global const float* restrict x, __global float* restrict y)
{
    const size_t i = get_global_id(0);
    size_t src;
    SOURCE(i, src);
    y[i] = x[src];
}
#endif

#ifdef WANT_pad
// y[i] = x[SOURCE(i)] where the padded position falls inside x, else VALUE.
__kernel void pad(__global const float* restrict x, __global float* restrict y)
{
    const size_t i = get_global_id(0);
    size_t src;
    int inside;
    SOURCE(i, src, inside);
    y[i] = inside ? x[src] : VALUE;
}
#endif

#ifdef WANT_pad2d
// Pad of the last two axes only: y[z][oh][ow] from x[z][SOURCE_H(oh)][SOURCE_W(ow)], or VALUE
// where a source index is out of range (-1). Defines: H W OH OW, SOURCE_H(i), SOURCE_W(i).
__kernel void pad2d(__global const float* restrict x, __global float* restrict y)
{
    const int ow = get_global_id(0), oh = get_global_id(1), z = get_global_id(2);
    const int ih = SOURCE_H(oh), iw = SOURCE_W(ow);
    y[((size_t)z * OH + oh) * OW + ow] = ih >= 0 && iw >= 0 ? x[((size_t)z * H + ih) * W + iw] : VALUE;
}
#endif

#ifdef WANT_resize
// Separable 2-D resize from per-axis tables of two source indices and two weights each,
// computed on the host with ONNX's coordinate rules. Defines: H W OH OW, NEAREST.
__kernel void resize(__global const float* restrict x, __global const int* restrict hi,
                     __global const float* restrict hw, __global const int* restrict wi,
                     __global const float* restrict ww, __global float* restrict y)
{
    const int ow = get_global_id(0), oh = get_global_id(1), z = get_global_id(2);
    const __global float* xc = x + (size_t)z * (H * W);
#if NEAREST
    const float v = xc[hi[oh] * W + wi[ow]];
#else
    const __global float* r0 = xc + hi[2 * oh] * W;
    const __global float* r1 = xc + hi[2 * oh + 1] * W;
    const int w0 = wi[2 * ow], w1 = wi[2 * ow + 1];
    const float b0 = ww[2 * ow], b1 = ww[2 * ow + 1];
    const float v = hw[2 * oh] * (b0 * r0[w0] + b1 * r0[w1]) + hw[2 * oh + 1] * (b0 * r1[w0] + b1 * r1[w1]);
#endif
    y[((size_t)z * OH + oh) * OW + ow] = v;
}
#endif

#ifdef WANT_copy_block
// y[o * dst_row + offset + r] = x[o * src_row + r]: one input of a Concat into its slot.
__kernel void copy_block(__global const float* restrict x, __global float* restrict y,
                         const unsigned int src_row, const unsigned int dst_row,
                         const unsigned int offset)
{
    const size_t r = get_global_id(0), o = get_global_id(1);
    y[o * dst_row + offset + r] = x[o * src_row + r];
}
#endif
