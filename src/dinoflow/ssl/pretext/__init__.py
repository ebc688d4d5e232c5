"""Pretext-task building blocks (views with per-sample targets, heads/decoders, losses); the `SSLMethod` modules
that put them on the training engine are ``dinoflow.ssl.methods.<name>``.

- ``common.py``: image conversion, a NumPy-seeded random resized crop, normalisation, ViT size checks.
- ``rotation.py``: Gidaris et al. 2018, 4 right-angle rotations, 4-way cross-entropy.
- ``relative_position.py``: Doersch et al. 2015, centre patch + one of 8 neighbours (gap, jitter), 8-way.
- ``jigsaw.py``: Noroozi & Favaro 2016, 3x3 tiles, maximal-Hamming permutation set, permutation index.
- ``context_encoder.py``: Pathak et al. 2016, central-region inpainting, L2 (+ optional adversarial) loss.
- ``mae.py``: He et al. 2022 with lightly's blocks, 75 % masking, light decoder, normalised-pixel loss.

Every view draws its randomness from one ``numpy.random.Generator`` per sample (seeded by the view seam from
(seed, epoch, image)), so targets are reproducible and independent of the global generators.
"""
