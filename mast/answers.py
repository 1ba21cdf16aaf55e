"""Answer extraction and equivalence: pure functions, no processes, no timeout.

math-verify does the extraction and the comparison (:func:`extract_and_verify`): its LaTeX and
expression configs, boxed answers at its default priority (a "final answer is" statement after the
last box wins), several answers compared as a set. In front of it only linear string rules run in
the caller's process (:func:`answer_text`): a box cut off mid-answer, a few-shot continuation,
the GSM8K ``####`` line, digit-group separators; and for a one-answer gold only the last box is
kept. :func:`fast_candidate` and :func:`numeric_verdict` let the grader say *right* without
math-verify when the ``####`` line or the last box is the gold itself.

Both the grader (:mod:`mast.grading`, which enforces a hard per-answer timeout) and its worker
processes (:mod:`mast.grading_pool`) import this module; it imports neither.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

from mast.files import InputError

BENCHMARKS = ("math", "gsm8k")

# --------------------------------------------------------------------------- extraction
#
# math-verify does the extraction (its LaTeX and expression configs, boxed answers, "final answer
# is", several answers). In front of it only linear string work that states a project rule:
# where the answer text ends (a cut-off box, a few-shot continuation), the GSM8K ``####`` line,
# digit-group separators, and (for a one-answer gold) that only the last box is an answer.

_BOX_RE = re.compile(r"\\(?:boxed|fbox)")
_GSM_HASH_RE = re.compile(r"####\s*([^\n]*)")
# a few-shot continuation the model wrote after its answer (lm-eval stops generation there)
_CONTINUATION_RE = re.compile(r"\n\s*(?:Question|Problem|Q)\s*:")
# digit groups: "1 000", "1\,000", "1\ 000", "1~000" -> "1000" (math-verify reads "1\,000" as 1*0)
_DIGIT_GROUPS_RE = re.compile(r"(?<![\d.])\d{1,3}(?:(?:\\[,; ]|~| )\d{3})+(?![\d])")
_GROUP_SEP_RE = re.compile(r"\\[,; ]|~| ")
_STATEMENT_RE = re.compile(r"(?:final answer|the answer)\s*(?:is|:|=)\s*:?\s*([^\n]{1,200}?)\s*(?:\.\s|\.?$|\n|\. I hope)",
                           re.IGNORECASE)
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z0-9]+")


def _brace_pairs(text: str) -> dict[int, int]:
    """{index of '{': index just past its matching '}'} in one pass (escaped ``\\{``/``\\}`` skipped)."""
    pairs, stack, i, n = {}, [], 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i + 1
        i += 1
    return pairs


def _boxes(text: str) -> list[tuple[int, int | None, str | None]]:
    """Every ``\\boxed``/``\\fbox``: (start, end or None if it never closes, content or None). Linear."""
    pairs, out = None, []
    for m in _BOX_RE.finditer(text):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            pairs = _brace_pairs(text) if pairs is None else pairs
            end = pairs.get(i)
            out.append((m.start(), end, text[i + 1 : end - 1].strip() if end else None))
        elif i > m.end() and i < len(text):  # "\\boxed 5": up to the next space or $
            tok = re.match(r"[^\s$]+", text[i:])
            out.append((m.start(), i + tok.end(), tok.group(0)) if tok else (m.start(), None, None))
        else:
            out.append((m.start(), None, None))
    return out


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``) in `text`. Linear."""
    for _, end, content in reversed(_boxes(text)):
        if end is not None:
            return content
    return None


def answer_text(response: str | None, benchmark: str) -> str | None:
    """The part of `response` that math-verify extracts the answer from, or None (no answer).

    Cut at a few-shot continuation ("\\nQuestion:"); a last box that never closes (the response
    was cut off mid-answer) is dropped, and with no complete box before it there is no answer.
    GSM8K: the text after the last ``#### `` when there is one. Digit-group separators are
    removed ("1 000", "1\\,000") and ``\\$`` dropped (a currency sign, not a math delimiter).
    Linear in len(response): it runs in the caller's process, outside the timeout.
    """
    if benchmark not in BENCHMARKS:
        raise InputError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    if not isinstance(response, str) or not response.strip():
        return None
    text = response
    cont = _CONTINUATION_RE.search(text)
    if cont and text[: cont.start()].strip():
        text = text[: cont.start()]
    boxes = _boxes(text)
    if boxes and boxes[-1][1] is None:
        if not any(end is not None for _, end, _ in boxes):
            return None
        text = text[: boxes[-1][0]]
    if benchmark == "gsm8k":
        hashes = _GSM_HASH_RE.findall(text)
        if hashes and hashes[-1].strip():
            text = hashes[-1].strip()
    text = _DIGIT_GROUPS_RE.sub(lambda m: _GROUP_SEP_RE.sub("", m.group(0)), text.replace("\\$", ""))
    return text if text.strip() else None


def _only_last_box(text: str) -> str:
    """`text` with every box but the last unwrapped (``\\boxed{3}`` -> ``{3}``): one answer is asked for."""
    boxes = [b for b in _boxes(text) if b[1] is not None]
    for start, _, _ in reversed(boxes[:-1]):
        m = _BOX_RE.match(text, start)
        text = text[:start] + text[m.end():]
    return text


