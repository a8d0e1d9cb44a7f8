"""AffinityNet (PSA) training: ``train --method affinitynet --cams DIR`` (reference
affinity_networks.md §2.2-§2.3; psa ``infer_cls.py``, ``voc12/data.py``, ``train_aff.py``).

Labels. PSA's inputs are, per image, the dense-CRF probability maps of ``[(1 − max cam)^α;
cams]`` at α 4 ("la") and α 32 ("ha"). They are computed once from the CAM files of ``--cams``
into ``OUT/psa_scores/<id>.npz`` (float32, written atomically, reused on resume), in worker
processes. Every training view then crops and flips the image and both stacks jointly, averages
the stacks over 8×8 blocks and applies PSA's rule (``affinity.psa_label``): argmax(la), 255
where la says background, 0 where ha says background, 255 where no score (crop padding).

Views (``train_aff.py``): colour jitter (0.3, 0.3, 0.3, 0.1) on the image, a joint random crop
into a zero container in raw pixel space (padding is black, PSA's choice; IRN pads with the mean
colour), a joint horizontal flip, ImageNet normalization. No random rescale.

Loss: ``L_bg/4 + L_fg/4 + L_neg/2`` over the radius-5 pairs of the stride-8 grid.

Optimiser (``train_aff.py``, ``tool/torchutils.py``): SGD, poly ``lr·(1 − t/T)^0.9`` per step;
groups: backbone weights lr ×1 with weight decay, head weights (f8_3, f8_4, f8_5, f9) lr ×10
with weight decay (PSA's 2× / 20× bias groups are empty: every conv is bias-free); the trainable
BatchNorm parameters of the tiny from-scratch model (none in PSA's regime, where BN is frozen)
get lr ×1 without weight decay. Momentum: upstream's PolyOptimizer hands its weight decay to
SGD's momentum slot, so PSA trains with momentum 5e-4; ``momentum=None`` reproduces that (the
weight decay's value), ``--momentum 0.9`` is what the code meant. ``warmup_epochs`` and
``min_lr`` do not apply (PSA has neither). Upstream settings (``PSA_TRAIN``, the method's
``defaults``): lr 0.1, weight decay 5e-4, batch 8, 8 epochs, crop 448.

Checkpoint: AffinityNet's plain state dict, PSA's ``resnet38_aff.Net`` layout for the published
size (``--model affinitynet``). ``--backbone FILE`` starts the ResNet-38 trunk from a classifier
checkpoint (EDAM's ``edam`` / ``edam_tiny`` share the trunk of ``affinitynet`` /
``affinitynet_tiny``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.utils.data

from wsss_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from wsss_fast.data.dataset import EmptyDataset, require_images
from wsss_fast.data.factory import open_dataset
from wsss_fast.data.images import ImageDecodeError, read_image
from wsss_fast.io.atomic import atomic_write, atomic_write_json
from wsss_fast.io.cam_files import CamFileError, load_cam_file
from wsss_fast.models.affinitynet import OUTPUT_STRIDE, pair_affinity
from wsss_fast.models.registry import MODELS, create_model
from wsss_fast.train import trainer as classifier_trainer
from wsss_fast.train.affinity import (PSA_ALPHAS, PSA_RADIUS, psa_label, psa_label_scores, psa_loss,
                                      psa_pairs, psa_targets)
from wsss_fast.train.data import batches_per_epoch, color_jitter, random_crop
from wsss_fast.train.methods import Method, register_method

SCORES_DIR = "psa_scores"
SCORES_CONFIG = "scores.json"
POLY_POWER = 0.9
HEAD_LR_SCALE = 10.0
MIN_CROP = OUTPUT_STRIDE * (2 * PSA_RADIUS - 1)   # a non-empty source window: 9 cells wide
# PSA's settings where they differ from TrainConfig's generic (AdamW) defaults.
PSA_TRAIN = dict(lr=0.1, weight_decay=5e-4, batch_size=8, epochs=8)   # crop: the generic 448
DEFAULT_MODEL = "affinitynet_tiny"


def affinitynet_loss(model, images: torch.Tensor, labels: torch.Tensor):
    """PSA's loss of ``model(images)`` for label grids ``labels (B, h, w)`` (``psa_label``, on
    the network's stride-8 grid). Returns ``(loss, {"bg", "fg", "neg"})``."""
    features = model(images)
    grid = tuple(features.shape[2:])
    if labels.dim() != 3 or tuple(labels.shape[1:]) != grid:
        raise ValueError(f"affinitynet_loss: labels {tuple(labels.shape)} do not match the "
                         f"feature grid {grid} (crop a multiple of {OUTPUT_STRIDE})")
    src, dst = psa_pairs(*grid, device=features.device)
    return psa_loss(pair_affinity(features, src, dst), psa_targets(labels))


