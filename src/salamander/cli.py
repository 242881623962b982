"""The ``salamander`` command line.

    salamander run JOB.yaml        run a TrainingJob on this machine, with live progress
                                   (--fault KIND:key=value,... injects a fault, e.g. kill-process:step=30,rank=1)
    salamander validate JOB.yaml   check a manifest without running it
    salamander crd [--write DIR]   print (or write) the CRD generated from the API models
    salamander operator            run the operator against the current Kubernetes context
                                   (--plan: divide the nodes among the jobs with the cluster planner)
    salamander rendezvous          host the rendezvous store on its own, apart from the operator
    salamander trace RUN_DIR       collect every rank's timeline of a running local job as one
                                   Chrome/Perfetto trace (--out FILE, --timeout S, --spans N)
    salamander simulate            simulate a large cluster through weeks of published failure rates
                                   under four recovery policies; print a table, write plots and JSON

Every usage or manifest error exits 2 with one line naming the problem; ``trace`` exits 1 when
the job cannot be reached or no rank answers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from salamander import __version__
from salamander.api import Fault, InvalidSpec, TrainingJob, parse_manifest
from salamander.api.faults import parse_fault

if TYPE_CHECKING:
    from salamander_operator.trace import TraceStore


def _load(path: str) -> TrainingJob:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InvalidSpec("", f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InvalidSpec("", f"{path} is not UTF-8 text") from None
    return parse_manifest(text)


def _parse_faults(texts: Sequence[str]) -> list[Fault] | None:
    """The ``--fault`` values as faults, or None after printing the first bad one."""
    faults = []
    for text in texts:
        try:
            faults.append(parse_fault(text))
        except InvalidSpec as exc:
            shown = text if text.isprintable() and len(text) <= 80 else repr(text[:80])
            print(f"salamander: invalid --fault {shown}: {exc}", file=sys.stderr)
            return None
    return faults


def _port(text: str) -> int:
    """A TCP port for argparse: 0..65535, or -1 for none."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not -1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535 (or -1), got {value}")
    return value


def _cmd_run(args: argparse.Namespace) -> int:
    from salamander_operator.local import run_manifest

    faults = _parse_faults(args.fault)
    if faults is None:
        return 2
    job = _load(args.manifest)
    if faults:
        spec = job.spec.model_copy(update={"faults": [*job.spec.faults, *faults]})
        job = job.model_copy(update={"spec": spec})
    working_dir = job.spec.worker.working_dir
    if working_dir and not Path(working_dir).is_dir():
        raise InvalidSpec("spec.worker.workingDir", f"{working_dir} is not a directory on this machine")
    outcome = run_manifest(job, Path(args.runs_dir), timeout_s=args.timeout,
                           metrics_port=None if args.metrics_port < 0 else args.metrics_port)
    return outcome.exit_code


def _cmd_validate(args: argparse.Namespace) -> int:
    job = _load(args.manifest)
    spec = job.spec
    print(f"{args.manifest}: TrainingJob {job.metadata.name} is valid "
          f"({spec.replicas.min}..{spec.replicas.max} workers x {spec.procs_per_node} processes)")
    return 0


def _cmd_crd(args: argparse.Namespace) -> int:
    from salamander.api.crd import render_crd, write_crd

    if args.write:
        print(write_crd(Path(args.write)))
    else:
        sys.stdout.write(render_crd())
    return 0


class UsageError(Exception):
    """A bad flag value: ``main`` prints it as one line and exits 2."""


def _cmd_operator(args: argparse.Namespace) -> int:
    from salamander_operator.kube.main import run_operator

    return run_operator(namespaces=args.namespace, all_namespaces=args.all_namespaces,
                        rendezvous_port=args.rendezvous_port, advertise=args.advertise,
                        liveness=args.liveness, verbose=args.verbose, control_port=args.control_port,
                        rendezvous_endpoint=args.rendezvous_endpoint,
                        rendezvous_advertise=args.rendezvous_advertise,
                        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
                        plan=args.plan, plan_node_selector=args.plan_node_selector,
                        plan_horizon_s=args.plan_horizon)


