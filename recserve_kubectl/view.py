"""Pure views of RecommenderModels: API objects in, a JSON-able summary and kubectl-style text out.

`summarize` is the one reading of status, pods, Deployments and events; `-o json|yaml` prints its result and the
text renderers only format it, so the two outputs never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from recserve_operator.names import INSTANCE_LABEL, MODEL_VERSION_ANNOTATION, REVISION_LABEL
from recserve_operator.rollout.policy import parse_duration
from recserve_operator.rollout.state import parse_time

__all__ = ["age", "render_list", "render_model", "selector", "summarize"]

EVENTS_SHOWN = 10
PREDICTOR_SELECTOR = "app.kubernetes.io/component=predictor"


def selector(name: str) -> str:
    """The label selector of one model's Triton pods and Deployments (the operator's instance labels)."""
    return f"{INSTANCE_LABEL}={name},{PREDICTOR_SELECTOR}"


def age(then: datetime | None, now: datetime) -> str:
    """kubectl's short ages: 42s, 5m10s, 3h12m, 4d."""
    if then is None:
        return "<unknown>"
    s = max(0, int((now - then).total_seconds()))
    if s < 120:
        return f"{s}s"
    if s < 600:
        return f"{s // 60}m{s % 60}s" if s % 60 else f"{s // 60}m"
    if s < 3 * 3600:
        return f"{s // 60}m"
    if s < 48 * 3600:
        return f"{s // 3600}h{(s % 3600) // 60}m" if s < 8 * 3600 and (s % 3600) // 60 else f"{s // 3600}h"
    return f"{s // 86400}d"


def _conditions(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {k: c.get(k) for k in ("type", "status", "reason", "message", "lastTransitionTime")}
        for c in status.get("conditions") or []
        if isinstance(c, Mapping)
    ]


def _condition_status(conds: Sequence[Mapping[str, Any]], type_: str) -> str:
    return next((str(c.get("status")) for c in conds if c.get("type") == type_), "Unknown")


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def _revisions(
    status: Mapping[str, Any], canary: Mapping[str, Any], pods: Iterable[Mapping[str, Any]],
    deployments: Iterable[Mapping[str, Any]],
) -> list[dict[str, Any]]:  # fmt: skip
    """One row per revision that runs or is named in status: role, weight, pods ready of pods."""
    stable = (status.get("stable") or {}).get("revision") or canary.get("stableRevision")
    progressing = canary.get("phase") == "Progressing"
    candidate = canary.get("revision") if progressing else None
    shadowing = progressing and bool(canary.get("shadowing"))
    retiring = canary.get("retiringRevision")
    weight = int(canary.get("weight") or 0) if progressing else 0
    rows: dict[str, dict[str, Any]] = {}

    def row(rev: str) -> dict[str, Any]:
        return rows.setdefault(rev, {"revision": rev, "role": "old", "modelVersion": None, "weight": 0,
                                     "replicas": 0, "podsReady": 0, "pods": 0})  # fmt: skip

    for dep in deployments:
        meta = dep.get("metadata") or {}
        rev = (meta.get("labels") or {}).get(REVISION_LABEL)
        if rev:
            r = row(rev)
            r["modelVersion"] = (meta.get("annotations") or {}).get(MODEL_VERSION_ANNOTATION)
            r["replicas"] = int((dep.get("spec") or {}).get("replicas") or 0)
    for pod in pods:
        meta = pod.get("metadata") or {}
        rev = (meta.get("labels") or {}).get(REVISION_LABEL)
        if rev and not meta.get("deletionTimestamp"):
            r = row(rev)
            r["pods"] += 1
            r["podsReady"] += int(_pod_ready(pod))
    if stable:
        row(stable).update(role="stable", weight=100 - weight)
    if candidate:
        # In the shadow phase the candidate gets mirrored requests only: no user traffic, no weight.
        row(candidate).update(role="shadow" if shadowing else "candidate", weight=0 if shadowing else weight)
    if retiring and retiring in rows and retiring != stable:
        rows[retiring]["role"] = "retiring"
    if stable and stable in rows and rows[stable]["modelVersion"] is None:
        rows[stable]["modelVersion"] = (status.get("stable") or {}).get("modelVersion")
    order = {"stable": 0, "retiring": 1, "candidate": 2, "shadow": 2, "old": 3}
    return sorted(rows.values(), key=lambda r: (order[r["role"]], r["revision"]))


