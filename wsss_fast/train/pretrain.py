"""Multi-label classification pretraining of a family's tiny backbone on the procedural source
domain (``wsss_fast.data.source_domain``): the role ImageNet pretraining plays for the methods'
published backbones.

A *family* is the small model that several methods share (``PRETRAIN_FAMILIES``); pretraining
trains that model, with its own classification loss, on freshly rendered source images (step
``s`` sees images ``s·B … s·B + B - 1`` of the "train" stream, so no two steps share an image and
a resumed run sees exactly what an uninterrupted one would). The result is one file:
``{"model": fp16 state dict of the trained tensors, "pretrain": {family, model, steps, seed,
val_map, minutes, ...}}``,
which ``wsss-fast train --init FILE`` loads into any method of the family
(``wsss_fast.models.checkpoint.load_matching``). While it runs, ``FILE.state.pth`` holds the
resumable state (weights, optimizer, step, RNG), written atomically every ``save_every`` steps;
it is removed once FILE is written.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from wsss_fast.data.source_domain import NUM_SOURCE_CLASSES, SOURCE_SIZE, source_batch
from wsss_fast.io.atomic import atomic_write_bytes, atomic_write_group
from wsss_fast.io.interrupts import die_with_parent
from wsss_fast.models.checkpoint import CheckpointError, read_torch_file, torch_file_bytes
from wsss_fast.models.registry import MODELS, create_model
from wsss_fast.options import (Number, device_name, fingerprint_fields, nonneg_float, option,
                               option_problems, path_or_none, positive_float, positive_int,
                               seed_int, worker_count)
from wsss_fast.train.trainer import (TrainingDiverged, _resolve_device, _rng_state,
                                     _seed_everything, _set_rng_state, learning_rate,
                                     parameter_groups)


def _conformer_logits(model, images):
    conv_logits, trans_logits = model(images)
    return (conv_logits + trans_logits)[:, 1:]


def _mask_layer_logits(model, images):
    """ResNet-38 (EDAM's trunk): GAP of the DA layer's raw class maps (its last channel is the
    background). Pretraining through EDAM's pairwise CMA would cost 3× more per step and the CMA
    heads are per class, so never transferable."""
    return model.class_map_logits(images)


@dataclass(frozen=True)
class PretrainFamily:
    model: str                 # the registry model pretrained (and the methods' small model)
    logits: Callable           # logits(model, images) -> (B, K) classification logits
    method_families: tuple     # ModelEntry.family values whose models start from this one


def _plain_logits(model, images):
    return model(images)


PRETRAIN_FAMILIES = {
    "vit": PretrainFamily("token_cam_tiny", _plain_logits,
                          ("token_cam", "mctformer_v1", "mctformer_v2", "mctformer_plus",
                           "mctformer_v2_doei")),
    "conformer": PretrainFamily("transcam_tiny", _conformer_logits, ("transcam",)),
    "resnet": PretrainFamily("resnet_cam_tiny", _plain_logits, ("irn_cam",)),
    "resnet38": PretrainFamily("edam_tiny", _mask_layer_logits, ("edam",)),
}


def family_of_model(model: str) -> str:
    """The pretraining family whose backbone fits registry model ``model``."""
    method_family = MODELS.get(model).family
    for name, family in PRETRAIN_FAMILIES.items():
        if method_family in family.method_families:
            return name
    raise ValueError(f"model {model!r} (family {method_family}) has no pretraining family; "
                     f"known: {', '.join(PRETRAIN_FAMILIES)}")


STEPS = Number(integer=True, minimum=1, maximum=10_000_000)
IMAGES = Number(integer=True, minimum=8, maximum=100_000)


@dataclass
class PretrainConfig:
    family: Optional[str] = option(None, "backbone family", choices=tuple(PRETRAIN_FAMILIES))
    out: Optional[str] = option(None, "checkpoint file to write", fingerprint=False)
    steps: int = option(600, "optimizer steps (each on a fresh batch of source images)",
                        check=STEPS)
    batch_size: int = option(16, check=positive_int)
    lr: float = option(1e-3, "peak learning rate (AdamW)", check=positive_float)
    min_lr: float = option(1e-5, check=nonneg_float)
    weight_decay: float = option(0.05, check=nonneg_float)
    warmup_steps: int = option(20, check=Number(integer=True, minimum=0))
    size: int = option(SOURCE_SIZE, "source image side, pixels",
                       check=Number(integer=True, minimum=32, maximum=1024))
    seed: int = option(0, check=seed_int)
    val_images: int = option(256, "source-domain validation images (mAP)", check=IMAGES)
    save_every: int = option(50, "save the resumable state every N steps", fingerprint=False,
                             check=positive_int)
    resume: bool = option(False, "continue from OUT.state.pth", fingerprint=False)
    overwrite: bool = option(False, "start afresh even if OUT or its state exists",
                             fingerprint=False)
    device: str = option("cpu", "cpu, cuda, cuda:N or auto", fingerprint=False,
                         check=device_name)
    workers: int = option(1, "processes rendering batches ahead (0: in this process; no "
                          "effect on results)", fingerprint=False, check=worker_count)
    threads: Optional[int] = option(None, "torch threads (default: torch's)", fingerprint=False,
                                    check=positive_int)
    quiet: bool = option(False, "no progress bar", fingerprint=False)

    def __post_init__(self):
        self.out = path_or_none(self.out)

    def problems(self) -> list[str]:
        problems = [f"{name} is required" for name in ("family", "out")
                    if getattr(self, name) in (None, "")] + option_problems(self)
        if self.resume and self.overwrite:
            problems.append("resume and overwrite exclude each other")
        return problems

    def fingerprint(self) -> dict:
        return {name: getattr(self, name) for name in fingerprint_fields(type(self))}


def state_path(out) -> Path:
    return Path(f"{out}.state.pth")


def _worker_init(_worker_id: int) -> None:
    die_with_parent()


class _Batches(torch.utils.data.Dataset):
    """Item ``s``: the batch of step ``s`` (rendered in a worker when there are any)."""

    def __init__(self, config: PretrainConfig, first_step: int):
        self.config, self.first_step = config, first_step

    def __len__(self):
        return self.config.steps - self.first_step

    def __getitem__(self, item):
        step = self.first_step + item
        c = self.config
        return source_batch(step * c.batch_size, c.batch_size, seed=c.seed, stream="train",
                            size=c.size)


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class AP ``(K,)`` (mean precision at each positive, ties broken by order; NaN for a
    class without positives)."""
    aps = np.full(scores.shape[1], np.nan)
    for k in range(scores.shape[1]):
        order = np.argsort(-scores[:, k], kind="stable")
        hits = targets[order, k] > 0
        if hits.any():
            precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
            aps[k] = float(precision[hits].mean())
    return aps


@torch.no_grad()
def validation_map(model, family: PretrainFamily, config: PretrainConfig,
                   device: torch.device) -> float:
    """Mean AP over the source classes on the first ``val_images`` images of the "val" stream."""
    model.eval()
    scores, targets = [], []
    for start in range(0, config.val_images, 64):
        images, labels = source_batch(start, min(64, config.val_images - start), seed=config.seed,
                                      stream="val", size=config.size)
        scores.append(family.logits(model, images.to(device)).float().cpu().numpy())
        targets.append(labels.numpy())
    return float(np.nanmean(average_precision(np.concatenate(scores), np.concatenate(targets))))


def pretrain(config: PretrainConfig, command: Optional[str] = None) -> dict:
    """Run (or resume) the pretraining of ``config``; writes ``config.out`` and returns its
    ``"pretrain"`` record. ``command``: the command line recorded in it."""
    if not isinstance(config, PretrainConfig):
        raise ValueError(f"pretrain expects a PretrainConfig, got {type(config).__name__}")
    problems = config.problems()
    if problems:
        raise ValueError("pretrain: " + "; ".join(problems))
    out, state_file = Path(config.out), state_path(config.out)
    if config.overwrite:
        for path in (out, state_file):
            path.unlink(missing_ok=True)
    elif out.exists():
        raise ValueError(f"{out} exists; choose another file or overwrite it")
    if state_file.exists() and not (config.resume or config.overwrite):
        raise ValueError(f"{state_file} holds an unfinished pretraining run; resume it or "
                         f"overwrite it")
    if config.resume and not state_file.exists():
        raise ValueError(f"nothing to resume: {state_file} does not exist")
    family = PRETRAIN_FAMILIES[config.family]
    device = _resolve_device(config.device)
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, family, out, state_file, device, command)
    finally:
        torch.set_num_threads(previous_threads)


