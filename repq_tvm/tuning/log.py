"""A tuning log folder (`tuning_logs/<model>-<bits>-<target>/`) and how `compile --tuning-log` applies it.

    tuning.json                   what was tuned: model, bit widths, batch, target preset, every kernel's
                                  default and tuned time, trials, the verdict, the accepted files' SHA-256
    database_workload.json        MetaSchedule's JSON database of the *accepted* kernels only: one record
    database_tuning_record.json   per kernel that beat its hand default and matched its definition
    search/                       MetaSchedule's database of every trial (a re-run of `tune` resumes from it)

The accepted database is what TVM users know (`ms.database.JSONDatabase`); compile looks each kernel's
definition up in it (by `tasks.group_key`: kernels equal up to their float constants share a schedule)
and applies the tuned schedule's trace to it, leaving the others on their defaults.  A log made for another model, bit width, batch or target is refused, and so is one whose
accepted files changed since tuning (hash in `tuning.json`): a kernel that was not verified never
reaches an artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import tvm
from tvm.s_tir.meta_schedule.database import JSONDatabase

from ..deploy.artifact import sha256
from ..errors import ReqError
from tvm.s_tir import Schedule

from .tasks import definition_of, group_key, tunable

MANIFEST = "tuning.json"
ACCEPTED = ("database_workload.json", "database_tuning_record.json")
SEARCH = "search"
FORMAT = 1


def accepted_hashes(log_dir: str) -> dict[str, str]:
    return {name: sha256(os.path.join(log_dir, name)) for name in ACCEPTED}


def open_accepted(log_dir: str) -> JSONDatabase:
    """The accepted-kernel database (created empty if missing)."""
    return open_database(os.path.join(log_dir, ACCEPTED[0]), os.path.join(log_dir, ACCEPTED[1]))


def open_database(workloads: str, records: str) -> JSONDatabase:
    """A MetaSchedule JSON database (created empty if missing).  Its traces name our tensor intrinsics, which must
    be registered before MetaSchedule parses them: the fixed ones, and those made on first use whose names the
    records hold (`intrinsics_x86.register_named`: the VNNI dot product with its weight prefetch)."""
    from ..kernels.intrinsics_arm import register_intrinsics as register_arm
    from ..kernels.intrinsics_x86 import register_intrinsics, register_named

    register_intrinsics()
    register_arm()
    if os.path.exists(records):
        with open(records) as f:
            for name in set(re.findall(r'"(repq_[A-Za-z0-9_]+)"', f.read())):
                register_named(name)
    return JSONDatabase(path_workload=workloads, path_tuning_record=records, allow_missing=True)


def workload_key(model: str, w_bits: int, a_bits: int, batch: int, preset: dict) -> dict:
    """What a log is valid for."""
    return {"model": model, "w_bits": int(w_bits), "a_bits": int(a_bits), "batch": int(batch),
            "target": preset["name"], "tvm_target": preset["tvm_target"]}


def default_name(key: dict) -> str:
    return f"{key['model']}-w{key['w_bits']}a{key['a_bits']}-b{key['batch']}-{key['target']}"


class TuningLog:
    """A checked tuning log folder; `apply` swaps its accepted kernels into a lowered module."""

    def __init__(self, log_dir: str, manifest: dict):
        self.dir, self.manifest = log_dir, manifest

    @classmethod
    def open(cls, log_dir: str, expected: dict | None = None, check_hashes: bool = True) -> TuningLog:
        """Read and check ``log_dir``; ``expected`` (`workload_key`) must match what it was tuned for;
        ``check_hashes`` False skips the accepted files (`tune` rewrites them when it resumes)."""
        path = os.path.join(log_dir, MANIFEST)
        if not os.path.isdir(log_dir):
            raise ReqError(f"tuning log {log_dir} is not a folder")
        try:
            with open(path) as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise ReqError(f"tuning log {log_dir} has no {MANIFEST} (not made by `repq-tvm tune`?)") from None
        except (OSError, ValueError) as exc:
            raise ReqError(f"tuning log {path} is unreadable or not JSON: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "key" not in manifest:
            raise ReqError(f"tuning log {path} is not a format-{FORMAT} repq-tvm tuning manifest")
        for name in ACCEPTED if check_hashes else ():
            if not os.path.isfile(os.path.join(log_dir, name)):
                raise ReqError(f"tuning log {log_dir} lacks {name}")
        if check_hashes and accepted_hashes(log_dir) != manifest.get("sha256"):
            raise ReqError(f"tuning log {log_dir}: the accepted kernel database changed since tuning "
                           "(SHA-256 differs from tuning.json); re-run `repq-tvm tune`")
        log = cls(log_dir, manifest)
        if expected is not None:
            log.check(expected)
        return log

    def check(self, expected: dict) -> None:
        key = self.manifest["key"]
        for field in ("model", "w_bits", "a_bits", "batch", "target"):
            if key.get(field) != expected[field]:
                raise ReqError(f"tuning log {self.dir} was made for {field} {key.get(field)!r}, "
                               f"this compile is for {expected[field]!r}")
        if key.get("tvm_target") != expected["tvm_target"]:
            raise ReqError(f"tuning log {self.dir} was made for another TVM target of preset {expected['target']} "
                           f"({key.get('tvm_target')} vs {expected['tvm_target']})")

    @property
    def sha256(self) -> str:
        """One hash for the accepted kernels (what the artifact manifest records)."""
        return hashlib.sha256(json.dumps(self.manifest["sha256"], sort_keys=True).encode()).hexdigest()

    def apply(self, mod: tvm.IRModule, target: tvm.target.Target) -> tuple[tvm.IRModule, list[str]]:
        """``mod`` with every kernel found in the accepted database on its tuned schedule; the names swapped."""
        traces = {group_key(r.workload.mod): r.trace for r in open_accepted(self.dir).get_all_tuning_records()}
        out, swapped = mod.clone(), []
        for gv, func in mod.functions.items():
            if not isinstance(func, tvm.tirx.PrimFunc) or not tunable(func):
                continue
            definition = definition_of(func)
            trace = traces.get(group_key(definition))
            if trace is None:
                continue
            sch = Schedule(definition)
            trace.apply_to_schedule(sch, remove_postproc=False)
            tuned = sch.mod["main"].without_attr("global_symbol").with_attr("tirx.is_scheduled", True)
            if func.attrs is not None and "global_symbol" in func.attrs:
                tuned = tuned.with_attr("global_symbol", func.attrs["global_symbol"])
            out.update_func(gv, tuned)
            swapped.append(gv.name_hint)
        return out, swapped
