#!/usr/bin/env python
"""minray benchmark harness.

    python tools/bench.py [--quick] [--only GROUP_OR_NAME,...] [--json FILE]
                          [--list] [--vs ray]

Prints the machine, then one line per figure: ``name value unit``.
``--json FILE`` writes ``{figure_name: number}`` for every figure measured.

Figures live in ``tools/benchmarks/<group>.py``; every module there is imported
and registers its measurements with ``benchmarks.figure`` / ``benchmarks.figures``.
``--only`` takes group names and/or figure names, comma separated.
``--quick`` uses smaller sizes and fewer repetitions (same figure names).
``--vs ray`` also runs the comparison figures against Ray, if Ray is installed.

Exit status: 0 when every selected figure was measured, 1 when a measurement
failed or a group module could not be imported, 2 for bad arguments.
"""
import argparse
import importlib
import importlib.util
import json
import math
import os
import pkgutil
import platform
import sys
import time
import traceback

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)
# Prefer an installed minray (pip install -e .); fall back to the checkout.
if importlib.util.find_spec("minray") is None:
    sys.path.append(REPO)

import benchmarks  # noqa: E402

VS_CHOICES = ("ray",)


class UnknownName(ValueError):
    """--only named something that is neither a group nor a figure."""


def discover():
    """Import every module in tools/benchmarks; return {module: error text}."""
    errors = {}
    for info in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"benchmarks.{info.name}")
        except Exception:  # report it, keep the other groups usable
            errors[info.name] = traceback.format_exc()
    return errors


# --- machine ---------------------------------------------------------------

def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes():
    try:
        import psutil

        return psutil.virtual_memory().total
    except Exception:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine():
    ram = _ram_bytes()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": _cpu_model(),
        "ram_gb": round(ram / 2**30, 1) if ram else None,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "os": f"{platform.system()} {platform.release()}",
    }


def print_machine(info, out):
    cpus = f"{info['cpus']}"
    if info["cpus_usable"] != info["cpus"]:
        cpus += f" ({info['cpus_usable']} usable)"
    print(f"# machine: {cpus} CPUs, {info['cpu_model']}, "
          f"{info['ram_gb']} GiB RAM", file=out)
    print(f"# python {info['python']} ({info['implementation']}), {info['os']}",
          file=out)


# --- selection -------------------------------------------------------------

def select(registry, only):
    """Return [(measurement, [figure names wanted])] for the --only list."""
    if not only:
        return [(m, list(m.units)) for m in registry.measurements]
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    groups = set(registry.groups())
    names = set(registry.figure_names())
    unknown = [w for w in wanted if w not in groups and w not in names]
    if unknown:
        raise UnknownName(_unknown_message(registry, unknown))
    chosen = []
    for m in registry.measurements:
        if m.group in wanted:
            chosen.append((m, list(m.units)))
        else:
            picked = [n for n in m.units if n in wanted]
            if picked:
                chosen.append((m, picked))
    return chosen


def _unknown_message(registry, unknown):
    lines = [f"bench.py: unknown group or figure: {', '.join(unknown)}",
             f"valid groups: {', '.join(registry.groups()) or '(none)'}",
             "valid figures:"]
    for g in registry.groups():
        figs = [n for m in registry.measurements if m.group == g for n in m.units]
        lines.append(f"  {g}: {', '.join(figs)}")
    return "\n".join(lines)


def print_list(registry, out):
    units = registry.units()
    for g in registry.groups():
        print(f"{g}:", file=out)
        for m in registry.measurements:
            if m.group != g:
                continue
            tag = f"  [only with --vs {m.vs}]" if m.vs else ""
            for n in m.units:
                print(f"  {n:<34} {units[n]}{tag}", file=out)


# --- running ---------------------------------------------------------------

def fmt(value):
    if value is None or not math.isfinite(value):
        return str(value)
    a = abs(value)
    if a >= 1000:
        return f"{value:.0f}"
    if a >= 100:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def ray_available():
    return importlib.util.find_spec("ray") is not None


