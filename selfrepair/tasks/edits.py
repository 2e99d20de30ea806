"""Meaning-preserving edits of code prompts (issue 10, part 3).

Each edit rewrites the source text of one prompt window and keeps the program's
meaning, the answer and wrong tokens and the final line (the one holding the
metric position) unchanged; the edited text is re-tokenised, so any change of
tokenisation follows from the edit. Kinds (``EDITS``):

* ``"rename"``: consistent renaming of identifiers; a name is renamed only when
  it is bound inside the window and its first occurrence there binds it (an
  assignment target, ``for``/``as``/walrus target; so free names such as an
  imported function or a variable from before the window are kept), it is not
  a keyword, soft keyword, builtin or dunder, not ``self``/``cls``, never
  reached as an attribute (``x.name``), never a keyword argument or
  default-valued parameter (``name=`` inside brackets) nor any ``def``
  parameter, not a ``def``/``class`` name, not in an import, ``global`` or
  ``nonlocal`` statement, not spelled as a word inside any string of
  the window (f-strings, ``getattr`` names, docstrings) and not in the final
  line; when unsure, the name is skipped. New names come from a fixed pool of
  common identifiers that occur nowhere in the source file (so the map is a
  bijection and reverses exactly).
* ``"comments"``: a comment is removed (its whole line when it stands alone)
  or reworded (a fixed table of word substitutions).
* ``"blank_lines"``: blank lines inserted after line ends outside strings, or
  existing blank lines removed.
* ``"spacing"``: the spaces between two tokens on one line (never indentation,
  never inside strings) changed to 0, 1 or 2 spaces; 0 only beside an operator
  where the two tokens cannot merge.

Where the text comes from: for ``code-copy`` tasks (``meta["per_prompt"]`` has
``file`` and ``start``) the window's characters inside its held-out file, so
Python's ``tokenize`` sees the whole file (strings and comments that begin
before the window are known as such); for other tasks with a tokenizer, the
decoded prompt, tokenised as a fragment. Only Python tokens lying wholly inside
the window and before the protected tail are edited. The protected tail starts
at the model token holding the last newline before the metric position
(byte-level BPE merges a newline with the next line's indentation); a variant
is kept only if its re-tokenisation ends with exactly the original tail tokens,
so the metric position is re-found as the same final context. For code-copy
windows each variant is also spliced back into its file and the file's AST is
compared with the original's (after reversing a renaming): any difference
rejects the variant.

A prompt that admits fewer than ``n_variants`` distinct valid variants of a
kind is reported in ``EditedTask.impossible`` (count and reason), never dropped
silently.
"""

from __future__ import annotations

import ast
import builtins
import difflib
import io
import keyword
import random
import re
import tokenize
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch

# imports of existing code (re-point here when the layout changes)
from .base import Task
from .heldout import heldout_text
from .tokens import right_pad

__all__ = ["EDITS", "EditedTask", "edit_task", "EditError", "align_tokens"]

MAX_TRIES = 20  # attempts per requested variant before a prompt's shortfall is reported


class EditError(ValueError):
    """Bad input to ``edit_task`` (unknown edit kind, model without tokenizer, bad n_variants)."""


# --------------------------------------------------------------------------- source windows


@dataclass
class _Window:
    """One prompt's window inside its source text (character offsets into ``source``)."""

    source: str
    a: int  # window start
    b: int  # window end
    q: int  # protected tail start (a <= q <= b)
    pytoks: list  # Python tokens of the source: (type, string, start, end, depth)
    whole_file: bool  # source is a whole, parseable file (code-copy)
    ids: List[int]  # the window's model tokens (no BOS)
    tail: List[int]  # the protected tail tokens
    after: int  # tokens after the metric position (0 for code-copy)


def _line_starts(text: str) -> List[int]:
    starts = [0]
    for m in re.finditer("\n", text):
        starts.append(m.end())
    return starts


def _python_tokens(text: str) -> list:
    """``(type, string, start, end, depth)`` with character offsets; stops quietly at a tokenize error
    (fragments may end inside brackets or strings). ``depth`` is the bracket depth before the token."""
    ls = _line_starts(text)
    out, depth = [], 0
    try:
        for t in tokenize.generate_tokens(io.StringIO(text).readline):
            s = ls[t.start[0] - 1] + t.start[1] if t.start[0] - 1 < len(ls) else len(text)
            e = ls[t.end[0] - 1] + t.end[1] if t.end[0] - 1 < len(ls) else len(text)
            out.append((t.type, t.string, s, e, depth))
            if t.type == tokenize.OP:
                if t.string in "([{":
                    depth += 1
                elif t.string in ")]}":
                    depth = max(depth - 1, 0)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return out


