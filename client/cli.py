"""``mhr``: the command line of mhr-client (argparse + standard library only).

Exit status: 0 done, 1 failure (server error, transport error, adaptation not succeeded), 2 a refused request
(4xx) or a usage error. The server comes from --url / $MHR_URL, the key from --api-key / $MHR_API_KEY.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import httpx

from ._base import DEFAULT_URL, Task
from ._cli_args import UsageError, _guided, _sampling
from ._client import Client
from .exceptions import ApiError, MhrError
from .models import AdaptJob, GenerateResponse, Model

Handler = Callable[[Client, argparse.Namespace], int]
RETRIEVE = "retrieve"  # the adaptation method that trains nothing: its job has no steps to show


def parse_mix(pairs: Sequence[str]) -> dict[str, float]:
    """``["alpha=0.7", "beta=0.3"]`` -> ``{"alpha": 0.7, "beta": 0.3}``; ValueError saying which pair is wrong."""
    mix: dict[str, float] = {}
    for pair in pairs:
        task, _, weight = pair.rpartition("=")
        if not task or not weight:
            raise ValueError(f"expected TASK=WEIGHT, got {pair!r}")
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"the weight in {pair!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"the weight in {pair!r} is not a finite number")
        if task in mix:
            raise ValueError(f"task {task!r} is given twice")
        mix[task] = value
    return mix


def mix_text(mix: dict[str, float]) -> str:
    """``alpha=0.7,beta=0.3``: what ``--mix`` and ``mhr compose`` read."""
    return ",".join(f"{task}={weight:g}" for task, weight in mix.items())


class MixArgument(argparse.Action):
    """TASK=WEIGHT pairs, comma-separated and/or one per argument, stored as {task: weight}; bad syntax is a usage
    error naming the argument (``argument --mix: expected TASK=WEIGHT, got 'alpha'``)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        items = values if isinstance(values, list) else [values]
        try:
            setattr(namespace, self.dest, parse_mix([pair for item in items for pair in item.split(",")]))
        except ValueError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None


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


def task_and_texts(args: argparse.Namespace) -> tuple[Task, list[str]]:
    """``TASK TEXT...``, or with ``--mix`` every positional argument is a TEXT."""
    if args.mix is not None:
        return args.mix, args.text
    if len(args.text) < 2:
        raise UsageError(f"{args.command} needs a TASK and at least one TEXT, or --mix TASK=WEIGHT,... and TEXT")
    return args.text[0], args.text[1:]


def cmd_generate(mhr: Client, args: argparse.Namespace) -> int:
    task, texts = task_and_texts(args)
    inputs = texts[0] if len(texts) == 1 else texts
    if not args.stream:
        response = mhr.generate(task, inputs, **_sampling(args), logprobs=args.logprobs, guided=_guided(args))
        _print_json(response) if args.json else _print_outputs(response, args.logprobs is not None)
        return 0
    final: GenerateResponse | None = None
    for event in mhr.stream(task, inputs, **_sampling(args), guided=_guided(args)):
        if args.json:
            print(event.model_dump_json(exclude_none=True), flush=True)
        elif event.done:
            final = event.response
        elif len(texts) == 1:
            print(event.text, end="", flush=True)
    if final is not None:
        print("\n".join(final.texts) if len(texts) > 1 else "")
    return 0


def _print_outputs(response: GenerateResponse, with_logprobs: bool) -> None:
    """The texts, one a line; with --logprobs each is followed by its tokens: token, log-probability, top tokens."""
    for output in response.outputs:
        print(output.text)
        for entry in (output.logprobs or []) if with_logprobs else []:
            top = " ".join(f"{t.token!r}={t.logprob:.4f}" for t in entry.top)
            print(f"  {entry.token!r}\t{entry.logprob:.4f}\t{top}")


def cmd_score(mhr: Client, args: argparse.Namespace) -> int:
    task, texts = task_and_texts(args)
    response = mhr.score(task, texts[0] if len(texts) == 1 else texts, args.choice)
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
        rows = [[t.name, t.kind, str(t.version), t.method, mix_text(t.mix) if t.mix else (t.reason or "")]
                for t in tasks]
        _table([["NAME", "KIND", "VERSION", "METHOD", "MIX"]] + rows)  # a broken task: its reason under MIX
    return 0


