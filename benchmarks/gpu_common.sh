# Shared by the benchmarks/gpu_*.sh scripts, sourced after setting NAME and OUT: makes OUT, moves to
# the repository root, sets PY ($PYTHON or python3) and unbuffered Python output, and defines stamp
# (a line with the seconds since the start), stage LIMIT CMD... (CMD under a time limit, saying so
# when it runs out) and install_package LIMIT (the Python package without the C++ extension; the
# script stops if that fails).
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
