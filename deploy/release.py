"""Ship a new model version safely: shadow -> canary -> promote, and roll back, one command per step.

    python -m deploy.release shadow   --model image --tag fashion-cnn:t2 [--share 0.1] --target local --stack DIR
    python -m deploy.release canary   --model image --tag fashion-cnn:t2 --weight 10  --target local --stack DIR
    python -m deploy.release promote  --model image --target local --stack DIR
    python -m deploy.release rollback --model image --target local --stack DIR
    (make release STEP=canary MODEL=image TAG=fashion-cnn:t2 WEIGHT=10 TARGET=local STACK=DIR)

Each step but the roll back first checks the figures Prometheus records against the thresholds given
(HTTP API /api/v1/query; the rules are deploy/prometheus/servable-rules.yml.template's), and refuses to
go on, changing nothing, when one fails or has no data:

- canary: the shadow's agreement with the live version, servable:shadow_agreement:ratio_rate5m
  (candidate = the tag's version) >= --min-agreement (`--no-shadow-check` skips it, and says so);
  raising the weight of a canary already running also needs the canary's figures, as promote;
- promote: the canary version's servable:version_errors5xx:ratio_rate5m <= --max-error-rate and
  servable:version_latency_seconds:p99_5m <= --max-p99 (and some traffic: version_requests > 0);
- rollback: never refused.

Targets: `local` acts on a running local stack (`python -m deploy.local_stack --workdir DIR` or a
LocalStack in a test, which apply the request and write DIR/stack.json): canary replicas start, nginx
reloads gracefully with the new weights, replicas left out stop once the old workers are done.
`compose` and `k8s` write the override (deploy/compose.release.yaml) or the overlay
(deploy/k8s/releases/canary/) with the release state beside it, and print the commands to run.
`--dry-run` prints what would change (files, weights, commands) and changes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from deploy import render
from deploy.local_stack import model_tag
from servable.config import SERVED_MODELS

STEPS = ("shadow", "canary", "promote", "rollback")
DEPLOY = render.DEPLOY
COMPOSE_OVERRIDE = DEPLOY / "compose.release.yaml"
COMPOSE_STATE = DEPLOY / "compose.release.json"
COMPOSE_TARGETS = render.COMPOSE_TARGETS  # the canary's scrape target: <variant>/<kind>-canary.json
COMPOSE_POOLS = render.COMPOSE_POOLS  # the canary's nginx pool line: <kind>-canary.conf
K8S_RELEASE = DEPLOY / "k8s" / "releases" / "canary"
K8S_BASE_OVERLAY = DEPLOY / "k8s" / "overlays" / "cpu"
K8S_NAMESPACE = "servable"  # the overlays' (a release's base without one: this)


class Refused(RuntimeError):
    """A step not taken: a figure failed its threshold, had no data, or the step makes no sense now."""


@dataclass
class Thresholds:
    min_agreement: float = 0.95
    max_error_rate: float = 0.01
    max_p99_s: float = 1.0
    shadow_check: bool = True


# ---------------------------------------------------------------- the figures


def query(prometheus: str, expr: str, timeout_s: float = 10.0) -> list[float]:
    """The values of an instant query (NaN left out: a ratio of no requests is no figure)."""
    url = f"{prometheus.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            body = json.load(r)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise Refused(f"Prometheus at {prometheus} did not answer {expr!r}: {exc}") from exc
    if body.get("status") != "success":
        raise Refused(f"Prometheus refused {expr!r}: {body.get('error', body)}")
    values = [float(r["value"][1]) for r in body["data"]["result"]]
    return [v for v in values if not math.isnan(v)]


@dataclass
class Check:
    name: str
    expr: str
    op: str  # ">=" or "<="
    threshold: float

    def run(self, prometheus: str) -> str:
        """The figure's line when it passes; Refused when it fails or has no data."""
        values = query(prometheus, self.expr)
        if not values:
            raise Refused(f"no data for {self.name} ({self.expr}): refusing to go on without it "
                          "(is that version serving traffic, and Prometheus scraping it?)")  # fmt: skip
        worst = min(values) if self.op == ">=" else max(values)
        ok = worst >= self.threshold if self.op == ">=" else worst <= self.threshold
        line = f"{self.name}: {worst:.4g} (must be {self.op} {self.threshold:g})"
        if not ok:
            raise Refused(f"{line}: FAILED, refusing to go on")
        return line


