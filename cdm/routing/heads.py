"""Per-source router heads: w = softmax_{i in S}(log lambda_i + h_i(x_t, t, c)), one head per compartment.

Each head h_i is a density-ratio classifier trained on ONE source's data only, against a fixed, source-independent
reference: x_0^ref ~ N(0, I) in model space, so under the DDPM forward process (x_t = sqrt(a) x_0 + sqrt(1-a) eps)
x_t^ref ~ N(0, I) at every t. Logistic loss on balanced batches (positives: the source's images noised with the
compartments' schedule; negatives: N(0, I) draws at the same t with the same class label, the label dropped to the
null class with probability ``[router] label_dropout``) has the optimum

    h_i(x_t, t, c) = log q_i(x_t | t, c) - log N(x_t; 0, I),

and the reference term is the same for every head, so softmax_i(log lambda_i(c) + h_i) = P(i | x_t, t, c) with
lambda_i(c) proportional to n_i (the null class) or n_{i,c} (a labelled row; a zero count means compartment i never
runs on class c), as for the density kind. The composition is ``HeadsComposition``: the learnt kind's
``ComposedDenoiser`` with a "router" built from the heads (``HeadsRouter``), so full and top-k mixtures, per-row
allowed masks and guidance (each branch with its own weights) work as there; a head is evaluated only on the rows
whose allowed set contains its source, and a compartment only where its weight is > 0 (top-1: one compartment pass
plus |S| head passes per step).

No artifact depends on more than one source: the head is stored in its compartment's directory (``head.json`` +
``head.safetensors``, hashed in its manifest: cdm/compartment.py), trained after the compartment by
``cdm.lifecycle.Lifecycle.train`` (so a forget-samples retrains compartment + head, a forget-source deletes both and
trains nothing), and no cross-source data copy is needed. Heads train through ``cdm.training.TrainLoop`` with the
``[router]`` section's fields (steps, batch_size = positives + negatives, lr, channels, label_dropout, seed, device,
eval_samples, threads, checkpoint_every): seeds, threads, progress, checkpoints and resume as for the learnt router.
The network is the learnt ``Router`` with one output.

Where the ratio estimate breaks down (measured in tests/cdm/test_routing_heads.py on two well-separated 8x8 toy
sources, heads of 600 steps): at low noise both sources are far from N(0, I), the classifiers saturate (positives
and negatives are separable by any feature), and the logit difference between two heads is no longer the log-ratio
of the two sources: it is set by how each saturated head extrapolates. See that test's docstring for the numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from cdm.compartment import CompartmentHead, class_input, drop_labels
from cdm.compose import ComposedDenoiser, check_class_priors, row_priors
from cdm.config import ModelConfig, RouterConfig, RoutingKind, to_dict
from cdm.data import SourceData, fingerprint, to_model_tensor
from cdm.denoiser import expand_timesteps
from cdm.errors import ConfigError, TrainingInterrupted
from cdm.routing.learnt import NOISE_BINS, Router, router_spec, router_train_config
from cdm.training import ResumableBatches, TrainLoop, check_trainable, resolve_device

HEAD_FORMAT = 1

HeadBatch = tuple[torch.Tensor, torch.Tensor | None]  # (x_0, class labels or None)


class HeadObjective:
    """Logistic loss of the source's noised images (label 1) against N(0, I) draws (label 0), at the same t and with
    the same class (dropped to the null class with probability ``label_dropout``): the optimum logit is
    log q_i(x_t | t, c) - log N(x_t; 0, I)."""

    def __init__(
        self, scheduler: DDPMScheduler, *, num_classes: int, label_dropout: float, device: torch.device
    ) -> None:
        self.scheduler, self.num_classes, self.label_dropout, self.device = (
            scheduler,
            num_classes,
            label_dropout,
            device,
        )

    def __call__(self, model: nn.Module, batch: HeadBatch, generator: torch.Generator) -> torch.Tensor:
        x0, labels = batch
        x0 = x0.to(self.device)
        n = len(x0)
        # 1. timesteps, the positives' noise, the reference draws and the dropped labels, from the step's generator
        t = torch.randint(0, int(self.scheduler.config.num_train_timesteps), (n,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        reference = torch.randn(x0.shape, generator=generator).to(self.device)
        t = t.to(self.device)
        c = class_input(labels, n, self.num_classes, self.device)
        if c is not None and self.label_dropout > 0:
            c = drop_labels(c, self.label_dropout, self.num_classes, generator)
        # 2. positives x_t ~ q_i(x_t | t, c), negatives x_t ~ N(0, I), one forward pass
        x_t = self.scheduler.add_noise(x0, noise, t)
        logits = model(torch.cat([x_t, reference]), torch.cat([t, t]), None if c is None else torch.cat([c, c]))
        target = torch.cat([torch.ones(n, device=self.device), torch.zeros(n, device=self.device)])
        return F.binary_cross_entropy_with_logits(logits[:, 0].float(), target)


def head_network(head: CompartmentHead, *, device: str | torch.device = "cpu") -> Router:
    """The evaluable network of a stored head (in eval mode, no gradients)."""
    spec = head.doc.get("network")
    if not isinstance(spec, dict):
        raise ConfigError("a head document has no 'network' object; the head is corrupt, retrain its compartment")
    net = Router(**spec)
    net.load_state_dict(head.state)
    net.eval().requires_grad_(False)
    return net.to(device)


def train_head(
    name: str,
    data: SourceData,
    *,
    model: ModelConfig,
    router: RouterConfig,
    num_classes: int,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    workdir: Path | None = None,
) -> CompartmentHead:
    """Fit the head of source ``name`` on ``data`` alone (see the module docstring); resumable like the router.

    With ``workdir`` the run checkpoints to ``workdir/train_state`` every ``router.checkpoint_every`` steps and
    resumes from there when rerun on the same data and config. Raises TrainingInterrupted when ``should_stop``
    stops it (after saving a checkpoint when there is a ``workdir``).
    """
    started = time.perf_counter()
    check_trainable(name, data, model=model, num_classes=num_classes)
    device = resolve_device(router.device)
    if router.threads > 0:
        torch.set_num_threads(router.threads)
    torch.manual_seed(router.seed)
    x = to_model_tensor(data.images, model.sample_size)
    labels = torch.as_tensor(data.labels, dtype=torch.long) if (data.labels is not None and num_classes) else None
    spec = router_spec([name], model, router, num_classes)
    net = Router(**spec)
    sched = DDPMScheduler(**model.scheduler_config())
    fp = fingerprint(data)
    loop = TrainLoop(
        net,
        train=router_train_config(router),
        objective=HeadObjective(sched, num_classes=num_classes, label_dropout=router.label_dropout, device=device),
        resume_key={"head": name, "source": fp, "router": to_dict(router), "model": to_dict(model)},
        workdir=workdir,
        progress=progress,
        should_stop=should_stop,
        desc=f"head {name}",
    )
    start = loop.try_resume()
    positives = max(1, router.batch_size // 2)  # a batch: this many positives and as many reference draws
    if loop.run_loop(ResumableBatches(x, labels, positives, seed=router.seed, start_step=start)):
        raise TrainingInterrupted(f"head training of {name} was stopped at step {loop.step} of {router.steps}")
    net.eval().requires_grad_(False)
    report = evaluate_head(net, x, sched, samples=router.eval_samples, seed=router.seed)
    doc = {
        "format": HEAD_FORMAT,
        "source": name,
        "fingerprint": fp,
        "n_samples": len(data),
        "network": spec,
        "router": to_dict(router),
        "steps": loop.step,
        "final_loss": loop.recent_loss() if loop.losses else 0.0,
        "train_seconds": time.perf_counter() - started,
        "report": report,
    }
    return CompartmentHead(doc, {k: v.detach().cpu().clone() for k, v in net.state_dict().items()})


@torch.no_grad()
def evaluate_head(
    net: nn.Module, x: torch.Tensor, sched: DDPMScheduler, *, samples: int, seed: int
) -> dict[str, list[float]]:
    """In-sample check of a head, class hidden: per noise bin (low noise first), its accuracy at telling the source's
    noised images from N(0, I) draws, and the mean logit of each."""
    g = torch.Generator().manual_seed(seed + 1)
    T = int(sched.config.num_train_timesteps)
    idx = torch.randint(0, len(x), (min(samples, 4 * len(x)),), generator=g)
    x0 = x[idx]
    device = next(net.parameters()).device
    acc, pos, neg = [], [], []
    for b in range(NOISE_BINS):
        lo, hi = b * T // NOISE_BINS, (b + 1) * T // NOISE_BINS
        t = torch.randint(lo, hi, (len(x0),), generator=g)
        x_t = sched.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        ref = torch.randn(x0.shape, generator=g)
        hp = net(x_t.to(device), t.to(device), None)[:, 0].float().cpu()
        hn = net(ref.to(device), t.to(device), None)[:, 0].float().cpu()
        acc.append(float(((hp > 0).float().mean() + (hn <= 0).float().mean()) / 2))
        pos.append(float(hp.mean()))
        neg.append(float(hn.mean()))
    return {"accuracy_by_noise": acc, "mean_logit_source_by_noise": pos, "mean_logit_reference_by_noise": neg}


class HeadsRouter(nn.Module):
    """The heads of K sources as one router: logits (N, K) = log lambda_i(c) + h_i(x_t, t, c).

    Args:
        heads: one module per source, (x_t, t, c) -> (N,) or (N, 1) logits.
        names: the sources' names (the columns).
        priors: (K,) lambda_i (any positive scale; default uniform), for unlabelled and null-class rows.
        class_priors: optional (K, num_classes) counts n_{i,c} for labelled rows; a zero means source i is never
            used (its head and compartment never evaluated) on rows of class c.
    """

    def __init__(
        self,
        heads: Sequence[nn.Module],
        names: Sequence[str],
        *,
        priors: torch.Tensor | None = None,
        class_priors: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        k = len(names)
        if len(heads) != k:
            raise ConfigError(f"{len(heads)} heads for {k} sources {list(names)}")
        self.heads = nn.ModuleList(heads)
        self.source_names = [str(n) for n in names]
        lam = torch.ones(k, dtype=torch.float64) if priors is None else torch.as_tensor(priors).double()
        if tuple(lam.shape) != (k,) or not bool(torch.isfinite(lam).all()) or bool((lam <= 0).any()):
            raise ConfigError(f"priors must be {k} finite positive numbers, got {lam.tolist()}")
        self.priors = lam
        self.class_priors = check_class_priors(class_priors, k)

    def log_prior(self, n: int, class_labels: torch.Tensor | None) -> torch.Tensor:
        """(N, K) log lambda_i(c) per row (-inf where a class count is zero), float64 on the CPU."""
        return row_priors(self.priors, self.class_priors, class_labels, n).log()

    def logits(
        self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, K) logits on the rows ``mask`` allows (-inf elsewhere) and the mask narrowed to nonzero priors; head i
        runs once, on exactly the rows where source i is allowed."""
        n = x_t.shape[0]
        tt = expand_timesteps(t, n, x_t.device)
        lp = self.log_prior(n, class_labels).to(x_t.device)
        mask = mask.to(x_t.device) & torch.isfinite(lp)
        empty = (~mask.any(1)).nonzero(as_tuple=True)[0]
        if empty.numel():
            raise ConfigError(
                f"row {int(empty[0])} has prior 0 for every source it may use; check priors / class_priors / allowed"
            )
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        out = torch.full((n, len(self.heads)), -math.inf, dtype=dtype, device=x_t.device)
        for i, head in enumerate(self.heads):
            rows = mask[:, i].nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            if rows.numel() == n:
                out[:, i] = head(x_t, tt, class_labels).reshape(n).to(dtype) + lp[:, i].to(dtype)
            else:
                c = class_labels[rows] if class_labels is not None else None
                h = head(x_t[rows], tt[rows], c).reshape(rows.numel()).to(dtype)
                out[rows, i] = h + lp[rows, i].to(dtype)
        return out, mask

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Every head on every row (image attribution, reports): (N, K) logits, -inf where a class prior is 0."""
        everything = torch.ones((x_t.shape[0], len(self.heads)), dtype=torch.bool, device=x_t.device)
        return self.logits(x_t, t, class_labels, everything)[0]


class HeadsComposition(ComposedDenoiser):
    """The heads kind: ``ComposedDenoiser`` with a ``HeadsRouter`` whose heads run only on the allowed rows.

    Build it with ``cdm.routing.build_composition("heads", ...)`` from compartments that carry heads, or directly
    with ``HeadsComposition(compartments, HeadsRouter(...), names, ...)`` (``ComposedDenoiser``'s arguments).
    """

    kind: RoutingKind = "heads"

    def __init__(self, compartments: Sequence[nn.Module], router: nn.Module, source_names: Sequence[str], **kw: Any):
        if not isinstance(router, HeadsRouter):
            raise ConfigError(f"the heads routing kind composes with a HeadsRouter, got {type(router).__name__}")
        if [str(n) for n in source_names] != router.source_names:
            raise ConfigError(f"the heads {router.source_names} are not those of the sources {list(source_names)}")
        super().__init__(compartments, router, source_names, **kw)

    def _logits(
        self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        router = self.router
        assert isinstance(router, HeadsRouter)
        return router.logits(x_t, t, class_labels, mask)


def heads_of(compartments: Sequence[nn.Module], names: Sequence[str]) -> list[nn.Module]:
    """The head networks of loaded compartments, each checked to be trained on its compartment's data."""
    nets: list[nn.Module] = []
    for comp, name in zip(compartments, names, strict=True):
        head: CompartmentHead | None = getattr(comp, "head", None)
        if head is None:
            raise ConfigError(
                f"compartment {name!r} has no router head; retrain it with [router] kind = 'heads' or use another kind"
            )
        manifest = getattr(comp, "manifest", None)
        want = getattr(manifest, "fingerprint", None)
        if want is not None and head.doc.get("fingerprint") != want:
            raise ConfigError(f"the head of {name!r} was trained on other data than its compartment; retrain it")
        first = next(iter(comp.parameters()), None)
        nets.append(head_network(head, device=first.device if first is not None else "cpu"))
    return nets