def _get_tokenizer(model_or_tokenizer):
    if hasattr(model_or_tokenizer, "encode") and hasattr(model_or_tokenizer, "decode") \
            and not hasattr(model_or_tokenizer, "cfg"):
        return model_or_tokenizer
    tok = getattr(model_or_tokenizer, "tokenizer", None)
    if tok is None:
        raise EditError("code edits need the model's tokenizer to decode and re-tokenise the prompts, and this "
                        "model has none (model.tokenizer is None, e.g. llama2.c models such as stories260K); "
                        "use a model with a tokenizer or pass one.")
    return tok


def _encode(tok, text: str) -> List[int]:
    return list(tok.encode(text, add_special_tokens=False))


def _offsets(tok, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _tail_start(tok, ids: List[int], pos: int) -> Optional[int]:
    """Index of the last token at or before ``pos`` whose text holds a newline, or None."""
    for k in range(pos, -1, -1):
        if "\n" in tok.decode([ids[k]]):
            return k
    return None


class _Sources:
    """Per-file caches: file text, its model-token offsets, its Python tokens."""

    def __init__(self, tok):
        self.tok = tok
        self._files = None
        self.cache: Dict[str, tuple] = {}

    def file(self, name: str):
        if name not in self.cache:
            if self._files is None:
                self._files = heldout_text()
            text = self._files[name]
            ids, offs = _offsets(self.tok, text)
            self.cache[name] = (text, ids, offs, _python_tokens(text))
        return self.cache[name]


def _window(task: Task, i: int, tok, sources: _Sources) -> Tuple[Optional[_Window], str, int]:
    """The window of prompt ``i`` or ``(None, reason, 0)``; also returns the number of leading special tokens."""
    n = int(task.lengths[i])
    ids = task.tokens[i, :n].tolist()
    pos = int(task.positions[i])
    special = set(getattr(tok, "all_special_ids", []) or [])
    lead = 0
    while lead < n and ids[lead] in special:
        lead += 1
    body = ids[lead:]
    if not body or pos < lead:
        return None, "the prompt has no text before its metric position", lead
    pos_b = pos - lead
    k = _tail_start(tok, body, pos_b)
    if k is None:
        return None, "no line break before the metric position (the whole prompt is the final line)", lead
    pp = task.meta.get("per_prompt", {})
    if "file" in pp and "start" in pp:
        text, fids, offs, pyt = sources.file(pp["file"][i])
        st = int(pp["start"][i])
        if fids[st:st + len(body)] != body:
            return None, "the prompt's tokens do not match its held-out file at meta start", lead
        o = offs[st:st + len(body)]
        whole = True
    else:
        text = tok.decode(body)
        fids, o = _offsets(tok, text)
        pyt = _python_tokens(text)
        whole = False
        if fids != body:
            return None, "the decoded prompt does not re-tokenise to the same tokens", lead
    a, b, q = o[0][0], o[-1][1], o[k][0]
    if _encode(tok, text[a:b]) != body:
        return None, "the window's text does not re-tokenise to the same tokens", lead
    return _Window(text, a, b, q, pyt, whole, body, body[k:], len(body) - 1 - pos_b), "", lead


# --------------------------------------------------------------------------- the edits
# each edit: fn(window, rng) -> (ops, info) with ops [(start, end, replacement)] in source offsets inside
# [a, q), non-overlapping; or (None, reason) when the window admits no edit of this kind.

_SKIP_NAMES = set(dir(builtins)) | {"self", "cls"}
_POOL = ("value", "item", "result", "data", "entry", "node", "total", "count", "index", "element", "current",
         "target", "source", "output", "buffer", "record", "chunk", "piece", "token", "field", "amount",
         "accum", "temp", "other", "first", "second", "left", "right", "head", "rest", "state", "option",
         "number", "label", "handle", "obj", "arg", "val", "var", "elem", "cur", "acc", "res", "tmp", "aux")


def _inside(w: _Window, s: int, e: int, upto: Optional[int] = None) -> bool:
    return w.a <= s and e <= (w.q if upto is None else upto)


def _binding_occurrences(toks: list, a: int, b: int) -> set:
    """Indices of NAME tokens wholly in ``[a, b)`` that bind the name (a heuristic on the token stream):
    plain assignment targets (``x = ...``, ``a, b = ...``; not ``x[i] =``, ``x.y =``, augmented or annotated
    assignments, and not when the name is also read on the right-hand side), ``for`` targets (loops and
    comprehensions), ``as`` targets and walrus targets."""
    NAME, OP = tokenize.NAME, tokenize.OP
    out = set()
    # statements: ranges of token indices split at NEWLINE and at depth-0 ';'
    stmts, s0 = [], 0
    for j, t in enumerate(toks):
        if t[0] == tokenize.NEWLINE or (t[0] == OP and t[1] == ";" and t[4] == 0):
            stmts.append((s0, j))
            s0 = j + 1
    stmts.append((s0, len(toks)))
    inside = lambda t: a <= t[2] and t[3] <= b  # noqa: E731
    for s, e in stmts:
        body = [j for j in range(s, e) if toks[j][0] not in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT,
                                                                tokenize.DEDENT)]
        if not body:
            continue
        eq = next((j for j in body if toks[j][0] == OP and toks[j][1] == "=" and toks[j][4] == 0), None)
        if eq is not None:
            region = [j for j in body if j < eq]
            ok = all(toks[j][0] == NAME or (toks[j][0] == OP and toks[j][1] in ",()[]*") for j in region)
            ok &= not any(toks[j][0] == NAME and toks[j + 1][0] == OP and toks[j + 1][1] in "([" for j in region)
            ok &= not any(toks[j][0] == NAME and keyword.iskeyword(toks[j][1]) for j in region)
            if ok:
                rhs = {toks[j][1] for j in body if j > eq and toks[j][0] == NAME}
                out |= {j for j in region if toks[j][0] == NAME and toks[j][1] not in rhs and inside(toks[j])}
        for j in body:
            t = toks[j]
            if t[0] == NAME and t[1] == "for":
                k = j + 1
                while k < e and not (toks[k][0] == NAME and toks[k][1] == "in" and toks[k][4] == t[4]):
                    if toks[k][0] == NAME and inside(toks[k]) and toks[k - 1][1] != "." \
                            and not (k + 1 < e and toks[k + 1][1] in (".", "[", "(")):
                        out.add(k)
                    k += 1
            elif t[0] == NAME and t[1] == "as" and j + 1 < e and toks[j + 1][0] == NAME and inside(toks[j + 1]):
                out.add(j + 1)
            elif t[0] == OP and t[1] == ":=" and toks[j - 1][0] == NAME and inside(toks[j - 1]):
                out.add(j - 1)
    return out


