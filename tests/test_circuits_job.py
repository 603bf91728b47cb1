"""``eigengap circuits`` end to end: the known induction circuit of the hand-set ground-truth
model is found (its two heads classed and in the circuit, the circuit faithful by exact edge
patching), the tables match their schemas, and bad input is one line with exit status 2 and
nothing written."""

import json

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from spectral import tables

FAST = ["--n-examples", "16", "--n-scan", "16", "--n-sequences", "16", "--agreement-edges", "10", "--steps", "2",
        "--sizes", "1,2,5,20"]


@pytest.fixture(scope="module")
def groundtruth(tmp_path_factory):
    from spectral.circuits.groundtruth import build_induction_model

    return build_induction_model(tmp_path_factory.mktemp("gt") / "model")


def test_the_known_induction_circuit_is_found(groundtruth, tmp_path, capsys):
    from spectral.circuits.groundtruth import INDUCTION_HEAD, PREVIOUS_TOKEN_HEAD

    out = tmp_path / "gt"
    assert main(["circuits", "--model", str(groundtruth), "--task", "induction", "--out", str(out), *FAST]) == 0
    heads = pq.read_table(out / "heads.parquet")
    assert heads.schema.names == tables.CIRCUIT_HEADS.names
    rows = {(r["layer"], r["head"]): r for r in heads.to_pylist()}
    # the known answer first: the construction's heads score as they must
    assert rows[PREVIOUS_TOKEN_HEAD]["previous_token"] >= 0.5 and rows[PREVIOUS_TOKEN_HEAD]["label"] == "previous_token"
    assert rows[INDUCTION_HEAD]["induction"] >= 0.5 and rows[INDUCTION_HEAD]["label"] == "induction"
    # then what the job found: both heads in the circuit, the circuit faithful under exact patching
    circuit = json.loads((out / "circuit.json").read_text())
    assert {tuple(h) for h in circuit["heads"]} >= {PREVIOUS_TOKEN_HEAD, INDUCTION_HEAD}
    assert rows[PREVIOUS_TOKEN_HEAD]["in_circuit"] and rows[INDUCTION_HEAD]["in_circuit"]
    assert circuit["reached_target"] and circuit["faithfulness_of_circuit"] >= 0.8
    assert circuit["ablation"] == "corrupt" and circuit["method"] == "eap-ig"
    edges = pq.read_table(out / "edges.parquet")
    assert edges.num_rows == circuit["n_edges"] and sum(edges["in_circuit"].to_pylist()) == circuit["size"]
    assert sum(v is not None for v in edges["exact"].to_pylist()) == circuit["agreement"]["edges_checked"]
    assert (out / "circuit_landscape.png").stat().st_size > 0 and "Circuit: the top" in (out / "report.md").read_text()
    capsys.readouterr()


@pytest.mark.parametrize("argv, message", [
    (["--task", "nope"], "unknown task 'nope'"),
    (["--task", "induction", "--sizes", "0"], "--sizes: sizes must be positive edge counts"),
    (["--task", "induction", "--sizes", "100000"], "--sizes: 100000 out of range"),
    (["--task", "ioi"], "the built-in IOI task does not apply"),  # no repeated names for the IOI roles
])
def test_bad_input_is_one_line_and_writes_nothing(groundtruth, tmp_path, capsys, argv, message):
    out = tmp_path / "bad"
    code = main(["circuits", "--model", str(groundtruth), "--out", str(out), *FAST[:8], *argv])
    err = capsys.readouterr().err
    said = err.split("eigengap circuits: error:")  # progress bars may share its line (carriage returns)
    assert code == 2 and len(said) == 2 and message in said[1].splitlines()[0] and "Traceback" not in err, err
    assert not (out / "heads.parquet").exists() and not (out / "circuit.json").exists()


def test_circuits_on_ray_equal_local(groundtruth, tmp_path, ray_cluster, capsys):
    """The whole computation is one work unit: on a Ray actor it gives the local tables."""
    local, remote = tmp_path / "local", tmp_path / "ray"
    args = ["--model", str(groundtruth), "--task", "induction", *FAST]
    assert main(["circuits", *args, "--out", str(local)]) == 0
    assert main(["circuits", *args, "--out", str(remote), "--executor", "ray", "--workers", "1"]) == 0
    capsys.readouterr()
    for name in ("heads.parquet", "edges.parquet"):
        a, b = pq.read_table(local / name), pq.read_table(remote / name)
        assert a.equals(b), name
