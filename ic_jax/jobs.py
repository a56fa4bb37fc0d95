"""python -m ic_jax.jobs: run a file of prompts through a model with continuous batching, results appended as they
finish; a killed job run again picks up where it stopped.

Examples:
  python -m ic_jax.jobs --input prompts.jsonl --output results.jsonl --ckpt DIR --pattern FSSS
  python -m ic_jax.jobs --input prompts.jsonl --output results.jsonl --config tiny --init random --temperature 0

Each input line is a JSON object: {"id": "q1", "prompt": "text"} or {"id": "q1", "messages": [{"role": "user",
"content": "text"}]} (rendered with the checkpoint's chat template), with optional "max_new_tokens", "temperature",
"top_k", "top_p" and "seed" (else the flags' values; the default seed is --seed mixed with the id, so requests
differ and a rerun samples the same). Each output line is {"id", "completion", "prompt_tokens",
"completion_tokens", "ttft_s", "total_s", "finish_reason"} ("stop": the model ended it; "length": max_new_tokens
or the context). Results come in the order they finish. Every line is written whole and synced before the next;
a job run again with the same --output skips the ids already there (a torn last line of a killed job is dropped
and its request run again). Bad input lines (invalid JSON, no prompt, a duplicate id, a bad setting, a prompt
that does not fit the context) are reported with their line number and id, then skipped, or with
--on-bad-line fail the job is refused before any work.

Multi-host (--distributed): every process runs the same command; process 0 alone reads --input and --output,
tokenizes, and sends the requests to the others (one broadcast); it alone writes results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import zlib
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from ic_jax.cli import (
    MAX_SEED,
    ArgumentParser,
    add_impl_argument,
    add_mesh_arguments,
    add_seed_argument,
    entry,
    fraction,
    nonneg_float,
    nonneg_int,
    parse_size,
    positive_int,
)
from ic_jax.errors import UserError
from ic_jax.files import check_output_file, read_text
from ic_jax.model.run_options import RunOptions
from ic_jax.runtime.batching import Batcher, Finished, Request, max_slots
from ic_jax.runtime.engine import Engine
from ic_jax.runtime.loading import load_model
from ic_jax.runtime.memory import check_fits
from ic_jax.runtime.sampling import Sampling
from ic_jax.runtime.sharding import check_data_split, mesh_from_args, shard_model
from ic_jax.runtime.tokenizer import load_chat_template, load_tokenizer

SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")


def parse_args(argv):
    p = ArgumentParser(prog="python -m ic_jax.jobs", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("files")
    io.add_argument("--input", type=Path, required=True, help="JSONL file of requests, one object per line")
    io.add_argument("--output", type=Path, required=True,
                    help="JSONL file the results are appended to; ids already in it are skipped")
    io.add_argument("--on-bad-line", choices=["skip", "fail"], default="skip",
                    help="a bad input line: report it and run the others (skip, default), or refuse the job before "
                         "any work (fail)")
    io.add_argument("--json", action="store_true", help="print the final statistics as one JSON object")
    src = p.add_argument_group("model")
    src.add_argument("--ckpt", type=Path,
                     help="checkpoint directory (default: the embedded model shipped in ic_jax/checkpoints/default)")
    src.add_argument("--config", help="config JSON or preset name; with --ckpt it must match the checkpoint's shapes")
    src.add_argument("--init", choices=["random"], help="random weights from --config instead of a checkpoint")
    add_seed_argument(src, what="random init, and the requests' sampling unless a line gives its own \"seed\"")
    src.add_argument("--pattern", help="IndexCache pattern in any `generate --pattern` form (FSSS, freq:4, "
                                       "@file.json, ...); default: the checkpoint's pattern.json, else all F")
    add_impl_argument(src)
    add_mesh_arguments(p)
    bat = p.add_argument_group("batching")
    bat.add_argument("--slots", type=positive_int,
                     help="requests decoded together (cache rows); default: as many as fit the free memory of a "
                          "device by the memory plan (on a CPU: 4), at most the number of requests")
    bat.add_argument("--context", type=parse_size,
                     help="positions per slot, prompt plus completion (default: the longest prompt plus its "
                          "max_new_tokens, at most the model's max_position_embeddings)")
    bat.add_argument("--chunk-size", type=positive_int, default=4096,
                     help="prefill a prompt in chunks of at most this many tokens (default 4096)")
    gen = p.add_argument_group("generation defaults (a line's own settings win)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=128, help="default 128")
    gen.add_argument("--temperature", type=nonneg_float, default=0.7, help="0 = greedy (default 0.7)")
    gen.add_argument("--top-k", type=nonneg_int, default=20, help="0 = off (default 20)")
    gen.add_argument("--top-p", type=fraction(low_open=True), default=1.0, help="1 = off (default 1)")
    a = p.parse_args(argv)
    if a.init and a.ckpt:
        p.error("--init random builds a fresh model; drop --ckpt or --init")
    if a.init and not a.config:
        p.error("--init random needs --config (a JSON file or a preset name such as tiny)")
    if a.config and not a.init and not a.ckpt:
        p.error("--config alone has no weights; add --init random or --ckpt DIR")
    return a


# ----------------------------------------------------------------------------------------------------------
# the output file: what is done, and appending whole lines


def done_ids(path: Path) -> set[str]:
    """The ids (as JSON text) of the results already in `path`. A last line without its newline (a job killed
    while writing it) is cut off the file, so that its request runs again and the next line starts clean."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    ids = set()
    for n, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            ids.add(json.dumps(json.loads(line)["id"]))
        except (ValueError, KeyError, TypeError):
            raise UserError(f"--output {path} line {n} is not a result of this command; give another --output "
                            f"(results are appended to it)") from None
    return ids


