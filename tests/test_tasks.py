"""Tasks: built-in task structure (checked by brute force), JSONL prompts, padding, bad input."""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from selfrepair import tasks
from selfrepair.tasks import Task, TaskError
from selfrepair.training import heldout_text

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO / "selfrepair" / "data" / "default_model"
STORIES = REPO.parent / "shared" / "models" / "stories260K.bin"


# ---------------------------------------------------------------------------
# fixtures: a random GPT-2 bridge with the project's real tokenizer, and a tokenizer-less native bridge


def _real_tokenizer(tmp_dir: Path):
    """The shipped tokenizer (default model dir), else the lead's /tmp copy, else the same recipe re-run."""
    from transformers import PreTrainedTokenizerFast

    for d in (DEFAULT_MODEL_DIR, Path("/tmp/sr_tokenizer")):
        if (d / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(str(d))
    from selfrepair.training import SPECIAL, stdlib_sources, train_tokenizer

    src = stdlib_sources(exclude=list(heldout_text()))
    tok = train_tokenizer([src[k] for k in sorted(src)[:60]], 1024)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL,
                                   unk_token=SPECIAL, pad_token=SPECIAL)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformer_lens.model_bridge import TransformerBridge

    d = tmp_path_factory.mktemp("gpt2")
    tok = _real_tokenizer(d)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=64, n_layer=2, n_head=4,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TransformerBridge.boot_transformers(str(d), device="cpu")
    assert model.tokenizer is not None
    return model


@pytest.fixture(scope="module")
def native():
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_vocab=100,
                                  act_fn="gelu", normalization_type="LN", seed=0,
                                  positional_embedding_type="rotary")
    model = TransformerBridge.boot_native(cfg)
    assert model.tokenizer is None
    return model


def _write(tmp_path, lines, name="prompts.jsonl"):
    p = tmp_path / name
    p.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines), encoding="utf-8")
    return p


# ---------------------------------------------------------------------------
# registry


def test_unknown_task_lists_valid_names(gpt2):
    with pytest.raises(TaskError) as e:
        tasks.load("inductoin", gpt2, n=4)
    msg = str(e.value)
    assert "inductoin" in msg and "induction" in msg and "code-copy" in msg
    assert set(tasks.available()) >= {"induction", "code-copy"}


def test_unknown_option_lists_valid_ones(gpt2):
    with pytest.raises(TaskError, match=r"'code-copy' has no option\(s\) min_repeat; its options: min_repeats, skip_whitespace, prepend_bos"):
        tasks.load("code-copy", gpt2, n=4, min_repeat=3)
    with pytest.raises(TaskError, match="its options: none"):
        tasks.load("induction", gpt2, n=4, skip_whitespace=True)


def test_bad_n(gpt2):
    for n in (0, -1, 2.5, True):
        with pytest.raises(TaskError, match="n must be a positive int"):
            tasks.load("induction", gpt2, n=n)


# ---------------------------------------------------------------------------
# induction


def _check_induction(task, model, L):
    tok = model.tokenizer
    special = set(tasks.special_ids(model))
    bos = tasks.bos_id(model)
    n = len(task)
    assert task.tokens.shape == (n, 1 + 3 * L)
    assert bool(task.attention_mask.all())
    x = task.tokens
    assert (x[:, 0] == bos).all()
    seg = x[:, 1 : 1 + L]
    assert torch.equal(x[:, 1 + L : 1 + 2 * L], seg) and torch.equal(x[:, 1 + 2 * L :], seg)
    for i in range(n):
        s = seg[i].tolist()
        assert len(set(s)) == L, "segment tokens are distinct (unambiguous next token)"
        assert not set(s) & special
        if tok is not None:
            assert max(s) < len(tok)
        p = int(task.positions[i])
        assert 1 + 2 * L <= p <= 3 * L - 1, "metric position inside the third copy, with its successor in it"
        a = int(task.answer_ids[i])
        # the answer is the token that followed the current token at both earlier occurrences
        assert a == x[i, p + 1] == x[i, p + 1 - L] == x[i, p + 1 - 2 * L]
        assert x[i, p] == x[i, p - L] == x[i, p - 2 * L]
        w = int(task.wrong_ids[i])
        assert w != a and w in s
    # positions and wrong tokens vary (seeded random, not a fixed slot)
    assert len(set(task.positions.tolist())) > 1


