"""The data preflight: every sample of a stage's LLaVA-JSON files checked as training would read
it, before any GPU is used.

Each sample goes through the training parser (``llava_json.parse_sample``: structure, turn
order with a leading gpt turn dropped, placeholders, image existence) and the training encoder
(``Preprocessor.tokenize`` and ``truncate``: the template, ``<image>`` expanded to the tower's
tokens, the cut at ``max_length``, the label mask); every image it names is fully decoded by
``preprocess.decode_image`` (PIL's decompression-bomb limit is an error). Each distinct image is
decoded once and its verdict given to every sample that names it.

The work is split in chunks over worker processes (forked, so they share the parsed files);
results come back in file and sample order whatever the workers' timing.
"""

from __future__ import annotations

import math
import multiprocessing
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from moetool.data.llava_json import DataError, parse_sample, read_llava_file
from moetool.data.preprocess import Preprocessor, decode_image

# Problem kinds. Errors make training stop (or skip the sample, with data.skip_bad_samples);
# warnings are what training accepts silently.
ERROR_KINDS = (
    "malformed",  # not an object, no conversations, bad turn order, placeholders != images
    "missing_image",
    "unreadable_image",  # truncated or corrupt file, not an image
    "image_too_large",  # over PIL's decompression-bomb limit
    "image_tokens_cut",  # max_length cuts into the image tokens
    "all_labels_masked",  # after the cut at max_length no assistant token is left
)
WARNING_KINDS = (
    "truncated",  # longer than max_length: cut, still trainable
    "leading_gpt_turn",  # dropped, as the official code drops it
)

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" or "warning"
    kind: str  # one of ERROR_KINDS / WARNING_KINDS
    file: str
    index: int  # position of the sample in its file
    id: str | None  # the sample's id (None when the sample is not an object)
    message: str  # names file and sample

    def to_json(self) -> dict:
        return {
            "severity": self.severity,
            "kind": self.kind,
            "file": self.file,
            "index": self.index,
            "id": self.id,
            "message": self.message,
        }


@dataclass(frozen=True)
class SampleCheck:
    """What the text checks found for one sample; ``images`` are the paths still to decode."""

    index: int
    id: str | None
    parsed: bool
    has_image: bool = False
    length: int | None = None  # tokens before the cut at max_length, image tokens included
    images: tuple[str, ...] = ()
    problems: tuple[tuple[str, str, str], ...] = ()  # (severity, kind, message)


def _kind_of_parse_error(message: str) -> str:
    return "missing_image" if message.endswith("does not exist") else "malformed"


def _kind_of_encode_error(message: str) -> str:
    return "image_tokens_cut" if "cuts into the image tokens" in message else "all_labels_masked"


def _kind_of_image_error(message: str) -> str:
    return "image_too_large" if "is too large" in message else "unreadable_image"


def _leading_gpt(raw) -> bool:
    turns = raw.get("conversations") if isinstance(raw, dict) else None
    return (
        isinstance(turns, list)
        and len(turns) > 0
        and isinstance(turns[0], dict)
        and turns[0].get("from") == "gpt"
    )


def check_sample(
    raw, index: int, file: Path, image_folder: Path, preprocessor: Preprocessor
) -> SampleCheck:
    """The text checks of one raw sample: parsed as training parses it, encoded as training
    encodes it (images are decoded separately, ``check_image``)."""
    sample_id = str(raw.get("id", f"#{index}")) if isinstance(raw, dict) else None
    try:
        sample = parse_sample(raw, index, file, image_folder)
    except DataError as err:
        message = str(err)
        return SampleCheck(
            index, sample_id, False, problems=(("error", _kind_of_parse_error(message), message),)
        )
    problems = []
    if _leading_gpt(raw):
        problems.append(
            (
                "warning",
                "leading_gpt_turn",
                f"{sample.where}: starts with a gpt turn, dropped (as the official code does)",
            )
        )
    ids, labels = preprocessor.tokenize(sample)
    try:
        preprocessor.truncate(sample, ids, labels)
    except DataError as err:
        problems.append(("error", _kind_of_encode_error(str(err)), str(err)))
    else:
        if len(ids) > preprocessor.max_length:
            problems.append(
                (
                    "warning",
                    "truncated",
                    f"{sample.where}: {len(ids)} tokens, cut to max_length "
                    f"{preprocessor.max_length}",
                )
            )
    return SampleCheck(
        index,
        sample_id,
        True,
        has_image=bool(sample.images),
        length=len(ids),
        images=tuple(map(str, sample.images)),
        problems=tuple(problems),
    )


def check_image(path: str | Path) -> str | None:
    """None when the image decodes fully under the decompression-bomb limit, else the
    problem (``image PATH is unreadable (…)`` / ``is too large (…)``)."""
    try:
        decode_image(path)
    except DataError as err:
        return str(err)
    return None


def token_stats(lengths: Sequence[int]) -> dict | None:
    """min, median, p95 (nearest rank) and max of token lengths; None for none."""
    if not lengths:
        return None
    ordered = sorted(lengths)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    median = statistics.median(ordered)
    return {
        "min": ordered[0],
        "median": int(median) if float(median).is_integer() else median,
        "p95": p95,
        "max": ordered[-1],
    }


