"""Text attacks on tiny BERT models with a SentencePiece tokenizer trained here on real sentences."""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli

from leakkit import metrics
from leakkit.text import analytic as ta
from leakkit.text import matching
from leakkit.text.decoders import TOKEN_DECODERS
from leakkit.engine.matching import AttackConfig
from leakkit.tasks.text import MaskedLanguageModeling, SequenceClassification, build_text_task
from leakkit.text.attack import TextAttackSettings, exact, match
from leakkit.client.victim import observe
from leakkit.client.observation import Observation

COLA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "text" / "cola_dev.tsv"


def cola(n: int, start: int = 0) -> list[str]:
    """Real CoLA sentences from ../shared (the shipped embedded sentences where that is absent)."""
    if COLA.is_file():
        pool = [line.split("\t")[0] for line in COLA.read_text(encoding="utf-8").splitlines()]
    else:
        from leakkit.text.data import embedded

        pool = [s.text for s in embedded()]
    return [pool[i % len(pool)] for i in range(start, start + n)]


def _tokenizer_dir(root: Path) -> None:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(cola(516)), model_writer=buf, vocab_size=300, model_type="unigram",
        pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"],
        character_coverage=1.0, minloglevel=2, hard_vocab_limit=False,
    )
    (root / "spiece.model").write_bytes(buf.getvalue())
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "AlbertTokenizer", "do_lower_case": True, "cls_token": "[CLS]", "sep_token": "[SEP]",
        "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>",
    }))


def _model_dir(root: Path, head: str, *, shrink_vocab: bool = False, model_type: str = "bert") -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertForSequenceClassification

    root.mkdir(parents=True, exist_ok=True)
    _tokenizer_dir(root)
    vocab = len(AutoTokenizer.from_pretrained(root))
    vocab = vocab // 2 if shrink_vocab else vocab
    cfg = BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128,
                     max_position_embeddings=64, pad_token_id=0, num_labels=2,
                     initializer_range=0.3)
    torch.manual_seed(0)
    net = BertForMaskedLM(cfg) if head == "masked-lm" else BertForSequenceClassification(cfg)
    net.save_pretrained(root)
    if model_type != "bert":
        cfg_path = root / "config.json"
        raw = json.loads(cfg_path.read_text())
        raw["model_type"] = model_type
        cfg_path.write_text(json.dumps(raw))
    return root


@pytest.fixture(scope="session")
def mlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model_dir(tmp_path_factory.mktemp("tiny-mlm"), "masked-lm")


@pytest.fixture(scope="session")
def cls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model_dir(tmp_path_factory.mktemp("tiny-cls"), "sequence-classification")


