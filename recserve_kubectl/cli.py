"""`kubectl recserve`: list, get (--watch), promote|abort|pause|resume and build-log for RecommenderModels.

kubectl finds the `kubectl-recserve` console script on PATH and passes every argument after `recserve`; the
plugin reads the same kubeconfig and context kubectl would (KUBECONFIG, --kubeconfig, --context, -n).
Exit codes: 0 done, 1 refused or failed (one `error:` line, never a traceback), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import yaml
from recserve_operator.names import (
    BUILDER,
    BUILDER_CONTAINER,
    COMPONENT_LABEL,
    INSTANCE_LABEL,
    REVISION_LABEL,
    ROLLOUT_ACTION_ANNOTATION,
)
from recserve_operator.rollout.controls import refusal
from recserve_operator.rollout.policy import ManualAction
from recserve_operator.rollout.state import RolloutState

from recserve_kubectl.api import RESOURCE, Api, CliError, Forbidden, NotFound
from recserve_kubectl.view import render_list, render_model, selector, summarize, utcnow

ACTIONS = ("promote", "abort", "pause", "resume")
CLEAR_TO_EOL, CLEAR_BELOW, HOME = "\x1b[K", "\x1b[J", "\x1b[H"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


def _common(p: argparse.ArgumentParser, *, sub: bool) -> None:
    # On subcommands the defaults are suppressed so `kubectl recserve -n x get m` and `... get m -n x` both work.
    d: dict[str, Any] = {"default": argparse.SUPPRESS} if sub else {"default": None}
    p.add_argument("-n", "--namespace", help="namespace (default: the context's, else 'default')", **d)
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)", **d)
    p.add_argument("--context", help="kubeconfig context (default: the current one)", **d)
    p.add_argument("-o", "--output", choices=("text", "json", "yaml"), help="output format (default text)", **d)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubectl recserve", description="Operate RecommenderModel rollouts.")
    _common(p, sub=False)
    subs = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ls = subs.add_parser("list", help="models with phase, revisions, weight, step, analysis verdict, age")
    ls.add_argument("-A", "--all-namespaces", action="store_true", help="models in every namespace")
    get = subs.add_parser("get", help="one model: revisions, pods, steps, analyses, A/B table, events")
    get.add_argument("name")
    get.add_argument("-w", "--watch", action="store_true", help="redraw in place until Ctrl-C")
    get.add_argument("--interval", type=float, default=2.0, help="seconds between redraws with --watch")
    for action in ACTIONS:
        a = subs.add_parser(action, help=f"{action} the rollout in progress (the rollout-action annotation)")
        a.add_argument("name")
    log = subs.add_parser("build-log", help="the model-repo-builder's output for a revision")
    log.add_argument("name")
    log.add_argument("--revision", help="revision hash (default: the latest revision)")
    for s in subs.choices.values():
        _common(s, sub=True)
    return p


def _dump(data: Any, fmt: str, out: TextIO) -> None:
    if fmt == "json":
        out.write(json.dumps(data, indent=2, sort_keys=False) + "\n")
    else:
        out.write(yaml.safe_dump(data, sort_keys=False))


def _view(api: Api, name: str) -> dict[str, Any]:
    obj = api.get_model(name)
    ns = api.namespace
    return summarize(obj, api.list_pods(ns, selector(name)), api.list_deployments(ns, selector(name)),
                     api.list_events(ns, name))  # fmt: skip


def cmd_list(api: Api, args: argparse.Namespace, out: TextIO) -> int:
    models = sorted(api.list_models(args.all_namespaces),
                    key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))  # fmt: skip
    views = [summarize(o) for o in models]
    if args.output in ("json", "yaml"):
        _dump({"items": views}, args.output, out)
    elif not views:
        where = "any namespace" if args.all_namespaces else f"namespace {api.namespace}"
        print(f"No RecommenderModels found in {where}.", file=sys.stderr)
    else:
        out.write(render_list(views, all_namespaces=args.all_namespaces, now=utcnow()))
    return 0


def cmd_get(api: Api, args: argparse.Namespace, out: TextIO) -> int:
    if args.watch:
        return watch(lambda: render_model(_view(api, args.name), utcnow()), args.interval, out)
    view = _view(api, args.name)
    if args.output in ("json", "yaml"):
        _dump(view, args.output, out)
    else:
        out.write(render_model(view, utcnow()))
    return 0


def watch(
    frame: Callable[[], str], interval: float, out: TextIO, *, sleep: Callable[[float], None] = time.sleep
) -> int:
    """Redraw `frame()` in place every `interval` seconds until Ctrl-C (exit 0). A transient API failure is shown
    on screen and retried; the model disappearing ends the watch with its error."""
    tty = out.isatty()
    last = ""
    try:
        if tty:
            out.write(HIDE_CURSOR + HOME + CLEAR_BELOW)
        while True:
            try:
                text = frame()
            except CliError as exc:
                if isinstance(exc, NotFound | Forbidden):  # not transient: retrying cannot help
                    raise
                text = (last or "") + f"\n(retrying: {exc})\n"
            stamp = f"Every {interval:g}s: kubectl recserve get --watch    {utcnow():%Y-%m-%d %H:%M:%S} UTC\n\n"
            if tty:
                body = "".join(line + CLEAR_TO_EOL + "\n" for line in (stamp + text).splitlines())
                out.write(HOME + body + CLEAR_BELOW)
            elif text != last:
                out.write(stamp + text + "\n")
            out.flush()
            last = text
            sleep(interval)
    except KeyboardInterrupt:
        return 0
    finally:
        if tty:
            out.write(SHOW_CURSOR)
            out.flush()


def cmd_action(api: Api, args: argparse.Namespace, out: TextIO) -> int:
    action = ManualAction(args.command)
    obj = api.get_model(args.name)
    state = RolloutState.from_status(obj.get("status"))
    why = refusal(state, action)
    if why is not None:
        raise CliError(f"cannot {action.value} {RESOURCE}/{args.name}: {why}")
    pending = ((obj.get("metadata") or {}).get("annotations") or {}).get(ROLLOUT_ACTION_ANNOTATION)
    api.annotate_model(args.name, {ROLLOUT_ACTION_ANNOTATION: action.value})
    note = f" (replaces the pending {pending!r})" if pending and pending != action.value else ""
    out.write(f"{RESOURCE}/{args.name}: {action.value} requested for revision {state.revision}{note}; "
              f"the operator acts on it at its next reconcile\n")  # fmt: skip
    return 0


def _builder_state(pod: dict[str, Any]) -> tuple[dict[str, Any], int]:
    status = pod.get("status") or {}
    for s in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        if s.get("name") == BUILDER_CONTAINER:
            return dict(s.get("state") or {}), int(s.get("restartCount") or 0)
    return {}, 0


def cmd_build_log(api: Api, args: argparse.Namespace, out: TextIO) -> int:
    obj = api.get_model(args.name)
    status = obj.get("status") or {}
    revision = args.revision or status.get("latestRevision") or (status.get("stable") or {}).get("revision")
    if not revision:
        raise CliError(f"{RESOURCE}/{args.name} has no revision yet (the operator has not reconciled it)")
    # With a model store the revision builds once, in its build Job's pod; otherwise in each serving pod.
    pods = api.list_pods(api.namespace, f"{INSTANCE_LABEL}={args.name},{COMPONENT_LABEL}={BUILDER},"
                                        f"{REVISION_LABEL}={revision}")  # fmt: skip
    pods = pods or api.list_pods(api.namespace, f"{selector(args.name)},{REVISION_LABEL}={revision}")
    if not pods:
        others = sorted({(p["metadata"].get("labels") or {}).get(REVISION_LABEL, "?")
                         for p in api.list_pods(api.namespace, selector(args.name))})  # fmt: skip
        have = f"; revisions with pods: {', '.join(others)}" if others else ""
        raise CliError(f"no pod of revision {revision} of {RESOURCE}/{args.name} exists, so its build log is gone "
                       f"(builds run in the revision's build Job, or in each pod's {BUILDER_CONTAINER} init "
                       f"container){have}")  # fmt: skip
    # The oldest pod has built the longest; the ordering is stable across calls.
    pod = min(pods, key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"]))
    state, restarts = _builder_state(pod)
    if "waiting" in state and not restarts:
        raise CliError(f"the build of revision {revision} has not started yet in pod {pod['metadata']['name']} "
                       f"({state['waiting'].get('reason', 'waiting')})")  # fmt: skip
    previous = "waiting" in state  # a failed build restarting: its last attempt's output
    text = api.pod_log(api.namespace, pod["metadata"]["name"], BUILDER_CONTAINER, previous=previous)
    which = "previous attempt" if previous else "running" if "running" in state else "finished"
    print(f"# revision {revision}, pod {pod['metadata']['name']}, container {BUILDER_CONTAINER} ({which})",
          file=sys.stderr)  # fmt: skip
    out.write(text if text.endswith("\n") or not text else text + "\n")
    return 0


COMMANDS: dict[str, Callable[[Api, argparse.Namespace, TextIO], int]] = {
    "list": cmd_list, "get": cmd_get, "build-log": cmd_build_log, **dict.fromkeys(ACTIONS, cmd_action),
}  # fmt: skip


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = parser().parse_args(argv)  # the top-level parser defaults the common flags; subcommands never unset them
    stream = out or sys.stdout
    try:
        api = Api.connect(args.kubeconfig, args.context, args.namespace)
        return COMMANDS[args.command](api, args, stream)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `kubectl recserve list | head`
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