@dataclass
class StageCheck:
    """The preflight of one stage's data (see docs/cli.md, ``moetool data check``, for the
    JSON keys)."""

    stage: str
    files: list[str]
    image_folder: str
    template: str
    max_length: int
    image_tokens: int
    samples: int = 0
    good: int = 0
    with_image: int = 0
    text_only: int = 0
    images: int = 0  # distinct images decoded
    tokens: dict | None = None
    problems: list[Problem] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    @property
    def bad(self) -> int:
        return self.samples - self.good

    def counts(self, severity: str) -> dict[str, int]:
        kinds = ERROR_KINDS if severity == "error" else WARNING_KINDS
        found = Counter(p.kind for p in self.problems if p.severity == severity)
        return {kind: found[kind] for kind in kinds if found[kind]}

    def verdict(self, skip_bad_samples: bool) -> str:
        """``ok`` (nothing bad), ``skip`` (bad samples that training would skip, good ones
        left) or ``stop`` (training would stop on a bad sample, or has no good one)."""
        if self.good == 0:
            return "stop"
        if self.bad == 0:
            return "ok"
        return "skip" if skip_bad_samples else "stop"

    def to_json(self, skip_bad_samples: bool) -> dict:
        return {
            "verdict": self.verdict(skip_bad_samples),
            "files": self.files,
            "image_folder": self.image_folder,
            "template": self.template,
            "max_length": self.max_length,
            "image_tokens": self.image_tokens,
            "samples": self.samples,
            "good": self.good,
            "bad": self.bad,
            "with_image": self.with_image,
            "text_only": self.text_only,
            "images": self.images,
            "errors": self.counts("error"),
            "warnings": self.counts("warning"),
            "tokens": self.tokens,
            "seconds": self.seconds,
        }


# The state a worker process checks against: set by ``_init_worker`` (inherited through fork
# on Linux; pickled once per worker where processes are spawned).
_STATE: tuple | None = None


def _init_worker(state: tuple) -> None:
    global _STATE
    _STATE = state


def _run_chunk(task: tuple) -> list:
    contents, image_folder, preprocessor = _STATE
    if task[0] == "samples":
        _, file_index, start, stop = task
        file, raws = contents[file_index]
        return [
            check_sample(raws[i], i, Path(file), image_folder, preprocessor)
            for i in range(start, stop)
        ]
    return [check_image(path) for path in task[1]]


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def _map_chunks(tasks: list[tuple], sizes: list[int], pool, phase: str, progress) -> list:
    """Results of ``tasks`` in task order (in ``pool``, or here when it is None)."""
    total, done = sum(sizes), 0
    if progress:
        progress(phase, 0, total)
    results: list = [None] * len(tasks)
    if pool is None:
        for n, task in enumerate(tasks):
            results[n] = _run_chunk(task)
            done += sizes[n]
            if progress:
                progress(phase, done, total)
    else:
        futures = {pool.submit(_run_chunk, task): n for n, task in enumerate(tasks)}
        for future in as_completed(futures):
            n = futures[future]
            results[n] = future.result()
            done += sizes[n]
            if progress:
                progress(phase, done, total)
    return [item for chunk in results for item in chunk]


def check_stage(
    stage: str,
    files: Sequence[str | Path],
    image_folder: str | Path,
    preprocessor: Preprocessor,
    workers: int = 0,
    progress: Progress | None = None,
    sample_chunk: int = 1000,
    image_chunk: int = 16,
) -> StageCheck:
    """Check every sample of ``files`` (one stage's data) with ``workers`` processes (0 = in
    this one). A missing, unreadable or non-list file raises ``DataError`` (nothing can be
    checked); every problem of a sample is listed in the result, in file and sample order.
    ``progress(phase, done, total)`` is called as chunks finish."""
    started = time.perf_counter()
    image_folder = Path(image_folder)
    contents = [(str(f), read_llava_file(f)) for f in files]
    report = StageCheck(
        stage,
        [str(f) for f in files],
        str(image_folder),
        preprocessor.template.name,
        preprocessor.max_length,
        preprocessor.image_tokens,
        samples=sum(len(raws) for _, raws in contents),
    )
    loaded = time.perf_counter()
    state = (contents, image_folder, preprocessor)
    pool = None
    if workers > 0:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        pool = ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=(state,))
    else:
        _init_worker(state)
    try:
        size = max(1, min(sample_chunk, math.ceil(report.samples / max(1, 4 * workers))))
        tasks, sizes = [], []
        for file_index, (_, raws) in enumerate(contents):
            for start, stop in _chunks(len(raws), size):
                tasks.append(("samples", file_index, start, stop))
                sizes.append(stop - start)
        checks: list[SampleCheck] = _map_chunks(tasks, sizes, pool, f"{stage}: samples", progress)
        texts_done = time.perf_counter()
        paths = sorted({p for c in checks for p in c.images})
        tasks = [("images", paths[a:b]) for a, b in _chunks(len(paths), image_chunk)]
        verdicts = _map_chunks(
            tasks, [len(t[1]) for t in tasks], pool, f"{stage}: images", progress
        )
        images_done = time.perf_counter()
    finally:
        if pool is not None:
            pool.shutdown()
        _init_worker(None)
    image_problem = dict(zip(paths, verdicts, strict=True))
    report.images = len(paths)
    lengths = []
    n = 0
    for file, raws in contents:
        for check in checks[n : n + len(raws)]:
            problems = list(check.problems)
            if check.parsed:
                lengths.append(check.length)
                report.with_image += check.has_image
                report.text_only += not check.has_image
                where = f"{file}, sample {check.id!r}"
                for path in check.images:
                    if (message := image_problem[path]) is not None:
                        problems.append(
                            ("error", _kind_of_image_error(message), f"{where}: {message}")
                        )
            if not any(severity == "error" for severity, _, _ in problems):
                report.good += 1
            report.problems += [
                Problem(s, k, file, check.index, check.id, m) for s, k, m in problems
            ]
        n += len(raws)
    report.tokens = token_stats(lengths)
    report.seconds = {
        "read": round(loaded - started, 3),
        "samples": round(texts_done - loaded, 3),
        "images": round(images_done - texts_done, 3),
    }
    return report
