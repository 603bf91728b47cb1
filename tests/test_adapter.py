"""The per-head view equals what each family's unmodified modules compute."""

import sys

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from spectral.errors import UsageError
from spectral.models.adapter import SITES, HeadAdapter
from tests.conftest import PROMPTS

CAPTURE = "eigengap_test_capture"
_captured: dict = {}


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """The attention kernel the model calls: sees the model's own rotated q, k and v."""
    _captured[id(module)] = (query.detach().clone(), key.detach().clone(), value.detach().clone())
    eager = sys.modules[type(module).__module__].eager_attention_forward  # the family's own kernel
    return eager(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE, _capture_attention)
AttentionMaskInterface.register(CAPTURE, eager_mask)


def _batch(loaded):
    return loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)


def _model_internals(loaded, adapter, enc):
    """Rotated q/k/v from the attention kernel, attention inputs and outputs from plain hooks."""
    inputs, outputs, handles = {}, {}, []
    for layer, attn in enumerate(adapter.attentions):
        handles.append(attn.register_forward_pre_hook(
            lambda m, a, kw, l=layer: inputs.__setitem__(l, (a[0] if a else kw["hidden_states"]).clone()),
            with_kwargs=True))
        handles.append(attn.register_forward_hook(lambda m, a, o, l=layer: outputs.__setitem__(l, o[0].clone())))
    previous = loaded.model.config._attn_implementation
    loaded.model.config._attn_implementation = CAPTURE
    try:
        with torch.no_grad():
            loaded.model(**enc, use_cache=False)
    finally:
        loaded.model.config._attn_implementation = previous
        for h in handles:
            h.remove()
    rotated = [_captured.pop(id(attn)) for attn in adapter.attentions]
    return inputs, outputs, rotated


