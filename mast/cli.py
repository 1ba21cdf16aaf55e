"""The `mast` command line: one subcommand per stage (the contract in docs/architecture.md).

This file only parses arguments. Each subcommand's handler lives beside the code it drives
(`mast.<module>.cli_<command>(args) -> int`) and is imported on use (a plain import inside a
small function per command, so `mast --help` is fast and a broken dependency of a stage is
an internal error of that stage, like any other).
Exit status: 0 success, 2 bad input (one line naming the file or field), 1 internal error.
"""

from __future__ import annotations

import argparse
import os
import sys

from mast.files import InputError
from mast.registry import OBJECTIVE_NAMES, RULE_NAMES, TEMPLATE_NAMES


def _toy(args) -> int:
    from mast.toy import cli_toy

    return cli_toy(args)


def _select(args) -> int:
    from mast.selection import cli_select

    return cli_select(args)


def _diagnose(args) -> int:
    from mast.diagnostics import cli_diagnose

    return cli_diagnose(args)


def _unlearn(args) -> int:
    from mast.unlearn import cli_unlearn

    return cli_unlearn(args)


def _eval(args) -> int:
    from mast.evaluation import cli_eval

    return cli_eval(args)


def _grade(args) -> int:
    from mast.grading import cli_grade

    return cli_grade(args)


def _stats(args) -> int:
    from mast.seeds import cli_stats

    return cli_stats(args)


def _sweep(args) -> int:
    from mast.sweep import cli_sweep

    return cli_sweep(args)


def _report(args) -> int:
    from mast.report import cli_report

    return cli_report(args)