def append_line(f, record: dict) -> None:
    """One whole line, on disk before the next request's result."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------
# the input file: requests and bad lines


class BadLine(Exception):
    pass


def read_requests(a, tok, chat, context: int | None, max_positions: int, done: set[str]):
    """(requests, bad lines as "line N (id X): reason", number already done). `chat` renders "messages" (a
    function; None when the model has no chat template)."""
    requests, bad, seen, skipped = [], [], set(), 0
    for n, line in enumerate(read_text(a.input, f"--input {a.input}").splitlines(), 1):
        if not line.strip():
            continue
        rid = None
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise BadLine("not a JSON object")
            rid = obj.get("id")
            key = json.dumps(rid)
            if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                raise BadLine("no \"id\" (a string or an integer)")
            if key in seen:
                raise BadLine("duplicate id")
            seen.add(key)
            if key in done:
                skipped += 1
                continue
            prompt = encode_prompt(obj, tok, chat)
            settings = line_settings(obj, a, rid)
            limit = context or max_positions
            if len(prompt) >= limit:
                raise BadLine(f"prompt of {len(prompt)} tokens leaves no room in the context of {limit} "
                              f"({'--context' if context else 'max_position_embeddings'})")
            requests.append(Request(rid, prompt, settings["max_new_tokens"],
                                    Sampling(settings["temperature"], settings["top_k"], settings["top_p"]),
                                    settings["seed"]))
        except json.JSONDecodeError as e:
            bad.append(f"line {n}: invalid JSON ({e.msg} at column {e.colno})")
        except (BadLine, UserError) as e:
            bad.append(f"line {n} (id {json.dumps(rid)}): {e}")
    return requests, bad, skipped


def encode_prompt(obj: dict, tok, chat) -> list[int]:
    if ("prompt" in obj) == ("messages" in obj):
        raise BadLine("give one of \"prompt\" (text) or \"messages\" (a chat)")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise BadLine("\"prompt\" must be non-empty text")
        return tok.encode(obj["prompt"])
    if chat is None:
        raise BadLine("\"messages\" need the model's chat template, which it does not have; give \"prompt\" text")
    return tok.encode(chat(obj["messages"]), special=False)


def line_settings(obj: dict, a, rid) -> dict:
    """The line's sampling settings, the flags' values where it gives none."""
    default_seed = (a.seed + zlib.crc32(json.dumps(rid).encode())) % (MAX_SEED + 1)
    s = {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p,
         "seed": default_seed}
    checks = {"max_new_tokens": (int, lambda v: v >= 1, ">= 1"), "temperature": (float, lambda v: v >= 0, ">= 0"),
              "top_k": (int, lambda v: v >= 0, ">= 0"), "top_p": (float, lambda v: 0 < v <= 1, "in (0, 1]"),
              "seed": (int, lambda v: 0 <= v <= MAX_SEED, f"in 0..{MAX_SEED}")}
    for name, (kind, ok, rule) in checks.items():
        if name not in obj:
            continue
        v = obj[name]
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
        if not number or (kind is int and v != int(v)) or not ok(v):
            raise BadLine(f"\"{name}\" must be a{'n integer' if kind is int else ' number'} {rule}, got "
                          f"{json.dumps(v)}")
        s[name] = kind(v)
    return s


def chat_renderer(ckpt):
    """The checkpoint's chat template as a function of messages, or None when it has none."""
    try:
        return load_chat_template(ckpt).render
    except UserError:
        return None


