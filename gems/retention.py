"""General-domain retention: how much of the base model's general ability a tuned model keeps.

GEMS's null-space projection exists to protect general knowledge while the model learns search and
recommendation; this module measures whether it did, against the untouched base model:

- perplexity of both models on held-out general text (wikitext-2 TEST; the protection basis is
  built from wikitext-2 VALID, and the two must never be the same text), each under its own full
  softmax, i.e. as the model really behaves (mass a tuned model wastes on item tokens counts);
- mean KL(base || tuned) of next-token distributions on the same text, over the ORIGINAL
  vocabulary only: the first ``original_vocab_size`` logits of each model (item tokens excluded),
  each renormalised there, so the number measures drift in language, not the new item rows;
  ``item_mass`` separately reports the probability the tuned model puts on tokens outside it;
- MMLU-Redux accuracy by answer log-likelihood (cloze form: the choice text after "Answer:", summed
  log-probability divided by its character length, as lm-eval's acc_norm) on a fixed seeded subset
  of the questions MMLU-Redux marks as correct ("ok").

Everything is bounded (``max_tokens`` of text, ``mmlu_questions`` questions). Where the shared data
is absent (a user's fresh machine) it measures what it can reach: KL on text the base model writes
greedily from fixed prompts (perplexity on the base model's own output would flatter the base, so
it is skipped), and ``skipped`` says what was left out and why.
"""

from __future__ import annotations

import ast
import csv
import io
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gems.config import Config
from gems.general_text import greedy_continuations
from gems.items import ITEM_TOKEN_PREFIX
from gems.paths import shared_file

#: Prompts for the fallback corpus; deliberately unlike any null-space basis prompts.
FALLBACK_PROMPTS: tuple[str, ...] = (
    "The river valley was first settled by farmers who",
    "In mathematics, a prime number is",
    "The orchestra began the second movement slowly, and",
    "Glaciers move slowly down the mountain, carving",
    "During the winter of that year, the city council decided",
    "A well-written letter of recommendation should",
    "The old lighthouse keeper climbed the stairs every evening to",
    "Volcanoes form where molten rock rises through",
)

WIKITEXT_TEST = ("general", "wikitext2", "test.txt")
WIKITEXT_VALID = ("general", "wikitext2", "valid.txt")
MMLU_DIR = ("general", "mmlu_redux")


@dataclass
class RetentionResult:
    """Retention of ``tuned`` vs ``base``; None where a measure was skipped (see ``skipped``)."""

    ppl_base: float | None
    ppl_tuned: float | None
    ppl_ratio: float | None  # tuned / base; > 1 means general text got harder for the tuned model
    kl: float | None  # mean KL(base || tuned) per token over the original vocabulary, nats
    item_mass: float | None  # mean probability the tuned model puts outside the original vocab
    mmlu_base: float | None
    mmlu_tuned: float | None
    mmlu_questions: int
    tokens: int  # general-text tokens the perplexity/KL were measured on
    corpus: str
    skipped: list[str] = field(default_factory=list)

    def metrics(self, prefix: str = "retention/") -> dict[str, float]:
        """Numeric, measured fields as a flat dict for Ray Train / MLflow."""
        out = {}
        for name, value in asdict(self).items():
            if isinstance(value, int | float) and not isinstance(value, bool) and value is not None:
                out[f"{prefix}{name}"] = float(value)
        return out


@dataclass(frozen=True)
class MMLUQuestion:
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int


def original_vocab_size(tokenizer: object) -> int:
    """Tokens that existed before item tokens were added: item tokens are appended, so every id
    below the smallest item-token id is original."""
    vocab: dict[str, int] = tokenizer.get_vocab()  # type: ignore[attr-defined]
    item_ids = [i for tok, i in vocab.items() if tok.startswith(ITEM_TOKEN_PREFIX)]
    return min(item_ids) if item_ids else len(tokenizer)  # type: ignore[arg-type]


