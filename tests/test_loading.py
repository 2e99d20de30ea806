"""selfrepair.load_model: every spec kind, offline behaviour, llama2.c conversion, bad input.

Logits are compared with an independent computation: the plain HF model the
bridge wraps (built separately with the same seed), or, for llama2.c files, a
numpy forward pass of the llama2.c architecture written here (run.c's
algorithm: interleaved-pair complex rotary applied to the raw file weights).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import selfrepair
from selfrepair.models.loading import DEFAULT_MODEL_DIR, ModelLoadError

from conftest import REPO_ROOT, STORIES_260K, gpt2_config, llama_config, needs_bridge

pytestmark = needs_bridge

TOKS = torch.tensor([[1, 17, 42, 7, 99, 42, 7, 150, 3, 64]])


def _hf_reference(config, seed):
    """The plain HF model load_model(config) should wrap, built independently."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _run_py(code: str, env_extra: dict, timeout: float = 120):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(env_extra)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT
    )


# ----------------------------------------------------------------------------- config / model objects


@pytest.mark.parametrize("make_config", [gpt2_config, llama_config], ids=["gpt2", "llama"])
def test_config_gives_seeded_random_model_matching_hf(make_config):
    from transformer_lens.model_bridge import TransformerBridge

    cfg = make_config()
    torch.manual_seed(3)
    m = selfrepair.load_model(cfg, device="cpu")
    assert isinstance(m, TransformerBridge) and not m.training
    ref = _hf_reference(cfg, 3)
    with torch.no_grad():
        torch.testing.assert_close(m(TOKS), ref(TOKS).logits, rtol=0, atol=1e-5)
        torch.manual_seed(3)
        again = selfrepair.load_model(cfg, device="cpu")
        assert torch.equal(again(TOKS), m(TOKS))
        torch.manual_seed(4)
        other = selfrepair.load_model(cfg, device="cpu")
        assert not torch.allclose(other(TOKS), m(TOKS))
    assert m.tokenizer is None  # token ids only


def test_pretrained_model_object_is_wrapped():
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(gpt2_config()).eval()
    with torch.no_grad():
        ref = hf(TOKS).logits.clone()
        m = selfrepair.load_model(hf)
        torch.testing.assert_close(m(TOKS), ref, rtol=0, atol=1e-5)


def test_bridge_is_returned_as_is(gpt2_bridge, native_bridge):
    assert selfrepair.load_model(gpt2_bridge) is gpt2_bridge
    assert selfrepair.load_model(native_bridge) is native_bridge
    assert not gpt2_bridge.training


def test_dtype_float64(gpt2_bridge):
    m64 = selfrepair.load_model(gpt2_config(), dtype=torch.float64, device="cpu")
    assert {p.dtype for p in m64.parameters()} == {torch.float64}
    with torch.no_grad():
        assert m64(TOKS).dtype == torch.float64


def test_dtype_and_device_applied_to_given_bridge():
    m = selfrepair.load_model(llama_config(), device="cpu")
    same = selfrepair.load_model(m, dtype=torch.float64, device="cpu")
    assert same is m and {p.dtype for p in m.parameters()} == {torch.float64}


# ----------------------------------------------------------------------------- checkpoint directories


def _word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w1", eos_token="w2", unk_token="w0", pad_token="w2")


@pytest.mark.parametrize("make_config", [gpt2_config, llama_config], ids=["gpt2", "llama"])
@pytest.mark.parametrize("with_tokenizer", [True, False], ids=["tokenizer", "no-tokenizer"])
def test_local_checkpoint_dir(tmp_path, make_config, with_tokenizer):
    cfg = make_config()
    ref = _hf_reference(cfg, 5)
    ref.save_pretrained(tmp_path)
    if with_tokenizer:
        _word_tokenizer(cfg.vocab_size).save_pretrained(tmp_path)
    m = selfrepair.load_model(tmp_path, device="cpu")
    assert not m.training
    with torch.no_grad():
        torch.testing.assert_close(m(TOKS), ref(TOKS).logits, rtol=0, atol=1e-5)
    if with_tokenizer:
        assert m.tokenizer is not None
        ids = m.to_tokens("w17 w42 w7")
        assert ids[0, -2:].tolist() == [42, 7]
    else:
        assert m.tokenizer is None
    # a str path works too
    assert selfrepair.load_model(str(tmp_path), device="cpu").cfg.n_layers == m.cfg.n_layers


