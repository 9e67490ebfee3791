"""The DISTILL stage: a fresh student learns from a trained teacher's soft targets on the pretraining data.

    loss = A * T^2 * KL(teacher_T || student_T) + (1 - A) * CE + balance + MTP   (per token, means)

T = distill.temperature, A = distill.alpha (Hinton et al.'s T^2 keeps the soft term's
gradient scale independent of T). The MTP and balance terms are pretraining's. The
teacher runs inside the same compiled step as an input that is not differentiated and
not in the optimizer state; its logits are made in token chunks beside the student's
(`loss.chunked_head_kl`), so [tokens, vocab] never exists whole for either model.

Teacher and student must share the tokenizer: the student trains on the data folder's
tokenizer (as pretraining would), and a teacher trained with another one is refused.
Everything else (outputs, checkpoints, resume, metrics plus `kl_loss`) is pretraining's
loop. On a mesh (dp/tp/ep/sp; not pp) the teacher is laid out like a model of its config,
and the KL is made over logits split as the mesh path's cross-entropy splits them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax

from dsjax.config import Config
from dsjax.data import layout
from dsjax.model import loss as losses
from dsjax.model.transformer import forward_hidden, head_kernel
from dsjax.train import checkpoint
from dsjax.train.metrics import METRIC_COLUMNS
from dsjax.train.loop import TrainingJob, run_tokenizer, run_training, story_data, story_eval_batches
from dsjax.train.runs import RunPaths
from dsjax.train.step import state_shardings_for

log = logging.getLogger(__name__)


class DistillError(ValueError):
    """A teacher this student cannot learn from (another tokenizer); found before training."""


def distill_objective(teacher_config: Config, temperature: float, alpha: float):
    """make_train_step's objective: the student's pretraining loss plus A * (T^2 * KL - CE); extras = (teacher_params,).

    A = 0 adds nothing: the loss is then exactly pretraining's.
    """
    tc = teacher_config.model

    def objective(config: Config, moe_impl: str = "auto", microbatches: int = 1):
        c = config.model

        def loss(params, window_BT1, extras):
            if alpha == 0.0:
                return losses.loss_fn(params, window_BT1, c, moe_impl=moe_impl, microbatches=microbatches)
            (teacher,) = extras
            teacher = jax.lax.stop_gradient(teacher)

            def kl_term(h_BTD, head_DV, inputs_BT, weight_BT, ce):
                teacher_h, _ = forward_hidden(teacher, inputs_BT, tc, with_mtp=False, moe_impl=moe_impl)
                # under a mesh the logits are split already (tokens over dp/sp, vocabulary over tp),
                # as the mesh path's cross-entropy keeps them: one chunk of every token
                on_mesh = not jax.sharding.get_abstract_mesh().empty
                kl = losses.chunked_head_kl(
                    h_BTD, params["norm"]["scale"], head_DV, teacher_h, teacher["norm"]["scale"],
                    head_kernel(teacher, tc), weight_BT, temperature, c, tc,
                    chunk_tokens=inputs_BT.size if on_mesh else None,
                ) / losses._weight_total(weight_BT)
                return alpha * temperature**2 * kl - alpha * ce, {"kl_loss": kl}

            return losses.loss_fn(
                params, window_BT1, c, moe_impl=moe_impl, microbatches=microbatches, extra_term=kl_term
            )

        return loss

    objective.foldable = True  # token means over equal microbatches, like pretraining's
    return objective


def check_same_tokenizer(student_tokenizer: Path, teacher_final: Path) -> None:
    teacher_tokenizer = Path(teacher_final) / "tokenizer.model"
    student, teacher = layout.file_digest(student_tokenizer), layout.file_digest(teacher_tokenizer)
    if student != teacher:
        raise DistillError(
            f"the teacher {teacher_final} was trained with tokenizer {teacher} but the student tokenizes with "
            f"{student} ({student_tokenizer}): teacher and student must share the tokenizer; train the student on "
            "the teacher's data folder and vocab_size (its --data-dir)"
        )


def distill(
    config: Config, run_name: str, teacher_final: Path, resume: bool = False, device_count: int | None = None,
    allow_data_change: bool = False,
) -> dict:
    """Train a fresh student (`config`'s model) from `teacher_final` into checkpoints/<run_name>."""
    t = config.training
    teacher_config = checkpoint.read_final_config(teacher_final)
    paths = RunPaths.for_run(config, run_name)
    data_dir = Path(t.data_dir)
    tokenizer = run_tokenizer(config, paths, resume)
    check_same_tokenizer(tokenizer.path, teacher_final)
    teacher_params, _, _ = checkpoint.load_final(teacher_final)
    data_iter, valid_split = story_data(config, tokenizer)
    log.info(
        "distill: student %s from teacher %s (T=%g, alpha=%g)",
        run_name, teacher_final, config.distill.temperature, config.distill.alpha,
    )
    job = TrainingJob(
        tokenizer=tokenizer,
        data_iter=data_iter,
        eval_batches=lambda: story_eval_batches(valid_split, config),
        data_record={
            **layout.fingerprints(data_dir),
            "tokenizer_sha256": layout.file_digest(tokenizer.path),
            "teacher": str(Path(teacher_final).absolute()),
        },
        objective=distill_objective(teacher_config, config.distill.temperature, config.distill.alpha),
        step_args=(teacher_params,),
        # on a mesh the teacher is split like a model of its config would be (experts over ep, heads over tp)
        step_args_shardings=lambda mesh: (state_shardings_for(teacher_config, mesh, stages=1).params,),
        stage="distill",
        title=f"dsjax {run_name} (distilled from {Path(teacher_final).parent.name})",
        metric_columns=[*METRIC_COLUMNS[:3], "kl_loss", *METRIC_COLUMNS[3:]],
    )
    return run_training(config, run_name, job, resume, device_count, allow_data_change)
