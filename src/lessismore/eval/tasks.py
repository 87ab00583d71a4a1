"""Benchmarks: the shipped AIME-24, AIME-25 and MATH500 files, and GPQA-Diamond from a user's file.

A task is a list of :class:`Problem`. Each problem carries the user message to send (before the chat
template), the reference answer and, for GPQA, the options in the order shown to the model.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from lessismore.eval.prompts import GPQA_INSTRUCTION, MATH_INSTRUCTION

MATH_TASKS = ("aime24", "aime25", "math500")
TASKS = MATH_TASKS + ("gpqa",)
# Samples per problem in the paper: 16 for AIME, 8 for MATH500 and GPQA-Diamond.
DEFAULT_N = {"aime24": 16, "aime25": 16, "math500": 8, "gpqa": 8}
LETTERS = "ABCD"


@dataclass(frozen=True)
class Problem:
    task: str
    id: str
    question: str  # the problem text (GPQA: stem and the shuffled options)
    answer: str  # math: the reference answer in LaTeX; GPQA: the correct letter after the shuffle
    options: tuple[str, ...] = ()  # GPQA only: option texts in the order shown (A, B, C, D)
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.options)

    @property
    def user_message(self) -> str:
        instruction = GPQA_INSTRUCTION if self.is_multiple_choice else MATH_INSTRUCTION
        return f"{self.question}\n{instruction}"


def read_jsonl(path: str | Path, field_name: str = "data") -> list[dict]:
    """Rows of a JSON Lines file; blank lines are skipped. Errors name ``field_name`` and the line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{field_name}: no such file: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{field_name}: {path} line {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{field_name}: {path} line {lineno} is not a JSON object")
            rows.append(row)
    return rows


def packaged_data_path(task: str) -> Path:
    """Path of a data file shipped in the package (``lessismore/data/<task>.jsonl``)."""
    return Path(str(resources.files("lessismore") / "data" / f"{task}.jsonl"))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_path(task: str, data: str | Path | None) -> Path:
    """The file a task reads: ``data`` if given, else the packaged copy (GPQA has none)."""
    if task not in TASKS:
        raise ValueError(f"task: unknown task {task!r}; allowed: {', '.join(TASKS)}")
    if data is not None:
        return Path(data)
    if task == "gpqa":
        raise ValueError(
            "data: task gpqa needs --data FILE (GPQA-Diamond is not shipped: its authors ask that it "
            "not be redistributed in plain text)"
        )
    return packaged_data_path(task)


def load_task(task: str, data: str | Path | None = None, limit: int | None = None) -> list[Problem]:
    """The problems of ``task`` in file order; ``limit`` keeps the first ``limit``."""
    path = data_path(task, data)
    rows = read_jsonl(path)
    if limit is not None:
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit: must be a positive integer, got {limit!r}")
        rows = rows[:limit]
    make = _gpqa_problem if task == "gpqa" else _math_problem
    problems = [make(task, row, i, path) for i, row in enumerate(rows)]
    seen = set()
    for p in problems:
        if p.id in seen:
            raise ValueError(f"data: {path}: problem id {p.id!r} appears twice")
        seen.add(p.id)
    if not problems:
        raise ValueError(f"data: {path} holds no problems")
    return problems


def _require(row: dict, key: str, index: int, path: Path) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"data: {path} row {index + 1} has no {key!r}")
    return str(value)


def _math_problem(task: str, row: dict, index: int, path: Path) -> Problem:
    question = _require(row, "problem", index, path)
    answer = _require(row, "answer", index, path)
    pid = str(row.get("id", index))
    meta = {k: row[k] for k in ("source_index", "contest", "problem_number", "subject", "level") if k in row}
    return Problem(task=task, id=pid, question=question, answer=answer, meta=meta)


# --- GPQA -----------------------------------------------------------------------------------------

# The common GPQA-Diamond JSONL (LIMO / LessIsMore) ends each question with this instruction.
_GPQA_SUFFIX = re.compile(r"\s*Please reason step-by-step and put your choice letter.*\Z", re.S)
_OPTION_LINE = re.compile(r"^([A-D])\.[ \t]?", re.M)


def parse_gpqa_options(question: str) -> tuple[str, list[str]]:
    """Split a question laid out as "stem, blank line, 'A. …' 'B. …' 'C. …' 'D. …'" into the stem and
    the four option texts. The last A-D block counts; a trailing instruction paragraph is dropped."""
    text = _GPQA_SUFFIX.sub("", question).rstrip()
    starts = [(m.group(1), m.start(), m.end()) for m in _OPTION_LINE.finditer(text)]
    block = starts[-4:]  # the last four option lines must read A, B, C, D in order
    if "".join(letter for letter, _, _ in block) != LETTERS:
        raise ValueError("no option block 'A. … B. … C. … D. …' at the end of the question")
    stem = text[: block[0][1]].strip()
    options = []
    for j, (_, _, body_start) in enumerate(block):
        end = block[j + 1][1] if j + 1 < len(block) else len(text)
        options.append(text[body_start:end].strip())
    if not stem or any(not o for o in options):
        raise ValueError("empty stem or empty option")
    return stem, options


def gpqa_shuffle_seed(problem_id: str) -> int:
    """The seed of a question's option order: fixed by its id, the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(f"gpqa-options/{problem_id}".encode()).digest()[:8], "big")


def shuffle_options(problem_id: str, options: list[str], correct: int) -> tuple[list[str], int]:
    """Shuffle ``options`` with the question's fixed seed; return them and the new index of the
    correct one."""
    order = list(range(len(options)))
    random.Random(gpqa_shuffle_seed(problem_id)).shuffle(order)
    return [options[i] for i in order], order.index(correct)


def _gpqa_problem(task: str, row: dict, index: int, path: Path) -> Problem:
    pid = str(row.get("id", index))
    if "Correct Answer" in row:  # the official GPQA columns, one row as a JSON object
        stem = _require(row, "Question", index, path).strip()
        options = [_require(row, "Correct Answer", index, path).strip()] + [
            _require(row, f"Incorrect Answer {k}", index, path).strip() for k in (1, 2, 3)
        ]
        correct = 0
        pid = str(row.get("Record ID", row.get("id", index)))
    else:  # the common JSONL: "question" holds the options, "answer" is a letter
        question = _require(row, "question", index, path)
        letter = _require(row, "answer", index, path).strip().upper()
        if letter not in LETTERS:
            raise ValueError(f"data: {path} row {index + 1}: answer must be one of A-D, got {row['answer']!r}")
        try:
            stem, options = parse_gpqa_options(question)
        except ValueError as e:
            raise ValueError(f"data: {path} row {index + 1}: {e}") from None
        correct = LETTERS.index(letter)
    shuffled, new_correct = shuffle_options(pid, options, correct)
    block = "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(shuffled))
    return Problem(
        task=task,
        id=pid,
        question=f"{stem}\n\n{block}",
        answer=LETTERS[new_correct],
        options=tuple(shuffled),
        meta={"original_answer": LETTERS[correct], "correct_text": options[correct]},
    )
