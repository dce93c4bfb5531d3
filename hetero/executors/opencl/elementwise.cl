// Elementwise operators, one output element per work-item.
//
// UNARY(x) and BINARY(a, b) are the operator's expression; OFFSETS(i, ia, ib) maps an output
// index to the two inputs' offsets under numpy broadcasting, with the shapes baked in.

#ifdef WANT_unary
__kernel void unary(__global const float* restrict x, __global float* restrict y)
{
    const size_t i = get_global_id(0);
    y[i] = UNARY(x[i]);
}
#endif

#ifdef WANT_binary
__kernel void binary(__global const float* restrict a, __global const float* restrict b,
                     __global float* restrict y)
{
    const size_t i = get_global_id(0);
    size_t ia, ib;
    OFFSETS(i, ia, ib);
    y[i] = BINARY(a[ia], b[ib]);
}
#endif