# ----------------------------------------------------------------------------------------------------------
# multi-host: process 0 decides, the others follow


def share(payload: dict | None) -> dict:
    """Process 0's `payload` on every process (a no-op on one process); a payload holding "error" raises it
    everywhere, so that a refused job ends on every host instead of leaving the others waiting."""
    if jax.process_count() > 1:
        data = np.frombuffer(json.dumps(payload).encode(), np.uint8) if jax.process_index() == 0 else None
        size = int(multihost_utils.broadcast_one_to_all(np.int64(0 if data is None else data.size)))
        buf = data if data is not None else np.zeros(size, np.uint8)
        payload = json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))))
    if "error" in payload:
        raise UserError(payload["error"])
    return payload


def check_files(a) -> dict:
    """On process 0: {} when --input can be read and --output written, else the error."""
    try:
        read_text(a.input, f"--input {a.input}")
        check_output_file(a.output, "--output")
    except UserError as e:
        return {"error": str(e)}
    return {}


def plan_requests(a, tok, chat, max_positions: int) -> dict:
    """On process 0: the requests still to run, as JSON, or the error that refuses the job."""
    try:
        done = done_ids(a.output)
        requests, bad, skipped = read_requests(a, tok, chat, a.context, max_positions, done)
    except UserError as e:
        return {"error": str(e)}
    if bad and a.on_bad_line == "fail":
        more = f" (and {len(bad) - 1} more bad lines)" if len(bad) > 1 else ""
        return {"error": f"--input {a.input} {bad[0]}{more}; fix the line or pass --on-bad-line skip"}
    for b in bad:
        print(f"skipped: --input {a.input} {b}", file=sys.stderr)
    return {"requests": [request_json(r) for r in requests], "bad": len(bad), "already_done": skipped}


def request_json(r: Request) -> dict:
    return {"id": r.id, "prompt": r.prompt, "max_new_tokens": r.max_new_tokens, "temperature": r.sampling.temperature,
            "top_k": r.sampling.top_k, "top_p": r.sampling.top_p, "seed": r.seed}


def request_of(d: dict) -> Request:
    return Request(d["id"], d["prompt"], d["max_new_tokens"], Sampling(d["temperature"], d["top_k"], d["top_p"]),
                   d["seed"])


