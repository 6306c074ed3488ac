"""Offline commands of ``cdm`` over a local store directory: split, train, sample, forget, evaluate, ``ls --store``.

``cdm sample --redis`` samples the live registry's composition with the same flags.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from cdm.config import LibraryConfig, RouterConfig, TrainConfig, replace
from cli.args import csv_ints, csv_list, positive_int
from cli.config import Subparsers, load_app_config, registry_composition


def _source_arg(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--source takes NAME=PATH.npz, got {value!r}")
    return name, Path(path)


def register(sub: Subparsers) -> None:
    """Add the offline commands (a local store directory, no services) to the ``cdm`` parser."""
    s = sub.add_parser(
        "split",
        help="split a dataset into per-source .npz files",
        description="Split Fashion-MNIST (or sklearn digits) into N sources, one .npz each.",
    )
    s.add_argument("--data", choices=["fashion-mnist", "digits"], default="fashion-mnist")
    s.add_argument(
        "--scheme",
        choices=["random", "by-class", "dirichlet"],
        default="random",
        help="random: IID shards; by-class: disjoint class groups; dirichlet: non-IID (see --alpha)",
    )
    s.add_argument("--n", type=int, required=True, help="number of sources")
    s.add_argument("--out", type=Path, required=True, help="output directory (source-0.npz, ...)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller = more skewed)")
    s.add_argument("--split", choices=["train", "test"], default="train")
    s.add_argument("--limit", type=int, default=None, help="use only the first LIMIT samples")
    s.set_defaults(func=cmd_split)

    t = sub.add_parser(
        "train",
        help="train one compartment per new source, then the router",
        description="Stage each --source into the store, train a compartment for every source whose "
        "data fingerprint is not trained yet (an interrupted run resumes), then retrain the router. The store "
        "keeps the [router] kind of its first training (learnt: one router; heads: a head per compartment; "
        "density: nothing more) and refuses another one later.",
    )
    t.add_argument("--store", type=Path, required=True, help="local artifact store directory (created if missing)")
    t.add_argument(
        "--source",
        type=_source_arg,
        action="append",
        default=[],
        metavar="NAME=PATH.npz",
        help="a source to add (repeatable); without any, only the router is retrained",
    )
    _train_flags(t)
    t.set_defaults(func=cmd_train)

    sm = sub.add_parser(
        "sample",
        help="sample images (PNG grid, attribution) from the composition",
        description="Sample from the composed model of a local store (--store) or the live registry "
        "(--redis). OUT.npz holds images (uint8), attribution (N,K) and sources (column names).",
    )
    src = sm.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", type=Path, help="local artifact store")
    src.add_argument("--redis", help="registry URL of a running daemon, e.g. redis://127.0.0.1:6379/0")
    sm.add_argument("--n", type=positive_int, default=16, help="number of images")
    sm.add_argument("--sources", type=csv_list, default=None, help="access subset, e.g. shoes,bags (default: all)")
    sm.add_argument("--labels", type=csv_ints, default=None, help="class labels, cycled over the samples")
    sm.add_argument("--top-k", type=int, default=None, help="route each sample to its k most likely compartments")
    sm.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance for --labels (default [sample] guidance_scale; 1 = none)",
    )
    sm.add_argument(
        "--steps", type=positive_int, default=None, help="denoising steps (default [sample] num_inference_steps)"
    )
    sm.add_argument("--scheduler", choices=["ddim", "ddpm", "dpm", "sde-dpm"], default=None)
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--device", choices=["cpu", "cuda"], default=None)
    sm.add_argument("--out", type=Path, required=True, help="output .npz")
    sm.add_argument("--png", type=Path, default=None, help="also write a PNG grid with attribution bars")
    sm.add_argument("--trajectory", action="store_true", help="store the full weight trajectory (T,N,K) too")
    sm.add_argument("--no-progress", action="store_true")
    sm.set_defaults(func=cmd_sample)

    f = sub.add_parser(
        "forget",
        help="forget a source (or some of its samples) exactly",
        description="Delete a source's compartment, staged data and checkpoints and retrain the router "
        "without it; with --samples, retrain only that source's compartment without those samples. "
        "Writes a receipt to STORE/receipts/.",
    )
    f.add_argument("--store", type=Path, required=True)
    f.add_argument("--source", required=True)
    f.add_argument("--samples", type=csv_ints, default=None, help="sample ids to forget (default: the whole source)")
    _train_flags(f)
    f.set_defaults(func=cmd_forget)

    e = sub.add_parser(
        "evaluate",
        help="FID / KID / memorisation of samples as JSON",
        description="Sample from the store and score against the Fashion-MNIST test split with a "
        "feature classifier trained here (cached).",
    )
    e.add_argument("--store", type=Path, required=True)
    e.add_argument("--n", type=positive_int, default=None, help="samples (default [eval] num_samples)")
    e.add_argument("--sources", type=csv_list, default=None)
    e.add_argument("--top-k", type=int, default=None)
    e.add_argument("--steps", type=positive_int, default=None)
    e.add_argument("--scheduler", choices=["ddim", "ddpm", "dpm", "sde-dpm"], default=None)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--memorisation", action="store_true", help="also compute the memorisation ratio test")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_evaluate)


def _train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per compartment ([train] steps)")
    p.add_argument("--router-steps", type=int, default=None, help="router optimizer steps ([router] steps)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help='"cuda" also turns on bf16 autocast')
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _train_cfgs(args: argparse.Namespace, lib: LibraryConfig) -> tuple[TrainConfig, RouterConfig]:

    precision = "bf16" if args.device == "cuda" else None
    train = replace(
        lib.train, steps=args.steps, batch_size=args.batch_size, device=args.device, seed=args.seed, precision=precision
    )
    router = replace(lib.router, steps=args.router_steps, device=args.device, seed=args.seed)
    return train, router


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_split(args: argparse.Namespace) -> int:
    from cdm.data import load_dataset, save_npz, split_sources

    data = load_dataset(args.data, args.split)
    if args.limit:
        data = data.subset(slice(0, args.limit))
    parts = split_sources(data, args.scheme, args.n, seed=args.seed, alpha=args.alpha)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = []
    for i, part in enumerate(parts):
        path = args.out / f"source-{i}.npz"
        save_npz(path, part)
        classes = sorted(set(part.labels.tolist())) if part.labels is not None else []
        summary.append({"path": str(path), "n": len(part), "classes": classes})
        _say(f"  {path}: {len(part)} images, classes {classes}")
    print(json.dumps(summary))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cdm.data import fingerprint, load_npz
    from cdm.store import LocalStore, check_source_name

    cfg = load_app_config(args)
    train, router = _train_cfgs(args, cfg.library)
    store = LocalStore(args.store, model=cfg.library.model)
    kind = store.use_routing(router.kind)  # recorded by the first training; another kind later is refused
    progress = not args.no_progress
    todo = []
    for name, path in args.source:
        check_source_name(name)
        data = load_npz(path)
        fp = fingerprint(data)
        if store.is_trained(name, fp):
            _say(f"= {name}: already trained on this data (fingerprint {fp[:12]}), skipped")
            continue
        store.stage_data(name, data)
        todo.append(name)
    for name in todo:
        _say(f"> training compartment {name!r} ({train.steps} steps, batch {train.batch_size}, {train.device})")
        res = store.train_compartment(name, train, progress=progress, router=router)
        resumed = f", resumed from step {res.resumed_from}" if res.resumed_from else ""
        _say(f"  done in {res.seconds:.1f}s, final loss {res.final_loss:.4f}{resumed}")
    if kind == "learnt" and (todo or store.router_manifest() is None or not args.source):
        _say(f"> training router over {store.sources()}")
        rr = store.train_router(router, progress=progress)
        if rr is not None:
            acc = " ".join(f"{a:.2f}" for a in rr.report.accuracy_by_noise)
            _say(
                f"  accuracy by noise level (low -> high): {acc}; ECE {rr.report.ece:.3f}; "
                f"priors {[round(p, 3) for p in rr.report.priors]}"
            )
    print(json.dumps({"store": str(args.store), "sources": store.sources(), "trained": todo, "routing": kind}))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from cdm.compose import Composed
    from cdm.pipeline import CompartmentalPipeline, make_scheduler

    cfg = load_app_config(args)
    sc = cfg.library.sample
    if sc.threads > 0:
        torch.set_num_threads(sc.threads)
    device = args.device or sc.device
    started = time.perf_counter()
    den: Composed
    if args.store is not None:
        from cdm.store import LocalStore

        store = LocalStore(args.store)
        den = store.composed(device=device, vectorize=sc.vectorize, mode=sc.mode, top_k=sc.top_k)
        model_cfg = store.model
    else:
        den, model_cfg = registry_composition(cfg, args.redis, device)
    pipe = CompartmentalPipeline(den, make_scheduler(args.scheduler or sc.scheduler, model_cfg))
    out = pipe(
        batch_size=args.n,
        class_labels=args.labels,
        sources=args.sources,
        top_k=args.top_k if args.top_k is not None else (sc.top_k if sc.mode == "top_k" else None),
        num_inference_steps=args.steps if args.steps is not None else sc.num_inference_steps,
        generator=torch.Generator().manual_seed(args.seed),
        return_trajectory=args.trajectory,
        progress=not args.no_progress,
        guidance_scale=args.guidance_scale if args.guidance_scale is not None else sc.guidance_scale,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {
        "images": out.images,
        "attribution": out.attribution.astype(np.float32),
        "sources": np.array(out.source_names),
    }
    if out.trajectory is not None:
        arrays["trajectory"] = out.trajectory.astype(np.float32)
        arrays["timesteps"] = out.timesteps
    np.savez(args.out, **arrays)
    if args.png:
        from cdm.viz import save_grid

        save_grid(out.images, args.png, attribution=out.attribution, source_names=out.source_names)
    dominant = out.attribution.argmax(1)
    share = {n: int((dominant == i).sum()) for i, n in enumerate(out.source_names)}
    print(
        json.dumps(
            {
                "out": str(args.out),
                "png": str(args.png) if args.png else None,
                "n": args.n,
                "seconds": round(time.perf_counter() - started, 2),
                "dominant_source_counts": share,
            }
        )
    )
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from cdm.store import LocalStore

    cfg = load_app_config(args)
    train, router = _train_cfgs(args, cfg.library)
    store = LocalStore(args.store)
    if args.samples:
        receipt = store.forget_samples(args.source, args.samples, train, router, progress=not args.no_progress)
    else:
        receipt = store.forget_source(args.source, router, progress=not args.no_progress)
    retrained = (
        f"{receipt.steps_retrained} steps retrained from slice {receipt.resumed_from_slice} of {receipt.slices}, "
        if receipt.steps_retrained is not None
        else ""
    )
    _say(
        f"forgot {receipt.kind} of {receipt.source!r}: {receipt.n_samples_removed} samples, {retrained}"
        f"{len(receipt.deleted_files)} files deleted, {len(receipt.untouched)} compartments untouched, "
        f"{receipt.seconds:.1f}s"
    )
    print(json.dumps(receipt.to_dict()))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from cdm.data import from_model_tensor, load_fashion_mnist, to_model_tensor
    from cdm.metrics import evaluate, get_feature_extractor
    from cdm.pipeline import CompartmentalPipeline, make_scheduler
    from cdm.store import LocalStore

    cfg = load_app_config(args)
    sc, ec = cfg.library.sample, cfg.library.eval
    store = LocalStore(args.store)
    n = args.n if args.n is not None else ec.num_samples
    pipe = CompartmentalPipeline(
        store.composed(device=sc.device, vectorize=sc.vectorize),
        make_scheduler(args.scheduler or sc.scheduler, store.model),
    )
    images = []
    g = torch.Generator().manual_seed(args.seed)
    for start in range(0, n, sc.batch_size):
        out = pipe(
            batch_size=min(sc.batch_size, n - start),
            sources=args.sources,
            top_k=args.top_k,
            num_inference_steps=args.steps if args.steps is not None else sc.num_inference_steps,
            generator=g,
            progress=not args.no_progress,
        )
        images.append(out.images)
    import numpy as np

    gen = np.concatenate(images)
    size = store.model.sample_size
    ext = get_feature_extractor(size, cache_dir=Path(ec.cache_dir), progress=not args.no_progress)
    ref = from_model_tensor(to_model_tensor(load_fashion_mnist("test").images, size))
    train_sets = None
    if args.memorisation:
        train_sets = {s: from_model_tensor(to_model_tensor(store.load_data(s).images, size)) for s in store.sources()}
    report = evaluate(
        gen, reference=ref, extractor=ext, train_sets=train_sets, memorisation_ratio=ec.memorisation_ratio
    )
    print(json.dumps(report.to_dict()))
    return 0


def cmd_ls_store(args: argparse.Namespace) -> int:
    """``cdm ls --store``: the compartments and the router of a local store."""
    from cdm.store import LocalStore

    store = LocalStore(args.store)
    rows = [store.manifest(n).to_dict() for n in store.sources()]
    rm = store.router_manifest()
    doc: dict[str, Any] = {
        "store": str(args.store),
        "routing": store.routing_kind(),
        "compartments": rows,
        "router": rm.to_dict() if rm else None,
    }
    if args.json:
        print(json.dumps(doc))
    else:
        for r in rows:
            print(
                f"{r['name']:20s} n={r['n_samples']:6d} steps={r['steps']:5d} loss={r['final_loss']:.4f} "
                f"fp={r['fingerprint'][:12]}"
            )
        if rm:
            print(f"router over {rm.source_names}, held-out accuracy {rm.report['accuracy']:.3f}")
    return 0
