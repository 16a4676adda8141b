"""ViTok and the DiT in JAX / Flax NNX. One role per package:

    vitok/core       the model-agnostic layer: mesh and sharding rules, train state, the training
                     loop, checkpoints, logging, hardware, the TPU plan (every family uses it)
    vitok/data       video I/O, tfds clip builders, grain pipelines
    vitok/nn         network blocks both families build from: attention kernels, matmuls, layers
    vitok/evals      evaluation networks and metrics: Inception, I3D, LPIPS, PSNR / SSIM,
                     Frechet distances, the moving digits' classifier
    vitok/tokenizer  the ViTok family: the autoencoder, its stage-1 and stage-2 objectives and
                     tasks, tiled coding of any length, and `frozen`, which loads a trained one
    vitok/sweeps     experiment tooling: size sweeps and their reports
    dit/             the DiT family, on the latents of a frozen tokenizer

The layering (no circles, who may import whom) is checked by tests/test_layering.py.
"""