def _run(config, family, out: Path, state_file: Path, device, command) -> dict:
    _seed_everything(config.seed)
    net = create_model(family.model, num_classes=NUM_SOURCE_CLASSES).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(net, config.weight_decay), lr=config.lr)
    step, seconds, history = 0, 0.0, []
    if config.resume:
        state = read_torch_file(state_file, "pretraining state",
                                required=("config", "model", "optimizer", "step", "rng"))
        differences = [f"{k}: {state['config'].get(k)!r} in the run, {v!r} now"
                       for k, v in config.fingerprint().items() if state["config"].get(k) != v]
        if differences:
            raise ValueError(f"cannot resume {state_file} with other settings ("
                             + "; ".join(differences) + ")")
        try:
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as error:
            raise CheckpointError(f"{state_file}: state does not fit this run "
                                  f"({str(error).splitlines()[0]})") from None
        _set_rng_state(state["rng"])
        step, seconds, history = state["step"], state.get("seconds", 0.0), state.get("history", [])

    def save_state() -> None:
        atomic_write_group({state_file: torch_file_bytes({
            "config": config.fingerprint(), "step": step, "seconds": seconds,
            "history": history, "rng": _rng_state(),
            "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "optimizer": optimizer.state_dict()})})

    loader = torch.utils.data.DataLoader(_Batches(config, step), batch_size=None, shuffle=False,
                                         num_workers=config.workers,
                                         worker_init_fn=_worker_init,
                                         prefetch_factor=2 if config.workers else None)
    bar = tqdm(total=config.steps, initial=step, desc=f"pretrain {config.family}", unit="step",
               dynamic_ncols=True, disable=config.quiet, file=sys.stderr)
    running = None
    try:
        started = time.perf_counter()
        for images, labels in loader:
            lr = learning_rate(step, config.steps, config.warmup_steps, config.lr, config.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            net.train()
            logits = family.logits(net, images.to(device))
            loss = F.multilabel_soft_margin_loss(logits.float(), labels.to(device))
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"pretrain {config.family}: the loss is {float(loss)} "
                                       f"at step {step}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            value = float(loss.detach())
            running = value if running is None else 0.95 * running + 0.05 * value
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}")
            now = time.perf_counter()
            seconds += now - started
            started = now
            if step % config.save_every == 0 or step == config.steps:
                history.append({"step": step, "loss": round(running, 5),
                                "seconds": round(seconds, 1)})
                save_state()
    finally:
        bar.close()
    val_map = validation_map(net, family, config, device)
    record = {"family": config.family, "model": family.model, "steps": config.steps,
              "seed": config.seed, "val_map": round(val_map, 4),
              "minutes": round(seconds / 60, 2), "source_classes": NUM_SOURCE_CLASSES,
              "settings": config.fingerprint(), "command": command, "history": history}
    # Only what pretraining trained: parameters the loss never reached (EDAM's per-class CMA,
    # off the classification path) would pass for pretrained weights in train --init's report.
    untrained = {name for name, p in net.named_parameters() if p.grad is None}
    weights = {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu())
               for k, v in net.state_dict().items() if k not in untrained}
    atomic_write_bytes(out, torch_file_bytes({"model": weights, "pretrain": record}))
    state_file.unlink(missing_ok=True)
    return record


def read_pretrain_record(path) -> dict:
    """The ``"pretrain"`` record of a checkpoint written by ``pretrain`` (CheckpointError if it
    is not one)."""
    payload = read_torch_file(path, "pretrained checkpoint", required=("model", "pretrain"))
    return payload["pretrain"]




# The backbones shipped with the repository (`make pretrain` writes them; MANIFEST.json says how).
PRETRAINED_DIR = Path(__file__).resolve().parents[2] / "pretrained"


def shipped_backbone(model: str) -> Path:
    """The shipped pretrained checkpoint that fits registry model ``model`` (FileNotFoundError
    naming ``make pretrain`` when it is absent)."""
    path = PRETRAINED_DIR / f"{family_of_model(model)}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"pretrained backbone {path} not found; run `make pretrain` to "
                                f"build it (or use the demo's --from-scratch)")
    return path


MANIFEST = "MANIFEST.json"


def write_manifest(folder) -> Path:
    """``folder/MANIFEST.json``: for each pretrained checkpoint there, its record (command, seed,
    steps, minutes, source-domain validation mAP), size and checksum."""
    from wsss_fast.io.atomic import atomic_write_json
    from wsss_fast.io.checksums import file_checksum
    folder = Path(folder)
    entries = {}
    for path in sorted(folder.glob("*.pt")):
        record = read_pretrain_record(path)
        entries[path.name] = {**{k: v for k, v in record.items() if k != "history"},
                              "bytes": path.stat().st_size, "blake2b": file_checksum(path),
                              "loss_history": record.get("history", [])}
    atomic_write_json(folder / MANIFEST, {
        "generator": "wsss_fast.data.source_domain", "storage": "fp16 state dicts",
        "regenerate": "make pretrain PRETRAIN_FLAGS=--overwrite", "checkpoints": entries})
    return folder / MANIFEST
