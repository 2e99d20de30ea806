"""Meaning-preserving edits of code prompts (selfrepair.tasks.edits), checked independently:

- answer / wrong ids unchanged, the final line's tokens and the metric position's context unchanged;
- meaning: each variant spliced back into its held-out file gives the same Python token stream (comments and
  NL tokens aside) as the original file, and for whole-line parts ``ast.parse`` succeeds iff it does on the
  original; a renaming is a bijection whose forward application to the original's NAME tokens reproduces
  the variant and whose reversal restores the original text exactly;
- the alignment maps equal token ids, in increasing order;
- impossible edits are counted per prompt with a reason, never dropped.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize

import pytest
import torch

from selfrepair.tasks.edits import EDITS, EditError, edit_task

KINDS = tuple(EDITS)


@pytest.fixture(scope="module")
def code_task(default_model):
    import selfrepair

    return selfrepair.tasks.load("code-copy", default_model, n=8, seed=0)


@pytest.fixture(scope="module")
def edited(default_model, code_task):
    return edit_task(code_task, default_model, KINDS, n_variants=2, seed=0)


def _py_tokens(text):
    return [(t.type, t.string, t.start, t.end) for t in tokenize.generate_tokens(io.StringIO(text).readline)]


def _splice(default_model, code_task, row):
    """(file text, window start offset): the window's characters located independently of the module."""
    from selfrepair.training import heldout_text

    tok = default_model.tokenizer
    i = int(row.origin)
    text = heldout_text()[code_task.meta["per_prompt"]["file"][i]]
    stream = tok.encode(text, add_special_tokens=False)
    a = len(tok.decode(stream[: code_task.meta["per_prompt"]["start"][i]]))
    assert text[a:a + len(row.original_text)] == row.original_text
    return text, a


def test_unknown_edit_lists_valid_names(default_model, code_task):
    with pytest.raises(ValueError) as e:
        edit_task(code_task, default_model, ["rename", "synonyms"])
    for k in KINDS:
        assert k in str(e.value)
    with pytest.raises(ValueError, match="n_variants"):
        edit_task(code_task, default_model, "rename", n_variants=0)


def test_model_without_tokenizer_is_refused(stories_model):
    import selfrepair

    task = selfrepair.tasks.load("induction", stories_model, n=2)
    with pytest.raises(EditError, match="tokenizer"):
        edit_task(task, stories_model, "rename")


def test_every_kind_made_and_impossible_counted(edited, code_task):
    imp = edited.impossible
    assert len(imp) == len(code_task) * len(KINDS)
    assert set(imp["edit"]) == set(KINDS)
    made = edited.variants.groupby(["origin", "edit"]).size()
    for r in imp.itertuples():
        assert made.get((r.prompt, r.edit), 0) == r.made
        assert 0 <= r.made <= r.requested == 2
        assert (r.reason == "") == (r.made == r.requested)
    assert edited.n_impossible == int((imp["requested"] - imp["made"]).sum())
    for k in KINDS:  # every kind applies to some prompt of this task
        assert (edited.variants["edit"] == k).sum() > 0, k


def test_answer_wrong_final_context_unchanged(edited, code_task, default_model):
    tok = default_model.tokenizer
    vt = edited.task
    for v, r in enumerate(edited.variants.itertuples()):
        i = int(r.origin)
        assert int(vt.answer_ids[v]) == int(code_task.answer_ids[i])
        assert int(vt.wrong_ids[v]) == int(code_task.wrong_ids[i])
        orig = code_task.tokens[i, : int(code_task.lengths[i])].tolist()
        var = vt.tokens[v, : int(vt.lengths[v])].tolist()
        p, pv = int(code_task.positions[i]), int(vt.positions[v])
        assert pv == len(var) - 1 and p == len(orig) - 1
        # the final context: tokens back to (and including) the last one holding a newline
        j = 0
        while "\n" not in tok.decode([orig[p - j]]):
            j += 1
        assert var[pv - j: pv + 1] == orig[p - j: p + 1]
        # the text after the last newline is identical; the variant differs from the original
        vtext, otext = tok.decode(var), tok.decode(orig)
        assert vtext.rsplit("\n", 1)[1] == otext.rsplit("\n", 1)[1]
        assert vtext == r.text and otext == r.original_text and vtext != otext


def test_variants_are_distinct_and_seeded(edited, code_task, default_model):
    for (_, _), g in edited.variants.groupby(["origin", "edit"]):
        assert g["text"].nunique() == len(g)
    again = edit_task(code_task, default_model, KINDS, n_variants=2, seed=0)
    assert again.variants["text"].tolist() == edited.variants["text"].tolist()
    other = edit_task(code_task, default_model, KINDS, n_variants=2, seed=1)
    assert other.variants["text"].tolist() != edited.variants["text"].tolist()


def _whole_lines(text):
    return "\n".join(text.split("\n")[1:-1])


