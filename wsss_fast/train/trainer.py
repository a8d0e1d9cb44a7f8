"""``train()``: the training loop shared by every method (AdamW, linear warm-up then cosine decay,
optional gradient clipping), resumable and deterministic.

Outputs in ``out_dir`` (each written atomically, at every epoch end, every ``save_every`` steps
and when the run stops):

- ``checkpoint.pth`` — the model in its upstream format (``{'model': sd}`` or a plain ``sd``);
- ``train_state.pth`` — model, optimizer, step, RNG states, loss history and the checksum of the
  checkpoint saved with it: what ``resume`` reads. The two are written as one all-or-nothing
  group, so a full disk keeps the previous pair; a pair torn by a kill between the two renames
  is told by the checksum, and resume then rewrites the checkpoint from the state;
- ``train.json`` — the configuration, per-epoch mean losses (with the training seconds elapsed at
  each epoch's end), final losses, time, skipped images.

The schedule spans ``epochs``; ``max_steps`` only stops the run early (a later call with
``resume=True`` and a larger ``max_steps`` continues it). A run stopped or killed and resumed
gives the same weights as one uninterrupted run with the same settings, whatever ``workers`` is
(the data order and augmentation depend only on the seed, epoch and image index).
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from wsss_fast.data.dataset import require_images
from wsss_fast.data.factory import open_dataset
from wsss_fast.io.atomic import atomic_write_group, atomic_write_json
from wsss_fast.io.checksums import bytes_checksum, file_checksum
from wsss_fast.models.checkpoint import (CheckpointError, describe_load, load_matching,
                                        read_torch_file, torch_file_bytes)
from wsss_fast.models.registry import create_model
from wsss_fast.train.config import TrainConfig
from wsss_fast.train.data import Augmentation, TrainingImages, batches_per_epoch, epoch_loader
from wsss_fast.train.methods import Method, get_method

CHECKPOINT = "checkpoint.pth"
STATE = "train_state.pth"
REPORT = "train.json"
# What train_state.pth must hold; it also records "checkpoint_blake2b", the checksum of the
# checkpoint.pth saved with it (absent in states of older versions).
STATE_KEYS = ("config", "model", "optimizer", "run", "rng")

# Parameters without weight decay besides biases and norms (timm's no_weight_decay set).
NO_DECAY_NAMES = ("cls_token", "pos_embed", "pos_embed_cls", "pos_embed_pat")


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite (usually: the learning rate is too high)."""


