"""The ViTok tokenizer family: the autoencoder (model), its stage-1 objective and task (stage1),
the adversarial stage 2 (discriminator, stage2), tiled coding of videos of any length (tiling), and
loading a trained tokenizer, frozen, for another job (frozen)."""