# ----------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    a = parse_args(argv)
    mesh = mesh_from_args(a)  # joins the job first with --distributed
    lead = jax.process_index() == 0
    share(check_files(a) if lead else None)  # before the model loads
    opts = RunOptions.for_impl(a.impl)
    model, ckpt = load_model(a, mesh)
    if mesh is not None:
        shard_model(model, mesh)
    cfg = model.cfg
    tok = load_tokenizer(ckpt)
    if a.context is not None and a.context > cfg.max_position_embeddings:
        raise UserError(f"--context {a.context} exceeds the model's max_position_embeddings "
                        f"{cfg.max_position_embeddings}; give at most that")
    payload = share(plan_requests(a, tok, chat_renderer(ckpt), cfg.max_position_embeddings) if lead else None)
    requests = [request_of(d) for d in payload["requests"]]
    stats = {"requests": len(requests), "bad_lines": payload["bad"], "already_done": payload["already_done"]}
    if not requests:
        return report(a, {**stats, "completion_tokens": 0, "prompt_tokens": 0, "wall_s": 0.0})
    context = a.context or min(max(len(r.prompt) + r.max_new_tokens for r in requests), cfg.max_position_embeddings)
    chunk = min(a.chunk_size, context)
    fix = "lower --slots, --context or --chunk-size, or shard over more devices (--mesh)"
    if a.slots:
        check_data_split(a.slots, mesh, "--slots")
        check_fits(model, mesh, a.slots, context, chunk, opts, fix)
        slots = a.slots
    else:
        slots = max_slots(model, mesh, context, chunk, opts, limit=len(requests))
        if slots == 0:
            raise UserError(f"not one request of {context} tokens fits the free memory of a device; lower --context "
                            f"or shard over more devices (--mesh)")
    batcher = Batcher(Engine(model, opts, mesh), slots, context, chunk, tok.eos_id)
    stats.update(slots=slots, context=context, pattern=model.pattern, backend=jax.default_backend())
    stats.update(run(a, batcher, requests, tok, lead))
    return report(a, stats)


def run(a, batcher: Batcher, requests: list[Request], tok, lead: bool) -> dict:
    """Runs the requests, appending each result as it finishes (process 0); returns token counts and times."""
    totals = {"prompt_tokens": 0, "completion_tokens": 0}
    t0 = time.perf_counter()
    with (open(a.output, "a", encoding="utf-8") if lead else contextlib.nullcontext()) as f, \
            tqdm(total=len(requests), desc="jobs", unit="req", disable=not lead) as bar:
        for done in batcher.run(requests):
            if lead:
                append_line(f, result_json(done, tok))
            totals["prompt_tokens"] += len(done.request.prompt)
            totals["completion_tokens"] += len(done.tokens)
            bar.set_postfix_str(f"{totals['completion_tokens'] / (time.perf_counter() - t0):.1f} tok/s")
            bar.update(1)
    return {**totals, "wall_s": round(time.perf_counter() - t0, 3)}


def result_json(done: Finished, tok) -> dict:
    return {"id": done.request.id, "completion": tok.decode(done.tokens), "prompt_tokens": len(done.request.prompt),
            "completion_tokens": len(done.tokens), "ttft_s": round(done.ttft_s, 4), "total_s": round(done.total_s, 4),
            "finish_reason": done.finish_reason}


def report(a, stats: dict) -> int:
    stats["tok_s"] = round(stats["completion_tokens"] / stats["wall_s"], 2) if stats["wall_s"] else 0.0
    if a.json:
        print(json.dumps(stats))
    else:
        print(f"{stats['requests']} requests done ({stats['already_done']} already in {a.output}, "
              f"{stats['bad_lines']} bad lines skipped) | {stats['completion_tokens']} tokens in {stats['wall_s']:.1f}s "
              f"= {stats['tok_s']:.1f} tok/s" + (f" | {stats['slots']} slots of {stats['context']} positions"
                                                 if "slots" in stats else ""))
    return 0


main = entry(main)

if __name__ == "__main__":
    raise SystemExit(main())