def test_induction_structure(gpt2):
    task = tasks.load("induction", gpt2, n=64, seed=3)
    assert task.name == "induction"
    _check_induction(task, gpt2, 20)
    # no special id anywhere but BOS at 0
    assert not set(task.tokens[:, 1:].flatten().tolist()) & set(tasks.special_ids(gpt2))


def test_induction_seeded(gpt2):
    a, b = tasks.load("induction", gpt2, n=16, seed=0), tasks.load("induction", gpt2, n=16, seed=0)
    for f in ("tokens", "answer_ids", "wrong_ids", "positions"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    c = tasks.load("induction", gpt2, n=16, seed=1)
    assert not torch.equal(a.tokens, c.tokens)
    assert not torch.equal(a.positions, c.positions)


def test_induction_seq_len(gpt2, native):
    _check_induction(tasks.load("induction", gpt2, n=8, seq_len=31), gpt2, 10)
    for bad in (60, 4):
        with pytest.raises(TaskError, match=r"1 \+ 3 \* L"):
            tasks.load("induction", gpt2, n=4, seq_len=bad)
    with pytest.raises(TaskError, match="n_ctx=64"):
        tasks.load("induction", native, n=4, seq_len=67)


def test_induction_tokenizerless(native):
    # no tokenizer: ids 0, 1, 2 (unk/BOS/EOS in the llama2.c convention) are never content
    assert tasks.special_ids(native) == [0, 1, 2]
    task = tasks.load("induction", native, n=32)
    _check_induction(task, native, 20)
    assert (task.tokens[:, 1:] > 2).all()


@pytest.mark.skipif(not STORIES.is_file(), reason="../shared (stories260K) absent")
def test_induction_stories260k():
    import selfrepair

    if not hasattr(selfrepair, "load_model"):
        pytest.skip("selfrepair.load_model not available yet")
    model = selfrepair.load_model(str(STORIES))
    assert tasks.bos_id(model) == 1
    task = tasks.load("induction", model, n=16)
    _check_induction(task, model, 20)
    assert (task.tokens[:, 1:] > 2).all()


# ---------------------------------------------------------------------------
# code-copy (every property re-derived by brute force from the held-out text)


def _streams(tok):
    return {name: tok.encode(text, add_special_tokens=False) for name, text in heldout_text().items()}


def _brute_wrong(window, answer, special):
    """The documented wrong rule, written out independently."""
    t = window[-1]
    followers = [(window[j + 1], j + 1) for j in range(len(window) - 1)
                 if window[j] == t and window[j + 1] != answer and window[j + 1] not in special]
    pool = followers or [(x, j) for j, x in enumerate(window) if x != answer and x not in special]
    count, last = defaultdict(int), {}
    for x, j in pool:
        count[x] += 1
        last[x] = max(last.get(x, -1), j)
    best = max(count.values())
    kind = "follower" if followers else "frequent"
    return max((x for x in count if count[x] == best), key=lambda x: last[x]), kind


@pytest.mark.parametrize("seq_len, min_repeats, bos", [(128, 2, False), (64, 2, True), (200, 3, False)])
def test_code_copy_by_brute_force(gpt2, seq_len, min_repeats, bos):
    tok = gpt2.tokenizer
    kw = {} if min_repeats == 2 else {"min_repeats": min_repeats}
    if bos:
        kw["prepend_bos"] = True
    task = tasks.load("code-copy", gpt2, n=48, seq_len=seq_len, seed=0, **kw)
    assert task.tokens.shape == (48, seq_len) and bool(task.attention_mask.all())
    assert (task.positions == seq_len - 1).all()
    if bos:
        assert (task.tokens[:, 0] == tasks.bos_id(gpt2)).all()
    special = set(tasks.special_ids(gpt2))
    streams, texts = _streams(tok), heldout_text()
    pp = task.meta["per_prompt"]
    kinds = set()
    for i in range(len(task)):
        window = task.tokens[i, int(bos):].tolist()
        s = streams[pp["file"][i]]
        start = pp["start"][i]
        # the prompt is consecutive held-out code and the answer is the true next token
        assert s[start : start + len(window)] == window
        a = int(task.answer_ids[i])
        assert a == s[start + len(window)]
        assert a not in special
        decoded = tok.decode(window + [a])
        if "\ufffd" not in decoded:
            assert decoded in texts[pp["file"][i]]
        # the answer followed the current token at >= min_repeats earlier places of the context
        t = window[-1]
        assert sum(1 for j in range(len(window) - 1) if window[j] == t and window[j + 1] == a) >= min_repeats
        w, kind = _brute_wrong(window, a, special)
        assert int(task.wrong_ids[i]) == w and pp["wrong_kind"][i] == kind and w != a
        kinds.add(kind)
    assert kinds == {"follower", "frequent"}, "both branches of the wrong rule are exercised"


def test_code_copy_candidate_count(gpt2):
    """The number of valid cuts equals an independent count (a sliding window of bigram counts)."""
    from collections import Counter

    seq_len = 96
    task = tasks.load("code-copy", gpt2, n=1, seq_len=seq_len)
    body = seq_len  # no BOS by default
    special = set(tasks.special_ids(gpt2))
    total = 0
    for s in _streams(gpt2.tokenizer).values():
        if len(s) < body + 1:
            continue
        bigrams = list(zip(s, s[1:]))
        window = Counter(bigrams[: body - 1])  # bigram starts j in [p-body+1, p) for p = body-1
        for p in range(body - 1, len(s) - 1):
            total += window[bigrams[p]] >= 2 and s[p + 1] not in special
            window[bigrams[p]] += 1
            window[bigrams[p - body + 1]] -= 1
    assert task.meta["n_candidates"] == total > 1000


def test_code_copy_deterministic(gpt2):
    a = tasks.load("code-copy", gpt2, n=32, seq_len=128, seed=5)
    b = tasks.load("code-copy", gpt2, n=32, seq_len=128, seed=5)
    for f in ("tokens", "answer_ids", "wrong_ids", "positions"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert a.meta == b.meta
    c = tasks.load("code-copy", gpt2, n=32, seq_len=128, seed=6)
    assert not torch.equal(a.tokens, c.tokens)
    small = tasks.load("code-copy", gpt2, n=8, seq_len=128, seed=5)
    assert torch.equal(small.tokens, a.tokens[:8]), "a smaller n gives a prefix of a larger one"


def test_code_copy_skip_whitespace(gpt2):
    tok = gpt2.tokenizer
    task = tasks.load("code-copy", gpt2, n=64, seq_len=128, skip_whitespace=True)
    assert all(tok.decode([a]).strip() for a in task.answer_ids.tolist())
    full = tasks.load("code-copy", gpt2, n=1, seq_len=128)
    assert task.meta["n_candidates"] < full.meta["n_candidates"]


def test_code_copy_errors(gpt2, native):
    with pytest.raises(TaskError, match=r"only \d+ valid cuts .* fewer than n=1000000"):
        tasks.load("code-copy", gpt2, n=10**6, seq_len=128)
    with pytest.raises(TaskError, match="needs the model's tokenizer"):
        tasks.load("code-copy", native, n=4)
    with pytest.raises(TaskError, match="n_ctx=256"):
        tasks.load("code-copy", gpt2, n=4, seq_len=300)


# ---------------------------------------------------------------------------
# from_jsonl


def test_from_jsonl_text(gpt2, tmp_path):
    tok = gpt2.tokenizer
    bos = tasks.bos_id(gpt2)

    def one(text):  # the first token of ``text``, spelled as text (a single token by construction)
        return tok.decode(tok.encode(text, add_special_tokens=False)[:1])

    lines = [
        {"prompt": "def f(x):\n    return x", "answer": "\n", "wrong": one(" +")},
        {"prompt": "import os", "answer": "\n", "wrong": "."},
        {"prompt": "for i in range(10):\n    print(i)\nfor j in", "answer": one(" range"), "wrong": one(" i"),
         "position": -2},
    ]
    p = _write(tmp_path, [lines[0], "", lines[1], lines[2]])  # a blank line is skipped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = tasks.from_jsonl(p, gpt2)
    seqs = [[bos] + tok.encode(l["prompt"], add_special_tokens=False) for l in lines]
    L = max(map(len, seqs))
    assert task.tokens.shape == (3, L)
    for i, s in enumerate(seqs):
        assert task.tokens[i, : len(s)].tolist() == s
        assert task.attention_mask[i].tolist() == [1] * len(s) + [0] * (L - len(s))
        assert (task.tokens[i, len(s) :] == tok.pad_token_id).all()
        assert int(task.answer_ids[i]) == tok.encode(lines[i]["answer"], add_special_tokens=False)[0]
        assert int(task.wrong_ids[i]) == tok.encode(lines[i]["wrong"], add_special_tokens=False)[0]
    assert task.positions.tolist() == [len(seqs[0]) - 1, len(seqs[1]) - 1, len(seqs[2]) - 2]
    assert task.meta["per_prompt"]["line"] == [1, 3, 4]
    # no BOS when asked, and no double BOS when the prompt spells it
    t2 = tasks.from_jsonl(p, gpt2, prepend_bos=False)
    assert t2.tokens[0, : len(seqs[0]) - 1].tolist() == seqs[0][1:]
    p3 = _write(tmp_path, [{"prompt": tok.decode([bos]) + "import os", "answer": "\n", "wrong": "."}], "bos.jsonl")
    assert tasks.from_jsonl(p3, gpt2).tokens[0].tolist() == seqs[1]


def test_from_jsonl_ids_and_subset(gpt2, tmp_path):
    p = _write(tmp_path, [{"tokens": [5, 6, 7], "answer_id": 8, "wrong_id": 9},
                          {"tokens": [1, 2, 3, 4, 5, 6], "answer_id": 7, "wrong_id": 8, "position": 2, "id": "b"},
                          {"tokens": [10], "answer_id": 11, "wrong_id": 12}])
    task = tasks.from_jsonl(p, gpt2)
    assert task.tokens.tolist() == [[5, 6, 7, 0, 0, 0], [1, 2, 3, 4, 5, 6], [10, 0, 0, 0, 0, 0]]
    assert task.attention_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0]]
    assert task.positions.tolist() == [2, 2, 0]
    assert task.answer_ids.tolist() == [8, 7, 11] and task.wrong_ids.tolist() == [9, 8, 12]
    sub = task.subset([2, 0])
    assert sub.tokens.tolist() == [[10, 0, 0], [5, 6, 7]] and sub.meta["per_prompt"]["line"] == [3, 1]


