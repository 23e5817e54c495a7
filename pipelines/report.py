"""Run reports: ``OUTPUT/report.html`` (one self-contained file) and ``OUTPUT/contact_sheet.png``.

The page shows what a person checks after a run: sample images (generation) or
decoded sample latents (encoding), per-channel latent histograms, the errors grouped
by reason, and per-stage busy time and throughput from run.json. Images are inlined
as data URIs and histograms drawn as inline SVG, so the file can be mailed or opened
from object storage with nothing beside it. Every read and write goes through
``pipelines.runtime.io``: any fsspec output works.

Memory does not grow with the output: tables are streamed a row group at a time.
Histograms count every value into fixed bins (edges from latent_stats.json, or from a
first pass), samples are chosen from the id column alone and only their row groups read.
"""

from __future__ import annotations

import base64
import datetime
import html
import io as bytes_io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw

from pipelines.encoding.latent_output import latents_of
from pipelines.runtime import io

CELL = 128  # contact sheet: each sample fits a CELL x CELL square
LABEL_HEIGHT = 18  # with its id written below it
COLUMNS = 4
HISTOGRAM_BINS = 30
# Rows per read while streaming: a written row group for wide columns (latents), many for
# narrow ones (ids, per-row channel means: a few MB per read, whatever the number of rows)
WIDE_READ_ROWS = io.PARQUET_ROW_GROUP_ROWS
NARROW_READ_ROWS = 65536
RESULTS_FOLDERS = {"manifest": "generate", "latents": "encode"}


@dataclass(frozen=True)
class Sample:
    row_id: str
    caption: str
    image: Image.Image
    source: Image.Image | None = None  # an image-to-image row's source, shown beside its result


@dataclass(frozen=True)
class Histograms:
    source: str  # what the values are, said on the page
    edges: np.ndarray  # (channels, HISTOGRAM_BINS + 1): fixed bin edges per channel
    counts: np.ndarray  # (channels, HISTOGRAM_BINS): values per bin, over every row


@dataclass(frozen=True)
class WrittenReport:
    html: str
    contact_sheet: str


# -- checking a run (also the Airflow DAG's verify step) ------------------------------------------


def check_run_record(record: dict | None, max_error_rate: float) -> dict:
    """The counts of a finished run, or a ValueError saying why they are not acceptable."""
    if record is None:
        raise ValueError("run.json: missing; the run never started or wrote elsewhere")
    counts = record.get("counts") or {}
    input_rows, ok_rows, error_rows = (int(counts.get(name, -1)) for name in ("input_rows", "ok_rows", "error_rows"))
    if record.get("status") != "complete" or input_rows != ok_rows + error_rows:
        raise ValueError(f"run.json: status {record.get('status')!r}, input_rows {input_rows} != ok_rows {ok_rows} + error_rows {error_rows}")
    rate = error_rows / input_rows if input_rows else 0.0
    if rate > max_error_rate:
        raise ValueError(f"error rate {rate:.2%} ({error_rows} of {input_rows} rows) is above the limit {max_error_rate:.2%}; "
                         f"reasons: {record.get('error_reasons')}")
    return {"input_rows": input_rows, "ok_rows": ok_rows, "error_rows": error_rows, "error_rate": round(rate, 6)}


# -- reading the output ---------------------------------------------------------------------------


def run_kind(output: str) -> tuple[str, str]:
    """("generate", "manifest") or ("encode", "latents"), from the results folder the output holds."""
    for folder, kind in RESULTS_FOLDERS.items():
        if io.exists(io.join(output, folder)):
            return kind, folder
    raise ValueError(f"output: {output!r} holds neither manifest/ nor latents/ (no committed rows yet?)")