def version_of(tag: str) -> str:
    name, _, version = tag.partition(":")
    if not version or version == "latest" or not name:
        raise Refused(f"{tag!r}: name the exact version (name:version, not :latest), the figures are per version")
    return version


def shadow_checks(kind: str, tag: str, th: Thresholds) -> list[Check]:
    if not th.shadow_check:
        return []
    # the agreement rule sums over a model job's replicas (by job, model, version, candidate)
    sel = f'job="servable-{kind}", model="{tag.partition(":")[0]}", candidate="{version_of(tag)}"'
    return [Check("shadow agreement", f"servable:shadow_agreement:ratio_rate5m{{{sel}}}", ">=", th.min_agreement)]


def canary_checks(kind: str, tag: str, th: Thresholds) -> list[Check]:
    sel = f'job="servable-{kind}", version="{version_of(tag)}"'
    return [
        Check("canary traffic (req/s)", f"servable:version_requests:rate5m{{{sel}}} > 0", ">=", 0.0),
        Check("canary 5xx ratio", f"servable:version_errors5xx:ratio_rate5m{{{sel}}}", "<=", th.max_error_rate),
        Check("canary p99 latency (s)", f"servable:version_latency_seconds:p99_5m{{{sel}}}", "<=", th.max_p99_s),
    ]


# ---------------------------------------------------------------- release state (per target)


@dataclass
class ModelState:
    """One model's release: its stable tag (and image, on Kubernetes), its canary, what a promotion replaced."""

    tag: str
    canary: str | None = None
    weight: int = 0
    previous: str | None = None
    image: str | None = None
    canary_image: str | None = None
    previous_image: str | None = None
    shadow: dict = field(default_factory=dict)  # the shadow settings given to the stable replicas


def load_states(path: Path) -> dict[str, ModelState]:
    saved = json.loads(path.read_text()) if path.exists() else {}
    return {kind: ModelState(**saved[kind]) if kind in saved else ModelState(model_tag(kind, os.environ))
            for kind in SERVED_MODELS}  # fmt: skip


def next_state(step: str, s: ModelState, tag: str | None, weight: int, image: str | None,
               shadow: dict) -> tuple[ModelState, bool]:  # fmt: skip
    """The model's state after `step`, and whether the canary's figures must pass first."""
    if step == "shadow":
        return ModelState(**{**s.__dict__, "shadow": shadow}), False
    if step == "canary":
        render.split_servers([], [], weight)  # 0..100
        running = s.canary == tag and s.weight > 0
        return ModelState(**{**s.__dict__, "canary": tag, "weight": weight, "canary_image": image}), running
    if step == "promote":
        if not s.canary:
            raise Refused("no canary to promote: run the canary step first")
        return ModelState(s.canary, previous=s.tag, image=s.canary_image or s.image, previous_image=s.image), True
    if s.canary:  # rollback of a canary: it stops taking requests
        return ModelState(**{**s.__dict__, "canary": None, "weight": 0, "canary_image": None}), False
    if s.previous:  # rollback of a promotion
        return ModelState(s.previous, image=s.previous_image, shadow=s.shadow), False
    raise Refused("nothing to roll back: no canary and no promotion recorded")


# ---------------------------------------------------------------- what each target writes and runs


@dataclass
class Plan:
    changes: list[str]
    files: dict[Path, str] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)


def shadow_env(kind: str, tag: str | None, share: float) -> dict[str, str]:
    p = SERVED_MODELS[kind].env_prefix
    return {f"{p}SHADOW_TAG": tag or "", f"{p}SHADOW_SHARE": f"{share:g}" if tag else "0"}


