"""TransCAM (Conformer-S) against the official generator, and the CNN presets against their floor.

    python -m benchmarks.transcam_report --transcam-repo PATH      # official vs ours, + IRN/EDAM
    python -m benchmarks.transcam_report                           # IRN/EDAM only (TransCAM
                                                                   # skipped with a message)
    python -m benchmarks.transcam_report --quick ...               # seconds: tiny models, 1 image

TransCAM: the official ``infer_TransCAM.py`` (liruiwen/TransCAM, from the checkout the user gives;
nothing of it is copied here) runs unmodified in a child process: ``.cuda()`` is made a no-op,
Pillow's removed ``Image.CUBIC`` is mapped to ``BICUBIC`` (the same filter), ``wsss_fast`` is
imported first (so that the pinned CUDA torchvision imports on CPU torch), ``print`` is timed to
cut the loop per image, and ``tool.imutils.crf_inference_label`` is timed so that the CAM time
excludes the two CRF seeds (0.60, 0.25), which are reported on their own line. Ours
(``CamEngine(model, "transcam")``, fp32) runs in another child on the same images, labels and
Conformer-S weights, and its CRF seeds (``postprocess.crf_inference_label``, preset ``irn``) are
timed apart too. Images: synthetic VOC-size scenes saved under VOC train_aug names (the
official dataset reads their labels from its ``voc12/cls_labels.npy``).

IRN-CAM (ResNet-50) and EDAM (ResNet-38): ``CamEngine`` against a plain forward (backbone
features) of the same pass batches, and against the official generators' shape of work: one pass
per forward (image and flip separately), as ``make_cam.py`` / ``infer_cls.py`` run them.

Times: variants alternate in rounds (each a fresh child process), the best round counts (a shared
machine); peak RSS: the growth of VmHWM in the child above what it held before building the model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import PIL.Image
import torch

from benchmarks.memory import peak_growth_mib, reset_peak

SQUARES = (256, 512, 768)
CRF_BACKGROUNDS = (0.60, 0.25)


# --------------------------------------------------------------------------- shared inputs

def conformer_weights(quick: bool, seed: int = 0) -> dict:
    """Conformer-S (or, quick, the golden tiny layout) in upstream's init, with attention made
    non-uniform (qkv ×4) and non-trivial BatchNorm statistics, so that A* and M have structure
    and the two generators' maps can be compared meaningfully."""
    from wsss_fast.models.conformer import transcam_golden_tiny, transcam_small

    torch.manual_seed(seed)
    model = transcam_golden_tiny() if quick else transcam_small()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks():
            block.attn.qkv.weight.mul_(4.0)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=generator)
                m.running_var.uniform_(0.5, 1.5, generator=generator)
        model.conv_cls_head.bias.normal_(0.5, 0.2, generator=generator)
    return model.state_dict()


def write_voc_root(root: str, repo: str, images: int) -> list[str]:
    """``images`` synthetic scenes (VOC sizes) as ``root/JPEGImages/<name>.jpg`` under the first
    names of the repo's train_aug list; returns the names and writes ``root/list.txt``."""
    from wsss_fast.data.synthetic import SyntheticConfig, render_sample

    with open(os.path.join(repo, "voc12", "train_aug.txt")) as f:
        names = [line.split(" ")[0][-15:-4] for line in f.read().splitlines()[:images]]
    os.makedirs(os.path.join(root, "JPEGImages"), exist_ok=True)
    config = SyntheticConfig(image_size=((333, 375), (440, 500)))
    for index, name in enumerate(names):
        sample = render_sample(index, config=config)
        PIL.Image.fromarray(sample.image).save(os.path.join(root, "JPEGImages", name + ".jpg"),
                                               quality=95)
    with open(os.path.join(root, "list.txt"), "w") as f:
        f.writelines(f"/JPEGImages/{name}.jpg\n" for name in names)
    return names


# --------------------------------------------------------------------------- children

