"""Evaluation without pretrained weights: a feature classifier trained here, FID, KID and memorisation.

The classifier is a small CNN trained deterministically on Fashion-MNIST at the model's sample size and cached
(safetensors + JSON) under a content hash of its training data, recipe and code version; the cached weights'
sha256 is verified on every load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from cdm.artifacts import atomic_directory, save_tensors, sha256_file, write_json
from cdm.data import SourceData, batches, fingerprint, load_fashion_mnist, to_model_tensor
from cdm.errors import DataError, IntegrityError

logger = logging.getLogger(__name__)

CODE_VERSION = "cdm-feature-extractor-1"  # bump when the network or training code changes (invalidates caches)
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "meta.json"
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601: RGB images are scored as grayscale


# ----------------------------------------------------------------------------------------------------------
# Feature classifier


@dataclass(frozen=True)
class ExtractorConfig:
    """Architecture and training recipe of the feature classifier (all of it is part of the cache key)."""

    widths: tuple[int, ...] = (32, 64, 128)  # conv widths; the first is the stem, each later one halves H,W
    feature_dim: int = 128  # size of the penultimate layer (the features FID/KID use)
    dropout: float = 0.2  # dropout before the feature layer
    epochs: float = 3.0  # passes over the training data
    batch_size: int = 128  # samples per step
    lr: float = 3e-3  # peak AdamW learning rate (one-cycle schedule)
    weight_decay: float = 5e-4  # AdamW weight decay
    warmup_frac: float = 0.2  # fraction of steps spent warming up
    eval_batch_size: int = 1000  # images per forward pass when scoring


class FeatureNet(nn.Module):
    """Conv(-BN-ReLU) stem + stride-2 blocks -> flatten -> ReLU(Linear) features -> class logits."""

    def __init__(self, sample_size: int, num_classes: int, config: ExtractorConfig) -> None:
        super().__init__()
        if not config.widths:
            raise ValueError("ExtractorConfig.widths must name at least one conv width")
        layers: list[nn.Module] = []
        # 1. stem: at >= 24 px a 4x4 stride-2 conv (halves the cost), else a 3x3 stride-1 conv
        side = sample_size
        if sample_size >= 24:
            layers += [nn.Conv2d(1, config.widths[0], 4, 2, 1, bias=False)]
            side = (side + 2 - 4) // 2 + 1
        else:
            layers += [nn.Conv2d(1, config.widths[0], 3, 1, 1, bias=False)]
        layers += [nn.BatchNorm2d(config.widths[0]), nn.ReLU(inplace=True)]
        # 2. stride-2 blocks
        for c_in, c_out in zip(config.widths[:-1], config.widths[1:], strict=True):
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            side = (side - 1) // 2 + 1
        # 3. cap the flattened grid at 4x4
        if side > 4:
            layers.append(nn.AdaptiveAvgPool2d(4))
            side = 4
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Dropout(config.dropout))
        self.embed = nn.Linear(config.widths[-1] * side * side, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.embed(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _grayscale(images: np.ndarray) -> np.ndarray:
    """uint8 (N,H,W[,C]) -> uint8 (N,H,W,1); RGB is converted with BT.601 luma weights."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        got = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
        raise DataError(f"images must be a uint8 array (N,H,W) or (N,H,W,C); got {got}")
    if images.ndim == 3:
        return images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"images must be (N,H,W) or (N,H,W,C) with C in (1, 3); got {images.shape}")
    if images.shape[-1] == 1:
        return images
    return np.clip(np.round(images @ _LUMA), 0, 255).astype(np.uint8)[..., None]


