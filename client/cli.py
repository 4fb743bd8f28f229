"""``mhr``: the command line of mhr-client (argparse + standard library only).

Exit status: 0 done, 1 failure (server error, transport error, adaptation not succeeded), 2 a refused request
(4xx) or a usage error. The server comes from --url / $MHR_URL, the key from --api-key / $MHR_API_KEY.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import httpx

from ._base import DEFAULT_URL
from ._client import Client
from .exceptions import ApiError, MhrError
from .models import AdaptJob, GenerateResponse, Model

Handler = Callable[[Client, argparse.Namespace], int]


class UsageError(Exception):
    """A problem with the command line or its files (exit status 2)."""


def _print_json(value: Model | list[Model] | dict) -> None:
    if isinstance(value, list):
        value = [item.model_dump(mode="json") for item in value]
    elif isinstance(value, Model):
        value = value.model_dump(mode="json")
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "temperature": args.temperature,
            "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed, "num_beams": args.num_beams,
            "stop": args.stop}


def cmd_generate(mhr: Client, args: argparse.Namespace) -> int:
    inputs = args.text[0] if len(args.text) == 1 else args.text
    if not args.stream:
        response = mhr.generate(args.task, inputs, **_sampling(args))
        _print_json(response) if args.json else print("\n".join(response.texts))
        return 0
    final: GenerateResponse | None = None
    for event in mhr.stream(args.task, inputs, **_sampling(args)):
        if args.json:
            print(event.model_dump_json(exclude_none=True), flush=True)
        elif event.done:
            final = event.response
        elif len(args.text) == 1:
            print(event.text, end="", flush=True)
    if final is not None:
        print("\n".join(final.texts) if len(args.text) > 1 else "")
    return 0


def cmd_score(mhr: Client, args: argparse.Namespace) -> int:
    inputs = args.text[0] if len(args.text) == 1 else args.text
    response = mhr.score(args.task, inputs, args.choice)
    if args.json:
        _print_json(response)
        return 0
    for result in response.results:
        scores = "  ".join(f"{s.choice}={s.logprob_sum:.3f}" for s in result.scores)
        print(f"{result.best}\t{scores}")
    return 0


def cmd_tasks(mhr: Client, args: argparse.Namespace) -> int:
    tasks = [mhr.task(args.name)] if args.name else mhr.tasks()
    if args.json:
        _print_json(tasks)
    elif tasks:
        _table([["NAME", "KIND", "VERSION", "METHOD"]] + [[t.name, t.kind, str(t.version), t.method] for t in tasks])
    return 0


def load_examples(path: str) -> list[dict[str, str]]:
    """A .json list of {"input", "target"} objects (or {"examples": [...]}), or JSON lines; "-" reads stdin."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        if path.endswith(".json"):
            data = json.loads(text)
            items = data["examples"] if isinstance(data, dict) else data
        else:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"cannot read examples from {path}: {exc}") from exc
    bad = [i for i, item in enumerate(items) if not (isinstance(item, dict) and "input" in item and "target" in item)]
    if bad or not items:
        raise UsageError(f"{path}: every example must be an object with 'input' and 'target' (see #{bad[:3]})")
    return [{"input": item["input"], "target": item["target"]} for item in items]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(job: AdaptJob, width: int = 24) -> str:
    """``alpha [#####-------] 40/150 running loss 1.2345 12s left``."""
    filled = round(width * job.step / job.steps) if job.steps else 0
    parts = [f"{job.task} [{'#' * filled}{'-' * (width - filled)}] {job.step}/{job.steps}", job.state]
    if job.loss is not None:
        parts.append(f"loss {job.loss:.4f}")
    if job.eta_s is not None and not job.done:
        parts.append(f"{_duration(job.eta_s)} left")
    elif job.elapsed_s is not None and job.done:
        parts.append(f"in {_duration(job.elapsed_s)}")
    return " ".join(parts)


class ProgressBar:
    """One line on ``stream`` redrawn with a carriage return at each poll."""

    def __init__(self, stream: TextIO):
        self.stream, self.width = stream, 0

    def __call__(self, job: AdaptJob) -> None:
        line = progress_line(job)
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width = len(line)

    def end(self) -> None:
        if self.width:
            self.stream.write("\n")
            self.stream.flush()


def cmd_adapt(mhr: Client, args: argparse.Namespace) -> int:
    examples = load_examples(args.examples)
    job = mhr.adapt(args.task, examples, method=args.method, steps=args.steps, learning_rate=args.lr,
                    batch_size=args.batch_size, seed=args.seed, validation_fraction=args.validation_fraction,
                    overwrite=args.overwrite)
    if args.no_wait:
        _print_json(job)
        return 0
    bar = ProgressBar(sys.stderr)
    try:
        job = mhr.wait(job.id, poll_interval=args.poll_interval, on_progress=None if args.quiet else bar)
    except KeyboardInterrupt:
        bar.end()
        print(f"interrupted; job {job.id} goes on (mhr cancel {job.id} stops it)", file=sys.stderr)
        return 130
    bar.end()
    _print_json(job)
    return 0 if job.state == "succeeded" else 1


