"""The offline multi-domain corpus the bundled model is trained on, and its tokenizer.

Four domains, all read from files that ship with Python and Debian packages on
this kind of machine (nothing is downloaded):

* ``python``:  the CPython standard library's ``.py`` files (tests excluded);
* ``c``:       C headers under ``/usr/include``;
* ``shell``:   shell scripts (``*.sh`` files and ``#!/bin/sh``-style scripts in
               ``/usr/bin``, ``/usr/sbin``, ``/usr/lib``, ``/usr/share``, ``/etc``);
* ``english``: English documentation prose: Perl's POD (``*.pod`` and the POD
               blocks of ``*.pm``), the topics of Python's ``pydoc_data``, and
               READMEs/NEWS under ``/usr/share/doc``.

Documents are split into train and held-out sets **by file** (a stable hash of
the path), so no held-out line was seen in training. ``build`` writes the full
corpus to a work directory and a manifest (every path, its domain, split and
SHA-256) plus the held-out documents (compressed) into the repository, so tests
and the accuracy harness need only what ships.

    python -m lynx_sglang.corpus build/corpus --manifest data/corpus

A **calibration split** (``data/corpus/calibration.jsonl.gz``, ``read_calibration``) is what
offline calibration tools read (SERE's expert similarity, ``sere_calibrate``): a small fixed
sample of *training* documents (never held-out ones, so nothing the accuracy harness scores
informs a calibrated setting), chosen by a stable hash of the path, each cut to
``CALIBRATION_DOC_CHARS``, about ``CALIBRATION_DOMAIN_CHARS`` per domain. It is written from
``collect()`` only when every chosen document matches the manifest (same split, same SHA-256):

    python -m lynx_sglang.corpus build/corpus --calibration-only --manifest data/corpus
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List

DOMAINS = ("python", "c", "shell", "english")
EOS = "<|endoftext|>"
# The repository's copy of the held-out documents: all that tests, the harness and the tools read.
HELDOUT = Path(__file__).resolve().parent.parent / "data" / "corpus" / "heldout.jsonl.gz"
# Calibration documents: training-split files only (see the module docstring).
CALIBRATION = HELDOUT.with_name("calibration.jsonl.gz")
CALIBRATION_DOMAIN_CHARS = 100_000
CALIBRATION_DOC_CHARS = 12_000
MAX_DOC_CHARS = 48_000  # a long file is cut, so no single file dominates its domain
MAX_DOMAIN_CHARS = 6_000_000  # per domain, before the split
HELDOUT_EVERY = 16  # about 1 file in 16 is held out
SHELL_SHEBANG = re.compile(rb"^#!\s*(/usr)?/bin/(env\s+)?(ba|da)?sh\b")


@dataclass(frozen=True)
class Document:
    """One file (or one pydoc topic) of one domain."""

    domain: str
    path: str
    text: str

    @property
    def heldout(self) -> bool:
        """Stable, path-based split: the same file is always on the same side."""
        return int(hashlib.sha256(self.path.encode()).hexdigest()[:8], 16) % HELDOUT_EVERY == 0


def _read(path: Path) -> str | None:
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if b"\0" in raw[:4096]:
        return None  # binary
    text = raw.decode("utf-8", errors="ignore").strip()
    return text[:MAX_DOC_CHARS] if len(text) >= 200 else None


def _files(root: str, pattern: str) -> Iterator[Path]:
    base = Path(root)
    if base.is_dir():
        yield from sorted(p for p in base.rglob(pattern) if p.is_file() and not p.is_symlink())


def _python_docs() -> Iterator[Document]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for p in _files(str(stdlib), "*.py"):
        rel = p.relative_to(stdlib).parts
        if rel[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in rel or rel[0] == "pydoc_data":
            continue
        text = _read(p)
        if text:
            yield Document("python", str(p), text)


def _c_docs() -> Iterator[Document]:
    for p in _files("/usr/include", "*.h"):
        text = _read(p)
        if text:
            yield Document("c", str(p), text)


def _shell_docs() -> Iterator[Document]:
    seen = set()
    for root in ("/usr/bin", "/usr/sbin", "/usr/lib", "/usr/share", "/etc"):
        for p in _files(root, "*"):
            if p in seen or "perl" in p.parts:
                continue
            if p.suffix in (".sh", ".bash"):
                ok = True
            elif root in ("/usr/bin", "/usr/sbin", "/etc") and not p.suffix:
                try:
                    with open(p, "rb") as f:
                        ok = bool(SHELL_SHEBANG.match(f.read(64)))
                except OSError:
                    ok = False
            else:
                ok = False
            if ok:
                seen.add(p)
                text = _read(p)
                if text:
                    yield Document("shell", str(p), text)


_POD_BLOCK = re.compile(r"^=(pod|head\d|over|item|begin|for|encoding)\b.*?(^=cut\b|\Z)", re.S | re.M)


def _english_docs() -> Iterator[Document]:
    for p in _files("/usr/share/perl", "*.p[om]"):
        text = _read(p)
        if not text:
            continue
        if p.suffix == ".pm":  # only the POD blocks of a module are prose
            text = "\n\n".join(m.group(0).rstrip("=cut").strip() for m in _POD_BLOCK.finditer(text))
        if len(text) >= 200:
            yield Document("english", str(p), text)
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - every CPython ships it
        topics = {}
    for name in sorted(topics):
        if len(topics[name]) >= 200:
            yield Document("english", f"pydoc_data/topics.py#{name}", topics[name][:MAX_DOC_CHARS])
    for p in _files("/usr/share/doc", "*"):
        name = p.name.lower()
        if name.startswith(("readme", "news", "changes", "faq", "todo")) and "copyright" not in name:
            text = _read(p)
            if text:
                yield Document("english", str(p), text)


SOURCES = {"python": _python_docs, "c": _c_docs, "shell": _shell_docs, "english": _english_docs}


def collect(domains: Iterable[str] = DOMAINS, max_domain_chars: int = MAX_DOMAIN_CHARS) -> List[Document]:
    """All documents of the chosen domains, deterministic order, capped per domain.

    When a domain has more text than the cap, files are taken in the order of a
    stable hash of their path (a fixed pseudo-random sample of the domain).
    """
    out: List[Document] = []
    for domain in domains:
        docs = list(SOURCES[domain]())
        docs.sort(key=lambda d: hashlib.sha256(("order:" + d.path).encode()).hexdigest())
        total = 0
        for d in docs:
            if total >= max_domain_chars:
                break
            out.append(d)
            total += len(d.text)
    return out


def write_jsonl(docs: Iterable[Document], path: Path) -> None:
    """Documents as JSON lines (gzip-compressed when the name ends in .gz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"domain": d.domain, "path": d.path, "text": d.text}) + "\n")


