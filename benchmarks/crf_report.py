"""Dense CRF throughput per preset, in this process and over worker processes.

    python -m benchmarks.crf_report            # VOC size 500x375, 3 present classes
    python -m benchmarks.crf_report --quick    # 160x120, a few images (seconds)

Input: a synthetic image (smooth colour blobs plus noise) and three Gaussian-blob CAMs. ``irn``
runs the label CRF on the constant-background labels of the CAMs (τ 0.25, compact label space
as IRN); ``psa``/``edam`` run the probability CRF on ``[(1 - max)^α; cams]`` with their α;
``deeplab`` runs it on a softmax over the same stack. Times are wall clock. The worker column
includes pickling the inputs and starting a pool from the already running fork server; the first
line gives that start, and the cold one that first starts the server (it imports the preloaded
modules, torch included, once per program).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from wsss_fast.postprocess.crf import CRF_PRESETS, crf_inference_label, crf_inference_prob
from wsss_fast.workers import run_in_workers
from wsss_fast.postprocess.pseudo_label import constant_background, power_background


def synthetic_case(height: int, width: int, classes: int = 3, seed: int = 0):
    """uint8 RGB image and (classes, H, W) float32 CAMs in [0, 1] (max-normalized)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)

    def blob():
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        sigma = rng.uniform(0.1, 0.3) * min(height, width)
        return np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma ** 2))

    image = sum(blob()[..., None] * rng.uniform(0, 255, 3) for _ in range(4))
    image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
    cams = np.stack([blob() for _ in range(classes)]).astype(np.float32)
    cams /= cams.max(axis=(1, 2), keepdims=True)
    return image, cams


def job_for(preset: str, image: np.ndarray, cams: np.ndarray) -> tuple:
    """(function, args) of one CRF of this preset on this image."""
    if preset == "irn":
        labels = constant_background(cams, np.arange(len(cams)), 0.25)
        return crf_inference_label, (image, labels, 1 + len(cams), preset)
    if preset == "deeplab":
        logits = 4 * power_background(cams, 1.0)
        probs = np.exp(logits) / np.exp(logits).sum(axis=0)
        return crf_inference_prob, (image, probs.astype(np.float32), preset)
    return crf_inference_prob, (image, power_background(cams, CRF_PRESETS[preset].
                                                       background_power), preset)


def pool_start_s(workers: int) -> float:
    start = time.perf_counter()
    run_in_workers(abs, [(1,)] * workers, workers=workers, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small image, few images")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=None, help="images per preset")
    args = parser.parse_args()
    height, width = (120, 160) if args.quick else (375, 500)
    count = args.images or (4 if args.quick else 12)
    cases = [synthetic_case(height, width, seed=i) for i in range(count)]

    cold, warm = pool_start_s(args.workers), pool_start_s(args.workers)
    print(f"{width}x{height} image, 3 present classes, {count} images per preset, "
          f"{os.cpu_count()} CPUs; {args.workers}-worker pool start (forkserver): "
          f"cold {cold:.2f} s, warm {warm:.2f} s\n")
    print(f"| preset | iterations | ms / image (1 process) | images/s (1 process) "
          f"| images/s ({args.workers} workers) | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for preset in CRF_PRESETS:
        jobs = [job_for(preset, image, cams) for image, cams in cases]
        function = jobs[0][0]
        arguments = [job_args for _, job_args in jobs]
        function(*arguments[0])  # warm-up: library load, first allocation
        start = time.perf_counter()
        for job_args in arguments:
            function(*job_args)
        serial = (time.perf_counter() - start) / count
        start = time.perf_counter()
        results = run_in_workers(function, arguments, workers=args.workers, progress=False)
        pooled = count / (time.perf_counter() - start)
        failed = [r for r in results if not isinstance(r, np.ndarray)]
        if failed:
            raise RuntimeError(f"{preset}: {failed[0]}")
        print(f"| {preset} | {CRF_PRESETS[preset].iterations} | {1000 * serial:.1f} "
              f"| {1 / serial:.2f} | {pooled:.2f} | {pooled * serial:.2f} |")


if __name__ == "__main__":
    main()
