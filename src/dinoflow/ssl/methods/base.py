"""The seam between the training engine and a self-supervised method: `SSLMethod`, the registry, views and batches.

STABILITY: other modules (and other engineers' methods) are written against this file. The names and signatures
below are the contract; extend with new optional hooks (with defaults here) rather than change existing ones.

The split follows solo-learn (`methods/base.py` + one file per method) and DINOv2 (`do_train` + `SSLMetaArch`):
the engine (`dinoflow.train.engine`) owns everything that is the same for every method (data order, optimizer and
parameter groups, lr / weight-decay schedules, fine-tune phases, DDP, AMP, gradient clipping, EMA updates,
checkpoints and bit-exact resume, dvclive logging, collapse monitors); a method owns what makes it that method:

============================  ==========================================================================
hook                          what the method says
============================  ==========================================================================
``name`` (class attribute)    registry key, the value of ``models[].method`` in params.yaml
``Config`` (dataclass)        its knobs, read from ``methods.<name>`` in params.yaml (defaults live here)
``supports``                  ``{"vit", "cnn"}`` or a subset; `check_backbone` raises a clear DinoflowError
``__init__(backbone, cfg,     builds heads / projectors / predictors / teachers around ``self.backbone``
setup)``
``view_maker()``              a picklable ``ViewMaker``: PIL image + seeded generator -> ``Views``
                              (any number of crops, multi-crop, per-sample pretext targets)
``batch_extras(n, rng)``      optional batch-level randomness drawn over the *global* batch (iBOT masks)
``training_step(batch, ctx)`` ``{"loss": scalar tensor with grad, "<name>": 0-d tensors to log, ...}``
``ema_pairs()``               ``[(student_module, teacher_module), ...]`` that the engine moves by EMA
``momentum``                  ``(start, end)`` of the cosine EMA momentum schedule (None: no EMA)
``schedules(e, n)``           extra per-step values (e.g. teacher temperature), given back in ``ctx.values``
``after_backward(ctx)``       e.g. cancel the prototypes' gradients during the first epoch
``exported_backbone()``       the Encoder that is saved and evaluated (the teacher's for EMA methods)
``local_batchnorm()``         modules that keep per-process BatchNorm under DDP (MoCo v2's shuffling BN)
``evaluated_network``         "student" | "teacher" (written to info.json)
============================  ==========================================================================

Conventions the engine relies on:

* ``self.backbone`` is the *student* `Encoder` (the one the optimizer trains). Every trainable parameter whose
  name starts with ``backbone.`` is a backbone parameter (backbone lr, `trainable: lastK`, layer decay); every
  other parameter with ``requires_grad`` is a head parameter (head lr). Teacher copies must not require grad
  (`make_teacher` does that); their buffers / parameters are saved with the method's ``state_dict``.
* A method is an ``nn.Module`` whose ``forward(batch, ctx)`` is ``training_step``: the engine wraps the whole
  method in ``DistributedDataParallel`` (``broadcast_buffers=False``), so anything batch-level (queues, centres,
  batch statistics over the global batch) must gather over processes itself, with
  `dinoflow.train.distributed.all_gather_with_grad` / ``all_reduce_mean`` (N processes then equal one).
* ``training_step`` may also return ``"embeddings"``: a ``(M, D)`` detached tensor of the evaluated network's
  pooled embeddings of the batch, and, for methods whose teacher gives target distributions (DINO, DINOv2),
  ``"targets"``: the ``(M, K)`` target probabilities of the same rows, plus ``"dino_kl"`` (the student-teacher
  KL). The engine turns them into the collapse monitors (`dinoflow.train.monitors`: ``<network>/std``,
  ``<network>/rankme``, and with targets ``teacher/entropy`` / ``teacher/entropy_fraction``) and the end-of-run
  collapse verdict; they are not logged as values. Every other non-``loss`` entry must be a 0-d tensor or a float
  and is logged as is.
* Views: ``Views.crops`` is a list of ``(C, H, W)`` float tensors; crops at the same position have the same size
  in every sample, so the collated batch has ``batch.views[v]`` of shape ``(B, C, H_v, W_v)`` (view-major, as
  DINOv2's ``global_crops.chunk(2)``). ``Views.targets`` holds per-sample pretext targets (a rotation label, the
  relative position of a patch pair, a permutation index, a masked region...), stacked to ``(B, ...)`` tensors
  in ``batch.targets``.

Determinism: the dataset seeds every sample from (seed, epoch, image index), so a batch, and hence a training
step, depends only on (seed, epoch, step) and the saved state, whatever the number of workers or processes.

Example (a complete method; see docs/methods.md for the walk-through):

    >>> import torch
    >>> from dataclasses import dataclass
    >>> from dinoflow.ssl.methods.base import SSLMethod, TwoViews, register
    >>> class Toy(SSLMethod):                        # (normally decorated with @register)
    ...     name = "toy"
    ...     @dataclass
    ...     class Config:
    ...         proj_dim: int = 8
    ...     def __init__(self, backbone, cfg, setup):
    ...         super().__init__(backbone, cfg, setup)
    ...         self.projector = torch.nn.Linear(backbone.embed_dim, cfg.proj_dim)
    ...     def view_maker(self):
    ...         return TwoViews.from_setup(self.setup)
    ...     def training_step(self, batch, ctx):
    ...         z0, z1 = (self.projector(self.backbone(v)) for v in batch.views)
    ...         return {"loss": (z0 - z1).pow(2).mean()}
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import pkgutil
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from dinoflow.errors import DinoflowError
from dinoflow.models.encoder import has_running_statistics

if typing.TYPE_CHECKING:  # pragma: no cover
    from dinoflow.models.encoder import Encoder
    from dinoflow.train.distributed import DistContext

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------ views and batches
@dataclass
class Views:
    """What a `ViewMaker` makes of one image: crops (``(C, H, W)`` float tensors) and per-sample targets.

    ``targets`` values are tensors or Python numbers (ints become ``torch.long``, floats ``torch.float32``);
    every sample of a batch must give the same keys and shapes.
    """

    crops: list[torch.Tensor]
    targets: dict[str, Any] = field(default_factory=dict)


class ViewMaker(Protocol):
    """``view_maker(image, rng) -> Views``. Must be picklable (DataLoader workers) and draw all randomness from
    ``rng`` or from torch's global generator (which the dataset seeds per sample inside ``fork_rng``)."""

    def __call__(self, image: Any, rng: torch.Generator) -> Views: ...  # pragma: no cover