def _node_selector(text: str) -> str:
    """A ``key=value,...`` node selector for argparse, checked here and passed on as text."""
    from salamander_operator.allocations import parse_selector

    try:
        parse_selector(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _horizon(text: str) -> float:
    """A positive, finite number of seconds for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _cmd_rendezvous(args: argparse.Namespace) -> int:
    import signal
    import threading

    text, bind = args.port.strip(), args.bind.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise UsageError(f"rendezvous: --port must be a number from 0 to 65535, got {args.port!r}")
    if not bind or not bind.isprintable():
        raise UsageError(f"rendezvous: --bind must be an address of this machine, got {args.bind!r}")
    from salamander_operator.rendezvous import RendezvousError, serve

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        shown = f"[{bind}]" if ":" in bind else bind
        serve(int(text), bind, stop=stop, ready=lambda host: print(
            f"salamander rendezvous: listening on {shown}:{host.port}", flush=True))
    except RendezvousError as exc:
        raise UsageError(f"rendezvous: {exc}") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


TRACE_TIMEOUT_MAX_S = 600.0


@dataclass(frozen=True)
class RunTarget:
    """What ``salamander trace`` needs of a local run, from its ``run.json``."""

    directory: Path
    endpoint: str
    run_id: str
    name: str
    world_size: int | None


def _run_target(text: str) -> RunTarget:
    """The run directory (or its ``run.json``) ``text`` names; raises :class:`UsageError` naming
    what is wrong."""
    path = Path(text)
    file = path / "run.json" if path.is_dir() else path
    if not path.exists():
        raise UsageError(f"trace: {text} is neither a run directory of `salamander run` nor a TrainingJob name")
    if not file.is_file():
        raise UsageError(f"trace: {path} has no run.json; is it a run directory of `salamander run`?")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"trace: cannot read {file}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"trace: {file} is not a JSON object")
    for field in ("endpoint", "run_id", "name"):
        if not isinstance(data.get(field), str) or not data[field]:
            raise UsageError(f"trace: {file} lacks a {field!r} text")
    world = data.get("world_size")
    if world is not None and (isinstance(world, bool) or not isinstance(world, int) or world < 1):
        raise UsageError(f"trace: {file} field 'world_size' must be an integer >= 1, got {world!r}")
    from salamander_operator.rendezvous import parse_endpoint

    try:
        parse_endpoint(data["endpoint"])
    except ValueError as exc:
        raise UsageError(f"trace: {file}: {exc}") from None
    return RunTarget(file.parent, data["endpoint"], data["run_id"], data["name"], world)


def _whole(text: str, flag: str, low: int, high: int) -> int:
    """``text`` as a whole number from ``low`` to ``high``; raises :class:`UsageError`."""
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise UsageError(f"trace: {flag} must be a whole number from {low} to {high}, got {text!r}")
    return value


def _seconds(text: str, flag: str, high: float) -> float:
    """``text`` as seconds above 0 and at most ``high``; raises :class:`UsageError`."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= high):
        raise UsageError(f"trace: {flag} must be a number above 0 and at most {high:g}, got {text!r}")
    return value


def _fail(message: str) -> int:
    print(f"salamander: {message}", file=sys.stderr)
    return 1


def _cmd_trace(args: argparse.Namespace) -> int:
    from salamander_operator import trace
    from salamander_worker.timeline import MAX_SPANS

    spans = _whole(args.spans, "--spans", 1, MAX_SPANS)
    timeout = _seconds(args.timeout, "--timeout", TRACE_TIMEOUT_MAX_S)
    if not Path(args.target).exists() and _KUBE_JOB.fullmatch(args.target):
        return _trace_kube(args.target, args.namespace, args.out, timeout)
    target = _run_target(args.target)
    store = _connect(target, timeout)
    if store is None:
        return _fail(f"trace: run {target.name} is not reachable at {target.endpoint} (has it ended?)")
    world = _world_size(store, target)
    if world is None:
        return _fail(f"trace: run {target.name} has not reported its world size yet; try again once it trains")
    try:
        request = trace.request_trace(store, target.run_id, spans)
        result = trace.collect_trace(store, target.run_id, request, world, timeout)
    except trace.TraceError as exc:
        return _fail(f"trace: run {target.name}: {exc}")
    if not result.answered:
        return _fail(f"trace: no rank of run {target.name} answered within {timeout:g} s ({trace.summary(result)}); "
                     f"ranks answer once they have reported a step")
    out = Path(args.out) if args.out else trace.default_path(target.directory)
    try:
        trace.write_trace(out, result.trace)
    except trace.TraceError as exc:
        return _fail(f"trace: {exc}")
    print(f"wrote {out}: {trace.summary(result)}")
    for line in trace.whereabouts(result.trace):
        print(f"  {line}")
    return 0


_KUBE_JOB = re.compile(r"(?:[a-z0-9]([-a-z0-9]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9]*[a-z0-9])?")
KUBE_TRACE_GRACE_S = 15.0  # beyond --timeout: the operator's reaction to the annotation and its write


def _trace_kube(text: str, namespace: str | None, out: str | None, timeout: float) -> int:
    """Trace a TrainingJob on the cluster of the current kubeconfig: set its trace-request
    annotation to a fresh value, wait for the operator's trace ConfigMap that answers it."""
    import base64
    import secrets as secrets_
    import time as time_

    import kubernetes
    from kubernetes.client.exceptions import ApiException

    from salamander.api import GROUP, PLURAL, VERSION
    from salamander_operator import trace
    from salamander_operator.desired import TRACE_KEY, trace_config_map_name
    from salamander_operator.kube.cluster import api_client_from_environment
    from salamander_operator.kube.handlers import TRACE_REQUEST_ANNOTATION

    ns, _, name = text.rpartition("/")
    try:
        client = api_client_from_environment()
        namespace = ns or namespace or kubernetes.config.list_kube_config_contexts()[1]["context"].get(
            "namespace", "default")
    except (kubernetes.config.ConfigException, OSError, KeyError, TypeError) as exc:
        return _fail(f"trace: {text} is not a run directory, and there is no Kubernetes cluster to look in ({exc})")
    custom, core = kubernetes.client.CustomObjectsApi(client), kubernetes.client.CoreV1Api(client)
    request = f"{int(time_.time())}-{secrets_.token_hex(4)}"
    try:
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                              {"metadata": {"annotations": {TRACE_REQUEST_ANNOTATION: request}}})
    except ApiException as exc:
        what = "no such TrainingJob" if exc.status == 404 else f"{exc.status} {exc.reason}"
        return _fail(f"trace: TrainingJob {namespace}/{name}: {what}")
    deadline = time_.monotonic() + timeout + KUBE_TRACE_GRACE_S
    while time_.monotonic() < deadline:
        try:
            config_map = core.read_namespaced_config_map(trace_config_map_name(name), namespace)
        except ApiException as exc:
            if exc.status != 404:
                return _fail(f"trace: reading ConfigMap {namespace}/{trace_config_map_name(name)}: "
                             f"{exc.status} {exc.reason}")
            config_map = None
        if config_map is not None and (config_map.metadata.annotations or {}).get(TRACE_REQUEST_ANNOTATION) == request:
            try:
                merged = trace.unpack(base64.b64decode((config_map.binary_data or {})[TRACE_KEY]))
                path = trace.write_trace(Path(out) if out else Path(f"trace-{name}-{request}.json"), merged)
            except (KeyError, ValueError, trace.TraceError) as exc:
                return _fail(f"trace: the trace of {namespace}/{name} is unreadable: {exc}")
            other = merged.get("otherData", {})
            print(f"wrote {path}: {len(other.get('answered', []))}/{other.get('world_size', '?')} ranks answered")
            for line in trace.whereabouts(merged):
                print(f"  {line}")
            return 0
        time_.sleep(0.5)
    return _fail(f"trace: the operator did not answer the trace request of {namespace}/{name} within "
                 f"{timeout + KUBE_TRACE_GRACE_S:g} s; is it running, and is the job?")


