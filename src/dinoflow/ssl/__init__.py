"""Self-supervised learning building blocks (DINOv2 recipe); the training loop lives in ``dinoflow.train``.

- ``heads.py``: :class:`~dinoflow.ssl.heads.DINOHead` (GELU MLP, L2-normalised bottleneck, weight-normalised
  prototypes with unit norm) and ``cancel_last_layer_gradients`` (prototypes frozen in the first epoch(s)).
- ``losses/``: one loss per file: ``DINOLoss`` (CLS tokens; centering or Sinkhorn-Knopp), ``iBOTPatchLoss``
  (masked patches), ``KoLeoLoss`` (spreading regulariser).
- ``masking.py``: BEiT/DINOv2 block ``MaskingGenerator`` and ``sample_masks`` (which global crops get masked, how
  much), seeded by a NumPy generator.
- ``augment.py``: ``MultiCropAugmentation`` (2 global + N local crops, torchvision v2), ``MultiCropDataset``
  (per-sample seeds), ``collate_multicrop`` / ``MultiCropCollator`` (stacked crops + iBOT masks).
- Schedules (lr, weight decay, teacher momentum and temperature): ``dinoflow.train.schedules``.

Another method (SimCLR, BYOL, ...) would add ``losses/<method>.py`` and a small method module that wires its
views, heads and loss; the blocks above stay shared.
"""
