"""TopK SAEs on attention heads' result ``z``, trained with SAELens from one shared stream.

``train_saes`` is the generic core: a stream of ``{source: rows}`` blocks (one block per model
forward pass), a map from SAE target to the sources its input concatenates, a config; it
estimates each source's normalisation on a calibration chunk, trains every (target, k) SAE in
lockstep with SAELens' ``MultiSAETrainer`` (one ``SAETrainer`` per SAE, each with its own Adam
and cosine schedule, all fed the same shuffled batches), folds the normalisation back into the
weights and saves each SAE in SAELens' layout. ``train_head_saes`` feeds it from a model.

Saved layout, under ``out``::

    saes/summary.json            the config and one record per SAE (TrainedSae fields)
    saes/<name>/cfg.json         SAELens' inference config (architecture "topk"), metadata
                                 holding ``eigengap`` (sources, mean, scale, k, held-out stats)
    saes/<name>/sae_weights.safetensors

``name`` is ``<target>_k<k>``: ``L3H5_k8`` (head 5 of layer 3, input ``d_head``) or ``L3_k8``
(layer 3, all heads' ``z`` concatenated in head order). The saved weights act on raw ``z``:
training saw ``(z - mean) / scale`` per head, and SAELens' ``fold_activation_whitening`` (with
the diagonal ``1/scale`` map) folds that affine map into the encoder and decoder exactly, so
``SAE.load_from_disk(path).encode(z)`` gives the trained feature activations and ``decode``
returns to ``z``-space. The statistics stay in the metadata for reference.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from sae_lens import SAE, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.training.mixing_buffer import multi_hook_concat_split_iter
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from torch import Tensor

from spectral.errors import UsageError
from spectral.kernels.scan import ScanSettings
from spectral.models.adapter import HeadAdapter
from spectral.models.loading import LoadedModel
from spectral.saes.activations import (Normalisation, Rows, normalised, rechunk, resolve_targets, take_rows,
                                       z_stream)

SUMMARY = "summary.json"


@dataclass(frozen=True)
class SaeTrainingConfig:
    """How every SAE of one run is trained (the same for all heads)."""

    ks: tuple[int, ...] = (8,)
    """TopK k; one SAE per target and k (a sweep, e.g. (1, 2, 4, 8, 16), for Pareto curves)."""
    expansion: int = 8
    """Dictionary ratio: ``d_sae = expansion * d_in`` for every SAE."""
    tokens: int = 2_000_000
    """Training tokens (rows) each SAE sees, after the calibration chunk."""
    batch_size: int = 4096
    """Rows per optimiser step (fewer for short runs: at least a few hundred steps train well)."""
    lr: float = 1e-2
    lr_end: float = 1e-3
    """Cosine annealing from ``lr`` to ``lr_end`` over the run. On organism-s (3 heads and their 3
    layers, k = 8, expansion 8, 120k tokens) held-out EV of the head SAEs was 0.16-0.18 at lr
    1e-3 with 4096 rows per step, 0.78-0.88 at 1e-3 with 1024, 0.97-0.99 at 4e-3 and
    0.975-0.995 at 1e-2 (layer SAEs 0.93-0.96); on organism-l's 48 heads, 200k tokens at 1e-2,
    median 0.991 (min 0.965) with 1024 rows per step and 0.979 (0.939) with 4096, at 3,600 vs
    6,100 tokens/s. Inputs are normalised to unit variance per coordinate, so one rate serves
    every head."""
    calibration_tokens: int = 8192
    """Rows at the start of the stream used for the normalisation statistics and held out of
    training: the held-out explained variance and L0 are measured on them."""
    buffer_batches: int = 8
    """Shuffle buffer size in batches (SAELens' mixing buffer; tokens of one prompt spread)."""
    dead_feature_window: int = 100
    """Steps without firing after which a feature counts as dead (drives the TopK aux loss)."""
    seed: int = 0

    def check(self, min_d_in: int) -> None:
        """A UsageError naming the field for a setting that cannot train (``min_d_in``: the
        smallest SAE input width of the run)."""
        if not self.ks:
            raise UsageError("ks: give at least one k")
        if self.expansion < 1:
            raise UsageError(f"expansion must be >= 1 (got {self.expansion})")
        d_sae = self.expansion * min_d_in
        for k in self.ks:
            if not 0 < k <= d_sae:
                raise UsageError(f"k={k} out of range: need 1 <= k <= dictionary size {d_sae} "
                                 f"(expansion {self.expansion} x d_in {min_d_in})")
        if self.batch_size < 1 or self.tokens < self.batch_size:
            raise UsageError(f"tokens ({self.tokens}) must be at least batch_size ({self.batch_size}) >= 1")
        if self.calibration_tokens < 2:
            raise UsageError("calibration_tokens must be >= 2")
        if not 0 < self.lr_end <= self.lr:
            raise UsageError(f"need 0 < lr_end ({self.lr_end}) <= lr ({self.lr})")


@dataclass(frozen=True)
class TrainedSae:
    """One trained SAE and its held-out statistics (on the calibration rows, in ``z``-space)."""

    name: str
    target: str
    """``L3H5`` or ``L3``."""
    k: int
    d_in: int
    d_sae: int
    sources: tuple[str, ...]
    explained_variance: float
    """``1 - sum |z - z_hat|^2 / sum |z - mean z|^2`` over the held-out rows."""
    l0: float
    """Mean number of active features per held-out row."""
    dead_features: int
    """Features active on no held-out row."""
    path: str
    sae: SAE = field(repr=False, compare=False, default=None)
    """The trained SAE in memory (folded, ``z``-space); not saved in the summary."""


@dataclass(frozen=True)
class SaeTrainingResult:
    saes: list[TrainedSae]
    tokens: int
    """Training rows each SAE saw."""
    seconds: float
    """Wall time of the whole run (streaming, calibration, training, saving)."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def train_head_saes(loaded: LoadedModel, prompts: Sequence[str], config: SaeTrainingConfig, out: str | Path,
                    *, heads: Iterable[tuple[int, int]] | None = None, layers: Iterable[int] | None = None,
                    per_layer: bool = True, settings: ScanSettings | None = None) -> SaeTrainingResult:
    """Per-head SAEs for ``heads`` (all heads of ``layers``, all layers when both are None) and,
    with ``per_layer``, one SAE per layer on all its heads' ``z``; one forward pass per batch
    of ``settings`` (batch_size, max_tokens) feeds them all. Writes under ``out/saes``."""
    adapter = HeadAdapter(loaded.model)
    targets = resolve_targets(adapter, heads, layers, per_layer)
    config.check(targets.d_head)
    stream = z_stream(loaded, prompts, settings or ScanSettings(), targets)
    return train_saes(stream, targets.groups(), config, out, model_name=loaded.spec.text, hooks=targets.hooks())


def train_saes(stream: Iterator[Rows], groups: dict[str, tuple[str, ...]], config: SaeTrainingConfig,
               out: str | Path, *, model_name: str | None = None,
               hooks: dict[str, dict] | None = None) -> SaeTrainingResult:
    """Train one TopK SAE per (target in ``groups``, k in ``config.ks``) from ``stream``
    (``{source: (n, d)}`` blocks with the same n); save them under ``out/saes``."""
    start = time.perf_counter()
    out = Path(out)
    _check_out(out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        held_out, rest = take_rows(stream, config.calibration_tokens)
        widths = {g: sum(held_out[s].shape[1] for s in srcs) for g, srcs in groups.items()}
        config.check(min(widths.values()))
        norms = {s: Normalisation.estimate(rows) for s, rows in held_out.items()}
        saes = {f"{g}_k{k}": _new_sae(widths[g], config, k, model_name, (hooks or {}).get(g, {}))
                for g in groups for k in config.ks}
        targets = {name: name.rpartition("_k")[0] for name in saes}
        trainer = MultiSAETrainer(cfg=_trainer_config(config), saes=saes, hook_names=targets,
                                  data_provider=_batches(rest, groups, norms, config))
        trainer.fit()
    trained = []
    for name, sae in saes.items():
        target = targets[name]
        _fold(sae, [norms[s] for s in groups[target]])
        trained.append(_summarise(name, target, groups[target], sae, _concat(held_out, groups[target]),
                                  norms, out / "saes" / name))
        sae.save_inference_model(out / "saes" / name)
    summary = {"config": asdict(config), "model": model_name,
               "saes": [{k: v for k, v in asdict(t).items() if k != "sae"} for t in trained]}
    (out / "saes" / SUMMARY).write_text(json.dumps(summary, indent=1))
    return SaeTrainingResult(trained, trainer.n_training_samples, time.perf_counter() - start)


def load_saes(out: str | Path) -> dict[str, SAE]:
    """Every SAE a run saved under ``out/saes``, by name, through SAELens' ``SAE.load_from_disk``."""
    root = Path(out) / "saes"
    if not (root / SUMMARY).is_file():
        raise UsageError(f"{root} holds no trained SAEs (no {SUMMARY})")
    names = [row["name"] for row in json.loads((root / SUMMARY).read_text())["saes"]]
    return {name: SAE.load_from_disk(root / name) for name in names}


# ---------------------------------------------------------------------------- pieces


def _check_out(out: Path) -> None:
    if (out / "saes").exists() and any((out / "saes").iterdir()):
        raise UsageError(f"{out / 'saes'} already holds SAEs; choose a new output directory")


def _new_sae(d_in: int, config: SaeTrainingConfig, k: int, model_name: str | None, hook: dict) -> TopKTrainingSAE:
    cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=config.expansion * d_in, k=k, dtype="float32", device="cpu",
                                apply_b_dec_to_input=True, normalize_activations="none")
    cfg.metadata.model_name = model_name
    for key, value in hook.items():
        cfg.metadata[key] = value
    return TopKTrainingSAE(cfg)


