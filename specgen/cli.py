"""The `specgen` command line: a thin layer over spec, analysis and render.

Exit codes: 0 success, 2 a user mistake (a bad spec, a missing file; printed without a traceback), 1 an internal
failure (a bug: the traceback is printed).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .model.errors import BuildError, SpecError

USAGE_ERROR = 2


class UsageError(Exception):
    """A mistake in how the command was called (not in a spec)."""


def spec_paths(targets: list[str], notes: bool = False) -> list[Path]:
    """Spec files named directly, or every *.yaml in a named folder (sorted; sweeps skipped); each file once.

    Sweep files (`*.sweep.yaml`) are skipped, named or found (`specgen check specs/*.yaml` names them): with `notes`,
    a note on stderr says so and how to run them."""
    paths: list[Path] = []
    for target in targets:
        p = Path(target)
        if p.is_dir():
            found = sorted(x for x in p.glob("*.yaml") if not x.name.endswith(".sweep.yaml"))
            if not found:
                raise UsageError(f"{p}: no *.yaml specs in this folder")
            paths.extend(found)
        elif p.name.endswith(".sweep.yaml") and p.is_file():
            if notes:
                print(f"specgen: note: {p}: a sweep file, skipped (run it with `specgen sweep {p}`)", file=sys.stderr)
        elif p.exists():
            paths.append(p)
        else:
            raise UsageError(f"{p}: no such spec file or folder")
    if not paths:
        raise UsageError(f"{' '.join(targets)}: only sweep files; specs are the other *.yaml files")
    seen: set[Path] = set()
    unique = []
    for p in paths:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def _batch(text: str) -> int:
    """A `--batches` entry: a positive batch size, or "max" (0 to bench_decode: the largest batch that fits)."""
    if text == "max":
        return 0
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a batch size is a positive integer or 'max'")
    return value


def _load_all(targets: list[str]):
    return [spec for spec, _ in _load_with_paths(targets)]


def _load_with_paths(targets: list[str]):
    """(spec, path) of every spec named, all validated; two specs of one name (one module) refused."""
    from .model.spec import load_spec

    paths = spec_paths(targets, notes=True)
    specs = [load_spec(p) for p in paths]
    names: dict[str, Path] = {}
    for spec, path in zip(specs, paths):
        if spec.name in names and names[spec.name].resolve() != path.resolve():
            raise UsageError(f"{path}: spec name {spec.name!r} is also used by {names[spec.name]}; "
                             f"generated modules are named after specs, so names must be unique")
        names[spec.name] = path
    return list(zip(specs, paths))


def cmd_build(args) -> int:
    from .compile.render import build_all

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder; name a folder for the generated files")
    # Validate every spec before writing anything, so one bad spec leaves no partial build behind; then write all
    # files of all specs at once (temporary files renamed at the end), so a failed write leaves none either.
    for built in build_all(_load_with_paths(args.specs), out):
        state = "updated" if built.changed else "unchanged"
        print(f"{built.spec.name:<20} {built.spec.hash}  {built.module}  {built.test}  ({state})")
    return 0


def cmd_check(args) -> int:
    for spec in _load_all(args.specs):
        print(f"{spec.name}: ok (hash {spec.hash})")
    return 0


def cmd_explain(args) -> int:
    from .compile.analysis import explain

    if args.seqlen is not None and args.seqlen < 1:
        raise UsageError(f"--seqlen {args.seqlen}: a sequence length is at least 1")
    for spec in _load_all(args.specs):
        print(explain(spec, args.seqlen))
    return 0


def cmd_list(args) -> int:
    from .model.spec import load_spec

    print(f"{'name':<20} {'family':<6} {'hash':<16}  {'heads':<8} {'dims':<8} {'dtype':<5} {'mla':<3} "
          f"{'scale':<9} {'selection':<24} file")
    for path in spec_paths(args.folders or ["specs"]):
        try:
            s = load_spec(path)
        except SpecError as exc:
            print(f"{path.stem:<20} invalid: {' '.join(exc.message.split())}  ({path})")
            continue
        sel = s.selection
        sel_text = (f"{sel.granularity} top{sel.top_k}" + (f" l'={sel.block}" if sel.granularity == "block" else "")
                    if sel else "-")
        print(f"{s.name:<20} {s.family:<6} {s.hash}  {f'{s.heads.q}/{s.heads.kv}':<8} {f'{s.head_dim.qk}/{s.head_dim.v}':<8} "
              f"{s.dtype:<5} {'yes' if s.mla else 'no':<3} {s.softmax_scale:<9.4g} {sel_text:<24} {path}")
    return 0


def cmd_bench(args) -> int:
    import torch

    if args.decode_forms:
        from .perf.bench_decode import parse_forms

        try:  # a misspelt form is refused before any GPU work
            [parse_forms(f) for f in args.decode_forms]
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if args.training_step:
        if args.decode or args.forward_only:
            raise UsageError("--training-step times the whole training step: drop --decode/--forward-only")
        from .perf.bench_train import check_trainable

        for spec, _ in _load_with_paths(args.specs):  # every spec refused before any GPU work
            try:
                check_trainable(spec, dense=not args.no_dense)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
    if not torch.cuda.is_available():
        raise UsageError("bench needs a CUDA GPU (timings under the CPU interpreter mean nothing)")
    if args.decode:
        from .compile.jit import load
        from .perf.bench_decode import bench_decode, check_decode_forms, record_decode, table as decode_table

        if args.decode_forms:  # every (spec, forms) pair checked before any GPU work
            for spec, path in _load_with_paths(args.specs):
                try:
                    check_decode_forms(load(spec, path), args.decode_forms)
                except ValueError as exc:
                    raise UsageError(str(exc)) from None
        for spec, path in _load_with_paths(args.specs):
            contexts = args.seqlens or [8192, 16384, 32768, 65536, 131072]
            copy_gbps, rows = bench_decode(spec, contexts, args.batches, q_len=args.q_len, dense=not args.no_dense,
                                           flex=args.flex, spec_path=path, scorings=args.decode_scoring,
                                           forms=args.decode_forms, layouts=tuple(args.layouts))
            print(decode_table(spec, copy_gbps, rows))
            print(f"recorded in {record_decode(spec, copy_gbps, rows, Path(args.out))}")
        return 0
    args.seqlens = args.seqlens or [8192, 16384, 32768, 65536]
    if args.training_step:
        return _bench_training_step(args)
    from .perf.bench import bench_passes, machine_peaks, record, table

    machine = machine_peaks()
    for spec, path in _load_with_paths(args.specs):
        machine, rows = bench_passes(spec, args.seqlens, backward=not args.forward_only, dense=not args.no_dense,
                                     machine=machine, spec_path=path)
        print(table(spec, machine, rows))
        kind = "forward" if args.forward_only else "passes"
        print(f"recorded in {record(spec, kind, rows, regime=args.regime, out_dir=Path(args.out), machine=machine)}")
    return 0


def _bench_training_step(args) -> int:
    from .perf.bench import record
    from .perf.bench_train import bench_training_step, table

    for spec, path in _load_with_paths(args.specs):
        rows = bench_training_step(spec, args.seqlens, dense=not args.no_dense, spec_path=path)
        print(table(spec, rows))
        print(f"recorded in {record(spec, 'training_step', rows, regime=args.regime, out_dir=Path(args.out))}")
    return 0


def cmd_tune(args) -> int:
    import torch

    if not torch.cuda.is_available():
        raise UsageError("tune needs a CUDA GPU")
    from .perf.tune import tune

    for spec, path in _load_with_paths(args.specs):
        try:
            tune(spec, path, min(args.seqlen, spec.max_seqlen), Path(args.workdir), backward=not args.forward_only,
                 kernels=args.kernels)
        except ValueError as exc:  # an unknown --kernels entry, said before any GPU work
            raise UsageError(str(exc)) from None
    print("run `specgen build` to bake the records into the generated modules")
    return 0


def cmd_sweep(args) -> int:
    from .study.sweep import default_out, expand, load_sweep, run_sweep

    path = Path(args.sweep)
    if not path.is_file():
        raise UsageError(f"{path}: no such sweep file")
    sweep = load_sweep(path)
    out = Path(args.out) if args.out else default_out(sweep)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: at least 1")
    if args.dry_run:
        points = expand(sweep)
        for p in points:
            extra = f"top_k={p.top_k} {p.hash}" if p.status == "valid" else p.reason
            print(f"{p.index:>4} {p.label:<32} {p.status:<9} {extra}" + (f"  [{'; '.join(p.notes)}]" if p.notes else ""))
        valid = sum(p.status == "valid" for p in points)
        from .study.sweep import make_tasks

        n = sum(t["part"] == "fidelity" for t in make_tasks(sweep, points, "cpu"))
        print(f"{len(points)} points, {valid} valid; {n} fidelity measurements, each repeated "
              f"{sweep.fidelity['seeds']} times (fidelity.seeds)")
        return 0
    if args.report_only:
        from .study.sweep import report

        if not (out / "results.jsonl").exists():
            raise UsageError(f"{out}/results.jsonl: nothing measured yet")
        print(f"report: {report(out, sweep, plot_format=args.plot_format)['report']}")
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU here (use --device cpu for fidelity only)")

    def log(line: str) -> None:
        print(line, flush=True)

    from .study.sweep import SweepInterrupted

    try:
        result = run_sweep(sweep, out, jobs=args.jobs, device=args.device, backend=args.backend, log=log)
    except (SweepInterrupted, KeyboardInterrupt) as exc:
        print(f"specgen: {exc}" if isinstance(exc, SweepInterrupted) else
              f"specgen: interrupted before measuring; {out} is unchanged or resumable: run the same command again",
              file=sys.stderr)
        return 130
    return 1 if result["errors"] else 0


def cmd_capture(args) -> int:
    from .study.capture_format import CaptureError

    if not Path(args.text).is_file():
        raise UsageError(f"--text {args.text}: no such file")
    if args.seqlen < 2 or args.batch < 1:
        raise UsageError(f"--seqlen {args.seqlen} --batch {args.batch}: need seqlen >= 2 and batch >= 1")
    try:
        from .study.capture import main as capture_main

        path = capture_main(args)
    except CaptureError as exc:
        raise UsageError(str(exc)) from None
    print(f"captured: {path} (use it as `regimes: [file:{path}]`, the path relative to the sweep file)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specgen", description="Generate specialised sparse-attention Triton kernels "
                                "from YAML specs.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"specgen {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("build", help="render specs into importable modules and their tests")
    b.add_argument("specs", nargs="+", metavar="SPEC", help="spec files or folders of specs")
    b.add_argument("--out", default="generated", help="output folder (default: generated)")
    b.set_defaults(func=cmd_build)

    c = sub.add_parser("check", help="validate specs without building")
    c.add_argument("specs", nargs="+", metavar="SPEC")
    c.set_defaults(func=cmd_check)

    e = sub.add_parser("explain", help="print the symbolic cost analysis of specs (FLOPs, bytes, memory)")
    e.add_argument("specs", nargs="+", metavar="SPEC")
    e.add_argument("--seqlen", "-T", type=int, default=None, help="sequence length for numbers "
                   "(default: the spec's max_seqlen)")
    e.set_defaults(func=cmd_explain)

    bn = sub.add_parser("bench", help="time generated kernels on the GPU against dense SDPA in the same run")
    bn.add_argument("specs", nargs="+", metavar="SPEC")
    bn.add_argument("--seqlens", type=int, nargs="+", default=None,
                    help="sequence lengths (default 8k..64k; with --decode, contexts 8k..128k)")
    bn.add_argument("--regime", default="random", choices=["random"], help="input regime (named in the record)")
    bn.add_argument("--no-dense", action="store_true", help="skip the dense SDPA baselines")
    bn.add_argument("--forward-only", action="store_true", help="time the forward only (default: forward, backward "
                    "and forward+backward, with per-kernel times)")
    bn.add_argument("--decode", action="store_true",
                    help="time one decoding step from a KV cache against dense decoding of the same cache")
    bn.add_argument("--training-step", action="store_true",
                    help="time DSA's training step whole and by piece (indexer + top-k, sparse attention forward and "
                    "backward, distillation loss in both stages) with its memory, against dense SDPA forward+backward "
                    "(MLA specs: the unabsorbed MHA); specs with an indexer only")
    bn.add_argument("--batches", type=_batch, nargs="+", default=[1, 64],
                    help="--decode: batch sizes; 'max': the largest whose caches fit the GPU's free memory "
                    "(perf.bench_decode.FIT_FRACTION of it; the record says so)")
    bn.add_argument("--q-len", type=int, default=1, help="--decode: new queries per sequence and step")
    bn.add_argument("--decode-scoring", nargs="+", choices=["partials", "logits"], default=None,
                    help="--decode: the compression scorer's paths to time on each cache, one row each (default: "
                    "the plan's, DecodePlan.scoring; docs/decode.md)")
    bn.add_argument("--decode-forms", nargs="+", default=None, metavar="FORMS",
                    help="--decode: the step's forms to time on each cache, one row each: 'plan', or '+'-joined "
                    "names of the launch forms (split; cw, fused, whole, persist: compression-scored steps on the "
                    "partials path, persist the split form's programs in one launch, untimed; auto: whole where its "
                    "batch rule says so, else cw where it applies, else split) and of runtime.decode_step."
                    "SELECTION_FORMS (MLA selection kernel: base, ks_pf, ks_pf_s2, ks_pf_k32) "
                    "and INDEX_FORMS (index scores: tile, wide, wide_k64, wide_w8), TOPK_FORMS (indexer top-k) and "
                    "TOPN_FORMS (compression-scored top-n on the partials path: row, chunked, chunked_ticket) and "
                    "CMP_FORMS (the compression kernel's launch: cmp_base, cmp_s3, cmp_s3_r2, cmp_s4_r1, "
                    "cmp_k32_r3) and CHAINS (how the split and cw forms' launches follow each other: plain, pdl), "
                    "a cap on every branch's key-range splits, ms<N> (e.g. ms8), and the epilogue's splits a load, "
                    "cs<N> (e.g. cs32), "
                    "e.g. 'plan fused chunked_ticket cmp_s3_r2 whole whole+cmp_s3_r2' (NSA) or "
                    "'plan ks_pf+wide' (DSA) (docs/decode.md, 'Launch forms', 'Compression forms' and 'Forms of the "
                    "DSA step')")
    bn.add_argument("--layouts", nargs="+", choices=["contiguous", "paged"], default=["contiguous"],
                    help="--decode: the cache layouts to time each row on ('paged': a row on the contiguous "
                    "cache's values in pages of the spec's page size, handed out in a random order, beside the "
                    "contiguous row; its paged_vs_contiguous compares them)")
    bn.add_argument("--flex", action="store_true", help="--decode: also time FlexAttention's decoding path "
                    "(compiled per shape: slow to start)")
    bn.add_argument("--out", default="bench/results", help="folder of the JSON records")
    bn.set_defaults(func=cmd_bench)

    tn = sub.add_parser("tune", help="measure launch configs on the GPU; write specs/<name>.tune.json")
    tn.add_argument("specs", nargs="+", metavar="SPEC")
    tn.add_argument("--seqlen", type=int, default=32768, help="representative sequence length (default 32768)")
    tn.add_argument("--workdir", default=".specgen-cache/tuning", help="scratch folder for candidate modules")
    tn.add_argument("--forward-only", action="store_true", help="tune the forward kernels only (the backward's "
                    "are timed inside forward+backward, which costs more per candidate)")
    tn.add_argument("--kernels", nargs="+", metavar="KERNEL", default=None,
                    help="retune only these config entries (e.g. selection_dkdv), starting from this GPU's record")
    tn.set_defaults(func=cmd_tune)

    sw = sub.add_parser("sweep", help="expand a sweep file, build each variant, measure fidelity (and speed on a "
                        "GPU), and write a report")
    sw.add_argument("sweep", metavar="SWEEP.yaml", help="a sweep file (specs/*.sweep.yaml)")
    sw.add_argument("--out", default=None, help="results folder (default: bench/sweeps/<sweep name>)")
    sw.add_argument("--jobs", "-j", type=int, default=None,
                    help="parallel workers (default: 1 on a CPU; one per visible GPU with --device cuda)")
    sw.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cpu: fidelity only; cuda: fidelity and speed, one worker per GPU")
    sw.add_argument("--backend", default="local", choices=["local", "ray"],
                    help="local process pool, or Ray tasks (optional: pip install ray; RAY_ADDRESS names a cluster)")
    sw.add_argument("--dry-run", action="store_true", help="print the expanded grid (invalid points with reasons)")
    sw.add_argument("--report-only", action="store_true", help="rewrite the report from results.jsonl")
    sw.add_argument("--plot-format", default="png", choices=["png", "svg"])
    sw.set_defaults(func=cmd_sweep)

    cp = sub.add_parser("capture", help="record q/k (after RoPE), v and hidden states of a Hugging Face causal LM's "
                        "attention layers over a text file, for a sweep's file: regime")
    cp.add_argument("model", help="a Hub id or a local folder (with --random-init: a folder with config.json)")
    cp.add_argument("--text", required=True, help="a UTF-8 text file, cut into --batch chunks of --seqlen tokens")
    cp.add_argument("--seqlen", "-T", type=int, required=True, help="tokens per sequence")
    cp.add_argument("--batch", type=int, default=2, help="sequences (default 2: the sweep fits on the first half "
                    "and evaluates on the rest)")
    cp.add_argument("--layers", type=int, nargs="+", default=None, help="layer indices (default: all)")
    cp.add_argument("--out", required=True, help="PATH.safetensors (or .pt)")
    cp.add_argument("--random-init", action="store_true", help="random weights from the model's config.json "
                    "(seeded by --seed; nothing downloaded): for tests and tiny demonstration models")
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--byte-tokens", action="store_true", help="UTF-8 bytes as token ids instead of the model's "
                    "tokenizer (only for randomly initialised models)")
    cp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    cp.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    cp.add_argument("--no-verify", action="store_true", help="skip the check that attention over the captured "
                    "q/k/v reproduces the model's attention output")
    cp.set_defaults(func=cmd_capture)

    ls = sub.add_parser("list", help="list the specs in folders (default: specs/)")
    ls.add_argument("folders", nargs="*", metavar="FOLDER")
    ls.set_defaults(func=cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as exc:
        print(f"specgen: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except (UsageError, BuildError) as exc:
        print(f"specgen: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except BrokenPipeError:
        # `specgen explain SPEC | head`: the reader left; say nothing more (Python's own advice: point stdout at
        # devnull so the interpreter's final flush does not raise again).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
