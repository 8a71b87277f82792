"""``benchmarks/profile_smollm2.py``: the ``--free-attention`` bound row, on a tiny Llama."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_speed_plan import _ids, _script, _tiny_llama  # noqa: E402  (after the transformers skip)


def test_free_attention_replaces_only_the_attention_and_is_undone() -> None:
    """``profile_smollm2.py --free-attention``: the bound row runs the model with attention output = v."""
    profile = _script("profile_smollm2")
    model = _tiny_llama()
    with torch.no_grad():
        before = model(_ids()).logits
        with profile.free_attention(model):
            free = model(_ids()).logits
            layer = model.model.layers[0]
            x = torch.randn(1, 5, 64)
            value = layer.self_attn.v_proj(x).view(1, 5, 2, 16).repeat_interleave(2, 2).reshape(1, 5, 64)
            pos = model.model.rotary_emb(x, torch.arange(5)[None])
            out, _ = layer.self_attn(x, position_embeddings=pos, attention_mask=None)
            torch.testing.assert_close(out, layer.self_attn.o_proj(value))
        after = model(_ids()).logits
    assert not torch.allclose(free, before)
    torch.testing.assert_close(after, before)


def test_worker_forms_are_timed_side_by_side(capsys) -> None:
    """``--cores --targets worker``: every CPU form of worker attention and both projections get a line."""
    _script("profile_smollm2").time_worker_forms([16], repeat=1)
    out = capsys.readouterr().out
    for form in ("sdpa (host, all rows)", "SDPA blocks", "matmul + lse", "reference", "F.linear [1,", "F.linear [2,"):
        assert form in out
