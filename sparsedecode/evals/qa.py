"""The QA sets behind RULER's qa_1 / qa_2 tasks: SQuAD v2 and HotpotQA dev files read into one form."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class QaQuestion:
    query: str
    answers: list[str]
    gold: list[int]  # documents that hold the answer
    related: list[int]  # the first distractors (SQuAD: the other paragraphs of the same article)


@dataclass(frozen=True)
class QaSet:
    documents: list[str]
    questions: list[QaQuestion]


def _load_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read QA file {path}: {e}") from e


def read_squad(path: str | Path) -> QaSet:
    """SQuAD v2 dev JSON (`dev-v2.0.json`): the answerable questions, documents = the paragraphs."""
    data = _load_json(path)
    try:
        articles = [[p["context"] for p in article["paragraphs"]] for article in data["data"]]
        documents = sorted({c for paragraphs in articles for c in paragraphs})
        doc_id = {c: i for i, c in enumerate(documents)}
        questions = []
        for article, paragraphs in zip(data["data"], articles):
            article_ids = [doc_id[c] for c in paragraphs]
            for paragraph in article["paragraphs"]:
                own = doc_id[paragraph["context"]]
                for qa in paragraph["qas"]:
                    if qa.get("is_impossible"):
                        continue
                    answers = list(dict.fromkeys(a["text"] for a in qa["answers"]))
                    questions.append(QaQuestion(qa["question"], answers, [own], [i for i in article_ids if i != own]))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path} is not SQuAD v2 JSON (missing {e})") from e
    if not questions:
        raise ValueError(f"{path} has no answerable questions")
    return QaSet(documents, questions)


def read_hotpotqa(path: str | Path) -> QaSet:
    """HotpotQA dev JSON (`hotpot_dev_distractor_v1.json`): documents = "title\\ntext" of each context paragraph."""
    data = _load_json(path)
    try:
        contexts = [[f"{title}\n{''.join(sentences)}" for title, sentences in item["context"]] for item in data]
        documents = sorted({d for docs in contexts for d in docs})
        doc_id = {d: i for i, d in enumerate(documents)}
        questions = [QaQuestion(item["question"], [item["answer"]], [doc_id[d] for d in docs], [])
                     for item, docs in zip(data, contexts)]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not HotpotQA JSON ({e})") from e
    if not questions:
        raise ValueError(f"{path} has no questions")
    return QaSet(documents, questions)
