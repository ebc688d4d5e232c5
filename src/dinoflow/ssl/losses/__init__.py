"""Self-supervised losses, one per file (a new method adds its loss file here and a small method module).

- :class:`DINOLoss` (``dino.py``): CLS-token self-distillation, centering or Sinkhorn-Knopp teacher.
- :class:`iBOTPatchLoss` (``ibot.py``): masked-patch self-distillation with its own centre.
- :class:`KoLeoLoss` (``koleo.py``): Kozachenko-Leonenko spreading regulariser.
"""

from dinoflow.ssl.losses.dino import CENTERING_MODES, DINOLoss, TeacherCentering, sinkhorn_knopp
from dinoflow.ssl.losses.ibot import iBOTPatchLoss, masks_weight
from dinoflow.ssl.losses.koleo import KoLeoLoss

__all__ = ["CENTERING_MODES", "DINOLoss", "KoLeoLoss", "TeacherCentering", "iBOTPatchLoss", "masks_weight",
           "sinkhorn_knopp"]
