"""The `hemaseg` command line. The only module that reads argv; every command calls library functions."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("hemaseg")


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mask-threshold", type=float, default=None, metavar="F",
                   help="binarise non-binary masks at F x the mask dtype's maximum (e.g. 0.5); "
                        "without it a mask must hold exactly two values")


def _add_inference_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the probabilities of the scan and its flips")
    p.add_argument("--no-postprocess", action="store_true",
                   help="skip the postprocessing steps the run decided on (RUN/postprocessing.json)")


def _add_backend_flag(p: argparse.ArgumentParser) -> None:
    # names as in hemaseg.backends.BACKENDS, spelled out so `--help` does not import torch
    p.add_argument("--backend", choices=["torch", "torch-fast", "torch-bf16", "onnxruntime"], default="torch",
                   help="how the network runs: torch (eager, default), torch-fast (conv+BN folded, "
                        "channels_last, same results), torch-bf16 (torch-fast in bf16: CPUs with AVX512-BF16/AMX, "
                        "recent GPUs; masks may differ at a few boundary pixels), onnxruntime (ONNX Runtime on "
                        "the CPU, exported in memory from the checkpoint)")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--size", type=int, help="training size in pixels (multiple of 16); scans are letterboxed "
                                            "to size x size with their aspect ratio kept (default 256)")
    g.add_argument("--normalize", choices=["zscore", "unit"], help="intensity normalisation (default zscore)")
    g.add_argument("--val-fraction", type=float, help="share of scans held out for validation (default 0.2)")
    g.add_argument("--split-seed", type=int, help="seed of the train/val split (default 0)")
    g.add_argument("--split-file", help="JSON {'train': [...], 'val': [...]} of scan names to use instead")
    g.add_argument("--groups", dest="groups_file", metavar="CSV",
                   help="CSV of image name + group (group/dup_group/patient column): a group never spans "
                        "train and val (default: DATA/manifest.csv when it has such a column)")
    g.add_argument("--mask-threshold", type=float, metavar="F", help="binarise non-binary masks at F x dtype max")
    g.add_argument("--preset", choices=["seed", "default", "large"], default="default",
                   help="recipe to start from, adapted to the dataset (input size, batch) and stored in the run: "
                        "'seed' = the original network with a sound recipe, 'default' = best measured for a "
                        "2-core CPU, 'large' = wider and larger input, for a GPU (default: default); "
                        "flags below override it")
    g = p.add_argument_group("model")
    g.add_argument("--model", dest="arch", choices=["seed", "unet"],
                   help="'seed' = the original 487,449-parameter network (default); 'unet' = configurable")
    g.add_argument("--base-width", type=int, help="channels at the first level of 'unet' (default 8)")
    g.add_argument("--depth", type=int, help="pooling steps of 'unet' (default 4)")
    g.add_argument("--norm", choices=["batch", "instance", "group", "none"], help="normalisation layers of 'unet'")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="training epochs (default 30)")
    g.add_argument("--budget-minutes", type=float, metavar="M",
                   help="fit the number of epochs to M minutes of wall time (measured after the first epoch)")
    g.add_argument("--batch-size", type=int, help="images per step (default 8)")
    g.add_argument("--loss", choices=["dice_bce", "dice_focal"], help="Dice + BCE (default) or Dice + focal (MONAI)")
    g.add_argument("--lr", type=float, help="peak AdamW learning rate (default 3e-3)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 1e-4)")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up length before cosine decay (default 1)")
    g.add_argument("--seed", type=int, help="seed of weights, batch order and augmentation (default 0)")
    g.add_argument("--device", help="auto (CUDA when present), cpu, cuda, cuda:1 ... (default auto)")
    g.add_argument("--num-workers", type=int,
                   help="augmentation worker processes (default: none on the CPU, where in-process is faster; "
                        "4 on CUDA, which otherwise waits for data)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="autocast precision: auto = bf16 where the hardware runs it natively (bf16 GPUs, CPUs "
                        "with AVX512-BF16/AMX: 1.6x faster training here, same or better Dice per minute), else "
                        "fp32 (default); bf16 = demand it; fp32 = never autocast")
    g.add_argument("--threshold", type=float, help="probability threshold for masks (default 0.5)")
    g.add_argument("--no-augment", action="store_true", help="train without augmentation")
    g.add_argument("--config", metavar="JSON", help="a config.json (e.g. from an earlier run) to start from; "
                                                    "flags given here override it")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="hemaseg", description="Find and measure lesions in 2-D ultrasound.")
    parser.add_argument("--version", action="version", version=f"hemaseg {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write synthetic ultrasound scans with known lesions",
                       description="Write OUT/images/N.png and OUT/mask/N.png: synthetic B-mode scans "
                                   "(speckle, tissue layers, lesions), deterministic for a seed.")
    p.add_argument("out", help="output folder")
    p.add_argument("--n", type=int, default=200, help="number of scans (default 200)")
    p.add_argument("--size", type=int, default=256, help="scan size in pixels, square (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed; scan i depends only on (seed, i) (default 0)")

    p = sub.add_parser("check", help="check a dataset folder and list every problem",
                       description="Count and measure DATA (images/ + mask/ or masks/) and report every problem "
                                   "as one line naming the file. Exit status 1 when problems were found.")
    p.add_argument("data", help="dataset folder")
    _add_data_flags(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("train", help="train a model on a dataset folder",
                       description="Train a UNet on DATA and write RUN/ (config.json, splits.json, best.pt, "
                                   "last.pt, metrics.csv, curves.png).")
    p.add_argument("data", nargs="?", help="dataset folder (not needed with --resume)")
    p.add_argument("--out", help="run folder to write")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its last.pt (same result as uninterrupted); with --epochs N, extend it to N epochs")
    _add_train_flags(p)

    p = sub.add_parser("evaluate", help="score a trained model on a labelled dataset",
                       description="Predict every scan of DATA with RUN's best model and write per-image Dice/IoU "
                                   "(per_image.csv) and summary.json.")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("data", help="labelled dataset folder")
    p.add_argument("--out", help="output folder (default RUN/eval)")
    p.add_argument("--split", choices=["all", "val", "train"], default="all",
                   help="score all of DATA (default), or only the run's val/train split of it")
    p.add_argument("--threshold", type=float, help="probability threshold (default: the run's)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    _add_inference_flags(p)
    _add_backend_flag(p)
    _add_data_flags(p)

    p = sub.add_parser("predict", help="segment new scans",
                       description="For each image: NAME_mask.png (0/255, original size), NAME_overlay.png "
                                   "(outline on the scan) and predictions.csv with lesion measurements.")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threshold", type=float, help="probability threshold (default: the run's)")
    p.add_argument("--save-prob", action="store_true", help="also write NAME_prob.png (probability x 255)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    _add_inference_flags(p)
    _add_backend_flag(p)

    p = sub.add_parser("export", help="export a trained model for use outside hemaseg (ONNX)",
                       description="Write RUN's best model as ONNX with dynamic batch/height/width and the "
                                   "preprocessing (letterbox size, normalisation, threshold) in its metadata. "
                                   "ONNX Runtime's output is checked against PyTorch before the file is written.")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default onnx)")
    p.add_argument("--out", help="file to write (default RUN/model.onnx)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")

    p = sub.add_parser("cv", help="k-fold cross-validation: train every fold, evaluate out of fold",
                       description="Deterministic (group-aware) folds saved to RUN/folds.json; trains RUN/fold_K "
                                   "(resumable: rerun the same command), then evaluates out of fold with and without "
                                   "TTA, decides postprocessing and the needs-review threshold, and writes "
                                   "RUN/cv_summary.json and RUN/oof/. predict/evaluate accept RUN as an ensemble.")
    p.add_argument("data", help="dataset folder")
    p.add_argument("--out", required=True, help="cross-validation run folder")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--fold-seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N folds at once, each in its own process (default 1). Pays on a GPU, whose card "
                        "one small UNet leaves mostly idle, or on a many-core CPU; --budget-minutes stays per fold")
    _add_train_flags(p)

    p = sub.add_parser("report", help="write the HTML report of a run",
                       description="Evaluate RUN on its validation split (a cross-validation run: out of fold, no "
                                   "retraining) and write one self-contained RUN/report.html.")
    p.add_argument("run", help="run folder or cross-validation run folder")
    p.add_argument("--data", help="dataset folder (default: the one the run was trained on)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")

    p = sub.add_parser("demo", help="synthesize, train, evaluate, predict and report in a few minutes",
                       description="End to end on built-in synthetic scans: writes OUT/data, OUT/test, OUT/run, "
                                   "OUT/eval, OUT/predictions and OUT/report.html.")
    p.add_argument("--out", default="hemaseg-demo", help="output folder (default ./hemaseg-demo)")
    p.add_argument("--n", type=int, default=300, help="training + validation scans (default 300)")
    p.add_argument("--n-test", type=int, default=60, help="held-out test scans (default 60)")
    p.add_argument("--size", type=int, default=128, help="scan and training size (default 128)")
    p.add_argument("--budget-minutes", type=float, default=3.0,
                   help="training wall time; epochs are fitted to it (default 3)")
    p.add_argument("--epochs", type=int, help="train exactly this many epochs instead of a time budget")
    p.add_argument("--seed", type=int, default=0, help="seed of data and training (default 0)")

    p = sub.add_parser("serve", help="serve a model over HTTP, with a web page for people",
                       description="Serve RUN at http://HOST:PORT/: a web page to upload a scan and see its outline, "
                                   "and a versioned JSON API (POST /v1/segment, GET /v1/model, GET /healthz, "
                                   "GET /readyz; schema at /openapi.json). Uploads stay in memory and are not "
                                   "logged. Needs the serving dependencies (fastapi, uvicorn, python-multipart).")
    p.add_argument("run", help="run folder, cross-validation run folder or checkpoint file")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the "
                        "network, so set an API key)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--workers", type=int, default=2,
                   help="threads that decode, run the model and encode at once, in one process with one copy "
                        "of the model (default 2)")
    p.add_argument("--max-batch", type=int, default=1, metavar="N",
                   help="group up to N requests that arrive together into one forward pass on one model "
                        "thread (default 1 = off: on a 2-core CPU a thread pool served more; measure yours "
                        "with benchmarks/service.py)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require KEY on every /v1 route (header X-API-Key or Authorization: Bearer KEY); "
                        "default: the HEMASEG_API_KEY environment variable, else no key. The page, /healthz "
                        "and /readyz stay open. Prefer the variable: a flag shows in the process list")
    p.add_argument("--max-upload-mb", type=float, default=20.0, metavar="MB",
                   help="largest upload accepted, in MiB; larger ones get 413 (default 20)")
    p.add_argument("--max-pixels", type=int, default=16_000_000, metavar="N",
                   help="largest image accepted, width x height, checked before decoding; larger ones get 413 "
                        "(default 16000000)")
    p.add_argument("--keep-uploads", metavar="DIR",
                   help="save every upload to DIR as REQUEST_ID.EXT (off by default: nothing is written to disk; "
                        "these files may hold patient data)")
    p.add_argument("--threshold", type=float, help="default probability threshold (default: the run's); "
                                                   "requests may override it with ?threshold=")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    _add_inference_flags(p)
    _add_backend_flag(p)
    return parser


def _train_config(args: argparse.Namespace):
    from .config import RunConfig

    from .plan import describe, fingerprint_stats, make_plan
    from .predict import select_device

    base = json.loads(Path(args.config).read_text()) if args.config else {}
    plan = None
    if not args.config:  # a preset adapted to the data; a config file is taken as it is
        if not Path(args.data).is_dir():
            raise FileNotFoundError(f"{args.data}: no such dataset folder")
        device = select_device(args.device or "auto").type
        plan = make_plan(args.preset, fingerprint_stats(args.data), device)
        base = {k: plan[k] for k in ("data", "model", "augment", "train")}
    sections: dict[str, dict] = {s: dict(base.get(s, {})) for s in ("data", "model", "augment", "train")}
    owners = {
        "data": ("size", "normalize", "val_fraction", "split_seed", "split_file", "groups_file", "mask_threshold"),
        "model": ("arch", "base_width", "depth", "norm"),
        "train": ("epochs", "budget_minutes", "batch_size", "loss", "lr", "weight_decay", "warmup_epochs", "seed",
                  "device", "num_workers", "precision", "threshold"),
    }
    for section, keys in owners.items():
        for key in keys:
            value = getattr(args, key)
            if value is not None:
                sections[section][key] = value
    if sections["model"].get("arch") is None and any(k in sections["model"] for k in ("base_width", "depth", "norm")):
        sections["model"]["arch"] = "unet"
    if args.no_augment:
        sections["augment"] = {k: 0.0 for k in ("hflip", "vflip", "affine_p", "gamma_p", "contrast_p", "blur_p",
                                                 "noise_p", "speckle_p")}
    sections["data"]["root"] = str(args.data)
    config = RunConfig.from_dict({**sections, "plan": plan})
    if plan is not None:
        log.info(describe(plan))
    return config


def cmd_synth(args) -> int:
    from .synth import write_synthetic_dataset

    t = time.perf_counter()
    out = write_synthetic_dataset(args.out, args.n, size=args.size, seed=args.seed, progress=not args.quiet)
    print(f"wrote {args.n} scans to {out}/images and {out}/mask in {time.perf_counter() - t:.1f} s")
    return 0


def cmd_check(args) -> int:
    from .data import check_dataset

    report = check_dataset(args.data, mask_threshold=args.mask_threshold, progress=not args.quiet)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if report.ok else 1


def cmd_train(args) -> int:
    from .config import RunConfig
    from .train import fit

    if args.resume:
        run = Path(args.resume)
        if not (run / "config.json").is_file():
            raise FileNotFoundError(f"{run}: not a run folder (no config.json)")
        cfg = RunConfig.load(run / "config.json")
        if args.epochs is not None:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=args.epochs))
        summary = fit(cfg, run, resume=True, progress=not args.quiet)
    else:
        if not args.data or not args.out:
            raise ValueError("train needs DATA and --out RUN (or --resume RUN)")
        summary = fit(_train_config(args), args.out, progress=not args.quiet)
    print(f"best validation Dice {summary['best_val_dice']:.4f} at epoch {summary['best_epoch']} "
          f"of {summary['epochs']} ({summary['train_s']:.0f} s); run written to {summary['run']}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, format_summary, run_split_names, write_report
    from .predict import load_model

    predictor = load_model(args.run, device=args.device, threshold=args.threshold, tta=args.tta,
                           postprocess=not args.no_postprocess, backend=args.backend)
    names = None
    if args.split != "all":
        names = run_split_names(args.run, args.split)
        if names is None:
            raise FileNotFoundError(f"{args.run}/splits.json: needed for --split {args.split}")
    run_dir = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent
    out = Path(args.out) if args.out else run_dir / "eval"
    result = evaluate(predictor, args.data, out, names=names, mask_threshold=args.mask_threshold,
                      progress=not args.quiet, keep_masks=True)
    for row in result["rows"]:
        row["needs_review"] = predictor.needs_review(row["confidence"])
    report = write_report(out / "report.html", f"Evaluation of {run_dir} on {args.data} ({args.split})",
                          result["rows"], result["summary"], run_dir=run_dir)
    print(f"evaluation of {predictor.metadata['checkpoint']} on {args.data} ({args.split}):")
    print(format_summary(result["summary"]))
    print(f"per-image metrics: {out / 'per_image.csv'}; summary: {out / 'summary.json'}; report: {report}")
    return 0


def cmd_predict(args) -> int:
    from .predict import load_model, predict_files

    predictor = load_model(args.run, device=args.device, threshold=args.threshold, tta=args.tta,
                           postprocess=not args.no_postprocess, backend=args.backend)
    rows = predict_files(predictor, args.inputs, args.out, save_prob=args.save_prob, batch_size=args.batch_size,
                         progress=not args.quiet)
    found = sum(r["n_lesions"] > 0 for r in rows)
    print(f"segmented {len(rows)} image(s), {found} with a lesion; masks, overlays and predictions.csv in {args.out}")
    return 0


def cmd_export(args) -> int:
    from .export import export_onnx

    result = export_onnx(args.run, args.out, opset=args.opset)
    print(f"wrote {result.path} ({result.n_bytes / 1e6:.1f} MB); onnxruntime vs torch max abs diff on logits "
          f"{result.max_abs_diff:.2e}")
    return 0


def cmd_cv(args) -> int:
    from .cv import run_cv

    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    result = run_cv(_train_config(args), args.out, folds=args.folds, seed=args.fold_seed, progress=not args.quiet,
                    jobs=args.jobs)
    s = result["summary"]
    print(f"out-of-fold Dice: plain {s['oof_dice_plain']:.4f}, TTA {s['oof_dice_tta']:.4f}, "
          f"final ({s['inference']} + postprocessing) {s['oof_dice_final']:.4f}; per fold "
          + ", ".join(f"{d:.3f}" for d in s["fold_dice"])
          + f" (mean {s['fold_dice_mean']:.4f} +- {s['fold_dice_sd']:.4f})")
    print(f"postprocessing kept: {s['postprocessing']}; summary in {Path(args.out) / 'cv_summary.json'}")
    return 0


def cmd_report(args) -> int:
    from .config import RunConfig

    run = Path(args.run)
    if (run / "folds.json").is_file():
        from .cv import run_cv

        cfg = RunConfig.load(run / "fold_0" / "config.json")
        if args.data:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=args.data))
        folds = json.loads((run / "folds.json").read_text())
        run_cv(cfg, run, folds=folds["n_folds"], seed=folds["seed"], progress=not args.quiet)
    else:
        if not (run / "config.json").is_file():
            raise FileNotFoundError(f"{run}: not a run folder (no config.json)")
        data = args.data or RunConfig.load(run / "config.json").data.root
        ns = build_parser().parse_args(["evaluate", str(run), str(data), "--out", str(run / "eval"), "--split", "val",
                                        "--device", args.device])
        ns.quiet = args.quiet
        cmd_evaluate(ns)
        (run / "report.html").write_bytes((run / "eval" / "report.html").read_bytes())
    print(f"report: {run / 'report.html'}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    paths = run_demo(args.out, n=args.n, n_test=args.n_test, size=args.size, epochs=args.epochs, seed=args.seed,
                     budget_minutes=None if args.epochs else args.budget_minutes, progress=not args.quiet)
    print("demo finished; everything is under", args.out)
    for what, path in paths.items():
        print(f"  {what:<12} {path}")
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from .serve import Settings, create_app

    api_key = args.api_key or os.environ.get("HEMASEG_API_KEY") or None
    settings = Settings(
        api_key=api_key, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels,
        keep_uploads=Path(args.keep_uploads) if args.keep_uploads else None, workers=args.workers,
        max_batch=args.max_batch, device=args.device, threshold=args.threshold, backend=args.backend,
        tta=args.tta, postprocess=not args.no_postprocess,
    )
    app = create_app(args.run, settings)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who can reach it can upload scans", args.host)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {args.run} at http://{host}:{args.port}/ (API /v1/segment; schema /openapi.json)"
          + ("; API key required" if api_key else ""))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0


COMMANDS = {"synth": cmd_synth, "check": cmd_check, "train": cmd_train, "evaluate": cmd_evaluate,
            "predict": cmd_predict, "cv": cmd_cv, "report": cmd_report, "demo": cmd_demo,
            "export": cmd_export, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Before any command imports torch: idle OpenMP threads sleep instead of spinning. On a shared CPU the
    # spinning threads of two busy processes starve each other (10-50x slower inference and training,
    # benchmarks/speed.py); on an idle CPU sleeping costs nothing measurable. An explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from .data import DataError

    try:
        return COMMANDS[args.command](args)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"hemaseg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
