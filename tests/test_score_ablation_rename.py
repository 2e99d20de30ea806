"""Issue 16: the score ablation's keyword is ``score_ablation`` everywhere it is public.

The old keyword ``ablation=`` keeps working one release with a DeprecationWarning and gives exactly the
result of ``score_ablation=`` (the same code runs; compared bit for bit, and under "knockout", which is not
the default, so a keyword silently dropped would give the "mean" result and fail). Giving both names is a
TypeError. Results, checkpoints, run folders and tables written before the rename (settings key / column
``ablation``) are read under the new name, and resuming such a run folder reports no settings difference.
"""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import assert_frames_identical

from selfrepair import Task, analyze_self_repair
from selfrepair.analysis import attention_row_data, local_effects
from selfrepair.analysis import decomposition as D
from selfrepair.analysis.checkpoint import BatchCheckpoint
from selfrepair.analysis.results import SelfRepairResult, read_result_info
from selfrepair.analysis.rows import row_effects
from selfrepair.engine import ablated_pattern
from selfrepair.report.page import _read_table as page_read_table
from selfrepair.study import cli
from selfrepair.study.pipeline import Study, Timings
from selfrepair.study.rundir import read_run_json, read_table, resume_mismatch, settings_hash, study_key

F64 = torch.float64


def _task(model, n_prompts=2, n=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    V = model.cfg.d_vocab
    return Task(torch.randint(3, V, (n_prompts, n), generator=gen), torch.randint(3, V, (n_prompts,), generator=gen),
                torch.randint(3, V, (n_prompts,), generator=gen), name="random")


def _old_and_new(fn, *args, **kw):
    """fn(..., score_ablation="knockout") and fn(..., ablation="knockout") (which must warn)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # the new name warns about nothing
        new = fn(*args, score_ablation="knockout", **kw)
    with pytest.warns(DeprecationWarning, match="ablation= is deprecated .* use score_ablation="):
        old = fn(*args, ablation="knockout", **kw)
    with pytest.raises(TypeError, match="give score_ablation= only"):
        fn(*args, ablation="knockout", score_ablation="knockout", **kw)
    return new, old


def _rows(seed=0, R=5, n=7, k=2):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(R, n, generator=g, dtype=F64)
    mask = torch.ones(R, n, dtype=torch.bool)
    c = torch.randn(R, n, generator=g, dtype=F64)
    keys = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(R)])
    return a, mask, c, keys, mask.clone()


def test_kernels_and_row_functions_old_keyword(gpt2_bridge64):
    a, mask, c, keys, mm = _rows()
    sel = torch.zeros_like(mask).scatter_(1, keys, True)
    new, old = _old_and_new(ablated_pattern, a, mask, sel)
    assert torch.equal(new, old)
    # the keyword reached the kernel: knockout leaves the ablated keys weight 0, mean does not
    assert bool((new[sel] == 0).all()) and bool((ablated_pattern(a, mask, sel)[sel] > 0).all())
    for fn, args in ((D.mass_interaction, (a, mask, keys, mm)), (D.concealment, (a, mask, c, keys, mm)),
                     (D.permutation_p, (a, mask, c, keys, mm))):
        new, old = _old_and_new(fn, *args, min_effect=1e-12, **({"n_permutations": 5} if fn is D.permutation_p else {}))
        new, old = (new, old) if isinstance(new, dict) else ({"r": new}, {"r": old})
        for key in new:
            assert torch.equal(new[key].nan_to_num(-7.0), old[key].nan_to_num(-7.0)), (fn.__name__, key)
    new, old = _old_and_new(row_effects, a, mask, c, keys, mm, value_ablation="zero", temperature=1.0)
    for key in new:
        assert torch.equal(new[key].nan_to_num(-7.0), old[key].nan_to_num(-7.0)), key
    assert torch.isnan(new["grad_estimate"]).all()            # knockout: no gradient estimate
    with pytest.raises(TypeError, match="missing required keyword argument 'score_ablation'"):
        row_effects(a, mask, c, keys, mm, value_ablation="zero", temperature=1.0)
    v = torch.randn(5, 7, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    new, old = _old_and_new(local_effects, a, v, grad, mask, keys)
    for key in new:
        assert torch.equal(new[key].nan_to_num(-7.0), old[key].nan_to_num(-7.0)), key


def test_analyze_self_repair_old_keyword(gpt2_bridge64):
    model = gpt2_bridge64
    task = _task(model)
    kw = dict(min_contribution=0.0, select="abs", layers=[1], progress=False, dtype=F64)
    new, old = _old_and_new(analyze_self_repair, model, task, **kw)
    assert len(new.groups) > 0
    assert_frames_identical(new.groups, old.groups, "groups")
    assert new.settings == old.settings and new.settings["score_ablation"] == "knockout"
    assert "ablation" not in new.settings
    assert new.groups["grad_estimate"].isna().all()            # knockout reached the analysis
    assert "score_ablation='knockout'" in repr(new)
    # the attention row of the figure: its default is the result's setting, the keyword overrides it
    row = new.groups.index[0]
    d_new, d_old = _old_and_new(attention_row_data, model, task, new, row)
    pd.testing.assert_frame_equal(d_new, d_old)
    assert set(d_new["score_ablation"]) == {"knockout"} and "ablation" not in d_new.columns
    pd.testing.assert_frame_equal(attention_row_data(model, task, new, row), d_new)
    with pytest.raises(TypeError, match="unexpected keyword argument 'ablaton'"):
        analyze_self_repair(model, task, ablaton="mean", **kw)


def _rewrite_settings(path, mutate):
    """Rewrite a result file's footer as a file written before the rename would hold it."""
    table = pq.read_table(path)
    info = json.loads(table.schema.metadata[b"selfrepair"])
    mutate(info["settings"])
    pq.write_table(table.replace_schema_metadata({b"selfrepair": json.dumps(info).encode()}), path)


def _old_name(s: dict) -> None:
    s["ablation"] = s.pop("score_ablation")


def test_old_saved_result_and_checkpoint_load_under_the_new_name(tmp_path, gpt2_bridge64):
    model = gpt2_bridge64
    task = _task(model)
    kw = dict(min_contribution=0.0, select="abs", layers=[0], progress=False, dtype=F64, score_ablation="knockout")
    res = analyze_self_repair(model, task, **kw)
    path = tmp_path / "old.parquet"
    res.to_parquet(path)
    _rewrite_settings(path, _old_name)
    assert "ablation" in json.loads(pq.read_schema(path).metadata[b"selfrepair"])["settings"]
    back = SelfRepairResult.read_parquet(path)
    assert back.settings == res.settings and back.settings["score_ablation"] == "knockout"
    assert "ablation" not in back.settings
    assert read_result_info(path)["settings"] == res.settings
    assert_frames_identical(back.groups, res.groups, "groups")
    # a checkpoint folder whose run.json was written before the rename resumes: no settings difference
    ck = tmp_path / "ck"
    first = analyze_self_repair(model, task, checkpoint_dir=ck, **kw)
    ident = json.loads((ck / "run.json").read_text())
    _old_name(ident["settings"])
    (ck / "run.json").write_text(json.dumps(ident))
    again = analyze_self_repair(model, task, checkpoint_dir=ck, **kw)
    assert again.meta["n_batches_resumed"] == again.meta["n_batches"] >= 1
    assert_frames_identical(again.groups, first.groups, "resumed groups")
    with pytest.raises(ValueError, match="different settings"):   # a real difference is still refused
        analyze_self_repair(model, task, checkpoint_dir=ck, **dict(kw, score_ablation="mean"))


def test_old_run_folder_resumes_without_a_settings_difference(tmp_path, capsys):
    new_run = {"settings": {"k": 2, "score_ablation": "mean", "threshold": 0.1, "progress": True},
               "task": {"name": "code-copy", "n": 4}, "model": {"spec": None, "weights_sha256": "ab"}, "seed": 0,
               "head_ablation": "mean", "attribution_n": 4, "device": "cpu"}
    old_run = json.loads(json.dumps(new_run))
    _old_name(old_run["settings"])
    (tmp_path / "run.json").write_text(json.dumps(old_run))
    read = read_run_json(tmp_path / "run.json")
    assert read["settings"] == new_run["settings"]
    assert resume_mismatch(read, new_run) == ""
    assert "k: 2 -> 3" in resume_mismatch(read, dict(new_run, settings=dict(new_run["settings"], k=3)))
    # a stage stamped by the old code (the hash of the run's key with the old name) is read back, not recomputed
    key_new = dict(study_key(new_run), weights_sha256="ab")
    key_old = dict(study_key(old_run), weights_sha256="ab")   # what the code before the rename hashed
    assert settings_hash(key_old) != settings_hash(key_new)
    tables = tmp_path / "tables"
    tables.mkdir()
    stamp = tables / ".stage-x.json"
    files = [tables / "t.parquet"]
    files[0].write_bytes(b"")
    study = Study(tmp_path, False, Timings(), resume=True, key=key_new)
    for h, ok in ((settings_hash(key_old), True), (settings_hash(key_new), True), ("0" * 64, False)):
        stamp.write_text(json.dumps({"settings_sha256": h}))
        assert study.reusable("x", files, stamp) is ok
    assert capsys.readouterr().err.count("recomputing") == 1   # only the foreign hash was reported
    stamp.write_text(json.dumps({"settings_sha256": settings_hash(dict(key_old, seed=1))}))
    assert not study.reusable("x", files, stamp)            # the old name does not hide a real difference


def test_old_tables_columns_are_renamed_on_read(tmp_path):
    df = pd.DataFrame({"group": [0], "ablation": ["knockout"], "exclude_bos": [False]})
    df.to_parquet(tmp_path / "attention_rows.parquet", index=False)
    for got in (read_table(tmp_path, "attention_rows"), page_read_table(tmp_path / "attention_rows.parquet")):
        assert list(got.columns) == ["group", "score_ablation", "exclude_bos"]
        assert got["score_ablation"].tolist() == ["knockout"]
    new = pd.DataFrame({"group": [1], "score_ablation": ["mean"]})
    new.to_parquet(tmp_path / "new.parquet", index=False)
    assert read_table(tmp_path, "new").equals(new)             # a current table is left as it is


def test_cli_score_ablation_and_its_deprecated_alias(capsys):
    parser = cli.build_parser()
    a = parser.parse_args(["analyze", "--score-ablation", "knockout"])
    assert capsys.readouterr().err == ""
    s = cli.settings_from_args(a)
    assert s["score_ablation"] == "knockout" and "ablation" not in s
    a = parser.parse_args(["analyze", "--ablation", "knockout"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ablation is deprecated" in err and "--score-ablation" in err
    assert cli.settings_from_args(a) == s
    assert parser.parse_args(["analyze", "--score_ablation", "knockout"]).score_ablation == "knockout"
    assert parser.parse_args(["analyze"]).score_ablation == "mean"
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["analyze", "--score-ablation", "zero"])
    assert e.value.code == 2 and "knockout" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["analyze", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--score-ablation {mean,knockout}" in text and "--ablation is its deprecated old name" in text