class FeatureExtractor:
    """A trained FeatureNet plus what it was trained on; scores uint8 images of any size (resized to S)."""

    def __init__(
        self,
        net: FeatureNet,
        *,
        sample_size: int,
        meta: Mapping[str, Any],
        device: str | torch.device = "cpu",
        from_cache: bool = False,
    ) -> None:
        self.net = net.to(device).eval()
        self.sample_size = sample_size
        self.meta = dict(meta)
        self.device = torch.device(device)
        self.from_cache = from_cache  # True when the weights were loaded from the cache, not trained now
        self.test_accuracy = float(meta["test_accuracy"])
        self.feature_dim = int(net.embed.out_features)
        self.eval_batch_size = int(meta.get("config", {}).get("eval_batch_size", 1000))

    def __repr__(self) -> str:
        return (
            f"FeatureExtractor(sample_size={self.sample_size}, feature_dim={self.feature_dim}, "
            f"test_accuracy={self.test_accuracy:.4f}, from_cache={self.from_cache})"
        )

    def _batched(self, images: np.ndarray, fn: str) -> torch.Tensor:
        gray = _grayscale(images)
        out = []
        with torch.no_grad():
            for i in range(0, gray.shape[0], self.eval_batch_size):
                x = to_model_tensor(gray[i : i + self.eval_batch_size], self.sample_size).to(self.device)
                out.append(getattr(self.net, fn)(x).float().cpu())
        if not out:
            width = self.feature_dim if fn == "features" else int(self.net.head.out_features)
            return torch.zeros(0, width)
        return torch.cat(out)

    def features(self, images: np.ndarray) -> np.ndarray:
        """Penultimate-layer features (N, feature_dim) of uint8 images (N,H,W[,C]), float32."""
        return self._batched(images, "features").numpy()

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Class logits (N, num_classes)."""
        return self._batched(images, "forward").numpy()

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Predicted class ids (N,) int64."""
        return self._batched(images, "forward").argmax(dim=1).numpy().astype(np.int64)

    def accuracy(self, data: SourceData) -> float:
        """Fraction of ``data`` classified correctly."""
        if data.labels is None:
            raise DataError("accuracy needs labelled data")
        return float(np.mean(self.predict(data.images) == data.labels))

    # -- persistence --------------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write weights + meta.json (with the weights' sha256) atomically (``cdm.artifacts.atomic_directory``)."""
        directory = Path(directory)
        try:
            with atomic_directory(directory) as tmp:
                save_tensors(tmp / WEIGHTS_FILE, self.net.state_dict())
                write_json(tmp / META_FILE, {**self.meta, "weights_sha256": sha256_file(tmp / WEIGHTS_FILE)})
        except OSError:
            if not (directory / META_FILE).is_file():  # a concurrent writer did not win the race either
                raise
        self.meta = json.loads((directory / META_FILE).read_text())
        return directory

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], *, device: str | torch.device = "cpu", expected_key: str | None = None
    ) -> FeatureExtractor:
        """Load a saved extractor; IntegrityError if the weights' sha256 or the cache key does not match."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text())
            recorded = meta["weights_sha256"]
            config = ExtractorConfig(**{**meta["config"], "widths": tuple(meta["config"]["widths"])})
            sample_size, num_classes = int(meta["sample_size"]), int(meta["num_classes"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{directory / META_FILE}: unreadable extractor metadata ({exc})") from exc
        if expected_key is not None and meta.get("key") != expected_key:
            raise IntegrityError(f"{directory}: cache key {meta.get('key')!r} does not match {expected_key!r}")
        weights = directory / WEIGHTS_FILE
        actual = sha256_file(weights) if weights.is_file() else "missing"
        if actual != recorded:
            raise IntegrityError(f"{weights}: sha256 {actual} does not match the recorded {recorded}")
        net = FeatureNet(sample_size, num_classes, config)
        try:
            net.load_state_dict(load_file(str(weights)), strict=True)
        except Exception as exc:  # the hash matched, so this is a code/weights mismatch
            raise IntegrityError(f"{weights}: weights do not fit the network ({exc})") from exc
        return cls(net, sample_size=sample_size, meta=meta, device=device, from_cache=True)


@contextmanager
def _deterministic(device: torch.device, seed: int) -> Iterator[None]:
    """Seed a forked RNG and switch on deterministic algorithms; restore the caller's settings afterwards."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        # CUDA may lack deterministic kernels without CUBLAS_WORKSPACE_CONFIG: warn there instead of failing.
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)