@dataclass(frozen=True)
class ViewSettings:
    """Crop sizes and scales shared by the methods (params.yaml ``train`` section) and the normalisation of the
    backbone (timm data config). Sizes in pixels; scales are fractions of the image area."""

    global_crop_size: int = 224
    local_crop_size: int = 96
    n_local_crops: int = 0
    global_crop_scale: tuple[float, float] = (0.32, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.32)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class Batch:
    """A collated batch (this process's slice of the global batch).

    views: ``len(views)`` tensors ``(B, C, H_v, W_v)``; targets: ``{name: (B, ...)}``; indices: ``(B,)`` image
    positions; extras: batch-level tensors from `SSLMethod.batch_extras` (this process's rows).
    """

    views: list[torch.Tensor]
    targets: dict[str, torch.Tensor]
    indices: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.indices.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        mv = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch([mv(v) for v in self.views], {k: mv(v) for k, v in self.targets.items()}, mv(self.indices),
                     {k: mv(v) for k, v in self.extras.items()})


def _as_tensor(value: Any, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (bool, np.bool_)):
        return torch.tensor(bool(value))
    if isinstance(value, (int, np.integer)):
        return torch.tensor(int(value), dtype=torch.long)
    if isinstance(value, (float, np.floating)):
        return torch.tensor(float(value), dtype=torch.float32)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise DinoflowError(f"Views.targets[{key!r}]: expected a tensor or a number, got {type(value).__name__}")


