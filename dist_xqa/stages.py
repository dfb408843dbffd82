"""Safe reruns: what each stage of a run was made with, and what a rerun must redo.

A run's stages, each depending on the ones before it:

- teachers: phase 1's models (`teachers/<name>/` or `models/<name>/`), their checkpoints,
  and the run's logit store (`logits/`): the teachers' logits over D;
- distill: phase 2's student (`student/`), its checkpoints, its pacing files in `logits/`
  and self-distillation's teacher snapshots (`skd/`), with SKD's store (its teachers are
  the student's own generations);
- evaluate: the results (`eval/`).

`--redo distill` keeps the run's logit store when it still serves this run (the logits do not
depend on the student; the teachers' weights, dtype, top-k and placebo seed are checked
against its manifest, the features as it opens) and removes it otherwise, saying why.
`--redo store` drops it on its own: its rows are computed again as the student needs them.
A store shared through `distill.store_dir` is never removed by a rerun.

Each stage records the settings it depends on in `stages/<stage>.json` (flat dotted config
keys, and for distill the weight hash of every phase-1 model; not inside the model
directories, which a save replaces whole), written when the stage starts, so an
interrupted stage is protected as much as a finished one. A rerun in the same run
directory compares the records with its own settings before anything trains: a stage
made with other settings is either redone, with its dependants, because `--redo` names
it, or the run stops with the keys that differ and the command to redo.

What is recorded: a model depends on its training data (not the test sets: they are
scored, never trained on), the model, the strategy, the seed, how its best epoch is
selected on dev (eval.select_on_dev, n_best, max_answer_length) and its role's training
keys; the student also on the distillation and method keys and on the phase-1 models it
learns from. Keys that change how a run goes but not what it computes (run_dir, run.*,
checkpoint.*, plan.*, eval.batch_size, the logit store's look-ahead and disk keys) are not
recorded. The evaluation records only the decoding keys: changed or added test sets and
X-STA's inference keys are rescored by the evaluator itself (`_is_current` in
dist_xqa/eval/stage.py), without a redo.

`--redo` may also name one phase-1 model (teacher_en, or en as under teachers/): it alone
is removed and retrained, with every stage after phase 1. With a null
teacher/student.global_batch_size a step's rows follow the group sizes of the role plan,
so the training stages also record their effective batches (effective_batches), compared
once the plan is made (batch_change). The prepared data (prepared/) carries the
fingerprint of its own key selection, PREPARED_KEYS (fingerprint).

`phase1_from: <run>` borrows another run's finished phase-1 models as they are: the run
has no teachers stage, its distill record holds the borrowed models' weight hashes, and
check_phase1_from refuses a source made from other data, model or tokenizer settings
(PHASE1_FROM_KEYS) or with a model unfinished, before anything trains.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dist_xqa.config import ConfigError, RunConfig, load_config
from dist_xqa.files import read_json, write_json
from dist_xqa.jobs import STUDENT_STRATEGIES, phase1_dirs, store_options
from dist_xqa.layout import RunLayout
from dist_xqa.logits.manifest import Manifest, StoreMismatchError, hash_checkpoint, read_manifest
from dist_xqa.logits.progress import PACING_GLOBS
from dist_xqa.waiting import wait_for_run_files

log = logging.getLogger(__name__)

STAGES = ("teachers", "distill", "evaluate")  # in dependency order
STORE = "store"  # --redo store: drop the run's own logit store
NOT_TRAINED = "(not trained)"  # a phase-1 model the student learnt from that is gone
UNSET = "(unset)"

# Never recorded: they change how a run goes, not what it computes.
OPERATIONAL = ("name", "run_dir", "run", "checkpoint", "plan", "eval.batch_size", "distill.lookahead_shards",
               "distill.store_mode", "distill.disk_budget_gb", "distill.precompute")
TRAINED_FROM = ("data", "model", "strategy", "seed", "eval")
STAGE_KEYS = {
    "teachers": (TRAINED_FROM + ("teacher",), ("data.test", "strategy.xsta", "strategy.skd")),
    # X-STA's inference keys act at evaluation only; the evaluator rescores on them.
    "distill": (TRAINED_FROM + ("student", "distill"),
                ("data.test", "strategy.xsta.translate_test", "strategy.xsta.calibrate_at_inference")),
    "evaluate": (("eval.n_best", "eval.max_answer_length"), ()),
}
# What the prepared data (prepared/) is built from: the training stages' data, model,
# strategy and seed, without the test sets (prepared apart) and the methods' loss options.
PREPARED_KEYS = (("data", "model", "strategy", "seed"), ("data.test", "strategy.xsta", "strategy.skd"))


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def select(tree: dict[str, Any], wanted: tuple[str, ...], excluded: tuple[str, ...], prefix: str = "",
           inside: bool = False) -> dict[str, Any]:
    """The part of the nested mapping `tree` under the dotted keys `wanted` and not under
    `excluded`, nested as in `tree`; `inside`: `prefix` is itself wanted."""
    part = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if _under(dotted, excluded):
            continue
        keep = inside or _under(dotted, wanted)
        if isinstance(value, dict) and value and any(k.startswith(dotted + ".") for k in wanted + excluded):
            if chosen := select(value, wanted, excluded, dotted + ".", keep):
                part[key] = chosen
        elif keep:
            part[key] = value
    return part


def fingerprint(cfg: RunConfig, keys: tuple[tuple[str, ...], tuple[str, ...]]) -> str:
    """A short hash of the settings of `cfg` under `keys` ((wanted, excluded) dotted keys,
    as in STAGE_KEYS and PREPARED_KEYS): equal exactly when those settings are."""
    settings = select(dataclasses.asdict(cfg), *keys)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one mapping of dotted keys (lists stay values)."""
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def stage_names(cfg: RunConfig, phase1: list[str]) -> list[str]:
    """The stages a run of `cfg` has, `phase1` the names of its phase-1 models. A run with
    `phase1_from` has no teachers stage: its phase-1 models are another run's."""
    return [s for s in STAGES if (s != "teachers" or (phase1 and not cfg.phase1_from))
            and (s != "distill" or cfg.strategy.name in STUDENT_STRATEGIES)]


