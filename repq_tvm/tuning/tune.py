"""`repq-tvm tune`: MetaSchedule over a calibrated model's kernels, verified, written as a tuning log.

1. Lower the model to its kernels (`passes.pipeline.lower_to_kernels`) and make one task per distinct
   kernel (`tasks.extract`).
2. Time every task's default (the schedule `compile` uses without a log) with the same builder and
   runner as the search: a kernel's share of the run time is ``calls x default time``.
3. Spread the trial budget over the tasks by that share (tasks under `MIN_SHARE` keep their default);
   search each with MetaSchedule's evolutionary search and XGBoost cost model: integer kernels in their
   own design spaces (`spaces`), float kernels with MetaSchedule's CPU rules.  Every trial goes to the
   search database in ``search/``; a re-run counts what is there and only runs the rest.
4. Accept per task the fastest candidate that matches its definition (`verify.check`) and, timed again
   side by side with the default in the same rounds, beats it by `MARGIN`; else the default stays.
5. Write the accepted kernels (MetaSchedule's JSON database) and ``tuning.json`` (`log`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np
import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.arg_info import ArgInfo
from tvm.s_tir.meta_schedule.builder import BuilderInput
from tvm.s_tir.meta_schedule.database import JSONDatabase, TuningRecord
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.s_tir.meta_schedule.runner import RunnerInput

from ..errors import ReqError
from . import log as log_mod
from . import measure, spaces, verify
from .tasks import Task, extract

MIN_SHARE = 0.01  # tasks below 1% of the run time are not worth a trial
MIN_TRIALS = 8
MARGIN = 0.03  # a tuned kernel must be 3% faster than its default, timed side by side
TOP_K = 5  # candidates verified, best first, before a task falls back to its default
REMEASURE_ROUNDS = 3


def plan_trials(shares: list[float], budget: int) -> list[int]:
    """Trials per task: the budget in proportion to each task's share of the run time, at least `MIN_TRIALS`
    a task, largest shares first until the budget is spent; tasks under `MIN_SHARE` get none."""
    plan = [0] * len(shares)
    order = sorted((i for i, s in enumerate(shares) if s >= MIN_SHARE), key=lambda i: -shares[i])
    total = sum(shares[i] for i in order) or 1.0
    left = budget
    for i in order:
        n = min(left, max(MIN_TRIALS, round(budget * shares[i] / total)))
        if n <= 0:
            break
        plan[i], left = n, left - n
    return plan


def _space(task: Task):
    if task.integer:
        return ms.space_generator.ScheduleFn(spaces.design_spaces, sch_rules=[], postprocs=[], mutator_probs={})
    return "post-order-apply"


def _strategy(task: Task):
    """Evolutionary search sized for kernels with a few hundred candidates: MetaSchedule's default population
    (512, each a replay of the trace with tensorize) cost more per iteration than the trials it picked."""
    size = 64 if task.integer else 128
    return ms.search_strategy.EvolutionarySearch(
        population_size=size, init_measured_ratio=0.2, init_min_unmeasured=size // 4, max_fail_count=2,
        genetic_num_iters=2, genetic_max_fail_count=2)


def _context(task: Task, target, seed: int) -> ms.TuneContext:
    return ms.TuneContext(mod=task.mod, target=target, space_generator=_space(task),
                          search_strategy=_strategy(task), task_name=task.name, rand_state=seed,
                          num_threads="physical").clone()


def time_schedules(schedules: list, target, builder, runner) -> list[float]:
    """Seconds per call of each schedule's kernel, built and run as MetaSchedule's trials are (inf: failed)."""
    built = builder.build([BuilderInput(s.mod, target) for s in schedules])
    device = "cpu" if target.kind.name == "llvm" else target.kind.name
    inputs = [RunnerInput(b.artifact_path, device, ArgInfo.from_prim_func(s.mod["main"]))
              for s, b in zip(schedules, built) if b.error_msg is None]
    futures = iter(runner.run(inputs))
    out = []
    for b in built:
        if b.error_msg is not None:
            out.append(float("inf"))
            continue
        res = next(futures).result()
        out.append(float("inf") if res.error_msg else float(np.median([float(x) for x in res.run_secs])))
        shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)
    return out


@derived_object
class _Progress(PyMeasureCallback):
    """One line per batch of trials: task, trials done of planned, best time so far against the default."""

    def __init__(self, label: str, planned: int, done: int, default_s: float, progress):
        super().__init__()
        self.label, self.planned, self.done, self.default_s, self.progress = label, planned, done, default_s, progress
        self.best = float("inf")

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        if not runner_results:
            return
        for res in runner_results:
            self.done += 1
            if res.error_msg is None and res.run_secs:
                self.best = min(self.best, float(np.median([float(x) for x in res.run_secs])))
        best = f"{self.best * 1e3:.3f} ms" if np.isfinite(self.best) else "none yet"
        self.progress(f"  {self.label}: trials {min(self.done, self.planned)}/{self.planned}, best {best} "
                      f"(default {self.default_s * 1e3:.3f} ms)")


def _trials_done(db: JSONDatabase, task: Task) -> int:
    if not db.has_workload(task.mod):
        return 0
    workload = db.commit_workload(task.mod)
    return sum(1 for r in db.get_all_tuning_records() if r.workload.same_as(workload)
               or tvm_ffi.structural_equal(r.workload.mod, workload.mod))


def _search(task: Task, trials: int, target, search_db, builder, runner, work_dir: str, seed: int, callback):
    ms.tune.tune_tasks(
        tasks=[_context(task, target, seed)], task_weights=[1.0], work_dir=work_dir, max_trials_global=trials,
        num_trials_per_iter=min(16, trials), builder=builder, runner=runner, database=search_db,
        cost_model="xgb", measure_callbacks=[*ms.MeasureCallback.create("default"), callback],
        task_scheduler="round-robin")


def _choose(task: Task, target, search_db, builder, runner):
    """(accepted record or None, verdict dict): the fastest verified candidate if it beats the default."""
    if not search_db.has_workload(task.mod):
        return None, {"verdict": "default kept: no trials"}
    workload = search_db.commit_workload(task.mod)
    rejected = []
    for record in search_db.get_top_k(workload, TOP_K):
        problem, sch = None, None
        for member in task.members:  # the schedule applies to every kernel of the group: check each
            sch_m = tvm.s_tir.Schedule(member)
            record.trace.apply_to_schedule(sch_m, remove_postproc=False)
            problem = verify.check(sch_m, member, target)
            sch = sch or sch_m
            if problem:
                break
        if problem:
            rejected.append(problem)
            continue
        times = {"default": [], "tuned": []}
        for _ in range(REMEASURE_ROUNDS):  # side by side, same rounds
            d, t = time_schedules([task.default, sch], target, builder, runner)
            times["default"].append(d)
            times["tuned"].append(t)
        d, t = float(np.min(times["default"])), float(np.min(times["tuned"]))
        info = {"default_ms": d * 1e3, "tuned_ms": t * 1e3, "speedup": d / t if t > 0 else None,
                "rejected_candidates": rejected}
        if t < d * (1 - MARGIN):
            return record, {**info, "verdict": "accepted"}
        return None, {**info, "verdict": f"default kept: best verified candidate not {MARGIN:.0%} faster"}
    return None, {"verdict": "default kept: no candidate matched its definition", "rejected_candidates": rejected}


def tune(calibrated_model, target: str = "host", trials: int = 200, output: str | None = None, batch: int = 1,
         rpc: dict | None = None, progress=print, seed: int = 1) -> dict:
    """Tune a calibrated model (`.repq` path or `CalibratedModel`) for a preset and batch size; returns the
    tuning manifest.  ``rpc`` = {"tracker": "HOST:PORT", "key": KEY, "timeout": s} (or {"host": "HOST:PORT"}
    for one server) measures on a board."""
    from .. import calibrated, targets
    from ..passes.pipeline import lower_to_kernels

    if trials < 1:
        raise ReqError(f"--trials must be positive, got {trials}")
    preset = targets.load(target)
    t_start = time.time()
    # where it measures is checked first, in a second: before the model loads or anything is compiled
    tvm_target = targets.tvm_target(preset)
    if rpc is None:  # measured here: code this CPU cannot run would kill the runner (SIGILL)
        targets.check_runnable(tvm_target, "kernels tuned on this machine (tune for a board with --rpc-tracker)")
    builder = measure.builder_for(preset, remote=rpc is not None)  # a missing cross compiler fails here
    cm = calibrated.load(calibrated_model) if isinstance(calibrated_model, str) else calibrated_model
    runner = measure.make_runner(preset, rpc)  # an unreachable tracker or an unfit board fails here
    shape = [batch, *cm.preprocessing["input_size"]]
    key = log_mod.workload_key(cm.arch["name"], cm.config.w_bits, cm.config.a_bits, batch, preset)
    output = output or os.path.join("tuning_logs", log_mod.default_name(key))
    manifest_path = os.path.join(output, log_mod.MANIFEST)
    previous = {}
    if os.path.exists(manifest_path):  # resuming: the log must be for the same workload
        old = log_mod.TuningLog.open(output, key, check_hashes=False).manifest
        if old.get("trials_budget") == trials:  # same budget: the same plan, searched tasks stay done
            previous = {r["kernel"]: r for r in old.get("kernels", [])}
    os.makedirs(os.path.join(output, log_mod.SEARCH), exist_ok=True)

    measure.light_intrinsic_registry(targets.target_arch(tvm_target))
    progress(f"lowering {cm.arch['name']} W{cm.config.w_bits}/A{cm.config.a_bits} for {preset['name']}")
    mod, tvm_target, _ = lower_to_kernels(cm.model, shape, preset, progress=lambda msg: None)
    task_list = extract(mod, tvm_target)

    progress(f"timing the defaults of {len(task_list)} kernels")
    defaults = time_schedules([t.default for t in task_list], tvm_target, builder, runner)
    timed = [np.isfinite(d) for d in defaults]  # e.g. `take` on random indices: not timeable, not tuned
    total = sum(d * t.calls for d, t, ok in zip(defaults, task_list, timed) if ok)
    shares = [d * t.calls / total if ok else 0.0 for d, t, ok in zip(defaults, task_list, timed)]
    plan = plan_trials(shares, trials)
    for i, task in enumerate(task_list):  # a resumed run keeps its first plan (shares are re-measured, noisy)
        if task.name in previous:
            plan[i] = previous[task.name]["planned"]

    search_db = log_mod.open_database(*(os.path.join(output, log_mod.SEARCH, name) for name in log_mod.ACCEPTED))
    for name in log_mod.ACCEPTED:  # decided afresh on every run
        path = os.path.join(output, name)
        if os.path.exists(path):
            os.remove(path)
    accepted_db = log_mod.open_accepted(output)
    ms_logs = tempfile.mkdtemp(prefix="repq-ms-logs-")
    rows, ran, search_s = [], 0, 0.0
    order = sorted(range(len(task_list)), key=lambda i: -shares[i])
    spare = 0  # trials a task left when its space ran out of distinct candidates: they go to the next task
    for n, i in enumerate(order, 1):
        if spare and timed[i] and shares[i] >= MIN_SHARE and task_list[i].name not in previous:
            plan[i], spare = plan[i] + spare, 0
        task, planned = task_list[i], plan[i]
        label = f"[{n}/{len(task_list)}] {task.name}"
        done = _trials_done(search_db, task)
        t0 = time.time()
        exhausted = previous.get(task.name, {}).get("exhausted", False)
        if planned > done and not exhausted:
            progress(f"{label}: {shares[i]:.1%} of the run time, {planned - done} trials"
                     + (f" ({done} already in the log)" if done else ""))
            _search(task, planned - done, tvm_target, search_db, builder, runner, ms_logs, seed + i,
                    _Progress(label, planned, done, defaults[i], progress))
            now = _trials_done(search_db, task)
            ran, exhausted = ran + now - done, now < planned  # the search found no more distinct candidates
            spare += max(0, planned - now) if exhausted else 0
            search_s += time.time() - t0
        if not timed[i]:
            record, info = None, {"verdict": "default kept: its default failed to build or run"}
        elif not planned:
            why = f"under {MIN_SHARE:.0%} of the run time" if shares[i] < MIN_SHARE else "no trials left in the budget"
            record, info = None, {"verdict": f"default kept: {why}"}
        else:
            record, info = _choose(task, tvm_target, search_db, builder, runner)
        if record is not None:
            workload = accepted_db.commit_workload(task.mod)
            accepted_db.commit_tuning_record(TuningRecord(record.trace, workload, record.run_secs, tvm_target,
                                                          ArgInfo.from_prim_func(task.mod["main"])))
        progress(f"{label}: {info['verdict']}"
                 + (f", {info['default_ms']:.3f} -> {info['tuned_ms']:.3f} ms" if "tuned_ms" in info else ""))
        rows.append({"kernel": task.name, "kind": task.spec["kind"] if task.spec else "float", "calls": task.calls,
                     "default_ms_untuned_timing": round(defaults[i] * 1e3, 4) if timed[i] else None,
                     "share": round(shares[i], 4), "planned": planned, "trials": _trials_done(search_db, task),
                     "exhausted": exhausted,
                     "search_seconds": round(time.time() - t0, 1), **info})
    shutil.rmtree(ms_logs, ignore_errors=True)
    minutes = (time.time() - t_start) / 60
    manifest = {
        "format": log_mod.FORMAT, "key": key, "tvm": tvm.__version__, "trials_budget": trials,
        "trials_this_run": ran, "minutes_this_run": round(minutes, 2),
        "search_minutes_this_run": round(search_s / 60, 2),
        "trials_per_minute": round(ran / (search_s / 60), 1) if ran else None,
        "where": "rpc" if rpc else "local", "kernels": rows,
        "accepted": sum(r["verdict"] == "accepted" for r in rows),
        "sha256": log_mod.accepted_hashes(output),
    }
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
    return {"output": output, **manifest}