def _connect(target: RunTarget, timeout_s: float) -> TraceStore | None:
    """A store client of the run, or None when nothing listens at its endpoint. A plain socket
    probes first: it fails at once and quietly where a store client retries and logs."""
    import socket

    from salamander_operator.rendezvous import parse_endpoint
    from salamander_worker.store import connect_store

    host, port = parse_endpoint(target.endpoint)
    try:
        socket.create_connection((host, port), timeout=min(timeout_s, 5.0)).close()
        return connect_store(target.endpoint, timeout_s=min(max(timeout_s, 1.0), 10.0))
    except (OSError, RuntimeError, ValueError):
        return None


def _world_size(store: TraceStore, target: RunTarget) -> int | None:
    """The run's current world size (its leader's progress), else the most it can have."""
    from salamander import wire

    try:
        progress = wire.read_progress(store, target.run_id)
    except (wire.WireError, RuntimeError):
        progress = None
    return progress.world_size if progress is not None else target.world_size


#: The most nodes ``simulate`` takes: the planner's cost grows with nodes x jobs (4,096 nodes for
#: 7 days: ~30 s; 8,192 for 28 days: an estimated ~10 min); beyond, runs would take hours.
SIMULATE_MAX_NODES = 8192


def _cmd_simulate(args: argparse.Namespace) -> int:
    """``salamander simulate``: every recovery policy over one seeded cluster scenario (failure
    trace from published rates); prints a table, writes plots and JSON into ``--out``."""
    import datetime

    def number(flag: str, text: str, whole: bool, low: float, high: float, above: bool = False) -> float:
        try:
            value = float(int(text)) if whole else float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if above else value >= low) and value <= high):
            kind = "a whole number" if whole else "a number"
            span = f"above {low:g} and at most {high:g}" if above else f"from {low:g} to {high:g}"
            raise UsageError(f"simulate: {flag} must be {kind} {span}, got {text!r}")
        return value

    from salamander_operator.simulator import ClusterConfig, SimulationError, prepare, run_scenario
    from salamander_operator.simulator import report as sim_report

    try:
        config = ClusterConfig(
            nodes=int(number("--nodes", args.nodes, True, 1, SIMULATE_MAX_NODES)),
            gpus_per_node=int(number("--gpus-per-node", args.gpus_per_node, True, 1, 64)),
            days=number("--days", args.days, False, 0, 366, above=True),
            seed=int(number("--seed", args.seed, True, 0, 2**32 - 1)),
            failure_rate_scale=number("--failure-rate-scale", args.failure_rate_scale, False, 0, 1000),
            load=number("--load", args.load, False, 0, 4, above=True),
            jobs=None if args.jobs is None else int(number("--jobs", args.jobs, True, 1, 1_000_000)))
        prepared = prepare(config)
    except SimulationError as exc:
        raise UsageError(f"simulate: {exc}") from None
    out = Path(args.out) if args.out else Path("runs") / f"simulate-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    errors = Console(stderr=True)
    progress = Progress(TextColumn("{task.description:<44}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                        TimeElapsedColumn(), console=errors, transient=True, disable=not errors.is_terminal)
    tasks: dict[str, object] = {}

    def report_progress(policy: object, fraction: float) -> None:
        name = getattr(policy, "label", str(policy))
        if name not in tasks:
            tasks[name] = progress.add_task(name, total=1.0)
        progress.update(tasks[name], completed=fraction)  # type: ignore[arg-type]

    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(f"simulating {config.nodes:,} nodes x {config.gpus_per_node} GPUs ({config.gpus:,} GPUs) for "
                  f"{config.days:g} days, seed {config.seed}, failure rate x{config.failure_rate_scale:g}, "
                  f"load {config.load:g}", highlight=False)
    with progress:
        scenario = run_scenario(config, progress=report_progress, prepared=prepared)
    summaries = scenario.summaries()
    console.print(f"{len(scenario.jobs)} jobs, {len(scenario.trace)} failures "
                  f"({', '.join(f'{n} {k}' for k, n in scenario.trace.counts().items())})", highlight=False)
    for table in sim_report.tables(summaries):
        console.print(table)
    console.print(sim_report.headline(summaries), highlight=False)
    written = [sim_report.write_json(out / "results.json",
                                     sim_report.to_json(config, scenario.trace, scenario.runs, summaries))]
    try:
        written += sim_report.plot(scenario.runs, summaries, out)
    except ImportError:
        print("salamander: simulate: matplotlib is not installed, so no plots were drawn", file=sys.stderr)
    for path in written:
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="salamander", description="Elastic, self-healing PyTorch training.")
    parser.add_argument("--version", action="version", version=f"salamander {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a TrainingJob manifest on this machine")
    run.add_argument("manifest", help="path to a TrainingJob YAML file")
    run.add_argument("--runs-dir", default="runs", help="where worker logs go (default ./runs)")
    run.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    run.add_argument("--metrics-port", type=_port, default=0, metavar="PORT",
                     help="serve the job's Prometheus metrics on 127.0.0.1:PORT (default 0: a free port, printed; "
                          "-1: do not serve)")
    run.add_argument("--fault", action="append", default=[], metavar="KIND:key=value,...",
                     help="inject a fault, for rehearsal (repeatable): kill-process:step=30,rank=1, "
                          "raise:step=5,rank=0, kill-worker:step=60,worker=2, hang-rank:step=90,rank=0[,seconds=S], "
                          "slow-rank:step=10,rank=1,seconds=0.5,steps=20")
    run.set_defaults(func=_cmd_run)

    validate = sub.add_parser("validate", help="check a TrainingJob manifest")
    validate.add_argument("manifest")
    validate.set_defaults(func=_cmd_validate)

    crd = sub.add_parser("crd", help="print the TrainingJob CRD generated from the API models")
    crd.add_argument("--write", metavar="DIR", help="write crds/<name>.yaml into DIR instead")
    crd.set_defaults(func=_cmd_crd)

    op = sub.add_parser("operator", help="run the operator (uses KUBECONFIG or the in-cluster account)")
    scope = op.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (the default)")
    op.add_argument("--rendezvous-port", type=int, default=29400, help="port of the rendezvous store")
    op.add_argument("--control-port", type=int, default=29401, help="port of the agents' control plane (gRPC)")
    op.add_argument("--advertise", default=None,
                    help="host[:port] workers reach this operator at: its rendezvous store (port: the listening "
                         "port) and, at the same host, its control plane (default: $SALAMANDER_ADVERTISE or this "
                         "pod's IP)")
    op.add_argument("--rendezvous-endpoint", metavar="HOST:PORT", default=None,
                    help="use the store that `salamander rendezvous` serves there instead of hosting one, so "
                         "restarting the operator keeps every job's membership")
    op.add_argument("--rendezvous-advertise", metavar="HOST:PORT", default=None,
                    help="with --rendezvous-endpoint: where workers reach that store, if not at the same address")
    op.add_argument("--metrics-port", type=_port, default=9400, metavar="PORT",
                    help="serve the operator's Prometheus metrics on this port (default 9400; -1: off)")
    op.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                    help="kopf's liveness endpoint ('' to turn it off)")
    op.add_argument("--plan", action="store_true",
                    help="plan capacity across jobs: divide the schedulable nodes among the TrainingJobs "
                         "(grow, shrink, suspend) on every capacity change, weighing spec.scheduling")
    op.add_argument("--plan-node-selector", metavar="KEY=VALUE,...", type=_node_selector, default="",
                    help="with --plan: the nodes that count as capacity (default: every node)")
    op.add_argument("--plan-horizon", metavar="SECONDS", type=_horizon, default=3600.0,
                    help="with --plan: the time a plan is expected to hold, against which transitions are "
                         "weighed (default 3600)")
    op.add_argument("--verbose", action="store_true")
    op.set_defaults(func=_cmd_operator)

    rdzv = sub.add_parser("rendezvous", help="host the rendezvous store on its own, until SIGTERM or SIGINT")
    rdzv.add_argument("--port", default="29400", help="port to listen on (default 29400; 0 picks a free one)")
    rdzv.add_argument("--bind", default="0.0.0.0", help="address to listen on (default 0.0.0.0; '::' for IPv6)")
    rdzv.set_defaults(func=_cmd_rendezvous)

    tr = sub.add_parser(
        "trace", help="collect every rank's timeline of a running job as one Chrome/Perfetto trace",
        description="Ask every rank of a running job for its newest sections (data, forward, "
                    "backward, ...) and the ones it is in now, and write them as one Chrome trace: open it in "
                    "https://ui.perfetto.dev or chrome://tracing to see where a step stalled. TARGET is a local "
                    "run's directory (runs/<job>-<time>/, while the run is going), or a TrainingJob on the "
                    "cluster of the current kubeconfig: the operator collects the trace into ConfigMap <job>-trace. "
                    "With spec.observability.traceOnHang (the default) a local run also writes "
                    "RUN_DIR/trace-hang-<step>.json by itself when it detects a hang, before restarting.")
    tr.add_argument("target", metavar="RUN_DIR|[NAMESPACE/]JOB",
                    help="the run directory of a running `salamander run` (has run.json), or a TrainingJob on the "
                         "cluster of the current kubeconfig (the operator collects it into ConfigMap <job>-trace)")
    tr.add_argument("-n", "--namespace", default=None, help="the TrainingJob's namespace (default: the context's)")
    tr.add_argument("--out", metavar="FILE", default=None, help="where to write the trace "
                    "(default RUN_DIR/trace-<time>.json)")
    tr.add_argument("--timeout", metavar="S", default="5", help="how long to wait for the ranks (default 5 s)")
    tr.add_argument("--spans", metavar="N", default="2000", help="the newest finished spans per rank (default 2000)")
    tr.set_defaults(func=_cmd_trace)

    sim = sub.add_parser(
        "simulate", help="simulate a large GPU cluster under failures: restart vs elastic vs Salamander",
        description="Run a discrete-event simulation of a GPU cluster over weeks, with a failure trace drawn "
                    "from published rates (Llama 3, MegaScale) and mixes (Unicron), through four recovery "
                    "policies: whole-job restart from disk checkpoints, elastic per job, Salamander without its "
                    "planner, and Salamander's full stack. Prints each policy's goodput, WAF and its ratio over "
                    "the restart baseline, and lost GPU-hours by cause; writes results.json and PNG plots into "
                    "--out. See docs/simulator.md.")
    sim.add_argument("--nodes", default="1024", metavar="N", help="nodes in the cluster (default 1024)")
    sim.add_argument("--gpus-per-node", default="8", metavar="G", help="GPUs per node (default 8)")
    sim.add_argument("--days", default="28", metavar="D", help="simulated days (default 28)")
    sim.add_argument("--jobs", default=None, metavar="J",
                     help="jobs over the run (default: enough for --load with windows of a few days)")
    sim.add_argument("--seed", default="0", metavar="S", help="seed of the workload and the failure trace (default 0)")
    sim.add_argument("--failure-rate-scale", default="1", metavar="X",
                     help="multiply the published failure rate (1 per 264 node-days for 8 GPUs) by X (default 1; "
                          "0: no failures)")
    sim.add_argument("--load", default="0.9", metavar="L",
                     help="the jobs' mean demand, as a share of the cluster's nodes (default 0.9)")
    sim.add_argument("--out", default=None, metavar="DIR",
                     help="where results.json and the plots go (default runs/simulate-<time>)")
    sim.set_defaults(func=_cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except InvalidSpec as exc:
        print(f"salamander: invalid manifest {getattr(args, 'manifest', '')}: {exc}".replace("  ", " "),
              file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"salamander: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a runs dir that is a file, a missing --write directory...
        print(f"salamander: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