def stage_settings(cfg: RunConfig, stage: str, phase1_weights: dict[str, str] | None = None) -> dict[str, Any]:
    """The settings `stage` of a run of `cfg` depends on, as flat dotted keys; for
    distill, `phase1_weights` (phase-1 model name -> weight hash, or NOT_TRAINED) adds
    `weights.<name>`."""
    wanted, excluded = STAGE_KEYS[stage]
    settings = flatten(select(dataclasses.asdict(cfg), wanted, excluded + OPERATIONAL))
    if stage == "distill":
        settings.update({f"weights.{name}": h for name, h in (phase1_weights or {}).items()})
    return settings


def diff(recorded: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, recorded value, current value) of every key that differs, sorted by key."""
    return [(k, recorded.get(k, UNSET), current.get(k, UNSET)) for k in sorted(recorded.keys() | current.keys())
            if recorded.get(k, UNSET) != current.get(k, UNSET)]


def with_dependants(stages: set[str] | list[str]) -> list[str]:
    """`stages` and every stage after them, in order (each stage depends on the earlier ones)."""
    first = min((STAGES.index(s) for s in stages), default=len(STAGES))
    return list(STAGES[first:])


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text  # a hash


def decide(recorded: dict[str, dict | None], current: dict[str, dict], redo: set[str],
           outputs: dict[str, list[str]], hidden: tuple[str, ...] = ()) -> tuple[list[str], str | None]:
    """What a rerun does: (the stages to remove and redo, in order; the refusal message, or
    None). `recorded`: each stage's record (None: none yet); `current`: the settings this
    run would record; `redo`: the stages `--redo` names; `outputs`: what each stage
    produced, for the message, less those under the prefixes `hidden` (what a user does
    not look for). A stage whose record differs must be redone, by `--redo` naming it or a
    stage it depends on."""
    to_redo = with_dependants(redo) if redo else []
    changed = {s: diff(recorded[s], current[s]) for s in current if recorded.get(s) is not None}
    unresolved = [s for s, d in changed.items() if d and s not in to_redo]
    if not unresolved:
        return [s for s in to_redo if s in current], None
    lines = [f"  {s}: {k}: {_show(old)} -> {_show(new)}" for s in unresolved for k, old, new in changed[s]]
    first = min(set(redo) | {unresolved[0]}, key=STAGES.index)
    removed = [path for s in with_dependants([first]) if s in current for path in outputs[s]
               if not path.startswith(hidden)]
    return [], ("this run directory holds stages made with other settings:\n" + "\n".join(lines) + "\n"
                f"Rerun the same command with --redo {first} to remove {', '.join(removed)} and redo "
                "them, or restore the settings above.")


# --------------------------------------------------------------------------- files (rank 0)


def _phase1(cfg: RunConfig) -> dict[str, Path]:
    """Phase-1 model name -> its output directory."""
    return phase1_dirs(cfg)


def _phase1_roles(cfg: RunConfig) -> list[str]:
    """The phase-1 models' role names (teacher_<name>, model_<name>): their checkpoint
    directories and heartbeats."""
    return [RunLayout.model_name(d) for d in _phase1(cfg).values()]


def record_path(cfg: RunConfig, stage: str) -> Path:
    return RunLayout(cfg.run_path).stage_record(stage)


def model_outputs(cfg: RunConfig) -> dict[str, list[str]]:
    """What training each phase-1 model produces, by its role name, as paths (globs)
    relative to the run directory: the model, its checkpoints, heartbeats and TensorBoard log."""
    layout = RunLayout(cfg.run_path)
    return {layout.model_name(d): layout.model_outputs(d) for d in _phase1(cfg).values()}


def stage_outputs(cfg: RunConfig, stage: str) -> list[str]:
    """What `stage` produces, as paths (globs) relative to the run directory, its record last."""
    layout = RunLayout(cfg.run_path)
    store = layout.relative(layout.store)
    if stage == "teachers":  # the models first, then their checkpoints..., then their logits
        made = [path for kind in zip(*sorted(model_outputs(cfg).values())) for path in kind] + [store]
    elif stage == "distill":
        made = layout.distill_outputs() + _pacing_outputs(layout) + ([store] if cfg.strategy.name == "skd" else [])
    else:
        made = layout.eval_outputs()
    return made + [str(layout.stage_record(stage).relative_to(layout.root))]


def _pacing_outputs(layout: RunLayout) -> list[str]:
    """The student's progress and its producers' heartbeats (dist_xqa.logits.progress)."""
    return [f"{layout.relative(layout.stream)}{name}" for name in PACING_GLOBS]


def _hidden(layout: RunLayout) -> tuple[str, ...]:
    return layout.stage_outputs_hidden() + tuple(_pacing_outputs(layout))


def store_differences(cfg: RunConfig, weights: dict[str, str]) -> list[str]:
    """Why the run's own logit store (at its default place) would not serve this run: the
    parts of its manifest's key that this run's phase-1 models (`weights`: phase1_weights)
    and config give otherwise (teachers' weights, dtype, top-k, placebo seed); [] when they
    match or there is no store. The features and tokenizer come from the prepared data:
    checked as it opens."""
    try:
        found = read_manifest(RunLayout(cfg.run_path).store)
    except StoreMismatchError as e:
        return [str(e)]
    if found is None:
        return []
    expected = Manifest(found.features_hash, found.tokenizer, weights, found.shard_size, found.seed,
                        generation=found.generation, **store_options(cfg))
    return expected.differences(found)


def _store_to_drop(cfg: RunConfig, asked: bool, to_redo: list[str], models: list[str],
                   weights: Callable[[], dict[str, str]]) -> str | None:
    """Why the run's own logit store goes with this rerun (None: it stays): asked for,
    its teachers retrained, or no longer matching this run's student (`weights`: the
    phase-1 weight hashes, hashed once a run). Stages whose outputs hold it (teachers;
    distill for SKD) remove it themselves."""
    if asked:
        if cfg.distill.store_dir:
            raise ConfigError(f"--redo {STORE}: this run's logits are in distill.store_dir {cfg.distill.store_dir}, "
                              "which runs share; remove it yourself once no run reads it")
        return f"--redo {STORE}"
    if "teachers" in to_redo or cfg.distill.store_dir or cfg.strategy.name == "skd":
        return None
    if models:
        return f"its logits are those of {', '.join(models)}, retrained now"
    if "distill" in to_redo and (differences := store_differences(cfg, weights())):
        return "it does not match this run: " + "; ".join(differences)
    return None


def phase1_weights(cfg: RunConfig) -> dict[str, str]:
    """Weight hash of each finished phase-1 model (NOT_TRAINED for the others)."""
    return {name: hash_checkpoint(d) if RunLayout.done(d).exists() else NOT_TRAINED
            for name, d in _phase1(cfg).items()}


def redo_targets(cfg: RunConfig, names: set[str]) -> tuple[set[str], list[str]]:
    """(stages, phase-1 models by role name) that `--redo names` names: a stage, or one
    phase-1 model by its role name (teacher_<lang>, model_<name>) or its directory name
    under teachers/ or models/ (and `store`, which check_rerun reads); ConfigError listing
    the valid names for any other."""
    # role name -> directory name; another run's models (phase1_from) are not this run's to redo
    roles = {} if cfg.phase1_from else dict(zip(_phase1_roles(cfg), _phase1(cfg)))
    models = {**{name: role for role, name in roles.items()}, **{role: role for role in roles}}
    unknown = sorted(n for n in names if n not in STAGES and n not in models and n != STORE)
    if unknown:
        choices = f"a stage ({', '.join(STAGES)}), {STORE} (the run's logit store)"
        if roles:
            choices += (f" or a phase-1 model ({', '.join(roles)}, or by its directory: "
                        f"{', '.join(str(d.relative_to(cfg.run_path)) for d in _phase1(cfg).values())})")
        raise ConfigError(f"--redo {', '.join(unknown)}: not a stage or model of this run; choose {choices}")
    return {n for n in names if n in STAGES}, sorted({models[n] for n in names if n not in STAGES and n != STORE})


def check_rerun(cfg: RunConfig, redo: set[str]) -> None:
    """Rank 0, before data preparation: refuses (ConfigError) a rerun whose settings differ
    from a stage's record, unless `redo` covers that stage; removes what the stages to
    redo produced. A stale `prepared/` goes with the first training stage redone (built from the
    data and model settings the training stages record). `redo` may name phase-1 models
    (redo_targets): each is removed and retrained alone, and every stage after the
    teachers is redone (the student learns from every teacher; the evaluation scores
    every model); the teachers' record stays, so a changed teacher key still needs
    `--redo teachers`."""
    redo_stages, models = redo_targets(cfg, redo)
    drop_store = STORE in redo
    check_phase1_from(cfg)
    names = stage_names(cfg, list(_phase1(cfg)))
    weights = functools.cache(lambda: phase1_weights(cfg))  # reads every phase-1 model's weights: once
    recorded = {s: _config_settings((read_json(record_path(cfg, s)) or {}).get("settings")) for s in names}
    current = {s: stage_settings(cfg, s, weights() if s == "distill" and recorded[s] else None) for s in names}
    recorded = {s: _with_later_defaults(recorded[s], stage_settings(RunConfig(), s)) for s in names}
    outputs = {s: stage_outputs(cfg, s) for s in names}
    after_teachers = {STAGES[STAGES.index("teachers") + 1]} if models else set()
    layout = RunLayout(cfg.run_path)
    to_redo, refusal = decide(recorded, current, redo_stages | after_teachers, outputs, _hidden(layout))
    if refusal:
        raise ConfigError(f"{cfg.run_path}: {refusal}")
    redone_models = {} if "teachers" in to_redo else {role: model_outputs(cfg)[role] for role in models}
    removals = [*redone_models.items(), *((stage, outputs[stage]) for stage in to_redo)]
    if why := _store_to_drop(cfg, drop_store, to_redo, models, weights):
        removals.append((f"{STORE} ({why})", [layout.relative(layout.store)]))
    elif "distill" in to_redo and layout.store.exists() and not cfg.distill.store_dir:
        log.info("--redo distill: the logit store %s is kept: its logits do not depend on the student "
                 "(--redo %s drops it)", layout.store, STORE)
    for what, patterns in removals:
        removed = [p for pattern in patterns for p in sorted(cfg.run_path.glob(pattern.rstrip("/")))]
        if to_redo and what == to_redo[0] and what != "evaluate" and _prepared_is_stale(cfg):
            removed.append(layout.prepared)
        for path in removed:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        log.info("--redo %s: removed from %s: %s", what, cfg.run_path,
                 ", ".join(str(p.relative_to(cfg.run_path)) for p in removed) or "nothing (not run yet)")


# What a borrowed phase-1 model (phase1_from) was trained on and tokenizes with: the
# training data (not the test sets, which are only scored), the model and tokenizer
# settings, and which branches the teachers were trained on; the demo corpus is drawn
# from the seed, so there the seed is data too.
PHASE1_FROM_KEYS = (("data", "model", "strategy.add_english", "strategy.teacher_data"), ("data.test",))
DEMO_DATA_KEYS = ("seed",)


def check_phase1_from(cfg: RunConfig) -> None:
    """Rank 0, before data preparation: with `phase1_from`, refuses (ConfigError) a source
    run that has no config, whose data, model or tokenizer settings differ from this
    run's (naming each key), or that has not finished a model this run borrows."""
    if not cfg.phase1_from:
        return
    source = RunLayout(cfg.phase1_from)
    where = f"phase1_from {source.root}"
    if not source.config_file.exists():
        raise ConfigError(f"{where}: no {source.config_file.name} there: not a run directory of dist_xqa/train.py")
    keys = (PHASE1_FROM_KEYS[0] + (DEMO_DATA_KEYS if cfg.data.source == "demo" else ()), PHASE1_FROM_KEYS[1])
    theirs = flatten(select(dataclasses.asdict(load_config(source.config_file)), *keys))
    ours = flatten(select(dataclasses.asdict(cfg), *keys))
    if changed := diff(theirs, ours):
        lines = "\n".join(f"  {k}: {_show(old)} (there) != {_show(new)} (here)" for k, old, new in changed)
        raise ConfigError(f"{where}: its phase-1 models were made with other settings than this run's:\n{lines}\n"
                          "Borrowed models must see the same data and tokens as this run's student.")
    unfinished = [str(d) for d in _phase1(cfg).values() if not RunLayout.done(d).exists()]
    if unfinished:
        raise ConfigError(f"{where}: phase-1 model(s) not finished there (no {RunLayout.done(Path()).name}): "
                          f"{', '.join(unfinished)}; finish that run first, or leave phase1_from null")


