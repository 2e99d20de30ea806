"""A study over several processes (``torchrun``, PyTorch's launcher, ``torch.distributed``).

Each process (rank) reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as torchrun sets them, joins the
process group (gloo on the CPU, NCCL on CUDA, one GPU per rank: ``cuda:LOCAL_RANK``) and:

1. checks that every rank has the same model (weights hash), task (task hash) and settings: the ranks
   exchange a hash of them (``all_gather_object``) and a disagreement is refused with one line before
   any work (``check_agreement``);
2. runs its shard of every stage into its own folder ``checkpoints/shards/rank{r}-of-{W}/``
   (``shard_dir``), checkpointed as a one-process run is, so a rank restarted by torchrun
   (``--max-restarts``) resumes where it stopped:

   * the self-repair analysis with its global effects and the GIM estimates: the task's batches (of
     the one-process run's batch size) dealt round robin, batch ``i`` to rank ``i % W``
     (``analyze_self_repair(..., shard=(rank, W))``); every row is computed from the same batch as in
     one process, so the merged tables are identical, not merely close;
   * the head attributions (rank ``1 % W``) and the token attributions with the faithfulness table
     (rank ``2 % W``) run whole on one rank each, beside the analysis shards of the others: their
     quantities are not per prompt (the mean ablation is over all prompts, the random rankings are
     drawn over the whole task, faithfulness reports means over prompts), so they are not split;

3. writes ``done.json`` in its folder when its shard is complete, then waits for every rank (barrier);
4. rank 0 merges (``merge_shards``: the groups put together in the one-process order, prompt indices
   are already those of the whole task; the estimate report, head summary and sweep recomputed from
   them; the attention-row table) into ``tables/``; only rank 0 writes figures and ``summary.json``.

A shard without ``done.json`` (a rank that died for good: torchrun's restarts exhausted) keeps its
checkpoints, and the merge is refused with one line naming it; no merged table is written partial.

In Python, inside an initialised process group: ``run_sharded`` (the whole study) or
``analyze_sharded`` (``analyze_self_repair`` on this rank's shard, the full result on every rank).
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import pandas as pd
import torch
import torch.distributed as tdist

from ..analysis.attribution import head_attributions
from ..analysis.estimates import compare_estimates, estimate_report
from ..analysis.identity import identity_changes
from ..analysis.results import SelfRepairResult, empty_groups
from ..analysis.self_repair import analyze_self_repair
from .pipeline import SWEEP_THRESHOLDS, Study, Timings, api_kwargs, row_stages, token_tables
from .rundir import CLIError, jsonable, read_table, settings_hash, write_json

__all__ = ["Ranks", "ranks_from_env", "current_ranks", "init_process_group", "rank_device", "restart_count",
           "settings_hash", "check_agreement", "barrier", "shard_dir", "stage_owner", "ShardError", "merge_shards",
           "merge_groups", "run_sharded", "analyze_sharded", "SHARDS_DIR", "GROUP_ORDER"]

SHARDS_DIR = Path("checkpoints") / "shards"
#: the row order of ``groups`` in one process (``analyze_self_repair`` sorts by it, stably)
GROUP_ORDER = ["prompt", "layer", "head", "query"]
#: the stages that run whole on one rank: stage -> i (it runs on rank ``i % world_size``)
WHOLE_STAGES = {"head attributions": 1, "token attributions + faithfulness": 2}


class ShardError(CLIError):
    """A shard of a sharded run is missing or from another run: the merge is refused (one line)."""


@dataclass(frozen=True)
class Ranks:
    """This process' place in the group: ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """More than one process (a sharded run)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    v = env.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise CLIError(f"environment variable {name}={v!r} is not an integer (torchrun sets it; unset it for "
                       "one process)") from None


def ranks_from_env(env: Optional[Mapping[str, str]] = None) -> Ranks:
    """``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as torchrun sets them (one process when unset)."""
    env = os.environ if env is None else env
    r = Ranks(_env_int(env, "RANK", 0), _env_int(env, "WORLD_SIZE", 1), _env_int(env, "LOCAL_RANK", 0))
    if r.world_size < 1 or not 0 <= r.rank < r.world_size or r.local_rank < 0:
        raise CLIError(f"RANK={r.rank}, WORLD_SIZE={r.world_size}, LOCAL_RANK={r.local_rank}: need "
                       "0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0 (launch with torchrun)")
    return r


def current_ranks() -> Ranks:
    """The initialised process group's rank and size, else the environment's."""
    if tdist.is_available() and tdist.is_initialized():
        return Ranks(tdist.get_rank(), tdist.get_world_size(), _env_int(os.environ, "LOCAL_RANK", 0))
    return ranks_from_env()