def first_rows(folder: str, columns: list[str], count: int) -> pa.Table:
    """The ``count`` rows with the smallest ids, in id order: the same samples on every report of an output.

    Only the id column is read whole, streamed; then, for the chosen rows, the row groups that hold them.
    """
    # 1. the smallest ids so far, with where they are (part, row in the part)
    parts = io.list_parquet_files(folder)
    chosen = pa.table({"id": pa.array([], pa.string()), "part": pa.array([], pa.int32()), "row": pa.array([], pa.int64())})
    for part, uri in enumerate(parts):
        position = 0
        for batch in io.iter_parquet_batches(uri, ["id"], NARROW_READ_ROWS):
            candidates = pa.table({
                "id": batch.column(0).cast(pa.string()), "part": pa.array(np.full(len(batch), part, np.int32)),
                "row": pa.array(np.arange(position, position + len(batch), dtype=np.int64)),
            })
            position += len(batch)
            merged = pa.concat_tables([chosen, candidates])
            chosen = merged.take(pc.select_k_unstable(merged, k=min(count, len(merged)), sort_keys=[("id", "ascending")]))
    # 2. their rows, reading only the row groups that hold them
    where = chosen.column("part").to_numpy()
    pieces = []
    for part in np.unique(where):
        table, in_table = io.read_parquet_rows(parts[part], chosen.column("row").to_numpy()[where == part], list(dict.fromkeys(["id", *columns])))
        pieces.append(table.take(in_table))
    if not pieces:
        return pa.table({name: pa.array([], pa.string()) for name in columns})
    found = pa.concat_tables(pieces, promote_options="permissive")
    return found.take(pc.sort_indices(found, sort_keys=[("id", "ascending")])).select(columns)


def generated_samples(output: str, count: int, record: dict | None = None) -> list[Sample]:
    folder = io.join(output, "manifest")
    with_sources = "init_image" in schema_names(folder)
    table = first_rows(folder, ["id", "prompt", "image_path", *(["init_image"] if with_sources else [])], count)
    sources = (source_images(table.column("init_image").to_pylist(), (record or {}).get("config", {}).get("prompts"))
               if with_sources else [None] * len(table))
    return [Sample(row_id, prompt, Image.open(bytes_io.BytesIO(io.read_bytes(io.join(output, path)))).convert("RGB"), source)
            for row_id, prompt, path, source in zip(*(table.column(name).to_pylist() for name in ("id", "prompt", "image_path")), sources)]


def source_images(references: list[str | None], prompts: str | None) -> list[Image.Image | None]:
    """Image-to-image rows' sources as the manifest names them: a URI read again, ``input row N`` from the
    prompt table's row N (None for a text-to-image row, or a source that cannot be read now)."""
    input_rows = [int(reference.rsplit(" ", 1)[1]) for reference in references if reference and reference.startswith("input row ")]
    from_input = _input_sources(prompts, input_rows) if input_rows and prompts else {}
    found = []
    for reference in references:
        try:
            data = from_input.get(reference) if reference and reference.startswith("input row ") else reference and io.read_bytes(reference)
            found.append(Image.open(bytes_io.BytesIO(data)).convert("RGB") if data else None)
        except Exception:  # the report shows the result without its source
            found.append(None)
    return found


def _input_sources(prompts: str, rows: list[int]) -> dict[str, bytes]:
    """``input row N`` -> the bytes in that row's ``init_image``, read from the row group that holds it."""
    _, fragments = io.parquet_fragments(prompts)
    starts, found = io.file_starts(fragments), {}
    for row in rows:
        fragment = next((f for f in fragments if f.first_row <= row < f.first_row + f.num_rows), None)
        if fragment is not None:
            table, index = io.read_parquet_rows(fragment.uri, np.array([row - starts[fragment.uri]]), ["init_image"])
            found[f"input row {row}"] = table.column("init_image")[int(index[0])].as_py()
    return found


def decoded_samples(output: str, record: dict, count: int) -> list[Sample]:
    """Encoded latents decoded back to pixels by the run's own VAE: what training will see."""
    from pipelines.runtime.model_source import describe_model
    from workers.generation.vae_decoder import VaeDecoderWorker

    folder = io.join(output, "latents")
    names = schema_names(folder)
    caption = next((name for name in ("caption", "source") if name in names), None)
    table = first_rows(folder, ["id", "latent", *(["latent_shape"] if "latent_shape" in names else []), *([caption] if caption else [])], count)
    decoder = VaeDecoderWorker(describe_model(record["config"]["model"]).location, dtype="float32")
    images = decoder({"latents": [np.asarray(latent, np.float32) for latent in latents_of(table)]})["image"]
    captions = table.column(caption).to_pylist() if caption else [""] * len(table)
    return [Sample(row_id, str(text or ""), Image.fromarray(np.asarray(image, np.uint8)))
            for row_id, text, image in zip(table.column("id").to_pylist(), captions, images)]


def schema_names(folder: str) -> list[str]:
    """Column names of an output table, from one part's footer (no data read)."""
    return io.parquet_schema(io.list_parquet_files(folder)[0]).names