def poly_lr(step: int, total_steps: int, lr: float) -> float:
    """PSA's ``PolyOptimizer``: ``lr·(1 − step/total)^0.9`` for update ``step`` (0-based)."""
    return lr * (1 - min(step, total_steps) / total_steps) ** POLY_POWER


def parameter_groups(net, weight_decay: float) -> list[dict]:
    """PSA's groups (see the module docstring), each with its ``lr_scale``."""
    head = {id(p) for layer in net.head_layers() for p in layer.parameters()}
    groups = {"backbone": [], "head": [], "norm": []}
    for parameter in net.parameters():
        if parameter.requires_grad:
            kind = "head" if id(parameter) in head else \
                "norm" if parameter.ndim <= 1 else "backbone"
            groups[kind].append(parameter)
    return [{"params": groups["backbone"], "lr_scale": 1.0, "weight_decay": weight_decay},
            {"params": groups["head"], "lr_scale": HEAD_LR_SCALE, "weight_decay": weight_decay},
            {"params": groups["norm"], "lr_scale": 1.0, "weight_decay": 0.0}]


# --- la / ha scores ------------------------------------------------------------------------------

def confident_pixels(la: np.ndarray, ha: np.ndarray) -> int:
    """Pixels PSA's rule labels (la says a class, or ha says background) at full resolution."""
    return int(((la.argmax(axis=0) != 0) | (ha.argmax(axis=0) == 0)).sum())


def score_job(image_path: str, cam_path: str, out_path: str, alphas) -> Optional[str]:
    """la / ha of one image into ``out_path`` (in a worker process); None or the reason the
    image is left out."""
    if not Path(cam_path).exists():
        return f"no CAM file {cam_path}"
    try:
        record = load_cam_file(cam_path)
        image = read_image(image_path)
    except (CamFileError, ImageDecodeError) as error:
        return str(error)
    if record.high_res.shape[1:] != image.shape[:2]:
        return (f"{cam_path}: CAM size {record.high_res.shape[1:]} differs from the image size "
                f"{image.shape[:2]}")
    if record.keys.size == 0:   # no class: background everywhere for both CRFs
        la = ha = np.ones((1,) + image.shape[:2], np.float32)
    else:
        try:
            la, ha = psa_label_scores(image, record.high_res, record.keys, alphas)
        except ValueError as error:   # e.g. CAMs not max-normalized
            return f"{cam_path}: {error}"
    if confident_pixels(la, ha) == 0:
        return "empty region: no confident pixel (la says background and ha foreground " \
               "everywhere)"
    with atomic_write(out_path) as handle:
        np.savez(handle, la=la.astype(np.float32), ha=ha.astype(np.float32))
    return None


def prepare_scores(data, cams_dir: Path, scores_dir: Path, alphas, *, workers: int,
                   progress: bool) -> dict[str, str]:
    """Compute the la / ha scores missing from ``scores_dir`` (wiped when it holds scores of
    other CAMs or α); returns ``{id: reason}`` for the images left out."""
    from wsss_fast.workers import JobFailure, run_in_workers
    settings = {"cams": str(cams_dir.resolve()), "alphas": [float(a) for a in alphas]}
    marker = scores_dir / SCORES_CONFIG
    if scores_dir.exists() and (not marker.exists()
                                or _read_json(marker) != settings):
        shutil.rmtree(scores_dir)
    scores_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, settings)
    todo = [id for id in data.ids if not _readable_scores(score_path(scores_dir, id))]
    jobs = [(data.sample(id).image_path, str(cams_dir / f"{id}.npy"),
             str(score_path(scores_dir, id)), tuple(alphas)) for id in todo]
    for id in todo:
        score_path(scores_dir, id).parent.mkdir(parents=True, exist_ok=True)
    results = run_in_workers(score_job, jobs, workers=workers, progress=progress,
                             desc="affinitynet la/ha CRF")
    skipped = {}
    for id, result in zip(todo, results):
        if isinstance(result, JobFailure):
            skipped[id] = f"la/ha CRF failed: {result}"
        elif result is not None:
            skipped[id] = result
    return skipped


