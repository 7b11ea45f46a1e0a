"""The `surge` command: generate, chat, serve, bench, eval, quantize. User errors print one clear line and exit with code 2."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from surge.errors import InvalidArgumentError, SurgeError

EXIT_USAGE = 2


def _add_model_args(p: argparse.ArgumentParser, serve: bool = False) -> None:
    """Every engine setting as a flag (from EngineArgs), and -v."""
    from surge.engine.args import EngineArgs

    EngineArgs.add_cli_args(p, serve=serve)
    p.add_argument("-v", "--verbose", action="store_true", help="log loading and cache details to stderr")


def _size(flag: str) -> Callable[[str], int]:
    def parse(value: str) -> int:
        from surge.engine.args import parse_bytes

        try:
            return parse_bytes(value, flag)
        except InvalidArgumentError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return parse


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)


def _sampling(args: argparse.Namespace) -> Any:
    from surge.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.seed, stop=args.stop, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
    )


def _engine_args(args: argparse.Namespace) -> Any:
    from surge.engine.args import EngineArgs

    return EngineArgs.from_cli_args(args)


def _load(args: argparse.Namespace) -> Any:
    from surge.entrypoints.llm import LLM

    return LLM.from_engine_args(_engine_args(args))


def _streamer(write: Callable[[str], None]) -> Callable[[Any], None]:
    """An on_output callback that writes each new piece of text as it arrives."""
    shown: dict[str, int] = {}

    def on_output(out: Any) -> None:
        text = out.outputs[0].text
        start = shown.get(out.request_id, 0)
        if len(text) > start:
            write(text[start:])
            shown[out.request_id] = len(text)

    return on_output


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling(args)
    llm = _load(args)
    prompts = args.prompt
    if args.chat:
        if len(prompts) == 1:
            outputs = llm.chat([{"role": "user", "content": prompts[0]}], params,
                               on_output=None if params.stop else _streamer(_write))
        else:
            outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    elif len(prompts) == 1 and not params.stop:
        _write(prompts[0])
        outputs = llm.generate(prompts, params, on_output=_streamer(_write))
    else:
        outputs = llm.generate(prompts, params)
    if len(prompts) == 1:
        if params.stop:
            _write(("" if args.chat else prompts[0]) + outputs[0].outputs[0].text)
        _write("\n")
    else:
        for prompt, out in zip(prompts, outputs):
            _write(f"--- {prompt!r}\n{'' if args.chat else prompt}{out.outputs[0].text}\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = _sampling(args)
    llm = _load(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print("surge chat: type a message, Enter to send; /reset clears the history, Ctrl-D quits.",
              file=sys.stderr)
    while True:
        if interactive:
            _write("> ")
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        out = llm.chat(messages, params, on_output=_streamer(_write))[0]
        _write("\n")
        messages.append({"role": "assistant", "content": out.outputs[0].text})
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses

    from surge.engine.data_parallel import build_engine
    from surge.loader.hub import resolve_model
    from surge.server.budget import MemoryBudget
    from surge.platform import default_device
    from surge.server.repository import ModelRepository
    from surge.server.serve import serve
    from surge.server.settings import settings_from_args
    from surge.worker.kv_cache import available_memory

    if args.repository_poll_interval is not None and args.repository_poll_interval <= 0:
        raise InvalidArgumentError(f"--repository-poll-interval must be positive, got {args.repository_poll_interval}")
    settings = settings_from_args(args)  # bad server flags fail here, before anything loads
    defaults = _engine_args(args)
    budget_bytes = args.memory_budget or int(available_memory(args.device or default_device()) * 0.9)
    budget = MemoryBudget(budget_bytes)

    def factory(path: str | None, engine_args: Any, reserve: Any) -> Any:
        return build_engine(dataclasses.replace(engine_args, model=path), reserve)

    if args.model_repository is not None:
        if args.model is not None or args.served_model_name is not None:
            raise InvalidArgumentError("give either --model (and --served-model-name) or --model-repository, not both")
        repository = ModelRepository.from_directory(args.model_repository, factory, defaults, budget)
        if not repository.scan():
            logging.getLogger("surge.serve").warning(
                "the model repository %s holds no model yet (expected <name>/<version>/ directories)",
                repository.root)
    else:
        if args.repository_poll_interval is not None:
            raise InvalidArgumentError("--repository-poll-interval needs --model-repository")
        source = resolve_model(args.model)  # a bad path fails here, before the server starts
        repository = ModelRepository(factory, defaults, budget)
        repository.add_model(args.served_model_name or source.name, None if args.model is None else source.path)
    return serve(repository, settings, args.repository_poll_interval,
                 exit_on_load_failure=args.model_repository is None)


def build_parser() -> argparse.ArgumentParser:
    from surge import __version__

    parser = argparse.ArgumentParser(prog="surge", description="Fast LLM inference on PyTorch.")
    parser.add_argument("--version", action="version", version=f"surge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one or more prompts and print the result")
    _add_model_args(gen)
    _add_sampling_args(gen, max_tokens=64)
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.add_argument("prompt", nargs="+", help="prompt text (several prompts run as one batch)")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with the model's chat template, streamed")
    _add_model_args(chat)
    _add_sampling_args(chat, max_tokens=512)
    chat.add_argument("--system", default=None, help="system message")
    chat.set_defaults(func=cmd_chat)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, metrics)")
    _add_model_args(srv, serve=True)
    from surge.server.settings import add_server_args

    srv.add_argument("--served-model-name", default=None, help="the model name clients send (default: the file name)")
    srv.add_argument("--model-repository", default=None, metavar="DIR",
                     help="serve every model in DIR/<name>/<version>/ (instead of --model)")
    srv.add_argument("--repository-poll-interval", type=float, default=None, metavar="S",
                     help="rescan the repository every S seconds: load new versions, switch them in when ready")
    srv.add_argument("--memory-budget", type=_size("--memory-budget"), default=None, metavar="SIZE",
                     help="memory for all loaded models (weights + KV caches); a load beyond it is refused "
                          "(default: 90%% of the memory available at start)")
    add_server_args(srv, size=_size)
    srv.set_defaults(func=cmd_serve)

    from surge.entrypoints.bench import add_bench_parser, cmd_bench

    add_bench_parser(sub, _add_model_args)
    sub.choices["bench"].set_defaults(func=lambda args: cmd_bench(args, _load))

    from surge.entrypoints.evaluate import add_eval_parser, cmd_eval

    add_eval_parser(sub, _add_model_args)
    sub.choices["eval"].set_defaults(func=cmd_eval)

    from surge.entrypoints.quantize import add_quantize_parser

    add_quantize_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False) or args.command == "serve"
    if args.command == "serve":  # every line of the server names the request it belongs to ("-": none)
        from surge.server.guard import RequestIdFilter

        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(RequestIdFilter())
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[handler])
    else:
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except SurgeError as exc:
        print(f"surge: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