def channel_values(table: pa.Table | pa.RecordBatch, column: str) -> np.ndarray:
    """(channels, values) of a batch: every value of each row's latent, or each row's per-channel ``latent_mean``."""
    if column == "latent_mean":
        return table.column(column).flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(table), -1).T
    latents = latents_of(table)
    if isinstance(latents, np.ndarray):  # one (rows, channels, ...) array: the type fixes the shape
        return np.moveaxis(latents, 1, 0).reshape(latents.shape[1], -1)
    return np.concatenate([latent.reshape(latent.shape[0], -1) for latent in latents], axis=1)


def stream_channel_values(folder: str, column: str):
    """``channel_values`` of every row of ``folder``, a row group's worth at a time."""
    columns = [column, "latent_shape"] if column == "latent" and "latent_shape" in schema_names(folder) else [column]
    rows_per_read = WIDE_READ_ROWS if column == "latent" else NARROW_READ_ROWS
    for uri in io.list_parquet_files(folder):
        for batch in io.iter_parquet_batches(uri, columns, rows_per_read):
            if len(batch):
                yield channel_values(batch, column)


def value_ranges(folder: str, column: str, stats: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel (min, max) of ``column``: latent_stats.json's for latents, else a first streamed pass."""
    if column == "latent" and stats.get("min") and stats.get("max"):
        low, high = np.asarray(stats["min"], np.float64), np.asarray(stats["max"], np.float64)
        if np.isfinite(low).all() and np.isfinite(high).all():
            return low, high
    low = high = None
    for values in stream_channel_values(folder, column):
        finite = np.where(np.isfinite(values), values, np.nan)
        if np.isnan(finite).all():
            continue
        batch_low, batch_high = np.nanmin(finite, axis=1), np.nanmax(finite, axis=1)
        low = batch_low if low is None else np.fmin(low, batch_low)
        high = batch_high if high is None else np.fmax(high, batch_high)
    return None if low is None else (low.astype(np.float64), high.astype(np.float64))


def channel_histograms(output: str, folder: str, stats: dict | None = None) -> Histograms | None:
    """Per-channel histograms over every row: full latents where the output stores them, else the manifest's per-row channel means.

    Counts accumulate a row group at a time into fixed bins (HISTOGRAM_BINS between each
    channel's min and max), so they equal ``numpy.histogram`` over the whole column while
    memory holds one row group. Non-finite values are left out; values outside the edges
    (a latent_stats.json older than the parts) count in the end bins.
    """
    folder_uri = io.join(output, folder)
    names = schema_names(folder_uri)
    column = "latent" if "latent" in names else "latent_mean" if "latent_mean" in names else None
    ranges = value_ranges(folder_uri, column, stats or {}) if column else None
    if ranges is None:
        return None
    low, high = ranges
    high = np.where(high > low, high, low + 1.0)  # one value everywhere: a bin of width 1/BINS around it
    counts = np.zeros((len(low), HISTOGRAM_BINS), np.int64)
    for values in stream_channel_values(folder_uri, column):
        for channel, row in enumerate(values):
            finite = row[np.isfinite(row)]
            counts[channel] += np.histogram(np.clip(finite, low[channel], high[channel]), HISTOGRAM_BINS, (low[channel], high[channel]))[0]
    edges = np.stack([np.linspace(a, b, HISTOGRAM_BINS + 1) for a, b in zip(low, high)])
    total_rows = sum(io.parquet_footer(uri).num_rows for uri in io.list_parquet_files(folder_uri))
    if column == "latent":
        what = "the final latents of {} rows, from the saved latents (--save-latents)" if folder == "manifest" else "the stored latents of {} rows (latents/)"
        return Histograms("every value of " + what.format(total_rows), edges, counts)
    return Histograms(f"the per-row channel means (manifest latent_mean) of all {total_rows} rows; "
                      "rerun with --save-latents for the distribution of every latent value", edges, counts)


def error_summary(output: str) -> list[dict]:
    """Errors grouped by stage and reason (by code where the errors table has one), most frequent first.

    Streamed: memory holds one read of rows and a count per group, not the errors table.
    """
    folder = io.join(output, "errors")
    parts = io.list_parts(folder)  # none: no errors/ folder, or no part in it (a failed listing raises)
    if not parts:
        return []
    key = "code" if "code" in schema_names(folder) else "reason"
    groups: dict[tuple[str, str], dict] = {}
    for uri in parts:
        for batch in io.iter_parquet_batches(uri, list(dict.fromkeys(["id", "stage", "reason", key])), NARROW_READ_ROWS):
            # ordered aggregation (no threads): a group's first reason and ids are those of its first rows
            grouped = pa.Table.from_batches([batch]).group_by(["stage", key], use_threads=False).aggregate(
                [("id", "count"), ("reason", "first"), ("id", "list")])
            for row in grouped.to_pylist():
                group = groups.setdefault((row["stage"], row[key]), {"stage": row["stage"], "reason": row["reason_first"], "rows": 0, "examples": []})
                group["rows"] += row["id_count"]
                group["examples"] += row["id_list"][:3 - len(group["examples"])]
    return sorted(groups.values(), key=lambda group: -group["rows"])


def stage_rows(record: dict) -> list[dict]:
    """Busy time per stage and what it means: rows per busy second, share of the run's wall time."""
    counts = record.get("counts") or {}
    rows = counts.get("generated_this_run", counts.get("encoded_this_run"))
    wall = record.get("wall_seconds") or 0
    table = []
    for stage, busy in (record.get("stage_busy_seconds") or {}).items():
        table.append({
            "stage": stage, "busy_seconds": busy,
            "rows_per_busy_second": round(rows / busy, 2) if rows and busy else None,
            "share_of_wall": f"{busy / wall:.0%}" if wall else None,
        })
    return table


# -- pictures -------------------------------------------------------------------------------------


def thumbnail(image: Image.Image, cell: int = CELL) -> Image.Image:
    """Fit into cell x cell; small images are enlarged without smoothing so their pixels stay visible."""
    scale = cell / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS)