def cmd_compose(mhr: Client, args: argparse.Namespace) -> int:
    info = mhr.compose(args.name, args.mix, overwrite=args.overwrite)
    if args.json:
        _print_json(info)
    else:
        print(f"composed {info.name} (version {info.version}): {mix_text(info.mix or {})}")
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
    """``alpha [#####-------] 40/150 running loss 1.2345 12s left``; ``alpha [retrieve] succeeded loss 0.8 in 2s``."""
    if job.method == RETRIEVE:
        parts = [f"{job.task} [{RETRIEVE}]", job.state]
    else:
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
    job = mhr.adapt(args.task, examples, method=args.method, init=args.init, k=args.k, steps=args.steps,
                    learning_rate=args.lr, batch_size=args.batch_size, seed=args.seed,
                    validation_fraction=args.validation_fraction, overwrite=args.overwrite)
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
    if job.mix and not args.quiet:
        sys.stdout.flush()
        found = "retrieved mix" if job.method == RETRIEVE else "started from the retrieved mix"
        print(f"{job.task}: {found} {mix_text(job.mix)}", file=sys.stderr)
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


def _task_or_mix(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="+", metavar="[TASK] TEXT",
                        help="the task's name (unless --mix), then one input per argument")
    parser.add_argument("--mix", action=MixArgument, metavar="TASK=WEIGHT,...",
                        help="serve a skill-space mix of tasks (weights normalised to sum 1) instead of one task; "
                        "every positional argument is then an input")


def _generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--min-new-tokens", type=int, help="no end of sequence before this many new tokens")
    parser.add_argument("--ignore-eos", action="store_true", help="generate up to --max-new-tokens regardless")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--num-beams", type=int)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated")
    parser.add_argument("--json-schema", metavar="FILE", help="structured output: the text is JSON valid against "
                        "the schema in FILE")
    parser.add_argument("--regex", metavar="RE", help="structured output: the text matches RE (Rust regex syntax)")
    parser.add_argument("--logprobs", type=int, metavar="K",
                        help="also print each token's log-probability and the K most likely tokens (not with --stream)")
    parser.add_argument("--json", action="store_true", help="print the whole response (JSON lines with --stream)")


def _adapt_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", help="the new task's name")
    parser.add_argument("--examples", required=True, help="FILE.jsonl or FILE.json of {input, target} ('-': stdin)")
    parser.add_argument("--method", default="mhr-z",
                        help="mhr-z (default), poly-z, mhr-mu, or retrieve (no training: the best mix of known tasks)")
    parser.add_argument("--init", help="where mhr-z / poly-z start: uniform (default) or retrieve (the retrieved mix)")
    parser.add_argument("--k", type=int, help="tasks a retrieved mix keeps (default 3)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lr", type=float, help="learning rate")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--validation-fraction", type=float)
    parser.add_argument("--overwrite", action="store_true", help="replace an adapted or composed task of this name")
    parser.add_argument("--no-wait", action="store_true", help="print the queued job and return")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (nor the retrieved mix)")
    parser.add_argument("--poll-interval", type=float, default=0.5, help="seconds between polls (default 0.5)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhr", description="Command line client for mhr-serve.")
    _connection_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, help_: str, usage: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_, usage=usage)
        _connection_options(sub, top=False)
        sub.set_defaults(handler=handler)
        return sub

    task_or_mix = "(TASK | --mix TASK=WEIGHT,...) TEXT [TEXT ...]"
    sub = command("generate", cmd_generate, "generate text for one input (or several) with a task or a mix",
                  f"%(prog)s [options] {task_or_mix}")
    _task_or_mix(sub)
    _generation_options(sub)
    sub = command("score", cmd_score, "rank choices by log-likelihood; prints the best choice and the scores",
                  f"%(prog)s [options] {task_or_mix} --choice CHOICE [--choice CHOICE ...]")
    _task_or_mix(sub)
    sub.add_argument("--choice", action="append", required=True, help="a choice (repeat for each)")
    sub.add_argument("--json", action="store_true")
    sub = command("tasks", cmd_tasks, "list the tasks (or show one); MIX: a composed task's recipe")
    sub.add_argument("name", nargs="?")
    sub.add_argument("--json", action="store_true")
    sub = command("compose", cmd_compose, "save a skill-space mix of tasks under a name (a composed task)")
    sub.add_argument("name", metavar="NAME", help="the composed task's name")
    sub.add_argument("mix", nargs="+", action=MixArgument, metavar="TASK=WEIGHT",
                     help="a task and its weight, one per argument (or comma-separated); normalised to sum 1")
    sub.add_argument("--overwrite", action="store_true", help="replace an adapted or composed task of this name")
    sub.add_argument("--json", action="store_true", help="print the new task as JSON")
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
