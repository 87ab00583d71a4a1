"""Grading: the last complete \\boxed{…} of a response, checked with math-verify (math) or by letter (GPQA).

An answer that cannot be found or parsed counts as wrong; ``Grade.reason`` says why.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass

_BOX_COMMANDS = ("\\boxed", "\\fbox")


@dataclass(frozen=True)
class Grade:
    correct: bool
    extracted: str | None  # the content of the last complete \boxed{}, or None
    reason: str  # "match", "mismatch", or why the answer could not be graded


def _read_group(text: str, i: int) -> int | None:
    """``text[i]`` is "{": the index just past its matching "}", or None if it never closes."""
    depth = 0
    while i < len(text):
        c = text[i]
        if c == "\\":  # an escaped brace \{ or \} does not count
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def boxed_answers(text: str) -> tuple[list[str], bool]:
    """The contents of every complete \\boxed{…} (or \\fbox{…}) in order, nested braces included, and
    whether some \\boxed was left unclosed. The form "\\boxed 5" (no braces) gives "5"."""
    found: list[str] = []
    unclosed = False
    pattern = re.compile("|".join(re.escape(c) for c in _BOX_COMMANDS) + r"(?![A-Za-z])")
    for m in pattern.finditer(text):
        j = m.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            end = _read_group(text, j)
            if end is None:
                unclosed = True
                continue
            found.append(text[j + 1 : end - 1].strip())
        else:
            word = re.match(r"[^\s$]+", text[j:])
            if word and j > m.end():
                found.append(word.group(0))
    return found, unclosed


def last_boxed(text: str) -> str | None:
    """The content of the last complete \\boxed{…}, or None."""
    found, _ = boxed_answers(text)
    return found[-1] if found else None


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _normalize_text(s: str) -> str:
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("$", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return re.sub(r"\s+", "", s).rstrip(".").lower()


def grade_math(extracted: str, reference: str) -> Grade:
    """``extracted`` (a \\boxed content) against the reference answer, with math-verify.

    math-verify bounds its work with signal.alarm, which only works on the main thread; off the main
    thread the timeouts are turned off."""
    from math_verify import parse, verify

    if _normalize_text(extracted) == _normalize_text(reference):
        return Grade(True, extracted, "match")
    timeout = 5 if _on_main_thread() else None
    try:
        gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=timeout)
        pred = parse(f"\\boxed{{{extracted}}}", parsing_timeout=timeout)
    except Exception as e:  # noqa: BLE001  (math-verify raises many kinds)
        return Grade(False, extracted, f"unparseable: math-verify failed to parse ({type(e).__name__})")
    if not gold:
        return Grade(False, extracted, "unparseable: math-verify could not parse the reference answer")
    if not pred:
        return Grade(False, extracted, "unparseable: math-verify could not parse the boxed answer")
    try:
        ok = verify(gold, pred, timeout_seconds=timeout)
    except Exception as e:  # noqa: BLE001
        return Grade(False, extracted, f"unparseable: math-verify failed to compare ({type(e).__name__})")
    return Grade(bool(ok), extracted, "match" if ok else "mismatch")


_LETTER_FORMS = [
    re.compile(r"^\(?([A-D])\)?[.:]?$"),  # A, (A), A., A:
    re.compile(r"^\(?([A-D])\)?[.:)]\s+\S"),  # "A. the text of option A", "(B) text"
]


def extract_letter(extracted: str) -> str | None:
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}", r"\1", extracted).strip().strip("$").strip()
    s = re.sub(r"^(?:option|answer|choice)\s*[:]?\s*", "", s, flags=re.I).strip()
    for form in _LETTER_FORMS:
        m = form.match(s)
        if m:
            return m.group(1)
    return None


def grade_choice(extracted: str, reference_letter: str) -> Grade:
    letter = extract_letter(extracted)
    if letter is None:
        return Grade(False, extracted, "unparseable: the boxed answer is not one letter A-D")
    ok = letter == reference_letter
    return Grade(ok, letter, "match" if ok else "mismatch")


def grade_response(response: str, reference: str, multiple_choice: bool = False) -> Grade:
    """Grade a full model response against the reference: math-verify for math, letter match for
    multiple choice. The last complete \\boxed{} counts."""
    found, unclosed = boxed_answers(response)
    if not found:
        why = "an unclosed \\boxed{" if unclosed else "no \\boxed{} in the response"
        return Grade(False, None, f"unparseable: {why}")
    extracted = found[-1]
    if not extracted:
        return Grade(False, extracted, "unparseable: the last \\boxed{} is empty")
    return grade_choice(extracted, reference) if multiple_choice else grade_math(extracted, reference)