def score_path(scores_dir: Path, id: str) -> Path:
    return scores_dir / f"{id}.npz"


def _readable_scores(path: Path) -> bool:
    try:
        with np.load(path) as loaded:
            return "la" in loaded and "ha" in loaded
    except (OSError, ValueError, EOFError):
        return False


def _read_json(path: Path):
    import json
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --- training views ------------------------------------------------------------------------------

def training_view(image: np.ndarray, la: np.ndarray, ha: np.ndarray, crop: int, jitter,
                  rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One PSA training view: ``(image (3, crop, crop) float32, label (crop/8, crop/8) uint8)``
    of a uint8 ``(H, W, 3)`` image and its la / ha stacks ``(K, H, W)``."""
    x = image.astype(np.float32) / 255.0
    if jitter is not None:
        x = color_jitter(x, jitter, rng)
    k = la.shape[0]
    stack = np.concatenate([x, la.transpose(1, 2, 0), ha.transpose(1, 2, 0)], axis=-1)
    stack = random_crop(stack, crop, rng)          # black padding, no score (→ 255)
    if rng.random() < 0.5:
        stack = stack[:, ::-1]
    view = (stack[..., :3] - np.asarray(IMAGENET_MEAN, np.float32)) / \
        np.asarray(IMAGENET_STD, np.float32)
    scores = torch.from_numpy(np.ascontiguousarray(stack[..., 3:].transpose(2, 0, 1)))
    label = psa_label(scores[:k], scores[k:], OUTPUT_STRIDE)[0]
    return torch.from_numpy(np.ascontiguousarray(view.transpose(2, 0, 1))), label


class AffinityTrainingImages(torch.utils.data.Dataset):
    """Views and label grids of the images with la / ha scores; items ``(id, image, label,
    error)`` as ``train.data.TrainingImages`` (an unreadable item gives ``None`` and the error),
    every random draw from a generator seeded by ``(seed, epoch, index)``."""

    def __init__(self, dataset, scores_dir: Path, ids, crop: int, jitter, seed: int):
        self.dataset, self.scores_dir, self.ids = dataset, Path(scores_dir), list(ids)
        self.crop, self.jitter, self.seed, self.epoch = crop, jitter, int(seed), 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        id = self.ids[index]
        try:
            image = read_image(self.dataset.sample(id).image_path)
            with np.load(score_path(self.scores_dir, id)) as scores:
                la, ha = scores["la"], scores["ha"]
        except (ValueError, OSError, KeyError) as error:
            return id, None, None, str(error)
        if la.shape != ha.shape or la.shape[1:] != image.shape[:2]:
            return id, None, None, (f"la/ha scores {la.shape} do not fit the image "
                                    f"{image.shape[:2]}")
        view, label = training_view(image, la, ha, self.crop, self.jitter, rng)
        return id, view, label, None


# --- the loop ------------------------------------------------------------------------------------

def config_problems(config) -> list[str]:
    problems = []
    if not config.cams:
        problems.append("--method affinitynet needs --cams DIR (CAM files of the split, for "
                        "PSA's la / ha labels)")
    elif not Path(config.cams).is_dir():
        problems.append(f"--cams {config.cams}: not a folder")
    if int(config.crop) % OUTPUT_STRIDE:
        problems.append(f"--crop {config.crop}: AffinityNet needs a multiple of "
                        f"{OUTPUT_STRIDE} (PSA: 448)")
    elif int(config.crop) < MIN_CROP:
        problems.append(f"--crop {config.crop}: the radius-{PSA_RADIUS} pairs need a grid of at "
                        f"least {MIN_CROP // OUTPUT_STRIDE} cells: crop at least {MIN_CROP}")
    if config.model and config.model in MODELS and MODELS.get(config.model).family != "psa":
        problems.append(f"--model {config.model} is not an AffinityNet (affinitynet, "
                        f"affinitynet_tiny)")
    if config.backbone and not Path(config.backbone).is_file():
        problems.append(f"--backbone {config.backbone}: no such file")
    elif config.backbone and not problems:
        problems += backbone_dilation_problems(Path(config.backbone),
                                               config.model or DEFAULT_MODEL)
    return problems


def trunk_dilations(net: torch.nn.Module) -> tuple[int, ...]:
    """The dilations of a ResNet-38 trunk's stages b5, b6, b7 (weights do not record them)."""
    return tuple(getattr(net, stage).conv_branch2b1.dilation[0] for stage in ("b5", "b6", "b7"))


def backbone_dilation_problems(backbone: Path, model: str) -> list[str]:
    """A one-line problem when the training run beside ``backbone`` (its train.json) names a
    ResNet-38 whose trunk is dilated otherwise than ``model``'s (e.g. the undilated
    ``edam_tiny`` into ``affinitynet_tiny``): the weights fit, the features they compute would
    not. Nothing to say without a train.json or for an unknown model."""
    report = backbone.parent / classifier_trainer.REPORT
    try:
        source = json.loads(report.read_text())["config"]["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if source not in MODELS or model not in MODELS or MODELS.get(source).family not in (
            "edam", "psa"):
        return []
    with torch.device("meta"):   # the modules' dilations, without allocating their weights
        ours, theirs = (trunk_dilations(create_model(name)) for name in (model, source))
    if ours == theirs:
        return []
    return [f"--backbone {backbone}: its run ({report.name}) trained {source}, whose ResNet-38 "
            f"stages b5-b7 are dilated {theirs}, but {model}'s are {ours}: the copied trunk "
            f"would compute other features (train without --backbone, or from a classifier "
            f"dilated {ours})"]


def train_affinitynet(chosen: Method, config, out: Path, target: torch.device, *,
                      max_steps: Optional[int], workers: int, resume: bool,
                      save_every: Optional[int], progress: bool) -> Path:
    """The ``Method.runner`` of ``affinitynet`` (see the module docstring); ``config`` is a
    resolved ``TrainConfig``. Writes the files of ``train.trainer``; returns the checkpoint."""
    data = open_dataset(config.dataset, config.data, split=config.split, labels=config.labels,
                        classes=config.classes)
    require_images(data)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:   # a new run (or overwrite) recomputes the labels: the CAMs may have changed
        shutil.rmtree(out / SCORES_DIR, ignore_errors=True)
    skipped = prepare_scores(data, Path(config.cams), out / SCORES_DIR, PSA_ALPHAS,
                             workers=workers, progress=progress)
    ids = [id for id in data.ids if id not in skipped]
    if not ids:
        first = next(iter(skipped.items()), ("-", "no images"))
        raise EmptyDataset(f"nothing to train on: no image of {data.root} has la/ha labels "
                           f"({len(skipped)} left out; {first[0]}: {first[1]})")
    images = AffinityTrainingImages(data, out / SCORES_DIR, ids, int(config.crop),
                                    config.color_jitter, config.seed)
    classifier_trainer._seed_everything(config.seed)
    net = create_model(config.model, **config.model_args)
    if config.backbone:
        net.load_backbone(config.backbone)
    net = net.to(target)
    momentum = config.weight_decay if config.momentum is None else config.momentum
    optimizer = torch.optim.SGD(parameter_groups(net, config.weight_decay), lr=config.lr,
                                momentum=momentum)
    steps_per_epoch = batches_per_epoch(len(images), config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    # The classifiers' resumable loop, with PSA's poly schedule and its label-less skips.
    return classifier_trainer.run_loop(
        chosen, config, out, target, data=data, images=images, net=net, optimizer=optimizer,
        total_steps=total_steps, skipped={**dict(data.problems()), **skipped},
        schedule=lambda step: poly_lr(step, total_steps, config.lr), max_steps=max_steps,
        workers=workers, resume=resume, save_every=save_every, progress=progress)


# The tiny model from scratch on the synthetic benchmark: crop 128 (a 16×16 grid).
register_method(Method(
    name="affinitynet", model=DEFAULT_MODEL, loss=affinitynet_loss, preset="edam",
    checkpoint_format="plain",
    description="PSA AffinityNet: la/ha CRF labels, radius-5 pair loss bg/4 + fg/4 + neg/2",
    synthetic_train=dict(crop=128, epochs=8, batch_size=8, lr=0.1),
    runner=train_affinitynet, defaults=PSA_TRAIN, check=config_problems))