def _plain_raw_keys(loaded, adapter, layer, hidden):
    """Raw keys straight from the projection weights, per the family's documented layout."""
    attn, h, d = adapter.attentions[layer], adapter.n_heads, adapter.d_head
    b, t, _ = hidden.shape
    if adapter.family.name == "gpt_neox":
        qkv = attn.query_key_value(hidden).view(b, t, h, 3 * d)
        return qkv[..., d:2 * d]
    if adapter.family.name == "llama":
        k = attn.k_proj(hidden).view(b, t, adapter.n_kv_heads, d)
        return k.repeat_interleave(h // adapter.n_kv_heads, dim=2)
    return attn.c_attn(hidden)[..., adapter.d_model:2 * adapter.d_model].view(b, t, h, d)


def test_sites_equal_module_computation(tiny):
    adapter = HeadAdapter(tiny.model)
    enc = _batch(tiny)
    got = adapter.run(enc.input_ids, enc.attention_mask, sites=SITES)
    inputs, outputs, rotated = _model_internals(tiny, adapter, enc)
    group = adapter.n_heads // adapter.n_kv_heads
    for layer in range(adapter.n_layers):
        q_ref, k_ref, v_ref = rotated[layer]  # (batch, heads or kv_heads, pos, d_head)
        k_ref = k_ref.repeat_interleave(group, dim=1)
        v_ref = v_ref.repeat_interleave(group, dim=1)
        torch.testing.assert_close(got[(layer, "queries_rotated")], q_ref.transpose(1, 2), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[(layer, "keys_rotated")], k_ref.transpose(1, 2), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[(layer, "values")], v_ref.transpose(1, 2), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            raw = _plain_raw_keys(tiny, adapter, layer, inputs[layer])
        torch.testing.assert_close(got[(layer, "keys_raw")], raw, rtol=1e-5, atol=1e-6)
        # per-head results through the output projection reproduce the attention output
        out_proj = getattr(adapter.attentions[layer], adapter.family.out_proj)
        with torch.no_grad():
            recombined = out_proj(got[(layer, "result")].flatten(-2))
        assert (recombined - outputs[layer]).abs().max().item() <= 1e-5
        assert got[(layer, "resid_pre")].shape == (3, enc.input_ids.shape[1], adapter.d_model)


def test_rotary_families_rotate_and_gpt2_does_not(tiny):
    adapter = HeadAdapter(tiny.model)
    enc = _batch(tiny)
    got = adapter.run(enc.input_ids, enc.attention_mask, sites=["keys_raw", "keys_rotated"], layers=[0])
    same = torch.equal(got[(0, "keys_raw")], got[(0, "keys_rotated")])
    assert same == (adapter.family.name == "gpt2")
    if adapter.family.name == "gpt_neox":  # Pythia rotates 25 % of d_head; the rest passes through
        rot = int(adapter.d_head * 0.25)
        torch.testing.assert_close(got[(0, "keys_raw")][..., rot:], got[(0, "keys_rotated")][..., rot:])


def test_probs_equal_models_own_attention_weights(tiny):
    adapter = HeadAdapter(tiny.model)
    enc = _batch(tiny)
    got = adapter.run(enc.input_ids, enc.attention_mask, sites=["probs", "scores"])
    previous = tiny.model.config._attn_implementation
    tiny.model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            ref = tiny.model(**enc, output_attentions=True, use_cache=False).attentions
    finally:
        tiny.model.config._attn_implementation = previous
    real = enc.attention_mask.bool()
    for layer in range(adapter.n_layers):
        for b in range(len(PROMPTS)):  # compare the real query rows of each prompt
            rows = real[b]
            torch.testing.assert_close(got[(layer, "probs")][b][:, rows], ref[layer][b][:, rows].float(),
                                       rtol=1e-5, atol=1e-6)
        assert torch.isneginf(got[(layer, "scores")][:, :, 0, 1:]).all()  # causal mask applied


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_even_after_an_error(neox):
    adapter = HeadAdapter(neox.model)
    before = _hook_count(neox.model)
    enc = _batch(neox)
    with pytest.raises(RuntimeError, match="boom"):
        with adapter.trace(SITES, lambda l, s, t: None, attention_mask=enc.attention_mask):
            assert _hook_count(neox.model) > before
            raise RuntimeError("boom")
    assert _hook_count(neox.model) == before


def test_edits_replace_tensors_and_identity_changes_nothing(neox):
    adapter = HeadAdapter(neox.model)
    enc = _batch(neox)
    with torch.no_grad():
        clean = neox.model(**enc, use_cache=False).logits
        with adapter.trace([], edits={(1, "result"): lambda t: t, (0, "resid_post"): lambda t: t}):
            same = neox.model(**enc, use_cache=False).logits
        with adapter.trace([], edits={(1, "result"): torch.zeros_like}):
            zeroed = neox.model(**enc, use_cache=False).logits
    torch.testing.assert_close(same, clean)
    assert (zeroed - clean).abs().max() > 1e-4
    # an edit at layer 2 leaves earlier layers untouched
    seen = {}
    with adapter.trace(["resid_post"], lambda l, s, t: seen.__setitem__(l, t.clone()),
                       edits={(2, "resid_pre"): lambda t: t + 1.0}):
        with torch.no_grad():
            neox.model(**enc, use_cache=False)
    base = adapter.run(enc.input_ids, enc.attention_mask, sites=["resid_post"])
    torch.testing.assert_close(seen[0], base[(0, "resid_post")])
    torch.testing.assert_close(seen[1], base[(1, "resid_post")])
    assert (seen[2] - base[(2, "resid_post")]).abs().max() > 0.5


def test_bad_sites_layers_and_heads(neox):
    adapter = HeadAdapter(neox.model)
    with pytest.raises(ValueError, match="unknown site 'keyz'"):
        with adapter.trace(["keyz"]):
            pass
    with pytest.raises(UsageError, match=r"^layer 7 out of range \(the model has layers 0..2\)$"):
        adapter.check_layers([7])
    with pytest.raises(UsageError, match=r"^head 4 out of range \(the model has heads 0..3\)$"):
        adapter.check_heads([4])
    assert adapter.check_layers(None) == [0, 1, 2] and adapter.check_heads([3, 1, 3]) == [1, 3]


def test_weights_are_per_head_slices_of_the_projection(tiny):
    """W_Q W_K^T of each head gives the same scores as the model's raw q k^T (no bias, no rotation)."""
    adapter = HeadAdapter(tiny.model)
    enc = _batch(tiny)
    x = {}
    handle = adapter.attentions[0].register_forward_pre_hook(
        lambda m, a, kw: x.__setitem__("h", a[0] if a else kw["hidden_states"]), with_kwargs=True)
    try:
        got = adapter.run(enc.input_ids, enc.attention_mask, sites=["queries", "keys_raw"], layers=[0])
    finally:
        handle.remove()
    wq, wk = adapter.qk_weights(0)
    attn = adapter.attentions[0]
    q_bias, k_bias = _biases(adapter, attn)
    h = x["h"]
    q = torch.einsum("btm,hmd->bthd", h, wq) + q_bias
    k = torch.einsum("btm,hmd->bthd", h, wk) + k_bias
    torch.testing.assert_close(q, got[(0, "queries")], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, got[(0, "keys_raw")], rtol=1e-5, atol=1e-5)


def _biases(adapter, attn):
    h, d = adapter.n_heads, adapter.d_head
    if adapter.family.name == "gpt_neox":
        b = attn.query_key_value.bias.view(h, 3, d)
        return b[:, 0], b[:, 1]
    if adapter.family.name == "gpt2":
        b = attn.c_attn.bias
        return b[: h * d].view(h, d), b[h * d: 2 * h * d].view(h, d)
    zeros = torch.zeros(h, d)
    return zeros, zeros