def learning_rate(step: int, total_steps: int, warmup_steps: int, lr: float,
                  min_lr: float) -> float:
    """LR of update ``step`` (0-based): linear warm-up ``lr·(step+1)/warmup_steps``, then cosine
    from ``lr`` to ``min_lr`` over the remaining steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, weight_decay: float,
                     scaled: bool = False) -> list[dict]:
    """Weight decay on weight matrices / kernels only (not biases, norms, tokens, pos-embeds).

    ``scaled``: a model with ``trainable_parameters()`` (groups with an ``lr_scale``, e.g. EDAM's
    new layers at 10×) has each of its groups split so, keeping the group's ``lr_scale``; empty
    groups are left out. Without it, or for other models: the two groups [decay, no decay]."""
    names = {id(p): name for name, p in model.named_parameters()}
    if scaled and hasattr(model, "trainable_parameters"):
        sources = [(g["params"], g.get("lr_scale", 1.0)) for g in model.trainable_parameters()]
    else:
        sources = [([p for p in model.parameters()], None)]
    groups = []
    for params, lr_scale in sources:
        decay, no_decay = [], []
        for parameter in params:
            if not parameter.requires_grad:
                continue
            if parameter.ndim <= 1 or names[id(parameter)].split(".")[-1] in NO_DECAY_NAMES:
                no_decay.append(parameter)
            else:
                decay.append(parameter)
        pair = [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]
        if lr_scale is None:
            return pair
        groups += [{**group, "lr_scale": float(lr_scale)} for group in pair if group["params"]]
    return groups


def _resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:N, auto)") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    return device


def _rng_state() -> dict:
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss)}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class _Run:
    """Progress of one training run: what train_state.pth holds besides model and optimizer."""

    def __init__(self):
        self.step = 0
        self.seconds = 0.0
        self.history: list[dict] = []        # one entry per finished epoch
        self.sums: dict[str, float] = {}     # loss terms summed over the current epoch
        self.updates = 0                     # steps with a batch in the current epoch
        self.skipped: dict[str, str] = {}    # image id -> reason

    def state(self) -> dict:
        return {"step": self.step, "seconds": self.seconds, "history": self.history,
                "sums": self.sums, "updates": self.updates, "skipped": self.skipped}

    def load(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def add(self, terms: dict) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.updates += 1

    def close_epoch(self, epoch: int, lr: float) -> None:
        means = {name: total / max(1, self.updates) for name, total in self.sums.items()}
        self.history.append({"epoch": epoch, "step": self.step, "updates": self.updates,
                             "lr": lr, "elapsed": round(self.seconds, 3), **means})
        self.sums, self.updates = {}, 0


def check_out_folder(config: TrainConfig) -> None:
    """ValueError if ``config.out`` holds a run that is neither resumed nor overwritten, or holds
    nothing to resume; writes nothing (checked before the run's lock is taken)."""
    out = Path(config.out)
    if (out / STATE).exists() and not (config.resume or config.overwrite):
        raise ValueError(f"{out} already holds a training run ({STATE}); resume it, choose "
                         f"another output folder, or overwrite it")
    if config.resume and not (out / STATE).exists():
        found = f"{CHECKPOINT} is there without its {STATE}" if (out / CHECKPOINT).exists() \
            else f"no {STATE}"
        raise ValueError(f"nothing to resume in {out} ({found}); start a new run without "
                         f"resume (or with overwrite)")


def train(config: TrainConfig) -> Path:
    """Train ``config.method`` on the images of ``config.data`` (``config.split``) that have
    image-level labels; returns the path of the checkpoint.

    ``config.model`` replaces the method's model (a registry name), ``model_args`` are its
    architecture arguments. ``resume``: continue the run in ``out`` (its fingerprint settings
    must match; ``max_steps``, ``workers``, ``device`` may differ); without it an existing run
    there is an error unless ``overwrite``. ``threads``: torch's intra-op threads during the run
    (default: unchanged); on a CPU shared with other busy processes ``threads=1`` avoids
    OpenMP's waits for descheduled threads, which made 2-thread steps 3-10 times slower than
    1-thread steps on a loaded 2-core machine. Weights are reproducible for the same seed and
    thread count.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"train expects a TrainConfig, got {type(config).__name__}")
    problems = config.problems()
    if problems:
        raise ValueError("train: " + "; ".join(problems))
    chosen = get_method(config.method)
    if chosen.runner is None:
        given = [flag for flag, value in (("--momentum", config.momentum),
                                          ("--ir-labels", config.ir_labels),
                                          ("--backbone", config.backbone)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} do(es) not apply to --method {chosen.name} "
                             f"(AdamW on image-level labels); they are irn's")
    resolved = config.resolved(chosen)
    out = Path(config.out)
    check_out_folder(config)
    if config.overwrite:   # a crash before the first save must not leave the old run to resume
        for name in (STATE, CHECKPOINT, REPORT):
            (out / name).unlink(missing_ok=True)
    target = _resolve_device(config.device)
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        runner = chosen.runner or _run
        return runner(chosen, resolved, out, target, max_steps=config.max_steps,
                    workers=config.workers, resume=config.resume, save_every=config.save_every,
                    progress=not config.quiet)
    finally:
        torch.set_num_threads(previous_threads)


def _run(chosen: Method, config: TrainConfig, out: Path, target: torch.device, *,
         max_steps: Optional[int], workers: int, resume: bool, save_every: Optional[int],
         progress: bool) -> Path:
    data = open_dataset(config.dataset, config.data, split=config.split, labels=config.labels,
                        classes=config.classes)
    require_images(data)
    aug = Augmentation(crop=config.crop, resize_long=config.resize_long,
                       color_jitter=config.color_jitter)
    images = TrainingImages(data, aug, seed=config.seed)
    _seed_everything(config.seed)
    net = create_model(config.model, num_classes=data.num_classes, **config.model_args)
    init_report = None
    if config.init is not None:   # on resume the state's weights replace these
        init_report = load_matching(net, config.init)
        if not resume:
            print(f"wsss-fast train: {describe_load(init_report, config.init)}", file=sys.stderr)
    net = net.to(target)
    optimizer = torch.optim.AdamW(parameter_groups(net, config.weight_decay, scaled=True),
                                  lr=config.lr)
    steps_per_epoch = batches_per_epoch(len(images), config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    skipped = {id: reason for id, reason in data.problems()}
    skipped.update({id: "no image-level labels" for id in images.unlabelled})
    return run_loop(chosen, config, out, target, data=data, images=images, net=net,
                    optimizer=optimizer, total_steps=total_steps, skipped=skipped,
                    schedule=lambda step: learning_rate(step, total_steps, warmup_steps,
                                                        config.lr, config.min_lr),
                    max_steps=max_steps, workers=workers, resume=resume,
                    save_every=save_every, progress=progress, init_report=init_report)


def run_loop(chosen: Method, config: TrainConfig, out: Path, target: torch.device, *, data,
             images, net, optimizer, total_steps: int, schedule: Callable[[int], float],
             skipped: dict, max_steps: Optional[int], workers: int, resume: bool,
             save_every: Optional[int], progress: bool,
             before_last_save: Optional[Callable[[], None]] = None,
             init_report: Optional[dict] = None) -> Path:
    """The resumable loop every method shares: seeded epochs of ``images`` (items ``(id,
    image, target, error)``, see ``TrainingImages``), ``chosen.loss`` per batch
    (``chosen.warm_loss`` in the first ``config.warm_epochs`` epochs), the base learning rate
    ``schedule(step)`` (times each optimizer group's ``lr_scale``, default 1), atomic saves, the
    report. ``before_last_save`` runs once the schedule is complete, before the final save (IRN:
    the displacement mean); ``init_report``: what ``--init`` loaded, for the report."""
    steps_per_epoch = batches_per_epoch(len(images), config.batch_size)
    stop = total_steps if max_steps is None else min(max_steps, total_steps)
    warm_steps = config.warm_epochs * steps_per_epoch   # TrainConfig.problems checked the method
    trunk = _trunk_parameters(net) if config.freeze_trunk else []
    run = _Run()
    run.skipped.update(skipped)
    checkpoint_current = True
    if resume:
        checkpoint_current = _resume(out, config.fingerprint(), net, optimizer, run)

    def save() -> None:
        weights = _cpu_state(net)
        checkpoint = torch_file_bytes(
            {"model": weights} if chosen.checkpoint_format == "wrapped" else weights)
        state = torch_file_bytes({"config": config.fingerprint(), "model": weights,
                                  "optimizer": optimizer.state_dict(), "run": run.state(),
                                  "rng": _rng_state(),
                                  "checkpoint_blake2b": bytes_checksum(checkpoint)})
        atomic_write_group({out / CHECKPOINT: checkpoint, out / STATE: state})
        _write_report(out / REPORT, config, run, data, len(images), total_steps,
                      finished=run.step >= total_steps, init=init_report)

    if not checkpoint_current:   # resumed with a missing or torn checkpoint: the state's weights
        save()
    bar = tqdm(total=stop, initial=min(run.step, stop), desc=f"train {chosen.name}",
               unit="step", dynamic_ncols=True, disable=not progress, file=sys.stderr)
    try:
        while run.step < stop:
            epoch, start_batch = divmod(run.step, steps_per_epoch)
            started = time.perf_counter()
            for batch, batch_labels, failed in epoch_loader(images, config.batch_size, epoch,
                                                            start_batch, workers):
                run.skipped.update({id: error for id, error in failed})
                warm = run.step < warm_steps
                lr_now = schedule(run.step) * (1.0 if warm else config.lr_after_warm)
                if batch is not None:
                    for parameter in trunk:     # per step, so a resumed run freezes it too
                        parameter.requires_grad_(warm)
                    loss = chosen.warm_loss if warm else chosen.loss
                    terms = _step(chosen.name, loss, net, optimizer, batch.to(target),
                                  batch_labels.to(target), lr_now, config.clip_grad, run.step)
                    run.add(terms)
                    bar.set_postfix(loss=f"{terms['loss']:.4f}", lr=f"{lr_now:.2e}")
                run.step += 1
                bar.update(1)
                now = time.perf_counter()
                run.seconds += now - started
                started = now
                end_of_epoch = run.step % steps_per_epoch == 0
                if end_of_epoch:
                    run.close_epoch(epoch, lr_now)
                if run.step >= total_steps and before_last_save is not None:
                    before_last_save()
                if end_of_epoch or run.step >= stop or (save_every and run.step % save_every == 0):
                    save()
                if run.step >= stop:
                    break
    finally:
        bar.close()
    return out / CHECKPOINT


def _trunk_parameters(net) -> list:
    """``TrainConfig.freeze_trunk``: the trunk's parameters that the model trains (a fine-tune
    regime's frozen ones stay frozen). Outside the warm phase they get no gradient, so AdamW
    skips them (no update, no weight decay); BatchNorm still normalizes with batch statistics."""
    if not hasattr(net, "trunk"):
        raise ValueError(f"--freeze-trunk: model {type(net).__name__} does not name its trunk "
                         f"(a trunk() method)")
    return [p for module in net.trunk() for p in module.parameters() if p.requires_grad]


def _step(name: str, loss_fn: Callable, net, optimizer, images, labels, lr: float, clip_grad,
          step: int) -> dict:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    net.train()
    loss, terms = loss_fn(net, images, labels)
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"{name}: the loss is {float(loss)} at step {step} "
                               f"(terms {terms}); lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip_grad)
    optimizer.step()
    return {"loss": float(loss.detach()), **terms}


def _resume(out: Path, fingerprint: dict, net, optimizer, run: _Run) -> bool:
    """Load the state of the run in ``out`` into ``net``, ``optimizer``, ``run`` and the global
    generators; returns whether ``checkpoint.pth`` is the one saved with that state (False: it
    is missing, or newer than the state because a kill tore the pair, and must be rewritten).
    An unreadable state raises ``CheckpointError`` naming the file and the problem."""
    path = out / STATE
    state = read_torch_file(path, "training state", required=STATE_KEYS)
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path}: not a training state ('config' is a "
                              f"{type(state['config']).__name__}, not a dict)")
    _check_resumable(state["config"], fingerprint, out)
    try:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        run.load(state["run"])
        _set_rng_state(state["rng"])
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        detail = " ".join(f"{type(error).__name__}: {error}".split())
        if len(detail) > 300:
            detail = detail[:297] + "..."
        raise CheckpointError(f"{path}: training state does not fit this run ({detail})") \
            from None
    expected = state.get("checkpoint_blake2b")
    checkpoint = out / CHECKPOINT
    if not checkpoint.exists():
        return False
    if expected is not None and file_checksum(checkpoint) != expected:
        print(f"wsss-fast train: {checkpoint} does not match {path} (a run killed while saving "
              f"them); resuming from the state, whose weights replace the checkpoint",
              file=sys.stderr)
        return False
    return True


def _check_resumable(saved: dict, current: dict, out: Path) -> None:
    differences = [f"{key}: {saved.get(key)!r} in the run, {value!r} now"
                   for key, value in current.items() if saved.get(key) != value]
    if differences:
        raise ValueError(f"cannot resume the run in {out} with other settings ("
                         + "; ".join(differences) + ")")


def _write_report(path: Path, config: TrainConfig, run: _Run, data, num_images: int,
                  total_steps: int, finished: bool, init: Optional[dict] = None) -> None:
    atomic_write_json(path, {
        "config": config.fingerprint(),
        "dataset": {"kind": data.name, "root": data.root, "images": num_images,
                    "classes": list(data.class_names)},
        "steps": run.step, "total_steps": total_steps, "finished": finished,
        "seconds": round(run.seconds, 3),
        "epochs": run.history,
        "final": run.history[-1] if run.history else None,   # the last complete epoch
        "partial_epoch": ({name: total / run.updates for name, total in run.sums.items()}
                          if run.updates else None),
        "skipped": [{"id": id, "reason": reason} for id, reason in sorted(run.skipped.items())],
        "init": init,    # load_matching's report of config.init (None: from scratch)
    })