def fast_candidate(text: str | None, benchmark: str) -> str | None:
    """A cheap guess at the answer for the exact-match shortcut: the GSM8K ``####`` line, or a
    last box with no final-answer statement after it. Only ever used to say *right*."""
    if text is None:
        return None
    if benchmark == "gsm8k":
        if "\n" in text.strip() or len(text) > 60:
            return None
        return text.strip().strip("$").strip().rstrip(".")
    boxes = [b for b in _boxes(text) if b[1] is not None]
    if not boxes or _STATEMENT_RE.search(text, boxes[-1][1]):
        return None
    return boxes[-1][2]


# --------------------------------------------------------------------------- equivalence


def quiet_math_verify() -> None:
    """Silence math-verify's 'timeout is disabled' warnings: the parent enforces timeouts."""
    import math_verify.grader
    import math_verify.parser

    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)


# One LaTeX and one expression config everywhere (gold and response): math-verify caches the
# compiled extraction regexes of a single config (lru_cache(maxsize=1)); alternating two configs
# recompiles them on every call. A lone "\\boxed{gold}" is extracted the same at any box priority.


@lru_cache(maxsize=4096)
def _parse_gold(gold: str, benchmark: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if benchmark == "gsm8k":
        num = gold.replace(",", "").strip()
        parsed = parse(num, extraction_config=[ExprExtractionConfig()], parsing_timeout=None)
        if parsed:
            return parsed
    return parse(
        "\\boxed{" + gold + "}",
        extraction_config=[LatexExtractionConfig()],
        parsing_timeout=None,
    )


def _parse_pred(pred: str, benchmark: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if benchmark == "gsm8k" and _PLAIN_NUMBER_RE.fullmatch(pred.replace(",", "")):
        return parse(pred, extraction_config=[ExprExtractionConfig()], parsing_timeout=None)
    return parse(
        "\\boxed{" + pred + "}",
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        parsing_timeout=None,
    )


def _several(parsed) -> bool:
    """Whether a parsed gold holds several answers (a set of more than one element)."""
    from sympy import FiniteSet

    return bool(parsed) and isinstance(parsed[0], FiniteSet) and len(parsed[0]) > 1


def _shown(parsed) -> str | None:
    """What math-verify extracted, as text: its string form, else the sympy value."""
    if not parsed:
        return None
    text = parsed[-1] if isinstance(parsed[-1], str) else str(parsed[0])
    return text.strip() or None


def extract_and_verify(gold: str, text: str | None, benchmark: str) -> tuple[bool, str | None]:
    """(correct, extracted): math-verify extracts the answer from `text` (see :func:`answer_text`)
    and compares it with `gold`. No timeout here: untrusted text goes through :func:`grade_records`.

    Extraction is math-verify's ``parse`` with its LaTeX config (boxed answers at its default
    priority, so a "final answer is" statement after the last box wins over it; "final answer
    is X. I hope" first of all) and its expression config (numbers, ``$X``, "The answer is X",
    rightmost first). A gold with several answers is compared as a set with several boxes; for a
    one-answer gold only the last box counts. When math-verify finds nothing, the last "final
    answer is X" / "the answer is X" statement is parsed as the answer (choice letters, words).
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if text is None or not gold:
        return False, None
    quiet_math_verify()
    try:
        g = _parse_gold(gold, benchmark)
        if not g:
            return False, None
        if not _several(g):
            text = _only_last_box(text)
        p = parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)
        if not p:
            said = _STATEMENT_RE.findall(text)
            if said:
                ans = said[-1]
                while (inner := _STATEMENT_RE.search(ans + ".")) and inner.group(1) != ans:
                    ans = inner.group(1)  # "Final Answer: The final answer is X" -> X
                ans = ans.strip().strip("$").strip()
                p = _parse_pred("\\text{" + ans + "}" if _WORD_RE.fullmatch(ans) else ans, benchmark)
        return bool(p and verify(g, p, timeout_seconds=None)), _shown(p)
    except Exception:  # math-verify/sympy failure on odd input: the answer is not verified
        return False, None


_PLAIN_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


def numeric_verdict(gold: str, pred: str) -> bool | None:
    """Shortcut for plain decimal numbers (commas ignored): True when the values are equal, else
    None = undecided, ask math-verify."""
    a, b = gold.replace(",", ""), pred.replace(",", "")
    if len(a) > 50 or len(b) > 50 or not (_PLAIN_NUMBER_RE.fullmatch(a) and _PLAIN_NUMBER_RE.fullmatch(b)):
        return None
    from decimal import Decimal

    return True if Decimal(a) == Decimal(b) else None


def is_equivalent(gold: str, extracted: str | None, benchmark: str, fast_path: bool = True) -> bool:
    """math-verify equivalence of an already extracted answer with the gold one (no timeout here).
    With `fast_path`, identical strings and equal plain numbers are decided without math-verify."""
    if benchmark not in BENCHMARKS:
        raise InputError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    if extracted is None or not str(extracted).strip():
        return False
    gold, extracted = str(gold).strip(), str(extracted).strip()
    if fast_path and (gold == extracted or numeric_verdict(gold, extracted)):
        return True
    from math_verify import verify

    quiet_math_verify()
    try:
        g, p = _parse_gold(gold, benchmark), _parse_pred(extracted, benchmark)
        return bool(g and p and verify(g, p, timeout_seconds=None))
    except Exception:  # math-verify/sympy failure on odd input: the answer is not verified
        return False