def compose_plan(step: str, kind: str, states: dict[str, ModelState], variant: str, roll: bool) -> Plan:
    """The override, the state and the canary's scrape target; `roll`: the stable replicas' settings changed."""
    s = states[kind]
    files = " ".join(
        f"-f {p}"
        for p in (
            "deploy/compose.yaml",
            *(["deploy/compose.gpu.yaml"] if variant == "gpu" else []),
            "deploy/compose.release.yaml",
        )
    )
    dc = f"docker compose {files}"
    services: dict[str, dict] = {}
    for k, st in states.items():
        e = SERVED_MODELS[k]
        env = {f"{e.env_prefix}MODEL_TAG": st.tag, **{n: v for n, v in st.shadow.items()}}
        for replica in render.compose_replicas(k):
            services[replica] = {"environment": dict(env)}
        if st.canary:
            base = {"file": os.path.relpath(render.COMPOSE_YML, COMPOSE_OVERRIDE.parent), "service": f"{k}-1"}
            services[f"{k}-canary-1"] = {"extends": base, "environment": {f"{e.env_prefix}MODEL_TAG": st.canary}}
    head = ("# Generated by python -m deploy.release (docs/releasing.md): the release state of every model,\n"
            "# deploy/compose.release.json. Use with -f deploy/compose.yaml; delete both to go back.\n")  # fmt: skip
    targets = COMPOSE_TARGETS / f"compose-{variant}" / f"{kind}-canary.json"
    sd = [{"targets": [f"{kind}-canary-1:3000"], "labels": {"service": kind}}] if s.canary else []
    state = json.dumps({k: v.__dict__ for k, v in states.items()}, indent=2) + "\n"
    override = head + yaml.safe_dump({"services": services}, sort_keys=False, width=200)
    pool = "# Generated by python -m deploy.release (docs/releasing.md): this model's canary in its nginx pool.\n"
    if s.canary:
        weight = render.compose_canary_weight(len(render.compose_replicas(kind)), s.weight)
        pool += render.upstream_servers([f"{kind}-canary-1:3000"], weight=weight) + "\n"
    pools = COMPOSE_POOLS / f"{kind}-canary.conf"
    plan = Plan([], {COMPOSE_OVERRIDE: override, targets: json.dumps(sd) + "\n", pools: pool, COMPOSE_STATE: state})
    rollout = f'COMPOSE_FILES="{files}" deploy/compose_rollout.sh {kind}'
    reload = f"{dc} exec -T nginx sh -c 'nginx -t && nginx -s reload'"
    if step == "canary":
        plan.commands = [
            f"{dc} up -d --no-deps {kind}-canary-1   # wait until it is healthy (docker compose ps)",
            f"{reload}   # the pool with the canary; old workers finish their requests",
        ]
    else:  # shadow, promote, rollback: the stable replicas roll to their settings, then a canary leaves the pool
        plan.commands = [rollout] if roll else []
        if step != "shadow":  # the canary is no service of the files now: compose removes it as an orphan
            plan.commands += [
                f"{reload}   # the pool without the canary",
                f"{dc} up -d --no-deps --remove-orphans nginx   # the canary's container removed",
            ]
    return plan