# subcommand -> handler (each imports its stage on use)
HANDLERS = {
    "toy": _toy,
    "select": _select,
    "diagnose": _diagnose,
    "unlearn": _unlearn,
    "eval": _eval,
    "grade": _grade,
    "stats": _stats,
    "sweep": _sweep,
    "report": _report,
}


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (a count, a size, a limit: 0 must not mean "all")."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {n}")
    return n


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage errors are bad input too: exit 2, one line
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mast", description="MAST sweep platform: select, unlearn, evaluate, test, sweep, report.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("toy", help="build the CPU demo triple: OUT/base, OUT/sft, OUT/rlvr, OUT/data, OUT/suites")
    s.add_argument("out", metavar="OUT")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="rebuild even if a finished build exists")

    s = sub.add_parser("select", help="rank candidate tensors by the MAST signals and pick the top-k")
    s.add_argument("--reference", required=True, metavar="DIR", help="the SFT checkpoint")
    s.add_argument("--target", required=True, metavar="DIR", help="the RLVR checkpoint")
    s.add_argument("--forget", required=True, metavar="JSONL", help="forget problems (for the coupling signal)")
    # defaults None: unset flags leave the --spec file's (or SelectionSpec's) values alone (mast, 8, 0.05, 0)
    s.add_argument("--rule", help=f"{'|'.join(RULE_NAMES)} (default mast)")
    s.add_argument("--k", type=int, help="tensors to select (default 8; ignored by attention/full)")
    s.add_argument("--rho", type=float, help="principal-subspace fraction, r = ceil(rho*min(m,n)) (default 0.05)")
    s.add_argument("--seed", type=int, help="seed of the random rule (default 0)")
    s.add_argument("--spec", metavar="YAML", help="a selection spec (weights, candidates); flags override it")
    s.add_argument("--template", choices=TEMPLATE_NAMES, default="qwen_boxed",
                   help="prompt template of the forget texts (coupling signal)")
    s.add_argument("--method", choices=["fast", "exact"], default="fast",
                   help="top-r subspace: Gram eigenproblem + Rayleigh-Ritz (fast) or full SVD (exact)")
    s.add_argument("--cache-dir", metavar="DIR")
    s.add_argument("--out", required=True, metavar="SELECTION.json")

    s = sub.add_parser("diagnose", help="mechanism diagnostics: per-token Δlog-prob of SFT vs RLVR, spectra")
    s.add_argument("--base", required=True, metavar="DIR")
    s.add_argument("--reference", required=True, metavar="DIR")
    s.add_argument("--target", required=True, metavar="DIR")
    s.add_argument("--forget", required=True, metavar="JSONL")
    s.add_argument("--rho", type=float, default=0.05)
    s.add_argument("--threshold", type=float, default=0.1, help="|Δlog-prob| (nats) above which a token counts as moved")
    s.add_argument("--template", choices=TEMPLATE_NAMES, default="qwen_boxed")
    s.add_argument("--max-length", type=int, default=1024)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--cache-dir", metavar="DIR")
    s.add_argument("--out", default="diagnostics", metavar="DIR")

    s = sub.add_parser("unlearn", help="update only the selected tensors with an unlearning objective")
    s.add_argument("--target", required=True, metavar="DIR")
    s.add_argument("--selection", required=True, metavar="SELECTION.json")
    s.add_argument("--forget", required=True, metavar="JSONL")
    s.add_argument("--retain", metavar="JSONL")
    s.add_argument("--objective", choices=OBJECTIVE_NAMES)
    s.add_argument("--steps", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--spec", metavar="YAML", help="an unlearning spec; flags override it")
    s.add_argument("--out", required=True, metavar="DIR")

    s = sub.add_parser("eval", help="evaluate a checkpoint on a suite; one record per problem")
    s.add_argument("--model", required=True, metavar="DIR")
    s.add_argument("--suite", required=True, metavar="SUITE.yaml")
    s.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    s.add_argument("--data-dir", metavar="DIR")
    s.add_argument("--limit", type=positive_int, help="the suite's first N problems")
    s.add_argument("--batch-size", type=positive_int)
    s.add_argument("--cache-dir", metavar="DIR")
    s.add_argument("--no-cache", action="store_true")
    s.add_argument("--out", required=True, metavar="RESULTS.jsonl")

    s = sub.add_parser("grade", help="extract final answers and check them for mathematical equivalence")
    s.add_argument("input", metavar="IN.jsonl", help='rows {"id", "benchmark", "gold", "response"}')
    s.add_argument("--out", metavar="OUT.jsonl")
    s.add_argument("--timeout", type=float, default=5.0, help="seconds per answer before it counts as wrong")
    s.add_argument("--workers", type=int)

    s = sub.add_parser("stats", help="paired significance tests")
    ss = s.add_subparsers(dest="stats_command", metavar="TEST", parser_class=_Parser)
    ss.required = True
    m = ss.add_parser("mcnemar", help="exact McNemar test of two per-problem result files")
    m.add_argument("before", metavar="BEFORE.jsonl")
    m.add_argument("after", metavar="AFTER.jsonl")
    m.add_argument("--n-bootstrap", type=int, default=2000)
    m.add_argument("--confidence", type=float, default=0.95)
    m.add_argument("--seed", type=int, default=0)
    m = ss.add_parser("seeds", help="seed-level table: per condition, paired tests vs baselines, Holm")
    m.add_argument("results", metavar="RESULTS", help="a sweep folder or a per-trial results table (JSONL/CSV)")
    m.add_argument("--suite", default="forget", help="a suite, a comma-separated list, or 'all'")
    m.add_argument("--confidence", type=float, default=0.95)
    m.add_argument("--alpha", type=float, default=0.05, help="family-wise error rate for Holm")
    m.add_argument("--primary", choices=["ttest", "wilcoxon", "sign"], default="ttest",
                   help="the test whose p-values enter the Holm family")
    m.add_argument("--family", choices=["sweep", "table"], default="sweep",
                   help="Holm over every suite's comparisons (sweep) or only the suites shown (table)")
    m.add_argument("--out", metavar="OUT.json")

    s = sub.add_parser("sweep", help="run a sweep spec with Ray Tune, tracked in MLflow")
    s.add_argument("spec", metavar="SPEC.yaml")
    s.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    s.add_argument("--data-dir", metavar="DIR")
    s.add_argument("--out", metavar="DIR", help="sweep folder (default runs/<name>)")

    s = sub.add_parser("report", help="paper-style tables and plots of a finished sweep")
    s.add_argument("sweep_dir", nargs="?", metavar="SWEEP_DIR")
    s.add_argument("--experiment", metavar="NAME", help="build from an MLflow experiment instead")
    s.add_argument("--tracking-uri", metavar="URI")
    s.add_argument("--out", metavar="DIR")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(HANDLERS[args.command](args) or 0)
    except InputError as e:
        print(f"mast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mast {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # internal error: one line, the traceback only on request
        if os.environ.get("MAST_DEBUG"):
            raise
        print(
            f"mast {args.command}: internal error: {type(e).__name__}: {e} (set MAST_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