def _prepared_is_stale(cfg: RunConfig) -> bool:
    info = read_json(RunLayout(cfg.run_path).prepared_info)
    return info is not None and info["fingerprint"] != fingerprint(cfg, PREPARED_KEYS)


def record(cfg: RunConfig, stage: str, batches: dict[str, int] | None = None) -> None:
    """Rank 0, as `stage` starts: writes its record unless it has one (check_rerun found
    it matching). The student's holds the phase-1 models' hashes, so call it for distill
    once they are finished (wait_for_phase1). `batches`: the stage's effective batches
    (effective_batches)."""
    path = record_path(cfg, stage)
    if path.exists() or stage not in stage_names(cfg, list(_phase1(cfg))):
        return
    made = [p for pattern in stage_outputs(cfg, stage)[:1] for p in cfg.run_path.glob(pattern.rstrip("/"))]
    if made:
        log.warning("%s has no record of its settings (made before records were kept): "
                    "taking this run's settings as its own", made[0])
    settings = stage_settings(cfg, stage, phase1_weights(cfg) if stage == "distill" else None)
    write_json(path, {"stage": stage, "settings": {**settings, **_batch_settings(stage, batches or {})}})


# --------------------------------------------------------------------------- effective batches

BATCH_ROLES = {"teachers": "teacher", "distill": "student"}  # the config section of each stage's batch
EFFECTIVE = " (null: rows per step of "  # marks the recorded effective batches among a record's keys