def test_meaning_preserved_in_the_file(edited, code_task, default_model):
    drop = (tokenize.NL, tokenize.COMMENT)
    for r in edited.variants.itertuples():
        text, a = _splice(default_model, code_task, r)
        new = text[:a] + r.text + text[a + len(r.original_text):]
        ast.parse(new)  # the whole file still parses
        before = [(t[0], t[1]) for t in _py_tokens(text) if t[0] not in drop]
        after = [(t[0], t[1]) for t in _py_tokens(new) if t[0] not in drop]
        if r.edit == "rename":  # same stream once the window's renamed NAME tokens are mapped back
            inv = {v: k for k, v in r.details["mapping"].items()}
            after = [(ty, inv.get(s, s) if ty == tokenize.NAME else s) for ty, s in after]
        assert after == before, r.edit
        # whole-line part of the window: ast.parse succeeds iff it does on the original (dedented)
        def parses(s):
            try:
                ast.parse("if 1:\n" + "\n".join("  " + ln for ln in s.split("\n")))
                return True
            except SyntaxError:
                return False
        assert parses(_whole_lines(r.text)) == parses(_whole_lines(r.original_text)), r.edit


def test_rename_is_a_consistent_bijection(edited, code_task, default_model):
    rows = edited.variants[edited.variants["edit"] == "rename"]
    assert len(rows)
    for r in rows.itertuples():
        m = r.details["mapping"]
        assert m and len(set(m.values())) == len(m)
        words = set(re.findall(r"[A-Za-z_]\w*", r.original_text))
        assert not set(m.values()) & words  # new names collide with nothing in the window
        assert all(v.isidentifier() for v in m.values())
        # reversing restores the original text exactly
        inv = {v: k for k, v in m.items()}
        back = re.sub(r"[A-Za-z_]\w*", lambda mm: inv.get(mm.group(0), mm.group(0)), r.text)
        assert back == r.original_text
        # forward: every NAME token of the window (tokenised inside its file) whose text is renamed, replaced
        text, a = _splice(default_model, code_task, r)
        b = a + len(r.original_text)
        starts = [0] + [mm.end() for mm in re.finditer("\n", text)]
        out, cur = [], a
        for ty, s, (sl, sc), (el, ec) in _py_tokens(text):
            cs, ce = starts[sl - 1] + sc, starts[el - 1] + ec
            if ty == tokenize.NAME and a <= cs and ce <= b and s in m:
                out += [text[cur:cs], m[s]]
                cur = ce
        assert "".join(out) + text[cur:b] == r.text
        # the final line keeps every name
        assert not set(m) & set(re.findall(r"[A-Za-z_]\w*", r.original_text.rsplit("\n", 1)[1]))


def test_alignment_maps_equal_tokens(edited, code_task):
    vt = edited.task
    for v, r in enumerate(edited.variants.itertuples()):
        i = int(r.origin)
        al = edited.alignment[v]
        n = int(code_task.lengths[i])
        assert len(al) == n
        idx = [j for j in range(n) if al[j] >= 0]
        assert all(int(code_task.tokens[i, j]) == int(vt.tokens[v, al[j]]) for j in idx)
        assert all(x < y for x, y in zip([al[j] for j in idx], [al[j] for j in idx][1:]))
        assert al[n - 1] == int(vt.lengths[v]) - 1  # the metric token aligns with itself
        assert len(idx) >= n // 2


def test_generic_prompt_rename_rules(default_model):
    """A text prompt (no file): only names bound in the window (not free like ``obj``, ``len``), not parameters,
    attributes, def names or in the last line; ``x = x + 1`` reads x before binding it: kept."""
    from selfrepair import Task

    tok = default_model.tokenizer
    src = ("def f(alpha, beta=2):\n    total = alpha + beta  # add them\n    obj.attr = total\n"
           "    count_x = len(obj)\n    y = y + 1\n    return total + count_x\nx = f(")
    ids = tok.encode(src, add_special_tokens=False)
    if tok.decode(ids) != src:
        pytest.skip("tokenizer does not round-trip the prompt")
    task = Task(torch.tensor([ids]), [ids[-2]], [ids[-3]], name="snippet")
    seen = set()
    for seed in range(6):
        et = edit_task(task, tok, "rename", n_variants=2, seed=seed)
        for d in et.variants["details"]:
            seen |= set(d["mapping"])
    assert seen == {"total", "count_x"}


def test_prompt_without_edit_is_reported_not_dropped(default_model):
    from selfrepair import Task

    tok = default_model.tokenizer
    one_line = tok.encode("total = alpha + beta", add_special_tokens=False)
    two_lines = tok.encode("value_a = 1\nvalue_b = value_a + 2\nprint(value_b", add_special_tokens=False)
    width = max(len(one_line), len(two_lines))
    tokens = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, s in enumerate((one_line, two_lines)):
        tokens[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    task = Task(tokens, [one_line[-1], two_lines[-1]], [one_line[0], two_lines[0]], attention_mask=mask)
    et = edit_task(task, tok, ("rename", "comments"), n_variants=1, seed=0)
    imp = et.impossible.set_index(["prompt", "edit"])
    assert imp.loc[(0, "rename"), "made"] == 0 and "line break" in imp.loc[(0, "rename"), "reason"]
    assert imp.loc[(0, "comments"), "made"] == 0 and "line break" in imp.loc[(0, "comments"), "reason"]
    assert imp.loc[(1, "comments"), "made"] == 0 and "comment" in imp.loc[(1, "comments"), "reason"]
    assert imp.loc[(1, "rename"), "made"] == 1
    assert et.variants["origin"].tolist() == [1]
    assert et.n_impossible == 3