def _rename(w: _Window, rng: random.Random):
    toks = w.pytoks
    in_win = [j for j, t in enumerate(toks) if t[0] == tokenize.NAME and w.a <= t[2] and t[3] <= w.b]
    names = {toks[j][1] for j in in_win}
    bad = set()
    # names touching the window edges or in the tail, as words of the tail's text
    bad |= set(re.findall(r"[A-Za-z_]\w*", w.source[w.q:w.b]))
    for t in toks:
        if t[0] == tokenize.NAME and (t[2] < w.a < t[3] or t[2] < w.b < t[3]):
            bad.add(t[1])
    strings = " ".join(t[1] for t in toks if t[0] == tokenize.STRING and t[3] > w.a and t[2] < w.b)
    bad |= set(re.findall(r"[A-Za-z_]\w*", strings))
    # statement starts (for imports) and def parameter lists (a function's keyword API)
    stmt_kw, in_params, params_depth = None, False, 0
    for j, t in enumerate(toks):
        prev = toks[j - 1] if j else None
        if prev is None or prev[0] in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT) \
                or (prev[0] == tokenize.NL and t[4] == 0) or (prev[0] == tokenize.OP and prev[1] == ";"):
            if t[0] not in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
                stmt_kw = t[1]
        if t[0] == tokenize.OP and t[1] == "(" and j >= 2 and toks[j - 2][1] == "def":
            in_params, params_depth = True, t[4]
        elif in_params and t[0] == tokenize.OP and t[1] == ")" and t[4] == params_depth + 1:
            in_params = False
        if t[0] != tokenize.NAME or not (w.a <= t[2] and t[3] <= w.b):
            continue
        if in_params:
            bad.add(t[1])
        nxt = toks[j + 1] if j + 1 < len(toks) else None
        if stmt_kw in ("import", "from"):
            bad.add(t[1])
        if prev is not None and prev[0] == tokenize.OP and prev[1] == ".":
            bad.add(t[1])
        if prev is not None and prev[0] == tokenize.NAME and prev[1] in ("def", "class"):
            bad.add(t[1])
        if nxt is not None and nxt[0] == tokenize.OP and nxt[1] in ("=", ":") and t[4] > 0:
            bad.add(t[1])  # keyword argument, default-valued or annotated parameter, dict/slice use: skip
    # only names bound inside the window, whose first occurrence there binds them (a free name such as an
    # imported function or a variable from before the window is reached from outside: skipped)
    binds = _binding_occurrences(toks, w.a, w.b)
    first = {}
    for j in in_win:
        first.setdefault(toks[j][1], j)
    bad |= {nm for nm, j in first.items() if j not in binds}
    for j, t in enumerate(toks):
        if t[0] == tokenize.NAME and t[1] in ("global", "nonlocal"):
            k = j + 1
            while k < len(toks) and toks[k][0] in (tokenize.NAME, tokenize.OP) and toks[k][1] != ";" \
                    and toks[k][0] != tokenize.NEWLINE:
                bad.add(toks[k][1])
                k += 1
    ok = sorted(n for n in names - bad if not keyword.iskeyword(n) and not keyword.issoftkeyword(n)
                and n not in _SKIP_NAMES and not (n.startswith("__") and n.endswith("__")) and n.isidentifier())
    if not ok:
        return None, "no identifier bound inside the window (outside the final line) that renames safely"
    chosen = sorted(rng.sample(ok, rng.randint(1, len(ok))))
    used = set(re.findall(r"[A-Za-z_]\w*", w.source))
    pool = [p for p in _POOL if p not in used and p not in _SKIP_NAMES and not keyword.iskeyword(p)]
    rng.shuffle(pool)
    mapping = {}
    for old in chosen:
        if pool:
            new = pool.pop()
        else:
            j = 2
            while f"{old}{j}" in used or f"{old}{j}" in mapping.values():
                j += 1
            new = f"{old}{j}"
        mapping[old] = new
    ops = [(toks[j][2], toks[j][3], mapping[toks[j][1]]) for j in in_win if toks[j][1] in mapping]
    return ops, {"mapping": mapping}


