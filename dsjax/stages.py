"""The pipeline of `dsjax run --stages ...`: which stages run, from which checkpoint, into which folders.

    data_prep -> pretrain -> sft -> grpo -> export        (--stages all)
                 pretrain -> distill                     (distill: a student taught by --teacher)

Each training stage has its own run folders: `<run>` (pretrain), `<run>-sft`,
`<run>-grpo`, `<run>-distill`, under checkpoints/ and outputs/. SFT starts from
`<run>/final`, GRPO from `<run>-sft/final` (or, for the first post-training stage of the
list, from --start-from). A stage whose final/ already exists and that a later stage of
the list starts from is skipped with a message (its final/ is reused) unless
--overwrite, which moves its folders aside first. The list's last training stage keeps
the promise of a run name (dsjax.train.runs): a folder holding a run is refused unless
--resume (continue it) or --overwrite.
Everything here is decided from small files, before any tokenizing or compiling.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

from dsjax.config import Config
from dsjax.train import runs

FINAL = "final"  # = dsjax.train.checkpoint.FINAL, not imported: planning must not pay Orbax's import

STAGES = ("data_prep", "pretrain", "sft", "grpo", "distill", "export")
ALL_STAGES = ("data_prep", "pretrain", "sft", "grpo", "export")
TRAINING_STAGES = ("pretrain", "sft", "grpo", "distill")
RUN_SUFFIX = {"pretrain": "", "sft": "-sft", "grpo": "-grpo", "distill": "-distill"}
STARTS_FROM = {"sft": "pretrain", "grpo": "sft"}  # distill starts fresh (its teacher is --teacher)


class StageError(ValueError):
    """A stage list or plan that cannot run; found before any work."""


def parse_stages(text: str) -> list[str]:
    """Comma-separated stages in pipeline order; `all` = data_prep,pretrain,sft,grpo,export."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise StageError("--stages is empty; use e.g. data_prep,pretrain or all")
    if "all" in names:
        if len(names) > 1:
            raise StageError("--stages all already holds every stage; pass it alone")
        return list(ALL_STAGES)
    for name in names:
        if name not in STAGES:
            close = difflib.get_close_matches(name, (*STAGES, "all"), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise StageError(f"--stages: unknown stage '{name}'{hint} (stages: {', '.join(STAGES)}, or all)")
    if len(set(names)) != len(names):
        raise StageError(f"--stages: a stage is listed twice ({text})")
    ordered = sorted(names, key=STAGES.index)
    if names != ordered:
        raise StageError(f"--stages: stages run in pipeline order; write {','.join(ordered)}")
    if "distill" in names and ({"sft", "grpo"} & set(names)):
        raise StageError("--stages: distill trains a separate student; run it in its own `dsjax run` (e.g. --stages distill)")
    return names


def stage_run_name(run_name: str, stage: str) -> str:
    return run_name + RUN_SUFFIX[stage]


@dataclasses.dataclass
class StagePlan:
    stage: str
    run_name: str
    paths: runs.RunPaths
    action: str  # "run", "resume" or "skip"
    start_final: Path | None = None  # the checkpoint a post-training stage starts from
    to_move: list[Path] = dataclasses.field(default_factory=list)  # folders --overwrite moves aside first

    @property
    def final(self) -> Path:
        return self.paths.checkpoints / FINAL


def plan_stages(
    stages: list[str], config: Config, run_name: str, *, resume: bool, overwrite: bool, start_from: Path | None = None,
) -> list[StagePlan]:
    """One StagePlan per training stage of the list, in order; StageError/RunError before any work."""
    plans: list[StagePlan] = []
    produced: dict[str, Path] = {}  # stage -> the final/ it leaves (existing or to be written)
    first_post = next((s for s in stages if s in STARTS_FROM), None)
    last = [s for s in stages if s in TRAINING_STAGES][-1:] or [None]
    last = last[0]
    if start_from is not None and first_post is None:
        raise StageError("--start-from applies to sft or grpo; add one of them to --stages")
    for stage in stages:
        if stage not in TRAINING_STAGES:
            continue
        name = stage_run_name(run_name, stage)
        paths = runs.RunPaths.for_run(config, name)
        final = paths.checkpoints / FINAL
        start = None
        if stage in STARTS_FROM:
            start = _start_for(stage, first_post, start_from, produced, config, run_name)
        if final.is_dir() and not overwrite and stage != last:
            action, to_move = "skip", []  # a later stage of the list starts from it
        elif resume:
            action, to_move = "resume", []
        else:
            action, to_move = "run", runs.check_name_free(paths, name, overwrite)
        plans.append(StagePlan(stage, name, paths, action, start, to_move))
        produced[stage] = final
    return plans


def _start_for(stage, first_post, start_from, produced, config, run_name) -> Path:
    if stage == first_post and start_from is not None:
        start = Path(start_from)
    else:
        previous = STARTS_FROM[stage]
        start = produced.get(previous) or runs.RunPaths.for_run(config, stage_run_name(run_name, previous)).checkpoints / FINAL
        if previous not in produced and not start.is_dir():
            raise StageError(
                f"{stage} starts from {start}, which does not exist; add {previous} to --stages, "
                f"or pass --start-from a final/ folder"
            )
    if stage == first_post and start_from is not None:
        from dsjax.train.checkpoint import read_final_config

        read_final_config(start)  # a clear error now, not after the earlier stages
    return start


def describe(plans: list[StagePlan]) -> list[str]:
    """One line per training stage: what will happen, and where."""
    lines = []
    for p in plans:
        source = f" from {p.start_final}" if p.start_final is not None else ""
        if p.action == "skip":
            lines.append(f"{p.stage}: skipped, {p.final} exists (pass --overwrite to train it again)")
        elif p.action == "resume":  # continues its own checkpoints; the start final/ is only where it began
            began = f" (begun from {p.start_final})" if p.start_final is not None else ""
            lines.append(f"{p.stage}: resume {p.paths.checkpoints}{began}")
        else:
            lines.append(f"{p.stage}: train {p.paths.checkpoints}{source}")
    return lines


def export_source(stages: list[str], plans: list[StagePlan], config: Config, run_name: str) -> Path:
    """The final/ the EXPORT stage exports: the last trained stage's of this list, else the newest existing one."""
    if plans:
        return plans[-1].final
    for stage in ("grpo", "sft", "pretrain", "distill"):
        final = runs.RunPaths.for_run(config, stage_run_name(run_name, stage)).checkpoints / FINAL
        if final.is_dir():
            return final
    raise StageError(
        f"export: no final/ checkpoint of run '{run_name}' exists (looked in "
        f"{runs.RunPaths.for_run(config, run_name).checkpoints.parent}); train one first, or use `dsjax export --checkpoint`"
    )