def restart_count(env: Optional[Mapping[str, str]] = None) -> int:
    """How often torchrun has restarted this worker group (``TORCHELASTIC_RESTART_COUNT``; 0 the first time)."""
    return _env_int(os.environ if env is None else env, "TORCHELASTIC_RESTART_COUNT", 0)


def rank_device(device: str, ranks: Ranks) -> str:
    """The device of this rank: ``cuda`` -> ``cuda:LOCAL_RANK`` (one GPU per rank); others unchanged."""
    return f"cuda:{ranks.local_rank}" if ranks.active and device == "cuda" else device


def init_process_group(device: str = "cpu", *, timeout_s: float = 1800.0) -> Ranks:
    """Join torchrun's process group when ``WORLD_SIZE > 1`` (gloo on the CPU, NCCL for CUDA); returns the ranks.

    Reuses a group that is already initialised; the rendezvous comes from torchrun's environment
    (``MASTER_ADDR`` / ``MASTER_PORT``). The group is destroyed when the process exits.
    """
    if tdist.is_available() and tdist.is_initialized():
        return current_ranks()
    ranks = ranks_from_env()
    if not ranks.active:
        return ranks
    if not tdist.is_available():  # pragma: no cover - torch built without distributed
        raise CLIError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(rank_device(str(device), ranks)))
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if cuda else "gloo"
    store = _attempt_store(ranks, timeout)
    if store is None:
        tdist.init_process_group(backend, timeout=timeout)
    else:
        tdist.init_process_group(backend, store=store, rank=ranks.rank, world_size=ranks.world_size, timeout=timeout)
    atexit.register(_destroy)
    return ranks


def _attempt_store(ranks: Ranks, timeout: datetime.timedelta):
    """The rendezvous store, its keys prefixed with torchrun's restart count: a worker group restarted by
    torchrun must not read the addresses its killed predecessors published (the agent's store outlives
    them; without the prefix a restarted rank connects to a dead peer's port and gloo gives up)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None  # init_process_group's own env:// rendezvous says what is missing
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts the store
    store = tdist.TCPStore(addr, int(port), ranks.world_size, is_master=not agent and ranks.rank == 0,
                           timeout=timeout, **({} if agent else {"multi_tenant": True}))
    return tdist.PrefixStore(f"selfrepair/attempt_{restart_count()}", store)


def _destroy():
    if tdist.is_initialized():
        tdist.destroy_process_group()


def check_agreement(identity: Mapping, ranks: Optional[Ranks] = None) -> None:
    """Refuse (CLIError, one line, on every rank) when the ranks' identities differ: the model, task or settings.

    ``identity``: what must agree (model weights hash, task hash, settings, ...). Every rank sends its
    hash and identity (``all_gather_object``); the first rank that differs from rank 0 is named with
    what differs. Call it before any work: it is a collective, so every rank must call it.
    """
    ranks = ranks or current_ranks()
    if not ranks.active:
        return
    mine = {"hash": settings_hash(identity), "identity": jsonable(dict(identity))}
    got: list = [None] * ranks.world_size
    tdist.all_gather_object(got, mine)
    for r, g in enumerate(got):
        if g["hash"] != got[0]["hash"]:
            what = ", ".join(f"{n}: {a!r} -> {b!r}" for n, a, b in identity_changes(got[0]["identity"], g["identity"]))
            raise CLIError(f"the ranks disagree on the run: rank {r} differs from rank 0 in {what or 'its identity'}; "
                           "launch every rank with the same model, task and settings")


def barrier(ranks: Optional[Ranks] = None) -> None:
    """Wait for every rank (nothing to do in one process)."""
    ranks = ranks or current_ranks()
    if ranks.active and tdist.is_initialized():
        tdist.barrier()


def shard_dir(out: Path, rank: int, world_size: int) -> Path:
    """The folder of one rank's shard in a run folder: ``checkpoints/shards/rank{r}-of-{W}``."""
    return Path(out) / SHARDS_DIR / f"rank{rank}-of-{world_size}"


def stage_owner(stage: str, world_size: int) -> int:
    """The rank that runs a stage that is not split (``WHOLE_STAGES``)."""
    return WHOLE_STAGES[stage] % world_size


def merge_groups(parts) -> pd.DataFrame:
    """Groups of several shards as one table in the one-process order (prompt, layer, head, query)."""
    nonempty = [p for p in parts if len(p)]
    if not nonempty:
        return next(iter(parts)).copy()
    g = pd.concat(nonempty, ignore_index=True)
    return g.sort_values(GROUP_ORDER, kind="stable").reset_index(drop=True)


