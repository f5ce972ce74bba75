# Shared by the benchmarks/gpu_*.sh scripts, sourced after setting NAME and OUT: makes OUT, moves to
# the repository root, sets PY ($PYTHON or python3) and unbuffered Python output, and defines stamp
# (a line with the seconds since the start), stage LIMIT CMD... (CMD under a time limit, saying so
# when it runs out) and install_package LIMIT (the Python package without the C++ extension; the
# script stops if that fails), build_extension_bg JOBS (the extension, in place, in the
# background: its pid in BUILD) and merge_profile ARGS... (benchmarks/profile_step.py ARGS with
# the merge kernel's default tiles and with ALBEF_FAST_MERGE=8,16,32, into OUT/profile.txt).
mkdir -p "$OUT"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "[$NAME +$(( $(date +%s) - t0 ))s] $*"; }
stage() { local limit=$1; shift; timeout "$limit" "$@"; local rc=$?; [ $rc = 124 ] && stamp "TIMED OUT after ${limit}s"; return $rc; }
install_package() {
  stamp "install: the Python package"
  if ! ALBEF_FAST_NO_EXTENSION=1 stage "$1" $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1; then
    stamp "install FAILED"; tail -30 "$OUT/install.log"; exit 1
  fi
}
build_extension_bg() {
  stamp "install: the extension, in the background"
  (MAX_JOBS=$1 stage 200 $PY setup.py build_ext --inplace >> "$OUT/install.log" 2>&1
   echo "build_ext rc=$?" >> "$OUT/install.log") &
  BUILD=$!
}
merge_profile() {
  stamp "merge tiles at B = 64: device time per kernel, default against ALBEF_FAST_MERGE=8,16,32"
  local merge
  for merge in "" 8,16,32; do
    echo "ALBEF_FAST_MERGE=$merge" | tee -a "$OUT/profile.txt"
    ALBEF_FAST_MERGE=$merge stage 25 $PY benchmarks/profile_step.py "$@" 2>&1 | grep -v -i warn \
      | tee -a "$OUT/profile.txt"
  done
}