def _train_extractor(
    train: SourceData,
    test: SourceData,
    *,
    sample_size: int,
    num_classes: int,
    config: ExtractorConfig,
    seed: int,
    device: torch.device,
    progress: bool,
) -> tuple[FeatureNet, float, float]:
    """Train the classifier with AdamW + one-cycle LR; returns (net, test accuracy, seconds)."""
    assert train.labels is not None and test.labels is not None
    t0 = time.perf_counter()
    with _deterministic(device, seed):
        x = to_model_tensor(_grayscale(train.images), sample_size).to(device)
        y = torch.from_numpy(train.labels.copy()).to(device)
        net = FeatureNet(sample_size, num_classes, config).to(device)
        steps = max(1, math.ceil(config.epochs * len(train) / config.batch_size))
        opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=config.lr, total_steps=steps, pct_start=config.warmup_frac
        )
        data = batches(x, y, config.batch_size, seed=seed)
        net.train()
        for _ in tqdm(range(steps), desc=f"feature extractor {sample_size}px", disable=not progress):
            # 1. next batch -> 2. cross-entropy -> 3. AdamW step -> 4. LR schedule step
            xb, yb = next(data)
            assert yb is not None
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
    extractor = FeatureExtractor(net, sample_size=sample_size, meta={"test_accuracy": 0.0}, device=device)
    accuracy = extractor.accuracy(test)
    return net, accuracy, time.perf_counter() - t0