def _trainer_config(config: SaeTrainingConfig) -> SAETrainerConfig:
    return SAETrainerConfig(
        total_training_samples=config.tokens, train_batch_size_samples=config.batch_size,
        lr=config.lr, lr_end=config.lr_end, lr_scheduler_name="cosineannealing", device="cpu",
        dead_feature_window=config.dead_feature_window, feature_sampling_window=config.dead_feature_window,
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=0)


def _concat(rows: Rows, sources: tuple[str, ...]) -> Float[Tensor, "n d"]:
    return rows[sources[0]] if len(sources) == 1 else torch.cat([rows[s] for s in sources], dim=1)


def _batches(stream: Iterator[Rows], groups: dict[str, tuple[str, ...]], norms: dict[str, Normalisation],
             config: SaeTrainingConfig) -> Iterator[dict[str, Tensor]]:
    """Fixed-size shuffled batches (SAELens' mixing buffer, shared across sources so rows stay
    aligned), one ``(batch, d_in)`` tensor per target; a UsageError when the stream runs dry
    before ``config.tokens``."""
    sources = sorted({s for srcs in groups.values() for s in srcs})
    mixed = multi_hook_concat_split_iter(config.buffer_batches * config.batch_size, config.batch_size,
                                         normalised(rechunk(stream, config.batch_size), norms), sources)
    served = 0
    for batch in mixed:
        served += config.batch_size
        yield {g: _concat(batch, srcs) for g, srcs in groups.items()}
    raise UsageError(f"the prompts gave only {served + config.calibration_tokens} tokens; training asks for "
                     f"{config.tokens} after {config.calibration_tokens} calibration tokens")


