"""Speed of hemaseg on this machine, side by side with the original write-up's network and loop.

    python benchmarks/speed.py           # ~5-10 min on 2 CPU cores
    python benchmarks/speed.py --quick   # ~1-2 min: 256 px only, fewer repeats

(a) inference: ms per image at batch 1 / 8 / 16, 256 and 512 px, for the reference SeedUnet (eager,
    network only) and for hemaseg with every backend: the network alone, and the whole predict path
    (Predictor.predict_proba_batch: letterbox + normalise + network + sigmoid + unletterbox);
(b) training: images/s end to end (data loading + augmentation + step) of hemaseg's fit() against a
    plain loop like the write-up's (PIL decode of every PNG every step, a random 256 px crop per sample,
    eager fp32 SeedUnet + BCE, Adam) on the same synthetic scans;
(c) peak memory: max RSS of a fresh process doing one variant (inference at 512 px batch 16; 3 training
    steps), so variants do not inherit each other's peaks.

Compared variants run interleaved, round after round, and each figure is the median over rounds, so
a busy shared machine slows all of them alike; the load average is recorded with the results.
% of peak uses 1.52 GFLOP (forward) and 4.55 GFLOP (forward + backward) per 256 px image, scaled by
pixel count, against --peak-gflops (FP32 peak of the cores used; 166 for 2 Zen 4 cores).
Prints one table and writes benchmarks/results/speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# as the hemaseg CLI does (cli.main): idle OpenMP threads sleep, so a busy shared CPU does not collapse
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # after the OpenMP setting, which is read when torch loads
import torch

ROOT = Path(__file__).resolve().parents[1]
# the write-up's network; HEMASEG_REFERENCE_DIR points elsewhere (e.g. a copy carried to a GPU machine)
REFERENCE = Path(os.environ.get("HEMASEG_REFERENCE_DIR", ROOT.parent / "shared" / "reference"))
FWD_GFLOP_256, TRAIN_GFLOP_256 = 1.52, 4.55


def load_reference():
    sys.path.insert(0, str(REFERENCE))
    from seed_unet import SeedUnet  # lives outside the package, on purpose

    return SeedUnet


def trained_like_seed_model() -> torch.nn.Module:
    """The seed UNet with non-trivial BN statistics (as after training), so conv+BN folding is real."""
    from hemaseg.models.unet import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig()).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


DEVICE = torch.device("cpu")  # --device


def backend_names() -> list[str]:
    from hemaseg.inference.backends import bf16_supported

    names = ["torch", "torch-fast"] + (["onnxruntime"] if DEVICE.type == "cpu" else [])  # ORT runs on the CPU
    return names + (["torch-bf16"] if bf16_supported(DEVICE) else [])


def rss_mb() -> float:
    """Peak RSS of this process in MB. VmHWM, because getrusage's ru_maxrss survives fork + exec on
    Linux, so a child started by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- (a) inference -------------------------------------------------------------------------------------


