"""Causal-LM (GPT-style) adapter and DAGER's decoder search, on a tiny GPT-2 saved as a local model directory."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_text import _tokenizer_dir, cola

from leakkit.client.victim import observe
from leakkit.tasks.text import CausalLanguageModeling, build_text_task
from leakkit.text import analytic as ta
from leakkit.text import decoder as dec
from leakkit.text.attack import exact


@pytest.fixture(scope="session")
def gpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("tiny-gpt2")
    _tokenizer_dir(root)
    tok = AutoTokenizer.from_pretrained(root)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=128, n_layer=2, n_head=4, activation_function="gelu_new",
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(root)
    return root


def _task(path: Path) -> CausalLanguageModeling:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = build_text_task("causal-lm", model=str(path))
    assert isinstance(task, CausalLanguageModeling)
    return task


def _update(task: CausalLanguageModeling, sentences: list[str], frozen: str = ""):
    batch = task.make_batch(sentences)
    params = [p for n, p in task.model.named_parameters() if frozen and frozen in n]
    for p in params:
        p.requires_grad_(False)
    try:
        return batch, observe(task.with_layout(batch.layout), batch.input_ids, batch.labels)
    finally:
        for p in params:
            p.requires_grad_(True)


def _sentences(task: CausalLanguageModeling, rows: list[list[int]]) -> list[str]:
    return sorted(task.decode(r) for r in rows)


def test_causal_loss_matches_transformers_and_labels_are_the_inputs(gpt_dir: Path) -> None:
    task = _task(gpt_dir)
    batch = task.make_batch(cola(3))
    start, end = task.boundary_ids()
    for b, L in enumerate(batch.layout.lengths):
        assert int(batch.input_ids[b, 0]) == start and int(batch.input_ids[b, L - 1]) == end
        assert (batch.labels[b, L:] == -100).all() and torch.equal(batch.labels[b, :L], batch.input_ids[b, :L])
    ours = task.with_layout(batch.layout).loss(batch.input_ids, batch.labels)
    theirs = task.model(input_ids=batch.input_ids, attention_mask=batch.layout.attention_mask(), labels=batch.labels).loss
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_fused_qkv_layers_are_found_and_their_span_holds_the_inputs(gpt_dir: Path) -> None:
    task = _task(gpt_dir)
    groups = ta.attention_groups(task)
    assert groups[:2] == [["transformer.h.0.attn.c_attn"], ["transformer.h.1.attn.c_attn"]]
    batch, obs = _update(task, cola(2))
    basis = ta.input_span(obs, ta._weights(groups[1]), model=task.model)  # Conv1D: weight is [in, out]
    x = ta.capture_input(task.model, groups[1][0], input_ids=batch.input_ids, attention_mask=batch.layout.attention_mask())
    L = batch.layout.lengths[0]
    assert ta.span_residual(x[0, : L - 1], basis).max() < 1e-4  # every position that feeds the loss
    assert ta.span_residual(torch.randn(5, x.shape[-1]), basis).min() > 0.1


def test_decoder_batch_is_recovered_exactly_with_a_prefix_sentence_and_a_duplicate(gpt_dir: Path) -> None:
    task = _task(gpt_dir)
    base = cola(3, 10)
    words = base[0].split()
    prefix = " ".join(words[: max(2, len(words) // 2)])  # a sentence that is the start of another
    sentences = [base[0], prefix, base[1], base[2], base[1]]
    batch, obs = _update(task, sentences)
    rec = exact(task, obs)
    assert rec.status == "exact" and rec.distance < 1e-5
    assert _sentences(task, rec.token_ids) == sorted(task.decode(r) for r in batch.originals.tolist())
    assert any("counts" in n for n in rec.notes)


def test_without_the_count_fit_a_prefix_sentence_is_missed(gpt_dir: Path) -> None:
    # the span search alone cannot see where a sentence ends inside another: that is what the count fit is for
    task = _task(gpt_dir)
    base = cola(2, 20)
    prefix = " ".join(base[0].split()[:3])
    batch, obs = _update(task, [base[0], prefix, base[1]])
    finder = task.sharing(obs.upcast())
    tokens = dec.candidate_tokens(finder, obs.upcast(), [])
    candidates = ta.position_candidates(finder, obs.upcast(), tokens=tokens, n_max=dec.position_limit(obs, finder))
    found = dec.search(finder, obs.upcast(), candidates)
    assert task.decode(task.make_batch([prefix]).input_ids[0].tolist()) not in _sentences(task, found.sentences)
    assert len(found.sentences) == 2


def test_withheld_word_embeddings_scan_the_vocabulary(gpt_dir: Path) -> None:
    task = _task(gpt_dir)
    batch, obs = _update(task, cola(3, 30), frozen="wte")
    assert task.word_embedding_name() not in obs.gradients
    rec = exact(task, obs)
    assert rec.status == "exact"
    assert _sentences(task, rec.token_ids) == sorted(task.decode(r) for r in batch.originals.tolist())
    assert any("withheld" in n for n in rec.notes)


def test_cli_decoder_exact_on_a_local_causal_lm(gpt_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "s.txt"
    text.write_text("\n".join(cola(4, 40)) + "\n")
    out = tmp_path / "run"
    proc = run_cli("run", "decoder-exact", f"task.model={gpt_dir}", "--input", str(text), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["summary"]["exact_rate"] == 1.0 and m["summary"]["n"] == 4


def test_an_encoder_is_refused_as_a_causal_lm(tmp_path: Path) -> None:
    from test_text import _model_dir

    enc = _model_dir(tmp_path / "enc", "masked-lm")
    from leakkit.errors import ConfigError

    with pytest.raises(ConfigError, match="not a causal LM"):
        _task(enc)


def test_a_noisy_update_is_searched_above_the_noise_recorded_or_estimated(gpt_dir: Path) -> None:
    # noise makes every span full rank; cut at the noise's edge (from the metadata, or estimated from the
    # gradient when the metadata says nothing) the spans separate real tokens from the rest again
    import dataclasses

    from leakkit.client.victim import defend

    task = _task(gpt_dir)
    sentences = cola(3, 5)
    _, obs = _update(task, sentences)
    noisy = defend(obs, "noise:std=1e-6", seed=0)
    rec = exact(task, noisy)
    assert _sentences(task, rec.token_ids) == sorted(sentences)
    assert any("from the update's metadata" in n for n in rec.notes)
    silent = dataclasses.replace(noisy, extra={k: v for k, v in noisy.extra.items() if k != "defenses"})
    rec = exact(task, silent)
    assert _sentences(task, rec.token_ids) == sorted(sentences)
    estimated = next(n for n in rec.notes if "estimated from the update" in n)
    assert 0.7e-6 < float(estimated.rsplit(" ", 1)[1]) < 1.3e-6, estimated