def _fold(sae: TopKTrainingSAE, norms: list[Normalisation]) -> None:
    """Fold ``(z - mean) / scale`` (per source, in order) into the weights: afterwards the SAE
    reads raw ``z`` and decodes to ``z``."""
    mean = torch.cat([n.mean for n in norms])
    scale = torch.cat([torch.full_like(n.mean, n.scale) for n in norms])
    sae.fold_activation_whitening(mean=mean, whitening_matrix=torch.diag(1 / scale),
                                  unwhitening_matrix=torch.diag(scale))
    sae.cfg.metadata["eigengap"] = {"mean": mean.tolist(), "scale": [n.scale for n in norms]}


@torch.no_grad()
def _summarise(name: str, target: str, sources: tuple[str, ...], sae: TopKTrainingSAE, z: Tensor,
               norms: dict[str, Normalisation], path: Path) -> TrainedSae:
    sae.eval()
    acts = sae.encode(z)
    recon = sae.decode(acts)
    ev = 1 - (z - recon).pow(2).sum() / (z - z.mean(0)).pow(2).sum()
    active = acts != 0
    trained = TrainedSae(name=name, target=target, k=sae.cfg.k, d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae,
                         sources=sources, explained_variance=ev.item(), l0=active.sum(-1).float().mean().item(),
                         dead_features=int((~active.any(0)).sum()), path=str(path), sae=sae)
    sae.cfg.metadata["eigengap"].update(sources=list(sources), k=trained.k, held_out_rows=len(z),
                                        explained_variance=trained.explained_variance, l0=trained.l0,
                                        dead_features=trained.dead_features)
    return trained