def inference_runners(size: int, batch: int, only: str | None = None) -> dict:
    """name -> zero-argument callable doing one batch; all built before timing starts. `only`:
    "reference" or one backend's network alone (for the memory probe)."""
    from hemaseg.inference.backends import make_backend
    from hemaseg.config import DataConfig, RunConfig
    from hemaseg.inference.predictor import Predictor

    ref = load_reference()().eval().to(DEVICE)
    model = trained_like_seed_model()
    x = torch.randn(batch, 1, size, size, device=DEVICE)
    rng = np.random.default_rng(0)
    # raw scans of another aspect ratio, so the predict path really resizes, pads and maps back
    scans = [rng.integers(0, 255, (size * 3 // 4, size), dtype=np.uint8) for _ in range(batch)]
    config = RunConfig(data=DataConfig(size=size))

    def no_grad(fn):
        def run():
            with torch.inference_mode():
                out = fn(x)
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()  # time the work, not the kernel launches
            return out
        return run

    if only == "reference":
        return {"reference (eager)": no_grad(ref)}
    if only:
        return {f"{only} network": no_grad(make_backend(model, only, DEVICE))}
    runners = {"reference (eager)": no_grad(ref)}
    for name in backend_names():
        runners[f"{name} network"] = no_grad(make_backend(model, name, DEVICE))
        predictor = Predictor(model, config, device=DEVICE, backend=name)
        runners[f"{name} predict path"] = lambda p=predictor: p.predict_proba_batch(scans, batch_size=batch)
    return runners


def time_interleaved(runners: dict, rounds: int, reps: int) -> dict[str, float]:
    """Median seconds per call: every round runs each variant `reps` times, variants taking turns."""
    for fn in runners.values():  # warm-up: oneDNN primitive creation, ORT arena
        fn()
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_inference(sizes, batches, rounds, reps, peak) -> list[dict]:
    rows = []
    for size in sizes:
        for batch in batches:
            runners = inference_runners(size, batch)
            times = time_interleaved(runners, rounds, reps)
            base = times["reference (eager)"] / batch
            gflop = FWD_GFLOP_256 * (size / 256) ** 2
            for name, sec in times.items():
                ms = 1e3 * sec / batch
                rows.append({"size": size, "batch": batch, "variant": name, "ms_per_image": round(ms, 2),
                             "images_per_s": round(1e3 / ms, 1), "speedup_vs_reference": round(base * 1e3 / ms, 2),
                             "pct_fp32_peak": round(100 * gflop / (ms / 1e3) / peak, 1)})
            print(f"  inference {size} px batch {batch}: done", flush=True)
    return rows


# --- (b) training --------------------------------------------------------------------------------------


def original_style_epochs(data: Path, epochs: int, batch: int, crop: int, seed: int = 0,
                          workers: int = 0) -> list[float]:
    """The write-up's loop: PNGs decoded with PIL every step, a random crop per sample, eager fp32
    SeedUnet (sigmoid) + BCE, Adam. Returns seconds per epoch."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    class PngCrops(Dataset):
        def __init__(self, root: Path):
            self.images = sorted((root / "images").glob("*.png"))
            self.rng = np.random.default_rng(seed)

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            image = np.asarray(Image.open(self.images[i]).convert("L"), np.float32) / 255
            mask = np.asarray(Image.open(self.images[i].parent.parent / "mask" / self.images[i].name), np.float32)
            top, left = (int(self.rng.integers(0, s - crop + 1)) for s in image.shape)
            window = (slice(top, top + crop), slice(left, left + crop))
            return torch.from_numpy(image[window].copy())[None], torch.from_numpy(mask[window] > 127).float()[None]

    torch.manual_seed(seed)
    model = load_reference()().train().to(DEVICE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCELoss()
    loader = DataLoader(PngCrops(data), batch_size=batch, shuffle=True, drop_last=True, num_workers=workers)
    out = []
    for _ in range(epochs):
        t = time.perf_counter()
        for x, y in loader:
            loss = loss_fn(model(x.to(DEVICE)), y.to(DEVICE))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def hemaseg_epochs(data: Path, out: Path, epochs: int, batch: int, size: int, precision: str,
                   workers: int = 0) -> tuple[list[float], int]:
    """hemaseg's fit() (cached letterboxed scans, MONAI augmentation, validation and checkpoints
    included). Returns (seconds per epoch, training images per epoch)."""
    from hemaseg.config import DataConfig, RunConfig, TrainConfig
    from hemaseg.training.train import fit

    cfg = RunConfig(data=DataConfig(root=str(data), size=size, val_fraction=0.1),
                    train=TrainConfig(epochs=epochs, batch_size=batch, device=str(DEVICE), precision=precision,
                                      num_workers=workers))
    summary = fit(cfg, out, progress=False)
    rows = (out / "metrics.csv").read_text().strip().splitlines()[1:]
    seconds = [float(r.split(",")[4]) for r in rows]
    return seconds, (summary["n_train"] // batch) * batch


def bench_training(n_scans, epochs, rounds, batch, peak, workdir: Path, workers: int = 0) -> tuple[list[dict], dict]:
    from hemaseg.inference.backends import bf16_supported
    from hemaseg.data.synth import write_synthetic_dataset

    data = write_synthetic_dataset(workdir / "data", n_scans, size=320, seed=0, progress=False)
    n_orig = (n_scans // batch) * batch
    variants = {"original-style loop (fp32)": lambda r: (original_style_epochs(data, epochs, batch, 256,
                                                                                workers=workers), n_orig)}
    precisions = ["fp32"] + (["bf16"] if bf16_supported(DEVICE) else [])
    for p in precisions:
        variants[f"hemaseg fit ({p})"] = lambda r, p=p: hemaseg_epochs(data, workdir / f"run_{p}_{r}", epochs,
                                                                        batch, 256, p, workers)
    per_round: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        for name, fn in variants.items():
            seconds, n = fn(r)
            per_round[name].append(n / statistics.median(seconds[1:]))  # epoch 1 pays one-off warm-up
        print(f"  training round {r + 1}/{rounds}: done", flush=True)
    base = statistics.median(per_round["original-style loop (fp32)"])
    rows = []
    for name, values in per_round.items():
        ips = statistics.median(values)
        rows.append({"variant": name, "images_per_s": round(ips, 2), "speedup_vs_original": round(ips / base, 2),
                     "pct_fp32_peak": round(100 * TRAIN_GFLOP_256 * ips / peak, 1),
                     "per_round": [round(v, 2) for v in values]})
    return rows, {"data": str(data), "n_scans": n_scans, "scan_size": 320, "train_size": 256, "batch": batch,
                  "epochs_per_round": epochs, "loader_workers": workers}


# --- (c) peak memory, each variant in a fresh process ------------------------------------------------

def memory_child(variant: str, data: str) -> None:
    """Run one variant briefly and print its peak RSS (MB) and the RSS right after imports/setup."""
    if variant.startswith("infer:"):
        name = variant.split(":", 1)[1]
        (run,) = inference_runners(512, 16, only=name).values()
        setup = rss_mb()
        run()
    else:
        from hemaseg.config import DataConfig, RunConfig, TrainConfig
        from hemaseg.training.train import fit

        setup = rss_mb()
        if variant == "train:original":
            original_style_epochs(Path(data), 1, 8, 256)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = RunConfig(data=DataConfig(root=data, size=256, val_fraction=0.1),
                                train=TrainConfig(epochs=1, batch_size=8, device="cpu",
                                                  precision=variant.split(":")[1]))
                fit(cfg, Path(tmp) / "run", progress=False)
    print(json.dumps({"peak_rss_mb": round(rss_mb(), 1), "setup_rss_mb": round(setup, 1)}))


def bench_memory(data: Path) -> list[dict]:
    from hemaseg.inference.backends import bf16_supported

    variants = ["infer:reference"] + [f"infer:{n}" for n in backend_names()] + ["train:original", "train:fp32"]
    variants += ["train:bf16"] if bf16_supported(torch.device("cpu")) else []
    rows = []
    for v in variants:
        out = subprocess.run([sys.executable, __file__, "--memory-child", v, "--data", str(data)],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append({"variant": v, **json.loads(out)})
    return rows


# --- report ---------------------------------------------------------------------------------------------


def format_table(result: dict) -> str:
    m = result["machine"]
    lines = [(f"# hemaseg speed  ({m.get('device', 'cpu')}; {m['cpu']}, {m['threads']} threads, load avg {m['load_before']} -> "
              f"{m['load_after']}; shared CPU: medians of interleaved rounds)"), "",
             "## inference (ms per image; speedup vs the reference network at the same size/batch)",
             f"{'size':>5} {'batch':>5}  {'variant':<26} {'ms/img':>8} {'img/s':>7} {'x ref':>6} {'% peak':>7}"]
    for r in result["inference"]:
        lines.append(f"{r['size']:>5} {r['batch']:>5}  {r['variant']:<26} {r['ms_per_image']:>8.2f} "
                     f"{r['images_per_s']:>7.1f} {r['speedup_vs_reference']:>6.2f} {r['pct_fp32_peak']:>6.1f}%")
    if result.get("training"):
        lines += ["", "## training end to end (256 px, batch 8; images/s incl. data loading and augmentation)",
                  f"{'variant':<28} {'img/s':>7} {'x orig':>7} {'% peak':>7}  per round"]
        for r in result["training"]:
            lines.append(f"{r['variant']:<28} {r['images_per_s']:>7.2f} {r['speedup_vs_original']:>7.2f} "
                         f"{r['pct_fp32_peak']:>6.1f}%  {r['per_round']}")
    if result.get("memory"):
        lines += ["", "## peak memory (fresh process per variant; inference = 512 px batch 16, training = 1 epoch)",
                  f"{'variant':<22} {'peak RSS MB':>12} {'after setup MB':>15}"]
        for r in result["memory"]:
            lines.append(f"{r['variant']:<22} {r['peak_rss_mb']:>12.1f} {r['setup_rss_mb']:>15.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 px only, batch 1 and 8, fewer repeats")
    parser.add_argument("--skip-training", action="store_true", help="inference only")
    parser.add_argument("--peak-gflops", type=float, default=166.0, help="FP32 peak of the cores used")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: on CUDA, no ONNX Runtime "
                                                        "and no memory probe")
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers of both training loops")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed.json"), help="JSON output")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.data)
        return
    global DEVICE
    DEVICE = torch.device(args.device)

    import onnxruntime

    from hemaseg import __version__
    from hemaseg.inference.backends import cpu_threads

    t0 = time.perf_counter()
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
               "ort_threads": cpu_threads(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
               "hemaseg": __version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
               "load_before": round(os.getloadavg()[0], 2)}
    try:
        with open("/proc/cpuinfo") as f:
            machine["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    sizes, batches = ((256,), (1, 8)) if args.quick else ((256, 512), (1, 8, 16))
    rounds, reps = (3, 2) if args.quick else (3, 2)
    print("inference ...", flush=True)
    result = {"machine": machine, "peak_gflops": args.peak_gflops,
              "inference": bench_inference(sizes, batches, rounds, reps, args.peak_gflops)}
    if not args.skip_training:
        print("training ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            n_scans, epochs, train_rounds = (40, 3, 2) if args.quick else (80, 3, 2)
            result["training"], result["training_setup"] = bench_training(
                n_scans, epochs, train_rounds, 8, args.peak_gflops, Path(tmp), args.workers)
            if DEVICE.type == "cpu":
                print("memory ...", flush=True)
                result["memory"] = bench_memory(Path(result["training_setup"]["data"]))
    machine["load_after"] = round(os.getloadavg()[0], 2)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print()
    print(format_table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