def child_official(repo: str, root: str, weights: str, out: str, network: str, arch: str
                   ) -> dict:
    """Run the official infer_TransCAM.py on ``root``'s list; per-image times without CRF."""
    import runpy
    import torch.nn

    import wsss_fast  # noqa: F401  (its _compat makes the CUDA torchvision import on CPU torch)

    sys.path.insert(0, repo)
    os.chdir(repo)                       # voc12/data.py reads 'voc12/cls_labels.npy'
    if not hasattr(PIL.Image, "CUBIC"):
        PIL.Image.CUBIC = PIL.Image.BICUBIC
    marks: dict = {"start": None, "ends": [], "crf": 0.0, "crf_per_image": []}

    def cuda(self, *args, **kwargs):     # model.cuda() comes right after loading the weights
        if marks["start"] is None and isinstance(self, torch.nn.Module):
            marks["baseline"] = reset_peak()
            marks["start"] = time.perf_counter()
        return self

    torch.nn.Module.cuda = cuda
    torch.Tensor.cuda = cuda
    import tool.imutils

    crf = tool.imutils.crf_inference_label

    def timed_crf(*args, **kwargs):
        start = time.perf_counter()
        try:
            return crf(*args, **kwargs)
        finally:
            marks["crf"] += time.perf_counter() - start

    tool.imutils.crf_inference_label = timed_crf

    def result() -> dict:
        ends = [marks["start"]] + marks["ends"]
        crfs = [0.0] + marks["crf_per_image"]
        totals = [b - a for a, b in zip(ends, ends[1:])]
        crf_times = [b - a for a, b in zip(crfs, crfs[1:])]
        return {"cam_s": [t - c for t, c in zip(totals, crf_times)], "crf_s": crf_times,
                "peak_mib": peak_growth_mib(marks["baseline"])}

    def timed_print(*args, **kwargs):    # the loop prints the index at the end of each image
        marks["ends"].append(time.perf_counter())
        marks["crf_per_image"].append(marks["crf"])
        save_progress(out, result())

    sys.argv = ["infer_TransCAM.py", "--weights", weights, "--infer_list",
                os.path.join(root, "list.txt"), "--voc12_root", root, "--out_cam",
                os.path.join(out, "cam"), "--out_crf", os.path.join(out, "crf"), "--network", network,
                "--arch", arch,
                "--method", "transcam"]
    runpy.run_path("infer_TransCAM.py", init_globals={"print": timed_print}, run_name="__main__")
    return result()


def save_progress(out: str, result: dict) -> None:
    """``<out>.json``: the child's figures so far (a run cut short still leaves its images)."""
    with open(out.rstrip("/") + ".json", "w") as f:
        json.dump(result, f)


def child_ours(root: str, names: list[str], weights: str, out: str, quick: bool,
               labels: dict) -> dict:
    from wsss_fast.engine import CamEngine
    from wsss_fast.models import load_checkpoint
    from wsss_fast.models.conformer import transcam_golden_tiny, transcam_small
    from wsss_fast.postprocess.crf import crf_inference_label

    baseline = reset_peak()
    model = transcam_golden_tiny() if quick else transcam_small()
    load_checkpoint(model, weights, strict=True)
    engine = CamEngine(model, "transcam")
    cam_s, crf_s = [], []
    os.makedirs(out, exist_ok=True)
    for name in names:
        start = time.perf_counter()
        image = PIL.Image.open(os.path.join(root, "JPEGImages", name + ".jpg")).convert("RGB")
        cams = engine(image, labels[name]).as_dict()
        cam_s.append(time.perf_counter() - start)
        np.save(os.path.join(out, name + ".npy"), cams)
        start = time.perf_counter()
        pixels = np.asarray(image)
        scores = np.zeros((21,) + pixels.shape[:2], np.float32)
        for key, cam in cams.items():
            scores[key + 1] = cam
        for background in CRF_BACKGROUNDS:      # infer_TransCAM.py's two seeds
            scores[0] = background
            crf_inference_label(pixels, np.argmax(scores, axis=0), 21, "irn")
        crf_s.append(time.perf_counter() - start)
        save_progress(out, {"cam_s": cam_s, "crf_s": crf_s, "peak_mib": peak_growth_mib(baseline)})
    return {"cam_s": cam_s, "crf_s": crf_s, "peak_mib": peak_growth_mib(baseline)}


def cnn_setup(preset: str, quick: bool, size: str = "500x375"):
    from wsss_fast.models.edam import edam, edam_tiny
    from wsss_fast.models.resnet_cam import resnet50_cam, resnet_cam_tiny

    torch.manual_seed(0)
    build = {("irn_cam", False): resnet50_cam, ("irn_cam", True): resnet_cam_tiny,
             ("edam", False): edam, ("edam", True): edam_tiny}[(preset, quick)]
    model = build().eval()
    rng = np.random.default_rng(0)
    width, height = (160, 120) if quick else parse_size(size)
    image = PIL.Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
                                ).resize((width, height), PIL.Image.BILINEAR)
    label = np.zeros(20, np.float32)
    label[[3, 11]] = 1
    return model, image, label