def _steps(spec: Mapping[str, Any], canary: Mapping[str, Any]) -> list[dict[str, Any]]:
    rollout = spec.get("rollout") or {}
    if rollout.get("strategy") != "canary":
        return []
    stepping = canary.get("phase") == "Progressing" and not canary.get("shadowing")  # shadow comes before step 1
    current = int(canary.get("step") or 0) if stepping else None
    steps = []
    for i, s in enumerate(rollout.get("steps") or []):
        pause = s.get("pause", "0s")
        steps.append({"index": i, "weight": s.get("weight"), "pause": pause, "current": i == current,
                      "pauseSeconds": parse_duration(pause, f"rollout.steps[{i}].pause")})  # fmt: skip
    return steps


def _thresholds(spec: Mapping[str, Any]) -> dict[str, Any]:
    analysis = (spec.get("rollout") or {}).get("analysis") or {}
    keys = ("interval", "maxErrorRate", "maxP99LatencyMs", "minRequests", "failureLimit")
    return {k: analysis[k] for k in keys if k in analysis}


SHADOW_SETTINGS = ("percent", "topK", "minRequests", "duration")


def _shadow(spec: Mapping[str, Any], canary: Mapping[str, Any], active: bool) -> dict[str, Any] | None:
    """The shadow phase: its settings and thresholds (spec.rollout.shadow), whether the candidate is in it now, and
    the last shadow look (status.canary.shadow, kept after the phase). None for a model that never had one."""
    policy = (spec.get("rollout") or {}).get("shadow")
    last = canary.get("shadow")
    if not isinstance(policy, Mapping) and not isinstance(last, Mapping):
        return None
    policy = policy if isinstance(policy, Mapping) else {}
    return {
        "active": active,
        "revision": canary.get("revision") if active or last else None,
        **{k: policy.get(k) for k in SHADOW_SETTINGS},
        "thresholds": {k: v for k, v in policy.items() if k not in SHADOW_SETTINGS},
        "last": dict(last) if isinstance(last, Mapping) else None,
    }


def _verdict(strategy: str, canary: Mapping[str, Any], ab: Mapping[str, Any] | None) -> str:
    """One word or two for the list: the analysis or A/B state of the current (or last) rollout."""
    if strategy == "abTest" and ab:
        winner = ab.get("winner")
        if winner:
            return "no winner" if winner == "none" else f"winner {winner}"
        p = ab.get("sequentialPValue")
        return f"running p={p:.3g}" if isinstance(p, int | float) else "running"
    if strategy == "abTest" and canary.get("phase") == "Progressing":
        return "waiting"
    last = canary.get("lastAnalysis") or {}
    return str(last.get("verdict") or "-")