def test_from_jsonl_ids_tokenizerless(native, tmp_path):
    p = _write(tmp_path, [{"tokens": [1, 50, 60], "answer_id": 70, "wrong_id": 80}])
    assert tasks.from_jsonl(p, native).tokens.tolist() == [[1, 50, 60]]
    q = _write(tmp_path, [{"prompt": "hi", "answer": " a", "wrong": " b"}], "t.jsonl")
    with pytest.raises(TaskError, match=r"line 1: text prompts need the model's tokenizer"):
        tasks.from_jsonl(q, native)


GOOD = {"tokens": [5, 6, 7], "answer_id": 8, "wrong_id": 9}


@pytest.mark.parametrize("bad, expected", [
    ('{"prompt": "x", "answer": ', "invalid JSON"),
    ("[1, 2, 3]", "expected a JSON object"),
    ({"prompt": "x = 1", "answer": " y"}, "missing key(s) 'wrong'"),
    ({"tokens": [1, 2], "answer_id": 3}, "missing key(s) 'wrong_id'"),
    ({"text": "x"}, "unknown key(s) 'text'"),
    ({"prompt": "x", "answer": "a", "wrong": "b", "tokens": [1]}, "mixes text keys"),
    ({"prompt": "", "answer": "\n", "wrong": "."}, "empty prompt"),
    ({"tokens": [], "answer_id": 3, "wrong_id": 4}, "empty prompt"),
    ({"prompt": "x = 1", "answer": " supercalifragilistic", "wrong": "."}, "answer ' supercalifragilistic' is"),
    ({"prompt": "x = 1", "answer": "\n", "wrong": "qwertyuiop zxcv"}, "wrong 'qwertyuiop zxcv' is"),
    ({"prompt": "x = 1", "answer": "", "wrong": "."}, "answer '' is 0 tokens"),
    ({"prompt": "x = 1", "answer": "\n", "wrong": "\n"}, "answer and wrong are the same token"),
    ({"tokens": [1, 2], "answer_id": 3, "wrong_id": 3}, "answer and wrong are the same token"),
    ({"tokens": [1, 2, 5000], "answer_id": 3, "wrong_id": 4}, "tokens[2] = 5000 is outside the model's vocabulary"),
    ({"tokens": [1, -1], "answer_id": 3, "wrong_id": 4}, "tokens[1] = -1 is outside"),
    ({"tokens": [1, 2], "answer_id": 1024, "wrong_id": 4}, "answer_id = 1024 is outside"),
    ({"tokens": [1, 2], "answer_id": 3, "wrong_id": 99999}, "wrong_id = 99999 is outside"),
    ({"tokens": [1, 2], "answer_id": 3.0, "wrong_id": 4}, "'answer_id' must be an int"),
    ({"tokens": "1 2", "answer_id": 3, "wrong_id": 4}, "'tokens' must be a list of ints"),
    ({"tokens": list(range(1, 258)), "answer_id": 3, "wrong_id": 4}, "prompt is 257 tokens, longer than the model's context (n_ctx=256)"),
    ({"prompt": "x = 1\n" * 200, "answer": "\n", "wrong": "."}, "longer than the model's context (n_ctx=256)"),
    ({"tokens": [1, 2, 3], "answer_id": 3, "wrong_id": 4, "position": 3}, "position 3 is outside the prompt's 3 tokens"),
    ({"tokens": [1, 2, 3], "answer_id": 3, "wrong_id": 4, "position": "last"}, "position 'last' is outside"),
])
def test_from_jsonl_errors_name_line_and_problem(gpt2, tmp_path, bad, expected):
    p = _write(tmp_path, [GOOD, "", bad, GOOD])  # the bad line is line 3
    with pytest.raises(TaskError) as e:
        tasks.from_jsonl(p, gpt2)
    msg = str(e.value)
    assert f"{p}, line 3: " in msg and expected in msg, msg


