"""The kernel and metric registries: complete, each record equal to its kernel's direct path, and
a new kernel or metric is one function/module plus one registry line."""

import pickle
import typing

import numpy as np
import pytest
import torch

from cluster.executors import LocalExecutor
from jobs.scan import ScanConfig
from spectral import tables
from spectral.kernels.attention import PromptSpectra
from spectral.kernels.key import KeyStats, key_kernel_spectra
from spectral.kernels.metrics import METRICS, SpectrumMetrics, spectrum_metrics
from spectral.kernels.registry import KERNELS, Kernel, KernelInfo, KernelSteps
from spectral.kernels.scan import ScanSettings, scan_table, scan_units
from spectral.kernels.weights import weight_kernel_result, weight_spectra
from spectral.models.adapter import HeadAdapter
from tests.conftest import PROMPTS
from tests.reference import brute_key_kernel_metrics, brute_metrics


def test_every_kernel_is_registered_once_and_loads():
    assert {"key", "scores", "probs", "weights"} <= set(KERNELS)
    assert typing.get_args(Kernel) == tuple(KERNELS)
    assert typing.get_args(ScanConfig.model_fields["kernel"].annotation) == tuple(KERNELS)  # declared once
    settings = ScanSettings(keys="rotated")
    sites = {name: info.steps().site for name, info in KERNELS.items()}
    assert all((site is not None) == KERNELS[name].forward for name, site in sites.items())
    assert {n: sites[n](settings) for n in ("key", "scores", "probs")} == \
        {"key": "keys_rotated", "scores": "scores", "probs": "probs"}
    assert not KERNELS["weights"].forward and sites["weights"] is None
    assert {n: KERNELS[n].steps().keys(settings) for n in ("key", "scores", "probs", "weights")} == \
        {"key": "rotated", "scores": "rotated", "probs": "rotated", "weights": "none"}


def test_a_record_whose_steps_disagree_with_it_is_refused():
    with pytest.raises(TypeError, match="kernel 'bad': .*weights:WEIGHTS must be KernelSteps with a site"):
        KernelInfo("bad", "spectral.kernels.weights:WEIGHTS").steps()


def test_prompts_are_required_exactly_for_forward_kernels(tmp_path):
    for name, info in KERNELS.items():
        if info.forward:
            with pytest.raises(ValueError, match=f"--prompts is required for --kernel {name}"):
                ScanConfig(model="m", out=tmp_path, kernel=name)
        else:
            assert ScanConfig(model="m", out=tmp_path, kernel=name).prompts is None
    assert [len(u.prompts) for u in scan_units(PROMPTS, ScanSettings(kernel="weights"), 2)] == [0]
    assert [len(u.prompts) for u in scan_units(PROMPTS, ScanSettings(kernel="probs"), 2)] == [2, 1]


def _padded(loaded):
    enc = loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids, enc.attention_mask


def _direct(neox, kernel: str):
    """The kernel computed without the registry or the pipeline: one batch, the accumulator
    called by hand, its result function called directly (the path before the registry)."""
    adapter = HeadAdapter(neox.model)
    if kernel == "weights":
        sv = np.stack([weight_spectra(*adapter.qk_weights(l)) for l in range(adapter.n_layers)])
        return weight_kernel_result(sv, eps=float(torch.finfo(adapter.qk_weights(0)[0].dtype).eps))
    ids, mask = _padded(neox)
    site = "keys_raw" if kernel == "key" else kernel
    got = adapter.run(ids, mask, sites=[site])
    acc = (KeyStats.zeros(adapter.n_layers, adapter.n_heads, adapter.d_head) if kernel == "key"
           else PromptSpectra(adapter.n_layers, adapter.n_heads))
    for layer in range(adapter.n_layers):
        acc.update(layer, got[(layer, site)], mask.bool())
    return key_kernel_spectra(acc) if kernel == "key" else acc.result()


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_each_record_equals_its_direct_path(neox, kernel):
    settings = ScanSettings(kernel=kernel, batch_size=2)  # several batches and shards: sums in another order
    table = scan_table(LocalExecutor(neox, progress=False), neox.spec.text, PROMPTS, settings, 3, 4, shard_size=2)
    ref = _direct(neox, kernel)
    rows = table.to_pylist()
    assert len(rows) == 12 and {r["kernel"] for r in rows} == {kernel}
    for r in rows:
        l, h = r["layer"], r["head"]
        assert r["status"] == ref.status[l, h] and r["n_prompts"] == ref.n_prompts[l, h]
        for name in METRICS:
            assert r[name] == pytest.approx(getattr(ref.metrics, name)[l, h], rel=1e-9, abs=1e-12), name