_REWORD = {
    "the": "this", "this": "the", "if": "when", "when": "if", "return": "give back", "returns": "gives back",
    "get": "fetch", "use": "employ", "used": "employed", "check": "verify", "make": "build", "number": "count",
    "value": "quantity", "values": "quantities", "first": "initial", "last": "final", "need": "require",
    "must": "has to", "can": "may", "compute": "calculate", "computed": "calculated",
    "avoid": "prevent", "should": "ought to", "all": "every", "list": "sequence", "new": "fresh",
    "find": "locate", "small": "little", "large": "big", "big": "large", "fast": "quick", "slow": "sluggish",
    "start": "begin", "end": "finish", "begin": "start", "error": "failure", "because": "since", "since": "because",
    "so": "thus", "also": "too", "only": "just", "just": "only", "see": "cf.", "note": "nb", "add": "append",
    "remove": "drop", "handle": "deal with", "try": "attempt", "set": "assign", "line": "row", "lines": "rows",
    "width": "breadth", "string": "text", "strings": "texts", "case": "situation", "cases": "situations",
    "don't": "do not", "doesn't": "does not", "can't": "cannot", "it's": "it is",
}


def _reword(comment: str) -> Optional[str]:
    def sub(m):
        word = m.group(0)
        new = _REWORD.get(word.lower())
        if new is None or new == word.lower():
            return word
        return new[0].upper() + new[1:] if word[0].isupper() else new

    out = re.sub(r"[A-Za-z][A-Za-z']*", sub, comment)
    return out if out != comment else None


