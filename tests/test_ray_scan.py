"""The scan on a real local Ray cluster equals the in-process scan."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from spectral.kernels.metrics import SpectrumMetrics
from tests.conftest import TINY

MODEL = TINY["gpt_neox"]


@pytest.mark.parametrize("kernel", ["key", "scores", "weights"])
def test_ray_executor_equals_local(tmp_path, ray_cluster, kernel):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt number {i}: " + "word " * (i % 7 + 1) for i in range(12)) + "\n")
    common = ["scan", "--model", MODEL, "--prompts", str(prompts), "--kernel", kernel,
              "--batch-size", "2", "--shard-size", "3"]
    assert main([*common, "--out", str(tmp_path / "local")]) == 0
    assert main([*common, "--out", str(tmp_path / "ray"), "--executor", "ray", "--workers", "2"]) == 0
    local = pq.read_table(tmp_path / "local" / "scan.parquet")
    remote = pq.read_table(tmp_path / "ray" / "scan.parquet")
    assert local.num_rows == remote.num_rows == 12
    assert local.select(["layer", "head", "n_tokens", "status"]).equals(remote.select(["layer", "head", "n_tokens", "status"]))
    for name in SpectrumMetrics.names():
        np.testing.assert_allclose(remote[name].to_numpy(), local[name].to_numpy(), rtol=1e-9, atol=0, err_msg=name)
    # the cluster we started listens on loopback only
    assert all(node["NodeManagerAddress"] == "127.0.0.1" for node in ray_cluster.nodes())