QUERIES = KernelSteps(
    site=lambda settings: "queries",
    start=lambda adapter, settings: KeyStats.zeros(adapter.n_layers, adapter.n_heads, adapter.d_head),
    finalize=lambda stats, settings: key_kernel_spectra(stats, ridge=settings.ridge, center=settings.center),
    keys=lambda settings: "none",
    ridged=True,
)
"""A kernel that is not built in: the Gram of the queries (the key kernel's statistics on another site)."""


def test_a_new_kernel_is_one_steps_record_plus_one_registry_line(neox, monkeypatch):
    monkeypatch.setitem(KERNELS, "queries", KernelInfo("queries", "tests.test_kernel_registry:QUERIES"))
    settings = ScanSettings(kernel="queries", layers=(1,))
    rows = scan_table(LocalExecutor(neox, progress=False), neox.spec.text, PROMPTS, settings, 3, 4).to_pylist()
    ids, mask = _padded(neox)
    queries = HeadAdapter(neox.model).run(ids, mask, sites=["queries"], layers=[1])[(1, "queries")]
    assert [(r["kernel"], r["layer"]) for r in rows] == [("queries", 1)] * 4
    for r in rows:
        ref = brute_key_kernel_metrics(queries[:, :, r["head"]][mask.bool()].double().numpy())
        for name in METRICS:
            assert r[name] == pytest.approx(ref[name], rel=1e-6), name


def test_every_metric_matches_its_plain_reference_and_is_a_scan_column():
    assert tuple(METRICS) == SpectrumMetrics.names() == tables.SPECTRUM_METRICS
    gen = np.random.default_rng(0)
    values = np.sort(gen.uniform(0.1, 5.0, size=6))[::-1]
    full = np.concatenate([values, np.full(4, 0.05)])  # 4 copies of a ridge-like fill value
    got = spectrum_metrics(values, fill_value=0.05, fill_count=4)
    ref = brute_metrics(full)
    assert set(ref) == set(METRICS), "every metric needs a plain reference in tests/reference.py"
    for name in METRICS:
        assert got[name] == pytest.approx(ref[name], rel=1e-12), name
        assert getattr(got, name) is got[name]


def test_spectrum_metrics_survive_pickling_and_refuse_an_incomplete_set():
    m = spectrum_metrics(np.array([[4.0, 1.0], [3.0, 2.0]]))
    back = pickle.loads(pickle.dumps(m))
    np.testing.assert_array_equal(back.gap, m.gap)
    with pytest.raises(AttributeError):
        back.not_a_metric  # noqa: B018
    with pytest.raises(ValueError, match="SpectrumMetrics needs the metrics"):
        SpectrumMetrics({"gap": m.gap})


def test_a_new_metric_is_one_function_plus_one_registry_line(neox, monkeypatch):
    def trace(s):
        """Sum of all values."""
        return s.total

    monkeypatch.setitem(METRICS, "trace", trace)
    assert spectrum_metrics(np.array([4.0, 1.0]), fill_value=0.5, fill_count=2).trace == pytest.approx(6.0)
    for kernel in ("key", "probs", "weights"):  # every kernel computes it, the table carries it
        settings = ScanSettings(kernel=kernel, layers=(0,))
        table = scan_table(LocalExecutor(neox, progress=False), neox.spec.text, PROMPTS, settings, 3, 4)
        assert "trace" in table.column_names and np.isfinite(table["trace"].to_numpy()).all(), kernel
