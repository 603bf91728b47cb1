"""eigengap plan: exact parameter counts of the target architectures from the meta device,
device maps over several GPUs, sweep estimates, all offline."""

import pytest

from jobs.cli import main
from jobs.plan import run


@pytest.mark.parametrize("model, params", [
    ("EleutherAI/pythia-410m", 405_334_016),   # the published checkpoints' parameter counts
    ("EleutherAI/pythia-1b", 1_011_781_632),
    ("EleutherAI/pythia-2.8b", 2_775_208_960),
    ("meta-llama/Llama-2-7b-hf", 6_738_415_616),
])
def test_parameter_counts_of_the_target_models(model, params):
    plan = run(model, echo=lambda *a: None)
    assert plan["parameters"] == params
    assert plan["per_device_gib"] == {"0": pytest.approx(params * 2 / 2 ** 30, rel=1e-6)}


def test_llama_spread_over_two_small_gpus(capsys):
    assert main(["plan", "--model", "meta-llama/Llama-2-7b-hf", "--gpus-per-actor", "2", "--gpu-memory", "8",
                 "--sweep", "sweeps/pythia-llama.yaml"]) == 0
    out = capsys.readouterr().out
    assert "device 0:" in out and "device 1:" in out and "offloaded" not in out
    assert "sweep on this model" in out
    plan = run("meta-llama/Llama-2-7b-hf", gpus_per_actor=2, gpu_memory=8, echo=lambda *a: None)
    assert set(plan["device_map"].values()) == {"0", "1"}
    assert sum(plan["per_device_gib"].values()) == pytest.approx(plan["weights_gib"], rel=1e-6)
    assert all(gb <= 8 for gb in plan["per_device_gib"].values())


def test_plan_bad_input(capsys):
    assert main(["plan", "--model", "nobody/unknown-model"]) == 2
    assert "cannot plan 'nobody/unknown-model' offline" in capsys.readouterr().err