def effective_batches(cfg: RunConfig, plan, student: bool) -> dict[str, dict[str, int]]:
    """Per stage, the rows of one optimizer step of each training group of the role plan
    `plan` whose role has no global batch (teacher.global_batch_size /
    student.global_batch_size null): micro_batch_size x grad_accum x the group's ranks,
    which a different number of ranks changes. `student`: whether the run trains a
    student. Recorded with the stage (record) and compared by batch_change."""
    roles = [("teachers", cfg.teacher, [group for round_ in plan.teacher_rounds for group in round_])]
    if student:
        roles.append(("distill", cfg.student, [plan.student]))
    return {stage: {group.name: train.micro_batch_size * train.grad_accum * group.size for group in groups}
            for stage, train, groups in roles if train.global_batch_size is None and groups}


def _with_later_defaults(recorded: dict | None, defaults: dict[str, Any]) -> dict | None:
    """A record with the keys added to the config since it was written, at their defaults:
    a key is added with a default that computes what the code before it computed, so a
    stage made then was made with the default. A rerun that sets such a key to another
    value still differs from the record. A default on the path of a recorded key is no
    later key: a mapping-valued key that defaults to null (data.train.split) is recorded
    as its entries when set, and as itself when null."""
    if recorded is None:
        return None
    recorded_paths = {k + "." for k in recorded}
    later = {k: v for k, v in defaults.items() if not k.startswith("weights.") and k not in recorded
             and not any(r.startswith(k + ".") or k.startswith(r) for r in recorded_paths)}
    return {**later, **recorded}


