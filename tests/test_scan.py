"""The scan end to end: CLI, Parquet columns, values against brute force, bad input."""

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from spectral.models.adapter import HeadAdapter
from spectral.models.loading import load_model
from tests.conftest import PROMPTS, TINY
from tests.reference import brute_key_kernel_metrics

MODEL = TINY["gpt_neox"]
COLUMNS = {"model", "kernel", "keys", "layer", "head", "n_tokens", "lambda1", "lambda2", "gap", "instability",
           "entropy", "effective_rank", "condition_number", "status"}


def _scan(tmp_path, prompts_file, *extra, out="out"):
    code = main(["scan", "--model", MODEL, "--prompts", str(prompts_file), "--out", str(tmp_path / out),
                 "--batch-size", "2", *extra])
    return code, tmp_path / out


@pytest.mark.parametrize("keys, site", [("raw", "keys_raw"), ("rotated", "keys_rotated")])
def test_scan_writes_results_equal_to_brute_force(tmp_path, prompts_file, capsys, keys, site):
    code, out = _scan(tmp_path, prompts_file, "--keys", keys)
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"scan.parquet", "params.json", "summary.md", "gap_heatmap.png"}
    table = pq.read_table(out / "scan.parquet")
    assert COLUMNS <= set(table.column_names) and table.num_rows == 3 * 4
    assert set(table["keys"].to_pylist()) == {keys} and set(table["status"].to_pylist()) == {"ok"}
    # brute force: pool every real token's key, form the N x N Gram, eigvalsh
    loaded = load_model(MODEL)
    enc = loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    got = HeadAdapter(loaded.model).run(enc.input_ids, enc.attention_mask, sites=[site])
    mask = enc.attention_mask.bool()
    rows = table.to_pylist()
    for row in rows:
        pooled = got[(row["layer"], site)][:, :, row["head"]][mask].double().numpy()
        ref = brute_key_kernel_metrics(pooled)
        assert row["n_tokens"] == pooled.shape[0]
        for name in ("lambda1", "lambda2", "gap", "entropy", "effective_rank", "condition_number"):
            assert row[name] == pytest.approx(ref[name], rel=1e-6), name
    printed = capsys.readouterr().out
    assert "| layer | min gap | mean gap | weakest head |" in printed
    params = json.loads((out / "params.json").read_text())
    assert params["config"]["model"] == MODEL and params["settings"]["ridge"] == 0.01


@pytest.mark.parametrize("kernel, keys", [("scores", "rotated"), ("probs", "rotated"), ("weights", "none")])
def test_other_kernels(tmp_path, prompts_file, kernel, keys):
    code, out = _scan(tmp_path, prompts_file, "--kernel", kernel, "--layers", "0,2", "--heads", "1")
    assert code == 0
    rows = pq.read_table(out / "scan.parquet").to_pylist()
    assert [(r["layer"], r["head"]) for r in rows] == [(0, 1), (2, 1)]
    for r in rows:
        assert r["kernel"] == kernel and r["keys"] == keys and r["status"] == "ok"
        assert 0 < r["gap"] < 1 and r["lambda1"] > r["lambda2"] > 0
        assert r["n_prompts"] == (0 if kernel == "weights" else 3)


def test_probs_spectra_of_causal_attention_have_unit_diagonal_structure(tmp_path, prompts_file):
    """A causal probability matrix is lower-triangular with rows summing to 1, so its top
    singular value is at least 1: a property of the data, checked on real output."""
    code, out = _scan(tmp_path, prompts_file, "--kernel", "probs")
    assert code == 0
    assert min(pq.read_table(out / "scan.parquet")["lambda1"].to_pylist()) >= 1.0 - 1e-9


def _bad(tmp_path, args, capsys):
    out = tmp_path / "bad_out"
    try:
        code = main(["scan", "--out", str(out), *args])
    except SystemExit as exit_:  # argparse rejects unknown choices itself
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert not out.exists(), "nothing may be written on bad input"
    return err[-1]


def test_bad_input_gives_one_line_and_exit_2(tmp_path, prompts_file, capsys, neox):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"txt": "oops"}\n')
    neox.model.save_pretrained(tmp_path / "no_tok")
    model = ["--model", MODEL]
    p = ["--prompts", str(prompts_file)]
    cases = [
        (model + ["--prompts", str(tmp_path / "missing.txt")], "does not exist"),
        (model + ["--prompts", str(empty)], "is empty"),
        (model + ["--prompts", str(bad_json)], "bad.jsonl:2: expected an object with a string field 'text'"),
        (model + p + ["--kernel", "eigen"], "invalid choice: 'eigen'"),
        (model + p + ["--ridge", "0"], "--ridge: Input should be greater than 0"),
        (model + p + ["--ridge=-1e-3"], "--ridge: Input should be greater than 0"),
        (model + p + ["--batch-size", "0"], "--batch-size: Input should be greater than 0"),
        (model + p + ["--layers", "3"], "--layers: layer 3 out of range (the model has layers 0..2)"),
        (model + p + ["--heads", "0,9"], "--heads: head 9 out of range (the model has heads 0..3)"),
        (["--model", str(tmp_path / "no_tok")] + p, "has no tokenizer files"),
        (["--model", str(tmp_path)] + p, "has no config.json"),
        (model, "--prompts is required for --kernel key"),
    ]
    for args, message in cases:
        line = _bad(tmp_path, args, capsys)
        assert message in line, (args, line)


def test_existing_results_are_not_overwritten_without_force(tmp_path, prompts_file, capsys):
    assert _scan(tmp_path, prompts_file)[0] == 0
    before = (tmp_path / "out" / "scan.parquet").read_bytes()
    assert _scan(tmp_path, prompts_file, "--ridge", "0.5")[0] == 2
    assert "pass --force" in capsys.readouterr().err
    assert (tmp_path / "out" / "scan.parquet").read_bytes() == before
    assert _scan(tmp_path, prompts_file, "--ridge", "0.5", "--force")[0] == 0


def test_console_script_and_module_entry_exit_codes(tmp_path, prompts_file):
    ok = subprocess.run([sys.executable, "-m", "jobs.scan", "--model", MODEL, "--prompts", str(prompts_file),
                         "--out", str(tmp_path / "m"), "--kernel", "weights"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "m" / "scan.parquet").exists()
    bad = subprocess.run([sys.executable, "-m", "jobs.cli", "scan", "--model", "random:nope",
                          "--prompts", str(prompts_file), "--out", str(tmp_path / "n")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("eigengap scan: error: model spec 'random:nope'")
