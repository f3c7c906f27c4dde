"""pack_sequences layouts and token_logprobs against full-logit log-softmax on unpadded rows."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from gvmrl.batching import SequenceBatch, pack_sequences, position_ids, token_logprobs

PROMPTS = [[5, 6], [7], [8, 9, 10]]
RESPONSES = [[1, 2, 3], [4, 4], []]


def test_pack_right_and_left():
    right = pack_sequences(PROMPTS, RESPONSES, pad_id=0)
    assert right.input_ids.tolist() == [[5, 6, 1, 2, 3], [7, 4, 4, 0, 0], [8, 9, 10, 0, 0]]
    assert right.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert right.response_mask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]]
    left = pack_sequences(PROMPTS, RESPONSES, pad_id=0, padding_side="left")
    assert left.input_ids.tolist() == [[5, 6, 1, 2, 3], [0, 0, 7, 4, 4], [0, 0, 8, 9, 10]]
    assert left.response_mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]
    assert position_ids(left.attention_mask).tolist()[1] == [0, 0, 0, 1, 2]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="padding_side"):
        pack_sequences(PROMPTS, RESPONSES, pad_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="responses"):
        pack_sequences(PROMPTS, RESPONSES[:2], pad_id=0)
    with pytest.raises(ValueError, match="no tokens"):
        pack_sequences([[]], [[]], pad_id=0)


def test_select_and_to():
    batch = pack_sequences(PROMPTS, RESPONSES, pad_id=0)
    rows = batch.select([2, 0])
    assert isinstance(rows, SequenceBatch) and len(rows) == 2
    assert rows.input_ids.tolist() == [[8, 9, 10, 0, 0], [5, 6, 1, 2, 3]]
    assert batch.select(1).response_mask.tolist() == [[0, 1, 1, 0, 0]]
    assert batch.to("cpu").input_ids.equal(batch.input_ids)


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=23, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).double()


def naive_logprobs(model, prompts, responses, temperature):
    """(logp, entropy) lists per row from the full logits of each unpadded sequence."""
    out = []
    for prompt, response in zip(prompts, responses):
        ids = prompt + response
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        logp_all = torch.log_softmax(logits / temperature, dim=-1)
        logp = [0.0] + [float(logp_all[t - 1, ids[t]]) for t in range(1, len(ids))]
        entropy = [0.0] + [
            float(-(logp_all[t - 1].exp() * logp_all[t - 1]).sum()) for t in range(1, len(ids))
        ]
        out.append((logp, entropy))
    return out


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_token_logprobs_match_full_logits(model, padding_side, chunk_size):
    batch = pack_sequences(PROMPTS, RESPONSES, pad_id=0, padding_side=padding_side)
    logp, entropy = token_logprobs(
        model, batch, temperature=0.7, chunk_size=chunk_size, with_entropy=True
    )
    for n, (expected_logp, expected_entropy) in enumerate(
        naive_logprobs(model, PROMPTS, RESPONSES, 0.7)
    ):
        real = batch.attention_mask[n].bool()
        torch.testing.assert_close(logp[n][real], torch.tensor(expected_logp, dtype=torch.float64))
        torch.testing.assert_close(
            entropy[n][real], torch.tensor(expected_entropy, dtype=torch.float64)
        )
        assert logp[n][~real].eq(0).all()


def test_chunked_gradient_equals_unchunked(model):
    """Checkpointed chunks (logits recomputed in backward) give the same parameter gradient."""
    batch = pack_sequences(PROMPTS, RESPONSES, pad_id=0, padding_side="left")
    grads = []
    for chunk_size in (None, 2):
        model.zero_grad()
        loss = -(token_logprobs(model, batch, chunk_size=chunk_size) * batch.response_mask).sum()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad()
    for unchunked, chunked in zip(*grads):
        torch.testing.assert_close(chunked, unchunked)
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_temperature_must_be_positive(model):
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(model, pack_sequences(PROMPTS, RESPONSES, pad_id=0), temperature=0.0)