def _config_settings(recorded: dict | None) -> dict | None:
    """A record's settings without its effective batches: those need the role plan, which
    is made after check_rerun (batch_change compares them)."""
    return None if recorded is None else {k: v for k, v in recorded.items() if EFFECTIVE not in k}


def _batch_settings(stage: str, batches: dict[str, int]) -> dict[str, int]:
    return {f"{BATCH_ROLES[stage]}.global_batch_size{EFFECTIVE}{group})": rows for group, rows in batches.items()}


def _stage_finished(cfg: RunConfig, stage: str) -> bool:
    models = list(_phase1(cfg).values()) if stage == "teachers" else [RunLayout(cfg.run_path).student]
    return all(RunLayout.done(d).exists() for d in models)


def batch_change(cfg: RunConfig, batches: dict[str, dict[str, int]]) -> str | None:
    """Rank 0, once the role plan is known: why this run's effective batches
    (effective_batches) differ from those an unfinished stage was recorded with (a rerun
    on another number of ranks), naming the keys and the --redo, as check_rerun does; None
    when they match. A finished stage trains no more, and a record written before
    effective batches were recorded has none to compare."""
    names = stage_names(cfg, list(_phase1(cfg)))
    recorded: dict[str, dict | None] = {s: None for s in names}
    current: dict[str, dict] = {s: {} for s in names}
    for stage, groups in batches.items():
        made = {k: v for k, v in ((read_json(record_path(cfg, stage)) or {}).get("settings") or {}).items()
                if EFFECTIVE in k}
        if made and not _stage_finished(cfg, stage):
            recorded[stage], current[stage] = made, _batch_settings(stage, groups)
    _, refusal = decide(recorded, current, set(), {s: stage_outputs(cfg, s) for s in names},
                        _hidden(RunLayout(cfg.run_path)))
    return refusal and (f"{cfg.run_path}: {refusal}\nWith a null global_batch_size a step's rows change with "
                        "the number of ranks: set teacher/student.global_batch_size to keep them on any.")


def wait_for_phase1(cfg: RunConfig) -> None:
    """Blocks until every phase-1 model is saved, as long as the run's roles beat."""
    wait_for_run_files(cfg.run_path, [RunLayout.done(d) for d in _phase1(cfg).values()], cfg.run.stall_timeout_s,
                       "phase 2 waiting for the phase-1 models", expected=_phase1_roles(cfg))
