"""Export to llama.cpp (GGUF) and Hugging Face (DeepSeek-V3), and import back.

    export_checkpoint(final_dir, "gguf" | "hf", out, dtype)   # the EXPORT stage and `dsjax export`
    import_checkpoint(source, out, "hf" | "gguf")              # `dsjax import`

Modules: hf_names (dsjax params <-> HF state dict), gguf_names (HF <-> GGUF tensors),
hf_config (config.json both ways), spm_vocab (SentencePiece <-> GGUF vocabulary),
safetensors_io, gguf_write, hf_write, imports. Every failure is an `ExportError` with
one line naming the tensor, key, flag or file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dsjax.export.errors import ExportError

log = logging.getLogger(__name__)

FORMATS = ("gguf", "hf")
DTYPES = {"gguf": ("f32", "f16", "bf16", "q8_0"), "hf": ("f32", "f16", "bf16")}

__all__ = ["DTYPES", "FORMATS", "ExportError", "check_export", "export_checkpoint", "import_checkpoint"]


def check_export(fmt: str, out: Path, dtype: str) -> None:
    """Flags and the output path, before any array is read: never overwrite, never guess."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES[fmt]:
        raise ExportError(f"--dtype {dtype} cannot be written for --format {fmt}; choose one of {', '.join(DTYPES[fmt])}")
    check_out(out)


def check_out(out: Path) -> None:
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise ExportError(f"--out {out} already exists; export and import never overwrite: choose another path or move it away")
    parent = out.absolute().parent
    if parent.exists() and not parent.is_dir():
        raise ExportError(f"--out {out}: {parent} is a file, not a folder")


def export_checkpoint(final_dir: Path, fmt: str, out: Path, dtype: str = "f32") -> tuple[Path, list[str]]:
    """Write `final_dir` (a dsjax final/ folder) as a GGUF file or an HF folder at `out`.

    Returns (out, warnings); warnings are also logged. Raises ExportError or CheckpointError.
    """
    from dsjax.train.checkpoint import load_final, read_final_config, read_json_item
    from dsjax.train.runs import run_name_of

    final_dir, out = Path(final_dir), Path(out)
    check_export(fmt, out, dtype)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)  # e.g. exports/<run>/ (never out itself)
    config = read_final_config(final_dir)  # a clear error for a wrong folder, before any array is read
    # which stage made it (sft/grpo: the chat template), kept so an import back knows (`generate --chat` notes)
    stage = (read_json_item(final_dir, "training_state") or {}).get("stage")
    warnings: list[str] = []
    if fmt == "gguf":
        from dsjax.export.gguf_write import check_model, write_gguf

        check_model(config.model)
        params, config, tokenizer = load_final(final_dir)
        # general.name: the run, as llama.cpp's converter names a model by its folder
        write_gguf(params, config.model, tokenizer, out, dtype, name=run_name_of(final_dir), stage=stage)
    else:
        from dsjax.export.hf_write import write_hf

        params, config, tokenizer = load_final(final_dir)
        warnings = write_hf(params, config.model, tokenizer, out, dtype, stage=stage)
    for note in warnings:
        log.warning("%s", note)
    return out, warnings


def import_checkpoint(source: Path, out: Path, fmt: str) -> Path:
    """Write a dsjax final/ folder at `out` from an HF folder (fmt "hf") or a GGUF file (fmt "gguf")."""
    from dsjax.export import imports

    check_out(out)
    if fmt == "hf":
        return imports.import_hf(Path(source), Path(out))
    if fmt == "gguf":
        return imports.import_gguf(Path(source), Path(out))
    raise ExportError(f"import format {fmt!r} is unknown; choose hf or gguf")


def existing_dtype(target: Path, fmt: str) -> str | None:
    """The dtype (f32, f16, bf16, q8_0) an earlier export at `target` was written in; None when unknown."""
    try:
        if fmt == "gguf":
            import gguf

            from dsjax.export.gguf_write import FILE_TYPES

            field = gguf.GGUFReader(target).fields.get("general.file_type")
            value = int(field.contents()) if field is not None else None
            return next((name for name, kind in FILE_TYPES.items() if int(kind) == value), None)
        from dsjax.export.hf_write import HF_DTYPES

        written = json.loads((Path(target) / "config.json").read_text()).get("torch_dtype")
        return next((name for name, (_, torch_name) in HF_DTYPES.items() if torch_name == written), None)
    except Exception:  # noqa: BLE001 - an unreadable earlier export is simply not current
        return None
