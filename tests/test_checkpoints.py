"""Training checkpoints of organisms: the steps, what each holds, the manifest, errors, and the
plain organisms left as they were."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from transformers import GPTNeoXForCausalLM

from jobs.cli import main
from spectral.errors import UsageError
from spectral.models.loading import load_model
from spectral.organisms import suite
from spectral.organisms.checkpoints import CheckpointWriter, checkpoint_steps, list_checkpoints
from spectral.organisms.evaluate import load_tasks
from spectral.organisms.train import Recipe, train

TINY = Recipe("organism-xs", layers=1, heads=2, hidden=32, intermediate=64, steps=12, batch_size=4)
"""A test-only stand-in for organism-xs: 12 steps, well under a second to train."""
STEPS = [1, 2, 3, 6, 12]
"""checkpoint_steps(12, 5): round(12 ** (i / 4)) = 1, 2, 3, 6, 12 (no collisions to push)."""
PROMPT = "When Mary and John went to the store, John gave a drink to"


@dataclass
class Trained:
    cache: Path
    entry: Path
    """organism-xs-checkpoints5 in ``cache``."""
    plain: Path
    """The same recipe trained without checkpoints (a plain ``train`` call)."""
    reference: dict[int, dict]
    """Per step of the plain run: its weights, batch loss and learning rate, kept in memory."""


def _use(mp: pytest.MonkeyPatch, cache: Path) -> None:
    mp.setenv("EIGENGAP_CACHE", str(cache))
    mp.setitem(suite.SUITE, "organism-xs", TINY)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("checkpoints")
    with pytest.MonkeyPatch.context() as mp:  # undone before the tests run: they set it again
        _use(mp, root / "cache")
        entry = suite.train_organism("organism-xs", checkpoints=5, progress=False)
    reference: dict[int, dict] = {}

    def record(step, model, loss, lr):
        reference[step] = {"weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
                           "loss": loss, "lr": lr}

    train(TINY, root / "plain", progress=False, on_step=record)
    return Trained(root / "cache" / "organisms", entry, root / "plain", reference)


@pytest.fixture
def tiny_suite(trained, monkeypatch) -> Trained:
    _use(monkeypatch, trained.cache.parent)
    return trained


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(tokenizer(PROMPT, return_tensors="pt").input_ids).logits


def test_steps_follow_the_documented_formula():
    assert checkpoint_steps(12, 5) == STEPS
    assert checkpoint_steps(5, 2) == [1, 5]
    assert checkpoint_steps(10, 10) == list(range(1, 11))
    assert checkpoint_steps(100, 0) == []
    # organism-xs's 1,840 steps, 30 checkpoints: ten early steps pushed apart, then the grid
    assert checkpoint_steps(1840, 30) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 17, 22, 29, 38, 49, 63, 82, 106, 138,
                                          178, 231, 300, 388, 503, 652, 845, 1096, 1420, 1840]
    for total in (2, 3, 7, 30, 31, 200, 1920):
        for n in range(2, min(total, 40) + 1):
            steps = checkpoint_steps(total, n)
            assert len(steps) == n and steps[0] == 1 and steps[-1] == total
            assert all(a < b for a, b in zip(steps, steps[1:]))
    for n in (1, 13):
        with pytest.raises(UsageError, match=f"checkpoints={n}: must be 0 .none. or between 2 and the recipe's 12 steps"):
            checkpoint_steps(12, n)


def test_each_checkpoint_loads_as_the_model_at_its_step(tiny_suite):
    checkpoints = suite.organism_checkpoints("organism-xs")
    assert [c.step for c in checkpoints] == STEPS
    for c in checkpoints:
        assert c.path == tiny_suite.entry / "checkpoints" / f"step-{c.step}"
        ref = tiny_suite.reference[c.step]
        assert (c.train_loss, c.lr) == (ref["loss"], ref["lr"])
        loaded = load_model(str(c.path))  # a checkpoint directory is a model spec
        weights = loaded.model.state_dict()
        assert weights.keys() == ref["weights"].keys()
        assert all(torch.equal(weights[k], ref["weights"][k]) for k in weights)
        plain = GPTNeoXForCausalLM(loaded.model.config).eval()
        plain.load_state_dict(ref["weights"])
        assert torch.equal(_logits(loaded.model, loaded.tokenizer), _logits(plain, loaded.tokenizer))
        assert load_tasks(c.path)["names"]  # tasks.json travels with every checkpoint
    first, last = (load_model(str(checkpoints[i].path)).model.state_dict() for i in (0, -1))
    assert not all(torch.equal(first[k], last[k]) for k in first)
    assert [round(c.lr / TINY.lr, 6) for c in checkpoints] == [round(s / TINY.warmup, 6) for s in STEPS]  # warm-up: lr x k / 50


def test_last_checkpoint_is_the_final_model_and_checkpoints_change_nothing(tiny_suite):
    final, last = load_model(str(tiny_suite.entry)), load_model(str(tiny_suite.entry / "checkpoints" / "step-12"))
    plain = load_model(str(tiny_suite.plain))
    a, b, c = (m.model.state_dict() for m in (final, last, plain))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert torch.equal(_logits(final.model, final.tokenizer), _logits(last.model, last.tokenizer))
    # the plain run saves the same weights bit for bit, and no checkpoints
    assert (tiny_suite.entry / "model.safetensors").read_bytes() == (tiny_suite.plain / "model.safetensors").read_bytes()
    assert not (tiny_suite.plain / "checkpoints").exists()


def test_manifests_hold_every_checksum(tiny_suite):
    root = tiny_suite.entry / "checkpoints"
    manifest = json.loads((root / "manifest.json").read_text())
    assert (manifest["total_steps"], manifest["requested"]) == (12, 5)
    assert manifest["recipe"] == {**TINY.as_dict(), "checkpoints": 5}
    assert [(e["step"], e["path"]) for e in manifest["steps"]] == [(s, f"step-{s}") for s in STEPS]
    for entry in manifest["steps"]:
        on_disk = {p.name for p in (root / entry["path"]).iterdir()}
        assert set(entry["files"]) == on_disk >= {"config.json", "model.safetensors", "tokenizer.json", "tasks.json"}
        for name, digest in entry["files"].items():
            assert hashlib.sha256((root / entry["path"] / name).read_bytes()).hexdigest() == digest
    top = json.loads((tiny_suite.entry / "manifest.json").read_text())["files"]
    assert top["checkpoints/manifest.json"] == hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()
    assert json.loads((tiny_suite.entry / "recipe.json").read_text())["recipe"]["checkpoints"] == 5
    suite.verify(tiny_suite.entry)
    assert not list(root.glob(".*"))  # no temporary files left


@pytest.mark.parametrize("damage, message", [
    (lambda root: shutil.rmtree(root / "step-3"), "checkpoint step 3 of {entry} is missing (step-3/config.json is gone)"),
    (lambda root: (root / "step-6" / "model.safetensors").write_bytes(b"\0" * 64),
     "checkpoint step 6 of {entry} is corrupted (step-6/model.safetensors does not match its checksum)"),
])
def test_a_missing_or_corrupted_step_is_one_line(tiny_suite, tmp_path, monkeypatch, capsys, damage, message):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_suite.cache, cache / "organisms")
    monkeypatch.setenv("EIGENGAP_CACHE", str(cache))
    entry = cache / "organisms" / "organism-xs-checkpoints5"
    damage(entry / "checkpoints")
    assert main(["organisms", "checkpoints", "organism-xs"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.format(entry=entry) in err
    assert "eigengap organisms train organism-xs --seeds 0 --checkpoints 5 --force" in err
    with pytest.raises(UsageError, match="checkpoint step"):
        list_checkpoints(entry)


def test_an_interrupted_training_lists_only_complete_steps(tmp_path, monkeypatch):
    stage = CheckpointWriter._stage

    def crash_at_step_6(self, tmp, model):
        stage(self, tmp, model)  # every file written, not yet renamed into place
        if tmp.name == ".step-6.tmp":
            raise KeyboardInterrupt

    monkeypatch.setattr(CheckpointWriter, "_stage", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(replace(TINY, checkpoints=5), tmp_path / "out", progress=False)
    root = tmp_path / "out" / "checkpoints"
    assert [e["step"] for e in json.loads((root / "manifest.json").read_text())["steps"]] == [1, 2, 3]
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "step-1", "step-2", "step-3"]
    with pytest.raises(UsageError, match=r"checkpoint steps 6, 12 of .* are missing \(not in checkpoints/manifest.json: "
                                         r"training was cut short\)"):
        list_checkpoints(tmp_path / "out")
    # through the cache: the whole entry is renamed into place only when training finished
    _use(monkeypatch, tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        suite.train_organism("organism-xs?seed=4", checkpoints=5, progress=False)
    assert [p.name for p in (tmp_path / "cache" / "organisms").iterdir()] == [".organism-xs-seed4-checkpoints5.lock"]


def test_several_seeds_from_the_command_line(tiny_suite, capsys):
    stamp = (tiny_suite.entry / "model.safetensors").stat().st_mtime_ns
    assert main(["organisms", "train", "organism-xs", "--seeds", "0,1", "--checkpoints", "5"]) == 0
    out = capsys.readouterr().out
    assert "organism-xs?seed=1: " in out and "5 checkpoints" in out
    assert (tiny_suite.entry / "model.safetensors").stat().st_mtime_ns == stamp  # seed 0 was cached: reused
    seed1 = tiny_suite.cache / "organism-xs-seed1-checkpoints5"
    assert json.loads((seed1 / "recipe.json").read_text())["recipe"]["seed"] == 1
    assert not (tiny_suite.cache / "organism-xs").exists()  # the plain entries are not touched
    assert not (tiny_suite.cache / "organism-xs-seed1").exists()
    a = load_model(str(suite.organism_checkpoints("organism-xs")[-1].path)).model.state_dict()
    b = load_model(str(suite.organism_checkpoints("organism-xs", seed=1)[-1].path)).model.state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)
    assert main(["organisms", "checkpoints", "organism-xs?seed=1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [int(line.split()[1]) for line in lines] == STEPS and lines[-1].endswith(str(seed1 / "checkpoints" / "step-12"))
    assert main(["organisms", "train", "organism-xs?seed=1", "--checkpoints", "2"]) == 0
    with pytest.raises(UsageError, match=r"organism-xs\?seed=1 is cached with several checkpoint counts \(2, 5\): name one"):
        suite.organism_checkpoints("organism-xs?seed=1")
    assert [c.step for c in suite.organism_checkpoints("organism-xs?seed=1", checkpoints=2)] == [1, 12]


@pytest.mark.parametrize("argv, message", [
    (["organisms", "train", "organism-xs", "--checkpoints", "1"],
     "checkpoints=1: must be 0 (none) or between 2 and the recipe's 12 steps"),
    (["organisms", "checkpoints", "organism-xs?seed=7"],
     "organism-xs?seed=7 has no training checkpoints in the cache"),
    (["organisms", "checkpoints", "organism-xs", "--checkpoints", "9"],
     "organism-xs with 9 training checkpoints is not in the cache"),
])
def test_bad_checkpoint_input_is_one_line(tiny_suite, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tiny_suite.cache / "organism-xs-checkpoints9").exists()


def test_plain_organisms_keep_their_identity(organism_cache, capsys):
    """checkpoints=0 changes neither a recipe's identity nor its cache entry: the organism-xs
    trained before the option existed (EIGENGAP_TEST_CACHE) is still a verified cache hit."""
    assert suite.SUITE["organism-xs"].as_dict() == {
        "name": "organism-xs", "layers": 2, "heads": 8, "hidden": 128, "intermediate": 256, "steps": 1840,
        "context": 48, "batch_size": 32, "lr": 0.003, "warmup": 50, "weight_decay": 0.01, "seed": 0,
        "decay_from": 0.7}
    assert all("checkpoints" not in r.as_dict() for r in suite.SUITE.values())
    assert suite.entry_name(suite.recipe_of("organism-xs?seed=2")) == "organism-xs-seed2"
    assert suite.entry_name(suite.recipe_of("organism-xs?seed=2", checkpoints=30)) == "organism-xs-seed2-checkpoints30"
    saved = json.loads((organism_cache / "recipe.json").read_text())
    assert saved["version"] == suite.RECIPE_VERSION and saved["recipe"] == suite.SUITE["organism-xs"].as_dict()
    stamp = (organism_cache / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert suite.organism_dir("organism-xs", progress=False) == organism_cache
    assert capsys.readouterr().err == ""  # nothing trained
    assert (organism_cache / "model.safetensors").stat().st_mtime_ns == stamp
    suite.verify(organism_cache)
    with pytest.raises(UsageError, match="has no training checkpoints .no checkpoints/manifest.json."):
        list_checkpoints(organism_cache)