def read_jsonl(path: Path) -> List[Document]:
    """Inverse of ``write_jsonl``."""
    opener = gzip.open if Path(path).suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f if line.strip()]


def read_calibration(path: Path = CALIBRATION) -> List[Document]:
    """The calibration split (training documents, never held out); refuses a held-out one."""
    docs = read_jsonl(path)
    bad = [d.path for d in docs if d.heldout]
    if bad:
        raise ValueError(f"{path} holds held-out documents ({bad[:3]}...): it must be training text only")
    return docs


def calibration_split(docs: List[Document], manifest_files: List[Dict] | None = None,
                      domain_chars: int = CALIBRATION_DOMAIN_CHARS,
                      doc_chars: int = CALIBRATION_DOC_CHARS) -> List[Document]:
    """A fixed sample of training documents per domain (stable hash order, texts cut to ``doc_chars``).

    With ``manifest_files`` (``manifest.json``'s ``files``), every chosen document must be listed
    there as ``train`` with the same SHA-256, so the split is the one the models were trained on.
    """
    known = {f["path"]: f for f in manifest_files or []}
    out: List[Document] = []
    for domain in DOMAINS:
        train = [d for d in docs if d.domain == domain and not d.heldout]
        train.sort(key=lambda d: hashlib.sha256(("calibration:" + d.path).encode()).hexdigest())
        total = 0
        for d in train:
            if total >= domain_chars:
                break
            if manifest_files is not None:
                f = known.get(d.path)
                if f is None or f["split"] != "train" or f["sha256"] != hashlib.sha256(d.text.encode()).hexdigest():
                    raise ValueError(f"{d.path} is not the manifest's training document: this machine's corpus "
                                     "differs from the one the models were trained on")
            text = d.text[:doc_chars]
            out.append(Document(d.domain, d.path, text))
            total += len(text)
    return out


def train_tokenizer(docs: List[Document], vocab_size: int):
    """Byte-level BPE (GPT-2 style) trained on ``docs``; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=None)


def manifest(docs: List[Document]) -> Dict:
    """What was used, exactly: per-domain counts and every file with its split and hash."""
    counts: Dict[str, Dict[str, int]] = {}
    for d in docs:
        c = counts.setdefault(d.domain, {"train_files": 0, "heldout_files": 0, "train_chars": 0, "heldout_chars": 0})
        side = "heldout" if d.heldout else "train"
        c[f"{side}_files"] += 1
        c[f"{side}_chars"] += len(d.text)
    files = [
        {
            "domain": d.domain,
            "path": d.path,
            "split": "heldout" if d.heldout else "train",
            "chars": len(d.text),
            "sha256": hashlib.sha256(d.text.encode()).hexdigest(),
        }
        for d in docs
    ]
    return {"domains": counts, "max_doc_chars": MAX_DOC_CHARS, "heldout_every": HELDOUT_EVERY, "files": files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path, help="where train.jsonl.gz and heldout.jsonl.gz go")
    ap.add_argument("--manifest", type=Path, help="also write manifest.json and heldout.jsonl.gz here (the repo's copy)")
    ap.add_argument("--max-domain-chars", type=int, default=MAX_DOMAIN_CHARS)
    ap.add_argument("--calibration-only", action="store_true",
                    help="only write the calibration split (calibration.jsonl.gz) into --manifest's folder, "
                    "checked against its manifest.json")
    args = ap.parse_args()
    docs = collect(max_domain_chars=args.max_domain_chars)
    if args.calibration_only:
        if not args.manifest:
            ap.error("--calibration-only needs --manifest (the folder holding manifest.json)")
        files = json.loads((args.manifest / "manifest.json").read_text())["files"]
        calib = calibration_split(docs, files)
        write_jsonl(calib, args.manifest / CALIBRATION.name)
        print(f"{len(calib)} calibration documents, {sum(len(d.text) for d in calib)} characters")
        return
    train = [d for d in docs if not d.heldout]
    held = [d for d in docs if d.heldout]
    write_jsonl(train, args.workdir / "train.jsonl.gz")
    write_jsonl(held, args.workdir / "heldout.jsonl.gz")
    man = manifest(docs)
    if args.manifest:
        args.manifest.mkdir(parents=True, exist_ok=True)
        (args.manifest / "manifest.json").write_text(json.dumps(man, indent=1) + "\n")
        write_jsonl(held, args.manifest / "heldout.jsonl.gz")
    print(json.dumps(man["domains"], indent=1))


if __name__ == "__main__":
    main()
