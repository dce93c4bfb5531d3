// 2-D pooling, one output element per work-item (a 1-D pool runs with H = KH = 1).
//
// Defines: H W OH OW KH KW SH SW DH DW PT PL; for averages, the rows [CH0, CH1) and
// columns [CW0, CW1) whose positions count towards the divisor (ONNX count_include_pad).

#ifdef WANT_maxpool
__kernel void maxpool(__global const float* restrict x, __global float* restrict y)
{
    const int ow = get_global_id(0), oh = get_global_id(1), z = get_global_id(2);
    const __global float* xc = x + (size_t)z * (H * W);
    float m = -INFINITY;
    for (int kh = 0; kh < KH; kh++) {
        const int ih = oh * SH - PT + kh * DH;
        if (ih < 0 || ih >= H)
            continue;
        for (int kw = 0; kw < KW; kw++) {
            const int iw = ow * SW - PL + kw * DW;
            if (iw < 0 || iw >= W)
                continue;
            const float v = xc[ih * W + iw];
            if (v != v || v > m)  // NaN propagates, as in numpy's max (no isnan: a call on PoCL)
                m = v;
        }
    }
    y[((size_t)z * OH + oh) * OW + ow] = m;
}
#endif

#ifdef WANT_avgpool
__kernel void avgpool(__global const float* restrict x, __global float* restrict y)
{
    const int ow = get_global_id(0), oh = get_global_id(1), z = get_global_id(2);
    const __global float* xc = x + (size_t)z * (H * W);
    float sum = 0.0f;
    int count = 0;
    for (int kh = 0; kh < KH; kh++) {
        const int ih = oh * SH - PT + kh * DH;
        for (int kw = 0; kw < KW; kw++) {
            const int iw = ow * SW - PL + kw * DW;
            if (ih >= 0 && ih < H && iw >= 0 && iw < W)
                sum += xc[ih * W + iw];
            if (ih >= CH0 && ih < CH1 && iw >= CW0 && iw < CW1)
                count++;
        }
    }
    y[((size_t)z * OH + oh) * OW + ow] = sum / count;
}
#endif

#ifdef WANT_global_avgpool
// Defines: SIZE (elements averaged per channel).
__kernel void global_avgpool(__global const float* restrict x, __global float* restrict y)
{
    const int z = get_global_id(0);
    const __global float* xc = x + (size_t)z * SIZE;
    float sum = 0.0f;
    for (int i = 0; i < SIZE; i++)
        sum += xc[i];
    y[z] = sum / SIZE;
}
#endif