def _task(kind: str, path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return build_text_task(kind, model=str(path))


def _observe_mlm(task: MaskedLanguageModeling, sentences: list[str], seed: int = 0):
    batch = task.make_batch(sentences, generator=torch.Generator().manual_seed(seed))
    return batch, observe(task.with_layout(batch.layout), batch.input_ids, batch.labels)


# --- adapters -----------------------------------------------------------------------------------
def test_sentencepiece_tokenizer_round_trips(mlm_dir: Path) -> None:
    task = _task("masked-lm", mlm_dir)
    ids, lengths = task.tokenize(["the cat sat on the mat"])
    assert type(task.tokenizer).__name__ == "AlbertTokenizer"
    assert ids[0, 0] == task.tokenizer.cls_token_id and ids[0, lengths[0] - 1] == task.tokenizer.sep_token_id
    assert task.decode(ids[0].tolist()) == "the cat sat on the mat"


def test_masking_follows_bert(mlm_dir: Path) -> None:
    task = _task("masked-lm", mlm_dir)
    ids, lengths = task.tokenize(cola(40))
    inputs, labels = task.mask(ids, lengths, generator=torch.Generator().manual_seed(3))
    special = task.special_ids()
    chosen = labels >= 0
    assert all(chosen[b].any() for b in range(len(lengths)))  # every sentence has a label
    assert not any(int(ids[b, j]) in special for b, j in torch.nonzero(chosen).tolist())
    assert torch.equal(labels[chosen], ids[chosen])
    ordinary = sum(sum(1 for j in range(L) if int(ids[b, j]) not in special) for b, L in enumerate(lengths))
    assert 0.08 < int(chosen.sum()) / ordinary < 0.3
    changed = inputs[chosen] != ids[chosen]
    assert (inputs[chosen][changed] == task.tokenizer.mask_token_id).float().mean() > 0.6
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_attacker_copy_is_float64_keeps_tied_weights_and_leaves_the_users_model_alone(mlm_dir: Path) -> None:
    task = _task("masked-lm", mlm_dir)
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    work = task.copy_to(dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in work.model.parameters())
    assert all(p.dtype == torch.float32 for p in task.model.parameters())
    assert work.model.get_output_embeddings().weight is work.model.get_input_embeddings().weight  # tied stays tied
    assert work.model.get_input_embeddings().weight is not task.model.get_input_embeddings().weight
    with torch.no_grad():
        work.model.get_input_embeddings().weight.add_(1.0)
    assert all(torch.equal(p, before[n]) for n, p in task.model.named_parameters())
    ids, _ = task.tokenize(cola(1))
    with torch.no_grad():
        work = task.copy_to(dtype=torch.float64, device="cpu")
        assert torch.allclose(work.model(input_ids=ids).logits.float(), task.model(input_ids=ids).logits, atol=1e-4)


def test_attacker_loss_on_embeddings_equals_victim_loss(mlm_dir: Path) -> None:
    task = _task("masked-lm", mlm_dir)
    batch = task.make_batch(cola(2), generator=torch.Generator().manual_seed(0))
    view = task.with_layout(batch.layout)
    victim = view.loss(batch.input_ids, batch.labels)
    V = task.vocab_size
    onehot = torch.zeros(batch.labels.numel(), V + 1)
    flat = batch.labels.flatten()
    onehot[torch.arange(flat.numel()), torch.where(flat < 0, V, flat)] = 1
    attacker = view.loss(view.embed(batch.input_ids), onehot)
    reference = view.model(input_ids=batch.input_ids, attention_mask=batch.layout.attention_mask(), labels=batch.labels).loss
    assert torch.allclose(victim, reference, atol=1e-6) and torch.allclose(attacker, reference, atol=1e-6)


# --- analytic leaks -----------------------------------------------------------------------------
def test_token_set_separated_from_tied_decoder(mlm_dir: Path) -> None:
    task = _task("masked-lm", mlm_dir)
    assert task.model.get_output_embeddings().weight is task.model.get_input_embeddings().weight
    batch, obs = _observe_mlm(task, cola(1, 5))
    grad = obs.gradients[task.word_embedding_name()]
    assert int((grad.norm(dim=1) > 0).sum()) > 0.9 * grad.shape[0]  # the decoder touches every row
    leak = ta.token_leak(grad, tied=True)
    assert leak.tokens == sorted(set(batch.input_ids[0].tolist()))
    assert leak.decoder_span.shape[1] == int((batch.labels >= 0).sum())


def test_order_from_position_gradient_is_exact(mlm_dir: Path) -> None:
    task = _task("masked-lm", mlm_dir)
    for k in range(3):
        batch, obs = _observe_mlm(task, cola(1, 10 + k), seed=k)
        leak = ta.token_leak(obs.gradients[task.word_embedding_name()], tied=True)
        pos = obs.gradients[task.position_embedding_name()]
        S = ta.order_from_positions(leak.input_rows, pos[ta.nonzero_positions(pos)], leak.decoder_span)
        assert torch.allclose(S, S.round(), atol=1e-3)
        assert [leak.tokens[int(t)] for t in S.argmax(0)] == batch.input_ids[0].tolist()


def test_span_check_finds_each_positions_token(cls_dir: Path) -> None:
    task = _task("sequence-classification", cls_dir)
    sentence = cola(1, 3)
    b = task.make_batch(sentence, [1])
    obs = observe(task.with_layout(b.layout), b.input_ids, b.labels)
    cands = ta.position_candidates(task, obs, tokens=None, n_max=task.max_length)
    assert [c for c in cands] == [[int(t)] for t in b.input_ids[0]]


def test_label_counts_from_bias_gradient() -> None:
    probs = torch.softmax(torch.randn(5, 7, dtype=torch.float64), -1)
    y = torch.tensor([1, 1, 4, 6, 0])
    bias = (probs - torch.nn.functional.one_hot(y, 7)).sum(0) / 5
    assert ta.label_counts(probs, bias, 5, reduction="mean").tolist() == torch.bincount(y, minlength=7).tolist()


# --- recovery -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_masked_lm_recovers_sentence_and_labels(mlm_dir: Path, seed: int) -> None:
    task = _task("masked-lm", mlm_dir)
    batch, obs = _observe_mlm(task, cola(1, 20 + seed), seed=seed)
    rec = exact(task, obs)
    assert rec.status == "exact" and rec.distance < 1e-5
    assert torch.equal(rec.input_ids, batch.input_ids)
    assert torch.equal(rec.labels, batch.labels)
    assert rec.token_ids == [batch.originals[0].tolist()]


def test_exact_classification_batch_is_split_into_sentences(cls_dir: Path) -> None:
    task = _task("sequence-classification", cls_dir)
    # the batch must hold fewer tokens than the width (64) for the span checks to separate it
    sentences = sorted(dict.fromkeys(cola(100)), key=len)[:2]
    b = task.make_batch(sentences, [0, 1])
    assert sum(b.layout.lengths) < 64
    obs = observe(task.with_layout(b.layout), b.input_ids, b.labels)
    rec = exact(task, obs)
    got = sorted(zip([task.decode(t) for t in rec.token_ids], rec.labels.tolist()))
    want = sorted(zip([task.decode(b.originals[i, :L].tolist()) for i, L in enumerate(b.layout.lengths)], [0, 1]))
    assert got == want


def test_exact_with_withheld_word_embeddings(mlm_dir: Path) -> None:
    task = _task("masked-lm", mlm_dir)
    batch, obs = _observe_mlm(task, cola(1, 40))
    for name in (task.word_embedding_name(), task.position_embedding_name()):
        del obs.gradients[name]
    rec = exact(task, obs)
    assert any("withheld" in n for n in rec.notes)
    assert rec.token_ids == [batch.originals[0].tolist()]


def test_matching_method_runs_and_decodes(cls_dir: Path) -> None:
    task = _task("sequence-classification", cls_dir)
    b = task.make_batch(cola(1, 50), [1])
    obs = observe(task.with_layout(b.layout), b.input_ids, b.labels)
    attack = AttackConfig(objective="cosine", optimizer="adam", lr=0.05, steps=15, labels="idlg",
                          init="gaussian", restarts=1, patience=0, priors={"embedding-norm": 0.1})
    rec = match(task, obs, attack, TextAttackSettings(restrict_tokens=True, discrete_steps=10))
    assert rec.input_ids.shape == b.input_ids.shape
    assert rec.labels.tolist() == [1]
    leaked = set(b.input_ids[0].tolist())
    assert set(rec.input_ids[0].tolist()) <= leaked  # decoding restricted to the leaked token set
    assert len(rec.trace) == 15


def test_token_decoders_invert_exact_embeddings(mlm_dir: Path) -> None:
    task = _task("masked-lm", mlm_dir)
    table = task.embedding_matrix().detach().double()
    ids = torch.tensor([[7, 50, 120, table.shape[0] - 1]])
    allowed = torch.tensor(sorted(set(range(table.shape[0])) - task.special_ids()))
    for name in TOKEN_DECODERS.names():
        assert TOKEN_DECODERS.get(name)(table[ids], table, allowed).tolist() == ids.tolist(), name
    restricted = torch.tensor([7, 50])
    out = TOKEN_DECODERS.get("cosine")(table[ids], table, restricted)
    assert set(out.flatten().tolist()) <= {7, 50}


def test_text_metrics() -> None:
    assert metrics.rouge("the cat sat", "the cat sat")["rouge1"] == 1.0
    r = metrics.rouge("the cat sat on the mat", "the dog sat")
    assert 0 < r["rouge1"] < 1 and r["rouge2"] == 0.0
    assert metrics.token_accuracy([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    assert metrics.best_match_text(["a b c", "x y z"], ["x y z", "a b d"]) == [1, 0]
    # one bag of words in two orders: each sentence is paired with its own order
    refs = ["the person responsible confessed", "the person confessed responsible"]
    assert metrics.best_match_text(refs, refs[::-1]) == [1, 0]
    assert metrics.best_match_text(refs, refs) == [0, 1]


# --- command line -------------------------------------------------------------------------------
def test_cli_bert_exact_end_to_end(mlm_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    data = tmp_path / "sentences.tsv"
    data.write_text("".join(f"{s}\t1\n" for s in cola(3)))
    proc = run_cli("run", "bert-exact", f"model={mlm_dir}", "--input", str(data), "--samples", "3", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    s = m["summary"]
    assert s["n"] == 3 and s["rouge1_mean"] == 1.0 and s["exact_rate"] == 1.0 and s["label_accuracy"] == 1.0
    for key in ("n", "rouge1_mean", "rouge2_mean", "exact_rate", "seconds_median"):
        assert key in s
    for key in ("reference", "recovered", "rouge1", "rouge2", "rougeL", "token_accuracy", "exact", "seconds"):
        assert key in m["samples"][0]
    assert "reference:" in (out / "diff.txt").read_text()
    assert len((out / "recovered.txt").read_text().splitlines()) == 3


def test_cli_observe_then_attack_captured_update(mlm_dir: Path, tmp_path: Path) -> None:
    sentence = tmp_path / "s.txt"
    sentence.write_text("the book was on the table\n")
    grads = tmp_path / "client.safetensors"
    proc = run_cli("observe", "bert-exact", f"model={mlm_dir}", "--input", str(sentence), "--out", str(grads), "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("attack", "--task", "masked-lm", "--model", str(mlm_dir), "--gradients", str(grads), "--out", str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr
    assert "the book was on the table" in proc.stdout
    assert (tmp_path / "a" / "recovered.txt").read_text().strip() == "the book was on the table"


def test_cli_bad_text_input(mlm_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "e.txt"
    empty.write_text("one sentence\n\nanother\n")
    assert_one_line_error(run_cli("run", "bert-exact", f"model={mlm_dir}", "--input", str(empty)), "empty line")
    long = tmp_path / "long.txt"
    long.write_text(" ".join(["word"] * 80) + "\n")
    assert_one_line_error(run_cli("run", "bert-exact", f"model={mlm_dir}", "--input", str(long)), "at most")
    assert_one_line_error(run_cli("run", "bert-exact", f"model={tmp_path / 'nowhere'}"), "not found")
    assert_one_line_error(run_cli("run", "bert-exact", "model=no-such-org/no-such-model"), "local cache")


def test_cli_rejects_non_bert_and_mismatched_tokenizer(tmp_path: Path) -> None:
    gpt = _model_dir(tmp_path / "gpt", "masked-lm", model_type="gpt2")
    assert_one_line_error(run_cli("run", "bert-exact", f"model={gpt}"), "not a BERT-style encoder")
    small = _model_dir(tmp_path / "small", "masked-lm", shrink_vocab=True)
    assert_one_line_error(run_cli("run", "bert-exact", f"model={small}"), "do not belong together")


def test_embedded_minilm_default_recovers_a_sentence(tmp_path: Path) -> None:
    proc = run_cli("run", "bert-exact", "--out", str(tmp_path / "r"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    s = json.loads((tmp_path / "r" / "metrics.json").read_text())["summary"]
    assert s["exact_rate"] == 1.0 and s["rouge1_mean"] == 1.0


def test_classification_adapter_label_count(cls_dir: Path) -> None:
    task = _task("sequence-classification", cls_dir)
    assert isinstance(task, SequenceClassification) and task.num_classes == 2
    w, b = task.classifier_parameter_names()
    assert w.endswith("classifier.weight") and b and b.endswith("classifier.bias")


def test_a_model_saved_with_sdpa_attention_is_attacked_with_eager_attention(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from leakkit.tasks.text import load_pretrained

    root = tmp_path / "sdpa"
    root.mkdir()
    _tokenizer_dir(root)
    cfg = BertConfig(vocab_size=len(AutoTokenizer.from_pretrained(root)), hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    BertForSequenceClassification._from_config(cfg, attn_implementation="sdpa").save_pretrained(root)
    net, tokenizer, _ = load_pretrained(str(root), head="sequence-classification")
    assert net.config._attn_implementation == "eager"
    # the attack differentiates the gradient itself: this fails through SDPA on CPU
    task = SequenceClassification(net, tokenizer)
    batch = task.make_batch(["the cat sat"], [1])
    view = task.with_layout(batch.layout)
    x = view.embed(batch.input_ids).detach().double().requires_grad_(True)
    view.model.double()
    grads = view.gradients(x, batch.labels, create_graph=True, matched=True)
    (g2,) = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), [x])
    assert torch.isfinite(g2).all()


def test_an_audit_says_the_new_head_warning_once(mlm_dir: Path, tmp_path: Path) -> None:
    sentences = tmp_path / "s.txt"
    sentences.write_text("the cat sat on the mat\na dog ran far away\nbirds sing at dawn\n", encoding="utf-8")
    proc = run_cli("audit", "bert-exact", "task.name=sequence-classification", f"model={mlm_dir}", "--input", str(sentences),
                   "--out", str(tmp_path / "a"), "--no-utility", "--no-report", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert sum("newly initialised" in line for line in proc.stderr.splitlines()) == 1, proc.stderr


def test_token_leak_on_a_large_tied_table_fits_the_span_on_a_sample() -> None:
    # BERT-sized table: 20,000 decoder rows in a 6-dimensional span (6 masked positions), 12 input rows
    # off it, 3 of which are also labels (their rows are dominated by the decoder part)
    gen = torch.Generator().manual_seed(0)
    V, d, M = 20_000, 96, 6
    h = torch.randn(M, d, generator=gen, dtype=torch.float64)
    coef = torch.rand(V, M, generator=gen, dtype=torch.float64) * 1e-4
    labels = torch.randperm(V, generator=gen)[:M]
    coef[labels, torch.arange(M)] -= 1.0
    grad = coef @ h
    tokens = sorted(torch.randperm(V, generator=gen)[:9].tolist() + labels[:3].tolist())
    for t in tokens:
        grad[t] += 1e-2 * torch.randn(d, generator=gen, dtype=torch.float64)
    leak = ta.token_leak(grad.float().double(), tied=True)
    assert leak.tokens == tokens
    assert leak.decoder_span.shape == (d, M)


def test_noisy_update_order_is_ranked_not_rejected(cls_dir: Path) -> None:
    # noise that blurs the position matrix away from 0/1 but leaves its ranking: the sentence still comes back
    from leakkit.client.victim import defend

    task = _task("sequence-classification", cls_dir)
    sentence = cola(1, 7)
    b = task.make_batch(sentence, [1])
    clean = observe(task.with_layout(b.layout), b.input_ids, b.labels)
    scale = float(clean.gradients[task.position_embedding_name()][: b.layout.lengths[0]].std())
    noisy = defend(clean, f"noise:std={scale / 100:.3g}", seed=0)
    rec = exact(task, noisy)
    assert task.decode(rec.token_ids[0]) == task.decode(b.originals[0].tolist())
    assert any("noisy position gradient" in n for n in rec.notes)


def test_noisy_tied_table_still_gives_the_masked_lm_sentence(mlm_dir: Path) -> None:
    # noise fills every direction of a tied table's normalised rows, so the relative singular-value
    # cut took the whole width as the decoder's span and no order could be read (0/8 sentences at
    # std 1e-5 on MiniLM): the span is now cut at the noise's edge
    from leakkit.client.victim import defend

    task = _task("masked-lm", mlm_dir)
    # sentences using under half of the 64 position rows: the used rows are then the norm outliers
    short = [s for s in cola(12, 20) if task.tokenize([s])[1][0] < 32][:3]
    for k, sentence in enumerate(short):
        batch, clean = _observe_mlm(task, [sentence], seed=k)
        grad = clean.gradients[task.word_embedding_name()]
        std = float(grad.norm(dim=1).median()) / math.sqrt(grad.shape[1]) / 10
        noisy = defend(clean, f"noise:std={std:.3g}", seed=k)
        bare = Observation(gradients=noisy.gradients, batch_size=1, reduction=noisy.reduction)  # noise not declared
        for update in (noisy, bare):
            rec = exact(task, update)
            L = batch.layout.lengths[0]
            assert rec.input_ids[0, :L].tolist() == batch.input_ids[0].tolist(), k


def test_soft_token_space_reproduces_the_lookup_gradient_of_the_word_embeddings(cls_dir: Path) -> None:
    # a near one-hot mixture over the leaked tokens has (to softmax precision) the real lookup's
    # word-embedding gradient, which is why that gradient can be matched in this space
    task = _task("sequence-classification", cls_dir)
    b = task.make_batch(cola(1, 3), [0])
    view = task.with_layout(b.layout)
    want = dict(zip([n for n, _ in view.parameters()], view.gradients(b.input_ids, b.labels)))
    tokens = sorted(set(b.input_ids[0].tolist()))
    soft = view.with_soft_tokens(tokens).with_layout(b.layout)
    assert task.word_embedding_name() in [n for n, _ in soft.matched_parameters()]
    assert task.word_embedding_name() not in [n for n, _ in view.matched_parameters()]
    logits = torch.full((1, b.input_ids.shape[1], len(tokens)), -40.0)
    for j, t in enumerate(b.input_ids[0].tolist()):
        logits[0, j, tokens.index(t)] = 40.0
    got = dict(zip([n for n, _ in soft.matched_parameters()], soft.gradients(logits, b.labels, matched=True)))
    w = task.word_embedding_name()
    assert torch.allclose(got[w], want[w], atol=1e-6)
    assert int((got[w].norm(dim=1) > 0).sum()) == len(tokens)


def test_text_utility_trains_the_classifier_under_the_defense(cls_dir: Path, tmp_path: Path) -> None:
    # real sentences with a label the tiny model can learn in a few steps (does the sentence hold "the"?):
    # trained on clean updates it is learned; updates drowned in noise teach nothing
    from leakkit.audit.utility import measure_utility, utility_available
    from leakkit.run.config import load_recipe

    if not COLA.is_file():
        # the embedded fallback holds too few distinct sentences for a split whose two labels both occur
        pytest.skip("needs the CoLA sentences of ../shared/data/text")
    data = tmp_path / "labelled.tsv"
    data.write_text("".join(f"{s}\t{int(' the ' in f' {s} ')}\n" for s in cola(400, 50)), encoding="utf-8")

    def accuracy(defense: str) -> float:
        recipe = load_recipe("bert-exact", ["task.name=sequence-classification", "task.num_classes=2", f"model={cls_dir}", f"utility.data={data}",
                                            "utility.steps=80", "utility.lr=3e-3", f"defense={defense}"])
        recipe.validate()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = measure_utility(recipe, seed=0)
        n = 400 - out["left_out"]["too_long"]
        assert out["dataset"].endswith(f"({n - n // 4} train / {n // 4} test)"), out
        return out["accuracy"]

    clean, drowned = accuracy("none"), accuracy("noise:std=10")
    assert clean >= 0.85 and drowned <= clean - 0.15, (clean, drowned)
    assert not utility_available(load_recipe("bert-exact", ["task.name=sequence-classification"]))
    assert not utility_available(load_recipe("bert-exact"))  # masked LM without sentences to fine-tune on


def test_masked_lm_utility_is_masked_token_accuracy_after_fine_tuning_under_the_defense(mlm_dir: Path, tmp_path: Path) -> None:
    # the tiny model starts knowing nothing; clean updates teach it the sentences' frequent tokens
    # (about 8 % of masked tokens after 200 steps, about what guessing the likeliest token scores),
    # updates drowned in noise do not (0.4 %)
    from leakkit.audit.utility import measure_utility, utility_available
    from leakkit.run.config import load_recipe

    if not COLA.is_file():
        pytest.skip("needs the CoLA sentences of ../shared/data/text")
    data = tmp_path / "sentences.txt"
    data.write_text("".join(f"{s}\n" for s in cola(300)), encoding="utf-8")

    def accuracy(defense: str) -> dict:
        recipe = load_recipe("bert-exact", [f"model={mlm_dir}", f"utility.data={data}", "utility.steps=200", "utility.lr=3e-3", f"defense={defense}"])
        recipe.validate()
        assert utility_available(recipe)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return measure_utility(recipe, seed=0)

    clean, drowned = accuracy("none"), accuracy("noise:std=10")
    assert clean["measure"].startswith("held-out masked-token accuracy"), clean
    assert clean["accuracy"] >= drowned["accuracy"] + 0.04, (clean, drowned)


def test_audit_without_utility_data_says_why_and_a_missing_file_is_one_line(cls_dir: Path, tmp_path: Path) -> None:
    sentences = tmp_path / "s.txt"
    sentences.write_text("the cat sat on the mat\n", encoding="utf-8")
    base = ["audit", "bert-exact", "task.name=sequence-classification", "task.num_classes=2", f"model={cls_dir}", "--input", str(sentences), "--no-report"]
    proc = run_cli(*base, "--out", str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr
    assert "utility.data=FILE.tsv" in proc.stdout
    assert_one_line_error(run_cli(*base, f"utility.data={tmp_path / 'nowhere.tsv'}", "--out", str(tmp_path / "b")), "no such file")
    # a trained 2-class head and the recipe's class count disagree: one line that says which to set
    assert_one_line_error(run_cli(*base[:3], "task.num_classes=5", *base[4:], "--out", str(tmp_path / "c")), "task.num_classes=2")


def _minilm_update(overrides: list[str], first: int, seed: int, *, head: str = "sequence-classification"):
    """The shipped MiniLM (a classifier unless `head` says otherwise), shipped sentences first.. (as
    many as the batch holds), and their update."""
    from leakkit.run.config import load_recipe
    from leakkit.run.text import build_text, client_update, make_text_batch
    from leakkit.text.data import embedded

    recipe = load_recipe("bert-exact", [f"task.name={head}", *overrides])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = build_text(recipe, seed=0)
    batch = make_text_batch(task, embedded()[first : first + recipe.data.batch_size], seed=seed)
    return task, batch, client_update(task, batch, recipe)


def test_encoder_batch_of_four_is_split_where_the_first_layer_lets_many_tokens_through() -> None:
    """MiniLM, classification, four shipped sentences: a token seen at two positions makes the first
    layer pass up to 5 tokens per position; the old one-restart-at-a-time search found 3 of the 4."""
    task, batch, obs = _minilm_update(["data.batch_size=4"], 12, seed=3)
    rec = exact(task, obs)
    want = sorted(batch.input_ids[i, :L].tolist() for i, L in enumerate(batch.layout.lengths))
    assert sorted(rec.token_ids) == want
    assert rec.status == "exact" and not any("closest" in n for n in rec.notes)


def test_noisy_encoder_batch_is_matched_to_the_embedding_gradients() -> None:
    """MiniLM, classification, batch 4, noise std 1e-5: the span tests rank every token at the noise
    (the sentence search returned its closest fragments, none of them whole); the sentences whose
    word- and position-embedding gradients add up to the update's come back, labels included."""
    task, batch, obs = _minilm_update(["data.batch_size=4", "defense=noise:std=1e-5"], 12, seed=3)
    rec = exact(task, obs, text=TextAttackSettings(search_budget=20_000))
    got = sorted(zip(rec.token_ids, rec.labels.tolist()))
    want = sorted((batch.input_ids[i, :L].tolist(), int(batch.labels[i])) for i, L in enumerate(batch.layout.lengths))
    assert got == want
    assert any("noise std 1e-05 from the update's metadata" in n for n in rec.notes)
    assert any("matched to the embedding gradients" in n for n in rec.notes)


def test_undeclared_noise_is_estimated_and_the_batch_matched_to_the_embedding_gradients() -> None:
    """An update whose metadata does not say it is noisy (a client that adds noise without recording
    it): the second attention layer's full rank gives the noise away, and its estimate sends the
    batch to the embedding-gradient match (the span search ran there before, at that estimate)."""
    import re

    task, batch, obs = _minilm_update(["data.batch_size=4", "defense=noise:std=1e-5"], 12, seed=3)
    obs.extra.pop("defenses")
    rec = exact(task, obs, text=TextAttackSettings(search_budget=300))
    said = next(n for n in rec.notes if "no noise declared" in n)
    estimated = float(re.search(r"estimated as ([0-9.e+-]+)", said).group(1))  # type: ignore[union-attr]
    assert 0.5e-5 < estimated < 2e-5
    assert any("estimated: the batch is matched to the word and position embedding gradients" in n for n in rec.notes)
    assert rec.input_ids.shape[0] == 4


def test_masked_lm_labels_and_their_count_are_read_off_the_decoder_bias() -> None:
    """Bias row v is (sum_i p_iv - count_v) / M: the labels go below 0 by count / M, and M is the
    smallest count that makes every label's depth whole."""
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(7, 500, generator=gen, dtype=torch.float64), -1) * 1e-2  # 7 labelled positions
    targets = [3, 3, 40, 41, 42, 43, 44]
    onehot = torch.zeros(7, 500, dtype=torch.float64)
    onehot[range(7), targets] = 1
    mean = (probs - onehot).sum(0) / 7 + 1e-6 * torch.randn(500, generator=gen, dtype=torch.float64)
    assert matching.label_multiset(mean, reduction="mean") == ({3: 2, 40: 1, 41: 1, 42: 1, 43: 1, 44: 1}, 7)
    assert matching.label_multiset(mean * 7, reduction="sum") == ({3: 2, 40: 1, 41: 1, 42: 1, 43: 1, 44: 1}, 7)


def test_masked_lm_hypothesis_shares_add_up_to_the_observed_embedding_rows() -> None:
    """The true masked-LM batch, written as codes (token + V * (label + 1)), reproduces the word and
    position rows of a clean update: the input side and the tied decoder's part both."""
    from leakkit.text import decoder as dec
    from leakkit.text.attack import _span_finder

    task, batch, obs = _minilm_update(["data.batch_size=2"], 0, seed=3, head="masked-lm")
    finder = _span_finder(task, obs, "cpu")
    search = matching._MaskedSearch(finder, obs, dec.position_limit(obs, finder))
    V = search.V
    codes = [
        [t + V * (int(y) + 1) if y >= 0 else t for t, y in zip(batch.input_ids[b, :L].tolist(), batch.labels[b, :L].tolist())]
        for b, L in enumerate(batch.layout.lengths)
    ]
    assert search.M == int((batch.labels >= 0).sum())
    shares = search._shares(codes, [0] * len(codes))
    left = search.observed - sum(s for s, _ in shares)
    assert float((left.double() ** 2).sum()) < 1e-8 * search.energy
    # without the tied decoder's part the label rows stay unexplained
    search.tied = False
    left = search.observed - sum(s for s, _ in search._shares(codes, [0] * len(codes)))
    assert float((left.double() ** 2).sum()) > 1e-2 * search.energy


def test_noisy_masked_lm_batch_is_matched_to_the_embedding_gradients() -> None:
    """MiniLM, masked LM, batch 4, noise std 1e-5 (shipped sentences 9-12): matched to the embedding
    rows, with the masked labels read off the decoder bias and placed by the moves, sentences come
    back with their labels (the span search brought back two inputs, neither with its labels).
    How many depends on the thread count: three of four with one torch thread (the test's
    workers), one with two. The update's float32 sums differ in their last bits, and the search's
    choices follow them (a float64 search changed nothing), so the test asks for one."""
    task, batch, obs = _minilm_update(["data.batch_size=4", "defense=noise:std=1e-5"], 8, seed=3, head="masked-lm")
    rec = exact(task, obs, text=TextAttackSettings(search_budget=12_000))
    want = [(batch.input_ids[i, :L].tolist(), batch.labels[i, :L].tolist()) for i, L in enumerate(batch.layout.lengths)]
    got = [(rec.input_ids[i, :L].tolist(), rec.labels[i, :L].tolist()) for i, L in enumerate(rec.lengths)]
    assert sum(g in want for g in got) >= 1
    assert any("matched to the embedding gradients" in n for n in rec.notes)


def test_token_positions_place_each_token_that_occurs_once() -> None:
    """Position rows are sums of token rows: least squares puts a weight of 1 where a token sits."""
    g = torch.randn(5, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # per-occurrence gradients
    words = torch.stack([g[0], g[1], g[2] + g[4], g[3]])  # token 2 occurs twice
    positions = torch.stack([g[0] + g[3], g[1] + g[4], g[2]])  # two sentences: tokens 0 1 2 and 3 2
    A = matching.token_positions(words, positions)
    assert torch.allclose(A[0], torch.tensor([1.0, 0, 0, 1], dtype=torch.float64), atol=1e-9)
    assert abs(float(A[1, 1]) - 1) < 0.2  # token 1 at position 1
    assert abs(float(A[1, 2] + A[2, 2]) - 1) < 0.2  # the repeated token's weight is shared by its two positions


def test_a_clean_batch_wider_than_the_model_is_named_as_such_not_as_noise() -> None:
    """Sixteen SST-2 sentences hold more tokens than MiniLM's width of 384: the second layer's
    gradient is full rank as under noise, but the word-embedding gradient keeps its zero rows."""
    from leakkit.run.config import load_recipe
    from leakkit.run.text import build_text, client_update, make_text_batch
    from leakkit.text.attack import _span_finder
    from leakkit.text.data import read_input

    sst2 = COLA.with_name("sst2_dev.tsv")
    if not sst2.is_file():
        pytest.skip("needs the SST-2 sentences of ../shared/data/text")
    wide = read_input(str(sst2))[:16]

    def notes_for(samples: list) -> list[str]:
        recipe = load_recipe("bert-exact", ["task.name=sequence-classification", f"data.batch_size={len(samples)}"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            task = build_text(recipe, seed=0)
        batch = make_text_batch(task, samples, seed=0)
        assert (sum(batch.layout.lengths) > 384) == (len(samples) == 16)
        obs = client_update(task, batch, recipe)
        notes: list[str] = []
        ta.update_noise(_span_finder(task, obs, "cpu"), obs, notes)
        return notes

    assert any("more tokens than the layer's width 384" in n for n in notes_for(wide))
    assert notes_for(wide[:2]) == []  # within the width: a clean update, nothing to say


def test_encoder_batch_searches_the_first_layers_closest_tokens_first() -> None:
    """Shipped sentences 4-7: LayerNorm's curvature lets 145 (token, position) pairs through the
    first layer's span for 42 real ones, and the search over all of them found 3 of the 4 sentences
    in its whole budget. The real pairs are exactly those at float32's floor, and from them it finds all 4."""
    from leakkit.text.attack import _span_finder

    task, batch, obs = _minilm_update(["data.batch_size=4"], 4, seed=0)
    finder = _span_finder(task, obs, "cpu")
    leak = ta.token_leak(obs.gradients[finder.word_embedding_name()], tied=False)
    scored = ta.scored_position_candidates(finder, obs, tokens=leak.tokens)
    L = batch.layout.lengths
    real = [sorted({int(batch.input_ids[b, j]) for b in range(4) if j < L[b]}) for j in range(max(L))]
    assert all(h == sorted(h) for h in scored) and sum(map(len, scored)) > 3 * sum(map(len, real))
    assert ta.tight_candidates(scored) == real
    rec = exact(task, obs)
    assert sorted(rec.token_ids) == sorted(batch.input_ids[i, :n].tolist() for i, n in enumerate(L))
    assert rec.status == "exact"


def test_a_found_sentence_is_taken_out_of_the_second_layers_span_with_its_class() -> None:
    """Subtracting a found sentence's own gradient narrows the second layer's span by exactly its
    tokens, for its true class only: the missing sentences still fit, the found one (and runs of it
    stitched into other hypotheses) no longer does."""
    from leakkit.text.attack import _SentenceSearch, _span_finder

    task, batch, obs = _minilm_update(["data.batch_size=4"], 4, seed=0)
    finder = _span_finder(task, obs, "cpu")
    L = batch.layout.lengths
    rows = [tuple(batch.input_ids[i, :n].tolist()) for i, n in enumerate(L)]
    search = _SentenceSearch(finder, obs, [[t] for t in rows[0]], 4, budget=10**6, seed=0)
    assert search.tokens == sum(L)  # the span's rank is the batch's token count
    assert float(search.score([rows[0]]).max()) < 1e-5
    search.record([rows[0]], search.score([rows[0]]))
    assert search.labels == {rows[0]: (int(batch.labels[0]), True)}
    assert ta.layer_span(finder, obs, 1).shape[1] == sum(L) - L[0]
    assert float(search.score(rows[1:]).max()) < 1e-5
    assert float(search.score([rows[0]])[0]) > 1e-2


def test_a_found_masked_lm_sentence_is_taken_out_with_its_masked_labels() -> None:
    """The masked LM's share of the gradient depends on the tokens under its masks: the right ones
    (read off the decoder's gradient, checked by the rank drop) take the sentence out of the second
    layer's span, and are the labels the client used."""
    from leakkit.text.attack import _SentenceSearch, _span_finder

    task, batch, obs = _minilm_update(["data.batch_size=4"], 4, seed=0, head="masked-lm")
    finder = _span_finder(task, obs, "cpu")
    L = batch.layout.lengths
    rows = [tuple(batch.input_ids[i, :n].tolist()) for i, n in enumerate(L)]
    search = _SentenceSearch(finder, obs, [[t] for t in rows[0]], 4, budget=10**6, seed=0)
    assert search.deflates
    search.record([rows[0]], search.score([rows[0]]))
    truth = tuple((j, int(v)) for j, v in enumerate(batch.labels[0, : L[0]].tolist()) if v >= 0)
    assert search.labels == {rows[0]: (truth, True)}
    assert ta.layer_span(finder, obs, 1).shape[1] == sum(L) - L[0]
    assert float(search.score(rows[1:]).max()) < 1e-5
    assert float(search.score([rows[0]])[0]) > 1e-2
    # the rest in turn: the last one has no rank left to lower, and its labels are still read
    for b in range(1, 4):
        search.record([rows[b]], search.score([rows[b]]))
    truths = {r: tuple((j, int(v)) for j, v in enumerate(batch.labels[b, : L[b]].tolist()) if v >= 0) for b, r in enumerate(rows)}
    assert search.labels == {r: (t, True) for r, t in truths.items()}


def test_label_fit_finds_a_pick_several_slots_away_from_the_likeliest() -> None:
    """`deflation.fit` on a linear system built to the masked LM's shape: a gradient that is the
    rest of a batch (rank 20) plus one sentence's share (rank 10 more), the share a sum over slots
    of one matrix per value. From the likeliest pick, three slots off, it finds the pick that
    lowers the rank by the sentence's length, and says so; where no pick can, it says it failed."""
    from leakkit.text import deflation

    gen = torch.Generator().manual_seed(0)
    rows, width, n = 60, 40, 10
    basis = torch.linalg.qr(torch.randn(width, width, generator=gen, dtype=torch.float64))[0]
    others, own = basis[:, :20], basis[:, 20:30]
    parts = [[torch.randn(rows, n, generator=gen, dtype=torch.float64) @ own.T for _ in range(5)] for _ in range(6)]
    right = (2, 0, 4, 0, 1, 0)

    def share(pick: tuple[int, ...], start: int) -> list[torch.Tensor]:
        return [sum(parts[i][r] for i, r in enumerate(pick))][start:]

    rest = torch.randn(rows, 20, generator=gen, dtype=torch.float64) @ others.T + share(right, 0)[0]
    span = basis[:, :30]
    options = deflation.Choices([list(range(5))] * 6, share, lambda pick: pick)
    got, label, basis = deflation.fit(options, rest, span, n)
    assert basis is not None and label == right
    assert torch.linalg.matrix_rank(rest - got[0]) == 20 and basis.shape == (30, 20)
    _, _, basis = deflation.fit(options, rest + 1e-3 * torch.randn(rows, width, generator=gen, dtype=torch.float64) @ span @ span.T, span, n)
    assert basis is None


def test_a_found_sentence_leaves_the_first_layers_candidates() -> None:
    """Once a found sentence is subtracted from the first layer's gradient too, the (token,
    position) pairs only it held stop being candidates, and the missing sentences keep theirs."""
    from leakkit.text.attack import _SentenceSearch, _span_finder

    task, batch, obs = _minilm_update(["data.batch_size=4"], 4, seed=0, head="masked-lm")
    finder = _span_finder(task, obs, "cpu")
    L = batch.layout.lengths
    rows = [tuple(batch.input_ids[i, :n].tolist()) for i, n in enumerate(L)]
    leaked = sorted({t for r in rows for t in r})  # a clean update leaks exactly the batch's tokens
    candidates = ta.token_lists(ta.scored_position_candidates(finder, obs, tokens=leaked))
    search = _SentenceSearch(finder, obs, candidates, 4, budget=10**6, seed=0)
    before = search.candidates
    search.record([rows[0]], search.score([rows[0]]))
    after = search.candidates
    assert all(r[j] in after[j] for r in rows[1:] for j in range(len(r)))
    only = [(j, t) for j, t in enumerate(rows[0]) if all(len(r) <= j or r[j] != t for r in rows[1:])]
    assert only and all(j >= len(after) or t not in after[j] for j, t in only)
    assert sum(map(len, after)) < sum(map(len, before))


def test_each_sentence_of_a_batch_is_verified_on_its_own() -> None:
    """A batch with one wrong token: the whole batch's gradient distance fails, but the three right
    sentences still fit the update's row spans on their own, and the wrong one does not."""
    from leakkit.text.attack import _attacker_copy, gradient_distance, verify_sentences

    task, batch, obs = _minilm_update(["data.batch_size=4"], 0, seed=0)
    work = _attacker_copy(task.sharing(obs), "cpu")
    ids, lengths = batch.input_ids.clone(), batch.layout.lengths
    assert verify_sentences(work, obs, ids, lengths, batch.labels) == [True] * 4
    ids[2, 3] = ids[0, 2] if ids[0, 2] != ids[2, 3] else ids[0, 1]
    assert gradient_distance(work, obs, ids, lengths, batch.labels) > 1e-3
    assert verify_sentences(work, obs, ids, lengths, batch.labels) == [True, True, False, True]


def test_a_masked_lm_sentence_without_a_label_is_not_verified() -> None:
    """A masked-LM sentence with no labelled position has no loss of its own: its zero gradient lies
    in every span, which says nothing about its tokens (such hypotheses were counted verified)."""
    from leakkit.run.config import load_recipe
    from leakkit.run.text import build_text, client_update, make_text_batch
    from leakkit.text.attack import _attacker_copy, verify_sentences
    from leakkit.text.data import embedded

    recipe = load_recipe("bert-exact", ["data.batch_size=2"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = build_text(recipe, seed=0)
    batch = make_text_batch(task, embedded()[:2], seed=0)
    obs = client_update(task, batch, recipe)
    work = _attacker_copy(task.sharing(obs), "cpu")
    ids, lengths = batch.input_ids, batch.layout.lengths
    assert (batch.labels >= 0).any(-1).all()  # each sentence has a masked position
    assert verify_sentences(work, obs, ids, lengths, batch.labels) == [True, True]
    unlabelled = batch.labels.clone()
    unlabelled[1] = -100
    assert verify_sentences(work, obs, ids, lengths, unlabelled) == [True, False]


def test_subspace_objective_is_zero_at_the_true_embeddings_only(cls_dir: Path) -> None:
    from leakkit.engine.objectives import OBJECTIVES
    from leakkit.errors import ConfigError

    task = _task("sequence-classification", cls_dir)
    b = task.make_batch(cola(1, 3), [1])
    obs = observe(task.with_layout(b.layout), b.input_ids, b.labels)
    view = task.with_layout(b.layout)
    score = OBJECTIVES.get("subspace").fit(view, obs.gradients, 0.0)
    with torch.no_grad():
        true = view.embed(b.input_ids)
        assert float(score(true)) < 1e-8
        shuffled = true[:, torch.randperm(true.shape[1], generator=torch.Generator().manual_seed(0))]
        assert float(score(shuffled)) > 1e-3  # right tokens at the wrong positions
        assert float(score(torch.randn_like(true))) > 1e-2
    frozen = dict(obs.gradients)
    frozen.pop(task.span_probe()[0][0])
    with pytest.raises(ConfigError, match="withholds"):
        OBJECTIVES.get("subspace").fit(view, frozen, 0.0)


def test_tiger_bert_recovers_the_embedded_sentence(tmp_path: Path) -> None:
    proc = run_cli("run", "tiger-bert", "--out", str(tmp_path / "run"), timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())["summary"]
    assert summary["exact"] == 1


def test_a_gradient_objective_can_opt_into_the_subspace_term(cls_dir: Path) -> None:
    from leakkit.engine.matching import reconstruct
    from leakkit.engine.objectives import OBJECTIVES
    from leakkit.errors import ConfigError

    with pytest.raises(ConfigError, match="subspace_weight"):
        AttackConfig(subspace_weight=-1.0).validate()
    task = _task("sequence-classification", cls_dir)
    b = task.make_batch(cola(1, 5), [0])
    obs = observe(task.with_layout(b.layout), b.input_ids, b.labels)
    view = task.with_layout(b.layout)
    score = OBJECTIVES.get("subspace").fit(view, obs.gradients, 0.0)
    ends = {}
    for weight in (0.0, 100.0):
        cfg = AttackConfig(objective="cosine", optimizer="adam", lr=0.05, steps=40, labels="idlg", init="gaussian",
                           restarts=1, patience=0, subspace_weight=weight)
        rec = reconstruct(view, obs, cfg, seed=0)
        with torch.no_grad():
            ends[weight] = float(score(rec.inputs.float()))
    assert ends[100.0] < 0.5 * ends[0.0]


def test_masked_lm_labels_sit_where_the_input_is_mask_and_come_from_the_bias_gradient(mlm_dir: Path) -> None:
    from leakkit.text.attack import _masked_lm_labels

    task = _task("masked-lm", mlm_dir)
    batch, obs = _observe_mlm(task, cola(1, 3))
    view = task.with_layout(batch.layout)
    B, n = batch.input_ids.shape
    # a soft label that settled nowhere: every position "masked" and a wrong token most probable everywhere
    soft = torch.full((B, n, view.num_classes), 1e-3)
    soft[..., 5] = 1.0
    labels = _masked_lm_labels(soft, batch.input_ids, view, obs)
    masked = batch.input_ids == task.tokenizer.mask_token_id
    assert bool(masked.any())
    assert (labels[~masked] == -100).all()  # a position whose input is a real token was not masked
    # the soft label's favourite (token 5) is no label: the bias gradient's label tokens overrule it
    assert set(labels[masked].tolist()) <= set(batch.labels[batch.labels >= 0].tolist())


def test_covering_decoding_places_every_leaked_token_where_it_costs_least() -> None:
    """Two positions prefer token 10 over 11 and 12; 11 is nearly as likely at position 2 as 10, so
    covering puts it there and keeps 10 at position 1, and leaves the boundary positions alone.
    A sentence too short for its leaked tokens keeps its argmax and says so."""
    from leakkit.text.attack import _cover

    leaked = [1, 10, 11, 2]  # [CLS], two ordinary tokens, [SEP]
    logits = torch.tensor([[[9.0, 0, 0, 0], [0, 5.0, 1.0, 0], [0, 5.0, 4.9, 0], [0, 0, 0, 9.0]]])
    ordinary = torch.tensor([False, True, True, False])
    argmax = torch.tensor(leaked)[logits.argmax(-1)]
    assert argmax.tolist() == [[1, 10, 10, 2]]
    notes: list[str] = []
    assert _cover(logits, leaked, ordinary, [4], argmax, notes).tolist() == [[1, 10, 11, 2]] and not notes
    assert _cover(logits[:, :3], leaked, ordinary, [3], argmax[:, :3], notes).tolist() == [[1, 10, 10]]
    assert "skipped" in notes[0]