def test_from_jsonl_answer_tokens_count_in_message(gpt2, tmp_path):
    tok = gpt2.tokenizer
    word = " supercalifragilistic"
    k = len(tok.encode(word, add_special_tokens=False))
    p = _write(tmp_path, [{"prompt": "x", "answer": word, "wrong": "."}])
    with pytest.raises(TaskError, match=f"line 1: answer '{word}' is {k} tokens"):
        tasks.from_jsonl(p, gpt2)


def test_from_jsonl_empty_and_missing_file(gpt2, tmp_path):
    for content in ("", "\n\n  \n"):
        p = tmp_path / "empty.jsonl"
        p.write_text(content)
        with pytest.raises(TaskError, match="no prompts"):
            tasks.from_jsonl(p, gpt2)
    with pytest.raises(TaskError, match="no such file"):
        tasks.from_jsonl(tmp_path / "nope.jsonl", gpt2)


def test_from_jsonl_warns_when_answer_merges_with_prompt(gpt2, tmp_path):
    tok = gpt2.tokenizer
    # "x =" + " 1" tokenizes cleanly; "x = " + "1" leaves a trailing space that BPE would merge with "1"
    ok = _write(tmp_path, [{"prompt": "x =", "answer": tok.decode(tok.encode(" 1")[:1]), "wrong": "."}], "ok.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tasks.from_jsonl(ok, gpt2)
    merged = _write(tmp_path, [{"prompt": "x = ", "answer": "1", "wrong": "."}], "merged.jsonl")
    if tok.encode("x = 1")[-2:] == tok.encode("x = ")[-1:] + tok.encode("1"):
        pytest.skip("this tokenizer does not merge ' ' with '1'")
    with pytest.warns(UserWarning, match="line 1: the tokenizer splits prompt"):
        tasks.from_jsonl(merged, gpt2)


# ---------------------------------------------------------------------------
# Task.validate


def test_validate(gpt2, native):
    t = Task(torch.tensor([[1, 2, 3]]), [4], [5])
    assert t.validate(native) is t
    with pytest.raises(TaskError, match=r"prompt 1: token id 100 at position 2 is outside .*\[0, 100\)"):
        Task(torch.tensor([[1, 2, 3], [1, 2, 100]]), [4, 4], [5, 5]).validate(native)
    with pytest.raises(TaskError, match=r"padding token id 100"):
        Task(torch.tensor([[1, 2, 100]]), [4], [5], attention_mask=torch.tensor([[1, 1, 0]])).validate(native)
    with pytest.raises(TaskError, match=r"prompt 0: answer id 100 is outside"):
        Task(torch.tensor([[1, 2]]), [100], [5]).validate(native)
    with pytest.raises(TaskError, match=r"prompt 0: wrong id -1 is outside"):
        Task(torch.tensor([[1, 2]]), [4], [-1]).validate(native)
    with pytest.raises(TaskError, match=r"prompt 0 has 65 tokens, longer than the model's context \(n_ctx=64\)"):
        Task(torch.ones(1, 65, dtype=torch.long), [4], [5]).validate(native)
    with pytest.raises(TypeError, match="TransformerLens model"):
        t.validate(object())


# ---------------------------------------------------------------------------
# padding does not leak: the padded batch's metric equals each prompt run alone


@pytest.mark.parametrize("which", ["gpt2", "native"])
def test_padding_matches_unpadded(which, gpt2, native, tmp_path):
    model = {"gpt2": gpt2, "native": native}[which]
    g = torch.Generator().manual_seed(0)
    lines = []
    for L in (3, 17, 9, 30, 1):
        toks = torch.randint(3, 100, (L,), generator=g).tolist()
        rec = {"tokens": toks, "answer_id": 40 + L, "wrong_id": 50 + L}
        if L == 17:
            rec["position"] = 5
        lines.append(rec)
    task = tasks.from_jsonl(_write(tmp_path, lines), model)
    assert task.tokens.shape[1] == 30 and not bool(task.attention_mask.all())
    with torch.no_grad():
        padded = task.metric_from_full_logits(model(task.tokens, attention_mask=task.attention_mask))
        alone = []
        for rec in lines:
            logits = model(torch.tensor([rec["tokens"]]))[0]  # [pos, vocab], unpadded
            pos = rec.get("position", len(rec["tokens"]) - 1)
            alone.append(float(logits[pos, rec["answer_id"]] - logits[pos, rec["wrong_id"]]))
    alone = torch.tensor(alone)
    torch.testing.assert_close(padded.float(), alone, atol=1e-4, rtol=1e-4)
    # score() (the evaluation helper) agrees with the unpadded runs at any batch size
    for bs in (2, None):
        df = tasks.score(model, task, batch_size=bs)
        torch.testing.assert_close(torch.tensor(df["logit_diff"].to_numpy()), alone, atol=1e-4, rtol=1e-4)
