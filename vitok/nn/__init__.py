"""Network blocks both model families are built from: the attention kernels (attention), the
matmuls that accumulate in float32 (matmul), and the transformer layers (layers)."""