def cnn_run(engine, model, image, label, variant: str):
    batches = list(engine.pass_inputs(image))

    @torch.no_grad()
    def floor():                       # the backbone over the same batches, nothing else
        for batch in batches:
            model.features(batch)

    @torch.no_grad()
    def per_pass():                    # the official shape: one forward per pass and per flip
        for batch in engine.pass_inputs(image):
            for row in range(batch.shape[0]):
                model.cam_maps(batch[row:row + 1])

    return {"engine": lambda: engine(image, label), "floor": floor, "per_pass": per_pass}[variant]


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--cnn-image must be WIDTHxHEIGHT (e.g. 500x375), got {text!r}")
    if width < 32 or height < 32:
        raise SystemExit(f"--cnn-image must be at least 32x32, got {text!r}")
    return width, height


def child_cnn(preset: str, variant: str, quick: bool, size: str) -> dict:
    from wsss_fast.engine import CamEngine

    model, image, label = cnn_setup(preset, quick, size)
    engine = CamEngine(model, preset)
    cnn_run(engine, model, image.resize((64, 48)), label, variant)()   # first-call costs
    run = cnn_run(engine, model, image, label, variant)
    baseline = reset_peak()
    start = time.perf_counter()
    run()
    return {"seconds": time.perf_counter() - start, "peak_mib": peak_growth_mib(baseline)}


# --------------------------------------------------------------------------- parent

