"""The ``salamander`` command line.

    salamander run JOB.yaml        run a TrainingJob on this machine, with live progress
                                   (--fault KIND:key=value,... injects a fault, e.g. kill-process:step=30,rank=1)
    salamander validate JOB.yaml   check a manifest without running it
    salamander crd [--write DIR]   print (or write) the CRD generated from the API models
    salamander operator            run the operator against the current Kubernetes context
    salamander rendezvous          host the rendezvous store on its own, apart from the operator

Every usage or manifest error exits 2 with one line naming the problem.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from salamander import __version__
from salamander.api import Fault, InvalidSpec, TrainingJob, parse_manifest
from salamander.api.faults import parse_fault


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
    outcome = run_manifest(job, Path(args.runs_dir), timeout_s=args.timeout)
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
                        rendezvous_advertise=args.rendezvous_advertise)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="salamander", description="Elastic, self-healing PyTorch training.")
    parser.add_argument("--version", action="version", version=f"salamander {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a TrainingJob manifest on this machine")
    run.add_argument("manifest", help="path to a TrainingJob YAML file")
    run.add_argument("--runs-dir", default="runs", help="where worker logs go (default ./runs)")
    run.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
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
    op.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                    help="kopf's liveness endpoint ('' to turn it off)")
    op.add_argument("--verbose", action="store_true")
    op.set_defaults(func=_cmd_operator)

    rdzv = sub.add_parser("rendezvous", help="host the rendezvous store on its own, until SIGTERM or SIGINT")
    rdzv.add_argument("--port", default="29400", help="port to listen on (default 29400; 0 picks a free one)")
    rdzv.add_argument("--bind", default="0.0.0.0", help="address to listen on (default 0.0.0.0; '::' for IPv6)")
    rdzv.set_defaults(func=_cmd_rendezvous)
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