def run(selected, quick, vs, out):
    results, failed = {}, []
    seen_errors = set()
    ray_ok = None
    for m, names in selected:
        if m.vs:
            if m.vs not in vs:
                continue
            if m.vs == "ray":
                if ray_ok is None:
                    ray_ok = ray_available()
                if not ray_ok:
                    continue
        t0 = time.perf_counter()
        try:
            values = m.func(quick)
        except benchmarks.Skip as e:
            for n in names:
                print(f"{n:<34} {'skipped':>12}  ({e})", file=out, flush=True)
            continue
        except Exception:
            failed.append(m.name)
            tb = traceback.format_exc()
            last = tb.strip().splitlines()[-1]
            for n in names:
                print(f"{n:<34} {'ERROR':>12}  ({last})", file=out, flush=True)
            if last in seen_errors:  # same failure as before: don't repeat it
                print(f"# {m.name} failed: {last}", file=sys.stderr, flush=True)
            else:
                seen_errors.add(last)
                print(f"# {m.name} failed:\n{tb}", file=sys.stderr, flush=True)
            continue
        elapsed = time.perf_counter() - t0
        if not isinstance(values, dict):
            values = {names[0]: values}
        missing = [n for n in m.units if n not in values]
        if missing:
            failed.append(m.name)
            print(f"# {m.name} did not return {', '.join(missing)}",
                  file=sys.stderr, flush=True)
        note = f"  ({m.quick_note})" if quick and m.quick_note else ""
        for n in names:
            if n not in values:
                continue
            v = float(values[n])
            if not math.isfinite(v):  # JSON can't carry it; it's a bug anyway
                failed.append(f"{m.name} ({n} = {v})")
                print(f"{n:<34} {'ERROR':>12}  (not a finite number: {v})",
                      file=out, flush=True)
                continue
            results[n] = v
            line = f"{n:<34} {fmt(v):>12}  {m.units[n]:<6}{note}"
            print(line.rstrip(), file=out, flush=True)
        if os.environ.get("MINRAY_BENCH_VERBOSE"):
            print(f"#   ({m.name}: {elapsed:.1f} s)", file=out, flush=True)
    return results, failed


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="bench.py",
        description="Measure minray. One line per figure: name value unit.")
    p.add_argument("--quick", action="store_true",
                   help="smaller sizes and fewer repetitions (same figure names)")
    p.add_argument("--only", metavar="GROUP_OR_NAME,...",
                   help="comma-separated group names and/or figure names")
    p.add_argument("--json", metavar="FILE",
                   help="write {figure_name: number} to FILE")
    p.add_argument("--list", action="store_true",
                   help="list groups and figures, then exit")
    p.add_argument("--vs", action="append", default=[], choices=VS_CHOICES,
                   help="also run the comparison figures against this system "
                        "(needs it installed)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = sys.stdout
    import_errors = discover()
    for mod, tb in import_errors.items():
        print(f"bench.py: could not import benchmarks.{mod}:\n{tb}", file=sys.stderr)
    reg = benchmarks.registry

    if args.list:
        print_list(reg, out)
        return 1 if import_errors else 0

    try:
        selected = select(reg, args.only)
    except UnknownName as e:
        print(e, file=sys.stderr)
        return 2

    print_machine(machine(), out)
    if args.quick:
        print("# mode: quick (smaller sizes, fewer repetitions; figure names unchanged)",
              file=out)
    if "ray" in args.vs:
        if ray_available():
            import ray

            print(f"# comparing against Ray {getattr(ray, '__version__', '?')}", file=out)
        else:
            print("# Ray is not installed: skipping the comparison figures against Ray "
                  "(pip install ray to run them)", file=out)
    out.flush()

    results, failed = run(selected, args.quick, set(args.vs), out)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
            f.write("\n")
    if failed:
        print(f"bench.py: {len(failed)} measurement(s) failed: {', '.join(failed)}",
              file=sys.stderr)
    return 1 if (failed or import_errors) else 0


if __name__ == "__main__":
    sys.exit(main())
