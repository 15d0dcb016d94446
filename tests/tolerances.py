"""Every numeric error limit of the tests, named, in one place."""

# pack -> unpack -> dense: bit-exact (fp16 scales are stored, so nothing may move).
DENSE_ROUNDTRIP_MAX_ABS = 0.0

# C++ kernels (through ONNX Runtime) vs pbs2p_edge.format.kernel_matmul, which performs the same int7
# activation quantization and integer sums in float64: only float32 rounding of the scale/accumulate steps
# differs. Relative to max |y| of the case.
OP_VS_KERNEL_REFERENCE_REL = 1e-5

# Kernel arithmetic (int7 activations per <= 64-column chunk) vs the exact reference_matmul: normalized mean
# squared error sum((y - y_ref)^2) / sum(y_ref^2). Random Gaussian activations give ~1.5e-4.
KERNEL_VS_EXACT_NMSE = 1e-3

# Different thread counts / kernels must agree to float32 rounding (they use the same operation order).
THREADS_AGREE_REL = 1e-6
