#!/usr/bin/env bash
# This tree ("new") next to an older revision ("old") on this machine, in one run: operators per
# step (tools/count_ops.py, every config, old then new) and tools/bench_peer.py --quick, the
# two trees interleaved per case and repeat (old, new, new, old, ...) so that the machine's
# drift hits both alike. Each tree's side A runs its own code and its own bench (the old
# tree's tuned rates and schedule); the peer is each tree's bench_peer peer.
#
#   bash tools/side_by_side.sh <rev> [repeats]      # ≈ 1 min + 25 s per case and repeat
#
# Results in $OUT (default /tmp/side_by_side): ops-old.json, ops-new.json, peer-<tree>-<case>-<r>.json,
# summary.md (both tables). The CPU twin of tools/gpu_side_by_side.sh.
set -u
REV=${1:?usage: tools/side_by_side.sh <rev> [repeats]}
REPEATS=${2:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
OUT=${OUT:-/tmp/side_by_side}
CASES=${CASES:-census:shared_bottom census:mmoe census:ple movielens:shared_bottom movielens:mmoe movielens:ple}
rm -rf "$OUT" && mkdir -p "$OUT/old"
EXTRA=""
git -C "$ROOT" cat-file -e "$REV:setup.py" 2>/dev/null && EXTRA=setup.py
git -C "$ROOT" archive "$REV" dlrm_mtl tools configs datasets pyproject.toml $EXTRA | tar -x -C "$OUT/old"
# a tree with C kernels (setup.py) runs with them, built in place as `make install` builds them
if [ -n "$EXTRA" ]; then
  ( cd "$OUT/old" && "$PY" setup.py -q build_ext --inplace > "$OUT/old-build.log" 2>&1 )
  ls "$OUT"/old/dlrm_mtl/_cpu_kernels*.so > /dev/null 2>&1 && echo "old tree: C kernels built" || echo "old tree: C kernels NOT built ($OUT/old-build.log)"
fi
# both trees read the same generated data
mkdir -p "$ROOT/data" && ln -sfn "$ROOT/data" "$OUT/old/data"

run() {  # tree-dir cmd...
  local dir=$1; shift
  ( cd "$dir" && PYTHONPATH="$dir" "$@" )
}
echo "count_ops: old ($REV), then new"
run "$OUT/old" "$PY" tools/count_ops.py --json "$OUT/ops-old.json" > "$OUT/ops-old.log" 2>&1 || { tail -20 "$OUT/ops-old.log"; exit 1; }
run "$ROOT" "$PY" tools/count_ops.py --json "$OUT/ops-new.json" > "$OUT/ops-new.log" 2>&1 || { tail -20 "$OUT/ops-new.log"; exit 1; }
# repeat r trains with seed r on both sides where both trees' bench_peer can be told which
# repeat it runs (--first-repeat); an older tree runs every repeat with seed 0, and so does the
# new one then, so that the two trees' AUCs stay comparable
FIRST_REPEAT=""
if grep -q -- "--first-repeat" "$OUT/old/tools/bench_peer.py" && grep -q -- "--first-repeat" "$ROOT/tools/bench_peer.py"; then
  FIRST_REPEAT=1
fi
for r in $(seq 0 $((REPEATS - 1))); do
  for c in $CASES; do
    if [ $((r % 2)) -eq 0 ]; then order="old new"; else order="new old"; fi
    for t in $order; do
      dir=$ROOT; [ "$t" = old ] && dir=$OUT/old
      f="$OUT/peer-$t-${c/:/-}-$r.json"
      run "$dir" "$PY" tools/bench_peer.py --quick --cases "$c" --repeats 1 ${FIRST_REPEAT:+--first-repeat $r} --data-root "$ROOT/data/bench_peer" --json "$f" \
        > "${f%.json}.log" 2>&1 || { tail -20 "${f%.json}.log"; exit 1; }
      echo "  $t $c rep $r: $(grep -o 'ratio A/peer samples/s [0-9.]*' "${f%.json}.log")"
    done
  done
done
"$PY" - "$OUT" "$REV" <<'EOF' | tee "$OUT/summary.md"
import glob, json, statistics, sys
out, rev = sys.argv[1], sys.argv[2]
ops = {t: {c["case"]: c for c in json.load(open(f"{out}/ops-{t}.json"))["cases"]} for t in ("old", "new")}
print(f"Operators per step, {rev} (old) and this tree (new), one after the other:\n")
print("| config | ops old | ops new | logging step old | logging step new | host syncs old / new |")
print("|---|---|---|---|---|---|")
for k, o in ops["old"].items():
    n = ops["new"].get(k)
    if n:
        print(f"| {k} | {o['ops_per_step']} | {n['ops_per_step']} | {o['ops_logging_step']} | {n['ops_logging_step']} | {o['syncs_per_step']} / {n['syncs_per_step']} |")
runs = {}
for f in glob.glob(f"{out}/peer-*.json"):
    tree = f.split("/peer-")[1].split("-")[0]
    for c in json.load(open(f))["cases"]:
        runs.setdefault((c["shape"], c["arch"]), {}).setdefault(tree, []).append(c)
print(f"\nbench_peer --quick, the trees interleaved per case and repeat (median ratio, min-max):\n")
print("| case | old ratio | old A / peer samples/s | new ratio | new A / peer samples/s | new A - peer AUC |")
print("|---|---|---|---|---|---|")
for key in sorted(runs):
    row = [f"{key[0]} {key[1]}"]
    for t in ("old", "new"):
        cs = runs[key].get(t, [])
        if not cs:
            row += ["-", "-"]
            continue
        rs = [c["ratio"] for c in cs]
        row.append(f"{statistics.median(rs):.2f} [{min(rs):.2f}-{max(rs):.2f}]")
        row.append(f"{statistics.median(c['samples_per_s'] for c in cs):,.0f} / {statistics.median(c['peer_samples_per_s'] for c in cs):,.0f}")
    new = runs[key].get("new", [])  # the AUC difference, median over the repeats
    row.append(" ".join(f"{v} {statistics.median(c['auc'][v] - c['peer_auc'][v] for c in new):+.4f}" for v in sorted(new[0]["auc"])) if new else "-")
    print("| " + " | ".join(row) + " |")
EOF
