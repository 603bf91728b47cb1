"""Per-receiver input deltas and path patching, against a plainly written one-path-at-a-time
reference with forward hooks placed directly on each family's Hugging Face modules."""

import numpy as np
import pytest
import torch

from spectral.causal.patching import cache_run
from spectral.circuits.paths import path_patch, path_scores_into
from spectral.circuits.split import head_outputs, receiver_deltas
from spectral.errors import UsageError
from spectral.models.adapter import HeadAdapter
from tests.test_patching import byte_task


# ------------------------------------------------------------------ the plain reference
def plain_parts(model):
    """Blocks, and per block: attention, its input norm, its MLP norm; and the final norm,
    written out per family."""
    kind = model.config.model_type
    if kind == "gpt_neox":
        blocks = model.gpt_neox.layers
        return kind, [(b.attention, b.input_layernorm, b.post_attention_layernorm) for b in blocks], \
            model.gpt_neox.final_layer_norm
    if kind == "llama":
        blocks = model.model.layers
        return kind, [(b.self_attn, b.input_layernorm, b.post_attention_layernorm) for b in blocks], model.model.norm
    blocks = model.transformer.h
    return kind, [(b.attn, b.ln_1, b.ln_2) for b in blocks], model.transformer.ln_f


def plain_columns(model, kind, head, which):
    """(projection module, column slice) holding head ``head``'s q, k or v."""
    cfg = model.config
    heads, d = cfg.num_attention_heads, cfg.hidden_size
    dh = d // heads
    family, layers, _ = plain_parts(model)
    attn = layers[kind][0]
    part = "qkv".index(which)
    if family == "gpt_neox":  # fused, per head [q | k | v]
        start = head * 3 * dh + part * dh
        return attn.query_key_value, slice(start, start + dh)
    if family == "llama":
        group = heads // cfg.num_key_value_heads
        unit = head if which == "q" else head // group
        return getattr(attn, f"{which}_proj"), slice(unit * dh, (unit + 1) * dh)
    start = part * d + head * dh  # GPT-2 fused [Q | K | V]
    return attn.c_attn, slice(start, start + dh)


def plain_out_proj_inputs(model, ids, mask):
    """Every layer's output-projection input (the heads' results side by side), one forward pass."""
    family, layers, _ = plain_parts(model)
    seen, handles = {}, []
    for layer, (attn, _, _) in enumerate(layers):
        out = attn.dense if family == "gpt_neox" else attn.o_proj if family == "llama" else attn.c_proj
        handles.append(out.register_forward_pre_hook(lambda m, args, layer=layer: seen.__setitem__(layer, args[0])))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def plain_write(model, inputs, layer, head):
    """A head's write into the residual stream: its slice of the output projection's input
    times its slice of the weight."""
    family, layers, _ = plain_parts(model)
    attn = layers[layer][0]
    out = attn.dense if family == "gpt_neox" else attn.o_proj if family == "llama" else attn.c_proj
    dh = model.config.hidden_size // model.config.num_attention_heads
    sl = slice(head * dh, (head + 1) * dh)
    w = out.weight[sl, :] if family == "gpt2" else out.weight[:, sl].T  # (d_head, d_model); Conv1D is (in, out)
    return inputs[layer][:, :, sl] @ w