def run_child(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.transcam_report", "--child"] + args
    out = subprocess.run(cmd, capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore",
                              "PYTHONPATH": os.pathsep.join(
                                  [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   os.environ.get("PYTHONPATH", "")])})
    if out.returncode:
        raise SystemExit(f"transcam_report: child {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def max_diff(names, ours_dir: str, official_dir: str) -> float:
    worst = 0.0
    for name in names:
        ours = np.load(os.path.join(ours_dir, name + ".npy"), allow_pickle=True).item()
        theirs = np.load(os.path.join(official_dir, name + ".npy"), allow_pickle=True).item()
        if set(ours) != set(theirs):
            raise RuntimeError(f"{name}: classes differ, ours {sorted(ours)} vs {sorted(theirs)}")
        for key in theirs:
            worst = max(worst, float(np.abs(ours[key].astype(np.float64) - theirs[key]).max()))
    return worst


def transcam_section(repo: str, images: int, rounds: int, quick: bool,
                     weights: str | None = None) -> list[str]:
    """The official-vs-ours TransCAM table. ``weights``: a Conformer-S checkpoint (plain or
    ``{'model': ...}`` state dict, e.g. briefly trained) for both sides; without one,
    ``conformer_weights(quick)``."""
    if not os.path.isfile(os.path.join(repo, "infer_TransCAM.py")):
        raise SystemExit(f"--transcam-repo {repo}: no infer_TransCAM.py there (expected a "
                         "checkout of liruiwen/TransCAM)")
    work = tempfile.mkdtemp(prefix="transcam_report_")
    names = write_voc_root(os.path.join(work, "voc"), repo, images)
    labels = np.load(os.path.join(repo, "voc12", "cls_labels.npy"), allow_pickle=True).item()
    label_file = os.path.join(work, "labels.npy")
    np.save(label_file, {name: labels[name] for name in names})
    if weights is None:
        state = conformer_weights(quick)
    else:   # infer_TransCAM.py loads a plain state dict
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("model", state)
    torch.save(state, os.path.join(work, "weights.pth"))
    if quick:                       # a module the official script can import Net_golden_tiny from
        with open(os.path.join(work, "tiny_net.py"), "w") as f:
            f.write("import network.conformer\n"
                    "def Net_golden_tiny():\n"
                    "    return network.conformer.Net(patch_size=16, channel_ratio=1, "
                    "embed_dim=64, depth=6, num_heads=2, mlp_ratio=4, qkv_bias=True, "
                    "num_classes=21)\n")
    best = {"official": None, "ours": None}
    for round_index in range(rounds):
        for variant in ("official", "ours"):
            out = os.path.join(work, f"{variant}_{round_index}")
            common = ["--work", work, "--out", out, "--names", ",".join(names)]
            common += ["--quick"] if quick else []
            result = run_child([variant, "--transcam-repo", repo] + common)
            result["out"] = out
            mean = float(np.mean(result["cam_s"]))
            if best[variant] is None or mean < best[variant]["cam_mean"]:
                best[variant] = {**result, "cam_mean": mean,
                                 "crf_mean": float(np.mean(result["crf_s"]))}
    diff = max_diff(names, best["ours"]["out"], os.path.join(best["official"]["out"], "cam"))
    off, ours = best["official"], best["ours"]
    model = "Conformer tiny (golden layout)" if quick else "Conformer-S"
    model += (f", weights `{os.path.basename(weights)}`" if weights
              else ", structured random weights")
    lines = ["## TransCAM: official `infer_TransCAM.py` vs `CamEngine(model, \"transcam\")`", "",
             f"{model}, {images} synthetic VOC-size images, squares {SQUARES} x flip, fp32, "
             f"{torch.get_num_threads()} threads, best of {rounds} interleaved rounds "
             f"(mean over images). Max |ours - official| over the saved CAM dicts: {diff:.2e}.",
             "", "| | official | ours | official / ours |", "|---|---:|---:|---:|",
             f"| CAMs, s/image (CRF excluded) | {off['cam_mean']:.2f} | {ours['cam_mean']:.2f} | "
             f"**{off['cam_mean'] / ours['cam_mean']:.2f}x** |",
             f"| two CRF seeds, s/image | {off['crf_mean']:.2f} | {ours['crf_mean']:.2f} | "
             f"{off['crf_mean'] / max(ours['crf_mean'], 1e-9):.2f}x |",
             f"| peak RSS growth, MiB | {off['peak_mib']:.0f} | {ours['peak_mib']:.0f} | "
             f"{off['peak_mib'] / max(ours['peak_mib'], 1):.1f}x |", ""]
    return lines


def cnn_section(rounds: int, quick: bool, size: str) -> list[str]:
    width, height = (160, 120) if quick else parse_size(size)
    lines = ["## IRN-CAM and EDAM: `CamEngine` against a plain forward of the same passes", "",
             f"Random weights, one {width}x{height} image ({'tiny' if quick else 'full-size'} "
             "models: ResNet-50 IRN classifier, ResNet-38 EDAM), scales "
             "(1.0, 0.5, 1.5, 2.0) x flip, fp32; floor = the backbone's features over the "
             "engine's pass batches (image and flip batched); per-pass = the CAM forward one "
             "pass and one flip at a time, as the official make_cam.py / infer_cls.py run them.",
             "", "| preset | floor (s) | engine (s) | engine / floor | per-pass (s) | "
             "per-pass / engine | engine peak RSS (MiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for preset in ("irn_cam", "edam"):
        best = {}
        for _ in range(rounds):
            for variant in ("floor", "engine", "per_pass"):
                result = run_child(["cnn", "--preset", preset, "--variant", variant,
                                    "--cnn-image", size] + (["--quick"] if quick else []))
                if variant not in best or result["seconds"] < best[variant]["seconds"]:
                    best[variant] = result
        floor, engine, per_pass = best["floor"], best["engine"], best["per_pass"]
        lines.append(f"| {preset} | {floor['seconds']:.2f} | {engine['seconds']:.2f} | "
                     f"**{engine['seconds'] / floor['seconds']:.2f}** | "
                     f"{per_pass['seconds']:.2f} | {per_pass['seconds'] / engine['seconds']:.2f} | "
                     f"{engine['peak_mib']:.0f} |")
    return lines + [""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transcam-repo", help="a checkout of liruiwen/TransCAM (not copied)")
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny models, one image")
    parser.add_argument("--skip-cnn", action="store_true", help="TransCAM only")
    parser.add_argument("--cnn-image", default="500x375", help="IRN/EDAM image size, WxH")
    parser.add_argument("--output", help="also write the report (markdown) here")
    parser.add_argument("--child", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--names", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "official":
        network, arch = ("tiny_net", "golden_tiny") if args.quick else ("network.conformer_CAM",
                                                                        "sm")
        if args.quick:
            sys.path.insert(0, args.work)
        result = child_official(os.path.abspath(args.transcam_repo), os.path.join(args.work, "voc"),
                                os.path.join(args.work, "weights.pth"), args.out, network, arch)
        print(json.dumps(result))
        return 0
    if args.child == "ours":
        labels = np.load(os.path.join(args.work, "labels.npy"), allow_pickle=True).item()
        print(json.dumps(child_ours(os.path.join(args.work, "voc"), args.names.split(","),
                                    os.path.join(args.work, "weights.pth"), args.out, args.quick,
                                    labels)))
        return 0
    if args.child == "cnn":
        print(json.dumps(child_cnn(args.preset, args.variant, args.quick, args.cnn_image)))
        return 0
    if args.images < 1 or args.rounds < 1:
        parser.error("--images and --rounds must be >= 1")
    images = 1 if args.quick else args.images
    lines = ["# TransCAM and CNN CAM presets, side by side", "",
             f"`python -m benchmarks.transcam_report {' '.join(argv or sys.argv[1:])}`; "
             f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.", ""]
    if args.transcam_repo:
        lines += transcam_section(args.transcam_repo, images, args.rounds, args.quick)
    else:
        print("transcam_report: no --transcam-repo given, skipping the official TransCAM "
              "comparison", file=sys.stderr)
    if not args.skip_cnn:
        lines += cnn_section(args.rounds, args.quick, args.cnn_image)
    report = "\n".join(lines)
    print(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
