"""Bad inputs through the CLI entry point: one error line, a documented exit code, no traceback, nothing changed.

Every case runs `dsjax.cli.main(argv)` in-process inside one prepared folder (data
folders good and bad, configs, a trained micro run and damaged copies of its
final/), and checks:

- the exit code is the documented one (never 0);
- stderr holds exactly one error line, naming the problem (and nothing else when the
  error comes before any work), and no traceback;
- every file in the folder is byte-identical afterwards, and no file appeared (the
  one case that fails after tokenizing may add files to its own scratch work folder).

Errors come before compilation, so the table is fast; the only compiles are the
micro run the fixture trains once, and the one resume that is meant to succeed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dsjax.cli import main

REPO = Path(__file__).resolve().parent.parent
DSJAX = str(Path(sys.executable).parent / "dsjax")  # the console script beside this interpreter

# a micro model (MLA, a dense and a MoE layer): compiles in seconds
MICRO = {
    "model": {
        "vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "moe_intermediate_size": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 4, "max_position_embeddings": 128,
        "num_nextn_predict_layers": 0,  # no MTP: halves the compile, and no case needs it
    },
    "training": {
        "batch_size": 4, "seq_len": 32, "max_steps": 2, "log_interval": 1, "eval_interval": 2,
        "checkpoint_interval": 1, "eval_batches": 1, "warmup_steps": 1,
    },
}


def write_jsonl(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def stories(path: Path, n: int | None = None) -> list[str]:
    return path.read_text().splitlines()[:n]


def copy_run(root: Path, name: str, new: str) -> None:
    for base in ("ck", "out"):
        shutil.copytree(root / base / name, root / base / new)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tinystories_dir):
    """The folder every case runs in (as the working directory): inputs good and bad, and one trained micro run."""
    root = tmp_path_factory.mktemp("bad_inputs")
    train, valid = tinystories_dir / "train/stories.jsonl", tinystories_dir / "valid/stories.jsonl"
    shutil.copytree(tinystories_dir, root / "data_ok")
    write_jsonl(root / "other/train/stories.jsonl", stories(train, 150))
    write_jsonl(root / "other/valid/stories.jsonl", stories(valid, 50))
    write_jsonl(root / "only_train/train/stories.jsonl", stories(train, 20))
    write_jsonl(root / "empty_train/train/stories.jsonl", [])
    write_jsonl(root / "empty_train/valid/stories.jsonl", stories(valid, 20))
    write_jsonl(root / "blank_texts/train/stories.jsonl", ['{"text": ""}', '{"text": "   "}'])
    write_jsonl(root / "blank_texts/valid/stories.jsonl", stories(valid, 20))
    write_jsonl(root / "garbage/train/stories.jsonl", ["id,story", "1,Once upon a time"])
    write_jsonl(root / "garbage/valid/stories.jsonl", stories(valid, 20))
    write_jsonl(root / "empty_valid/train/stories.jsonl", stories(train, 20))
    write_jsonl(root / "empty_valid/valid/stories.jsonl", [])
    write_jsonl(root / "tiny_valid/train/stories.jsonl", stories(train))
    write_jsonl(root / "tiny_valid/valid/stories.jsonl", ['{"text": "Hi."}'])
    (root / "a_file").write_text("not a folder\n")
    (root / "data/stories/train").mkdir(parents=True)  # a half-present default data folder
    write_jsonl(root / "data/stories/train/stories.jsonl", stories(train, 5))

    (root / "micro.json").write_text(json.dumps(MICRO))
    (root / "micro_wide.json").write_text(json.dumps({**MICRO, "model": {**MICRO["model"], "hidden_size": 64}}))
    (root / "micro_grpo.json").write_text(json.dumps({**MICRO, "grpo": {"max_new_tokens": 16, "prompts_per_step": 3}}))
    (root / "malformed.json").write_text('{"model": {"hidden_size": 32,}')
    (root / "unknown_key.json").write_text('{"model": {"num_hiden_layers": 2}}')
    (root / "wrong_type.json").write_text('{"model": {"hidden_size": "big"}}')
    (root / "not_object.json").write_text("[1, 2, 3]")
    (root / "nan.json").write_text('{"training": {"learning_rate": NaN}}')
    (root / "one_story.txt").write_text("Just one story.\n<|endoftext|>\n")
    (root / "stories.csv").write_text("id,text\n1,hello\n")
    (root / "no_splits").mkdir()
    (root / "no_splits/notes.txt").write_text("nothing here\n")
    (root / "empty").mkdir()

    code = main([*run_args(root, "trained"), "--data-dir", str(root / "data_ok")])
    assert code == 0, "the fixture's micro run failed"
    final = root / "ck/trained/final"
    for name in ("broken_params", "bad_json", "bad_config", "no_tokenizer", "bad_tokenizer"):
        shutil.copytree(final, root / "ck" / name / "final")
    params = [f for f in (root / "ck/broken_params/final/params").rglob("*") if f.is_file()]
    biggest = max(params, key=lambda f: f.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    (root / "ck/bad_json/final/config.json").write_text('{"model": {"vocab_size": 512,')
    config = json.loads((final / "config.json").read_text())
    config["model"]["hidden_sise"] = config["model"].pop("hidden_size")
    (root / "ck/bad_config/final/config.json").write_text(json.dumps(config))
    (root / "ck/no_tokenizer/final/tokenizer.model").unlink()
    (root / "ck/bad_tokenizer/final/tokenizer.model").write_bytes(b"\x00garbage" * 100)
    # a run with a final/ but no step checkpoint, and outputs to lose
    (root / "ck/final_only").mkdir()
    shutil.copytree(final, root / "ck/final_only/final")
    shutil.copytree(root / "out/trained", root / "out/final_only")
    return root


def run_args(root: Path, run_name: str, config: str = "micro.json") -> list[str]:
    return [
        "run", "--config", str(root / config), "--work-dir", str(root / "work"), "--checkpoint-dir", str(root / "ck"),
        "--output-dir", str(root / "out"), "--run-name", run_name, "--gpus", "1",
    ]


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


@dataclass(frozen=True)
class Case:
    name: str
    argv: str  # shell words; {root} is the prepared folder, {RUN} a fresh micro run there
    code: int
    message: str  # a regular expression the error line must match
    after_work: bool = False  # fails after tokenizing: other log lines may precede the error
    cwd: str = ""  # a folder under the prepared one to run in (default: the prepared folder)

    def args(self, root: Path) -> list[str]:
        run = " ".join(shlex.quote(a) for a in run_args(root, "fresh"))
        return shlex.split(self.argv.replace("{RUN}", run).replace("{root}", str(root)))


D = "--data-dir {root}/data_ok"
GEN = "generate --max-new-tokens 4 --checkpoint {root}/ck/trained/final"
CASES = [
    # --- configs and training flags
    Case("config file missing", f"{{RUN}} {D} --config {{root}}/nope.json", 2, r"config file not found: .*nope\.json"),
    Case("config file is a folder", f"{{RUN}} {D} --config {{root}}/data_ok", 2, r"config file .*data_ok is a folder; give a JSON file"),
    Case("config not JSON", f"{{RUN}} {D} --config {{root}}/malformed.json", 2, r"malformed\.json: not valid JSON"),
    Case("config unknown key", f"{{RUN}} {D} --config {{root}}/unknown_key.json", 2, r"did you mean 'num_hidden_layers'"),
    Case("config wrong type", f"{{RUN}} {D} --config {{root}}/wrong_type.json", 2, r"model\.hidden_size: expected an integer"),
    Case("config not an object", f"{{RUN}} {D} --config {{root}}/not_object.json", 2, r"expected a JSON object"),
    Case("config NaN", f"{{RUN}} {D} --config {{root}}/nan.json", 2, r"training\.learning_rate: must be a finite number"),
    Case("learning rate nan", f"{{RUN}} {D} --learning-rate nan", 2, r"--learning-rate: must be a finite number"),
    Case("learning rate inf", f"{{RUN}} {D} --learning-rate inf", 2, r"--learning-rate: must be a finite number"),
    Case("learning rate negative", f"{{RUN}} {D} --learning-rate -1", 2, r"training\.learning_rate: must be > 0"),
    Case("max steps 0", f"{{RUN}} {D} --max-steps 0", 2, r"training\.max_steps: must be > 0, got 0"),
    Case("batch size negative", f"{{RUN}} {D} --batch-size -4", 2, r"training\.batch_size: must be > 0"),
    Case("grad accum 0", f"{{RUN}} {D} --grad-accum 0", 2, r"gradient_accumulation_steps: must be > 0"),
    Case("seq len too long", f"{{RUN}} {D} --seq-len 4096", 2, r"seq_len: 4096 exceeds model\.max_position_embeddings"),
    Case("eval batches negative", f"{{RUN}} {D} --eval-batches -1", 2, r"training\.eval_batches: must be >= 0"),
    Case("max steps not a number", f"{{RUN}} {D} --max-steps ten", 2, r"--max-steps: invalid int value: 'ten'"),
    Case("unknown model size", f"{{RUN}} {D} --model-size huge", 2, r"--model-size: invalid choice: 'huge'"),
    Case("unknown flag", f"{{RUN}} {D} --bogus", 2, r"unrecognized arguments: --bogus \(see dsjax run --help\)"),
    Case("misspelled flag", f"{{RUN}} {D} --max-step 10", 2,
         r"^dsjax run: error: unrecognized arguments: --max-step 10; did you mean --max-steps\? \(see dsjax run --help\)$"),
    Case("misspelled required flag", "export --checkpoint {root}/ck/trained/final --fromat gguf --out {root}/m.gguf", 2,
         r"^dsjax export: error: unrecognized arguments: --fromat; did you mean --format\? \(see dsjax export --help\)$"),
    Case("stage misspelt", f"{{RUN}} {D} --stages pretrian", 2, r"unknown stage 'pretrian'; did you mean 'pretrain'"),
    Case("sft without a pretrained model", f"{{RUN}} {D} --stages sft", 2,
         r"sft starts from .*ck/fresh/final, which does not exist; add pretrain to --stages, or pass --start-from"),
    Case("stages out of order", f"{{RUN}} {D} --stages grpo,sft", 2, r"stages run in pipeline order; write sft,grpo"),
    Case("start-from not a checkpoint", f"{{RUN}} {D} --stages sft --start-from {{root}}/data_ok", 4,
         r"data_ok is not a dsjax final/ checkpoint"),
    Case("distill without a teacher", f"{{RUN}} {D} --stages distill", 2, r"the distill stage needs --teacher"),
    Case("grpo on pipeline stages", f"{{RUN}} {D} --stages grpo --start-from {{root}}/ck/trained/final --gpus 2 --pp-size 2",
         2, r"the grpo stage runs on dp/tp/ep/sp meshes, not pipeline stages \(pp_size=2\); drop --pp-size"),
    Case("grpo rows over dp", f"{{RUN}} {D} --stages grpo --start-from {{root}}/ck/trained/final --gpus 2 --dp-size 2 "
         "--group-size 3 --config {root}/micro_grpo.json", 2, r"grpo: a step's 3 prompts x 3 samples = 9 rows do not split over "
         r"the data-parallel size dp\*ep=2\*1=2; change grpo.prompts_per_step or --group-size"),
    Case("export flags without export", f"{{RUN}} {D} --export-format gguf", 2, r"add export to --stages"),
    Case("q8_0 for the hf export", f"{{RUN}} {D} --stages pretrain,export --export-dtype q8_0", 2,
         r"--export-dtype q8_0 is a GGUF type; add --export-format gguf"),
    Case("grpo flags without grpo", f"{{RUN}} {D} --grpo-steps 5 --group-size 4", 2,
         r"--grpo-steps, --group-size apply to the grpo stage; add grpo to --stages"),
    Case("distill on other data than the teacher's",
         "{RUN} --data-dir {root}/other --stages distill --teacher {root}/ck/trained/final", 2,
         r"--teacher .*trained/final was trained on .*data_ok \(train [0-9a-f]{16}.* but the student's data is "
         r".*other \(train [0-9a-f]{16}.*must share the tokenizer"),
    Case("sft on missing data names the start's", "{RUN} --data-dir {root}/empty --stages sft --start-from {root}/ck/trained/final",
         2, r"data folder .*empty is missing .*\(the start checkpoint trained on --data-dir .*data_ok\)$"),
    Case("sft data missing", f"{{RUN}} {D} --stages sft --start-from {{root}}/ck/trained/final --sft-data {{root}}/nope.txt",
         2, r"--sft-data \(sft\.data\) .*nope\.txt: no such file"),
    Case("distill on pipeline stages", f"{{RUN}} {D} --stages distill --teacher {{root}}/ck/trained/final --gpus 2 --pp-size 2",
         2, r"the distill stage runs on dp/tp/ep/sp meshes, not pipeline stages \(pp_size=2\); drop --pp-size"),
    Case("stages empty", f"{{RUN}} {D} --stages ,", 2, r"--stages is empty"),
    Case("run name with a slash", f"{{RUN}} {D} --run-name ../escape", 2, r"a run name is one folder name"),
    Case("compile cache is a file", f"{{RUN}} {D} --compile-cache {{root}}/malformed.json", 2,
         r"--compile-cache .*malformed\.json is a file; give a folder for the compiled programs, or 'off'"),
    Case("info bad config", "info --config {root}/malformed.json", 2, r"not valid JSON"),
    # --- mesh flags (all caught before the tokenizer, whatever the device count)
    Case("tp does not divide heads", f"{{RUN}} {D} --dp-size 1 --tp-size 3", 2, r"is not divisible by tp_size=3"),
    Case("tp alone does not divide", f"{{RUN}} {D} --tp-size 3", 2, r"is not divisible by tp_size=3"),
    Case("ep does not divide experts", f"{{RUN}} {D} --ep-size 3", 2, r"n_routed_experts=4 is not divisible by ep_size=3"),
    Case("sp does not divide seq", f"{{RUN}} {D} --sp-size 3", 2, r"seq_len=32 is not divisible by sp_size=3"),
    Case("dp does not divide batch", f"{{RUN}} {D} --dp-size 3", 2, r"batch_size=4 is not divisible by the data-parallel"),
    Case("pp does not split layers", f"{{RUN}} {D} --pp-size 2", 2, r"pp_size=2: the pipeline holds the 1 decoder layers"),
    Case("microbatches without pp", f"{{RUN}} {D} --microbatches 4", 2, r"microbatches=4 applies to pipeline parallelism"),
    Case("repeats without pp", f"{{RUN}} {D} --pipeline-repeats 2", 2, r"pipeline_repeats=2 applies to pipeline"),
    Case("two inferred sizes", f"{{RUN}} {D} --dp-size -1 --tp-size -1", 2, r"only one mesh size may be -1"),
    Case("mesh size 0", f"{{RUN}} {D} --dp-size 0", 2, r"distributed\.dp_size: must be >= 1"),
    Case("gpus 0", f"{{RUN}} {D} --gpus 0", 2, r"--gpus must be > 0"),
    Case("mlx on a mesh", f"{{RUN}} {D} --backend mlx --tp-size 2 --dp-size 1", 2, r"--backend mlx runs on one device"),
    Case("mlx folding microbatches", f"{{RUN}} {D} --backend mlx --grad-accum 2 --accumulation fold", 2,
         r"--backend mlx runs its microbatches one after another; drop --accumulation fold"),
    Case("processes without coordinator", f"{{RUN}} {D} --num-processes 2 --process-id 0", 2, r"needs --coordinator"),
    Case("process id out of range", f"{{RUN}} {D} --num-processes 2 --process-id 2", 2, r"--process-id must be in 0\.\.1"),
    # --- data folders and files
    Case("data dir missing", "{RUN} --data-dir {root}/nowhere", 2,
         r"data folder .*nowhere does not exist; make it with `dsjax download --out .*nowhere`"),
    Case("data dir is a file", "{RUN} --data-dir {root}/a_file", 2, r"a_file is a file"),
    Case("valid split missing", "{RUN} --data-dir {root}/only_train", 2,
         r"is missing .*only_train/valid/stories\.jsonl .*dsjax download --out NEW_DIR \[--from PATH\].* --data-dir NEW_DIR"),
    Case("train file empty", "{RUN} --data-dir {root}/empty_train", 2, r"empty_train/train/stories\.jsonl is empty"),
    Case("train texts all blank", "{RUN} --data-dir {root}/blank_texts", 2, r"none is a JSON object with a non-empty"),
    Case("train file not JSON lines", "{RUN} --data-dir {root}/garbage", 2, r"garbage/train/stories\.jsonl has 2 line"),
    Case("valid file empty", "{RUN} --data-dir {root}/empty_valid", 2, r"empty_valid/valid/stories\.jsonl is empty"),
    Case("default data half there", "{RUN}", 2, r"data/stories is missing data/stories/valid/stories\.jsonl"),
    Case("pretrain without data", "{RUN} --stages pretrain", 2,
         r"no data at data/stories \(missing data/stories/train/stories\.jsonl\); add the data_prep stage", cwd="empty"),
    Case("valid too short for a window", "{RUN} --data-dir {root}/tiny_valid --work-dir {root}/scratch", 2,
         r"tiny_valid/valid/stories\.jsonl: its \d+ tokens cannot fill one window of 33", after_work=True),
    # --- run names and resume
    Case("rerun without resume", f"{{RUN}} {D} --run-name trained", 2,
         r"run 'trained' already exists: .*out/trained \(.*metrics\.csv.*\) and .*ck/trained \(final, step_1, step_2\); "
         r"continue it with --resume, pick a new --run-name, or pass --overwrite"),
    Case("resume and overwrite", f"{{RUN}} {D} --run-name trained --resume --overwrite", 2, r"pass one of them"),
    Case("checkpoint dir is a file", f"{{RUN}} {D} --checkpoint-dir {{root}}/micro.json", 2,
         r"--checkpoint-dir \(training\.checkpoint_dir\) .*micro\.json is a file; give a folder"),
    Case("output dir inside a file", f"{{RUN}} {D} --output-dir {{root}}/micro.json/out", 2,
         r"--output-dir \(training\.output_dir\) .*micro\.json/out is inside .*micro\.json, a file; give a folder"),
    Case("allow data change alone", f"{{RUN}} {D} --allow-data-change", 2, r"--allow-data-change applies to --resume"),
    Case("resume max steps below", f"{{RUN}} {D} --run-name trained --resume --max-steps 1", 2,
         r"step_2 is at step 2 and the stage.s step count is 1; nothing to train\. Raise --max-steps above 2"),
    Case("resume max steps equal", f"{{RUN}} {D} --run-name trained --resume --max-steps 2", 2,
         r"step_2 is at step 2 and the stage.s step count is 2; nothing to train"),
    Case("resume on other data", "{RUN} --data-dir {root}/other --run-name trained --resume --max-steps 3", 2,
         r"was trained on .*data_ok \(train [0-9a-f]{16}, valid [0-9a-f]{16}\) but the data folder is .*other "
         r"\(train [0-9a-f]{16}, valid [0-9a-f]{16}\); .* --allow-data-change"),
    Case("resume with another model", f"{{RUN}} {D} --config {{root}}/micro_wide.json --run-name trained --resume "
         "--max-steps 3", 4, r"config changed .*model\.hidden_size \(32 -> 64\)"),
    Case("resume with nothing to resume", f"{{RUN}} {D} --run-name final_only --resume --max-steps 3", 2,
         r"holds no step_N checkpoint to continue"),
    # --- generate and checkpoints
    Case("checkpoint missing", "generate --checkpoint {root}/ck/nope/final", 4,
         r"ck/nope/final does not exist; pass a final/ folder"),
    Case("checkpoint is a file", "generate --checkpoint {root}/micro.json", 4,
         r"micro\.json is a file; pass a final/ folder such as checkpoints/<run>/final"),
    Case("checkpoint is the run folder", "generate --checkpoint {root}/ck/trained", 4,
         r"ck/trained is a run folder; pass its final/ checkpoint: .*ck/trained/final"),
    Case("checkpoint is a step", "generate --checkpoint {root}/ck/trained/step_2", 4,
         r"step_2 is a training checkpoint; pass a final/ folder such as .*ck/trained/final"),
    Case("params truncated", "generate --checkpoint {root}/ck/broken_params/final", 4,
         r"cannot read the parameters in .*broken_params/final/params"),
    Case("config.json malformed", "generate --checkpoint {root}/ck/bad_json/final", 4, r"config\.json is not valid JSON"),
    Case("config.json unknown key", "generate --checkpoint {root}/ck/bad_config/final", 4,
         r"config\.json: model: unknown key 'hidden_sise'"),
    Case("tokenizer missing", "generate --checkpoint {root}/ck/no_tokenizer/final", 4, r"missing tokenizer\.model"),
    Case("tokenizer garbage", "generate --checkpoint {root}/ck/bad_tokenizer/final", 4,
         r"tokenizer\.model is not a readable SentencePiece model"),
    Case("prompt and prompts file", f"{GEN} --prompt hi --prompts-file {{root}}/one_story.txt", 2,
         r"argument --prompts-file: not allowed with argument --prompt"),
    Case("top-k above vocab", f"{GEN} --top-k 10000", 2, r"--top-k 10000 exceeds the model's vocabulary of 512"),
    Case("top-k negative", f"{GEN} --top-k -1", 2, r"--top-k must be >= 0"),
    Case("top-p zero", f"{GEN} --top-p 0", 2, r"--top-p must be in \(0, 1\]"),
    Case("top-p above one", f"{GEN} --top-p 1.5", 2, r"--top-p must be in \(0, 1\]"),
    Case("top-p nan", f"{GEN} --top-p nan", 2, r"--top-p: must be a finite number"),
    Case("temperature negative", f"{GEN} --temperature -1", 2, r"--temperature must be a finite number >= 0"),
    Case("temperature inf", f"{GEN} --temperature inf", 2, r"--temperature: must be a finite number"),
    Case("max new tokens 0", f"{GEN} --max-new-tokens 0", 2, r"--max-new-tokens must be > 0"),
    Case("top-k not a number", f"{GEN} --top-k many", 2, r"--top-k: invalid int value: 'many'"),
    Case("prompt too long", f"{GEN} --prompt '{'once upon a time ' * 1250}'", 2,
         r"the prompt is \d+ tokens; the model's context is max_position_embeddings=128"),
    Case("checkpoints ls on a final", "checkpoints ls {root}/ck/trained/final", 2,
         r"ck/trained/final is a final/ checkpoint; list its run folder: dsjax checkpoints ls .*ck/trained$"),
    Case("checkpoints ls on the checkpoint root", "checkpoints ls {root}/ck", 2,
         r"ck holds runs \(\w+, .*\), not checkpoints; list one: dsjax checkpoints ls .*ck/\w+$"),
    Case("checkpoints ls missing", "checkpoints ls {root}/ck/nope", 2, r"no checkpoint folder at .*ck/nope"),
    Case("checkpoints ls on a step", "checkpoints ls {root}/ck/trained/step_2", 2,
         r"ck/trained/step_2 is one step's checkpoint; list its run folder: dsjax checkpoints ls .*ck/trained$"),
    Case("checkpoints ls on a file", "checkpoints ls {root}/micro.json", 2, r"micro\.json is a file; pass a run's checkpoint folder"),
    Case("checkpoints ls on an outputs folder", "checkpoints ls {root}/out/trained", 2,
         r"out/trained holds a run's metrics, not its checkpoints; .*dsjax checkpoints ls checkpoints/trained"),
    # --- eval
    Case("eval checkpoint missing", "eval --checkpoint {root}/ck/nope/final", 4, r"ck/nope/final does not exist"),
    Case("eval second checkpoint is a run folder", "eval --checkpoint {root}/ck/trained/final --checkpoint {root}/ck/trained",
         4, r"ck/trained is a run folder; pass its final/ checkpoint"),
    Case("eval prompts zero", "eval --checkpoint {root}/ck/trained/final --prompts 0", 2, r"--prompts must be >= 1"),
    Case("eval data folder missing", "eval --checkpoint {root}/ck/trained/final --data-dir {root}/nope", 2,
         r"data folder .*nope does not exist"),
    # --- download flags
    Case("max stories negative", "download --out {root}/dl --from {root}/data_ok --max-stories -1", 2,
         r"--max-stories must be > 0"),
    Case("max stories zero", "download --out {root}/dl --from {root}/data_ok --max-stories 0", 2, r"--max-stories must be > 0"),
    Case("download source missing", "download --out {root}/dl --from {root}/nope.txt", 2, r"nope\.txt: no such file"),
    Case("download source one story", "download --out {root}/dl --from {root}/one_story.txt", 2,
         r"needs at least 2 non-empty stories, found 1"),
    Case("download source wrong kind", "download --out {root}/dl --from {root}/stories.csv", 2,
         r"stories\.csv: expected a \.txt or \.jsonl file"),
    Case("download source no splits", "download --out {root}/dl --from {root}/no_splits", 2,
         r"found no train or valid split"),
    Case("download over data", "download --out {root}/data_ok --from {root}/other", 2,
         r"already holds .*download never replaces data"),
    Case("download out inside a file", "download --out {root}/micro.json/x --from {root}/other", 2,
         r"--out .*micro\.json/x is inside .*micro\.json, a file; give a folder"),
    Case("eval work dir is a file", "eval --checkpoint {root}/ck/trained/final --work-dir {root}/micro.json", 2,
         r"--work-dir .*micro\.json is a file; give a folder"),
    Case("download out is a file", "download --out {root}/a_file --from {root}/other", 2, r"a_file is a file"),
    Case("download unknown version", "download --out {root}/dl --version v3", 2, r"--version: invalid choice: 'v3'"),
    Case("download version of one file", "download --out {root}/dl --from {root}/one_story.txt --version v2", 2,
         r"one_story\.txt is one file, read as it is; --version picks between the hub's official files"),
    Case("download version not in the folder", "download --out {root}/dl --from {root}/other --version v2", 2,
         r"--version v2: no TinyStoriesV2-GPT4-train\.txt \+ TinyStoriesV2-GPT4-valid\.txt there"),
]


def test_the_table_is_big_enough():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, world, capfd, monkeypatch):
    monkeypatch.chdir(world / case.cwd)
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored after: mesh flags may add to it
    before = tree(world)
    code = main(case.args(world))
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("dsjax")]
    assert code == case.code, err
    assert len(errors) == 1 and re.search(case.message, errors[0]), err
    assert len(errors[0]) < 600, "an error line must not echo its input"
    assert "Traceback" not in err + out
    if not case.after_work:
        assert lines == errors, err  # before any work nothing else is printed
    after = tree(world)
    if case.after_work:
        after = {k: v for k, v in after.items() if not k.startswith("scratch/")}
    assert after == before


def test_resume_of_a_run_stopped_before_its_first_step_starts_it(world, capfd, monkeypatch):
    """Ctrl-C during compilation leaves training_config.json and a header-only metrics.csv: nothing to lose."""
    monkeypatch.chdir(world)
    (world / "out/early").mkdir(parents=True)
    (world / "out/early/metrics.csv").write_text((world / "out/trained/metrics.csv").read_text().splitlines()[0] + "\n")
    shutil.copy(world / "out/trained/training_config.json", world / "out/early/training_config.json")
    (world / "ck/early").mkdir()
    args = [*run_args(world, "early"), "--data-dir", str(world / "data_ok"), "--resume"]
    assert main(args) == 0, capfd.readouterr().err
    assert (world / "ck/early/final/params").is_dir()
    assert len((world / "out/early/metrics.csv").read_text().splitlines()) > 1
    # with a logged row it holds something to lose again
    shutil.rmtree(world / "ck/early")
    assert main([*args, "--max-steps", "3"]) == 2
    assert "holds no step_N checkpoint to continue" in capfd.readouterr().err


def test_generate_past_the_context_says_where_it_stops(world, capfd):
    code = main(["generate", "--checkpoint", str(world / "ck/trained/final"), "--max-new-tokens", "200", "--temperature", "0"])
    err = capfd.readouterr().err
    assert code == 0, err
    note = re.search(r"^dsjax: note: --max-new-tokens 200 is more than the (\d+) tokens the model's 128-token context "
                     r"leaves after the prompt; generation stops there$", err, re.M)
    assert note, err
    made = int(re.search(r"^\[(\d+) tokens in", err, re.M).group(1))
    assert made <= int(note.group(1)), err  # never more than the note said


def test_rerun_is_refused_and_overwrite_moves_the_old_run_aside(world, capfd, monkeypatch):
    monkeypatch.chdir(world)
    copy_run(world, "trained", "again")
    before = tree(world / "ck/again"), tree(world / "out/again")
    started = []
    monkeypatch.setattr("dsjax.train.loop.pretrain", lambda config, name, **kw: started.append((name, kw)))
    args = [*run_args(world, "again"), "--data-dir", str(world / "data_ok")]
    assert main(args) == 2
    assert "run 'again' already exists" in capfd.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert started == [("again", {"resume": False, "device_count": 1, "allow_data_change": False})]
    assert not (world / "ck/again").exists() and not (world / "out/again").exists()
    moved = sorted(p.name for p in (world / "ck").iterdir() if p.name.startswith("again.replaced-"))
    assert len(moved) == 1 and re.fullmatch(r"again\.replaced-\d{8}T\d{6}Z", moved[0])
    assert (tree(world / "ck" / moved[0]), tree(world / "out" / moved[0])) == before  # moved whole, not changed
    assert "--overwrite: moved" in capfd.readouterr().err


def test_resume_on_other_data_is_refused_then_allowed_with_the_checkpoints_tokenizer(world, capfd, monkeypatch):
    monkeypatch.chdir(world)
    copy_run(world, "trained", "moved")
    args = [*run_args(world, "moved"), "--data-dir", str(world / "other"), "--resume", "--max-steps", "3"]
    before = tree(world)
    assert main(args) == 2
    assert "--allow-data-change" in capfd.readouterr().err and tree(world) == before
    assert main([*args, "--allow-data-change"]) == 0
    err = capfd.readouterr().err
    assert "continuing on" in err and "with the checkpoint's tokenizer" in err
    final = world / "ck/moved/final"
    state = json.loads((final / "training_state.json").read_text())
    original = json.loads((world / "ck/trained/final/training_state.json").read_text())
    assert state["step"] == 3
    assert state["data"]["train_sha256"] != original["data"]["train_sha256"]  # now records the new data
    assert state["data"]["tokenizer_sha256"] == original["data"]["tokenizer_sha256"]
    assert (final / "tokenizer.model").read_bytes() == (world / "ck/trained/final/tokenizer.model").read_bytes()
    rows = (world / "out/moved/metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]  # history kept, one new step


def test_readme_command_run_twice_refuses_within_5_seconds(world, tmp_path):
    """The README's first command, run where it already ran: refused before any work (no download, no JAX)."""
    readme = (REPO / "README.md").read_text()
    command = re.search(r"uv run (dsjax run [^\n#&|]*)", readme).group(1).split()
    shutil.copytree(world / "out/trained", tmp_path / "outputs" / "nano")
    shutil.copytree(world / "ck/trained", tmp_path / "checkpoints" / "nano")
    before = tree(tmp_path)
    start = time.perf_counter()
    result = subprocess.run([DSJAX, *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "run 'nano' already exists" in result.stderr
    assert seconds < 5, f"refusing took {seconds:.1f}s"
    assert tree(tmp_path) == before and not (tmp_path / "data").exists()


def test_generate_into_a_closed_pipe_is_one_line(world):
    """`dsjax generate ... | head -c 10`: the reader leaves early; exit 141 and one line, no traceback."""
    proc = subprocess.Popen(
        [DSJAX, "generate", "--checkpoint", str(world / "ck/trained/final"), "--max-new-tokens", "100"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert err.strip() == "dsjax: output closed early (broken pipe); stopped"
