"""Model specs and loading: random twins, local checkpoints, hub ids offline."""

import time
from dataclasses import replace

import pytest
import torch

from spectral.errors import UsageError
from spectral.models.families import ARCHITECTURES, BY_MODEL_TYPE, FAMILIES, HUB_IDS, family_for
from spectral.models.loading import hf_config, load_model, model_shape
from spectral.models.specs import parse_spec
from tests.conftest import TINY


def test_parse_spec_forms(tmp_path):
    s = parse_spec("random:pythia-410m?layers=4&hidden=256&heads=4")
    assert (s.kind, s.name, s.overrides) == ("random", "pythia-410m", {"layers": 4, "hidden": 256, "heads": 4})
    arch = s.architecture()
    assert (arch.layers, arch.heads, arch.hidden, arch.d_head, arch.intermediate) == (4, 4, 256, 64, 1024)
    assert parse_spec("EleutherAI/pythia-410m").kind == "hub"
    assert parse_spec(str(tmp_path)).kind == "local"
    assert parse_spec("organism-s").kind == "organism"


@pytest.mark.parametrize("text, message", [
    ("random:pythia-9b", "unknown architecture 'pythia-9b'"),
    ("random:pythia-410m?layers=x", "layers='x' is not an integer"),
    ("random:pythia-410m?depth=2", "unknown override 'depth'"),
    ("random:pythia-410m?hidden=100&heads=3", "not divisible by heads=3"),
    ("random:pythia-410m?layers=0", "must be positive"),
    ("./no/such/dir", "cannot resolve model spec './no/such/dir'"),
    ("", "model spec is empty"),
])
def test_bad_specs_name_the_problem(text, message):
    with pytest.raises(UsageError, match=message.replace("?", r"\?")):
        parse_spec(text)


@pytest.mark.parametrize("name", ["pythia-410m", "pythia-1b", "pythia-2.8b", "llama-2-7b"])
def test_full_size_architectures_match_definitions(name):
    table = {  # shared/research/DEFINITIONS.md, "Target models"
        "pythia-410m": (24, 16, 1024, 64, 4096, 50304),
        "pythia-1b": (16, 8, 2048, 256, 8192, 50304),
        "pythia-2.8b": (32, 32, 2560, 80, 10240, 50304),
        "llama-2-7b": (32, 32, 4096, 128, 11008, 32000),
    }
    arch = ARCHITECTURES[name]
    cfg = hf_config(arch)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size,
            cfg.hidden_size // cfg.num_attention_heads, cfg.intermediate_size, cfg.vocab_size) == table[name]
    assert model_shape(f"random:{name}") == table[name][:2]
    if name.startswith("pythia"):
        assert cfg.rope_parameters["partial_rotary_factor"] == 0.25 and cfg.use_parallel_residual


def test_each_family_owns_its_architectures_and_hub_ids():
    """ARCHITECTURES and HUB_IDS are views of the family registry; each shipped architecture
    builds a config of a model type its family serves."""
    assert list(FAMILIES) == ["gpt_neox", "llama", "gpt2", "bert"]
    assert BY_MODEL_TYPE["mistral"] is BY_MODEL_TYPE["llama"] is FAMILIES["llama"]
    for family in FAMILIES.values():
        for arch in family.architectures:
            assert ARCHITECTURES[arch.name] is arch and arch.family == family.name
            assert hf_config(arch).model_type in family.model_types
        assert all(HUB_IDS[hub_id] == name for hub_id, name in family.hub_ids.items())
    assert len(ARCHITECTURES) == sum(len(f.architectures) for f in FAMILIES.values()) == 6
    assert HUB_IDS == {"EleutherAI/pythia-410m": "pythia-410m", "EleutherAI/pythia-1b": "pythia-1b",
                       "EleutherAI/pythia-2.8b": "pythia-2.8b", "meta-llama/Llama-2-7b-hf": "llama-2-7b",
                       "openai-community/gpt2": "gpt2", "gpt2": "gpt2",
                       "sentence-transformers/all-MiniLM-L6-v2": "minilm-l6"}
    with pytest.raises(ValueError, match="architecture 'llama-2-7b' says family 'llama'"):
        replace(FAMILIES["gpt2"], architectures=(ARCHITECTURES["llama-2-7b"],))
    with pytest.raises(ValueError, match="hub id 'x/y' names no shipped architecture 'gpt3'"):
        replace(FAMILIES["gpt2"], hub_ids={"x/y": "gpt3"})
    with pytest.raises(UsageError, match=r"^unsupported model type None \(supported: bert, gpt2, gpt_neox, llama, mistral\)$"):
        family_for(None)


def test_random_models_are_deterministic_from_the_seed():
    a = load_model(TINY["gpt_neox"])
    b = load_model(TINY["gpt_neox"])
    c = load_model(TINY["gpt_neox"] + "&seed=1")
    wa, wb, wc = (m.model.gpt_neox.layers[0].attention.query_key_value.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())


def test_local_checkpoint_round_trip(tmp_path, neox):
    neox.model.save_pretrained(tmp_path / "ckpt")
    neox.tokenizer.save_pretrained(tmp_path / "ckpt")
    assert list((tmp_path / "ckpt").glob("*.safetensors"))
    again = load_model(str(tmp_path / "ckpt"))
    ids = neox.tokenizer("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, neox.model(ids).logits)
    assert model_shape(str(tmp_path / "ckpt")) == (3, 4)


def test_checkpoint_without_tokenizer_or_weights(tmp_path, neox):
    neox.model.save_pretrained(tmp_path / "no_tok")
    with pytest.raises(UsageError, match="has no tokenizer files"):
        load_model(str(tmp_path / "no_tok"))
    neox.model.config.save_pretrained(tmp_path / "no_weights")
    neox.tokenizer.save_pretrained(tmp_path / "no_weights")
    with pytest.raises(UsageError, match="has no safetensors weights"):
        load_model(str(tmp_path / "no_weights"))
    torch.save({"x": torch.zeros(1)}, tmp_path / "no_weights" / "pytorch_model.bin")
    with pytest.raises(UsageError, match="only pickle weights found"):
        load_model(str(tmp_path / "no_weights"))


@pytest.mark.parametrize("offline", ["1", ""])
def test_unreachable_hub_id_fails_within_seconds(monkeypatch, tmp_path, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.perf_counter()
    with pytest.raises(UsageError, match="cannot load model spec 'EleutherAI/pythia-410m'"):
        load_model("EleutherAI/pythia-410m")
    assert time.perf_counter() - start < 10