def _read_prefix(path: Path, tokenizer: object, max_tokens: int) -> torch.Tensor:
    """The first ``max_tokens`` tokens of a text file, reading only as much as needed."""
    chars = max_tokens * 8
    with path.open(encoding="utf-8", errors="replace") as fh:
        while True:
            text = fh.read(chars)
            fh.seek(0)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
            if len(ids) >= max_tokens or len(text) < chars:
                return torch.tensor(ids[:max_tokens], dtype=torch.long)
            chars *= 4


def _windows(token_ids: torch.Tensor, window: int, bos_id: int | None) -> list[torch.Tensor]:
    """Non-overlapping windows, each prefixed by BOS (when the tokenizer has one) so its first
    token is predicted too."""
    out = []
    for start in range(0, len(token_ids), window):
        chunk = token_ids[start:start + window]
        if bos_id is not None:
            chunk = torch.cat([torch.tensor([bos_id]), chunk])
        if len(chunk) >= 2:
            out.append(chunk)
    return out


def _batches(windows: list[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    by_len: dict[int, list[torch.Tensor]] = {}
    for w in windows:
        by_len.setdefault(len(w), []).append(w)
    for same in by_len.values():
        for i in range(0, len(same), batch_size):
            yield torch.stack(same[i:i + batch_size])


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity_and_kl(base: torch.nn.Module, tuned: torch.nn.Module, windows: list[torch.Tensor],
                      vocab_size: int, batch_size: int = 2,
                      progress: bool = False) -> dict[str, float]:
    """ppl_base, ppl_tuned, kl (base || tuned over the first ``vocab_size`` logits), item_mass."""
    nll = {"base": 0.0, "tuned": 0.0}
    kl_sum = item_mass_sum = 0.0
    count = 0
    for batch in tqdm(list(_batches(windows, batch_size)), desc="retention text",
                      disable=not progress):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = {name: m(input_ids=inputs.to(_device(m)), use_cache=False).logits.float().cpu()
                  for name, m in (("base", base), ("tuned", tuned))}
        for name, lg in logits.items():
            nll[name] += float(F.cross_entropy(lg.flatten(0, 1), targets.flatten(),
                                               reduction="sum"))
        log_base = F.log_softmax(logits["base"][..., :vocab_size], dim=-1)
        log_tuned = F.log_softmax(logits["tuned"][..., :vocab_size], dim=-1)
        kl_sum += float((log_base.exp() * (log_base - log_tuned)).sum())
        full_tuned = logits["tuned"]
        inside = torch.logsumexp(full_tuned[..., :vocab_size], -1) - torch.logsumexp(full_tuned, -1)
        item_mass_sum += float((1 - inside.exp()).sum())
        count += targets.numel()
    if count == 0:
        raise ValueError("no general-text tokens to measure retention on")
    return {"ppl_base": math.exp(nll["base"] / count), "ppl_tuned": math.exp(nll["tuned"] / count),
            "kl": max(kl_sum / count, 0.0), "item_mass": item_mass_sum / count, "tokens": count}


def greedy_general_windows(model: torch.nn.Module, tokenizer: object, max_tokens: int,
                           prompts: Sequence[str] = FALLBACK_PROMPTS) -> list[torch.Tensor]:
    """Fallback general text: the base model's greedy continuations of fixed prompts (token ids).

    All prompts decode as one left-padded batch (one forward per new token, not one per prompt
    and token: 8x fewer on the default prompts), each to exactly its full length; the padding is
    cut off again, so no window holds any.
    """
    per_prompt = max(1, max_tokens // len(prompts))
    pad = tokenizer.pad_token_id or tokenizer.eos_token_id or 0  # type: ignore[attr-defined]
    bos = 1 if tokenizer.bos_token_id is not None else 0  # type: ignore[attr-defined]
    lengths = [len(_encode(tokenizer, p)) + bos for p in prompts]
    out = greedy_continuations(model, tokenizer, list(prompts), per_prompt, pad, bos=True,  # type: ignore[arg-type]
                               min_new_tokens=per_prompt).cpu()
    width = out.shape[1] - per_prompt
    return [out[i, width - n:] for i, n in enumerate(lengths)]


def _read_mmlu_csv(path: Path) -> list[dict[str, str]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # one MMLU-Redux file is cp1252
        text = raw.decode("cp1252", errors="replace")
    header = text.split("\n", 1)[0]
    delimiter = ";" if header.count(";") > header.count(",") else ","  # files use both
    return list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))


def load_mmlu_subset(directory: Path, n: int, seed: int = 0) -> list[MMLUQuestion]:
    """A fixed seeded subset of the MMLU-Redux questions annotated as correct ("ok")."""
    pool: list[MMLUQuestion] = []
    for path in sorted(directory.glob("*.csv")):
        subject = path.stem.removeprefix("mmlu_").replace("_", " ")
        for row in _read_mmlu_csv(path):
            if (row.get("error_type") or "").strip().lower() != "ok":
                continue
            try:
                choices = tuple(str(c) for c in ast.literal_eval(row["choices"]))
                answer = int(row["answer"])
            except (ValueError, SyntaxError, KeyError, TypeError):
                continue
            if 0 <= answer < len(choices):
                pool.append(MMLUQuestion(subject, row["question"], choices, answer))
    if not pool:
        raise ValueError(f"no usable MMLU-Redux questions under {directory}")
    rng = random.Random(seed)
    return rng.sample(pool, min(n, len(pool)))


def _mmlu_prompt(q: MMLUQuestion) -> str:
    return f"The following is a question about {q.subject}.\n\nQuestion: {q.question}\nAnswer:"


def _encode(tokenizer: object, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]


@torch.no_grad()
def choice_scores(model: torch.nn.Module, tokenizer: object, question: MMLUQuestion,
                  max_len: int = 512) -> list[float]:
    """Log-likelihood of each choice's text after the prompt, divided by its character length.

    The prompt runs once; its KV cache is repeated for the choices, which then run as one batch
    (right-padded, so positions continue naturally from the prompt). A question's cost is then
    about one prompt, not one per choice.
    """
    conts = [_encode(tokenizer, " " + c)[: max(1, max_len // 2)] for c in question.choices]
    prompt_ids = _encode(tokenizer, _mmlu_prompt(question))
    prompt_ids = prompt_ids[-max(1, max_len - max(len(c) for c in conts)):]
    dev = _device(model)
    head = model(input_ids=torch.tensor([prompt_ids], device=dev), use_cache=True)
    first = F.log_softmax(head.logits[0, -1].float().cpu(), -1)
    width = max(len(c) for c in conts)
    scores = [float(first[c[0]]) for c in conts]
    if width > 1:
        cache = head.past_key_values
        cache.batch_repeat_interleave(len(conts))
        pad = tokenizer.pad_token_id or 0  # type: ignore[attr-defined]
        ids = torch.full((len(conts), width), pad, dtype=torch.long)
        mask = torch.zeros(len(conts), len(prompt_ids) + width, dtype=torch.long)
        mask[:, : len(prompt_ids)] = 1
        for i, c in enumerate(conts):
            ids[i, : len(c)] = torch.tensor(c)
            mask[i, len(prompt_ids): len(prompt_ids) + len(c)] = 1
        logp = F.log_softmax(model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                   past_key_values=cache, use_cache=True).logits.float().cpu(), -1)
        for i, c in enumerate(conts):
            if len(c) > 1:
                scores[i] += float(logp[i, : len(c) - 1].gather(1, ids[i, 1: len(c), None]).sum())
    return [score / (len(choice) + 1) for score, choice in zip(scores, question.choices,
                                                                 strict=True)]


def mmlu_accuracy(model: torch.nn.Module, tokenizer: object, questions: Sequence[MMLUQuestion],
                  max_len: int = 512, progress: bool = False) -> float:
    """Share of questions whose correct choice has the highest length-normalised log-likelihood."""
    if not questions:
        raise ValueError("no MMLU questions to score")
    correct = 0
    for q in tqdm(questions, desc="mmlu", disable=not progress):
        scores = choice_scores(model, tokenizer, q, max_len)
        correct += int(max(range(len(scores)), key=scores.__getitem__) == q.answer)
    return correct / len(questions)


def _same_file(a: Path | None, b: Path | None) -> bool:
    return a is not None and b is not None and a.resolve() == b.resolve()


def measure_retention(base: torch.nn.Module, tuned: torch.nn.Module, tokenizer: object, *,
                      max_tokens: int = 4096, mmlu_questions: int = 100, seed: int = 0,
                      general_corpus: Path | None = None, basis_corpus: Path | None = None,
                      window: int = 256, batch_size: int = 2, mmlu_max_len: int = 512,
                      progress: bool = False) -> RetentionResult:
    """Retention of ``tuned`` vs ``base`` (same tokenizer for the original vocabulary; the tuned
    one may have item tokens appended).

    ``general_corpus``: text file to measure on (default wikitext-2 test from shared data);
    ``basis_corpus``: the file the null-space basis was built from (default wikitext-2 valid) -
    using the same text for both is refused, since retention would then be measured on exactly
    the directions GEMS protects.
    """
    skipped: list[str] = []
    corpus_path = general_corpus or shared_file(*WIKITEXT_TEST)
    basis_path = basis_corpus or shared_file(*WIKITEXT_VALID)
    if _same_file(corpus_path, basis_path):
        raise ValueError(f"retention corpus {corpus_path} is the null-space basis corpus; measure "
                         "retention on different text (wikitext-2 test vs valid)")
    was_training = (base.training, tuned.training)
    base.eval()
    tuned.eval()
    try:
        vocab = original_vocab_size(tokenizer)
        bos = tokenizer.bos_token_id  # type: ignore[attr-defined]
        if corpus_path is not None:
            ids = _read_prefix(corpus_path, tokenizer, max_tokens)
            windows = _windows(ids, window, bos)
            corpus = f"{corpus_path.name} ({corpus_path.parent.name}), first {len(ids)} tokens"
        else:
            windows = greedy_general_windows(base, tokenizer, max_tokens)
            corpus = (f"base-model greedy continuations of {len(FALLBACK_PROMPTS)} fixed prompts "
                      f"(~{max_tokens} tokens)")
            skipped.append("perplexity: wikitext-2 test text not found (shared data absent); "
                           "perplexity on the base model's own output would flatter the base")
        text = perplexity_and_kl(base, tuned, windows, vocab, batch_size, progress)
        mmlu_base = mmlu_tuned = None
        n_questions = 0
        mmlu_dir = shared_file(*MMLU_DIR)
        if mmlu_questions <= 0:
            skipped.append("mmlu: disabled (mmlu_questions = 0)")
        elif mmlu_dir is None:
            skipped.append("mmlu: MMLU-Redux CSVs not found (shared data absent)")
        else:
            questions = load_mmlu_subset(mmlu_dir, mmlu_questions, seed)
            n_questions = len(questions)
            mmlu_base = mmlu_accuracy(base, tokenizer, questions, mmlu_max_len, progress=progress)
            mmlu_tuned = mmlu_accuracy(tuned, tokenizer, questions, mmlu_max_len,
                                       progress=progress)
    finally:
        base.train(was_training[0])
        tuned.train(was_training[1])
    measured_ppl = corpus_path is not None
    return RetentionResult(
        ppl_base=text["ppl_base"] if measured_ppl else None,
        ppl_tuned=text["ppl_tuned"] if measured_ppl else None,
        ppl_ratio=text["ppl_tuned"] / text["ppl_base"] if measured_ppl else None,
        kl=text["kl"], item_mass=text["item_mass"], mmlu_base=mmlu_base, mmlu_tuned=mmlu_tuned,
        mmlu_questions=n_questions, tokens=int(text["tokens"]), corpus=corpus, skipped=skipped)


def retention_with_config(base: torch.nn.Module, tuned: torch.nn.Module, tokenizer: object,
                          cfg: Config, progress: bool = False) -> RetentionResult:
    """``measure_retention`` bounded by cfg.eval, refusing cfg.gems.general_corpus as the text."""
    basis = Path(cfg.gems.general_corpus).expanduser() if cfg.gems.general_corpus else None
    return measure_retention(base, tuned, tokenizer, max_tokens=cfg.eval.retention_max_tokens,
                             mmlu_questions=cfg.eval.mmlu_questions, seed=cfg.data.seed,
                             basis_corpus=basis, progress=progress)