def k8s_plan(step: str, kind: str, states: dict[str, ModelState], base: Path) -> Plan:
    rel = os.path.relpath(base, K8S_RELEASE)
    # the component's objects are added here, outside the base's namespace transformer: give them its namespace
    namespace = yaml.safe_load((base / "kustomization.yaml").read_text()).get("namespace") or K8S_NAMESPACE
    doc: dict = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": namespace,
                 "resources": [rel],
                 "components": [], "images": [], "patches": []}  # fmt: skip
    for k, st in states.items():
        e = SERVED_MODELS[k]
        stable = {
            "name": k,
            "env": [
                {"name": f"{e.env_prefix}MODEL_TAG", "value": st.tag},
                *({"name": n, "value": v} for n, v in st.shadow.items()),
            ],
        }
        if st.image:
            stable["image"] = st.image
        if st.image or st.shadow:  # else as the base deploys it (a release overlay's exact tags stay)
            deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": f"servable-{k}"},
                          "spec": {"template": {"spec": {"containers": [stable]}}}}  # fmt: skip
            doc["patches"].append({"patch": yaml.safe_dump(deployment)})
        if not st.canary:
            continue
        doc["components"].append(os.path.relpath(render.K8S_COMPONENTS / f"canary-{k}", K8S_RELEASE))
        canary = {"name": k, "env": [{"name": f"{e.env_prefix}MODEL_TAG", "value": st.canary}]}
        doc["patches"].append(
            {
                "patch": yaml.safe_dump(
                    {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "metadata": {"name": render.k8s_canary_name(k)},
                        "spec": {"template": {"spec": {"containers": [canary]}}},
                    }
                )
            }
        )
        for ingress in (f"servable-{k}-canary", f"servable-{k}-explain-canary"):
            doc["patches"].append(
                {
                    "patch": yaml.safe_dump(
                        {
                            "apiVersion": "networking.k8s.io/v1",
                            "kind": "Ingress",
                            "metadata": {
                                "name": ingress,
                                "annotations": {"nginx.ingress.kubernetes.io/canary-weight": str(st.weight)},
                            },
                        }
                    )
                }
            )
        image, _, digest = (st.canary_image or "servable:cpu").partition("@")
        name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
        doc["images"].append({"name": render.K8S_CANARY_IMAGE, "newName": name or image,
                              **({"digest": digest} if digest else {"newTag": tag or "cpu"})})  # fmt: skip
    doc = {k: v for k, v in doc.items() if v}
    head = (
        "# Generated by python -m deploy.release (docs/releasing.md), on top of "
        f"{base.relative_to(DEPLOY.parent) if base.is_relative_to(DEPLOY.parent) else base}; "
        "release-state.json beside it.\n"
    )
    plan = Plan([], {K8S_RELEASE / "kustomization.yaml": head + yaml.safe_dump(doc, sort_keys=False, width=200),
                     K8S_RELEASE / "release-state.json": json.dumps({k: v.__dict__ for k, v in states.items()},
                                                                    indent=2) + "\n"})  # fmt: skip
    out = _shown(K8S_RELEASE)
    plan.commands = [f"kubectl apply -k {out}", f"kubectl -n servable rollout status deployment/servable-{kind}"]
    if states[kind].canary:
        plan.commands.append(f"kubectl -n servable rollout status deployment/{render.k8s_canary_name(kind)}")
    else:  # apply does not prune: the canary's objects go by name
        c = render.k8s_canary_name(kind)
        plan.commands.append(f"kubectl -n servable delete --ignore-not-found deployment/{c} service/{c} "
                             f"ingress/servable-{kind}-canary ingress/servable-{kind}-explain-canary")  # fmt: skip
    return plan


# ---------------------------------------------------------------- the local stack


def local_states(stack: Path) -> tuple[dict, dict[str, ModelState]]:
    path = stack / "stack.json"
    if not path.exists():
        raise Refused(f"{path} not found: is a local stack running there (python -m deploy.local_stack --workdir)?")
    state = json.loads(path.read_text())
    states = {kind: ModelState(m["tag"], m["canary"]["tag"], m["canary"]["weight"], m["previous"])
              for kind, m in state["models"].items()}  # fmt: skip
    return state, states


def local_request(stack: Path, request: dict, timeout_s: float) -> None:
    """Hand the step to the running stack and wait until it says it is done (or why not)."""
    request = {"id": uuid.uuid4().hex, **request}
    tmp = stack / "release-request.tmp"
    tmp.write_text(json.dumps(request))
    tmp.replace(stack / "release-request.json")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = json.loads((stack / "stack.json").read_text())
        if state.get("applied") == request["id"]:
            return
        if state.get("failed") == request["id"]:
            raise Refused(f"the local stack did not apply it: {state.get('error')}")
        time.sleep(0.5)
    raise Refused(f"the local stack did not apply the request within {timeout_s:.0f} s (is it running?)")


# ---------------------------------------------------------------- the command


def _shown(path: Path) -> Path:
    """A path as the repository's (the commands run from its root), else as it is."""
    return path.relative_to(DEPLOY.parent) if path.is_relative_to(DEPLOY.parent) else path