def extractor_cache_key(
    sample_size: int, *, seed: int, config: ExtractorConfig, train: SourceData, test: SourceData
) -> str:
    """sha256 of the training + test data fingerprints, the recipe, the sample size, the seed and CODE_VERSION."""
    payload = {
        "code_version": CODE_VERSION,
        "sample_size": sample_size,
        "seed": seed,
        "config": dataclasses.asdict(config),
        "train": fingerprint(train),
        "test": fingerprint(test),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def get_feature_extractor(
    sample_size: int,
    *,
    cache_dir: str | os.PathLike[str],
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    config: ExtractorConfig | None = None,
    train: SourceData | None = None,
    test: SourceData | None = None,
) -> FeatureExtractor:
    """The feature classifier for ``sample_size``: loaded from ``cache_dir`` if cached and intact, else trained.

    ``train``/``test`` default to the Fashion-MNIST splits; a cache entry whose weights fail their sha256 check is
    logged, deleted and retrained.
    """
    if sample_size < 1:
        raise ValueError(f"sample_size must be >= 1; got {sample_size}")
    config = config or ExtractorConfig()
    train = train if train is not None else load_fashion_mnist("train")
    test = test if test is not None else load_fashion_mnist("test")
    if train.labels is None or test.labels is None:
        raise DataError("the feature classifier needs labelled train and test data")
    dev = torch.device(device)
    key = extractor_cache_key(sample_size, seed=seed, config=config, train=train, test=test)
    directory = Path(cache_dir) / "feature_extractor" / f"s{sample_size}-{key[:20]}"

    # 1. cached and intact -> use it
    if directory.exists():
        try:
            return FeatureExtractor.load(directory, device=dev, expected_key=key)
        except IntegrityError as exc:
            logger.warning("feature extractor cache entry is corrupt, retraining: %s", exc)
            shutil.rmtree(directory, ignore_errors=True)

    # 2. train deterministically
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    net, accuracy, seconds = _train_extractor(
        train, test, sample_size=sample_size, num_classes=num_classes, config=config, seed=seed, device=dev,
        progress=progress,
    )  # fmt: skip
    logger.info("feature extractor %dpx: test accuracy %.4f after %.1f s", sample_size, accuracy, seconds)
    meta = {
        "format": 1,
        "code_version": CODE_VERSION,
        "key": key,
        "sample_size": sample_size,
        "seed": seed,
        "num_classes": num_classes,
        "config": dataclasses.asdict(config),
        "train_fingerprint": fingerprint(train),
        "test_fingerprint": fingerprint(test),
        "n_train": len(train),
        "n_test": len(test),
        "test_accuracy": accuracy,
        "train_seconds": round(seconds, 3),
        "device": str(dev),
        "torch_version": torch.__version__,
    }
    extractor = FeatureExtractor(net, sample_size=sample_size, meta=meta, device=dev)

    # 3. cache atomically
    extractor.save(directory)
    return extractor


# ----------------------------------------------------------------------------------------------------------
# FID and KID


def _feature_matrix(feats: np.ndarray, name: str, min_rows: int = 2) -> np.ndarray:
    a = np.asarray(feats, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) feature array; got shape {a.shape}")
    if a.shape[0] < min_rows:
        raise ValueError(f"{name} has {a.shape[0]} rows; at least {min_rows} are needed")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) (Heusel et al. 2017, as pytorch-fid)."""
    a, b = _feature_matrix(feats_a, "feats_a"), _feature_matrix(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: feats_a has D={a.shape[1]}, feats_b has D={b.shape[1]}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        # singular product: add a small ridge to both covariances (as pytorch-fid does)
        offset = np.eye(cov_a.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    if np.iscomplexobj(covmean):
        # numerical error can leave a small imaginary residue; a large one means the result is meaningless
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = float(np.max(np.abs(covmean.imag)))
            raise ValueError(f"FID: sqrtm has an imaginary component {worst:.3g}; use more samples than D")
        covmean = covmean.real
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def kid(
    feats_a: np.ndarray, feats_b: np.ndarray, *, subsets: int = 10, subset_size: int = 500, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with k(x,y) = (x.y/d + 1)^3 (Binkowski et al. 2018); (mean, std)."""
    a, b = _feature_matrix(feats_a, "feats_a"), _feature_matrix(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: feats_a has D={a.shape[1]}, feats_b has D={b.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1; got {subsets}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"subset_size must be >= 2; got {subset_size}")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        k_xx = (x @ x.T / d + 1.0) ** 3
        k_yy = (y @ y.T / d + 1.0) ** 3
        k_xy = (x @ y.T / d + 1.0) ** 3
        same = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values[i] = same - 2.0 * k_xy.sum() / (m * m)
    return float(values.mean()), float(values.std())


# ----------------------------------------------------------------------------------------------------------
# Memorisation


@dataclass(frozen=True)
class SourceMemorisation:
    """Memorisation among generated samples whose nearest training neighbour is in one source."""

    n_nearest: int  # generated samples whose nearest neighbour belongs to this source
    n_memorised: int  # of those, how many are memorised
    fraction: float | None  # n_memorised / n_nearest (None when n_nearest = 0)


@dataclass(frozen=True, eq=False)
class MemorisationReport:
    """Nearest-neighbour memorisation test: memorised if d1 < ratio * d2 (Carlini et al. 2023)."""

    ratio: float  # the d1/d2 threshold
    n: int  # generated samples tested
    n_memorised: int  # of which memorised
    fraction: float  # n_memorised / n
    sources: tuple[str, ...]  # training-set names, in the order nearest_source indexes them
    per_source: dict[str, SourceMemorisation]
    nearest_source: np.ndarray = field(repr=False)  # (N,) int64 index into sources of the nearest neighbour
    nearest_index: np.ndarray = field(repr=False)  # (N,) int64 row of the nearest neighbour in its source
    distance_ratio: np.ndarray = field(repr=False)  # (N,) d1 / d2 (0 for exact copies)
    memorised: np.ndarray = field(repr=False)  # (N,) bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no per-sample arrays)."""
        return {
            "ratio": self.ratio,
            "n": self.n,
            "n_memorised": self.n_memorised,
            "fraction": self.fraction,
            "per_source": {k: dataclasses.asdict(v) for k, v in self.per_source.items()},
        }


def _pixel_rows(images: np.ndarray, side: int, channels: int, name: str) -> torch.Tensor:
    imgs = images[..., None] if isinstance(images, np.ndarray) and images.ndim == 3 else images
    if not isinstance(imgs, np.ndarray) or imgs.dtype != np.uint8 or imgs.ndim != 4:
        raise DataError(f"{name} must be uint8 images (N,H,W) or (N,H,W,C)")
    if imgs.shape[-1] != channels:
        raise DataError(f"{name} has {imgs.shape[-1]} channel(s), the generated images have {channels}")
    return to_model_tensor(imgs, side).flatten(1)


def memorisation(
    generated: np.ndarray,
    train_sets: Mapping[str, np.ndarray],
    *,
    ratio: float = 1 / 3,
    chunk: int = 4096,
) -> MemorisationReport:
    """Per generated image: L2 pixel distances d1 <= d2 to its two nearest training images across all sets.

    Training images are resized to the generated size; distances are exact for the two neighbours found.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1]; got {ratio}")
    gen = generated[..., None] if isinstance(generated, np.ndarray) and generated.ndim == 3 else generated
    if not isinstance(gen, np.ndarray) or gen.dtype != np.uint8 or gen.ndim != 4 or gen.shape[1] != gen.shape[2]:
        raise DataError("generated must be square uint8 images (N,S,S) or (N,S,S,C)")
    side, channels = int(gen.shape[1]), int(gen.shape[3])
    names = tuple(train_sets)
    sets = [_pixel_rows(train_sets[k], side, channels, f"train_sets[{k!r}]") for k in names]
    if sum(s.shape[0] for s in sets) < 2:
        raise DataError("memorisation needs at least two training images across train_sets")
    g_all = _pixel_rows(gen, side, channels, "generated")
    n = g_all.shape[0]
    best_d = torch.full((n, 2), math.inf)
    best_src = torch.full((n, 2), -1, dtype=torch.long)
    best_idx = torch.full((n, 2), -1, dtype=torch.long)
    g_step = max(1, chunk // 8)
    for g0 in range(0, n, g_step):
        g = g_all[g0 : g0 + g_step]
        d_run, s_run, i_run = best_d[g0 : g0 + g_step], best_src[g0 : g0 + g_step], best_idx[g0 : g0 + g_step]
        for s, rows in enumerate(sets):
            for t0 in range(0, rows.shape[0], chunk):
                # 1. distances to a chunk of training images -> 2. its two nearest -> 3. merge with the running two
                dist = torch.cdist(g, rows[t0 : t0 + chunk])
                k = min(2, dist.shape[1])
                vals, idx = dist.topk(k, dim=1, largest=False)
                cand_d = torch.cat([d_run, vals], dim=1)
                cand_s = torch.cat([s_run, torch.full_like(idx, s)], dim=1)
                cand_i = torch.cat([i_run, idx + t0], dim=1)
                order = cand_d.argsort(dim=1)[:, :2]
                d_run, s_run, i_run = cand_d.gather(1, order), cand_s.gather(1, order), cand_i.gather(1, order)
        best_d[g0 : g0 + g_step], best_src[g0 : g0 + g_step], best_idx[g0 : g0 + g_step] = d_run, s_run, i_run
    # 4. exact distances for the two neighbours (cdist's matmul path is not exact near 0), re-sorted
    for j in range(2):
        neigh = torch.stack([sets[int(s)][int(i)] for s, i in zip(best_src[:, j], best_idx[:, j], strict=True)])
        best_d[:, j] = (g_all - neigh).pow(2).sum(dim=1).sqrt()
    swap = best_d[:, 1] < best_d[:, 0]
    for t in (best_d, best_src, best_idx):
        t[swap] = t[swap].flip(1)
    d1, d2 = best_d[:, 0].numpy().astype(np.float64), best_d[:, 1].numpy().astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        dist_ratio = np.where(d1 == 0, 0.0, d1 / np.where(d2 == 0, np.inf, d2))
    memorised = (d1 < ratio * d2) | (d1 == 0)
    nearest = best_src[:, 0].numpy().astype(np.int64)
    per_source = {}
    for s, name in enumerate(names):
        mask = nearest == s
        hits, mem = int(mask.sum()), int(memorised[mask].sum())
        per_source[name] = SourceMemorisation(hits, mem, mem / hits if hits else None)
    return MemorisationReport(
        ratio=float(ratio),
        n=int(n),
        n_memorised=int(memorised.sum()),
        fraction=float(memorised.mean()) if n else 0.0,
        sources=names,
        per_source=per_source,
        nearest_source=nearest,
        nearest_index=best_idx[:, 0].numpy().astype(np.int64),
        distance_ratio=dist_ratio,
        memorised=memorised,
    )


# ----------------------------------------------------------------------------------------------------------
# Evaluation report


@dataclass(frozen=True)
class EvalReport:
    """FID/KID of generated images against a reference set in the feature classifier's space."""

    n: int  # generated images scored
    n_reference: int  # reference images
    fid: float  # Fréchet distance of the features
    kid_mean: float  # mean unbiased MMD^2 over subsets
    kid_std: float  # its standard deviation over subsets
    kid_subset_size: int  # samples per KID subset (after clipping to the available samples)
    class_fractions: list[float]  # share of generated images the classifier assigns to each class
    classifier_accuracy: float | None  # agreement with the requested labels (class-conditional sampling)
    extractor_test_accuracy: float  # the classifier's accuracy on its own test split
    memorisation: MemorisationReport | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "memorisation"}
        out["memorisation"] = None if self.memorisation is None else self.memorisation.to_dict()
        return out