def _comments(w: _Window, rng: random.Random):
    cands = [t for t in w.pytoks if t[0] == tokenize.COMMENT and _inside(w, t[2], t[3])]
    if not cands:
        return None, "no comment wholly inside the window before the final line"
    chosen = rng.sample(cands, rng.randint(1, len(cands)))
    ops, actions = [], []
    for _, s, cs, ce, _ in sorted(chosen, key=lambda t: t[2]):
        ls = w.source.rfind("\n", 0, cs) + 1
        alone = w.source[ls:cs].strip() == ""
        new = _reword(s)
        if new is not None and rng.random() < 0.5:
            ops.append((cs, ce, new))
            actions.append("reword")
        elif alone and ls - 1 >= w.a:
            ops.append((ls - 1, ce, ""))  # the preceding newline + the comment's line (its own newline stays)
            actions.append("remove_line")
        elif not alone:
            ws = len(w.source[ls:cs]) - len(w.source[ls:cs].rstrip())
            ops.append((max(cs - ws, w.a), ce, ""))
            actions.append("remove")
        else:
            ops.append((cs, ce, ""))
            actions.append("remove")
    return ops, {"actions": actions}


def _blank_lines(w: _Window, rng: random.Random):
    ins, rem = [], []
    for t in w.pytoks:
        if t[0] in (tokenize.NEWLINE, tokenize.NL) and t[1].endswith("\n"):
            c = t[3]  # the start of the next line
            if w.a < c < w.q:
                ins.append(c)
            ls = w.source.rfind("\n", 0, t[2]) + 1
            if t[0] == tokenize.NL and w.source[ls:t[2]].strip() == "" and ls > w.a and t[3] <= w.q:
                rem.append((ls, t[3]))  # a blank line (whitespace only), outside strings
    ops_all = [("insert", c) for c in ins] + [("remove", r) for r in rem]
    if not ops_all:
        return None, "no line end outside strings before the final line"
    chosen = rng.sample(ops_all, rng.randint(1, min(len(ops_all), 4)))
    ops, seen = [], set()
    for kind, x in chosen:
        if kind == "insert":
            if x in seen:
                continue
            seen.add(x)
            ops.append((x, x, "\n"))
        else:
            ops.append((x[0], x[1], ""))
    ops.sort()
    # drop overlaps (an insertion at a removed line's start stays valid; a removal overlapping another is dropped)
    clean, end = [], -1
    for op in ops:
        if op[0] < end or (op[0] == end and clean and clean[-1][0] == clean[-1][1] == op[0]):
            continue
        clean.append(op)
        end = max(end, op[1])
    return clean, {"n_inserted": sum(o[2] == "\n" for o in clean), "n_removed": sum(o[2] == "" for o in clean)}


_NO_MERGE = {("*", "*"), ("/", "/"), ("<", "<"), (">", ">"), ("-", ">"), ("=", "="), ("<", "="), (">", "="),
             ("!", "="), (":", "="), ("*", "="), ("/", "="), ("+", "="), ("-", "="), ("%", "="), ("&", "="),
             ("|", "="), ("^", "="), ("@", "="), (".", "."), ("<", ">")}


