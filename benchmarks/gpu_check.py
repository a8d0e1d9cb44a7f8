"""The GPU check (``make gpu-check``, issue 13 item 6): one command, at most ~8 minutes on one GPU.

    python -m benchmarks.gpu_check                 # everything below; writes benchmarks/results/gpu/report.md
    python -m benchmarks.gpu_check --exact-ieee    # fp32 Triton dots in IEEE fp32 instead of TF32
    python -m benchmarks.gpu_check --goal-only     # only the arithmetic of the GPU goal (no GPU needed)

Steps: build the CUDA library with nvcc for this GPU's arch; run the ``gpu``-marked tests (every
Triton and CUDA face against the reference in fp32, fp16 and bf16; fp32 Triton dots run in TF32
by default, tolerance 3e-3 per DESIGN §10, or IEEE with ``--exact-ieee``: 1e-5); time
``attention_stats`` against SDPA and FlashAttention where installed (fp16/bf16; ViT-S 768², and a
COCO 640×480 image at 4 scales × flip); end-to-end ``extract`` images/s on synthetic COCO-size
images at batch 1/4/16; the same under 2-GPU ``torchrun`` when two GPUs exist. Without a GPU it
prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REPORT = REPO / "benchmarks" / "results" / "gpu" / "report.md"
FP32_DOTS_ENV = "WSSS_FAST_FP32_DOTS"   # read by the Triton kernels: tf32 (GPU default) | ieee

# The goal (issue 13): COCO train2014 with MCTformer-V2 ViT-S, 4 scales × flip, in 15 minutes.
COCO_TRAIN_IMAGES = 82_081
GOAL_SECONDS = 15 * 60
COCO_CLASSES = 80
COCO_SIZE = (480, 640)              # (H, W): the typical COCO image (mean ≈ 484 × 578)
SCALES = (1.0, 0.5, 1.5, 2.0)
VIT_S = dict(depth=12, dim=384, heads=6, patch=16)
# H100 SXM dense peaks (NVIDIA datasheet, without sparsity), TFLOP/s
H100_PEAK = {"bf16/fp16 tensor": 989, "tf32 tensor": 495, "fp32 (no tensor cores)": 67}


# ------------------------------------------------------------------------------ goal arithmetic


def pass_flops(height: int, width: int, classes: int, *, stats_pass: bool) -> dict:
    """FLOPs (2 per multiply-add) of one MCTformer-V2 ViT-S forward on an ``height × width`` input:
    per block qkv 6·T·D², attention q·kᵀ and softmax·v 2·T²·D each, projection 2·T·D², MLP
    16·T·D²; patch embedding, the PatchCAM 3×3 conv head and the P×P affinity refinement.
    ``stats_pass``: our fused kernel's second q·kᵀ per block for the statistics (all blocks'
    patch affinity)."""
    L, D, p = VIT_S["depth"], VIT_S["dim"], VIT_S["patch"]
    patches = (height // p) * (width // p)
    tokens = patches + classes
    linear = L * 24 * tokens * D * D
    attention = L * 4 * tokens * tokens * D
    extra = L * 2 * tokens * tokens * D if stats_pass else 0
    rest = 2 * patches * 3 * p * p * D + 2 * patches * 9 * D * classes + 2 * patches ** 2 * classes
    return {"patches": patches, "tokens": tokens, "linear": linear, "attention": attention,
            "stats": extra, "other": rest, "total": linear + attention + extra + rest}


def goal_arithmetic() -> str:
    height, width = COCO_SIZE
    rows, total, total_ours = [], 0, 0
    for s in SCALES:
        h, w = round(height * s), round(width * s)
        f = pass_flops(h, w, COCO_CLASSES, stats_pass=False)
        ours = pass_flops(h, w, COCO_CLASSES, stats_pass=True)
        total += 2 * f["total"]
        total_ours += 2 * ours["total"]
        rows.append(f"| {s} | {w}×{h} | {f['patches']} | {f['tokens']} | {2 * f['linear'] / 1e9:.1f} "
                    f"| {2 * f['attention'] / 1e9:.1f} | {2 * ours['stats'] / 1e9:.1f} | "
                    f"{2 * f['total'] / 1e9:.1f} |")
    rate = COCO_TRAIN_IMAGES / GOAL_SECONDS
    need = total * rate / 1e12
    need_ours = total_ours * rate / 1e12
    lines = [
        "## The GPU goal, in arithmetic (written without a GPU)", "",
        f"COCO train2014, {COCO_TRAIN_IMAGES:,} images, MCTformer-V2 ViT-S (12 blocks, D 384, "
        f"6 heads of 64, {COCO_CLASSES} class tokens), scales {'/'.join(map(str, SCALES))} × flip "
        f"of a {width}×{height} image, in under {GOAL_SECONDS // 60} minutes on one H100:", "",
        f"* required throughput: {COCO_TRAIN_IMAGES:,} / {GOAL_SECONDS} s = **{rate:.1f} images/s**"
        f" ({1000 / rate:.1f} ms per image, 8 passes);",
        "* FLOPs per pass (2 per multiply-add): per block 24·T·D² (qkv, projection, MLP) + 4·T²·D "
        "(q·kᵀ, softmax·v), ×12 blocks; plus patch embedding, the 3×3 PatchCAM head and the P×P "
        "refinement (2·P²·C); T = P + 80. Image and flip count twice:", "",
        "| scale | input | P | T | linear GFLOP (×2 flip) | attention GFLOP (×2) | "
        "+ our statistics pass GFLOP (×2) | pass total GFLOP (×2, without it) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|", *rows, "",
        f"* per image: **{total / 1e12:.2f} TFLOP** (the dense model work); with our fused "
        f"kernel's second q·kᵀ per block for the all-block affinity statistics "
        f"{total_ours / 1e12:.2f} TFLOP;",
        f"* at {rate:.1f} images/s that is **{need:.0f} TFLOP/s** sustained ({need_ours:.0f} "
        "TFLOP/s with the statistics pass).", "",
        "| H100 SXM dense peak | TFLOP/s | fraction needed (model work) | with the statistics pass |",
        "|---|---:|---:|---:|"]
    lines += [f"| {name} | {peak} | {need / peak:.0%} | {need_ours / peak:.0%} |"
              for name, peak in H100_PEAK.items()]
    lines += ["", "So the goal needs bf16/fp16 tensor cores (about a fifth to a quarter of peak, "
              "which flash-style attention reaches at T ≈ 1,300–4,900), is marginal in TF32 and "
              "out of reach in IEEE fp32. The work is dominated by attention at scale 2.0 "
              "(T ≈ 4,900); decoding and resizing 82k JPEGs (≈ 90 images/s) must overlap with the "
              "GPU (DataLoader workers), and the 8 passes of an image should run as 4 batched "
              "forwards (image + flip)."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ GPU steps


def step_build(log) -> dict:
    import torch

    from wsss_fast import _cuda_build

    nvcc = _cuda_build.find_nvcc()
    if nvcc is None:
        return {"ok": False, "detail": "nvcc not found (set CUDA_HOME or put nvcc on PATH)"}
    major, minor = torch.cuda.get_device_capability()
    out = Path(tempfile.mkdtemp(prefix="wsss-fast-gpu-check-")) / _cuda_build.LIBRARY_NAME
    start = time.perf_counter()
    try:
        _cuda_build.build_library(str(out), archs=(f"{major}{minor}",))
    except subprocess.CalledProcessError as exc:
        return {"ok": False, "detail": f"nvcc failed: {exc}"}
    seconds = time.perf_counter() - start
    log(f"built {out} for sm_{major}{minor} in {seconds:.0f} s")
    return {"ok": True, "detail": f"{nvcc}, sm_{major}{minor}, {seconds:.0f} s", "path": str(out)}


def step_tests(library: str | None, exact_ieee: bool, timeout: int, log) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0", "HF_HUB_OFFLINE": "1",
           FP32_DOTS_ENV: "ieee" if exact_ieee else "tf32"}
    if library:
        env["WSSS_FAST_CUDA_LIB"] = library
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "gpu.xml"
        cmd = [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "summary": f"timed out after {timeout} s", "failures": []}
        seconds = time.perf_counter() - start
        counts = {}
        if junit.exists():
            head = junit.read_text()[:2000]
            for key in ("tests", "failures", "errors", "skipped"):
                m = re.search(rf'{key}="(\d+)"', head)
                counts[key] = int(m.group(1)) if m else 0
    tail = done.stdout.strip().splitlines()
    failures = [line for line in tail if line.startswith(("FAILED", "ERROR"))]
    summary = tail[-1] if tail else done.stderr[-300:]
    log(f"gpu tests: {summary} ({seconds:.0f} s)")
    return {"ok": done.returncode == 0, "summary": summary, "counts": counts,
            "seconds": seconds, "failures": failures[:20]}


def _cuda_time(fn, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs, CUDA events, after 3 warm-ups."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def attention_cases() -> list[tuple[str, list[tuple[int, int]]]]:
    """(name, [(batch, tokens)] of the forwards): ViT-S 768² with VOC's 20 classes; COCO
    640×480 at 4 scales × flip (image and flip batched) with 80 class tokens."""
    p = VIT_S["patch"]
    coco = [(2, (round(COCO_SIZE[0] * s) // p) * (round(COCO_SIZE[1] * s) // p) + COCO_CLASSES)
            for s in SCALES]
    return [("ViT-S 768², C 20 (1 pass)", [(1, (768 // p) ** 2 + 20)]),
            ("COCO 640×480, C 80, 4 scales × flip", coco)]


def step_attention(repeats: int, log) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from wsss_fast import ops

    try:
        from flash_attn import flash_attn_func
    except Exception:  # noqa: BLE001  (not installed, or built for another torch)
        flash_attn_func = None
    heads, d, blocks = VIT_S["heads"], VIT_S["dim"] // VIT_S["heads"], VIT_S["depth"]
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for name, forwards in attention_cases():
            num_cls = 20 if "C 20" in name else COCO_CLASSES
            inputs = [[torch.randn(b, heads, t, d, device="cuda", dtype=dtype) for _ in range(3)]
                      for b, t in forwards]

            def sdpa():
                for q, k, v in inputs:
                    for _ in range(blocks):
                        F.scaled_dot_product_attention(q, k, v)

            def fused():
                for q, k, v in inputs:
                    b, _, t, _ = q.shape
                    stats = ops.AttentionStats.allocate(b, num_cls, t - num_cls, blocks,
                                                        cls2patch_layers=3,
                                                        patch2patch_layers="all", device="cuda")
                    for i in range(blocks):
                        ops.attention_stats(q, k, v, d ** -0.5, num_cls, **stats.block_kwargs(i))

            row = {"dtype": str(dtype).replace("torch.", ""), "case": name,
                   "sdpa": _cuda_time(sdpa, repeats), "attention_stats": _cuda_time(fused, repeats)}
            if flash_attn_func is not None:
                flash_inputs = [[x.transpose(1, 2).contiguous() for x in qkv] for qkv in inputs]

                def flash():
                    for q, k, v in flash_inputs:
                        for _ in range(blocks):
                            flash_attn_func(q, k, v)

                row["flash_attn"] = _cuda_time(flash, repeats)
            log(f"attention {row}")
            rows.append(row)
            inputs.clear()  # free this case's tensors before the next case allocates
            torch.cuda.empty_cache()
    return rows


def step_extract(images: int, batches, dtype: str, log) -> list[dict]:
    from benchmarks.scaling import extract_throughput, synthetic_set

    rows = []
    with tempfile.TemporaryDirectory(prefix="wsss-fast-gpu-check-data-") as scratch:
        data = synthetic_set(Path(scratch) / "coco_size", images, *COCO_SIZE)
        extract_throughput(data, batch_size=1, workers=2, device="cuda", dtype=dtype,
                           images=images)  # warm-up: Triton compiles, cuDNN picks
        for b in batches:
            rate = extract_throughput(data, batch_size=b, workers=4, device="cuda", dtype=dtype,
                                      images=images)
            rows.append({"batch_size": b, "images_per_second": rate, "gpus": 1})
            log(f"extract batch {b}: {rate:.2f} images/s")
        import torch

        if torch.cuda.device_count() >= 2:
            rows.append(step_torchrun(data, images, max(batches), dtype, log))
    return rows


def step_torchrun(data: str, images: int, batch: int, dtype: str, log) -> dict:
    with tempfile.TemporaryDirectory(prefix="wsss-fast-gpu-check-ddp-") as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
               "wsss_fast", "extract", "--data", data, "--split", "train", "--model",
               "mctformer_v2", "--random-init", "--device", "cuda", "--dtype", dtype,
               "--batch-size", str(batch), "--workers", "4", "--out", out, "--quiet"]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - start
    row = {"batch_size": batch, "gpus": 2, "images_per_second": images / seconds,
           "ok": done.returncode == 0, "detail": done.stderr[-500:] if done.returncode else ""}
    log(f"torchrun 2 GPUs: {row['images_per_second']:.2f} images/s, ok={row['ok']}")
    return row


def write_report(path: Path, env: dict, build, tests, attention, extract, exact_ieee) -> None:
    lines = ["# GPU check (`make gpu-check`, `python -m benchmarks.gpu_check`)", ""]
    if env:
        lines += [f"{env['gpu']} ×{env['count']}, torch {env['torch']}, CUDA {env['cuda']}, "
                  f"triton {env['triton']}, {env['host']}; {env['date']}; fp32 Triton dots: "
                  f"{'IEEE (--exact-ieee)' if exact_ieee else 'TF32 (tolerance 3e-3)'}; whole "
                  f"check {env['seconds']:.0f} s.", ""]
        lines += ["## Build and gpu-marked tests", "",
                  f"* nvcc build: {'ok' if build['ok'] else 'FAILED'} — {build['detail']}",
                  f"* `pytest -m gpu`: {'ok' if tests['ok'] else 'FAILED'} — {tests['summary']}"
                  f" {tests.get('counts', '')}"]
        lines += [f"  * {f}" for f in tests.get("failures", [])]
        lines += ["", "## attention_stats against SDPA and FlashAttention (12 blocks, H 6, d 64; "
                  "median of repeats, CUDA events; attention_stats also accumulates class→patch "
                  "of the last 3 and the patch affinity of all 12 blocks)", "",
                  "| dtype | case | SDPA ms | attention_stats ms | / SDPA | flash_attn ms | / flash |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in attention:
            flash = r.get("flash_attn")
            fused = r["attention_stats"]
            lines.append(
                f"| {r['dtype']} | {r['case']} | {r['sdpa'] * 1e3:.2f} | {fused * 1e3:.2f} | "
                f"{fused / r['sdpa']:.2f} | "
                + ("— | — |" if flash is None else f"{flash * 1e3:.2f} | {fused / flash:.2f} |"))
        lines += ["", "## End-to-end `extract` on synthetic COCO-size images (640×480, "
                  "MCTformer-V2 ViT-S random weights, 80 classes not needed: the synthetic set's "
                  f"own, preset scales × flip, dtype {env['dtype']})", "",
                  "| GPUs | --batch-size | images/s |", "|---:|---:|---:|"]
        lines += [f"| {r['gpus']} | {r['batch_size']} | {r['images_per_second']:.2f}"
                  f"{'' if r.get('ok', True) else ' (FAILED: ' + r['detail'][-120:] + ')'} |"
                  for r in extract]
        lines.append("")
    else:
        lines += ["Not run on a GPU yet: no GPU was lent to the session that wrote this file. Run "
                  "`make gpu-check` on a CUDA machine (≤ 8 min); it rewrites this report with the "
                  "build, the gpu-marked tests, the attention and extract benchmarks, and keeps "
                  "the arithmetic below.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + goal_arithmetic())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exact-ieee", action="store_true",
                        help="fp32 Triton dots in IEEE fp32 (default TF32, tolerance 3e-3)")
    parser.add_argument("--goal-only", action="store_true",
                        help="write only the goal arithmetic to the report (no GPU needed)")
    parser.add_argument("--report", default=str(REPORT))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--extract-images", type=int, default=64)
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"),
                        help="dtype of the extract benchmark (default bf16)")
    parser.add_argument("--test-timeout", type=int, default=240)
    args = parser.parse_args(argv)
    if args.goal_only:
        write_report(Path(args.report), {}, None, None, [], [], args.exact_ieee)
        print(f"gpu-check: wrote the goal arithmetic to {args.report}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: skipped: no CUDA device here (torch.cuda.is_available() is False)")
        return 0
    os.environ[FP32_DOTS_ENV] = "ieee" if args.exact_ieee else "tf32"
    log = lambda msg: print(f"gpu-check: {msg}", flush=True)  # noqa: E731
    start = time.perf_counter()
    import triton

    env = {"gpu": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
           "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "dtype": args.dtype}
    build = step_build(log)
    tests = step_tests(build.get("path"), args.exact_ieee, args.test_timeout, log)
    attention = step_attention(args.repeats, log)
    extract = step_extract(args.extract_images, (1, 4, 16), args.dtype, log)
    env["seconds"] = time.perf_counter() - start
    write_report(Path(args.report), env, build, tests, attention, extract, args.exact_ieee)
    log(f"wrote {args.report} ({env['seconds']:.0f} s)")
    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi", "--query-gpu=name,memory.used", "--format=csv"])
    return 0 if build["ok"] and tests["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
