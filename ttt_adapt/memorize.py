"""Read a corpus into one fast-weight state (`TTTState`) and save it: documents from .jsonl/.txt/.parquet files or a
folder of them, read one after another, with progress, tokens/s and a resumable sidecar.

While it runs, `OUT.partial.safetensors` (the state so far) and `OUT.progress.json` (documents done) are rewritten
every `save_every` documents (each atomically, the state first); `resume=True` goes on from them. The finished state
is written to OUT atomically and the two sidecars are removed, so OUT is never half written.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from ttt_adapt._util import RecipeError, first_line

SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")


class MemorizeError(RecipeError):
    """Bad input to memorize (corpus, export, output, resume); one line, exit 2."""


def corpus_files(path) -> list[Path]:
    """The corpus files: `path` itself, or every .jsonl/.json/.txt/.parquet file under the folder `path` (sorted)."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise MemorizeError(f"{path}: the corpus must be .jsonl, .txt or .parquet (or a folder of them)")
        return [path]
    if not path.is_dir():
        raise MemorizeError(f"no such corpus file or folder: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise MemorizeError(f"{path}: the folder holds no .jsonl, .txt or .parquet file")
    return files


def iter_documents(files: list[Path], text_field: str = "text"):
    """The documents' texts, in order: a .txt file is one document, a .jsonl line or a parquet row one each."""
    for path in files:
        if path.suffix == ".txt":
            yield path.read_text(errors="replace")
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path, columns=[text_field])
            except Exception as e:  # a missing column or a broken file
                raise MemorizeError(f"{path}: cannot read a {text_field!r} column ({first_line(e)})") from None
            yield from (t for t in table.column(text_field).to_pylist() if isinstance(t, str))
        else:
            with open(path) as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)[text_field]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise MemorizeError(f"{path}:{i}: not a JSON object with a {text_field!r} field") from None


def sidecars(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".partial.safetensors"), out.with_name(out.name + ".progress.json")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def memorize(export, corpus, out, *, resume: bool = False, overwrite: bool = False, text_field: str = "text",
             piece_tokens: int | None = None, attention: str = "document", save_every: int = 100,
             dtype: str = "float32", max_docs: int | None = None) -> dict:
    """Read every document of `corpus` with the export `export` into one state and save it to `out`; returns the
    summary (documents, tokens, seconds, tokens/s, state size)."""
    from ttt_adapt.eval.inputs import load_model, load_tokenizer
    from ttt_adapt.modeling.ttt_state import TTTState

    out = Path(out)
    partial, progress = sidecars(out)
    files = corpus_files(corpus)
    if out.exists() and not overwrite:
        raise MemorizeError(f"{out} exists: pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise MemorizeError(f"no such output folder: {out.parent}")
    if progress.exists() and not resume:
        raise MemorizeError(f"an unfinished run left {progress.name}: pass --resume to go on (or delete {progress} "
                            f"and {partial.name})")
    model = load_model(export, dtype)
    if not hasattr(model, "read_state"):
        raise MemorizeError(f"{export} is not an In-Place TTT export (its model has no fast-weight state)")
    tokenizer = load_tokenizer(export)
    corpus_id = [str(p.resolve()) for p in files]
    state, done, tokens, seconds = None, 0, 0, 0.0
    if resume and progress.exists():
        record = json.loads(progress.read_text())
        if record.get("corpus") != corpus_id:
            raise MemorizeError(f"{progress.name} belongs to another corpus: resume with the same --corpus")
        try:
            state = TTTState.load(partial, model)
        except ValueError as e:
            raise MemorizeError(f"cannot resume from {partial.name}: {e}") from None
        done, tokens, seconds = record["documents_done"], record["tokens"], record["seconds"]

    def checkpoint():
        state.save(partial)
        _write_json(progress, {"corpus": corpus_id, "export": str(export), "documents_done": done, "tokens": tokens,
                               "seconds": seconds})

    bar = tqdm(desc="memorize", unit="doc", initial=done, total=max_docs, dynamic_ncols=True)
    start = time.perf_counter() - seconds
    try:
        for i, text in enumerate(iter_documents(files, text_field)):
            if max_docs is not None and i >= max_docs:
                break
            if i < done:
                continue
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] if isinstance(text, str) and text.strip() else []
            if ids:
                try:
                    new = model.read_state([ids], state=state, piece_tokens=piece_tokens, attention=attention)
                except ValueError as e:
                    raise MemorizeError(f"document {i}: {first_line(e)}") from None
                state, tokens = new, tokens + len(ids)
            done, seconds = i + 1, time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(tokens=tokens, tok_s=f"{tokens / max(seconds, 1e-9):.0f}")
            if state is not None and save_every and done % save_every == 0:
                checkpoint()
    except KeyboardInterrupt:  # keep what was read: --resume goes on from here
        if state is not None:
            checkpoint()
        raise
    finally:
        bar.close()
    if state is None:
        raise MemorizeError(f"{corpus}: the corpus holds no document with a token: nothing to read")
    state.save(out)
    for path in (partial, progress):
        path.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    return {"out": str(out), "documents": done, "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / max(seconds, 1e-9), 1), "state_mib": round(state.nbytes() / 2**20, 3)}