def plain_embed(model, ids):
    """The residual stream entering the first block."""
    _, layers, _ = plain_parts(model)
    block = next(b for b in model.modules() if getattr(b, "attention", None) is layers[0][0]
                 or getattr(b, "self_attn", None) is layers[0][0] or getattr(b, "attn", None) is layers[0][0])
    seen = {}
    handle = block.register_forward_pre_hook(
        lambda m, args, kwargs: seen.__setitem__("x", args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    return seen["x"]


def plain_changes(model, task, senders, direction):
    """Each sender's write in the source run minus in the base run."""
    base_ids, source_ids = (task.corrupt, task.clean) if direction == "denoise" else (task.clean, task.corrupt)
    source, base = (plain_out_proj_inputs(model, ids, task.mask) for ids in (source_ids, base_ids))
    return {s: plain_embed(model, source_ids) - plain_embed(model, base_ids) if s == "embed"
            else plain_write(model, source, *s) - plain_write(model, base, *s) for s in senders}


@torch.no_grad()
def plain_path(model, task, change, receivers, direction):
    """One sender's ``change``, one full forward pass of the base prompts, every receiver input
    patched by plain hooks: q/k/v recomputed from norm(resid + change) and spliced in; logits:
    the final norm applied to its input + change."""
    base_ids = task.corrupt if direction == "denoise" else task.clean
    _, layers, final = plain_parts(model)
    handles, resid = [], {}
    for r in receivers:
        if r == ("logits",):
            handles.append(final.register_forward_hook(lambda m, args, out: m.forward(args[0] + change)))
            continue
        layer, head, which = r
        norm = layers[layer][1]
        proj, cols = plain_columns(model, layer, head, which)
        handles.append(norm.register_forward_pre_hook(lambda m, args, layer=layer: resid.__setitem__(layer, args[0])))

        def splice(m, args, out, layer=layer, norm=norm, cols=cols):
            full = m.forward(norm.forward(resid[layer] + change))
            out = out.clone()
            out[..., cols] = full[..., cols]
            return out
        handles.append(proj.register_forward_hook(splice))
    try:
        logits = model(input_ids=base_ids, attention_mask=task.mask, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    final_logits = logits[torch.arange(len(task)), task.last]
    return final_logits.gather(1, task.answer[:, None])[:, 0] - final_logits.gather(1, task.distractor[:, None])[:, 0]


# ------------------------------------------------------------------ tests
RECEIVER_SETS = {
    "q": [(2, 1, "q")],
    "k-two-of-a-group": [(2, 0, "k"), (2, 1, "k")],
    "v-and-q": [(1, 3, "v"), (2, 2, "q")],
    "logits": [("logits",)],
    "v-and-logits": [(2, 3, "v"), ("logits",)],
}


@pytest.mark.parametrize("name", sorted(RECEIVER_SETS))
def test_path_patching_equals_the_plain_one_path_loop(tiny, name):
    adapter = HeadAdapter(tiny.model)
    task = byte_task(tiny.tokenizer)
    clean, corrupt = cache_run(adapter, task.clean, task), cache_run(adapter, task.corrupt, task)
    receivers = RECEIVER_SETS[name]
    first = min(adapter.n_layers if r == ("logits",) else r[0] for r in receivers)
    senders = ["embed"] + [(l, h) for l in range(first) for h in range(adapter.n_heads)]
    directions = ["denoise", "noise"] if name == "v-and-q" else ["denoise"]
    for direction in directions:
        changes = plain_changes(tiny.model, task, senders, direction)
        one_chunk = path_patch(adapter, task, clean, corrupt, senders, receivers, direction)
        chunked = path_patch(adapter, task, clean, corrupt, senders, receivers, direction, rows=5)  # 1 sender a chunk
        base = corrupt.metric if direction == "denoise" else clean.metric
        moved = 0.0
        for i, sender in enumerate(senders):
            ref = plain_path(tiny.model, task, changes[sender], receivers, direction)
            for fast in (one_chunk, chunked):
                torch.testing.assert_close(fast.patched[i], ref, rtol=0, atol=1e-4)
                # random tiny models move the metric little along q/k paths (down to ~4e-6): a tight
                # check too (float error measured here ~1e-7), and the paths must move it 4x beyond it
                torch.testing.assert_close(fast.patched[i], ref, rtol=0, atol=5e-7)
            moved = max(moved, (ref - base).abs().max().item())
        assert moved > 2e-6
    assert one_chunk.restoration.shape == (len(senders), len(task))


def test_receiver_deltas_mlp_and_gradients(tiny):
    model = tiny.model
    adapter = HeadAdapter(model)
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 6))
    _, layers, _ = plain_parts(model)
    d = torch.randn(2, 6, adapter.d_model) * 0.5
    handle = layers[1][2].register_forward_hook(lambda m, args, out: m.forward(args[0] + d))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    handle.remove()
    with torch.no_grad(), receiver_deltas(adapter, {(1, "mlp"): d}):
        got = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)

    # zero deltas that require grad change nothing, and their gradient is the derivative
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits[:, -1, 7].sum()
    zero = torch.zeros(2, 6, adapter.n_heads, adapter.d_model, requires_grad=True)
    with receiver_deltas(adapter, {(2, "q"): zero}):
        out = model(input_ids=ids, use_cache=False).logits[:, -1, 7].sum()
    out.backward()
    torch.testing.assert_close(out.detach(), plain, rtol=0, atol=1e-5)
    direction = torch.zeros_like(zero)
    direction[:, :, 1] = torch.randn(2, 6, adapter.d_model)
    eps = 1e-3

    def at(x):
        with torch.no_grad(), receiver_deltas(adapter, {(2, "q"): x}):
            return model(input_ids=ids, use_cache=False).logits[:, -1, 7].sum().double()
    numeric = (at(eps * direction) - at(-eps * direction)) / (2 * eps)
    assert abs(float((zero.grad * direction).sum()) - float(numeric)) < 1e-2 * max(1.0, abs(float(numeric)))


def test_head_outputs_sum_to_the_attention_output(tiny):
    model = tiny.model
    adapter = HeadAdapter(model)
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 6))
    _, layers, _ = plain_parts(model)
    writes = head_outputs(adapter, ids, None)  # (layer, batch, pos, head, d_model)
    inputs = plain_out_proj_inputs(model, ids, None)
    for layer in range(adapter.n_layers):
        for head in range(adapter.n_heads):
            ref = plain_write(model, inputs, layer, head)
            torch.testing.assert_close(writes[layer, :, :, head], ref, rtol=0, atol=1e-5)


def test_path_scores_into_and_bad_paths(neox):
    adapter = HeadAdapter(neox.model)
    task = byte_task(neox.tokenizer)
    clean, corrupt = cache_run(adapter, task.clean, task), cache_run(adapter, task.corrupt, task)
    scores = path_scores_into(adapter, task, clean, corrupt, [(2, 0, "q"), (2, 3, "q")])
    assert scores.shape == (adapter.n_layers, adapter.n_heads)
    assert np.isfinite(scores[:2]).all() and np.isnan(scores[2:]).all()
    one = path_patch(adapter, task, clean, corrupt, [(1, 2)], [(2, 0, "q"), (2, 3, "q")])
    assert scores[1, 2] == pytest.approx(float(one.mean_restoration()[0]), abs=1e-5)
    with pytest.raises(UsageError, match="not in a later layer"):
        path_patch(adapter, task, clean, corrupt, [(2, 0)], [(2, 1, "q")])
    with pytest.raises(UsageError, match="expected"):
        path_patch(adapter, task, clean, corrupt, [(0, 0)], [(2, 1, "query")])
    with pytest.raises(UsageError):
        path_patch(adapter, task, clean, corrupt, [(0, 9)], [(2, 1, "q")])
    with pytest.raises(UsageError, match="delta has shape"), receiver_deltas(adapter, {(1, "q"): torch.zeros(1, 2, 3)}):
        neox.model(input_ids=task.corrupt, use_cache=False)