def evaluate(
    images: np.ndarray,
    *,
    reference: np.ndarray,
    extractor: FeatureExtractor,
    train_sets: Mapping[str, np.ndarray] | None = None,
    labels: np.ndarray | None = None,
    kid_subsets: int = 10,
    kid_subset_size: int = 500,
    memorisation_ratio: float = 1 / 3,
    seed: int = 0,
) -> EvalReport:
    """FID, KID, classifier agreement and (with ``train_sets``) memorisation of uint8 generated images."""
    # 1. features of both sets
    feats = extractor.features(images)
    ref = extractor.features(reference)
    # 2. distribution distances
    fid_value = fid(feats, ref)
    subset = min(kid_subset_size, feats.shape[0], ref.shape[0])
    kid_mean, kid_std = kid(feats, ref, subsets=kid_subsets, subset_size=subset, seed=seed)
    # 3. what the classifier sees
    logits = torch.from_numpy(extractor.logits(images))
    pred = logits.argmax(dim=1).numpy()
    num_classes = logits.shape[1]
    fractions = np.bincount(pred, minlength=num_classes) / max(1, pred.size)
    accuracy = None
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (feats.shape[0],):
            raise DataError(f"labels must have shape ({feats.shape[0]},); got {labels.shape}")
        accuracy = float(np.mean(pred == labels))
    # 4. memorisation against the training sets
    mem = memorisation(images, train_sets, ratio=memorisation_ratio) if train_sets else None
    return EvalReport(
        n=int(feats.shape[0]),
        n_reference=int(ref.shape[0]),
        fid=fid_value,
        kid_mean=kid_mean,
        kid_std=kid_std,
        kid_subset_size=int(subset),
        class_fractions=[float(f) for f in fractions],
        classifier_accuracy=accuracy,
        extractor_test_accuracy=extractor.test_accuracy,
        memorisation=mem,
    )
