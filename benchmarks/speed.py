"""Speed of hemaseg on this machine, side by side with the original write-up's network and loop.

    python benchmarks/speed.py           # ~5-10 min on 2 CPU cores -> results/speed.json
    python benchmarks/speed.py --quick   # < 1 min: the default-vs-reference comparison only (256 px,
                                         # batch 1) -> results/speed_quick.json

(a) inference: ms per image at batch 1 / 8 / 16, 256 and 512 px, for the reference SeedUnet (eager,
    network only) and for hemaseg with every backend, `auto` (the default: the fastest backend that
    matches eager fp32, chosen when the model loads) included: the network alone, and the whole predict
    path (Predictor.predict_proba_batch: letterbox + normalise + network + sigmoid + unletterbox). Per
    size and batch, the default predict path is set against the reference eager network and against the
    fastest backend measured, all timed in one process, interleaved;
(b) training: images/s end to end (data loading + augmentation + step) of hemaseg's fit() against a
    plain loop like the write-up's (PIL decode of every PNG every step, a random 256 px crop per sample,
    eager fp32 SeedUnet + BCE, Adam) on the same synthetic scans;
(c) peak memory: max RSS of a fresh process doing one variant (inference at 512 px batch 16; 3 training
    steps), so variants do not inherit each other's peaks.

Compared variants run interleaved, round after round, and each figure is the median over rounds, so
a busy shared machine slows all of them alike; the load average is recorded with the results.
% of peak uses 1.52 GFLOP (forward) and 4.55 GFLOP (forward + backward) per 256 px image, scaled by
pixel count, against --peak-gflops (FP32 peak of the cores used; 166 for 2 Zen 4 cores).
The CPU's model and vector flags (hemaseg.device.describe_cpu) are printed and stored with the results.
Prints one table and writes benchmarks/results/speed.json (speed_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import csv
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


DEVICE = torch.device("cpu")  # --device


def inference_config(size: int):
    """The `default` preset at input `size` (no data: nothing to plan from but the device)."""
    from hemaseg.config import resolve_config

    return resolve_config("", "scratch", device_type=DEVICE.type, overrides={"size": size})


def seed_model(size: int) -> torch.nn.Module:
    """The default network with trained-like BN statistics (models.fusion.randomize_batchnorm), so
    conv+BN folding has real work to do."""
    from hemaseg.models import build_model
    from hemaseg.models.fusion import randomize_batchnorm

    torch.manual_seed(0)
    return randomize_batchnorm(build_model(inference_config(size).model), seed=0).eval()


def backend_names() -> list[str]:
    """The fixed backends measured here (`auto` picks among the exact ones)."""
    from hemaseg.device import bf16_supported

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


def inference_runners(size: int, batch: int, only: str | None = None) -> tuple[dict, dict]:
    """(name -> zero-argument callable doing one batch, what `auto` chose); all built before timing
    starts. `only`: "reference", "auto" or one backend's network alone (for the memory probe)."""
    from hemaseg.inference.backends import choose_backend, make_backend
    from hemaseg.inference.predictor import Predictor

    ref = load_reference()().eval().to(DEVICE)
    model = seed_model(size)
    x = torch.randn(batch, 1, size, size, device=DEVICE)
    rng = np.random.default_rng(0)
    # raw scans of another aspect ratio, so the predict path really resizes, pads and maps back
    scans = [rng.integers(0, 255, (size * 3 // 4, size), dtype=np.uint8) for _ in range(batch)]
    config = inference_config(size)

    def no_grad(fn):
        def run():
            with torch.inference_mode():
                out = fn(x)
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()  # time the work, not the kernel launches
            return out
        return run

    if only == "reference":
        return {"reference (eager)": no_grad(ref)}, {}
    if only == "auto":
        name, backend, record = choose_backend(model, DEVICE, size)
        return {"auto network": no_grad(backend)}, {"backend": name, "record": record}
    if only:
        return {f"{only} network": no_grad(make_backend(model, only, DEVICE))}, {}
    runners = {"reference (eager)": no_grad(ref)}
    # the default: what load_model / hemaseg predict run when no backend is named
    default = Predictor(model, config, device=DEVICE, backend="auto")
    runners["auto network"] = no_grad(default.runners[0])
    runners["auto predict path"] = lambda: default.predict_proba_batch(scans, batch_size=batch)
    for name in backend_names():
        runners[f"{name} network"] = no_grad(make_backend(model, name, DEVICE))
        predictor = Predictor(model, config, device=DEVICE, backend=name)
        runners[f"{name} predict path"] = lambda p=predictor: p.predict_proba_batch(scans, batch_size=batch)
    # the `default` preset's network (the pretrained Lite0 UNet), also through auto
    from hemaseg.config import resolve_config
    from hemaseg.models import build_model
    from hemaseg.models.fusion import randomize_batchnorm

    pre_cfg = resolve_config("", "default", device_type=DEVICE.type, overrides={"size": size})
    pre = Predictor(randomize_batchnorm(build_model(pre_cfg.model), seed=0).eval(), pre_cfg, device=DEVICE,
                    backend="auto")
    runners["default-preset model predict path"] = lambda: pre.predict_proba_batch(scans, batch_size=batch)
    # the same network at the input the plan shapes for 3:2 scans (HC18's 800 x 540: 224x320 at 256 px)
    shaped_cfg = resolve_config("", "default", device_type=DEVICE.type, overrides={"size": SHAPED[size]})
    shaped = Predictor(pre.models[0], shaped_cfg, device=DEVICE, backend="auto")
    runners["default-preset model shaped predict path"] = lambda: shaped.predict_proba_batch(scans, batch_size=batch)
    return runners, {"backend": default.backend, "record": default.metadata.get("backend_auto"),
                     "preset_model": pre_cfg.model.arch, "preset_backend": pre.backend}


SHAPED = {256: (224, 320), 512: (448, 640)}  # the plan's input for 3:2 scans at the preset's pixel count

# ONNX Runtime's worker threads spin for a while after a run: on 2 cores an ORT session that just ran stole
# them from the next variant (the ORT predict path measured 19 ms after the ORT network, 13 ms alone).
# A pause at each switch lets them sleep, so every variant starts on idle cores, as it would in use.
SETTLE_S = 0.02


def time_interleaved(runners: dict, rounds: int, reps: int) -> dict[str, float]:
    """Median seconds per call: every round runs each variant `reps` times, variants taking turns in a
    new seeded order each round (a fixed order measured the variant after the eager network up to 20 %
    slower than the same backend elsewhere in the round: the position, not the code, was timed)."""
    for fn in runners.values():  # warm-up: oneDNN primitive creation, ORT arena
        fn()
    samples: dict[str, list[float]] = {k: [] for k in runners}
    order = np.random.default_rng(0)
    for _ in range(rounds):
        for name in order.permutation(list(runners)):
            fn = runners[name]
            time.sleep(SETTLE_S)
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in samples.items()}


def compare_default(times: dict[str, float], size: int, batch: int, auto: dict) -> dict:
    """The default predict path (auto) against the reference eager network and against the fastest
    fixed backend's predict path, from one interleaved measurement. Ratios are speed ratios: the other
    variant's time over the default's (> 1: the default is faster)."""
    default = times["auto predict path"]
    fixed = {k: v for k, v in times.items() if k.endswith(" predict path") and not k.startswith(("auto ", "default-"))}
    fastest = min(fixed, key=fixed.get)
    return {"size": size, "batch": batch, "default_backend": auto["backend"],
            "default_predict_ms": round(1e3 * default / batch, 2),
            "reference_eager_ms": round(1e3 * times["reference (eager)"] / batch, 2),
            "default_vs_reference": round(times["reference (eager)"] / default, 2),
            "fastest_backend": fastest.removesuffix(" predict path"),
            "fastest_predict_ms": round(1e3 * fixed[fastest] / batch, 2),
            "default_vs_fastest": round(fixed[fastest] / default, 2),
            "auto_choice": auto["record"],
            "preset_model": auto.get("preset_model"), "preset_backend": auto.get("preset_backend"),
            "preset_model_ms": round(1e3 * times["default-preset model predict path"] / batch, 2),
            "preset_model_vs_seed": round(times["default-preset model predict path"] / default, 2),
            "preset_model_shaped": "x".join(map(str, SHAPED[size])),
            "preset_model_shaped_ms": round(1e3 * times["default-preset model shaped predict path"] / batch, 2),
            "preset_model_shaped_vs_seed": round(times["default-preset model shaped predict path"] / default, 2)}


def bench_inference(sizes, batches, rounds, reps, peak) -> tuple[list[dict], list[dict]]:
    rows, defaults = [], []
    for size in sizes:
        for batch in batches:
            runners, auto = inference_runners(size, batch)
            times = time_interleaved(runners, rounds, reps)
            base = times["reference (eager)"] / batch
            gflop = FWD_GFLOP_256 * (size / 256) ** 2
            for name, sec in times.items():
                ms = 1e3 * sec / batch
                rows.append({"size": size, "batch": batch, "variant": name, "ms_per_image": round(ms, 2),
                             "images_per_s": round(1e3 / ms, 1), "speedup_vs_reference": round(base * 1e3 / ms, 2),
                             "pct_fp32_peak": round(100 * gflop / (ms / 1e3) / peak, 1),
                             **({"backend": auto["backend"]} if name.startswith("auto ") else {})})
            defaults.append(compare_default(times, size, batch, auto))
            print(f"  inference {size} px batch {batch}: done", flush=True)
    return rows, defaults


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
    from hemaseg.data.plan import configure
    from hemaseg.training.train import fit

    overrides = {"size": size, "val_fraction": 0.1, "epochs": epochs, "batch_size": batch,
                 "device": str(DEVICE), "precision": precision, "num_workers": workers}
    cfg, loaded = configure(data, "scratch", overrides)
    summary = fit(cfg, out, dataset=loaded, progress=False)
    with open(out / "metrics.csv", newline="") as f:
        seconds = [float(r["epoch_s"]) for r in csv.DictReader(f)]
    return seconds, (summary["n_train"] // batch) * batch


def bench_training(n_scans, epochs, rounds, batch, peak, workdir: Path, workers: int = 0) -> tuple[list[dict], dict]:
    from hemaseg.data.synth import write_synthetic_dataset
    from hemaseg.device import bf16_supported

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
        (run,) = inference_runners(512, 16, only=name)[0].values()
        setup = rss_mb()
        run()
    else:
        setup = rss_mb()
        if variant == "train:original":
            original_style_epochs(Path(data), 1, 8, 256)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                hemaseg_epochs(Path(data), Path(tmp) / "run", 1, 8, 256, variant.split(":")[1])
    print(json.dumps({"peak_rss_mb": round(rss_mb(), 1), "setup_rss_mb": round(setup, 1)}))


def bench_memory(data: Path) -> list[dict]:
    from hemaseg.device import bf16_supported

    variants = ["infer:reference", "infer:auto"] + [f"infer:{n}" for n in backend_names()]
    variants += ["train:original", "train:fp32"]
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
    lines = [(f"# hemaseg speed  ({m.get('device', 'cpu')}; {m['cpu']} [{' '.join(m['cpu_flags']) or '-'}], "
              f"{m['threads']} threads, load avg {m['load_before']} -> {m['load_after']}; shared CPU: "
              "medians of interleaved rounds)"), "",
             "## inference (ms per image; speedup vs the reference network at the same size/batch; "
             "auto = the default)",
             f"{'size':>5} {'batch':>5}  {'variant':<32} {'ms/img':>8} {'img/s':>7} {'x ref':>6} "
             f"{'% peak':>7}"]
    for r in result["inference"]:
        variant = r["variant"] + (f" [{r['backend']}]" if "backend" in r else "")
        lines.append(f"{r['size']:>5} {r['batch']:>5}  {variant:<32} {r['ms_per_image']:>8.2f} "
                     f"{r['images_per_s']:>7.1f} {r['speedup_vs_reference']:>6.2f} {r['pct_fp32_peak']:>6.1f}%")
    lines += ["", "## the default (predict path, backend auto) side by side, same process (speed ratios: "
                  "> 1 = the default is faster)",
              f"{'size':>5} {'batch':>5}  {'default ms':>10}  {'reference eager ms':>18} "
              f"{'default vs ref':>14}  {'fastest backend measured':<24} {'ms':>7} "
              f"{'default vs fastest':>18}"]
    for d in result["default_vs"]:
        lines.append(f"{d['size']:>5} {d['batch']:>5}  {d['default_predict_ms']:>10.2f}  "
                     f"{d['reference_eager_ms']:>18.2f} {d['default_vs_reference']:>13.2f}x  "
                     f"{d['fastest_backend'] + ' predict path':<24} {d['fastest_predict_ms']:>7.2f} "
                     f"{d['default_vs_fastest']:>17.2f}x")
        at_load = (d["auto_choice"] or {}).get("ms")
        lines.append(f"{'':>13}auto chose {d['default_backend']} (batch-1 network ms at load: {at_load})")
        if d.get("preset_model"):
            lines.append(f"{'':>13}the default preset's network ({d['preset_model']}, auto -> {d['preset_backend']}): "
                         f"{d['preset_model_ms']:.2f} ms per scan = {d['preset_model_vs_seed']:.2f}x the seed "
                         "network's default predict path")
            lines.append(f"{'':>13}the same at the plan's {d['preset_model_shaped']} input for 3:2 scans: "
                         f"{d['preset_model_shaped_ms']:.2f} ms = {d['preset_model_shaped_vs_seed']:.2f}x")
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
    parser.add_argument("--quick", action="store_true",
                        help="only the 256 px batch-1 inference comparison (default vs reference vs "
                             "every backend), few rounds, no training or memory probe; writes "
                             "results/speed_quick.json")
    parser.add_argument("--skip-training", action="store_true", help="inference only")
    parser.add_argument("--peak-gflops", type=float, default=166.0, help="FP32 peak of the cores used")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: on CUDA, no ONNX Runtime "
                                                        "and no memory probe")
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers of both training loops")
    parser.add_argument("--out", help="JSON output (default benchmarks/results/speed.json, speed_quick.json "
                                      "with --quick)")
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
    from hemaseg.device import cpu_threads, describe_cpu
    from hemaseg.io import atomic_write_text, json_safe

    t0 = time.perf_counter()
    cpu = describe_cpu()
    machine = {"cpu": cpu["model"], "cpu_flags": cpu["flags"], "cpus": cpu["cpus"],
               "threads": torch.get_num_threads(),
               "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
               "ort_threads": cpu_threads(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
               "hemaseg": __version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
               "platform": platform.platform(), "load_before": round(os.getloadavg()[0], 2)}
    print(f"{cpu['model']} [{' '.join(cpu['flags'])}], {cpu['cpus']} CPUs, {machine['threads']} torch "
          "threads", flush=True)
    sizes, batches = ((256,), (1,)) if args.quick else ((256, 512), (1, 8, 16))
    rounds, reps = (7, 3) if args.quick else (3, 2)
    print("inference ...", flush=True)
    result = {"machine": machine, "peak_gflops": args.peak_gflops, "quick": args.quick}
    result["inference"], result["default_vs"] = bench_inference(sizes, batches, rounds, reps,
                                                                args.peak_gflops)
    if not (args.quick or args.skip_training):
        print("training ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            result["training"], result["training_setup"] = bench_training(
                80, 3, 2, 8, args.peak_gflops, Path(tmp), args.workers)
            if DEVICE.type == "cpu":
                print("memory ...", flush=True)
                result["memory"] = bench_memory(Path(result["training_setup"]["data"]))
    machine["load_after"] = round(os.getloadavg()[0], 2)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print()
    print(format_table(result))
    default_out = ROOT / "benchmarks" / "results" / ("speed_quick.json" if args.quick else "speed.json")
    out = Path(args.out or default_out)
    atomic_write_text(out, json.dumps(json_safe(result), indent=2))
    print(f"\nwrote {out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