def _check_shards(out: Path, world_size: int) -> list:
    dirs = [shard_dir(out, r, world_size) for r in range(world_size)]
    missing = [r for r, d in enumerate(dirs) if not (d / "done.json").is_file()]
    if missing:
        def kept(d):
            return len(list((d / "self_repair").glob("batch_*.parquet"))) if (d / "self_repair").is_dir() else 0
        what = ", ".join(f"{dirs[r].name} ({kept(dirs[r])} batch checkpoint(s) kept)" for r in missing)
        raise ShardError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {world_size} "
                         f"missing (no done.json in {Path(out) / SHARDS_DIR}: {what}): those ranks did not finish; "
                         "run the same torchrun command again to resume them; nothing was merged")
    for r, d in enumerate(dirs):
        done = d / "done.json"
        info = json.loads(done.read_text())
        if info.get("rank") != r or info.get("world_size") != world_size:
            raise ShardError(f"shard {r} of {world_size}: {done} is from rank {info.get('rank')} of "
                             f"{info.get('world_size')}; nothing was merged")
    keys = {json.loads((d / "done.json").read_text()).get("identity") for d in dirs}
    if len(keys) > 1:
        raise ShardError(f"the shards in {Path(out) / SHARDS_DIR} come from different runs (their identity "
                         "hashes differ); start over with --force; nothing was merged")
    return dirs