def _spacing(w: _Window, rng: random.Random):
    toks = w.pytoks
    skip_types = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    fs = getattr(tokenize, "FSTRING_START", None)
    fe = getattr(tokenize, "FSTRING_END", None)
    gaps, f_depth = [], 0
    for j in range(len(toks) - 1):
        t, u = toks[j], toks[j + 1]
        if fs is not None and t[0] == fs:
            f_depth += 1
        if fe is not None and t[0] == fe:
            f_depth -= 1
        if f_depth > 0 or t[0] in skip_types or u[0] in skip_types:
            continue
        if not (_inside(w, t[2], t[3]) and _inside(w, u[2], u[3])):
            continue
        gap = w.source[t[3]:u[2]]
        if gap.strip(" ") != "" or "\n" in gap:
            continue
        choices = [" ", "  "]
        t_op, u_op = t[0] == tokenize.OP, u[0] == tokenize.OP
        if (t_op or u_op) and u[0] != tokenize.COMMENT and not (t_op and u_op and (t[1][-1], u[1][0]) in _NO_MERGE) \
                and not (t[0] == tokenize.NUMBER and u[1].startswith(".")) \
                and not (t[1] == "." and u[0] == tokenize.NUMBER) and not (t_op and u_op and t[1] == u[1] == "."):
            choices.append("")
        if u[0] == tokenize.COMMENT:
            choices = ["  ", "   ", " "]
        choices = [c for c in choices if c != gap]
        if choices:
            gaps.append((t[3], u[2], choices))
    if not gaps:
        return None, "no space between two tokens of an earlier line"
    chosen = rng.sample(gaps, rng.randint(1, min(len(gaps), max(1, len(gaps) // 3))))
    ops = sorted((s, e, rng.choice(ch)) for s, e, ch in chosen)
    return ops, {"n_gaps": len(ops)}


EDITS: Dict[str, Callable] = {"rename": _rename, "comments": _comments, "blank_lines": _blank_lines,
                              "spacing": _spacing}


def check_edits(edits) -> List[str]:
    if isinstance(edits, str):
        edits = [edits]
    edits = list(edits)
    if not edits:
        raise EditError(f"no edit kinds given; valid: {', '.join(EDITS)}.")
    bad = [e for e in edits if e not in EDITS]
    if bad:
        raise EditError(f"unknown edit kind(s) {', '.join(map(repr, bad))}; valid: {', '.join(EDITS)}.")
    return list(dict.fromkeys(edits))


# --------------------------------------------------------------------------- checks


def _apply(w: _Window, ops) -> str:
    out, cur = [], w.a
    for s, e, rep in sorted(ops):
        out.append(w.source[cur:s])
        out.append(rep)
        cur = e
    out.append(w.source[cur:w.b])
    return "".join(out)


class _Unrename(ast.NodeTransformer):
    def __init__(self, inverse: dict):
        self.inverse = inverse

    def generic_visit(self, node):
        for f, v in ast.iter_fields(node):
            if isinstance(v, str) and v in self.inverse and f in ("id", "arg", "name", "attr"):
                setattr(node, f, self.inverse[v])
            elif f == "names" and isinstance(v, list) and all(isinstance(x, str) for x in v):  # global, nonlocal
                setattr(node, f, [self.inverse.get(x, x) for x in v])
        return super().generic_visit(node)


def _same_program(w: _Window, text: str, mapping: Optional[dict]) -> bool:
    """The file with the window replaced by ``text`` has the original file's AST (after undoing ``mapping``)."""
    try:
        orig = ast.dump(ast.parse(w.source))
        tree = ast.parse(w.source[:w.a] + text + w.source[w.b:])
    except SyntaxError:
        return False
    if mapping:
        tree = _Unrename({v: k for k, v in mapping.items()}).visit(tree)
    return ast.dump(tree) == orig


def align_tokens(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """For each position of ``a``, the position of the same token text in ``b`` matched by
    ``difflib.SequenceMatcher`` (no autojunk), or -1."""
    out = np.full(len(a), -1, dtype=np.int64)
    for blk in difflib.SequenceMatcher(None, list(a), list(b), autojunk=False).get_matching_blocks():
        out[blk.a:blk.a + blk.size] = np.arange(blk.b, blk.b + blk.size)
    return out


# --------------------------------------------------------------------------- the public entry


@dataclass
class EditedTask:
    """Variants of a task's prompts under meaning-preserving edits.

    ``task``: the variants as a ``Task`` (re-tokenised, right-padded, metric
    position re-found; answer/wrong ids those of the original prompt).
    ``variants``: one row per variant: ``variant`` (row of ``task``), ``origin``
    (prompt of the original task), ``edit`` (kind), ``text`` (edited window
    text), ``original_text``, ``details`` (a dict: the renaming ``mapping``, the
    comment ``actions``, ...). ``alignment[v]``: for each token position of the
    original prompt ``origin[v]``, the aligned position in variant ``v`` (equal
    token text, ``difflib.SequenceMatcher``), -1 where none. ``impossible``: one
    row per (prompt, edit) with ``requested``, ``made`` and ``reason`` (empty when
    all were made).
    """

    task: Optional[Task]
    original: Task
    variants: pd.DataFrame
    alignment: List[np.ndarray]
    impossible: pd.DataFrame
    settings: dict = field(default_factory=dict)

    @property
    def origin(self) -> np.ndarray:
        return self.variants["origin"].to_numpy()

    @property
    def edit(self) -> np.ndarray:
        return self.variants["edit"].to_numpy()

    @property
    def n_impossible(self) -> int:
        """Requested variants that could not be made, over all prompts and kinds."""
        return int((self.impossible["requested"] - self.impossible["made"]).sum())

    def __len__(self) -> int:
        return len(self.variants)


def edit_task(task: Task, model_or_tokenizer, edits: Union[str, Sequence[str]] = tuple(EDITS), *,
              n_variants: int = 1, seed: int = 0) -> EditedTask:
    """Up to ``n_variants`` distinct variants of every prompt of ``task`` per edit kind in ``edits``.

    See the module docstring for the edits and the checks each variant passes.
    Variants longer than the model's context (when a model is given) are
    rejected like invalid ones. Seeded: the same inputs give the same variants.
    """
    kinds = check_edits(edits)
    if not isinstance(n_variants, int) or isinstance(n_variants, bool) or n_variants < 1:
        raise EditError(f"n_variants must be a positive int, got {n_variants!r}.")
    tok = _get_tokenizer(model_or_tokenizer)
    cfg = getattr(model_or_tokenizer, "cfg", None)
    n_ctx = int(cfg.n_ctx) if cfg is not None and getattr(cfg, "n_ctx", None) else None
    sources = _Sources(tok)
    rows, aligns, imp = [], [], []
    seqs, answers, wrongs, positions = [], [], [], []
    for i in range(len(task)):
        w, why, lead = _window(task, i, tok, sources)
        n_i = int(task.lengths[i])
        orig_ids = task.tokens[i, :n_i].tolist()
        orig_str = tok.convert_ids_to_tokens(orig_ids)
        for kind in kinds:
            made, reasons, texts = 0, [], {None if w is None else w.source[w.a:w.b]}
            if w is not None:
                rng = random.Random(f"{seed}|{i}|{kind}")
                for _ in range(MAX_TRIES * n_variants):
                    if made == n_variants:
                        break
                    ops, info = EDITS[kind](w, rng)
                    if ops is None:
                        reasons.append(info)
                        break
                    text = _apply(w, ops)
                    if text in texts:
                        reasons.append("no further distinct variant")
                        continue
                    ids = _encode(tok, text)
                    if len(ids) < len(w.tail) or ids[len(ids) - len(w.tail):] != w.tail:
                        reasons.append("re-tokenisation changes the final line's tokens")
                        continue
                    if w.whole_file and not _same_program(w, text, info.get("mapping") if kind == "rename" else None):
                        reasons.append("the edited file's AST differs")
                        continue
                    seq = orig_ids[:lead] + ids
                    if n_ctx is not None and len(seq) > n_ctx:
                        reasons.append(f"the variant is longer than the model's context ({n_ctx})")
                        continue
                    texts.add(text)
                    var_pos = len(seq) - 1 - w.after
                    rows.append(dict(variant=len(seqs), origin=i, edit=kind, text=text,
                                     original_text=w.source[w.a:w.b], details=info, n_tokens=len(seq),
                                     position=var_pos))
                    aligns.append(align_tokens(orig_str, tok.convert_ids_to_tokens(seq)))
                    seqs.append(seq)
                    answers.append(int(task.answer_ids[i]))
                    wrongs.append(int(task.wrong_ids[i]))
                    positions.append(var_pos)
                    made += 1
            else:
                reasons.append(why)
            reason = "" if made == n_variants else (max(set(reasons), key=reasons.count) if reasons
                                                    else "no further distinct variant")
            imp.append(dict(prompt=i, edit=kind, requested=n_variants, made=made, reason=reason))
    variants = pd.DataFrame(rows, columns=["variant", "origin", "edit", "text", "original_text", "details",
                                           "n_tokens", "position"])
    impossible = pd.DataFrame(imp, columns=["prompt", "edit", "requested", "made", "reason"])
    vt = None
    if seqs:
        pad = getattr(tok, "pad_token_id", None)
        pad = int(task.meta.get("pad_id", 0) if pad is None else pad)
        tokens, mask = right_pad(seqs, pad)
        meta = {k: v for k, v in task.meta.items() if k != "per_prompt"}
        meta.update(edited_from=task.name, per_prompt={"origin": variants["origin"].tolist(),
                                                       "edit": variants["edit"].tolist()})
        vt = Task(tokens, answers, wrongs, positions=positions, attention_mask=mask, metric=task.metric,
                  name=f"{task.name}+edits", meta=meta)
    return EditedTask(vt, task, variants, aligns, impossible,
                      settings=dict(edits=kinds, n_variants=n_variants, seed=seed))