def collate_views(samples: Sequence[tuple[Views, int]]) -> Batch:
    """Stack ``(Views, index)`` samples: crop ``v`` of every sample -> ``views[v]``; targets stacked by key."""
    if not samples:
        raise DinoflowError("collate_views: empty batch")
    n_views, keys = len(samples[0][0].crops), set(samples[0][0].targets)
    for views, i in samples:
        if len(views.crops) != n_views or set(views.targets) != keys:
            raise DinoflowError(f"collate_views: image {i} gives {len(views.crops)} crops and targets "
                                f"{sorted(views.targets)}, the first gives {n_views} and {sorted(keys)}")
    try:
        stacked = [torch.stack([s[0].crops[v] for s in samples]) for v in range(n_views)]
    except RuntimeError as exc:
        raise DinoflowError(f"collate_views: crops at the same position must have one size: {exc}") from exc
    targets = {k: torch.stack([_as_tensor(s[0].targets[k], k) for s in samples]) for k in sorted(keys)}
    return Batch(stacked, targets, torch.tensor([int(s[1]) for s in samples], dtype=torch.long))


def sample_seed(*numbers: int) -> int:
    """A 32-bit seed from integers (seed, epoch, index, stream): independent streams for every combination."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1)[0])


class ViewDataset(torch.utils.data.Dataset):
    """``images[i]`` (or ``images.get(i)``) -> ``(view_maker(image, rng), i)``, seeded by (seed, epoch, i).

    Inside the call torch's global generator is seeded too (in ``fork_rng``, so the caller's state is untouched):
    torchvision v2 transforms draw from it. ``rng`` is a separate stream for the method's own draws (labels).
    Call ``set_epoch(e)`` before iterating an epoch.
    """

    def __init__(self, images: Any, view_maker: ViewMaker, seed: int = 0):
        self.images, self.view_maker, self.seed, self.epoch = images, view_maker, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Views, int]:
        image = self.images.get(i) if hasattr(self.images, "get") else self.images[i]
        s = sample_seed(self.seed, self.epoch, i)
        rng = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, i, 1))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            views = self.view_maker(image, rng)
        if not isinstance(views, Views):
            raise DinoflowError(f"view maker {type(self.view_maker).__name__} returned {type(views).__name__}, "
                                "not Views")
        return views, int(i)


# ------------------------------------------------------------------------------------------------ standard views
def to_uint8_rgb(image: Any) -> torch.Tensor:
    """PIL image or ``(C, H, W)`` tensor -> ``(3, H, W)`` uint8 tensor (grey images repeated)."""
    from PIL import Image
    from torchvision.transforms import v2

    if isinstance(image, Image.Image):
        image = image.convert("RGB") if image.mode != "RGB" else image
    elif not isinstance(image, torch.Tensor):
        raise DinoflowError(f"views: expected a PIL image or a tensor, got {type(image).__name__}")
    x = v2.functional.to_dtype(v2.functional.to_image(image), torch.uint8, scale=True).as_subclass(torch.Tensor)
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise DinoflowError(f"views: expected a (1 or 3, H, W) image, got shape {tuple(x.shape)}")
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x


class MultiCropViews:
    """DINO / SwAV multi-crop: 2 global crops then ``n_local_crops`` local crops (DINO's recipe, torchvision v2;
    `dinoflow.ssl.augment.MultiCropAugmentation`). SimCLR-style methods use it with ``n_local_crops=0``."""

    def __init__(self, settings: ViewSettings, n_local_crops: int | None = None, **augment_kwargs: Any):
        from dinoflow.ssl.augment import MultiCropAugmentation

        s = settings
        self.augmentation = MultiCropAugmentation(
            global_crop_size=s.global_crop_size, local_crop_size=s.local_crop_size,
            n_local_crops=s.n_local_crops if n_local_crops is None else n_local_crops,
            global_crop_scale=s.global_crop_scale, local_crop_scale=s.local_crop_scale, mean=s.mean, std=s.std,
            **augment_kwargs)

    def __call__(self, image: Any, rng: torch.Generator) -> Views:
        return Views(self.augmentation._crops(self.augmentation._to_uint8_rgb(image)))


class TwoViews(MultiCropViews):
    """Two augmented global crops (SimCLR, MoCo, BYOL, SimSiam, Barlow Twins, VICReg)."""

    def __init__(self, settings: ViewSettings, **augment_kwargs: Any):
        super().__init__(settings, n_local_crops=0, **augment_kwargs)

    @classmethod
    def from_setup(cls, setup: "MethodSetup", **augment_kwargs: Any) -> "TwoViews":
        return cls(setup.views, **augment_kwargs)


# ------------------------------------------------------------------------------------------------ engine -> method
@dataclass(frozen=True)
class MethodSetup:
    """What a method may need to know when it is built (all plain values; nothing of the engine's state).

    views: crop settings and normalisation; seed: the run's seed; epochs / steps_per_epoch: the run's length
    (for method schedules); world_size: processes; finetune: True when the backbone starts from trained weights.
    """

    views: ViewSettings = ViewSettings()
    seed: int = 0
    epochs: int = 1
    steps_per_epoch: int = 1
    world_size: int = 1
    finetune: bool = False


@dataclass
class StepContext:
    """Given to `SSLMethod.training_step` at every step.

    step: global optimisation step (0-based); epoch; total_steps; values: this step's scheduled values (``lr``,
    ``wd``, ``momentum`` when the method has EMA, and the method's own `schedules`); dist: the process group
    (`dinoflow.train.distributed.DistContext`); phase: ``"train"``, ``"head_warmup"`` (fine-tune, backbone
    frozen) or ``"backbone"`` (fine-tune, chosen blocks train).
    """

    step: int
    epoch: int
    total_steps: int
    values: dict[str, float]
    dist: "DistContext | None" = None
    phase: str = "train"


class SSLMethod(nn.Module):
    """Base class of every method; see the module docstring for the contract. Subclasses set ``name`` and
    ``Config`` and implement ``view_maker`` and ``training_step``; the other hooks have working defaults."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = type("Config", (), {})
    supports: ClassVar[frozenset[str]] = frozenset({"vit", "cnn"})
    evaluated_network: ClassVar[str] = "student"
    #: family for the report ("contrastive", "distillation", "redundancy", "clustering", "masked", "pretext")
    family: ClassVar[str] = ""

    def __init__(self, backbone: "Encoder", cfg: Any, setup: MethodSetup):
        super().__init__()
        self.check_backbone(backbone)
        self.backbone = backbone
        self.cfg, self.setup = cfg, setup

    # -- checks
    @classmethod
    def check_backbone(cls, backbone: "Encoder") -> None:
        """Raise a DinoflowError when this method cannot train this kind of backbone (e.g. MAE on a CNN)."""
        kind = "vit" if backbone.is_vit else "cnn"
        if kind not in cls.supports:
            raise DinoflowError(
                f"method {cls.name!r} needs a {' or '.join(sorted(cls.supports)).upper()} backbone; "
                f"{backbone.arch} is a {kind.upper()} (choose another method or backbone for this model)")

    # -- data
    def view_maker(self) -> ViewMaker:
        raise NotImplementedError(f"{type(self).__name__}.view_maker")

    def batch_extras(self, n_global: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Batch-level randomness for the *global* batch of ``n_global`` images, each tensor ``(n_global, ...)``
        (sample-major); the engine keeps this process's rows. ``rng`` is seeded by (seed, epoch, global indices).
        Default: none."""
        return {}

    # -- the step
    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__}.training_step")

    def forward(self, batch: Batch, ctx: StepContext) -> dict[str, Any]:  # so that DDP can wrap the method
        return self.training_step(batch, ctx)

    def after_backward(self, ctx: StepContext) -> None:
        """Called between backward and gradient clipping (e.g. freeze prototypes). Default: nothing."""

    # -- EMA and schedules
    #: (start, end) of the cosine momentum schedule of `ema_pairs`; None for methods without a momentum encoder
    momentum: tuple[float, float] | None = None

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(student, teacher) modules of identical structure; teacher <- m * teacher + (1 - m) * student after
        every optimizer step (parameters), buffers copied. Default: none."""
        return []

    def schedules(self, epochs: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """Method-specific per-step values (one per step of the run), passed back in ``ctx.values``."""
        return {}

    def local_batchnorm(self) -> list[nn.Module]:
        """Modules whose BatchNorm layers keep per-process statistics under DDP: the engine converts every other
        backbone's (the student's and its EMA copies') to SyncBatchNorm in scratch CNN runs. Default: none (N
        processes then equal one); MoCo v2's key encoder with shuffling BN."""
        return []

    # -- what is kept
    def exported_backbone(self) -> "Encoder":
        """The Encoder saved as the model and evaluated; default the student backbone."""
        return self.backbone

    def ema_backbone(self) -> "Encoder | None":
        """The EMA copy of ``self.backbone`` declared in `ema_pairs` (None without one); used when params ask for
        ``train.evaluate_network: teacher``."""
        for student, teacher in self.ema_pairs():
            if student is self.backbone:
                return teacher
        return None


def make_teacher(module: nn.Module) -> nn.Module:
    """A frozen deep copy (no gradients, eval mode) of ``module``: a momentum / EMA encoder's starting point."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    return teacher


def pooled(backbone: "Encoder", x: torch.Tensor) -> torch.Tensor:
    """``(B, D)`` pooled embedding of a batch (ViT CLS token, CNN global average pool)."""
    return backbone.forward_tokens(x)["cls"]


def uses_batch_statistics(module: nn.Module) -> bool:
    """True when a forward pass of ``module`` depends on the batch it sees as a whole, so that one call on
    concatenated views differs from one call per view: any layer in training mode that keeps running statistics
    (a ``running_mean`` / ``running_var`` buffer: BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants, timm's
    BatchNormAct2d, timm's EvoNorm2dB* (``norm_layer: evonormb0``; batch variance in training), an InstanceNorm
    with ``track_running_stats``, whose running statistics are updated once per call), or a BatchNorm layer
    (``torch.nn.modules.batchnorm._BatchNorm``) without running statistics (``track_running_stats=False``
    normalises by the batch in eval mode too). LayerNorm, GroupNorm, timm's EvoNorm2dS* and a plain InstanceNorm
    are per sample."""
    return any((m.training and has_running_statistics(m))
               or (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None)
               for m in module.modules())


def pooled_views(backbone: "Encoder", views: Sequence[torch.Tensor], multi_crop: bool = False) -> list[torch.Tensor]:
    """Pooled embeddings ``[(B_v, D), ...]`` of several views, one per view, in order, through ONE backbone call
    per run of consecutive views of the same shape when that is the same computation (or, with ``multi_crop``,
    always).

    Same computation: when the backbone has no layer that normalises with batch statistics
    (`uses_batch_statistics`: a ViT's LayerNorm, a CNN whose BatchNorm layers are in eval mode), every sample's
    output depends on that sample only, so ``backbone(cat([x0, x1]))`` split back equals ``[backbone(x0),
    backbone(x1)]`` up to float rounding (a bigger batch may pick another matmul blocking), and the one call is
    faster (larger matrix products, half the Python and kernel-launch overhead: 1.5x for fwd+bwd of the benchmark
    ViT on one CPU thread). It is what DINO's ``MultiCropWrapper`` does (facebookresearch/dino ``utils.py``:
    ``torch.cat`` of the crops of one resolution, ``torch.unique_consecutive`` of their sizes, one backbone call
    per resolution).

    Otherwise (a BatchNorm layer in training mode): one call per view, so that each view is normalised by its own
    batch statistics and the running statistics are updated once per view, exactly as the official SimCLR, BYOL,
    SimSiam, Barlow Twins, VICReg and MoCo v3 code and lightly's examples run them (concatenating would change the
    method: BN statistics over both views). Heads are not concerned: callers apply them per view, so their
    BatchNorm1d statistics stay per view.

    ``multi_crop=True``: the multi-crop convention of SwAV and DINO, whose official code always runs the crops of
    one resolution through one backbone call, BatchNorm statistics over them included (facebookresearch/swav
    ``src/resnet50.py`` ``ResNet.forward``; facebookresearch/dino ``MultiCropWrapper``).

    views: ``(B_v, C, H_v, W_v)`` tensors. Returns a list of ``len(views)`` tensors ``(B_v, D)`` (views of one call
    are row slices of its output). Raises DinoflowError for an empty list.
    """
    if not views:
        raise DinoflowError("pooled_views: no views given")
    if len(views) == 1 or (not multi_crop and uses_batch_statistics(backbone)):
        return [pooled(backbone, v) for v in views]
    out: list[torch.Tensor] = []
    start = 0
    while start < len(views):
        stop = start + 1
        while stop < len(views) and views[stop].shape[1:] == views[start].shape[1:] \
                and views[stop].dtype == views[start].dtype and views[stop].device == views[start].device:
            stop += 1
        group = views[start:stop]
        if len(group) == 1:
            out.append(pooled(backbone, group[0]))
        else:
            out.extend(pooled(backbone, torch.cat(list(group))).split([int(v.shape[0]) for v in group]))
        start = stop
    return out


# ------------------------------------------------------------------------------------------------ registry
_REGISTRY: dict[str, type[SSLMethod]] = {}
_DISCOVERED = False


def register(cls: type[SSLMethod]) -> type[SSLMethod]:
    """Class decorator: make a method available as ``models[].method: <cls.name>``."""
    if not cls.name or not cls.name.replace("_", "").isalnum():
        raise DinoflowError(f"register: {cls.__name__}.name must be a non-empty identifier, got {cls.name!r}")
    if not dataclasses.is_dataclass(cls.Config):
        raise DinoflowError(f"register: {cls.__name__}.Config must be a dataclass")
    other = _REGISTRY.get(cls.name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise DinoflowError(f"register: method name {cls.name!r} used by {other.__module__}.{other.__qualname__} "
                            f"and {cls.__module__}.{cls.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    """Import every module of ``dinoflow.ssl.methods`` once, so writing the file is enough to register."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    import dinoflow.ssl.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    _DISCOVERED = True


def available_methods() -> list[str]:
    """Names of the registered methods (sorted); ``none`` (no training) is not a method."""
    _discover()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[SSLMethod]:
    """The method class registered as ``name``; a DinoflowError lists the known names otherwise."""
    _discover()
    if name not in _REGISTRY:
        raise DinoflowError(f"models[].method: {name!r} is not a registered method (known: none, "
                            f"{', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


# ------------------------------------------------------------------------------------------------ typed configs
def _check_type(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return any(_check_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_check_type(v, a) for v, a in zip(value, args))
        return all(_check_type(v, args[0]) for v in value) if args else True
    return True


def parse_config(method: type[SSLMethod] | str, section: dict[str, Any] | None) -> Any:
    """``methods.<name>`` of params.yaml -> the method's ``Config`` dataclass (its defaults fill what is missing).

    Raises DinoflowError naming ``methods.<name>.<key>`` for an unknown key or a value of the wrong type.
    Tuples given as YAML lists are converted. A ``Config`` may define ``validate(self, name)`` for range checks
    (raise DinoflowError naming ``methods.<name>.<key>``) and a class attribute ``CHOICES = {key: (allowed, ...)}``
    for enumerations (the message lists the allowed values).
    """
    cls = get_method(method) if isinstance(method, str) else method
    section = dict(section or {})
    hints = typing.get_type_hints(cls.Config)
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise DinoflowError(f"methods.{cls.name}: unknown key(s) {', '.join(unknown)} (known: "
                            f"{', '.join(fields) or 'none'})")
    missing = [n for n, f in fields.items() if n not in section and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise DinoflowError(f"methods.{cls.name}: missing required key(s) {', '.join(missing)}")
    values = {}
    for key, value in section.items():
        hint = hints.get(key, Any)
        if not _check_type(value, hint):
            raise DinoflowError(f"methods.{cls.name}.{key}: {value!r} is not a {getattr(hint, '__name__', hint)}")
        choices = getattr(cls.Config, "CHOICES", {}).get(key)
        if choices and value not in choices:
            raise DinoflowError(f"methods.{cls.name}.{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        if typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        if hint is float and isinstance(value, int):
            value = float(value)
        values[key] = value
    cfg = cls.Config(**values)
    check = getattr(cfg, "validate", None)
    if callable(check):
        check(cls.name)
    return cfg


def build_method(name: str, backbone: "Encoder", section: dict[str, Any] | None, setup: MethodSetup) -> SSLMethod:
    """Parse ``methods.<name>`` and build the method around ``backbone``."""
    cls = get_method(name)
    cls.check_backbone(backbone)
    return cls(backbone, parse_config(cls, section), setup)


__all__ = ["Batch", "IMAGENET_MEAN", "IMAGENET_STD", "MethodSetup", "MultiCropViews", "SSLMethod", "StepContext",
           "TwoViews", "ViewDataset", "ViewMaker", "ViewSettings", "Views", "available_methods", "build_method",
           "collate_views", "get_method", "make_teacher", "parse_config", "pooled", "pooled_views", "register",
           "sample_seed", "to_uint8_rgb", "uses_batch_statistics"]
