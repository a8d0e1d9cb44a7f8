"""``refine`` over a learned network that computes many images at once (``batch``; PSA's
AffinityNet for ``--preset psa --affinity-checkpoint FILE``), as the ``work`` of the refine job.

Images are read in chunks of ``batch_size``, their side inputs computed (AffinityNet: images of
one size as one batch, on the job's device), then each image is walked and its label written
atomically and journaled, so an interrupted run resumes at the first unfinished image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wsss_fast.pipeline.job import item_failure, item_path, write_outputs

BATCH_SIZE = 8


def learned_batch_work(walk, settings: dict, dataset, cams_dir: Path, outputs, side_inputs, *,
                       batch_size: int = BATCH_SIZE, progress: bool = True,
                       desc: str = "refine"):
    """``work(todo, state)`` for the refine job: ``side_inputs(images) -> [array]`` (the loaded
    network's ``batch``), ``walk(settings, item, image, cam_path, device, side_input=)`` labels
    one image (``refine.refine_one``)."""
    from tqdm import tqdm

    from wsss_fast.data.images import ImageDecodeError, read_image, write_label_png
    device = torch.device(settings["device"])

    def work(todo, state):
        bar = tqdm(total=len(todo), desc=desc, disable=not progress)
        try:
            for start in range(0, len(todo), batch_size):
                chunk, images = [], []
                for item in todo[start: start + batch_size]:
                    cam_path = item_path(cams_dir, item, ".npy")
                    if not cam_path.exists():
                        state.record_skipped(item, f"no CAM file {cam_path}")
                        bar.update()
                        continue
                    try:
                        images.append(read_image(dataset.sample(item).image_path))
                    except ImageDecodeError as error:
                        state.record_skipped(item, str(error))
                        bar.update()
                        continue
                    chunk.append((item, cam_path))
                features = side_inputs(images) if images else []
                for (item, cam_path), image, feature in zip(chunk, images, features):
                    try:
                        label = walk(settings, item, image, cam_path, device,
                                     side_input=feature)
                    except Exception as error:   # noqa: BLE001 (item_failure re-raises run errors)
                        state.record_skipped(item, item_failure(error))
                    else:
                        path = outputs(item)["label"]
                        write_outputs(lambda: write_label_png(path, np.asarray(label, np.uint8)),
                                      path)
                        state.record_done(item, outputs(item))
                    bar.update()
        finally:
            bar.close()

    return work