def _events(events: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    def when(e: Mapping[str, Any]) -> str:
        return str(e.get("lastTimestamp") or e.get("eventTime") or e.get("firstTimestamp") or "")

    rows = [
        {"time": when(e), "type": e.get("type"), "reason": e.get("reason"), "message": e.get("message"),
         "count": e.get("count") or 1}
        for e in sorted(events, key=when)
    ]  # fmt: skip
    return rows[-EVENTS_SHOWN:]


def summarize(
    obj: Mapping[str, Any],
    pods: Iterable[Mapping[str, Any]] = (),
    deployments: Iterable[Mapping[str, Any]] = (),
    events: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Everything `list` and `get` show about one model, as plain data."""
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    canary: Mapping[str, Any] = status.get("canary") or {}
    ab: Mapping[str, Any] | None = status.get("abTest")
    strategy = str((spec.get("rollout") or {}).get("strategy") or "immediate")
    conds = _conditions(status)
    steps = _steps(spec, canary)
    progressing = canary.get("phase") == "Progressing"
    shadowing = progressing and bool(canary.get("shadowing"))
    shadow = _shadow(spec, canary, shadowing)
    analyses = list(canary.get("analyses") or ([canary["lastAnalysis"]] if canary.get("lastAnalysis") else []))
    return {
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "created": meta.get("creationTimestamp"),
        "phase": status.get("phase") or "Pending",
        "ready": _condition_status(conds, "Ready"),
        "strategy": strategy,
        "rollout": {
            "phase": canary.get("phase") or "Idle",
            "stableRevision": (status.get("stable") or {}).get("revision") or canary.get("stableRevision"),
            "candidateRevision": canary.get("revision") if progressing else None,
            "lastRevision": canary.get("revision"),
            "weight": int(canary.get("weight") or 0) if progressing else 0,
            "step": int(canary.get("step") or 0) if progressing and steps and not shadowing else None,
            "shadowing": shadowing,
            "mirrorPercent": shadow["percent"] if shadow and shadowing else None,
            "steps": len(steps),
            "paused": bool(canary.get("paused")) if progressing else False,
            "message": canary.get("message") or "",
            "reason": canary.get("reason") or "",
            "verdict": _verdict(strategy, canary, ab),
        },
        "revisions": _revisions(status, canary, pods, deployments),
        "steps": steps,
        "thresholds": _thresholds(spec),
        "analyses": analyses,
        "shadow": shadow,
        "abTest": dict(ab) if ab else None,
        "conditions": conds,
        "events": _events(events),
        "endpoints": status.get("endpoints") or {},
    }


def _table(header: Sequence[str], rows: Iterable[Sequence[object]], indent: str = "") -> list[str]:
    cells = [list(header), *[["<none>" if v is None else str(v) for v in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return [indent + "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def _short(rev: object) -> str:
    return str(rev) if rev else "-"


def render_list(views: Sequence[Mapping[str, Any]], *, all_namespaces: bool, now: datetime) -> str:
    header = ["NAME", "PHASE", "ROLLOUT", "STABLE", "CANDIDATE", "WEIGHT", "STEP", "ANALYSIS", "AGE"]
    rows = []
    for v in views:
        r = v["rollout"]
        step = "shadow" if r["shadowing"] else f"{r['step'] + 1}/{r['steps']}" if r["step"] is not None else "-"
        rollout = f"{r['phase']} (paused)" if r["paused"] else r["phase"]
        weight = f"{r['weight']}%" if r["candidateRevision"] else "-"
        if r["shadowing"]:  # users' traffic all goes to the stable; the candidate sees mirrored copies
            weight = f"mirror {_fmt(r['mirrorPercent'])}%"
        row = [v["name"], v["phase"], rollout, _short(r["stableRevision"]), _short(r["candidateRevision"]), weight,
               step, r["verdict"], age(parse_time(v["created"]), now)]  # fmt: skip
        rows.append([v["namespace"], *row] if all_namespaces else row)
    if all_namespaces:
        header = ["NAMESPACE", *header]
    return "\n".join(_table(header, rows)) + "\n"


def _fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _checks(a: Mapping[str, Any]) -> str:
    """One look's checks against their thresholds: `errorRate=0.002 (max 0.01: ok); ...`."""
    shown = []
    for c in a.get("checks") or []:
        bound = " ".join(f"{k} {_fmt(c.get(k))}" for k in ("min", "max") if c.get(k) is not None)
        mark = {True: "ok", False: "FAILED", None: "no data"}[c.get("passed")]
        shown.append(f"{c.get('name')}={_fmt(c.get('value'))} ({bound}: {mark})")
    return "; ".join(shown)


def _thresholds_line(limits: Mapping[str, Any]) -> list[str]:
    return ["  thresholds: " + ", ".join(f"{k} {val}" for k, val in limits.items())] if limits else []


def _analysis_lines(v: Mapping[str, Any], now: datetime) -> list[str]:
    out = _thresholds_line(v["thresholds"])
    rows = []
    for a in v["analyses"]:
        verdict = f"{a.get('verdict')} (shadow)" if a.get("stage") == "shadow" else a.get("verdict")
        rows.append([age(parse_time(a.get("time")), now) + " ago", verdict, _fmt(a.get("requests")),
                     _checks(a) or a.get("reason") or "-"])  # fmt: skip
    if not rows:
        return [*out, "  (no analysis yet)"]
    return out + _table(["WHEN", "VERDICT", "REQUESTS", "CHECKS (value against thresholds)"], rows, "  ")


def _shadow_lines(shadow: Mapping[str, Any], now: datetime) -> list[str]:
    state = f"in progress, candidate {shadow['revision']}" if shadow["active"] else "not running"
    lines = [f"  mirror {_fmt(shadow['percent'])}% of live requests to the candidate, compare the top "
             f"{_fmt(shadow['topK'])}, at least {_fmt(shadow['minRequests'])} compared, for at least "
             f"{_fmt(shadow['duration'])} ({state})"]  # fmt: skip
    lines += _thresholds_line(shadow["thresholds"])
    last = shadow["last"]
    if not last:
        return [*lines, "  (no shadow look yet)"]
    m = last.get("measured") or {}
    counts = ", ".join(f"{k} {_fmt(m.get(k))}" for k in ("mirrored", "compared", "dropped"))
    lines.append(f"  last look {age(parse_time(last.get('time')), now)} ago: {last.get('verdict')} "
                 f"({last.get('decision')}), {counts}")  # fmt: skip
    lines.append(f"    {_checks(last) or last.get('reason') or '-'}")
    return lines


def _ab_lines(ab: Mapping[str, Any]) -> list[str]:
    rows = []
    for var in ab.get("variants") or []:
        ci = var.get("ci95")
        ci_s = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "-"
        ctr = var.get("ctr")
        rows.append([var.get("name"), _short(var.get("revision")), var.get("impressions"), var.get("clicks"),
                     f"{ctr:.4f}" if isinstance(ctr, int | float) else "-", ci_s])  # fmt: skip
    lines = _table(["VARIANT", "REVISION", "IMPRESSIONS", "CLICKS", "CTR", "95% CI"], rows, "  ")
    lift, lift_ci = ab.get("lift"), ab.get("liftCi95")
    lift_s = f"{lift:+.1%}" if isinstance(lift, int | float) else "-"
    if lift_ci:
        lift_s += f" [{lift_ci[0]:+.1%}, {lift_ci[1]:+.1%}]"
    winner = ab.get("winner")
    verdict = "running (no decision yet)" if not winner else "no winner" if winner == "none" else f"{winner} wins"
    lines.append(f"  p-value {_fmt(ab.get('pValue'), 3)} (sequential {_fmt(ab.get('sequentialPValue'), 3)}), "
                 f"lift {lift_s}, verdict: {verdict}")  # fmt: skip
    return lines


def render_model(v: Mapping[str, Any], now: datetime) -> str:
    r = v["rollout"]
    if r["shadowing"]:
        where = f", shadow phase: {_fmt(r['mirrorPercent'])}% of live requests mirrored, users get the stable's answers"
    else:
        where = f", candidate at {r['weight']}%" if r["candidateRevision"] else ""
    lines = [
        f"Name:        {v['name']}",
        f"Namespace:   {v['namespace']}",
        f"Phase:       {v['phase']} (Ready={v['ready']})",
        f"Strategy:    {v['strategy']}",
        f"Rollout:     {r['phase']}{' (paused)' if r['paused'] else ''}{where}",
    ]
    if r["message"]:
        lines.append(f"Message:     {r['message']}")
    if v["endpoints"]:
        lines.append("Endpoints:   " + ", ".join(f"{k} {u}" for k, u in sorted(v["endpoints"].items())))
    lines.append(f"Age:         {age(parse_time(v['created']), now)}")
    lines += ["", "Revisions:"]
    rev_rows = [[x["revision"], x["role"], x["modelVersion"] or "-", f"{x['weight']}%", f"{x['podsReady']}/{x['pods']}",
                 x["replicas"]] for x in v["revisions"]]  # fmt: skip
    lines += _table(["REVISION", "ROLE", "MODEL", "WEIGHT", "PODS READY", "REPLICAS"], rev_rows, "  ")
    if v["shadow"]:  # before the steps: the phase comes first
        lines += ["", "Shadow:"]
        lines += _shadow_lines(v["shadow"], now)
    if v["steps"]:
        lines += ["", "Steps:"]
        for s in v["steps"]:
            mark = "->" if s["current"] else "  "
            state = " (paused)" if s["current"] and r["paused"] else " (current)" if s["current"] else ""
            lines.append(f"  {mark} {s['index'] + 1}. weight {s['weight']}%, pause {s['pause']}{state}")
    if v["thresholds"] or v["analyses"]:
        lines += ["", "Analysis:"]
        lines += _analysis_lines(v, now)
    if v["abTest"]:
        lines += ["", "A/B test:"]
        lines += _ab_lines(v["abTest"])
    lines += ["", "Conditions:"]
    lines += _table(["TYPE", "STATUS", "REASON", "MESSAGE"],
                    [[c["type"], c["status"], c["reason"], c["message"]] for c in v["conditions"]], "  ")  # fmt: skip
    lines += ["", "Events:"]
    if v["events"]:
        ev_rows = [[age(parse_time(e["time"]), now), e["type"], e["reason"], e["message"]] for e in v["events"]]
        lines += _table(["AGE", "TYPE", "REASON", "MESSAGE"], ev_rows, "  ")
    else:
        lines.append("  <none>")
    return "\n".join(lines) + "\n"


def utcnow() -> datetime:
    return datetime.now(UTC)