def merge_shards(out: Path, world_size: int) -> dict:
    """The whole run's tables from the ``world_size`` shards of ``out`` (refused with ``ShardError`` when a
    shard is missing or from another run): ``groups``, ``estimates``, ``head_summary``, ``sweep`` and the
    whole-stage tables (``heads``, ``token_attributions``, ``faithfulness``), plus ``result`` (the merged
    ``SelfRepairResult``, its meta summed over the shards). Reads files only: no model, no process group."""
    dirs = _check_shards(Path(out), world_size)
    parts = [SelfRepairResult.read_parquet(d / "self_repair_result.parquet") for d in dirs]
    settings = parts[0].settings
    groups = merge_groups([read_table(d / "tables", "groups") for d in dirs])
    base = merge_groups([p.groups for p in parts])
    meta = dict(parts[0].meta)
    for k in ("seconds_local", "seconds_global", "n_batches", "n_batches_resumed"):
        if all(k in p.meta for p in parts):
            meta[k] = sum(p.meta[k] for p in parts)
    meta["world_size"] = world_size
    res = SelfRepairResult(base if len(base) else empty_groups(bool(settings.get("global_effects"))), settings, meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # small subsets: the table's `warning` column says which
        report, _, keys, _ = estimate_report(groups, settings)   # compare_estimates' defaults, as run_study
    ths = sorted(set(SWEEP_THRESHOLDS) | {float(settings.get("threshold", 0.1))})
    tables = {"groups": groups, "estimates": report, "estimate_keys": keys, "head_summary": res.summary(),
              "sweep": res.sweep(ths),
              "group_sizes": res.group_sizes(), "by_group_size": res.by_group_size()}
    for stage, names in (("head attributions", ["heads"]),
                         ("token attributions + faithfulness", ["token_attributions", "faithfulness"])):
        d = dirs[stage_owner(stage, world_size)]
        for n in names:
            tables[n] = read_table(d / "tables", n)
    return {"tables": tables, "result": res}


def _shard_stages(model, task, settings: dict, d: Path, ranks: Ranks, *, head_ablation: str, attribution_n: int,
                  progress: bool, timings: Timings, resume: bool = False, key: Optional[dict] = None) -> list:
    """This rank's shard of every stage into ``d`` (resumed stage by stage, batch by batch)."""
    study = Study(d, progress, timings, resume=resume, key=key)
    res_path = d / "self_repair_result.parquet"
    ck = settings.get("checkpoint_dir")
    ck = str(Path(ck) / d.name) if ck else str(d / "self_repair")

    def analysis():
        if res_path.is_file():
            res = SelfRepairResult.read_parquet(res_path)
        else:
            kw = api_kwargs(settings)
            kw.update(checkpoint_dir=ck, shard=(ranks.rank, ranks.world_size))
            res = analyze_self_repair(model, task, **kw)
            res.to_parquet(res_path)
        return {"groups": compare_estimates(model, task, res, progress=progress).groups}

    study.stage("self-repair analysis + estimates", ["groups"], analysis)
    sub = task if not attribution_n or attribution_n >= len(task) else task.subset(slice(0, attribution_n))
    if ranks.rank == stage_owner("head attributions", ranks.world_size):
        study.stage("head attributions", ["heads"], lambda: {
            "heads": head_attributions(model, sub, head_ablation=head_ablation, progress=progress)})
    if ranks.rank == stage_owner("token attributions + faithfulness", ranks.world_size):
        study.stage("token attributions + faithfulness", ["token_attributions", "faithfulness"],
                    lambda: token_tables(model, sub, progress=progress))
    return study.resumed


def run_sharded(model, task, settings: dict, *, out: Path, head_ablation: str, attribution_n: int, seed: int,
                progress: bool, timings: Timings, identity: Optional[Mapping] = None, resume: bool = False,
                key: Optional[dict] = None) -> Optional[dict]:
    """``run_study`` over the ranks of the initialised process group (one process: the same as one rank of one).

    Every rank runs its shard into ``shard_dir(out, rank, W)`` and writes ``done.json``; after a barrier,
    rank 0 merges the shards into ``out/tables`` and returns what ``run_study`` returns (the tables, the
    resumed stages, the analysis meta); the other ranks return None. ``identity``: what
    ``check_agreement`` compared (its hash is kept in ``done.json``, so shards of another run are refused).
    """
    ranks = current_ranks()
    if ranks.active and not tdist.is_initialized():
        raise RuntimeError(f"run_sharded: WORLD_SIZE={ranks.world_size} but no process group is initialised; "
                           "call selfrepair.study.distributed.init_process_group(device) first")
    out = Path(out)
    torch.manual_seed(seed)
    d = shard_dir(out, ranks.rank, ranks.world_size)
    resumed = _shard_stages(model, task, settings, d, ranks, head_ablation=head_ablation,
                            attribution_n=attribution_n, progress=progress, timings=timings, resume=resume, key=key)
    ident = settings_hash(identity) if identity is not None else None
    write_json(d / "done.json", {"rank": ranks.rank, "world_size": ranks.world_size, "identity": ident,
                                 "resumed_stages": resumed})
    barrier(ranks)
    if not ranks.is_main:
        return None
    study = Study(out, progress, timings, resume=resume, key=key)
    merged: dict = {}

    def merge():
        merged.update(merge_shards(out, ranks.world_size))
        return merged["tables"]

    tabs = dict(study.stage("merge shards", ["groups", "estimates", "estimate_keys", "head_summary", "sweep", "group_sizes",
                                             "by_group_size", "heads", "token_attributions", "faithfulness"], merge))
    res_path = out / "checkpoints" / "self_repair_result.parquet"
    if merged:
        merged["result"].to_parquet(res_path)
    tabs.update(row_stages(study, model, task, tabs["groups"], settings))
    meta = SelfRepairResult.read_parquet(res_path).meta if res_path.is_file() else {}
    return {"tables": tabs, "resumed": resumed + study.resumed, "analysis_meta": meta}


def analyze_sharded(model, task, **kwargs) -> SelfRepairResult:
    """``analyze_self_repair`` inside an initialised process group: this rank's shard of the batches, then
    every rank gets the whole result (groups gathered with ``all_gather_object``, in the one-process order;
    meta of rank 0 with the batch counts and seconds summed). One process: ``analyze_self_repair`` itself.
    ``checkpoint_dir``, when given, gets one folder per rank (``rank{r}-of-{W}``)."""
    ranks = current_ranks()
    if not ranks.active:
        return analyze_self_repair(model, task, **kwargs)
    if not tdist.is_initialized():
        raise RuntimeError(f"analyze_sharded: WORLD_SIZE={ranks.world_size} but no process group is initialised; "
                           "call selfrepair.study.distributed.init_process_group(device) first")
    if kwargs.get("checkpoint_dir") is not None:
        kwargs["checkpoint_dir"] = str(Path(kwargs["checkpoint_dir"]) / f"rank{ranks.rank}-of-{ranks.world_size}")
    part = analyze_self_repair(model, task, shard=(ranks.rank, ranks.world_size), **kwargs)
    got: list = [None] * ranks.world_size
    tdist.all_gather_object(got, (part.groups, part.meta))
    meta = dict(got[0][1])
    for k in ("seconds_local", "seconds_global", "n_batches", "n_batches_resumed"):
        meta[k] = sum(m[k] for _, m in got)
    meta["world_size"] = ranks.world_size
    return SelfRepairResult(merge_groups([g for g, _ in got]), part.settings, meta)
