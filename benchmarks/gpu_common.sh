# Shared by the benchmarks/gpu_*.sh scripts, sourced from the repository root after setting NAME,
# OUT and PY: stamp (a line with the seconds since the start), stage LIMIT CMD... (CMD under a time
# limit, saying so when it runs out), install_package LIMIT (the Python package without the C++
# extension; the script stops if that fails).
t0=$(date +%s)
stamp() { echo "[$NAME +$(( $(date +%s) - t0 ))s] $*"; }
stage() { local limit=$1; shift; timeout "$limit" "$@"; local rc=$?; [ $rc = 124 ] && stamp "TIMED OUT after ${limit}s"; return $rc; }
install_package() {
  stamp "install: the Python package"
  if ! ALBEF_FAST_NO_EXTENSION=1 stage "$1" $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1; then
    stamp "install FAILED"; tail -30 "$OUT/install.log"; exit 1
  fi
}
