"""The plugin's command logic without a cluster: argument habits, error translation, the watch loop and the
action rule. The API calls themselves are exercised against the real control plane in
tests/integration/test_kubectl_plugin.py."""

from __future__ import annotations

import io
import json

import pytest
from kubernetes.client.exceptions import ApiException

from recserve_kubectl import cli
from recserve_kubectl.api import CliError, Forbidden, NotFound, Target, translate


def test_common_flags_work_before_and_after_the_command() -> None:
    p = cli.parser()
    before = p.parse_args(["-n", "shop", "--context", "prod", "get", "ctr"])
    after = p.parse_args(["get", "ctr", "-n", "shop", "--context", "prod", "-o", "yaml"])
    assert (before.namespace, before.context, before.name) == ("shop", "prod", "ctr")
    assert (after.namespace, after.context, after.output) == ("shop", "prod", "yaml")
    assert p.parse_args(["list", "-A"]).all_namespaces is True


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["promote"])
    assert exc.value.code == 2 and "name" in capsys.readouterr().err


def _api_error(status: int, message: str) -> ApiException:
    exc = ApiException(status=status, reason="Forbidden" if status == 403 else "x")
    exc.body = json.dumps({"kind": "Status", "message": message})
    return exc


def test_api_errors_name_the_verb_the_resource_and_the_namespace() -> None:
    target = Target("patch", "recommendermodels.recserve.dev", "shop", "ctr")
    denied = translate(_api_error(403, 'User "alice" cannot patch resource "recommendermodels"'), target)
    assert isinstance(denied, Forbidden)
    assert str(denied) == ('forbidden: cannot patch recommendermodels.recserve.dev "ctr" in namespace "shop": '
                           'User "alice" cannot patch resource "recommendermodels"')  # fmt: skip
    missing = translate(_api_error(404, "gone"), Target("get", "recommendermodels.recserve.dev", "shop", "x"))
    assert isinstance(missing, NotFound)
    assert str(missing) == 'recommendermodels.recserve.dev "x" in namespace "shop" not found'
    listing = translate(_api_error(403, "no"), Target("list", "recommendermodels.recserve.dev", None))
    assert str(listing).startswith("forbidden: cannot list recommendermodels.recserve.dev in any namespace")
    odd = translate(_api_error(500, "etcd timeout"), target)
    assert type(odd) is CliError and "HTTP 500: etcd timeout" in str(odd)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_watch_redraws_in_place_retries_a_transient_error_and_ctrl_c_exits_0() -> None:
    frames = iter(["frame one\n", CliError("cannot reach the API server: refused"), "frame two\nmore\n"])

    def frame() -> str:
        item = next(frames)
        if isinstance(item, Exception):
            raise item
        return item

    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    out = _Tty()
    assert cli.watch(frame, 1.5, out, sleep=sleep) == 0
    text = out.getvalue()
    assert text.startswith(cli.HIDE_CURSOR) and text.endswith(cli.SHOW_CURSOR)
    assert text.count(cli.HOME) == 4  # the clear, then one per frame: always redrawn from the top
    assert "frame one" + cli.CLEAR_TO_EOL in text and "(retrying: cannot reach the API server: refused)" in text
    assert sleeps == [1.5, 1.5, 1.5]


def test_watch_ends_with_the_error_when_the_model_is_gone() -> None:
    def frame() -> str:
        raise NotFound('recommendermodels.recserve.dev "x" in namespace "d" not found')

    out = _Tty()
    with pytest.raises(NotFound):
        cli.watch(frame, 1, out, sleep=lambda s: None)
    assert out.getvalue().endswith(cli.SHOW_CURSOR)


def test_watch_without_a_terminal_prints_each_changed_frame_once() -> None:
    frames = iter(["a\n", "a\n", "b\n"])

    def sleep(s: float) -> None:
        if not frames.__length_hint__():
            raise KeyboardInterrupt

    out = io.StringIO()
    cli.watch(lambda: next(frames), 1, out, sleep=sleep)
    assert out.getvalue().count("a\n") == 1 and out.getvalue().count("b\n") == 1 and "\x1b" not in out.getvalue()
