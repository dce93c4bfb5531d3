"""OpenCL C kernels (*.cl) and the lowering of ONNX nodes onto them (`ops`), for `opencl_executor`."""