def contact_sheet_size(samples: int) -> tuple[int, int]:
    columns = min(COLUMNS, max(samples, 1))
    rows = max(1, -(-samples // columns))
    return columns * CELL, rows * (CELL + LABEL_HEIGHT)


def contact_sheet(samples: list[Sample]) -> Image.Image:
    sheet = Image.new("RGB", contact_sheet_size(len(samples)), "white")
    draw = ImageDraw.Draw(sheet)
    if not samples:
        draw.text((8, CELL // 2), "no images", fill="black")
    for index, sample in enumerate(samples):
        left, top = (index % COLUMNS) * CELL, (index // COLUMNS) * (CELL + LABEL_HEIGHT)
        # an image-to-image row: its source in the cell's left half, its result in the right one
        pictures = [sample.image] if sample.source is None else [sample.source, sample.image]
        width = CELL // len(pictures)
        for place, picture in enumerate(pictures):
            small = thumbnail(picture, width)
            sheet.paste(small, (left + place * width + (width - small.width) // 2, top + (CELL - small.height) // 2))
        draw.text((left + 4, top + CELL + 3), sample.row_id[:20], fill="black")
    return sheet


def png_bytes(image: Image.Image) -> bytes:
    buffer = bytes_io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def histogram_svg(counts: np.ndarray, edges: np.ndarray, title: str, width: int = 280, height: int = 120) -> str:
    top, bar = max(int(counts.max()), 1), width / len(counts)
    bars = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - 20 - (height - 40) * c / top:.1f}" width="{bar - 1:.1f}" '
        f'height="{(height - 40) * c / top:.1f}" fill="#4a78b5"/>' for i, c in enumerate(counts)
    )
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
            f'<text x="0" y="12" font-size="12">{html.escape(title)}</text>{bars}'
            f'<text x="0" y="{height - 4}" font-size="10">{edges[0]:.3g}</text>'
            f'<text x="{width}" y="{height - 4}" font-size="10" text-anchor="end">{edges[-1]:.3g}</text></svg>')


# -- the page -------------------------------------------------------------------------------------


def write_report(output: str, samples: int = 16) -> WrittenReport:
    if samples < 1:
        raise ValueError(f"samples: must be >= 1, got {samples}")
    record = io.read_json(io.join(output, "run.json"))
    if record is None:
        raise ValueError(f"output: no run.json at {output!r}; not a latentray output")
    kind, folder = run_kind(output)
    notes: list[str] = []
    try:
        shown = generated_samples(output, samples, record) if kind == "generate" else decoded_samples(output, record, samples)
    except Exception as error:  # a report without pictures still shows counts and errors
        shown = []
        notes.append(f"samples could not be shown: {type(error).__name__}: {error}")
    sheet = contact_sheet(shown)
    stats = io.read_json(io.join(output, "latent_stats.json")) or {}
    page = render_page(output, kind, record, shown, channel_histograms(output, folder, stats), error_summary(output), stats, notes)
    written = WrittenReport(io.join(output, "report.html"), io.join(output, "contact_sheet.png"))
    io.write_bytes(written.contact_sheet, png_bytes(sheet))
    io.write_bytes(written.html, page.encode())
    return written


STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 75em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; } td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
.samples { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: 0.8em; }
figure { margin: 0; } figure img.source { width: 64px; height: 64px; } figure img { width: 128px; height: 128px; object-fit: contain; image-rendering: pixelated; background: #eee; }
figcaption { font-size: 0.8em; overflow-wrap: anywhere; } .histograms { display: flex; flex-wrap: wrap; gap: 1em; }
.note { color: #8a4b00; }
"""


def render_page(output: str, kind: str, record: dict, samples: list[Sample], histograms: Histograms | None,
                errors: list[dict], stats: dict, notes: list[str]) -> str:
    counts = record.get("counts") or {}
    sections = [
        f"<h1>latentray {html.escape(kind)} report</h1>",
        f"<p>{html.escape(output)} &middot; status <b>{html.escape(str(record.get('status')))}</b> &middot; "
        f"model {html.escape(str((record.get('model') or {}).get('uri', '')))} &middot; written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC</p>",
        _table(["count", "value"], [[name, counts[name]] for name in sorted(counts, key=_count_order)]),
        *[f'<p class="note">{html.escape(note)}</p>' for note in notes],
        f"<h2>{'Sample images' if kind == 'generate' else 'Decoded sample latents'} ({len(samples)})</h2>",
        '<div class="samples">' + "".join(
            "<figure>" + (f'<img src="{data_uri(thumbnail(s.source))}" alt="source of {html.escape(s.row_id)}" class="source">'
                          if s.source is not None else "") +
            f'<img src="{data_uri(thumbnail(s.image))}" alt="{html.escape(s.row_id)}">'
            f"<figcaption><b>{html.escape(s.row_id)}</b> {html.escape(s.caption[:120])}</figcaption></figure>" for s in samples
        ) + "</div>",
        "<h2>Latent channels</h2>",
        _histogram_section(histograms, stats),
        f"<h2>Errors ({counts.get('error_rows', sum(e['rows'] for e in errors))} rows)</h2>",
        _table(["stage", "reason", "rows", "example ids"], [[e["stage"], e["reason"], e["rows"], ", ".join(e["examples"])] for e in errors])
        if errors else "<p>No errors.</p>",
        "<h2>Stages</h2>",
        f"<p>wall time {record.get('wall_seconds')} s, {record.get('images_per_second')} rows/s this run, placement {html.escape(str(record.get('placement')))}</p>",
        _table(["stage", "busy seconds", "rows per busy second", "share of wall time"],
               [[r["stage"], r["busy_seconds"], r["rows_per_busy_second"], r["share_of_wall"]] for r in stage_rows(record)]),
        _resources_table(record.get("stages") or {}),
    ]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>latentray report: {html.escape(output)}</title>'
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n")


def _histogram_section(histograms: Histograms | None, stats: dict) -> str:
    if histograms is None:
        return "<p>No latents or latent statistics in this output.</p>"
    means, stds = stats.get("mean") or [], stats.get("std") or []
    charts = []
    for channel, (counts, edges) in enumerate(zip(histograms.counts, histograms.edges)):
        exact = f": mean {means[channel]:.3f}, std {stds[channel]:.3f} (all rows)" if channel < min(len(means), len(stds)) else ""
        charts.append(histogram_svg(counts, edges, f"channel {channel}{exact}"))
    return f"<p>Histograms of {html.escape(histograms.source)}.</p><div class=\"histograms\">{''.join(charts)}</div>"


def _count_order(name: str) -> tuple[int, str]:
    leading = ("input_rows", "ok_rows", "error_rows")
    return (leading.index(name), "") if name in leading else (len(leading), name)


def _resources_table(stages: dict[str, dict]) -> str:
    options = sorted({name for resources in stages.values() for name in resources})
    return _table(["stage resources", *options], [[stage, *[resources.get(name) for name in options]] for stage, resources in stages.items()])


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if cell is None else str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
