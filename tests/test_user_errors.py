"""User-caused failures are one line and exit status 2, found on the driver before any work is
sent out, or brought back from a worker as the same one-line UsageError (locally and on Ray)."""

import pytest

from cluster.executors import LocalExecutor, RayExecutor
from jobs.cli import main
from spectral.errors import UsageError
from spectral.models.adapter import HeadAdapter
from spectral.models.loading import model_heads
from tests.conftest import TINY

UNSUPPORTED = "unsupported model type 'opt' (supported: bert, gpt2, gpt_neox, llama, mistral)"


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    """A complete checkpoint directory (config, safetensors, tokenizer) of a family eigengap
    does not support: a tiny random OPT."""
    from transformers import OPTConfig, OPTForCausalLM

    from spectral.models.tokenizer import byte_tokenizer

    path = tmp_path_factory.mktemp("opt")
    config = OPTConfig(vocab_size=512, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       max_position_embeddings=64, word_embed_proj_dim=16)
    OPTForCausalLM(config).save_pretrained(path, safe_serialization=True)
    byte_tokenizer().save_pretrained(path)
    return path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def _scan(model, tmp_path, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one prompt\nanother prompt\n")
    return main(["scan", "--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "out"), *extra])


def test_an_unsupported_architecture_is_refused_from_its_config(opt_dir, tmp_path, capsys):
    with pytest.raises(UsageError, match=f"^model spec '{opt_dir}': " + UNSUPPORTED.replace("(", r"\(").replace(")", r"\)")):
        model_heads(str(opt_dir))
    assert _scan(opt_dir, tmp_path, "--executor", "local") == 2
    assert _one_line(capsys) == f"eigengap scan: error: model spec '{opt_dir}': {UNSUPPORTED}"
    assert not (tmp_path / "out").exists()


def test_the_adapter_refuses_an_unsupported_model_with_a_usage_error(opt_dir):
    from transformers import AutoModelForCausalLM

    with pytest.raises(UsageError, match="^" + UNSUPPORTED.replace("(", r"\(").replace(")", r"\)") + "$"):
        HeadAdapter(AutoModelForCausalLM.from_pretrained(opt_dir))


def test_an_unsupported_architecture_on_ray_is_one_line(opt_dir, tmp_path, capsys, ray_cluster):
    assert _scan(opt_dir, tmp_path, "--executor", "ray", "--workers", "1") == 2
    assert _one_line(capsys) == f"eigengap scan: error: model spec '{opt_dir}': {UNSUPPORTED}"


def test_a_usage_error_in_a_worker_reaches_the_driver_as_the_same_line(ray_cluster, tmp_path, neox):
    def refuse(loaded, unit):  # a local function: Ray ships it by value
        if unit == 2:
            raise UsageError(f"unit {unit}: refused by {type(loaded.model).__name__}")
        return unit

    message = "unit 2: refused by GPTNeoXForCausalLM"
    with pytest.raises(UsageError) as local:
        LocalExecutor(neox, progress=False).map(TINY["gpt_neox"], refuse, [0, 1, 2, 3])
    assert str(local.value) == message
    with pytest.raises(UsageError) as remote:
        RayExecutor(workers=1, progress=False, load_kwargs={"device": "cpu"}).map(TINY["gpt_neox"], refuse, [0, 1, 2, 3])
    assert type(remote.value) is UsageError and str(remote.value) == message
    # a worker that cannot load the model reports why with its first unit
    neox.model.save_pretrained(tmp_path / "no_tok")
    with pytest.raises(UsageError) as load:
        RayExecutor(workers=1, progress=False).map(str(tmp_path / "no_tok"), lambda loaded, unit: unit, [0])
    assert type(load.value) is UsageError
    assert str(load.value).startswith(f"checkpoint directory '{tmp_path / 'no_tok'}' has no tokenizer files")


def test_out_of_range_heads_stop_patch_before_any_work(tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work was sent out")

    monkeypatch.setattr("spectral.models.loading.load_model", no_work)
    for executor in (LocalExecutor, RayExecutor):
        monkeypatch.setattr(executor, "start", no_work)
        monkeypatch.setattr(executor, "map", no_work)
    for extra in (["--executor", "local"], ["--executor", "ray", "--workers", "1"]):
        code = main(["patch", "--model", TINY["gpt_neox"], "--task", "ioi", "--out", str(tmp_path / "out"),
                     "--heads", "0,9", *extra])
        assert code == 2
        assert _one_line(capsys) == "eigengap patch: error: --heads: head 9 out of range (the model has heads 0..3)"
    assert not (tmp_path / "out").exists()