def describe(step: str, kind: str, before: ModelState, after: ModelState) -> list[str]:
    out = [f"{kind}: stable {before.tag} -> {after.tag}"]
    if before.canary or after.canary:
        out.append(f"{kind}: canary {before.canary or '-'} at {before.weight}% -> {after.canary or '-'} "
                   f"at {after.weight if after.canary else 0}%")  # fmt: skip
    if before.shadow != after.shadow:
        out.append(f"{kind}: shadow settings {before.shadow or '-'} -> {after.shadow}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=STEPS)
    ap.add_argument("--model", required=True, choices=list(SERVED_MODELS), help="the served model (its kind)")
    ap.add_argument("--tag", help="the new version's model-store tag, name:version (shadow, canary)")
    ap.add_argument("--weight", type=int, default=10, help="canary: percent of the requests to it (default 10)")
    ap.add_argument("--share", type=float, default=0.1, help="shadow: share of requests scored by the candidate")
    ap.add_argument("--target", required=True, choices=("local", "compose", "k8s"))
    ap.add_argument("--stack", type=Path, help="local: the running stack's workdir")
    ap.add_argument("--variant", choices=("cpu", "gpu"), default="cpu", help="compose: the variant running")
    ap.add_argument("--image", help="k8s canary: the image holding the new version (make k8s-release prints it)")
    ap.add_argument("--k8s-base", type=Path, default=K8S_BASE_OVERLAY, help="k8s: the overlay or release deployed")
    ap.add_argument("--prometheus", help="Prometheus' URL (local: the stack's; else http://127.0.0.1:9090)")
    ap.add_argument("--min-agreement", type=float, default=Thresholds.min_agreement)
    ap.add_argument("--max-error-rate", type=float, default=Thresholds.max_error_rate)
    ap.add_argument("--max-p99", type=float, default=Thresholds.max_p99_s, help="seconds")
    ap.add_argument("--no-shadow-check", action="store_true", help="canary without a shadow's agreement figure")
    ap.add_argument("--timeout", type=float, default=600, help="local: seconds to wait for the stack")
    ap.add_argument("--dry-run", action="store_true", help="print what would change; change nothing")
    args = ap.parse_args(argv)
    th = Thresholds(args.min_agreement, args.max_error_rate, args.max_p99, not args.no_shadow_check)
    kind = args.model
    try:
        if args.step in ("shadow", "canary") and not args.tag:
            raise Refused(f"{args.step} needs --tag name:version")
        if args.target == "local":
            if not args.stack:
                raise Refused("--target local needs --stack <the local stack's workdir>")
            stack_state, states = local_states(args.stack)
            prometheus = args.prometheus or stack_state["prometheus_url"]
        else:
            path = COMPOSE_STATE if args.target == "compose" else K8S_RELEASE / "release-state.json"
            states = load_states(path)
            prometheus = args.prometheus or "http://127.0.0.1:9090"
        if args.target == "k8s" and args.step == "canary" and not args.image:
            raise Refused("a Kubernetes canary needs --image (the image holding the new version: make k8s-release)")
        shadow = shadow_env(kind, args.tag, args.share) if args.step == "shadow" else {}
        before = states[kind]
        after, canary_running = next_state(args.step, before, args.tag, args.weight, args.image, shadow)
        checks = []
        if args.step == "canary":
            checks += shadow_checks(kind, args.tag, th) if not canary_running else []
            checks += canary_checks(kind, args.tag, th) if canary_running and args.weight > before.weight else []
            if not th.shadow_check and not canary_running:
                print("shadow check skipped (--no-shadow-check)")
        elif args.step == "promote":
            checks += canary_checks(kind, str(before.canary), th)
        for check in checks:
            print("ok  " + check.run(prometheus))
        if args.step == "rollback":
            print("rollback: no figures checked (a roll back is never refused)")
        states = {**states, kind: after}
        if args.target == "compose":
            roll = (before.tag, before.shadow) != (after.tag, after.shadow)
            plan = compose_plan(args.step, kind, states, args.variant, roll)
        elif args.target == "k8s":
            plan = k8s_plan(args.step, kind, states, args.k8s_base.resolve())
        else:
            plan = Plan([], commands=[])
        plan.changes = describe(args.step, kind, before, after)
        if args.dry_run:
            print("dry run: nothing changed. Would:")
        for line in plan.changes:
            print("  " + line)
        for path, text in plan.files.items():
            print(f"  write {_shown(path)}")
            if args.dry_run:
                print("".join(f"    | {line}\n" for line in text.splitlines()), end="")
        if args.dry_run:
            if args.target == "local":
                print(f"  ask the local stack in {args.stack} to {args.step} {kind}")
            for command in plan.commands:
                print(f"  run: {command}")
            return 0
        for path, text in plan.files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        if args.target == "local":
            local_request(args.stack, {"step": args.step, "kind": kind, "tag": args.tag, "weight": args.weight,
                                       "env": shadow}, args.timeout)  # fmt: skip
            print(f"done: the local stack's {kind} {'; '.join(plan.changes)}")
        else:
            print("now run, in order:")
            for command in plan.commands:
                print(f"  {command}")
    except Refused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