def test_default_model_offline_subprocess():
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip("shipped default model not present yet")
    code = (
        "import time; t = time.time()\n"
        "import selfrepair, torch\n"
        "from transformer_lens.model_bridge import TransformerBridge\n"
        "m = selfrepair.load_model()\n"
        "assert isinstance(m, TransformerBridge) and not m.training\n"
        "ids = m.to_tokens('def f(x):\\n    return x')\n"
        "out = m(ids)\n"
        "assert torch.isfinite(out).all()\n"
        "print('OK', round(time.time() - t, 1), m.cfg.n_layers, m.cfg.n_heads, m.cfg.n_ctx)\n"
    )
    # a dead loopback endpoint as well: any network attempt would fail
    r = _run_py(code, {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode == 0, r.stderr[-2000:]
    words = r.stdout.split()
    assert words[0] == "OK"
    n_layers, n_heads, n_ctx = map(int, words[2:5])
    assert n_layers >= 4 and n_heads >= 4 and n_ctx >= 256


def test_default_model_matches_boot_transformers(default_model):
    from transformer_lens.model_bridge import TransformerBridge

    ref = TransformerBridge.boot_transformers(str(DEFAULT_MODEL_DIR), device="cpu")
    ids = default_model.to_tokens("import os\nprint(os.getcwd())")
    assert ids.tolist() == ref.to_tokens("import os\nprint(os.getcwd())").tolist()
    with torch.no_grad():
        torch.testing.assert_close(default_model(ids), ref(ids), rtol=0, atol=1e-5)


def test_default_model_missing_is_a_clear_error(monkeypatch, tmp_path):
    import selfrepair.models.loading as loading

    monkeypatch.setattr(loading, "DEFAULT_MODEL_DIR", tmp_path / "nothing")
    with pytest.raises(ModelLoadError, match="default model is missing"):
        selfrepair.load_model()


# ----------------------------------------------------------------------------- hub names offline

_HUB_CODE = (
    "import time, sys\n"
    "import selfrepair\n"
    "t = time.time()\n"
    "try:\n"
    "    selfrepair.load_model('openai-community/gpt2')\n"
    "except selfrepair.models.loading.ModelLoadError as e:\n"
    "    print(round(time.time() - t, 2)); print(str(e)); sys.exit(0)\n"
    "sys.exit(3)\n"
)


@pytest.mark.parametrize(
    "env",
    [
        {"HF_HUB_OFFLINE": "1"},
        # no offline flag, but nothing answers at the hub endpoint (a closed loopback port)
        {"HF_ENDPOINT": "http://127.0.0.1:9"},
    ],
    ids=["HF_HUB_OFFLINE", "refused"],
)
def test_hub_name_offline_fails_fast_with_one_line(tmp_path, env):
    env = dict(env, HF_HOME=str(tmp_path / "hf"))  # empty cache
    t0 = time.time()
    r = _run_py(_HUB_CODE, env)
    wall = time.time() - t0
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    elapsed, message = float(lines[0]), lines[1:]
    assert elapsed < 10.0, f"load_model took {elapsed:.1f} s to give up"
    assert len(message) == 1, message
    assert "selfrepair.load_model()" in message[0] and "openai-community/gpt2" in message[0]
    assert wall < 120


def test_hub_name_in_local_cache_loads_offline(tmp_path):
    """A hub name whose files are in the HF cache loads with no network (HF_HUB_OFFLINE=1)."""
    snap = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-gpt2" / "snapshots" / "abc123"
    ref = _hf_reference(gpt2_config(), 9)
    ref.save_pretrained(snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    with torch.no_grad():
        expect = ref(TOKS).logits[0, -1, :4].tolist()
    code = (
        "import selfrepair, torch\n"
        "m = selfrepair.load_model('tiny-org/tiny-gpt2', device='cpu')\n"
        f"print(m(torch.tensor({TOKS.tolist()}))[0, -1, :4].tolist())\n"
    )
    r = _run_py(code, {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode == 0, r.stderr[-2000:]
    got = eval(r.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(got, expect, atol=1e-5)


def test_hub_probe_gives_up_on_a_hanging_connection(monkeypatch):
    """A connection (or DNS lookup) that hangs must not hang load_model: give up after the timeout."""
    import socket

    import selfrepair.models.loading as loading

    def hang(*a, **k):
        time.sleep(30)

    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "_cached_snapshot", lambda name: None)
    t0 = time.time()
    with pytest.raises(ModelLoadError, match="unreachable.*selfrepair.load_model\\(\\)"):
        selfrepair.load_model("some-org/some-model")
    assert time.time() - t0 < loading.HUB_CONNECT_TIMEOUT + 2


def test_hub_error_uncaught_has_no_hub_traceback(tmp_path):
    r = _run_py(
        "import selfrepair; selfrepair.load_model('gpt2')",
        {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert r.returncode != 0
    assert "huggingface_hub" not in r.stderr and "During handling" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("selfrepair.models.loading.ModelLoadError: cannot load 'gpt2'")


# ----------------------------------------------------------------------------- bad input


def test_bad_specs(tmp_path):
    with pytest.raises(TypeError, match="cannot load a builtins.int"):
        selfrepair.load_model(3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        selfrepair.load_model(tmp_path / "missing_dir")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        selfrepair.load_model("./no/such/model.bin")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a llama2.c .bin"):
        selfrepair.load_model(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        selfrepair.load_model(tmp_path / "empty")
    with pytest.raises(TypeError, match="torch.dtype"):
        selfrepair.load_model(gpt2_config(), dtype="float32")


def test_bad_llama2c_files(tmp_path):
    p = tmp_path / "short.bin"
    p.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="fewer than the 28-byte header"):
        selfrepair.load_model(p)
    p = tmp_path / "trunc.bin"
    _write_llama2c(p, _random_llama2c(np.random.default_rng(0)))
    p.write_bytes(p.read_bytes()[:-4])
    with pytest.raises(ValueError, match="does not match the header"):
        selfrepair.load_model(p)
    p = tmp_path / "neg.bin"
    p.write_bytes(struct.pack("<7i", 16, 32, 1, 0, 1, 10, 8) + b"\x00" * 64)
    with pytest.raises(ValueError, match="n_heads = 0 is not positive"):
        selfrepair.load_model(p)


# ----------------------------------------------------------------------------- llama2.c


def _random_llama2c(rng, dim=32, hidden=48, n_layers=2, n_heads=4, n_kv=2, vocab=50, seq_len=16, shared=True):
    L, hs = n_layers, dim // n_heads
    kv = n_kv * hs
    f = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)  # noqa: E731
    w = dict(
        token_embedding=f(vocab, dim), rms_att=1 + f(L, dim), wq=f(L, dim, dim), wk=f(L, kv, dim),
        wv=f(L, kv, dim), wo=f(L, dim, dim), rms_ffn=1 + f(L, dim), w1=f(L, hidden, dim),
        w2=f(L, dim, hidden), w3=f(L, hidden, dim), rms_final=1 + f(dim),
    )
    if not shared:
        w["wcls"] = f(vocab, dim)
    hdr = dict(dim=dim, hidden=hidden, n_layers=L, n_heads=n_heads, n_kv=n_kv, vocab=vocab, seq_len=seq_len, shared=shared)
    return hdr, w


def _write_llama2c(path, hw, version=0):
    hdr, w = hw
    ints = [hdr["dim"], hdr["hidden"], hdr["n_layers"], hdr["n_heads"], hdr["n_kv"], hdr["vocab"], hdr["seq_len"]]
    hs = hdr["dim"] // hdr["n_heads"]
    with open(path, "wb") as fh:
        if version == 0:
            ints[5] = hdr["vocab"] if hdr["shared"] else -hdr["vocab"]
            fh.write(struct.pack("<7i", *ints))
            order = ["token_embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final"]
            for k in order:
                fh.write(w[k].tobytes())
            # freq_cis_real / imag (llama2.c writes them; readers skip them)
            t = np.arange(hdr["seq_len"])[:, None] * (10000.0 ** (-np.arange(0, hs, 2) / hs))[None]
            fh.write(np.cos(t).astype(np.float32).tobytes())
            fh.write(np.sin(t).astype(np.float32).tobytes())
        else:
            head = struct.pack("<Ii", 0x616B3432, 1) + struct.pack("<7i", *ints) + struct.pack("B", int(hdr["shared"]))
            fh.write(head + b"\x00" * (256 - len(head)))
            order = ["rms_att", "rms_ffn", "rms_final", "token_embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
            for k in order:
                fh.write(w[k].tobytes())
        if not hdr["shared"]:
            fh.write(w["wcls"].tobytes())


def _read_legacy_independently(path):
    """Parse a legacy llama2.c file here (not with selfrepair.llama2c)."""
    raw = np.fromfile(path, dtype=np.int32, count=7)
    dim, hidden, L, nh, nkv, vocab, seq_len = map(int, raw)
    shared, vocab = vocab > 0, abs(vocab)
    hs = dim // nh
    kv = nkv * hs
    data = np.fromfile(path, dtype=np.float32, offset=28).astype(np.float64)
    w, pos = {}, 0
    for name, shape in [
        ("token_embedding", (vocab, dim)), ("rms_att", (L, dim)), ("wq", (L, dim, dim)), ("wk", (L, kv, dim)),
        ("wv", (L, kv, dim)), ("wo", (L, dim, dim)), ("rms_ffn", (L, dim)), ("w1", (L, hidden, dim)),
        ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim)), ("rms_final", (dim,)),
        ("freq_real", (seq_len, hs // 2)), ("freq_imag", (seq_len, hs // 2)),
    ]:
        n = int(np.prod(shape))
        w[name] = data[pos:pos + n].reshape(shape)
        pos += n
    w["wcls"] = w["token_embedding"] if shared else data[pos:pos + vocab * dim].reshape(vocab, dim)
    return dict(n_heads=nh, n_kv=nkv), w


def _llama2c_forward(hdr, w, tokens):
    """run.c's forward for every position of one sequence, in float64 numpy.

    Rotary as in run.c: pairs (x[2i], x[2i+1]) of each head rotated by angle pos * 10000^(-2i/hs).
    """
    nh, nkv = hdr["n_heads"], hdr["n_kv"]
    emb = w["token_embedding"]
    T, dim = len(tokens), emb.shape[1]
    hs, kv_mul = dim // nh, nh // nkv
    rms = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g  # noqa: E731
    ang = np.arange(T)[:, None] * (10000.0 ** (-np.arange(0, hs, 2) / hs))[None]  # [T, hs/2]
    rot = np.exp(1j * ang)

    def rope(x, n):  # x [T, n*hs]
        xc = x.reshape(T, n, hs // 2, 2)
        z = (xc[..., 0] + 1j * xc[..., 1]) * rot[:, None, :]
        return np.stack([z.real, z.imag], -1).reshape(T, n, hs)

    x = emb[np.asarray(tokens)].astype(np.float64)
    mask = np.tril(np.ones((T, T), dtype=bool))
    for l in range(w["wq"].shape[0]):
        xb = rms(x, w["rms_att"][l])
        q, k = rope(xb @ w["wq"][l].T, nh), rope(xb @ w["wk"][l].T, nkv)
        v = (xb @ w["wv"][l].T).reshape(T, nkv, hs)
        out = np.zeros((T, nh, hs))
        for h in range(nh):
            g = h // kv_mul
            s = q[:, h] @ k[:, g].T / np.sqrt(hs)
            s = np.where(mask, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[:, h] = p @ v[:, g]
        x = x + out.reshape(T, dim) @ w["wo"][l].T
        xb = rms(x, w["rms_ffn"][l])
        h1, h3 = xb @ w["w1"][l].T, xb @ w["w3"][l].T
        x = x + (h1 / (1 + np.exp(-h1)) * h3) @ w["w2"][l].T
    return rms(x, w["rms_final"]) @ w["wcls"].T


@pytest.mark.parametrize("shared", [True, False], ids=["shared-classifier", "own-classifier"])
@pytest.mark.parametrize("version", [0, 1], ids=["legacy", "v1"])
def test_llama2c_random_file_matches_runc_forward(tmp_path, shared, version):
    rng = np.random.default_rng(11)
    hdr, w = _random_llama2c(rng, shared=shared)
    path = tmp_path / "tiny.bin"
    _write_llama2c(path, (hdr, w), version=version)
    tokens = [1, 5, 9, 5, 9, 33, 2, 47, 5, 9]
    ref = _llama2c_forward(hdr, {k: v.astype(np.float64) for k, v in w.items()} | (
        {"wcls": w["token_embedding"].astype(np.float64)} if shared else {}), tokens)
    m64 = selfrepair.load_model(path, dtype=torch.float64, device="cpu")
    with torch.no_grad():
        got64 = m64(torch.tensor([tokens])).numpy()[0]
    # HF Llama computes rotary cos/sin in float32 even in a float64 model: ~1e-7 relative angles
    np.testing.assert_allclose(got64, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    m32 = selfrepair.load_model(path, device="cpu")
    with torch.no_grad():
        got32 = m32(torch.tensor([tokens])).numpy()[0]
    np.testing.assert_allclose(got32, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    assert m32.cfg.n_layers == 2 and m32.tokenizer is None


def test_llama2c_without_row_permutation_would_differ(tmp_path):
    """The check above can fail: skipping the q/k row permutation breaks agreement."""
    from selfrepair.models import llama2c

    rng = np.random.default_rng(12)
    hdr, w = _random_llama2c(rng)
    path = tmp_path / "tiny.bin"
    _write_llama2c(path, (hdr, w))
    hf = llama2c.llama2c_to_hf(path, dtype=torch.float64)
    tokens = [1, 5, 9, 5, 9, 33]
    ref = _llama2c_forward(hdr, {k: v.astype(np.float64) for k, v in w.items()} | {"wcls": w["token_embedding"].astype(np.float64)}, tokens)
    with torch.no_grad():
        for layer, l in zip(hf.model.layers, range(hdr["n_layers"])):
            layer.self_attn.q_proj.weight.copy_(torch.from_numpy(w["wq"][l].astype(np.float64)))
            layer.self_attn.k_proj.weight.copy_(torch.from_numpy(w["wk"][l].astype(np.float64)))
        got = hf(torch.tensor([tokens])).logits.numpy()[0]
    assert np.abs(got - ref).max() > 1e-3


def test_stories260k_matches_runc_forward():
    if not STORIES_260K.is_file():
        pytest.skip(f"{STORIES_260K} absent")
    hdr, w = _read_legacy_independently(STORIES_260K)
    assert hdr == dict(n_heads=8, n_kv=4)
    tokens = [1, 403, 407, 261, 378, 285, 426, 280, 380, 333, 259, 361]
    ref = _llama2c_forward(hdr, w, tokens)
    m = selfrepair.load_model(STORIES_260K, device="cpu")
    with torch.no_grad():
        got = m(torch.tensor([tokens])).numpy()[0]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    m64 = selfrepair.load_model(STORIES_260K, dtype=torch.float64, device="cpu")
    with torch.no_grad():
        got64 = m64(torch.tensor([tokens])).numpy()[0]
    np.testing.assert_allclose(got64, ref, rtol=0, atol=1e-5 * np.abs(ref).max())  # rotary in float32 (HF)
    assert (m.cfg.n_layers, m.cfg.n_heads, m.cfg.d_model, m.cfg.d_vocab) == (5, 8, 64, 512)
