# Shared by the benchmarks/gpu_*.sh scripts, sourced after setting NAME and OUT.
#
# Results: the scripts write into a scratch folder (OUT, reset here) and every `stamp` packs it
# into OUTDIR/results.tar.gz (console.txt: everything the script printed; the stage files beside
# it), so that OUTDIR holds two files whenever the run stops: the device tool brings back at most
# 8 files from its $OUT (H200 session 6 got 2 of 14 test logs), and a run killed at its time limit
# runs no exit trap. OUTDIR/console.txt is the console as of the last stamp.
#
# Defines: PY ($PYTHON or python3, unbuffered), stamp MSG (a line with the seconds since the
# start; packs), stage LIMIT CMD... (CMD under a time limit, saying so when it runs out),
# fits LIMIT (whether a stage of LIMIT seconds ends before GPU_CHECK_DEADLINE seconds from the
# start; unset: always), install_package LIMIT (the Python package without the C++ extension; the
# script stops if that fails), build_extension_bg JOBS (the extension, in place, in the
# background: its pid in BUILD) and merge_profile ARGS... (benchmarks/profile_step.py ARGS with
# the merge kernel's default tiles, with ALBEF_FAST_MERGE=8,16,32, =16,16,16,3 (pipelined loads),
# =16,16,16,1,8 and =16,16,16,1,16 (8 and 16 warps) and with ALBEF_FAST_FINISH=kernel, in one
# process, into OUT/profile.txt).
DEST=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
OUT=${TMPDIR:-/tmp}/$NAME.results
rm -rf "$OUT" && mkdir -p "$OUT"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/console.txt") 2>&1
t0=$(date +%s)
pack() {
  # GNU tar exits 1 when a file changed while read (console.txt grows): the archive is still whole
  tar --warning=no-file-changed -czf "$DEST/results.tmp" -C "$OUT" . 2>/dev/null
  [ $? -le 1 ] && mv -f "$DEST/results.tmp" "$DEST/results.tar.gz"
  cp "$OUT/console.txt" "$DEST/console.txt" 2>/dev/null
  return 0
}
stamp() { echo "[$NAME +$(( $(date +%s) - t0 ))s] $*"; pack; }
stage() { local limit=$1; shift; timeout "$limit" "$@"; local rc=$?; [ $rc = 124 ] && stamp "TIMED OUT after ${limit}s"; return $rc; }
fits() {
  local end=$(( $(date +%s) - t0 + $1 ))
  [ -z "${GPU_CHECK_DEADLINE:-}" ] || [ "$end" -le "$GPU_CHECK_DEADLINE" ] && return 0
  stamp "skipped (a ${1}s stage would end past GPU_CHECK_DEADLINE=${GPU_CHECK_DEADLINE}s): $2"; return 1
}
install_package() {
  stamp "install: the Python package"
  if ! ALBEF_FAST_NO_EXTENSION=1 stage "$1" $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1; then
    stamp "install FAILED"; tail -30 "$OUT/install.log"; exit 1
  fi
}
build_extension_bg() {
  stamp "install: the extension, in the background"
  # 300 s: nine translation units (two .cu, and since session 10 the C++ step and entry), built
  # beside 14 test processes compiling kernels; a build cut short costs the run its C++ rows
  (MAX_JOBS=$1 stage 300 $PY setup.py build_ext --inplace >> "$OUT/install.log" 2>&1
   echo "build_ext rc=$?" >> "$OUT/install.log") &
  BUILD=$!
}
merge_profile() {
  stamp "merge at B = 64: device time per kernel, default, ALBEF_FAST_MERGE=8,16,32, =16,16,16,3, =16,16,16,1,8 and =16,16,16,1,16, ALBEF_FAST_FINISH=kernel"
  stage 90 $PY benchmarks/profile_step.py "$@" \
    --settings "ALBEF_FAST_MERGE=;ALBEF_FAST_MERGE=8,16,32;ALBEF_FAST_MERGE=16,16,16,3;ALBEF_FAST_MERGE=16,16,16,1,8;ALBEF_FAST_MERGE=16,16,16,1,16;ALBEF_FAST_FINISH=kernel" 2>&1 \
    | grep -v -i warn | tee -a "$OUT/profile.txt"
}