def cmd_jobs(mhr: Client, args: argparse.Namespace) -> int:
    if args.job_id:
        _print_json(mhr.job(args.job_id))
        return 0
    jobs = mhr.jobs()
    if args.json:
        _print_json(jobs)
    elif jobs:
        rows = [[j.id, j.task, j.method, j.state, f"{j.step}/{j.steps}", "" if j.loss is None else f"{j.loss:.4f}"]
                for j in jobs]
        _table([["ID", "TASK", "METHOD", "STATE", "STEP", "LOSS"]] + rows)
    return 0


def cmd_cancel(mhr: Client, args: argparse.Namespace) -> int:
    _print_json(mhr.cancel(args.job_id))
    return 0


def cmd_export(mhr: Client, args: argparse.Namespace) -> int:
    print(mhr.export(args.task, args.dir))
    return 0


def cmd_delete(mhr: Client, args: argparse.Namespace) -> int:
    info = mhr.delete_task(args.task)
    print(f"deleted {info.name} (version {info.version})")
    return 0


def _connection_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """On the main parser (with defaults from the environment) and on each subcommand (so either place works)."""
    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS
    parser.add_argument("--url", default=default(os.environ.get("MHR_URL", DEFAULT_URL)),
                        help="server URL (env MHR_URL; default %(default)s)" if top else argparse.SUPPRESS)
    parser.add_argument("--api-key", default=default(os.environ.get("MHR_API_KEY")),
                        help="API key (env MHR_API_KEY)" if top else argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=default(60.0),
                        help="seconds per request (default %(default)s)" if top else argparse.SUPPRESS)


def _generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--num-beams", type=int)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated")
    parser.add_argument("--json", action="store_true", help="print the whole response (JSON lines with --stream)")


def _adapt_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", help="the new task's name")
    parser.add_argument("--examples", required=True, help="FILE.jsonl or FILE.json of {input, target} ('-': stdin)")
    parser.add_argument("--method", default="mhr-z", help="mhr-z (default), poly-z or mhr-mu")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lr", type=float, help="learning rate")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--validation-fraction", type=float)
    parser.add_argument("--overwrite", action="store_true", help="replace an adapted task of this name")
    parser.add_argument("--no-wait", action="store_true", help="print the queued job and return")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--poll-interval", type=float, default=0.5, help="seconds between polls (default 0.5)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhr", description="Command line client for mhr-serve.")
    _connection_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_)
        _connection_options(sub, top=False)
        sub.set_defaults(handler=handler)
        return sub

    sub = command("generate", cmd_generate, "generate text for one input (or several) with a task")
    sub.add_argument("task")
    sub.add_argument("text", nargs="+", help="one input per argument")
    _generation_options(sub)
    sub = command("score", cmd_score, "rank choices by log-likelihood; prints the best choice and the scores")
    sub.add_argument("task")
    sub.add_argument("text", nargs="+", help="one input per argument")
    sub.add_argument("--choice", action="append", required=True, help="a choice (repeat for each)")
    sub.add_argument("--json", action="store_true")
    sub = command("tasks", cmd_tasks, "list the tasks (or show one)")
    sub.add_argument("name", nargs="?")
    sub.add_argument("--json", action="store_true")
    _adapt_options(command("adapt", cmd_adapt, "adapt a new task from examples; waits with a progress bar"))
    sub = command("jobs", cmd_jobs, "list the adaptation jobs (or show one as JSON)")
    sub.add_argument("job_id", nargs="?")
    sub.add_argument("--json", action="store_true")
    command("cancel", cmd_cancel, "cancel an adaptation job").add_argument("job_id")
    sub = command("export", cmd_export, "download a task as a PEFT LoRA folder into DIR")
    sub.add_argument("task")
    sub.add_argument("dir")
    command("delete", cmd_delete, "delete an adapted task").add_argument("task")
    return parser


def _silence_stdout() -> None:
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: Sequence[str] | None = None, *, transport: httpx.BaseTransport | None = None) -> int:
    """Run ``mhr``; returns the exit status. ``transport`` is for tests (an httpx transport)."""
    args = build_parser().parse_args(argv)
    try:
        with Client(args.url, api_key=args.api_key, timeout=args.timeout, transport=transport) as mhr:
            return args.handler(mhr, args)
    except ApiError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2 if 400 <= exc.status < 500 else 1
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mhr ... | head`: stop quietly
        _silence_stdout()
        return 1
    except (MhrError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
